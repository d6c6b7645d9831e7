-- Security fixes: a task without an owner belongs to the service
-- alone; poll headers reach the private table only for rows really inserted;
-- a callback token reports and learns nothing more than task_id and status,
-- and a retry replaces it; calls that change nothing leave no history; the
-- API roles hold no rights on sequences or private functions; task ids are
-- Taskman's to assign; and a role claim the session's role contradicts is not
-- believed.
--
-- Ownership is checked as `coalesce(user_id = auth.uid(), false)`: a null on
-- either side (a service-made task, a caller without a user id) never matches.
-- The RLS policies of the access migration compare `user_id = auth.uid()` as
-- well, and need no change: a policy whose expression is null hides the row
-- (USING) or refuses it (WITH CHECK).

-- The role the session acts as: PostgREST's per-request SET ROLE, else the login
-- role. current_user cannot tell: inside a SECURITY DEFINER function it is the
-- function's owner.
create function taskman_private.session_role()
returns text
language sql stable
set search_path = ''
as $$
  select coalesce(nullif(current_setting('role'), 'none'), session_user::text)
$$;

-- True for the service: a session acting as service_role, or as a trusted login
-- (a member of service_role, a superuser or a BYPASSRLS role, never
-- authenticator), whose claims, if any, say service_role too. A service_role
-- claim in a session acting as anon or authenticated is not believed.
create or replace function taskman_private.caller_is_service()
returns boolean
language sql stable
set search_path = ''
as $$
  select coalesce(auth.role(), 'service_role') = 'service_role'
     and (r.name = 'service_role'
          or (r.name <> 'authenticator'
              and (pg_catalog.pg_has_role(r.name, 'service_role', 'member')
                   or exists (select 1 from pg_catalog.pg_roles x
                              where x.rolname = r.name and (x.rolsuper or x.rolbypassrls)))))
  from (select taskman_private.session_role() as name) r
$$;

-- The task row if the caller may act on it (owner or service), else PT404.
create or replace function taskman_private.visible_task(p_task_id uuid, lock_row boolean)
returns taskman.tasks
language plpgsql volatile
set search_path = ''
as $$
declare
  t taskman.tasks;
begin
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

-- A new callback token for the task, replacing any earlier one: returns the
-- plain text (244 random bits); only its hash is kept.
create function taskman_private.issue_callback_token(task_id uuid)
returns text
language plpgsql volatile
set search_path = ''
as $$
declare
  token text := replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '');
begin
  insert into taskman_private.task_private (task_id, callback_token_hash)
  values (issue_callback_token.task_id, sha256(convert_to(token, 'UTF8')))
  on conflict on constraint task_private_pkey do update
  set callback_token_hash = excluded.callback_token_hash, updated_at = now();
  return token;
end
$$;

-- As before, but only the service may create a task without an owner: a caller
-- with no user id (anon, or a token without `sub`) is refused.
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
  metadata jsonb default null
)
returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  owner uuid := auth.uid();
  t taskman.tasks;
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

  begin
    insert into taskman.tasks (user_id, poll_url, poll_method, task_type, external_id, poll_headers,
                              poll_body, poll_config, poll_interval_seconds, max_attempts,
                              timeout_minutes, callback_url, idempotency_key, metadata)
    values (owner, create_task.poll_url, create_task.poll_method, create_task.task_type,
            create_task.external_id, create_task.poll_headers, create_task.poll_body,
            create_task.poll_config, create_task.poll_interval_seconds, create_task.max_attempts,
            create_task.timeout_minutes, create_task.callback_url, create_task.idempotency_key,
            create_task.metadata)
    returning * into t;
  exception when unique_violation then
    -- A concurrent call with the same idempotency key won the race.
    select * into strict t from taskman.tasks x
    where coalesce(x.user_id, '00000000-0000-0000-0000-000000000000'::uuid)
            = coalesce(owner, '00000000-0000-0000-0000-000000000000'::uuid)
      and x.idempotency_key = create_task.idempotency_key;
    return taskman.task_json(t) || '{"idempotent_replay": true}';
  end;

  return taskman.task_json(t)
    || jsonb_build_object('callback_token', taskman_private.issue_callback_token(t.task_id));
end
$$;

-- For service_role, or for anyone holding the task's callback token (a remote
-- reporting back). The service gets the task's JSON; a token holder gets only
-- {task_id, status}, what POST /callbacks answers, and never the owner's data.
-- A call that would change nothing the owner sees (the same progress again, the
-- task's current terminal status again) writes nothing and records no event,
-- so repeated callbacks neither fail nor grow the history. A token holder's
-- error_message is remote text: it is kept service-only and users get the
-- neutral sentence.
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
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  t taskman.tasks;
  token_hash bytea;
  by_service boolean := taskman_private.caller_is_service();
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

  if (coalesce(update_task.status, t.status), coalesce(update_task.result, t.result),
         coalesce(update_task.progress, t.progress),
         coalesce(update_task.progress_message, t.progress_message))
        is distinct from (t.status, t.result, t.progress, t.progress_message) then
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

    insert into taskman.task_events (task_id, user_id, event_type, to_status, detail)
    values (t.task_id, t.user_id, 'callback_received', t.status,
            jsonb_build_object('via', case when by_service then 'service' else 'callback_token' end));
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

-- A fresh run of a failed or cancelled task. It also gets a new callback token,
-- returned once as `callback_token`: the old one no longer opens the task.
create or replace function taskman.retry_task(task_id uuid)
returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  t taskman.tasks := taskman_private.visible_task(retry_task.task_id, true);
begin
  if t.status not in ('failed', 'cancelled') then
    raise exception using errcode = 'PT409',
      message = format('task %s is %s; only failed or cancelled tasks can be retried', t.task_id, t.status);
  end if;
  perform set_config('taskman.retry_task', t.task_id::text, true);
  update taskman.tasks x set status = 'pending' where x.task_id = t.task_id returning * into t;
  perform set_config('taskman.retry_task', '', true);
  return taskman.task_json(t)
    || jsonb_build_object('callback_token', taskman_private.issue_callback_token(t.task_id));
end
$$;

-- Poll headers on their way to task_private. The BEFORE INSERT trigger cannot
-- write them there: it also runs for rows that ON CONFLICT DO NOTHING then
-- skips, which would plant one caller's headers on another's task. It parks
-- them here, keyed by transaction and task; the AFTER INSERT row trigger, which
-- fires only for rows really inserted, moves them to task_private; and when the
-- outermost INSERT statement ends, whatever is left (skipped rows) is deleted.
-- Only Taskman's triggers touch the table, and nothing is left in it at commit.
create unlogged table taskman_private.poll_headers_in_flight (
  xact_id xid8 not null default pg_current_xact_id(),
  task_id uuid not null,
  poll_headers jsonb not null,
  primary key (xact_id, task_id)
);
alter table taskman_private.poll_headers_in_flight enable row level security;

-- Now that nothing writes task_private before its task exists, its foreign key
-- is checked at once.
alter table taskman_private.task_private
  alter constraint task_private_task_id_fkey not deferrable;

-- task_id is Taskman's to assign: the trigger draws it, and only the service may
-- supply one. A user-supplied id would tell, by its conflict, whether someone
-- else's task has it, and would let ON CONFLICT reach rows that are not theirs
-- (ON CONFLICT DO UPDATE ... WHERE even evaluates its condition on the other
-- row before RLS refuses it). A user's insert can now conflict only on its own
-- idempotency keys, and is refused alike whether or not the id exists.
alter table taskman.tasks alter column task_id drop default;

-- BEFORE INSERT: fill defaults (also for explicit nulls), refuse values only
-- Taskman may set, validate, and take poll_headers out of the row.
create or replace function taskman_private.tasks_prepare_insert()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  if new.task_id is not null and not taskman_private.caller_is_service() then
    perform taskman_private.reject('task_id', 'is assigned by Taskman: leave it out');
  end if;
  if new.status is not null and new.status <> 'pending' then
    perform taskman_private.reject('status', 'must be pending (or omitted) when a task is created');
  end if;
  if num_nonnulls(new.result, new.error_code, new.error_message, new.progress, new.progress_message,
                  new.attempt_count, new.error_count, new.deadline_at, new.next_poll_at,
                  new.last_polled_at, new.created_at, new.updated_at, new.started_at,
                  new.completed_at, new.lease_owner, new.lease_expires_at) > 0 then
    perform taskman_private.reject('task',
      'fields result, error_code, error_message, progress, progress_message, counters, timestamps '
      'and leases are managed by Taskman and cannot be set when a task is created');
  end if;

  new.task_id := coalesce(new.task_id, gen_random_uuid());
  new.status := 'pending';
  new.task_type := coalesce(new.task_type, 'generic');
  new.poll_method := upper(coalesce(new.poll_method, 'GET'));
  new.poll_config := coalesce(new.poll_config, '{}');
  new.poll_interval_seconds := coalesce(new.poll_interval_seconds, 30);
  new.max_attempts := coalesce(new.max_attempts, 10);
  new.timeout_minutes := coalesce(new.timeout_minutes, 120);
  new.metadata := coalesce(new.metadata, '{}');
  new.attempt_count := 0;
  new.error_count := 0;

  perform taskman_private.validate_task(new, null::taskman.tasks, true);

  new.created_at := now();
  new.updated_at := now();
  new.deadline_at := now() + make_interval(mins => new.timeout_minutes);
  -- A task without poll_url waits for a callback; the deadline still applies.
  new.next_poll_at := case when new.poll_url is not null then now() end;

  if new.poll_headers is not null then
    perform taskman_private.validate_poll_headers(new.poll_headers);
    -- Of two rows with one task_id in a statement, only the first can be inserted.
    insert into taskman_private.poll_headers_in_flight (task_id, poll_headers)
    values (new.task_id, new.poll_headers)
    on conflict (xact_id, task_id) do nothing;
    new.poll_headers := null;
  end if;
  return new;
end
$$;

-- AFTER INSERT, for each row really inserted: its poll headers go to
-- task_private, then the `created` event and the NOTIFY.
create or replace function taskman_private.tasks_after_insert()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  headers jsonb;
begin
  delete from taskman_private.poll_headers_in_flight f
  where f.xact_id = pg_current_xact_id() and f.task_id = new.task_id
  returning f.poll_headers into headers;
  if headers is not null then
    insert into taskman_private.task_private (task_id, poll_headers)
    values (new.task_id, headers)
    on conflict (task_id) do update set poll_headers = excluded.poll_headers, updated_at = now();
  end if;

  insert into taskman.task_events (task_id, user_id, event_type, to_status, detail)
  values (new.task_id, new.user_id, 'created', new.status,
          jsonb_build_object('task_type', new.task_type, 'polled', new.poll_url is not null));
  perform taskman_private.notify_task(new);
  return null;
end
$$;

-- How many INSERT statements on tasks are running in this transaction, nested
-- ones included (an INSERT whose SELECT calls create_task). Only when the
-- outermost one ends have all row triggers fired, so only then is what is left
-- in poll_headers_in_flight known to belong to skipped rows. The count is a
-- transaction-local setting, undone with a failed subtransaction; a session
-- that sets it itself can only keep its own skipped headers, which nothing reads.
create function taskman_private.tasks_insert_depth()
returns integer
language sql stable
set search_path = ''
as $$
  select greatest(coalesce(
    nullif(current_setting('taskman.tasks_insert_depth', true), '')::integer, 0), 0)
$$;

create function taskman_private.tasks_insert_began()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  perform set_config('taskman.tasks_insert_depth',
                     (taskman_private.tasks_insert_depth() + 1)::text, true);
  return null;
end
$$;

create function taskman_private.tasks_insert_ended()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  depth integer := greatest(taskman_private.tasks_insert_depth() - 1, 0);
begin
  perform set_config('taskman.tasks_insert_depth', depth::text, true);
  if depth = 0 then
    delete from taskman_private.poll_headers_in_flight f where f.xact_id = pg_current_xact_id();
  end if;
  return null;
end
$$;

create trigger tasks_insert_began before insert on taskman.tasks
  for each statement execute function taskman_private.tasks_insert_began();
create trigger tasks_insert_ended after insert on taskman.tasks
  for each statement execute function taskman_private.tasks_insert_ended();

-- Privileges. Functions created in taskman_private since the access migration
-- kept PostgreSQL's default EXECUTE for PUBLIC; the schema itself was closed to
-- the API roles, now the functions are too. (The API roles' rights on the history's
-- sequence were revoked with the move to schema taskman: setval could have stopped
-- every task write. Identity columns draw their values without any right on it.)
--
-- Default privileges: PostgreSQL grants PUBLIC nothing on new tables and
-- sequences, and neither schema holds default grants of its own, so new objects
-- there start closed. The EXECUTE that PUBLIC gets on every new function is a
-- global default, which ALTER DEFAULT PRIVILEGES ... IN SCHEMA cannot revoke (and
-- changing the global default would change the project's own functions): each
-- migration revokes its functions, and tests check all of Taskman's schemas.
revoke all on all sequences in schema taskman_private from public, anon, authenticated;
revoke all on all tables in schema taskman_private from public, anon, authenticated;
revoke all on all functions in schema taskman_private from public, anon, authenticated;
revoke all on schema taskman_private from anon, authenticated;
