-- What clients call (PostgREST RPC, supabase.rpc): create, read, report on, cancel and
-- retry tasks, and the statistics. An API function that needs privileges is a thin
-- SECURITY INVOKER wrapper over its SECURITY DEFINER twin in taskman_private, so no
-- privileged function is exposed in the API schema (the Security Advisor's rule); the
-- twin checks who is calling (visible_task: the owner, or the service; update_task and
-- callback_profile: or the holder of the task's callback token).

-- The task as its owner sees it: without the write-only columns, with the live poll
-- figures.
create or replace function taskman.task_json(t taskman.tasks)
returns jsonb
language sql stable security invoker
set search_path = ''
as $$
  select (to_jsonb(t) - '{poll_headers,submit_headers,callback_headers}'::text[])
         || coalesce(taskman_private.poll_state(t.task_id), '{}')
$$;
revoke all on function taskman.task_json from public, anon;
grant execute on function taskman.task_json to authenticated, service_role;

-- The task row if the caller may act on it (owner or service), else PT404.
create or replace function taskman_private.visible_task(p_task_id uuid, lock_row boolean)
returns taskman.tasks
language plpgsql volatile
set search_path = ''
as $$
declare
  t taskman.tasks;
begin
  perform taskman_private.require_user();
  if lock_row then
    select * into t from taskman.tasks where task_id = p_task_id for update;
  else
    select * into t from taskman.tasks where task_id = p_task_id;
  end if;
  if not found
     or not (taskman_private.caller_is_service() or coalesce(t.user_id = auth.uid(), false)) then
    raise exception using errcode = 'PT404', message = format('task %s not found', p_task_id);
  end if;
  return t;
end
$$;
revoke all on function taskman_private.visible_task from public, anon, authenticated;

-- A new callback token for the task, replacing any earlier one: returns the plain text
-- (244 random bits); only its hash is kept. For a task whose submit uses
-- {callback_url}, the plain token is kept service-side too (the worker puts it in the
-- URL it hands the remote); once that submit was sent, the token stays (retry_task
-- submits such a task again first, so a retry gets a new one).
create or replace function taskman_private.issue_callback_token(task_id uuid)
returns text
language plpgsql volatile
set search_path = ''
as $$
declare
  token text := replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '');
  kept text := case when taskman_private.submit_needs_callback_url(issue_callback_token.task_id)
                    then token end;
  handed text;
begin
  select p.submit_callback_token into handed
  from taskman_private.task_private p
  join taskman.tasks t on t.task_id = p.task_id
  where p.task_id = issue_callback_token.task_id and t.submitted_at is not null;
  if handed is not null then
    return handed;
  end if;
  insert into taskman_private.task_private (task_id, callback_token_hash, submit_callback_token)
  values (issue_callback_token.task_id, sha256(convert_to(token, 'UTF8')), kept)
  on conflict on constraint task_private_pkey do update
  set callback_token_hash = excluded.callback_token_hash,
      submit_callback_token = excluded.submit_callback_token, updated_at = now();
  return token;
end
$$;
revoke all on function taskman_private.issue_callback_token from public, anon, authenticated;

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

-- The rows a new task gets beside its own: its private row when it has headers or a
-- callback token, its schedule row (with the task's owner, for the claim's turns), its
-- `created` event and the NOTIFY. A new task has no rows there yet (deleting a task
-- deletes them), so these are plain inserts.
create or replace function taskman_private.add_task_rows(t taskman.tasks, poll_headers jsonb,
                                                         submit_headers jsonb,
                                                         callback_headers jsonb,
                                                         callback_token_hash bytea)
returns void
language plpgsql volatile
set search_path = ''
as $$
begin
  if num_nonnulls(poll_headers, submit_headers, callback_headers, callback_token_hash) > 0 then
    insert into taskman_private.task_private
      (task_id, poll_headers, submit_headers, callback_headers, callback_token_hash)
    values (t.task_id, add_task_rows.poll_headers, add_task_rows.submit_headers,
            add_task_rows.callback_headers, add_task_rows.callback_token_hash);
  end if;
  insert into taskman_private.task_schedule (task_id, next_poll_at, priority, host, owner)
  values (t.task_id, t.next_poll_at, t.priority, taskman_private.request_host(t),
          coalesce(t.user_id, '00000000-0000-0000-0000-000000000000'));
  insert into taskman.task_events (task_id, user_id, event_type, to_status, detail)
  values (t.task_id, t.user_id, 'created', t.status,
          jsonb_strip_nulls(jsonb_build_object(
            'task_type', t.task_type, 'polled', t.poll_url is not null,
            'submitted', case when t.submit_url is not null then false end)));
  perform taskman_private.notify_task(t);
end
$$;
revoke all on function taskman_private.add_task_rows from public, anon, authenticated;

-- Registers a task and returns it with its callback_token (shown once). Only the
-- service may create a task without an owner: a caller with no user id (anon, or a
-- token without `sub`) is refused. With an idempotency key, a second call returns the
-- first task: the insert skips a row whose key is taken (ON CONFLICT DO NOTHING on
-- tasks_idempotency_key_idx, which waits for the other call to commit or roll back),
-- and the task that won is the answer; no subtransaction, which every call would pay
-- for. The task and its rows are written here (taskman.task_creator on), not by the
-- row triggers.
create or replace function taskman_private.create_task(
  poll_url text default null,
  poll_method text default null,
  task_type text default null,
  external_id text default null,
  poll_headers jsonb default null,
  poll_body jsonb default null,
  poll_config jsonb default null,
  poll_interval_seconds integer default null,
  max_attempts integer default null,
  timeout_minutes integer default null,
  callback_url text default null,
  idempotency_key text default null,
  metadata jsonb default null,
  submit_url text default null,
  submit_method text default null,
  submit_headers jsonb default null,
  submit_body jsonb default null,
  callback_headers jsonb default null,
  start_at timestamptz default null,
  priority integer default null,
  heartbeat_seconds integer default null
)
returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
-- The ON CONFLICT target names columns that are also parameters.
#variable_conflict use_column
declare
  owner uuid := auth.uid();
  t taskman.tasks;
  private_poll_headers jsonb;
  private_submit_headers jsonb;
  private_callback_headers jsonb;
  token text;
  inserted boolean;
begin
  if owner is null and not taskman_private.caller_is_service() then
    raise exception using errcode = '42501', message = 'sign in to create tasks';
  end if;
  if create_task.idempotency_key is not null then
    select * into t from taskman.tasks x
    where coalesce(x.user_id, '00000000-0000-0000-0000-000000000000'::uuid)
            = coalesce(owner, '00000000-0000-0000-0000-000000000000'::uuid)
      and x.idempotency_key = create_task.idempotency_key;
    if found then
      return taskman.task_json(t) || '{"idempotent_replay": true}';
    end if;
  end if;

  t.user_id := owner;
  t.poll_url := create_task.poll_url;
  t.poll_method := create_task.poll_method;
  t.task_type := create_task.task_type;
  t.external_id := create_task.external_id;
  t.poll_headers := create_task.poll_headers;
  t.poll_body := create_task.poll_body;
  t.poll_config := create_task.poll_config;
  t.poll_interval_seconds := create_task.poll_interval_seconds;
  t.max_attempts := create_task.max_attempts;
  t.timeout_minutes := create_task.timeout_minutes;
  t.callback_url := create_task.callback_url;
  t.idempotency_key := create_task.idempotency_key;
  t.metadata := create_task.metadata;
  t.submit_url := create_task.submit_url;
  t.submit_method := create_task.submit_method;
  t.submit_headers := create_task.submit_headers;
  t.submit_body := create_task.submit_body;
  t.callback_headers := create_task.callback_headers;
  t.start_at := create_task.start_at;
  t.priority := create_task.priority;
  t.heartbeat_seconds := create_task.heartbeat_seconds;
  t := taskman_private.new_task(t);
  -- The headers live service-side only (the row's columns stay empty).
  private_poll_headers := t.poll_headers;
  private_submit_headers := t.submit_headers;
  private_callback_headers := t.callback_headers;
  t.poll_headers := null;
  t.submit_headers := null;
  t.callback_headers := null;

  -- The row is whole (no column is left to a default), so it is what gets stored. A
  -- concurrent call with the same idempotency key may win the race: its task is the
  -- answer (DO NOTHING waits for it to commit). Without a key there is no race, and
  -- no speculative insert.
  perform pg_catalog.set_config('taskman.task_creator', 'on', true);
  if t.idempotency_key is null then
    insert into taskman.tasks select t.*;
    inserted := true;
  else
    insert into taskman.tasks select t.*
    on conflict (coalesce(user_id, '00000000-0000-0000-0000-000000000000'::uuid), idempotency_key)
      where idempotency_key is not null do nothing;
    inserted := found;
  end if;
  perform pg_catalog.set_config('taskman.task_creator', '', true);
  if not inserted then
    select * into strict t from taskman.tasks x
    where coalesce(x.user_id, '00000000-0000-0000-0000-000000000000'::uuid)
            = coalesce(owner, '00000000-0000-0000-0000-000000000000'::uuid)
      and x.idempotency_key = create_task.idempotency_key;
    return taskman.task_json(t) || '{"idempotent_replay": true}';
  end if;

  if t.submit_url is null then
    token := replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '');
  end if;
  perform taskman_private.add_task_rows(t, private_poll_headers, private_submit_headers,
                                        private_callback_headers,
                                        sha256(convert_to(token, 'UTF8')));
  if t.submit_url is not null then
    token := taskman_private.issue_callback_token(t.task_id);
  end if;
  -- A new task's poll figures are its row's (the schedule row was made from it), so
  -- this is task_json(t) without the schedule read.
  return (to_jsonb(t) - '{poll_headers,submit_headers,callback_headers}'::text[])
    || jsonb_build_object('callback_token', token);
end
$$;
revoke all on function taskman_private.create_task from public, anon;
grant execute on function taskman_private.create_task to authenticated, service_role;

-- The wrapper is plpgsql: a call is an expression, where a non-inlined SQL function
-- starts an executor each time (create_task is the hot one).
create or replace function taskman.create_task(
  poll_url text default null,
  poll_method text default null,
  task_type text default null,
  external_id text default null,
  poll_headers jsonb default null,
  poll_body jsonb default null,
  poll_config jsonb default null,
  poll_interval_seconds integer default null,
  max_attempts integer default null,
  timeout_minutes integer default null,
  callback_url text default null,
  idempotency_key text default null,
  metadata jsonb default null,
  submit_url text default null,
  submit_method text default null,
  submit_headers jsonb default null,
  submit_body jsonb default null,
  callback_headers jsonb default null,
  start_at timestamptz default null,
  priority integer default null,
  heartbeat_seconds integer default null
)
returns jsonb
language plpgsql volatile security invoker
set search_path = ''
as $$
begin
  return taskman_private.create_task(poll_url, poll_method, task_type, external_id, poll_headers,
                                     poll_body, poll_config, poll_interval_seconds, max_attempts,
                                     timeout_minutes, callback_url, idempotency_key, metadata,
                                     submit_url, submit_method, submit_headers, submit_body,
                                     callback_headers, start_at, priority, heartbeat_seconds);
end
$$;
revoke all on function taskman.create_task from public, anon;
grant execute on function taskman.create_task to authenticated, service_role;
comment on function taskman.create_task is
  'Register a task; returns it with its callback_token (shown once). See README.';

-- The task as its owner sees it, with attempt_count and last_polled_at (how many
-- polls, and when the last), for the owner or the service.
create or replace function taskman_private.get_task_status(task_id uuid)
returns jsonb
language plpgsql stable security definer
set search_path = ''
as $$
declare
  t taskman.tasks := taskman_private.visible_task(get_task_status.task_id, false);
  s taskman_private.task_schedule;
begin
  select * into s from taskman_private.task_schedule x where x.task_id = t.task_id;
  return jsonb_build_object(
    'task_id', t.task_id, 'status', t.status, 'progress', t.progress,
    'progress_message', t.progress_message, 'result', t.result, 'error_code', t.error_code,
    'error_message', t.error_message, 'created_at', t.created_at, 'updated_at', t.updated_at,
    'completed_at', t.completed_at,
    'attempt_count', coalesce(s.attempt_count, t.attempt_count),
    'last_polled_at', coalesce(s.last_polled_at, t.last_polled_at));
end
$$;
revoke all on function taskman_private.get_task_status from public, anon;
grant execute on function taskman_private.get_task_status to authenticated, service_role;

create or replace function taskman.get_task_status(task_id uuid)
returns jsonb
language sql stable security invoker
set search_path = ''
as $$
  select taskman_private.get_task_status(task_id)
$$;
revoke all on function taskman.get_task_status from public, anon;
grant execute on function taskman.get_task_status to authenticated, service_role;

-- Whether the task's submit request uses {callback_url} (so its token is kept).
create or replace function taskman_private.submit_needs_callback_url(p_task_id uuid)
returns boolean
language sql stable
set search_path = ''
as $$
  select coalesce(bool_or(t.submit_url is not null
                          and (strpos(coalesce(t.submit_body::text, ''), '{callback_url}') > 0
                               or strpos(coalesce(p.submit_headers::text, ''), '{callback_url}') > 0)),
                  false)
  from taskman.tasks t
  left join taskman_private.task_private p on p.task_id = t.task_id
  where t.task_id = p_task_id
$$;
revoke all on function taskman_private.submit_needs_callback_url from public, anon, authenticated;

-- For service_role, or for anyone holding the task's callback token (a remote reporting
-- back). The service gets the task's JSON; a token holder gets only {task_id, status},
-- what POST /callbacks answers, and never the owner's data. A call that would change
-- nothing the owner sees (the same progress again, the task's current terminal status
-- again) writes nothing and records no event, so repeated callbacks neither fail nor
-- grow the history; it is still a sign of life for the heartbeat (the schedule only).
-- A token holder's error_message is remote text: it is kept service-only and users get
-- the neutral sentence. A report that changes progress and not the status marks its
-- `callback_received` event with `news: progress`, as record_poll_results marks a
-- poll's, for the edge's /events.
create or replace function taskman_private.update_task(
  task_id uuid,
  status text default null,
  result jsonb default null,
  error_message text default null,
  progress integer default null,
  progress_message text default null,
  callback_token text default null
)
returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  t taskman.tasks;
  before taskman.tasks;
  token_hash bytea;
  by_service boolean := taskman_private.caller_is_service();
  progressed boolean;
begin
  select * into t from taskman.tasks x where x.task_id = update_task.task_id for update;
  if not by_service then
    select p.callback_token_hash into token_hash
    from taskman_private.task_private p where p.task_id = update_task.task_id;
    if t.task_id is null or update_task.callback_token is null or token_hash is null
       or token_hash <> sha256(convert_to(update_task.callback_token, 'UTF8')) then
      raise exception using errcode = 'PT403',
        message = 'a valid callback_token is required to update this task';
    end if;
  elsif t.task_id is null then
    raise exception using errcode = 'PT404', message = format('task %s not found', update_task.task_id);
  end if;

  if update_task.status is not null
     and update_task.status not in ('in_progress', 'completed', 'failed', 'cancelled') then
    perform taskman_private.reject('status', 'must be one of in_progress, completed, failed, cancelled');
  end if;
  if update_task.status = 'cancelled' and not by_service then
    perform taskman_private.reject('status', 'cancelled can only be set by the owner through cancel_task');
  end if;

  if t.status in ('completed', 'failed', 'cancelled') then
    if update_task.status is distinct from t.status then
      raise exception using errcode = 'PT409',
        message = format('task %s is already %s and cannot be updated', t.task_id, t.status),
        hint = 'Terminal tasks change only through retry_task.';
    end if;
    return case when by_service then taskman.task_json(t)
                else jsonb_build_object('task_id', t.task_id, 'status', t.status) end;
  end if;

  if t.heartbeat_seconds is not null then
    update taskman_private.task_schedule s set alive_at = now() where s.task_id = t.task_id;
  end if;

  if (coalesce(update_task.status, t.status), coalesce(update_task.result, t.result),
         coalesce(update_task.progress, t.progress),
         coalesce(update_task.progress_message, t.progress_message))
        is distinct from (t.status, t.result, t.progress, t.progress_message) then
    before := t;
    update taskman.tasks x set
      status = coalesce(update_task.status, x.status),
      result = coalesce(update_task.result, x.result),
      error_code = case when update_task.status = 'failed' then 'remote_failed' else x.error_code end,
      error_message = case when update_task.status = 'failed' and by_service
                           then update_task.error_message else x.error_message end,
      progress = coalesce(update_task.progress, x.progress),
      progress_message = coalesce(update_task.progress_message, x.progress_message)
    where x.task_id = update_task.task_id
    returning * into t;

    -- What tasks_after_progress_change NOTIFYs: progress moved, the status did not.
    progressed := t.status = before.status
      and (t.progress, t.progress_message) is distinct from (before.progress, before.progress_message);
    insert into taskman.task_events (task_id, user_id, event_type, to_status, detail)
    values (t.task_id, t.user_id, 'callback_received', t.status,
            jsonb_build_object('via', case when by_service then 'service' else 'callback_token' end)
            || case when progressed
                    then jsonb_strip_nulls(jsonb_build_object('news', 'progress',
                                                              'progress', t.progress))
                    else '{}' end);
  end if;

  if not by_service and update_task.error_message is not null then
    insert into taskman_private.task_private as p (task_id, last_error)
    values (t.task_id, left(update_task.error_message, 4000))
    on conflict on constraint task_private_pkey
    do update set last_error = excluded.last_error, updated_at = now()
    where p.last_error is distinct from excluded.last_error;
  end if;

  return case when by_service then taskman.task_json(t)
              else jsonb_build_object('task_id', t.task_id, 'status', t.status) end;
end
$$;
revoke all on function taskman_private.update_task from public;
grant execute on function taskman_private.update_task to anon, authenticated, service_role;

create or replace function taskman.update_task(
  task_id uuid,
  status text default null,
  result jsonb default null,
  error_message text default null,
  progress integer default null,
  progress_message text default null,
  callback_token text default null
)
returns jsonb
language sql volatile security invoker
set search_path = ''
as $$
  select taskman_private.update_task(task_id, status, result, error_message, progress,
                                     progress_message, callback_token)
$$;
revoke all on function taskman.update_task from public;
grant execute on function taskman.update_task to anon, authenticated, service_role;
comment on function taskman.update_task is
  'Report on a task: service_role, or the holder of its callback_token.';

-- The profile a third party's callback body is read with, for the holder of the
-- task's callback token (the edge's POST /callbacks/{task_id}?token=...).
-- A wrong token and an unknown task both answer PT403: no existence leak.
create or replace function taskman_private.callback_profile(task_id uuid, callback_token text)
returns jsonb
language plpgsql stable security definer
set search_path = ''
as $$
declare
  profile jsonb;
begin
  select taskman_private.effective_profile(t.task_type, t.poll_config) into profile
  from taskman.tasks t
  join taskman_private.task_private p on p.task_id = t.task_id
  where t.task_id = callback_profile.task_id
    and p.callback_token_hash = sha256(convert_to(callback_profile.callback_token, 'UTF8'));
  if profile is null then
    raise exception using errcode = 'PT403',
      message = 'a valid callback_token is required to report on this task';
  end if;
  return profile;
end
$$;
revoke all on function taskman_private.callback_profile from public;
grant execute on function taskman_private.callback_profile to anon, authenticated, service_role;

create or replace function taskman.callback_profile(task_id uuid, callback_token text)
returns jsonb
language sql stable security invoker
set search_path = ''
as $$
  select taskman_private.callback_profile(task_id, callback_token)
$$;
revoke all on function taskman.callback_profile from public;
grant execute on function taskman.callback_profile to anon, authenticated, service_role;

create or replace function taskman_private.cancel_task(task_id uuid)
returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  t taskman.tasks := taskman_private.visible_task(cancel_task.task_id, true);
begin
  if t.status in ('completed', 'failed', 'cancelled') then
    raise exception using errcode = 'PT409',
      message = format('task %s is already %s and cannot be cancelled', t.task_id, t.status);
  end if;
  update taskman.tasks x set status = 'cancelled' where x.task_id = t.task_id returning * into t;
  return taskman.task_json(t);
end
$$;
revoke all on function taskman_private.cancel_task from public, anon;
grant execute on function taskman_private.cancel_task to authenticated, service_role;

create or replace function taskman.cancel_task(task_id uuid)
returns jsonb
language sql volatile security invoker
set search_path = ''
as $$
  select taskman_private.cancel_task(task_id)
$$;
revoke all on function taskman.cancel_task from public, anon;
grant execute on function taskman.cancel_task to authenticated, service_role;

-- A fresh run of a failed or cancelled task, with a new callback token returned once as
-- `callback_token`: the old one opens nothing from then on, on update_task and the
-- edge's /callbacks route alike. A task whose submit hands the remote `{callback_url}`
-- is submitted again (back to no status URL and not submitted), so that the worker
-- sends the new token; another submitted task polls the same job again, and one whose
-- submit failed is submitted again.
create or replace function taskman_private.retry_task(task_id uuid)
returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  t taskman.tasks := taskman_private.visible_task(retry_task.task_id, true);
  resubmit boolean;
begin
  if t.status not in ('failed', 'cancelled') then
    raise exception using errcode = 'PT409',
      message = format('task %s is %s; only failed or cancelled tasks can be retried', t.task_id, t.status);
  end if;
  resubmit := t.submitted_at is not null
              and taskman_private.submit_needs_callback_url(t.task_id);
  perform set_config('taskman.retry_task', t.task_id::text, true);
  update taskman.tasks x
  set status = 'pending',
      submitted_at = case when resubmit then null else x.submitted_at end,
      poll_url = case when resubmit then null else x.poll_url end
  where x.task_id = t.task_id
  returning * into t;
  perform set_config('taskman.retry_task', '', true);
  -- Not submitted any more: the token is new, and kept for the worker's {callback_url}.
  return taskman.task_json(t)
    || jsonb_build_object('callback_token', taskman_private.issue_callback_token(t.task_id));
end
$$;
revoke all on function taskman_private.retry_task from public, anon;
grant execute on function taskman_private.retry_task to authenticated, service_role;

create or replace function taskman.retry_task(task_id uuid)
returns jsonb
language sql volatile security invoker
set search_path = ''
as $$
  select taskman_private.retry_task(task_id)
$$;
revoke all on function taskman.retry_task from public, anon;
grant execute on function taskman.retry_task to authenticated, service_role;
