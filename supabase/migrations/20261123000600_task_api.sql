-- The RPC API users call through PostgREST (POST /rest/v1/rpc/<name>).
-- Errors use SQLSTATEs PostgREST maps to HTTP statuses: PT404 (unknown task or
-- not yours: no existence leak), PT403 (bad callback token), PT409 (illegal
-- transition), 22023 (bad argument, message names the field).

-- True for service_role requests and for trusted direct connections (a login
-- role with service rights and no PostgREST claims). A request through
-- PostgREST always logs in as authenticator, so it is judged by its claims.
create function taskman_private.caller_is_service()
returns boolean
language sql stable
set search_path = ''
as $$
  select coalesce(auth.role() = 'service_role', false)
      or (auth.role() is null
          and session_user <> 'authenticator'
          and (pg_has_role(session_user, 'service_role', 'member')
               or exists (select 1 from pg_catalog.pg_roles r
                          where r.rolname = session_user and (r.rolsuper or r.rolbypassrls))))
$$;

-- The task row if the caller may act on it (owner or service), else PT404.
create function taskman_private.visible_task(p_task_id uuid, lock_row boolean)
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
  if not found or not (taskman_private.caller_is_service() or t.user_id = auth.uid()) then
    raise exception using errcode = 'PT404', message = format('task %s not found', p_task_id);
  end if;
  return t;
end
$$;

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
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  owner uuid := auth.uid();
  t taskman.tasks;
  token text;
begin
  if auth.role() = 'anon' then
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

  -- 244 random bits from the server's strong random source; only a hash is kept.
  token := replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '');
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

  insert into taskman_private.task_private (task_id, callback_token_hash)
  values (t.task_id, sha256(convert_to(token, 'UTF8')))
  on conflict (task_id) do update set callback_token_hash = excluded.callback_token_hash;

  return taskman.task_json(t) || jsonb_build_object('callback_token', token);
end
$$;

create function taskman.get_task_status(task_id uuid)
returns jsonb
language plpgsql stable security definer
set search_path = ''
as $$
declare
  t taskman.tasks := taskman_private.visible_task(get_task_status.task_id, false);
begin
  return jsonb_build_object(
    'task_id', t.task_id, 'status', t.status, 'progress', t.progress,
    'progress_message', t.progress_message, 'result', t.result, 'error_code', t.error_code,
    'error_message', t.error_message, 'created_at', t.created_at, 'updated_at', t.updated_at,
    'completed_at', t.completed_at);
end
$$;

-- For service_role, or for anyone holding the task's callback token (a remote
-- reporting back). Repeating the task's current terminal status is a no-op, so
-- a receiver's retried callback does not fail. A token holder's error_message
-- is remote text: it is kept service-only and users get the neutral sentence.
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
    if update_task.status = t.status then
      return taskman.task_json(t);
    end if;
    raise exception using errcode = 'PT409',
      message = format('task %s is already %s and cannot be updated', t.task_id, t.status),
      hint = 'Terminal tasks change only through retry_task.';
  end if;

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

  if not by_service and update_task.error_message is not null then
    insert into taskman_private.task_private as p (task_id, last_error)
    values (t.task_id, left(update_task.error_message, 4000))
    on conflict on constraint task_private_pkey
    do update set last_error = excluded.last_error, updated_at = now();
  end if;

  insert into taskman.task_events (task_id, user_id, event_type, to_status, detail)
  values (t.task_id, t.user_id, 'callback_received', t.status,
          jsonb_build_object('via', case when by_service then 'service' else 'callback_token' end));
  return taskman.task_json(t);
end
$$;

create function taskman.cancel_task(task_id uuid)
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

create function taskman.retry_task(task_id uuid)
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
  return taskman.task_json(t);
end
$$;

-- Figures over the tasks the caller may see (RLS applies: security invoker).
create function taskman.task_stats(since timestamptz default now() - interval '7 days')
returns jsonb
language sql stable security invoker
set search_path = ''
as $$
  with scoped as (
    select t.status, t.created_at, t.completed_at
    from taskman.tasks t
    where t.created_at >= task_stats.since
  ),
  by_status as (
    select coalesce(jsonb_object_agg(s.status, coalesce(c.n, 0)), '{}') as counts
    from unnest(array['pending', 'in_progress', 'completed', 'failed', 'cancelled']) as s(status)
    left join (select status, count(*) as n from scoped group by status) c using (status)
  ),
  daily as (
    select coalesce(jsonb_agg(jsonb_build_object('day', d.day, 'completed', d.completed,
                                                 'failed', d.failed) order by d.day), '[]') as days
    from (
      select date_trunc('day', completed_at at time zone 'UTC')::date as day,
             count(*) filter (where status = 'completed') as completed,
             count(*) filter (where status = 'failed') as failed
      from scoped
      where status in ('completed', 'failed')
      group by 1
    ) d
  ),
  durations as (
    select percentile_cont(0.5) within group (order by extract(epoch from completed_at - created_at)) as median,
           percentile_cont(0.95) within group (order by extract(epoch from completed_at - created_at)) as p95
    from scoped where status = 'completed'
  )
  select jsonb_build_object(
    'since', task_stats.since,
    'total', (select count(*) from scoped),
    'by_status', (select counts from by_status),
    'success_rate', (select round(count(*) filter (where status = 'completed')::numeric
                                  / nullif(count(*) filter (where status in ('completed', 'failed')), 0), 4)
                     from scoped),
    'daily', (select days from daily),
    'duration_seconds', (select jsonb_build_object('median', median, 'p95', p95) from durations))
$$;

revoke all on function taskman.create_task, taskman.get_task_status, taskman.update_task,
  taskman.cancel_task, taskman.retry_task, taskman.task_stats from public, anon, authenticated;
grant execute on function taskman.create_task, taskman.get_task_status, taskman.cancel_task,
  taskman.retry_task, taskman.task_stats to authenticated, service_role;
-- Third parties holding a callback token report back without an account.
grant execute on function taskman.update_task to anon, authenticated, service_role;
