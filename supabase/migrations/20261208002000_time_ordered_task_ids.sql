-- Time-ordered task ids: new tasks get UUIDv7 ids (taskman_private.uuidv7), so that
-- creating a task writes the end of each index keyed by task id instead of a random page
-- of it. Existing ids stay; a service-supplied task_id is kept as before.

-- A UUID version 7 (RFC 9562): the Unix time in milliseconds (48 bits), the version, the
-- sub-millisecond fraction (12 bits, RFC 9562's method 3, as PostgreSQL 18's uuidv7()),
-- the variant and 62 random bits from gen_random_uuid() (the server's strong random
-- source). Task ids are made this way so that a new task's index entries (the primary
-- keys of tasks, task_private and task_schedule; task_events by task) go beside the
-- previous task's, on pages in memory, rather than on a random page of each index. An
-- id tells when its task was created, and its random bits keep it unguessable; it is no
-- credential either way: RLS decides who reads a task, the callback token who reports on
-- it. The same function on every server version (PostgreSQL 18's own uuidv7() saves
-- about 2 microseconds a call, under 1% of a create_task).
create or replace function taskman_private.uuidv7()
returns uuid
language plpgsql volatile parallel safe
set search_path = ''
as $$
declare
  micros bigint := (extract(epoch from pg_catalog.clock_timestamp()) * 1000000)::bigint;
begin
  return pg_catalog.encode(
    pg_catalog.int8send((micros / 1000) * 65536 + 28672 + (micros % 1000) * 4096 / 1000)
      || pg_catalog.substr(pg_catalog.uuid_send(pg_catalog.gen_random_uuid()), 9),
    'hex')::uuid;
end
$$;
revoke all on function taskman_private.uuidv7 from public, anon, authenticated;

-- The rules of a new task, for create_task and a plain INSERT alike: the insert-only
-- rules, the defaults, the checks. The headers are checked and left in the row: the
-- caller stores them service-side.
create or replace function taskman_private.new_task(t taskman.tasks)
returns taskman.tasks
language plpgsql volatile
set search_path = ''
as $$
declare
  starts timestamptz;
begin
  if t.task_id is not null and not taskman_private.caller_is_service() then
    perform taskman_private.reject('task_id', 'is assigned by Taskman: leave it out');
  end if;
  if t.status is not null and t.status <> 'pending' then
    perform taskman_private.reject('status', 'must be pending (or omitted) when a task is created');
  end if;
  if num_nonnulls(t.result, t.error_code, t.error_message, t.progress, t.progress_message,
                  t.attempt_count, t.error_count, t.deadline_at, t.next_poll_at,
                  t.last_polled_at, t.created_at, t.updated_at, t.started_at,
                  t.completed_at, t.submitted_at) > 0 then
    perform taskman_private.reject('task',
      'fields result, error_code, error_message, progress, progress_message, counters, timestamps '
      'and leases are managed by Taskman and cannot be set when a task is created');
  end if;

  t.task_id := coalesce(t.task_id, taskman_private.uuidv7());
  t.status := 'pending';
  t.task_type := coalesce(t.task_type, 'generic');
  t.poll_method := upper(coalesce(t.poll_method, 'GET'));
  t.submit_method := upper(coalesce(t.submit_method,
                                    case when t.submit_url is not null then 'POST' end));
  t.poll_config := coalesce(t.poll_config, '{}');
  t.poll_interval_seconds := coalesce(t.poll_interval_seconds, 30);
  t.max_attempts := coalesce(t.max_attempts, 10);
  t.timeout_minutes := coalesce(t.timeout_minutes, 120);
  t.metadata := coalesce(t.metadata, '{}');
  t.priority := coalesce(t.priority, 0);
  t.attempt_count := 0;
  t.error_count := 0;

  perform taskman_private.validate_task(t, null::taskman.tasks, true);
  if num_nonnulls(t.submit_url, t.submit_method, t.submit_headers, t.submit_body,
                  t.start_at, t.heartbeat_seconds) > 0
     or t.priority not between -100 and 100 then
    perform taskman_private.validate_submit(t, null::taskman.tasks, true);
  end if;

  starts := greatest(now(), coalesce(t.start_at, now()));
  t.created_at := now();
  t.updated_at := now();
  t.deadline_at := starts + make_interval(mins => t.timeout_minutes);
  -- A task with neither poll_url nor submit_url waits for a callback; the deadline
  -- still applies.
  t.next_poll_at := case when t.poll_url is not null or t.submit_url is not null
                         then starts end;

  if t.poll_headers is not null then
    perform taskman_private.validate_poll_headers(t.poll_headers);
  end if;
  if t.submit_headers is not null then
    perform taskman_private.validate_headers('submit_headers', t.submit_headers,
                                             array['idempotency-key']);
  end if;
  if t.callback_headers is not null then
    perform taskman_private.validate_headers('callback_headers', t.callback_headers,
                                             array['content-type', 'user-agent', 'x-taskman-*']);
  end if;
  return t;
end
$$;
revoke all on function taskman_private.new_task from public, anon, authenticated;
