-- create_task as before (same arguments, rules, errors and answers) without a
-- subtransaction: the insert of a new task ran in a BEGIN ... EXCEPTION block, so that a
-- concurrent call with the same idempotency key that won the race could be answered.
-- Every call paid for the subtransaction (about 16 µs of server time of ~220, measured
-- in a loop of 2,000 calls), with or without a key. The insert now skips a row whose key
-- is taken (ON CONFLICT DO NOTHING on tasks_idempotency_key_idx, which waits for the
-- other call to commit or roll back), and the task that won is the answer, as before.
-- A skipped row's headers do not stay in poll_headers_in_flight: the statement's end
-- removes what belongs to rows that were not inserted (tasks_insert_ended).

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
  token text;
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

  -- A concurrent call with the same idempotency key may win the race: its task is
  -- the answer (DO NOTHING waits for it to commit).
  insert into taskman.tasks (user_id, poll_url, poll_method, task_type, external_id, poll_headers,
                            poll_body, poll_config, poll_interval_seconds, max_attempts,
                            timeout_minutes, callback_url, idempotency_key, metadata,
                            submit_url, submit_method, submit_headers, submit_body,
                            callback_headers, start_at, priority, heartbeat_seconds)
  values (owner, create_task.poll_url, create_task.poll_method, create_task.task_type,
          create_task.external_id, create_task.poll_headers, create_task.poll_body,
          create_task.poll_config, create_task.poll_interval_seconds, create_task.max_attempts,
          create_task.timeout_minutes, create_task.callback_url, create_task.idempotency_key,
          create_task.metadata, create_task.submit_url, create_task.submit_method,
          create_task.submit_headers, create_task.submit_body, create_task.callback_headers,
          create_task.start_at, create_task.priority, create_task.heartbeat_seconds)
  on conflict (coalesce(user_id, '00000000-0000-0000-0000-000000000000'::uuid), idempotency_key)
    where idempotency_key is not null do nothing
  returning * into t;
  if not found then
    select * into strict t from taskman.tasks x
    where coalesce(x.user_id, '00000000-0000-0000-0000-000000000000'::uuid)
            = coalesce(owner, '00000000-0000-0000-0000-000000000000'::uuid)
      and x.idempotency_key = create_task.idempotency_key;
    return taskman.task_json(t) || '{"idempotent_replay": true}';
  end if;

  if t.submit_url is null then
    token := replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '');
    insert into taskman_private.task_private (task_id, callback_token_hash)
    values (t.task_id, sha256(convert_to(token, 'UTF8')))
    on conflict (task_id) do update
    set callback_token_hash = excluded.callback_token_hash, submit_callback_token = null,
        updated_at = now();
  else
    token := taskman_private.issue_callback_token(t.task_id);
  end if;
  -- A new task's poll figures are its row's (the schedule row was made from it), so
  -- this is task_json(t) without the schedule read.
  return (to_jsonb(t) - '{poll_headers,submit_headers,callback_headers}'::text[])
    || jsonb_build_object('callback_token', token);
end
$$;
