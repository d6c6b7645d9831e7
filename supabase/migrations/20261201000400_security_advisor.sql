-- What Supabase's Security Advisor (its database linter) checks, made to hold in the
-- schema PostgREST exposes. A SECURITY DEFINER function there that anon or
-- authenticated may execute is flagged: it bypasses RLS for anyone with the
-- publishable key. The RPCs users call keep their names, arguments, results and
-- errors, but each is now a thin SECURITY INVOKER function in taskman over the
-- SECURITY DEFINER one, moved to taskman_private, which PostgREST does not expose.
-- They stay definers because they must read and write what the caller may not:
-- the callback-token hashes and secrets in taskman_private.task_private, the
-- idempotency lookup across the caller's tasks, and status changes that column
-- grants refuse to owners. The worker's functions stay definers in taskman: only
-- service_role may execute them.
--
-- Later migrations change these functions in taskman_private, not the wrappers.

alter function taskman.create_task(text, text, text, text, jsonb, jsonb, jsonb, integer, integer,
                                   integer, text, text, jsonb) set schema taskman_private;
alter function taskman.get_task_status(uuid) set schema taskman_private;
alter function taskman.update_task(uuid, text, jsonb, text, integer, text, text)
  set schema taskman_private;
alter function taskman.cancel_task(uuid) set schema taskman_private;
alter function taskman.retry_task(uuid) set schema taskman_private;
alter function taskman.callback_profile(uuid, text) set schema taskman_private;

create function taskman.create_task(
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
language sql volatile security invoker
set search_path = ''
as $$
  select taskman_private.create_task(poll_url, poll_method, task_type, external_id, poll_headers,
                                     poll_body, poll_config, poll_interval_seconds, max_attempts,
                                     timeout_minutes, callback_url, idempotency_key, metadata)
$$;

create function taskman.get_task_status(task_id uuid)
returns jsonb
language sql stable security invoker
set search_path = ''
as $$
  select taskman_private.get_task_status(task_id)
$$;

create function taskman.update_task(
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

create function taskman.cancel_task(task_id uuid)
returns jsonb
language sql volatile security invoker
set search_path = ''
as $$
  select taskman_private.cancel_task(task_id)
$$;

create function taskman.retry_task(task_id uuid)
returns jsonb
language sql volatile security invoker
set search_path = ''
as $$
  select taskman_private.retry_task(task_id)
$$;

create function taskman.callback_profile(task_id uuid, callback_token text)
returns jsonb
language sql stable security invoker
set search_path = ''
as $$
  select taskman_private.callback_profile(task_id, callback_token)
$$;

comment on function taskman.create_task is
  'Register a task; returns it with its callback_token (shown once). See README.';
comment on function taskman.update_task is
  'Report on a task: service_role, or the holder of its callback_token.';

-- The wrappers' callers now need the schema of what they wrap, and execute on
-- exactly those functions: every other function there stays the owner's.
grant usage on schema taskman_private to anon, authenticated;
revoke all on all functions in schema taskman_private from public, anon, authenticated;
revoke all on function taskman.create_task, taskman.get_task_status, taskman.update_task,
  taskman.cancel_task, taskman.retry_task, taskman.callback_profile from public;
grant execute on function taskman.create_task, taskman.get_task_status, taskman.cancel_task,
  taskman.retry_task, taskman_private.create_task, taskman_private.get_task_status,
  taskman_private.cancel_task, taskman_private.retry_task to authenticated, service_role;
grant execute on function taskman.update_task, taskman.callback_profile,
  taskman_private.update_task, taskman_private.callback_profile
  to anon, authenticated, service_role;

-- Every foreign key covered by an index (the Advisor's performance rule): deleting
-- a task would otherwise scan the whole outbox for its deliveries.
create index outbox_task_idx on taskman_private.outbox (task_id);
