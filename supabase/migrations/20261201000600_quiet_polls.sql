-- Quiet polls: a claim or a poll that changes nothing a user sees writes no row
-- version of taskman.tasks (which is in the supabase_realtime publication, so every
-- row version reaches subscribers). Lease and schedule state move to a narrow,
-- service-only table, taskman_private.task_schedule, one row a task:
--   next_poll_at (null: nothing to poll: finished, or waiting for a callback),
--   lease_owner and lease_expires_at, attempt_count (every poll made),
--   error_count (consecutive failed polls), last_polled_at, and the last poll's
--   HTTP status and latency.
-- A visible change (status, progress, progress message, result, error) writes the
-- public row once, and brings its copies of attempt_count, error_count,
-- next_poll_at and last_polled_at up to date; between visible changes those
-- columns of taskman.tasks are as of the last one. taskman.task_json (every task
-- the RPCs, the edge, the dashboard and callbacks return) and get_task_status read
-- the live figures from the schedule. The lease columns leave taskman.tasks.
--
-- History: a poll records a `polled` event only when it changed something or failed;
-- polls with no news only move the schedule's counters. Progress changes now also
-- send NOTIFY (the worker's wake-up and the edge's /events), like inserts and status
-- changes.

create table taskman_private.task_schedule (
  task_id uuid primary key references taskman.tasks (task_id) on delete cascade,
  next_poll_at timestamptz,
  lease_owner text,
  lease_expires_at timestamptz,
  attempt_count integer not null default 0,
  error_count integer not null default 0,
  last_polled_at timestamptz,
  last_http_status integer,
  last_latency_ms real
);

comment on table taskman_private.task_schedule is
  'The worker''s side of each task: when it is due, who holds its lease, poll counters. '
  'Written by every claim and poll; taskman.tasks only on visible changes.';

-- The claim path: only tasks with something to poll, in due order. A claimed task's
-- next_poll_at is pushed to its lease expiry, so a crashed worker's tasks fall due
-- again when the lease ends.
create index task_schedule_due_idx on taskman_private.task_schedule (next_poll_at)
  where next_poll_at is not null;

alter table taskman_private.task_schedule enable row level security;
revoke all on taskman_private.task_schedule from public, anon, authenticated;
grant select, insert, update, delete on taskman_private.task_schedule to service_role;

insert into taskman_private.task_schedule
  (task_id, next_poll_at, lease_owner, lease_expires_at, attempt_count, error_count,
   last_polled_at, last_http_status)
select t.task_id,
       case when t.status in ('pending', 'in_progress') and t.poll_url is not null
            then coalesce(t.next_poll_at, now()) end,
       t.lease_owner, t.lease_expires_at, t.attempt_count, t.error_count, t.last_polled_at,
       p.last_http_status
from taskman.tasks t
left join taskman_private.task_private p on p.task_id = t.task_id;

drop index taskman.tasks_due_idx;
alter table taskman.tasks drop column lease_owner, drop column lease_expires_at;

-- BEFORE INSERT: as before, without the lease columns.
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
                  new.completed_at) > 0 then
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

-- AFTER INSERT, for each row really inserted: its poll headers go to task_private,
-- its schedule row is made, then the `created` event and the NOTIFY.
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
  insert into taskman_private.task_schedule (task_id, next_poll_at)
  values (new.task_id, new.next_poll_at);

  insert into taskman.task_events (task_id, user_id, event_type, to_status, detail)
  values (new.task_id, new.user_id, 'created', new.status,
          jsonb_build_object('task_type', new.task_type, 'polled', new.poll_url is not null));
  perform taskman_private.notify_task(new);
  return null;
end
$$;

-- BEFORE UPDATE: as before, without the lease columns (the schedule follows a status
-- change in tasks_after_status_change).
create or replace function taskman_private.tasks_prepare_update()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  legal boolean;
begin
  if new.task_id <> old.task_id or new.created_at <> old.created_at then
    perform taskman_private.reject('task', 'task_id and created_at cannot change');
  end if;
  if new.poll_headers is not null then
    perform taskman_private.validate_poll_headers(new.poll_headers);
    insert into taskman_private.task_private (task_id, poll_headers)
    values (new.task_id, new.poll_headers)
    on conflict (task_id) do update set poll_headers = excluded.poll_headers, updated_at = now();
    new.poll_headers := null;
  end if;
  new.poll_method := upper(new.poll_method);
  -- The worker's own writes touch no caller-supplied column but these: skip the checks.
  if (new.poll_url, new.callback_url, new.poll_method, new.task_type, new.external_id,
      new.idempotency_key, new.poll_interval_seconds, new.max_attempts, new.timeout_minutes,
      new.poll_config, new.poll_body, new.metadata, new.progress, new.progress_message,
      new.error_message, new.result)
     is distinct from
     (old.poll_url, old.callback_url, old.poll_method, old.task_type, old.external_id,
      old.idempotency_key, old.poll_interval_seconds, old.max_attempts, old.timeout_minutes,
      old.poll_config, old.poll_body, old.metadata, old.progress, old.progress_message,
      old.error_message, old.result) then
    perform taskman_private.validate_task(new, old, false);
  end if;

  if new.status is distinct from old.status then
    legal := case old.status
      when 'pending' then new.status in ('in_progress', 'completed', 'failed', 'cancelled')
      when 'in_progress' then new.status in ('completed', 'failed', 'cancelled')
      else new.status = 'pending'
           and coalesce(current_setting('taskman.retry_task', true), '') = old.task_id::text
    end;
    if not coalesce(legal, false) then
      raise exception using errcode = 'PT409',
        message = format('task %s cannot move from %s to %s', old.task_id, old.status, new.status),
        hint = case when old.status in ('completed', 'failed', 'cancelled')
                    then 'Terminal tasks change only through retry_task.'
                    else 'A task moves pending -> in_progress -> completed, failed or cancelled.' end;
    end if;

    case new.status
      when 'in_progress' then
        new.started_at := coalesce(new.started_at, now());
      when 'pending' then  -- retry_task: a fresh run with the same definition
        new.error_count := 0;
        new.error_code := null;
        new.error_message := null;
        new.result := null;
        new.progress := null;
        new.progress_message := null;
        new.started_at := null;
        new.completed_at := null;
        new.deadline_at := now() + make_interval(mins => new.timeout_minutes);
        new.next_poll_at := case when new.poll_url is not null then now() end;
      else  -- completed, failed, cancelled
        new.completed_at := now();
        new.next_poll_at := null;
        if new.status = 'completed' then
          new.progress := 100;
          new.error_code := null;
          new.error_message := null;
        elsif new.status = 'failed' then
          new.error_code := coalesce(new.error_code, 'remote_failed');
          new.error_message := coalesce(new.error_message, taskman_private.neutral_error(new.error_code));
        end if;
    end case;
  end if;

  new.updated_at := now();
  return new;
end
$$;

-- AFTER a status change: the event, the NOTIFY, and the schedule: a finished task
-- has nothing to poll and no lease; a retried one is due at once with a fresh error
-- budget. (record_poll_results has already done this for its own changes, and the
-- update is skipped then.)
create or replace function taskman_private.tasks_after_status_change()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  insert into taskman.task_events (task_id, user_id, event_type, from_status, to_status, detail)
  values (new.task_id, new.user_id,
          case when new.status = 'cancelled' then 'cancelled'
               when new.status = 'pending' then 'retried'
               else 'status_changed' end,
          old.status, new.status,
          jsonb_strip_nulls(jsonb_build_object('error_code', new.error_code)));
  if new.status = 'pending' then
    update taskman_private.task_schedule s
    set next_poll_at = new.next_poll_at, lease_owner = null, lease_expires_at = null,
        error_count = 0
    where s.task_id = new.task_id;
  elsif new.status in ('completed', 'failed', 'cancelled') then
    update taskman_private.task_schedule s
    set next_poll_at = null, lease_owner = null, lease_expires_at = null
    where s.task_id = new.task_id
      and (s.next_poll_at is not null or s.lease_owner is not null);
  end if;
  perform taskman_private.notify_task(new);
  return null;
end
$$;

-- Progress is a visible change too: NOTIFY it (Realtime carries the row already).
create function taskman_private.tasks_after_progress_change()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  perform taskman_private.notify_task(new);
  return null;
end
$$;

create trigger tasks_after_progress_change after update of progress, progress_message
  on taskman.tasks
  for each row when (old.status is not distinct from new.status
                     and (old.progress, old.progress_message)
                         is distinct from (new.progress, new.progress_message))
  execute function taskman_private.tasks_after_progress_change();

-- The live poll figures of a task, for whoever may see the task (owner or service):
-- task_json runs as its caller, who cannot read the schedule itself.
create function taskman_private.poll_state(p_task_id uuid)
returns jsonb
language sql stable security definer
set search_path = ''
as $$
  select jsonb_build_object('attempt_count', s.attempt_count, 'error_count', s.error_count,
                            'next_poll_at', s.next_poll_at, 'last_polled_at', s.last_polled_at)
  from taskman_private.task_schedule s
  join taskman.tasks t on t.task_id = s.task_id
  where s.task_id = p_task_id
    and (taskman_private.caller_is_service() or coalesce(t.user_id = auth.uid(), false))
$$;

-- The task as its owner sees it: the row without the write-only column, with the
-- live poll figures (attempt_count, error_count, next_poll_at, last_polled_at).
create or replace function taskman.task_json(t taskman.tasks)
returns jsonb
language sql stable security invoker
set search_path = ''
as $$
  select (to_jsonb(t) - 'poll_headers') || coalesce(taskman_private.poll_state(t.task_id), '{}')
$$;

-- As before, plus attempt_count and last_polled_at (how many polls, and when the last).
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

-- Claims write the schedule only: the public row is not touched.
create or replace function taskman.claim_due_tasks(worker_id text, batch_size integer default 100,
                                                  lease_seconds integer default 60)
returns table (
  task_id uuid, poll_url text, poll_method text, poll_headers jsonb, poll_body jsonb,
  profile jsonb, task_type text, status text, attempt_count integer, error_count integer,
  max_attempts integer, poll_interval_seconds integer, deadline_at timestamptz,
  lease_expires_at timestamptz)
language plpgsql volatile security definer
set search_path = ''
as $$
begin
  perform taskman_private.check_claim(worker_id, batch_size, lease_seconds);

  return query
  with due as (
    -- Walks task_schedule_due_idx in due order; SKIP LOCKED lets concurrent workers
    -- take disjoint batches without waiting on each other. A finished task has no
    -- next_poll_at (tasks_after_status_change), so only live tasks are found.
    select s.task_id
    from taskman_private.task_schedule s
    where s.next_poll_at <= now()
    order by s.next_poll_at
    limit claim_due_tasks.batch_size
    for update skip locked
  ),
  claimed as (
    update taskman_private.task_schedule s
    set lease_owner = claim_due_tasks.worker_id,
        lease_expires_at = now() + make_interval(secs => claim_due_tasks.lease_seconds),
        next_poll_at = now() + make_interval(secs => claim_due_tasks.lease_seconds)
    from due
    where s.task_id = due.task_id
    returning s.task_id, s.attempt_count, s.error_count, s.lease_expires_at
  )
  select c.task_id, t.poll_url, t.poll_method, coalesce(p.poll_headers, '{}'::jsonb), t.poll_body,
         taskman_private.effective_profile(t.task_type, t.poll_config), t.task_type, t.status,
         c.attempt_count, c.error_count, t.max_attempts, t.poll_interval_seconds, t.deadline_at,
         c.lease_expires_at
  from claimed c
  join taskman.tasks t on t.task_id = c.task_id
  left join taskman_private.task_private p on p.task_id = c.task_id
  order by c.task_id;
end
$$;

-- Writes a batch of poll outcomes (each element as before: task_id, worker_id, ok,
-- status, error_code, delay_seconds, result, progress, progress_message,
-- error_message, http_status, latency_ms, raw_response, raw_error, reason).
-- Every outcome moves the task's schedule (counters, next poll, lease). Only an
-- outcome that changes what the owner sees (status, progress, progress message,
-- result, error) writes taskman.tasks, once, and records a `polled` event; so does a
-- failed poll (an event, with its retry). A poll with no news writes the schedule
-- row and nothing else. The database decides the rest: max_attempts, the deadline,
-- the transitions.
create or replace function taskman.record_poll_results(results jsonb)
returns table (task_id uuid, status text)
language plpgsql volatile security definer
set search_path = ''
as $$
begin
  if jsonb_typeof(results) is distinct from 'array' then
    perform taskman_private.reject('results', 'must be a JSON array of poll outcomes');
  end if;
  if exists (select 1 from jsonb_to_recordset(results) as r(task_id uuid, worker_id text,
                                                          status text, error_code text)
             where r.task_id is null or r.worker_id is null
                or r.status not in ('in_progress', 'completed', 'failed')
                or r.error_code not in ('remote_failed', 'poll_error', 'invalid_response')) then
    perform taskman_private.reject('results',
      'each outcome needs task_id and worker_id; status must be in_progress, completed or failed; '
      'error_code must be remote_failed, poll_error or invalid_response');
  end if;

  -- Public rows about to change are locked first, in task_id order, as every other
  -- writer of a task does (the row, then its schedule): a concurrent cancel or sweep
  -- then waits for this batch or this batch for it, never both for each other.
  perform 1
  from jsonb_to_recordset(results) as r(task_id uuid, worker_id text, ok boolean, status text,
                                        result jsonb, progress integer, progress_message text)
  join taskman_private.task_schedule s on s.task_id = r.task_id
  join taskman.tasks t on t.task_id = r.task_id
  where s.lease_owner = r.worker_id
    and t.status in ('pending', 'in_progress')
    and (r.status is distinct from null and r.status <> t.status
         or r.result is not null and r.result is distinct from t.result
         or r.progress is not null and least(greatest(r.progress, 0), 100) is distinct from t.progress
         or r.progress_message is not null
            and left(r.progress_message, 1000) is distinct from t.progress_message
         or not coalesce(r.ok, false) and s.error_count + 1 >= t.max_attempts
         or t.deadline_at <= now())
  order by t.task_id
  for update of t;

  return query
  with outcome as (
    select r.task_id, r.worker_id, coalesce(r.ok, false) as ok, r.status, r.error_code,
           greatest(coalesce(r.delay_seconds, 0), 0) as delay_seconds, r.result,
           least(greatest(r.progress, 0), 100) as progress,
           left(r.progress_message, 1000) as progress_message,
           left(r.error_message, 2000) as error_message, r.http_status, r.latency_ms,
           left(r.raw_response, 65536) as raw_response, left(r.raw_error, 4000) as raw_error,
           left(r.reason, 60) as reason
    from jsonb_to_recordset(results) as r(
      task_id uuid, worker_id text, ok boolean, status text, error_code text,
      delay_seconds double precision, result jsonb, progress integer, progress_message text,
      error_message text, http_status integer, latency_ms double precision,
      raw_response text, raw_error text, reason text)
  ),
  decided as (
    -- FOR UPDATE of the schedule re-reads a row changed since the snapshot (a sweep,
    -- a cancel clears the lease), so only the lease holder's outcome counts.
    select o.*, t.user_id,
           case when o.ok then 0 else s.error_count + 1 end as new_error_count,
           s.attempt_count + 1 as new_attempt_count,
           case
             when o.status in ('completed', 'failed') then o.status
             when not o.ok and s.error_count + 1 >= t.max_attempts then 'failed'
             when t.deadline_at <= now() then 'failed'
             when o.status = 'in_progress' then 'in_progress'
             else t.status
           end as new_status,
           case
             when o.status = 'failed' then coalesce(o.error_code, 'remote_failed')
             when o.status = 'completed' then null
             when not o.ok and s.error_count + 1 >= t.max_attempts
               then case when o.error_code = 'invalid_response' then 'invalid_response'
                         else 'max_attempts' end
             when t.deadline_at <= now() then 'timeout'
           end as new_error_code,
           t.status as old_status,
           (o.result is not null and o.result is distinct from t.result
            or o.progress is not null and o.progress is distinct from t.progress
            or o.progress_message is not null and o.progress_message is distinct from t.progress_message)
             as news
    from outcome o
    join taskman_private.task_schedule s on s.task_id = o.task_id
    join taskman.tasks t on t.task_id = o.task_id
    where s.lease_owner = o.worker_id
      and t.status in ('pending', 'in_progress')
    for update of s
  ),
  marked as (
    select d.*, (d.news or d.new_status <> d.old_status) as visible,
           d.new_status in ('completed', 'failed') as finished
    from decided d
  ),
  scheduled as (
    update taskman_private.task_schedule s
    set attempt_count = m.new_attempt_count,
        error_count = m.new_error_count,
        last_polled_at = now(),
        last_http_status = m.http_status,
        last_latency_ms = m.latency_ms,
        lease_owner = null,
        lease_expires_at = null,
        next_poll_at = case when m.finished then null
                            else now() + make_interval(secs => m.delay_seconds) end
    from marked m
    where s.task_id = m.task_id
    returning s.task_id, s.next_poll_at
  ),
  written as (
    update taskman.tasks t
    set status = m.new_status,
        error_code = coalesce(m.new_error_code, t.error_code),
        error_message = case when m.status = 'failed' then m.error_message else t.error_message end,
        result = coalesce(m.result, t.result),
        progress = coalesce(m.progress, t.progress),
        progress_message = coalesce(m.progress_message, t.progress_message),
        attempt_count = m.new_attempt_count,
        error_count = m.new_error_count,
        last_polled_at = now(),
        next_poll_at = case when m.finished then null
                            else now() + make_interval(secs => m.delay_seconds) end
    from marked m
    where t.task_id = m.task_id and m.visible
    returning t.task_id
  ),
  events as (
    -- `news: progress` (with the status, in to_status) marks a poll whose news was
    -- progress alone: the edge's /events reads it back without LISTEN, as it reads
    -- status changes. A status change has its own event (tasks_after_status_change).
    insert into taskman.task_events (task_id, user_id, event_type, to_status, detail)
    select m.task_id, m.user_id, e.event_type,
           case when e.event_type = 'polled' and m.news and m.new_status = m.old_status
                then m.new_status end,
           jsonb_strip_nulls(jsonb_build_object(
             'news', case when e.event_type = 'polled' and m.news
                               and m.new_status = m.old_status then 'progress' end,
             'progress', case when e.event_type = 'polled' and m.news then m.progress end,
             'http_status', m.http_status, 'latency_ms', round(m.latency_ms::numeric, 1),
             'outcome', case when not m.ok then 'error' else coalesce(m.status, 'no_change') end,
             'reason', m.reason,
             'attempt', m.new_attempt_count,
             'error_count', m.new_error_count,
             'next_poll_at', case when e.event_type = 'retry_scheduled' then sc.next_poll_at end))
    from marked m
    join scheduled sc on sc.task_id = m.task_id
    cross join lateral (
      select 'polled' as event_type
      union all
      select 'retry_scheduled' where not m.ok and not m.finished
    ) e
    where m.visible or not m.ok
  ),
  raw as (
    -- The raw answer of a poll that said something (news, an error, the end), kept
    -- service-only; a poll with no news leaves the last one in place.
    insert into taskman_private.task_private as p
      (task_id, last_http_status, last_response, last_error, updated_at)
    select m.task_id, m.http_status, m.raw_response, m.raw_error, now()
    from marked m
    where m.visible or not m.ok
    on conflict on constraint task_private_pkey do update
    set last_http_status = excluded.last_http_status,
        last_response = excluded.last_response,
        last_error = excluded.last_error,
        updated_at = excluded.updated_at
  )
  select m.task_id, m.new_status from marked m;
end
$$;

-- Gives back a worker's leases (graceful shutdown): its tasks are due at once.
create or replace function taskman.release_tasks(worker_id text)
returns integer
language sql volatile security definer
set search_path = ''
as $$
  with released as (
    update taskman_private.task_schedule s
    set lease_owner = null, lease_expires_at = null, next_poll_at = now()
    where s.lease_owner = release_tasks.worker_id and s.next_poll_at is not null
    returning 1
  )
  select count(*)::integer from released
$$;

revoke all on function taskman_private.tasks_after_progress_change,
  taskman_private.poll_state from public, anon, authenticated;
grant execute on function taskman_private.poll_state to authenticated, service_role;
revoke all on function taskman.claim_due_tasks, taskman.record_poll_results,
  taskman.release_tasks from public, anon, authenticated;
grant execute on function taskman.claim_due_tasks, taskman.record_poll_results,
  taskman.release_tasks to service_role;
