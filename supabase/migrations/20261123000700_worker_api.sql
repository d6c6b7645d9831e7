-- Functions for the worker (service_role only). Any number of workers share one
-- database: claims take row locks with SKIP LOCKED and hand out a lease;
-- results are written back only by the lease holder, in one statement a batch.

-- The profile a task is read with: the named profile (poll_config.profile, else
-- the task_type's own profile, else generic) with poll_config's overrides.
create function taskman_private.effective_profile(task_type text, poll_config jsonb)
returns jsonb
language sql stable
set search_path = ''
as $$
  select (to_jsonb(p) - '{description,builtin}'::text[]) || (poll_config - 'profile')
  from taskman.response_profiles p
  where p.name in (poll_config ->> 'profile', task_type, 'generic')
  order by p.name = poll_config ->> 'profile' desc nulls last, p.name = task_type desc
  limit 1
$$;

-- The arguments every claim takes (tasks here, the outbox later), checked once.
create function taskman_private.check_claim(worker_id text, batch_size integer,
                                            lease_seconds integer)
returns void
language plpgsql immutable
set search_path = ''
as $$
begin
  if worker_id is null or length(worker_id) not between 1 and 200 then
    perform taskman_private.reject('worker_id', 'must be 1 to 200 characters');
  end if;
  if batch_size is null or batch_size not between 1 and 5000 then
    perform taskman_private.reject('batch_size', 'must be between 1 and 5000');
  end if;
  if lease_seconds is null or lease_seconds not between 1 and 3600 then
    perform taskman_private.reject('lease_seconds', 'must be between 1 and 3600');
  end if;
end
$$;

create function taskman.claim_due_tasks(worker_id text, batch_size integer default 100,
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
    -- Walks tasks_due_idx in due order; SKIP LOCKED lets concurrent workers take
    -- disjoint batches without waiting on each other.
    select t.task_id
    from taskman.tasks t
    where t.status in ('pending', 'in_progress')
      and t.poll_url is not null
      and t.next_poll_at <= now()
    order by t.next_poll_at
    limit claim_due_tasks.batch_size
    for update skip locked
  ),
  claimed as (
    update taskman.tasks t
    set lease_owner = claim_due_tasks.worker_id,
        lease_expires_at = now() + make_interval(secs => claim_due_tasks.lease_seconds),
        next_poll_at = now() + make_interval(secs => claim_due_tasks.lease_seconds)
    from due
    where t.task_id = due.task_id
    returning t.*
  )
  select c.task_id, c.poll_url, c.poll_method, coalesce(p.poll_headers, '{}'::jsonb), c.poll_body,
         taskman_private.effective_profile(c.task_type, c.poll_config), c.task_type, c.status,
         c.attempt_count, c.error_count, c.max_attempts, c.poll_interval_seconds, c.deadline_at,
         c.lease_expires_at
  from claimed c
  left join taskman_private.task_private p on p.task_id = c.task_id
  order by c.next_poll_at, c.task_id;
end
$$;

-- Writes a batch of poll outcomes. Each element of `results`:
--   task_id, worker_id       the claim being answered (ignored if the lease moved on)
--   ok                       true if the poll succeeded (resets error_count),
--                            false if it failed transiently (counts toward max_attempts)
--   status                   in_progress | completed | failed, or null for no change
--   error_code               with status failed: remote_failed | poll_error | invalid_response;
--                            with ok = false: invalid_response if the body was unreadable
--   delay_seconds            when to poll next if the task goes on
--   result, progress, progress_message, error_message (neutral), http_status, latency_ms
--   raw_response, raw_error  service-only, kept in taskman_private.task_private
-- The database decides the rest: max_attempts, the deadline, the transitions.
create function taskman.record_poll_results(results jsonb)
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

  return query
  with outcome as (
    select r.task_id, r.worker_id, coalesce(r.ok, false) as ok, r.status, r.error_code,
           greatest(coalesce(r.delay_seconds, 0), 0) as delay_seconds, r.result,
           least(greatest(r.progress, 0), 100) as progress,
           left(r.progress_message, 1000) as progress_message,
           left(r.error_message, 2000) as error_message, r.http_status, r.latency_ms,
           left(r.raw_response, 65536) as raw_response, left(r.raw_error, 4000) as raw_error
    from jsonb_to_recordset(results) as r(
      task_id uuid, worker_id text, ok boolean, status text, error_code text,
      delay_seconds double precision, result jsonb, progress integer, progress_message text,
      error_message text, http_status integer, latency_ms double precision,
      raw_response text, raw_error text)
  ),
  decided as (
    -- FOR UPDATE re-reads a row changed since the snapshot (a sweep, a cancel),
    -- so counts and transitions are decided on its latest version.
    select o.task_id,
           case when o.ok then 0 else t.error_count + 1 end as error_count,
           case
             when o.status in ('completed', 'failed') then o.status
             when not o.ok and t.error_count + 1 >= t.max_attempts then 'failed'
             when t.deadline_at <= now() then 'failed'
             when o.status = 'in_progress' then 'in_progress'
             else t.status
           end as status,
           case
             when o.status = 'failed' then coalesce(o.error_code, 'remote_failed')
             when o.status = 'completed' then null
             when not o.ok and t.error_count + 1 >= t.max_attempts
               then case when o.error_code = 'invalid_response' then 'invalid_response'
                         else 'max_attempts' end
             when t.deadline_at <= now() then 'timeout'
           end as error_code
    from outcome o
    join taskman.tasks t on t.task_id = o.task_id
    where t.lease_owner = o.worker_id
      and t.status in ('pending', 'in_progress')
    for update of t
  ),
  written as (
    update taskman.tasks t
    set status = d.status,
        error_code = coalesce(d.error_code, t.error_code),
        error_message = case when o.status = 'failed' then o.error_message else t.error_message end,
        result = coalesce(o.result, t.result),
        progress = coalesce(o.progress, t.progress),
        progress_message = coalesce(o.progress_message, t.progress_message),
        attempt_count = t.attempt_count + 1,
        error_count = d.error_count,
        last_polled_at = now(),
        lease_owner = null,
        lease_expires_at = null,
        next_poll_at = now() + make_interval(secs => o.delay_seconds)
    from decided d
    join outcome o on o.task_id = d.task_id
    where t.task_id = d.task_id
    returning t.task_id, t.user_id, t.status, t.error_count, t.next_poll_at
  ),
  events as (
    insert into taskman.task_events (task_id, user_id, event_type, detail)
    select w.task_id, w.user_id, e.event_type,
           jsonb_strip_nulls(jsonb_build_object(
             'http_status', o.http_status, 'latency_ms', round(o.latency_ms::numeric, 1),
             'outcome', case when not o.ok then 'error' else coalesce(o.status, 'no_change') end,
             'error_count', w.error_count,
             'next_poll_at', case when e.event_type = 'retry_scheduled' then w.next_poll_at end))
    from written w
    join outcome o on o.task_id = w.task_id
    cross join lateral (
      select 'polled' as event_type
      union all
      select 'retry_scheduled' where not o.ok and w.status in ('pending', 'in_progress')
    ) e
  ),
  raw as (
    insert into taskman_private.task_private as p
      (task_id, last_http_status, last_response, last_error, updated_at)
    select w.task_id, o.http_status, o.raw_response, o.raw_error, now()
    from written w
    join outcome o on o.task_id = w.task_id
    on conflict on constraint task_private_pkey do update
    set last_http_status = excluded.last_http_status,
        last_response = excluded.last_response,
        last_error = excluded.last_error,
        updated_at = excluded.updated_at
  )
  select w.task_id, w.status from written w;
end
$$;

-- Fails every live task past its deadline (error_code timeout), polled or not.
-- Rows locked by a concurrent writer are left for the next sweep.
create function taskman.expire_overdue_tasks()
returns integer
language sql volatile security definer
set search_path = ''
as $$
  with overdue as (
    select t.task_id from taskman.tasks t
    where t.status in ('pending', 'in_progress') and t.deadline_at <= now()
    for update skip locked
  ),
  expired as (
    update taskman.tasks t set status = 'failed', error_code = 'timeout', error_message = null
    from overdue where t.task_id = overdue.task_id
    returning 1
  )
  select count(*)::integer from expired
$$;

-- Gives back a worker's leases (graceful shutdown): its tasks are due at once.
create function taskman.release_tasks(worker_id text)
returns integer
language sql volatile security definer
set search_path = ''
as $$
  with released as (
    update taskman.tasks t
    set lease_owner = null, lease_expires_at = null, next_poll_at = now()
    where t.lease_owner = release_tasks.worker_id and t.status in ('pending', 'in_progress')
    returning 1
  )
  select count(*)::integer from released
$$;

revoke all on function taskman.claim_due_tasks, taskman.record_poll_results,
  taskman.expire_overdue_tasks, taskman.release_tasks from public, anon, authenticated;
grant execute on function taskman.claim_due_tasks, taskman.record_poll_results,
  taskman.expire_overdue_tasks, taskman.release_tasks to service_role;
