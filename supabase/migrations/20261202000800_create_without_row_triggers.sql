-- create_task writes a new task and its rows itself, without the row triggers of
-- taskman.tasks, and the schedule and private rows no longer carry foreign keys. The
-- arguments, rules, errors, rows and answers are the same.
--
-- Measured inside the database (1,000 calls in one transaction): 151 µs a call, from
-- 195. Most of it was the four insert triggers (two per row, two per statement), the
-- two foreign-key checks (a lookup and a row lock of the new task each) and the
-- speculative inserts of ON CONFLICT where no conflict can be. Against pgqueuer's
-- enqueue, one durable call at a time in turns: 0.94-0.97, from 0.86-0.92.
--
-- - One set of rules. new_task holds what tasks_prepare_insert did (the insert-only
--   rules, the defaults, the checks), add_task_rows what tasks_after_insert wrote (the
--   private row with the headers, the schedule row, the `created` event, the NOTIFY).
--   The triggers are now wrappers of them, and create_task calls them itself.
-- - While create_task inserts, the transaction-local setting taskman.task_creator is
--   'on' and the four insert triggers do not fire (their WHEN conditions), as
--   taskman.poll_writer works for the record path. Every other INSERT into
--   taskman.tasks goes through the triggers as before. A client's own INSERT with the
--   setting on is refused by the insert policy (42501).
-- - task_schedule and task_private lose their foreign keys to taskman.tasks. Only
--   Taskman's functions write these service-only tables, for a task they have just
--   made or hold. Deleting a task still deletes its rows there: tasks_delete_rows,
--   once per statement, does what the two cascades did.

-- The rules of a new task (tasks_prepare_insert's, as in 20261201001600_faster_create.sql):
-- the insert-only rules, the defaults, the checks. The headers are checked and left in
-- the row: the caller stores them service-side.
create function taskman_private.new_task(t taskman.tasks)
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

  t.task_id := coalesce(t.task_id, gen_random_uuid());
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

-- The rows a new task gets beside its own (tasks_after_insert's, as in
-- 20261201001600_faster_create.sql): its private row when it has headers or a callback
-- token, its schedule row, its `created` event and the NOTIFY. A new task has no rows
-- there yet (deleting a task deletes them), so these are plain inserts.
create function taskman_private.add_task_rows(t taskman.tasks, poll_headers jsonb,
                                              submit_headers jsonb, callback_headers jsonb,
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
  insert into taskman_private.task_schedule (task_id, next_poll_at, priority, host)
  values (t.task_id, t.next_poll_at, t.priority, taskman_private.request_host(t));
  insert into taskman.task_events (task_id, user_id, event_type, to_status, detail)
  values (t.task_id, t.user_id, 'created', t.status,
          jsonb_strip_nulls(jsonb_build_object(
            'task_type', t.task_type, 'polled', t.poll_url is not null,
            'submitted', case when t.submit_url is not null then false end)));
  perform taskman_private.notify_task(t);
end
$$;

revoke all on function taskman_private.new_task, taskman_private.add_task_rows
  from public, anon, authenticated;

-- The trigger path: the rules, then the headers into the in-flight table until the
-- row is in (as before).
create or replace function taskman_private.tasks_prepare_insert()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  new := taskman_private.new_task(new);
  if num_nonnulls(new.poll_headers, new.submit_headers, new.callback_headers) > 0 then
    -- Of two rows with one task_id in a statement, only the first can be inserted.
    insert into taskman_private.poll_headers_in_flight
      (task_id, poll_headers, submit_headers, callback_headers)
    values (new.task_id, new.poll_headers, new.submit_headers, new.callback_headers)
    on conflict (xact_id, task_id) do nothing;
    perform set_config('taskman.headers_in_flight', 'on', true);
    new.poll_headers := null;
    new.submit_headers := null;
    new.callback_headers := null;
  end if;
  return new;
end
$$;

create or replace function taskman_private.tasks_after_insert()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  f taskman_private.poll_headers_in_flight;
begin
  if current_setting('taskman.headers_in_flight', true) = 'on' then
    delete from taskman_private.poll_headers_in_flight x
    where x.xact_id = pg_current_xact_id() and x.task_id = new.task_id
    returning x.* into f;
  end if;
  perform taskman_private.add_task_rows(new, f.poll_headers, f.submit_headers,
                                        f.callback_headers, null);
  if new.submit_url is not null and taskman_private.submit_needs_callback_url(new.task_id) then
    perform taskman_private.issue_callback_token(new.task_id);
  end if;
  return null;
end
$$;

-- The four insert triggers, skipped while create_task inserts. A client's own INSERT
-- with the setting on is refused by its policy below (no client can set it through
-- PostgREST; this holds for a direct connection too).
drop trigger tasks_prepare_insert on taskman.tasks;
create trigger tasks_prepare_insert before insert on taskman.tasks
  for each row when (current_setting('taskman.task_creator', true) is distinct from 'on')
  execute function taskman_private.tasks_prepare_insert();

drop trigger tasks_after_insert on taskman.tasks;
create trigger tasks_after_insert after insert on taskman.tasks
  for each row when (current_setting('taskman.task_creator', true) is distinct from 'on')
  execute function taskman_private.tasks_after_insert();

drop trigger tasks_insert_began on taskman.tasks;
create trigger tasks_insert_began before insert on taskman.tasks
  for each statement when (current_setting('taskman.task_creator', true) is distinct from 'on')
  execute function taskman_private.tasks_insert_began();

drop trigger tasks_insert_ended on taskman.tasks;
create trigger tasks_insert_ended after insert on taskman.tasks
  for each statement when (current_setting('taskman.task_creator', true) is distinct from 'on')
  execute function taskman_private.tasks_insert_ended();

alter policy "Users create tasks they own" on taskman.tasks
  with check (user_id = (select auth.uid())
              and current_setting('taskman.task_creator', true) is distinct from 'on');

-- Every schedule row comes with its host now (add_task_rows is its one writer), so
-- the trigger that looked it up from the task has nothing left to do.
drop trigger task_schedule_set_host on taskman_private.task_schedule;
drop function taskman_private.task_schedule_set_host();

-- create_task as in 20261202000400_create_without_savepoint.sql (same arguments, rules,
-- errors and answers), writing the task and its rows itself.
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

-- The cascades of the two foreign keys, once per statement (and of retention_deferred's,
-- which 20261202000900_retention_passes_no_held_task.sql drops).
alter table taskman_private.task_schedule drop constraint task_schedule_task_id_fkey;
alter table taskman_private.task_private drop constraint task_private_task_id_fkey;

create function taskman_private.tasks_delete_rows()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  -- The schedule rows first: a poll being recorded holds its task's schedule row, so
  -- this waits for it, and the next statement sees the private row it wrote.
  delete from taskman_private.task_schedule s where s.task_id in (select g.task_id from gone g);
  delete from taskman_private.task_private p where p.task_id in (select g.task_id from gone g);
  delete from taskman_private.retention_deferred d
  where d.task_id in (select g.task_id from gone g);
  return null;
end
$$;

revoke all on function taskman_private.tasks_delete_rows from public, anon, authenticated;

create trigger tasks_delete_rows after delete on taskman.tasks
  referencing old table as gone
  for each statement execute function taskman_private.tasks_delete_rows();
