-- What the worker calls, as service_role: claim due tasks (FOR UPDATE SKIP LOCKED, so
-- workers take disjoint batches), record a batch of poll results in one statement,
-- sweep overdue and heartbeat-less tasks, release a stopping worker's leases. These
-- run on every cycle: they are written for the plan they get (see the comments).
--
-- The claim's and the record's lookups by key stay index scans whatever the statistics
-- say (enable_seqscan off in their settings, and in the outbox claims'). Their plans are
-- cached for the session (the claim's is generic by design), so they are made from the
-- statistics of the moment. Taken while the tables were empty or tiny (a new project,
-- right after an ANALYZE), those made a sequential scan the cheapest way to find a
-- claimed task's row and its private row, and the plan kept doing that once per task
-- while the tables grew, until the next autoanalyze: with 20,000 tasks arriving at once,
-- each claim of 100 read both tables 100 times (420 µs per claimed task instead of 40).
-- Every table these functions read has the index they need. The worker's two
-- statements, claim_admitted_tasks and record_polls, pass the setting on to the
-- functions they call.

-- Claims up to batch_size due tasks for worker_id, for lease_seconds, in turns of
-- owners: every owner's first task, then every owner's second, and so on; within an
-- owner, higher priority first, then the longest due. Within a turn, the owners after
-- a mark (the sequence claim_turn: the last owner the previous claim served) go first,
-- wrapping around, so successive claims rotate through the owners. It takes and locks
-- (SKIP LOCKED) a window of a batch and one of due tasks by priority then due time
-- (task_schedule_priority_due_idx); when that window is full and an owner has more
-- than one task in it, it also looks up owners, one probe each on
-- task_schedule_owner_due_idx, from the mark on (up to max(batch, 64) of them, each
-- with its longest due task, which it locks too). Of what it locked, the batch is the
-- first in turn order, returned in that order. Claims write the schedule only: the
-- public row is not touched.
create or replace function taskman.claim_due_tasks(worker_id text, batch_size integer default 100,
                                                  lease_seconds integer default 60)
returns table (
  task_id uuid, poll_url text, poll_method text, poll_headers jsonb, poll_body jsonb,
  profile jsonb, task_type text, status text, attempt_count integer, error_count integer,
  max_attempts integer, poll_interval_seconds integer, deadline_at timestamptz,
  lease_expires_at timestamptz, submit_url text, submit_method text, submit_headers jsonb,
  submit_body jsonb, callback_token text)
language plpgsql volatile security definer
set search_path = ''
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
as $$
declare
  -- How many owners a crowded window looks up.
  reach integer := greatest(batch_size, 64);
  mark_before bigint;
  turn_after uuid;
begin
  perform taskman_private.check_claim(worker_id, batch_size, lease_seconds);

  -- Owners whose first 64 bits are above the previous claim's mark take their turns first.
  select c.last_value, (lpad(pg_catalog.to_hex(c.last_value), 16, '0') || 'ffffffffffffffff')::uuid
  into mark_before, turn_after
  from taskman_private.claim_turn c;

  return query
  with recursive levels as (
    (select s.priority from taskman_private.task_schedule s
     where s.next_poll_at is not null
     order by s.priority desc limit 1)
    union all
    select (select s.priority from taskman_private.task_schedule s
            where s.next_poll_at is not null and s.priority < l.priority
            order by s.priority desc limit 1)
    from levels l
    where l.priority is not null
  ),
  longest_due as (
    -- The window: a batch and one of due tasks by priority then due time. SKIP
    -- LOCKED lets concurrent workers take disjoint batches without waiting on each
    -- other. A finished task has no next_poll_at, so only live tasks are found.
    select d.*
    from levels l
    cross join lateral (
      select s.task_id, s.owner, s.priority, s.next_poll_at
      from taskman_private.task_schedule s
      where s.priority = l.priority and s.next_poll_at <= now()
      order by s.next_poll_at
      limit claim_due_tasks.batch_size + 1
      for update skip locked
    ) d
    where l.priority is not null
    limit claim_due_tasks.batch_size + 1
  ),
  crowded as (
    -- A full window in which an owner has more than one task may hide other owners'
    -- due tasks behind it.
    select count(*) = claim_due_tasks.batch_size + 1
           and count(distinct w.owner) <= claim_due_tasks.batch_size as hides
    from longest_due w
  ),
  owners_after (task_id, owner, priority, next_poll_at) as (
    -- The owners with tasks to poll, from the mark on, each with its longest due task:
    -- one probe each.
    (select s.task_id, s.owner, s.priority, s.next_poll_at from taskman_private.task_schedule s
     where s.owner > turn_after and s.next_poll_at is not null and s.lease_owner is null
     order by s.owner, s.next_poll_at limit 1)
    union all
    select n.*
    from owners_after o
    cross join lateral (
      select s.task_id, s.owner, s.priority, s.next_poll_at
      from taskman_private.task_schedule s
      where s.owner > o.owner and s.next_poll_at is not null and s.lease_owner is null
      order by s.owner, s.next_poll_at limit 1
    ) n
  ),
  owners_before (task_id, owner, priority, next_poll_at) as (
    -- Then around from the first owner up to the mark.
    (select s.task_id, s.owner, s.priority, s.next_poll_at from taskman_private.task_schedule s
     where s.owner <= turn_after and s.next_poll_at is not null and s.lease_owner is null
     order by s.owner, s.next_poll_at limit 1)
    union all
    select n.*
    from owners_before o
    cross join lateral (
      select s.task_id, s.owner, s.priority, s.next_poll_at
      from taskman_private.task_schedule s
      where s.owner > o.owner and s.owner <= turn_after
        and s.next_poll_at is not null and s.lease_owner is null
      order by s.owner, s.next_poll_at limit 1
    ) n
  ),
  looked_up as (
    -- Only when the window is crowded: up to `reach` owners, in turn order.
    select w.*
    from (select * from owners_after union all select * from owners_before) w
    where (select c.hides from crowded c)
    limit reach
  ),
  heads as (
    -- The looked-up owners' longest due tasks that the window does not hold, locked
    -- as the window's are.
    select u.task_id, u.owner, u.priority, u.next_poll_at
    from looked_up u
    cross join lateral (
      select 1 from taskman_private.task_schedule s
      where s.task_id = u.task_id and s.next_poll_at <= now()
      for update skip locked
    ) l
    where u.next_poll_at <= now() and u.task_id not in (select w.task_id from longest_due w)
  ),
  due as (
    -- Every owner's first task, then every owner's second, and so on; within a turn,
    -- the owners after the mark first. What the batch leaves is unlocked when the
    -- claim commits.
    select c.task_id, c.owner,
           row_number() over (order by c.turn, c.owner <= turn_after, c.owner) as ord
    from (select c.*, row_number() over (partition by c.owner
                                         order by c.priority desc, c.next_poll_at) as turn
          from (select * from longest_due union all select * from heads) c) c
    order by ord
    limit claim_due_tasks.batch_size
  ),
  claimed as (
    -- By key (= ANY of the batch): a join with `due` read the whole schedule.
    update taskman_private.task_schedule s
    set lease_owner = claim_due_tasks.worker_id,
        lease_expires_at = now() + make_interval(secs => claim_due_tasks.lease_seconds),
        next_poll_at = now() + make_interval(secs => claim_due_tasks.lease_seconds)
    where s.task_id = any(array(select due.task_id from due))
    returning s.task_id, s.attempt_count, s.error_count, s.lease_expires_at
  ),
  mark as (
    -- The next claim's turns start after the last owner served, or after the last
    -- owner looked up when this claim did not get round them all (the next one looks
    -- further). Written only when it moves.
    select pg_catalog.setval('taskman_private.claim_turn', m.mark)
    from (select ('x' || pg_catalog.translate(left(coalesce(
                   (select u.owner from looked_up u offset reach - 1 limit 1),
                   (select d.owner from due d order by d.ord desc limit 1))::text, 18),
                 '-', ''))::bit(64)::bigint as mark) m
    where m.mark is distinct from mark_before
  ),
  rows as (
    -- Each task's rows by key (OFFSET 0 keeps the lookups per claimed task).
    select d.ord, c.task_id, c.attempt_count, c.error_count, c.lease_expires_at, t.*, p.*
    from claimed c
    join due d on d.task_id = c.task_id
    cross join lateral (
      select t.poll_url, t.poll_method, t.poll_body, t.task_type, t.poll_config, t.status,
             t.max_attempts, t.poll_interval_seconds, t.deadline_at, t.submitted_at,
             t.submit_url, t.submit_method, t.submit_body
      from taskman.tasks t where t.task_id = c.task_id offset 0
    ) t
    left join lateral (
      select p.poll_headers, p.submit_headers, p.submit_callback_token
      from taskman_private.task_private p where p.task_id = c.task_id offset 0
    ) p on true
  ),
  profiles as materialized (
    -- One lookup a distinct (task_type, poll_config) of the batch.
    select k.task_type, k.poll_config,
           taskman_private.effective_profile(k.task_type, k.poll_config) as profile
    from (select distinct r.task_type, r.poll_config from rows r) k
  )
  select r.task_id, r.poll_url, r.poll_method, coalesce(r.poll_headers, '{}'::jsonb), r.poll_body,
         f.profile, r.task_type, r.status,
         r.attempt_count, r.error_count, r.max_attempts, r.poll_interval_seconds, r.deadline_at,
         r.lease_expires_at,
         case when r.submitted_at is null then r.submit_url end,
         r.submit_method,
         case when r.submitted_at is null and r.submit_url is not null
              then coalesce(r.submit_headers, '{}'::jsonb) end,
         case when r.submitted_at is null then r.submit_body end,
         case when r.submitted_at is null then r.submit_callback_token end
  from rows r
  join profiles f on f.task_type = r.task_type and f.poll_config = r.poll_config
  left join mark on true
  order by r.ord;
end
$$;
revoke all on function taskman.claim_due_tasks from public, anon, authenticated;
grant execute on function taskman.claim_due_tasks to service_role;

-- The worker's claim in one statement (one round trip): claims as claim_due_tasks does
-- and asks held_back (70_hosts.sql) which of the claimed tasks their hosts hold back
-- (those are back in the schedule). Every claimed task is returned, in claim order,
-- with `held`.
create or replace function taskman.claim_admitted_tasks(
  worker_id text,
  batch_size integer default 100,
  lease_seconds integer default 60,
  cooldown_seconds double precision default 5,
  max_cooldown_seconds double precision default 300,
  spread_seconds double precision default 5)
returns table (
  task_id uuid, poll_url text, poll_method text, poll_headers jsonb, poll_body jsonb,
  profile jsonb, task_type text, status text, attempt_count integer, error_count integer,
  max_attempts integer, poll_interval_seconds integer, deadline_at timestamptz,
  lease_expires_at timestamptz, submit_url text, submit_method text, submit_headers jsonb,
  submit_body jsonb, callback_token text, owner uuid, held boolean)
language plpgsql volatile security definer
set search_path = ''
set enable_seqscan = off
as $$
begin
  return query
  with claimed as materialized (
    select c.*, row_number() over () as ord
    from taskman.claim_due_tasks(claim_admitted_tasks.worker_id,
                                 claim_admitted_tasks.batch_size,
                                 claim_admitted_tasks.lease_seconds) c
  ),
  held as materialized (
    select h.task_id
    from taskman_private.held_back(
      claim_admitted_tasks.worker_id,
      (select array_agg(c.task_id order by c.ord) from claimed c),
      claim_admitted_tasks.cooldown_seconds, claim_admitted_tasks.max_cooldown_seconds,
      claim_admitted_tasks.spread_seconds) as h(task_id)
  )
  select c.task_id, c.poll_url, c.poll_method, c.poll_headers, c.poll_body, c.profile,
         c.task_type, c.status, c.attempt_count, c.error_count, c.max_attempts,
         c.poll_interval_seconds, c.deadline_at, c.lease_expires_at, c.submit_url,
         c.submit_method, c.submit_headers, c.submit_body, c.callback_token,
         (select taskman_private.schedule_owner(s.owner)
          from taskman_private.task_schedule s where s.task_id = c.task_id),
         c.task_id in (select h.task_id from held h)
  from claimed c
  order by c.ord;
end
$$;
revoke all on function taskman.claim_admitted_tasks from public, anon, authenticated;
grant execute on function taskman.claim_admitted_tasks to service_role;

-- Writes a batch of poll and submit outcomes. Each element of `results`:
--   task_id, worker_id       the claim being answered (ignored if the lease moved on)
--   ok                       true if the poll succeeded (resets error_count),
--                            false if it failed transiently (counts toward max_attempts)
--   status                   in_progress | completed | failed, or null for no change
--   error_code               with status failed: remote_failed | poll_error | invalid_response;
--                            with ok = false: invalid_response if the body was unreadable
--   delay_seconds            when to poll next if the task goes on
--   result, progress, progress_message, error_message (neutral), http_status, latency_ms
--   raw_response, raw_error  service-only, kept in taskman_private.task_private
--   reason                   a short code for why a poll failed or was retried (timeout,
--                            http_status, response_too_large, ...), shown in the event
--   submitted, poll_url, external_id
--                            a submit's outcome: the job handle read from the answer
-- Every outcome moves the task's schedule (counters, next poll, lease). Only an outcome
-- that changes what the owner sees (status, progress, progress message, result, error)
-- writes taskman.tasks, once, and records a `polled` event (a submit: `submitted`); so
-- does a failed poll (an event, with its retry). A poll with no news writes the
-- schedule row and nothing else. A submit that worked records submitted_at once, moves
-- the task to in_progress (or ends it, if the answer already said so) and its handle
-- becomes poll_url (none: the task waits for a callback). A poll or submit that worked
-- is a sign of life for the heartbeat (the schedule's alive_at). The database decides
-- the rest: max_attempts, the deadline, the transitions.
create or replace function taskman.record_poll_results(results jsonb)
returns table (task_id uuid, status text)
language plpgsql volatile security definer
set search_path = ''
-- Lookups by key stay index scans whatever the statistics say (50_worker_api.sql).
set enable_seqscan = off
as $$
declare
  invalid boolean;
  oversized boolean;
  quiet_ids uuid[];
  quiet_statuses text[];
  loud_ids uuid[];
  changing_ids uuid[];
begin
  if jsonb_typeof(results) is distinct from 'array' then
    perform taskman_private.reject('results', 'must be a JSON array of poll outcomes');
  end if;
  select coalesce(bool_or(r.task_id is null or r.worker_id is null
                          or r.status not in ('in_progress', 'completed', 'failed')
                          or r.error_code not in ('remote_failed', 'poll_error',
                                                  'invalid_response', 'submit_failed')), false),
         coalesce(bool_or(r.result is not null and octet_length(r.result::text) > 1048576), false)
  into invalid, oversized
  from jsonb_to_recordset(results) as r(task_id uuid, worker_id text, status text,
                                        error_code text, result jsonb);
  if invalid then
    perform taskman_private.reject('results',
      'each outcome needs task_id and worker_id; status must be in_progress, completed or failed; '
      'error_code must be remote_failed, poll_error, invalid_response or submit_failed');
  end if;
  if oversized then
    perform taskman_private.reject('result', 'must be at most 1 MiB of JSON');
  end if;

  -- Polls with no news: worked, nothing new for the owner (status, result, progress,
  -- progress message), not a submit, deadline not passed. Their schedule rows move
  -- (counters, next poll, lease, sign of life); nothing else is written. The lease
  -- is checked where the row is written (as of its latest version, if a sweep or a
  -- cancel changed it since the snapshot). The others (loud) take the full path below;
  -- of them, those whose public row may change are locked first.
  with outcome as (
    select r.task_id, r.worker_id, coalesce(r.ok, false) as ok, r.status, r.result,
           least(greatest(r.progress, 0), 100) as progress,
           left(r.progress_message, 1000) as progress_message,
           coalesce(r.submitted, false) as is_submit,
           greatest(coalesce(r.delay_seconds, 0), 0) as delay_seconds,
           r.http_status, r.latency_ms,
           -- An end or a submit that worked changes the row whatever it held.
           coalesce(coalesce(r.ok, false) and (r.status in ('completed', 'failed')
                                               or coalesce(r.submitted, false)),
                    false) as surely_changing
    from jsonb_to_recordset(results) as r(
      task_id uuid, worker_id text, ok boolean, status text, result jsonb, progress integer,
      progress_message text, submitted boolean, delay_seconds double precision,
      http_status integer, latency_ms double precision)
  ),
  read as (
    -- Each outcome's rows by key (OFFSET 0 keeps the lookups per outcome).
    select o.*, t.status as old_status,
           coalesce(o.ok and not o.is_submit and t.deadline_at > now()
                    and (o.status is null or o.status = t.status)
                    and (o.result is null or o.result is not distinct from t.result)
                    and (o.progress is null or o.progress is not distinct from t.progress)
                    and (o.progress_message is null
                         or o.progress_message is not distinct from t.progress_message),
                    false) as quiet,
           -- Whether the public row may change (then it is locked before it is read).
           coalesce(o.status is distinct from null and o.status <> t.status
                    or o.result is not null and o.result is distinct from t.result
                    or o.progress is not null and o.progress is distinct from t.progress
                    or o.progress_message is not null
                       and o.progress_message is distinct from t.progress_message
                    or not o.ok and s.error_count + 1 >= t.max_attempts
                    or o.is_submit and o.ok
                    or t.deadline_at <= now(), true) as changing
    from outcome o
    cross join lateral (
      select s.error_count from taskman_private.task_schedule s
      where s.task_id = o.task_id and s.lease_owner = o.worker_id offset 0
    ) s
    cross join lateral (
      select t.status, t.result, t.progress, t.progress_message, t.deadline_at, t.max_attempts
      from taskman.tasks t
      where t.task_id = o.task_id and t.status in ('pending', 'in_progress') offset 0
    ) t
    where not o.surely_changing
  ),
  moved as (
    update taskman_private.task_schedule s
    set attempt_count = s.attempt_count + 1,
        error_count = 0,
        last_polled_at = now(),
        last_http_status = r.http_status,
        last_latency_ms = r.latency_ms,
        alive_at = now(),
        lease_owner = null,
        lease_expires_at = null,
        next_poll_at = now() + make_interval(secs => r.delay_seconds)
    from read r
    where r.quiet and s.task_id = r.task_id and s.lease_owner = r.worker_id
    returning s.task_id, r.old_status
  )
  select (select array_agg(m.task_id) from moved m),
         (select array_agg(m.old_status) from moved m),
         (select array_agg(r.task_id) from read r where not r.quiet)
           || (select array_agg(o.task_id) from outcome o where o.surely_changing),
         (select array_agg(r.task_id) from read r where not r.quiet and r.changing)
           || (select array_agg(o.task_id) from outcome o where o.surely_changing)
  into quiet_ids, quiet_statuses, loud_ids, changing_ids;

  if quiet_ids is not null then
    return query select q.task_id, q.status from unnest(quiet_ids, quiet_statuses) as q(task_id, status);
  end if;
  if loud_ids is null then
    return;
  end if;

  -- The others: public rows that may change are locked first, in task_id order, as
  -- every other writer of a task does (the row, then its schedule).
  perform 1 from taskman.tasks t
  where t.task_id = any(changing_ids) and t.status in ('pending', 'in_progress')
  order by t.task_id
  for update;

  -- This statement writes the public rows as their triggers would have (see the top).
  perform pg_catalog.set_config('taskman.poll_writer', 'on', true);
  return query
  with outcome as materialized (
    -- Read once: inlined, the planner may scan the JSON again for every task row.
    select r.task_id, r.worker_id, coalesce(r.ok, false) as ok, r.status, r.error_code,
           greatest(coalesce(r.delay_seconds, 0), 0) as delay_seconds, r.result,
           least(greatest(r.progress, 0), 100) as progress,
           left(r.progress_message, 1000) as progress_message,
           left(r.error_message, 2000) as error_message, r.http_status, r.latency_ms,
           left(r.raw_response, 65536) as raw_response, left(r.raw_error, 4000) as raw_error,
           left(r.reason, 60) as reason, coalesce(r.submitted, false) as is_submit,
           r.poll_url as handle, left(r.external_id, 255) as job_id
    from jsonb_to_recordset(results) as r(
      task_id uuid, worker_id text, ok boolean, status text, error_code text,
      delay_seconds double precision, result jsonb, progress integer, progress_message text,
      error_message text, http_status integer, latency_ms double precision,
      raw_response text, raw_error text, reason text, submitted boolean, poll_url text,
      external_id text)
    where r.task_id = any(loud_ids)
  ),
  read as (
    -- FOR UPDATE of the schedule re-reads a row changed since the snapshot (a sweep,
    -- a cancel clears the lease), so only the lease holder's outcome counts.
    select o.*, t.user_id, t.poll_url as old_poll_url, t.max_attempts, t.deadline_at,
           t.status as old_status, t.result as old_result, t.progress as old_progress,
           t.progress_message as old_progress_message, t.error_code as old_error_code,
           t.error_message as old_error_message, t.started_at as old_started_at,
           s.error_count, s.attempt_count,
           o.is_submit and o.ok and t.submitted_at is null as accepted,
           o.handle is not null and not taskman_private.is_http_url(o.handle) as bad_handle
    -- Each outcome's rows by key: joined, the planner's guess of one row can turn the
    -- batch into a scan of every outcome for every row (quadratic in the batch).
    from outcome o
    cross join lateral (
      select s.error_count, s.attempt_count from taskman_private.task_schedule s
      where s.task_id = o.task_id and s.lease_owner = o.worker_id
      for update
    ) s
    cross join lateral (
      select t.user_id, t.poll_url, t.max_attempts, t.deadline_at, t.status, t.result,
             t.progress, t.progress_message, t.error_code, t.error_message, t.started_at,
             t.submitted_at
      from taskman.tasks t
      where t.task_id = o.task_id and t.status in ('pending', 'in_progress') offset 0
    ) t
  ),
  decided as (
    select r.*,
           case when r.ok then 0 else r.error_count + 1 end as new_error_count,
           r.attempt_count + 1 as new_attempt_count,
           case
             when r.accepted and r.bad_handle then 'failed'
             when r.status in ('completed', 'failed') then r.status
             when not r.ok and r.error_count + 1 >= r.max_attempts then 'failed'
             when r.deadline_at <= now() then 'failed'
             when r.status = 'in_progress' or r.accepted then 'in_progress'
             else r.old_status
           end as new_status,
           case
             when r.accepted and r.bad_handle then 'invalid_response'
             when r.status = 'failed' then coalesce(r.error_code, 'remote_failed')
             when r.status = 'completed' then null
             when not r.ok and r.error_count + 1 >= r.max_attempts
               then case when r.error_code = 'invalid_response' then 'invalid_response'
                         else 'max_attempts' end
             when r.deadline_at <= now() then 'timeout'
           end as new_error_code,
           (r.result is not null and r.result is distinct from r.old_result
            or r.progress is not null and r.progress is distinct from r.old_progress
            or r.progress_message is not null
               and r.progress_message is distinct from r.old_progress_message
            or r.accepted) as news,
           case when r.accepted and not r.bad_handle then coalesce(r.handle, r.old_poll_url)
                else r.old_poll_url end as new_poll_url
    from read r
  ),
  marked as (
    -- next_poll_at is decided here, once, for the schedule, the row and the events.
    select d.*, (d.news or d.new_status <> d.old_status) as visible, f.finished,
           d.new_status <> d.old_status as transition,
           (d.progress is not null and d.progress is distinct from d.old_progress
            or d.progress_message is not null
               and d.progress_message is distinct from d.old_progress_message) as progressed,
           case when f.finished then null
                -- A submitted task without a handle waits for its callback.
                when d.accepted and d.new_poll_url is null then null
                else now() + make_interval(secs => d.delay_seconds) end as next_poll_at
    from decided d
    cross join lateral (select d.new_status in ('completed', 'failed') as finished) f
  ),
  final as (
    -- The row's columns after the transition, as tasks_prepare_update sets them.
    select m.*, e.final_error_code,
           case when m.transition and m.new_status = 'completed' then null
                when m.transition and m.new_status = 'failed'
                  then coalesce(e.error_message, taskman_private.neutral_error(e.final_error_code))
                else e.error_message end as final_error_message
    from marked m
    cross join lateral (
      select case when m.transition and m.new_status = 'completed' then null
                  when m.transition and m.new_status = 'failed'
                    then coalesce(m.new_error_code, m.old_error_code, 'remote_failed')
                  else coalesce(m.new_error_code, m.old_error_code) end as final_error_code,
             case when m.status = 'failed' then m.error_message
                  else m.old_error_message end as error_message
    ) e
  ),
  scheduled as (
    update taskman_private.task_schedule s
    set attempt_count = m.new_attempt_count,
        error_count = m.new_error_count,
        last_polled_at = now(),
        last_http_status = m.http_status,
        last_latency_ms = m.latency_ms,
        alive_at = case when m.ok then now() else s.alive_at end,
        lease_owner = null,
        lease_expires_at = null,
        next_poll_at = m.next_poll_at
    from marked m
    where s.task_id = m.task_id
  ),
  written as (
    update taskman.tasks t
    set status = m.new_status,
        error_code = m.final_error_code,
        error_message = m.final_error_message,
        result = coalesce(m.result, t.result),
        progress = case when m.transition and m.new_status = 'completed' then 100
                        else coalesce(m.progress, t.progress) end,
        progress_message = coalesce(m.progress_message, t.progress_message),
        poll_url = m.new_poll_url,
        external_id = case when m.accepted then coalesce(m.job_id, t.external_id)
                           else t.external_id end,
        submitted_at = case when m.accepted then now() else t.submitted_at end,
        started_at = case when m.transition and m.new_status = 'in_progress'
                          then coalesce(t.started_at, now()) else t.started_at end,
        completed_at = case when m.transition and m.finished then now() else t.completed_at end,
        attempt_count = m.new_attempt_count,
        error_count = m.new_error_count,
        last_polled_at = now(),
        next_poll_at = m.next_poll_at,
        updated_at = now()
    from final m
    where t.task_id = m.task_id and m.visible
    returning t.task_id, t.status, t.user_id, m.transition, m.progressed
  ),
  events as (
    -- The poll's event (`news: progress` with the status in to_status marks a poll
    -- whose news was progress alone: the edge's /events reads it back without
    -- LISTEN), its retry, then the transition's `status_changed`, in that order.
    insert into taskman.task_events (task_id, user_id, event_type, from_status, to_status, detail)
    select m.task_id, m.user_id, e.event_type, e.from_status, e.to_status, e.detail
    from final m
    cross join lateral (
      select 1 as ord, case when m.is_submit then 'submitted' else 'polled' end as event_type,
             null::text as from_status,
             case when not m.is_submit and m.news and not m.transition
                  then m.new_status end as to_status,
             jsonb_strip_nulls(jsonb_build_object(
               'news', case when not m.is_submit and m.news and not m.transition
                            then 'progress' end,
               'progress', case when not m.is_submit and m.news then m.progress end,
               'http_status', m.http_status, 'latency_ms', round(m.latency_ms::numeric, 1),
               'outcome', case when not m.ok then 'error'
                               when m.is_submit and m.bad_handle then 'invalid_handle'
                               when m.is_submit then
                                 case when m.status in ('completed', 'failed') then m.status
                                      else 'accepted' end
                               else coalesce(m.status, 'no_change') end,
               'reason', m.reason,
               'attempt', m.new_attempt_count,
               'error_count', m.new_error_count,
               'polled', case when m.is_submit and m.ok then m.new_poll_url is not null end))
               as detail
      where m.visible or not m.ok
      union all
      select 2, 'retry_scheduled', null, null, jsonb_strip_nulls(jsonb_build_object(
               'http_status', m.http_status, 'latency_ms', round(m.latency_ms::numeric, 1),
               'outcome', 'error', 'reason', m.reason, 'attempt', m.new_attempt_count,
               'error_count', m.new_error_count, 'next_poll_at', m.next_poll_at))
      where not m.ok and not m.finished
      union all
      select 3, 'status_changed', m.old_status, m.new_status,
             jsonb_strip_nulls(jsonb_build_object('error_code', m.final_error_code))
      where m.transition
    ) e
    order by m.task_id, e.ord
  ),
  raw as (
    -- The raw answer of a poll that said something (news, an error, the end), kept
    -- service-only; a poll with no news leaves the last one in place.
    insert into taskman_private.task_private as p
      (task_id, last_http_status, last_response, last_error, updated_at)
    select m.task_id, m.http_status, m.raw_response, m.raw_error, now()
    from marked m
    where (m.visible or not m.ok)
      and (m.raw_response is not null or m.raw_error is not null
           or exists (select 1 from taskman_private.task_private x where x.task_id = m.task_id))
    on conflict on constraint task_private_pkey do update
    set last_http_status = excluded.last_http_status,
        last_response = excluded.last_response,
        last_error = excluded.last_error,
        updated_at = excluded.updated_at
  ),
  notified as (
    -- What the status and progress triggers sent: a NOTIFY for each status change,
    -- and for each change of progress alone.
    select pg_catalog.pg_notify('taskman', json_build_object(
             'task_id', w.task_id, 'status', w.status, 'user_id', w.user_id)::text)
    from written w
    where w.transition or w.progressed
  )
  select m.task_id, m.new_status from marked m
  where (select count(*) from notified) >= 0;
  perform pg_catalog.set_config('taskman.poll_writer', '', true);
end
$$;
revoke all on function taskman.record_poll_results from public, anon, authenticated;
grant execute on function taskman.record_poll_results to service_role;

-- The worker's record in one statement (one round trip): what the batch says about its
-- hosts (record_host_outcomes), then the outcomes of the polls their hosts did not hold
-- back (record_poll_results), with the same locks in the same order as the two calls;
-- each statement inside a volatile function sees what the one before it wrote.
-- `results` as record_poll_results takes them; `host_outcomes` as record_host_outcomes
-- takes them (the worker sends only what tells the host table something). Returns how
-- many outcomes were recorded.
create or replace function taskman.record_polls(
  worker_id text,
  results jsonb,
  host_outcomes jsonb default '[]',
  failure_threshold integer default 10,
  cooldown_seconds double precision default 5,
  max_cooldown_seconds double precision default 300,
  spread_seconds double precision default 5)
returns bigint
language plpgsql volatile security definer
set search_path = ''
-- Lookups by key stay index scans whatever the statistics say (50_worker_api.sql).
set enable_seqscan = off
as $$
declare
  held uuid[];
  recorded bigint;
begin
  if jsonb_typeof(results) is distinct from 'array' then
    perform taskman_private.reject('results', 'must be a JSON array of poll outcomes');
  end if;
  if jsonb_array_length(coalesce(host_outcomes, '[]')) > 0 then
    select array_agg(h) into held
    from taskman.record_host_outcomes(record_polls.worker_id, host_outcomes,
                                      record_polls.failure_threshold,
                                      record_polls.cooldown_seconds,
                                      record_polls.max_cooldown_seconds,
                                      record_polls.spread_seconds) as h;
  end if;
  if held is not null then
    -- Failed polls their hosts hold back are back in the schedule: not recorded (they
    -- do not spend their tasks' error budgets).
    select coalesce(jsonb_agg(e order by n), '[]') into results
    from jsonb_array_elements(results) with ordinality as r(e, n)
    where coalesce((e ->> 'task_id')::uuid <> all(held), true);
  end if;
  if jsonb_array_length(results) = 0 then
    return 0;
  end if;
  select count(*) into recorded from taskman.record_poll_results(results);
  return recorded;
end
$$;
revoke all on function taskman.record_polls from public, anon, authenticated;
grant execute on function taskman.record_polls to service_role;

-- Ends, as cancelled, the tasks whose remote said their job was cancelled. Each
-- element: task_id, worker_id (the claim answered; ignored if the lease moved on),
-- http_status, latency_ms, raw_response, raw_error, reason. Like record_poll_results:
-- rows locked in task_id order, the schedule moved, a `polled` event, the raw answer
-- kept service-side; the status change writes the `cancelled` event and enqueues the
-- completion callback. Returns how many tasks were cancelled.
create or replace function taskman.record_remote_cancellations(results jsonb)
returns integer
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  cancelled uuid[];
begin
  if jsonb_typeof(results) is distinct from 'array' then
    perform taskman_private.reject('results', 'must be a JSON array of poll outcomes');
  end if;
  if exists (select 1 from jsonb_to_recordset(results) as r(task_id uuid, worker_id text)
             where r.task_id is null or r.worker_id is null) then
    perform taskman_private.reject('results', 'each outcome needs task_id and worker_id');
  end if;

  perform 1
  from jsonb_to_recordset(results) as r(task_id uuid, worker_id text)
  join taskman_private.task_schedule s on s.task_id = r.task_id
  join taskman.tasks t on t.task_id = r.task_id
  where s.lease_owner = r.worker_id and t.status in ('pending', 'in_progress')
  order by t.task_id
  for update of t;

  with outcome as (
    select r.task_id, r.worker_id, r.http_status, r.latency_ms
    from jsonb_to_recordset(results) as r(task_id uuid, worker_id text, http_status integer,
                                          latency_ms double precision)
  ),
  held as (
    update taskman_private.task_schedule s
    set attempt_count = s.attempt_count + 1, error_count = 0, last_polled_at = now(),
        last_http_status = o.http_status, last_latency_ms = o.latency_ms,
        lease_owner = null, lease_expires_at = null, next_poll_at = null
    from outcome o, taskman.tasks t
    where s.task_id = o.task_id and t.task_id = o.task_id and s.lease_owner = o.worker_id
      and t.status in ('pending', 'in_progress')
    returning s.task_id
  )
  select coalesce(array_agg(h.task_id), '{}') into cancelled from held h;

  insert into taskman.task_events (task_id, user_id, event_type, detail)
  select t.task_id, t.user_id, 'polled', jsonb_strip_nulls(jsonb_build_object(
           'http_status', r.http_status, 'latency_ms', round(r.latency_ms::numeric, 1),
           'outcome', 'cancelled', 'reason', left(r.reason, 60), 'attempt', s.attempt_count,
           'error_count', 0))
  from jsonb_to_recordset(results) as r(task_id uuid, http_status integer,
                                        latency_ms double precision, reason text)
  join taskman.tasks t on t.task_id = r.task_id
  join taskman_private.task_schedule s on s.task_id = r.task_id
  where r.task_id = any(cancelled);

  update taskman.tasks t
  set status = 'cancelled',
      error_message = 'The remote job was cancelled.',
      attempt_count = s.attempt_count,
      error_count = 0,
      last_polled_at = s.last_polled_at
  from taskman_private.task_schedule s
  where t.task_id = any(cancelled) and s.task_id = t.task_id;

  insert into taskman_private.task_private as p
    (task_id, last_http_status, last_response, last_error, updated_at)
  select r.task_id, r.http_status, left(r.raw_response, 65536), left(r.raw_error, 4000), now()
  from jsonb_to_recordset(results) as r(task_id uuid, http_status integer, raw_response text,
                                        raw_error text)
  where r.task_id = any(cancelled)
  on conflict on constraint task_private_pkey do update
  set last_http_status = excluded.last_http_status,
      last_response = excluded.last_response,
      last_error = excluded.last_error,
      updated_at = excluded.updated_at;

  return cardinality(cancelled);
end
$$;
revoke all on function taskman.record_remote_cancellations from public, anon, authenticated;
grant execute on function taskman.record_remote_cancellations to service_role;

-- The sweep: every live task past its deadline fails with timeout, and every started
-- task with a heartbeat whose last sign of life (start, a visible change, a poll that
-- worked, a callback) is older than heartbeat_seconds fails with heartbeat_timeout.
create or replace function taskman.expire_overdue_tasks()
returns integer
language sql volatile security definer
set search_path = ''
as $$
  -- The schedule row is locked with the task's (both skipped if either is taken): the
  -- status change rewrites it, and a worker may hold it while it waits for a task row
  -- of its own batch, so waiting for it here could close a cycle.
  with overdue as (
    select t.task_id from taskman.tasks t
    join taskman_private.task_schedule s on s.task_id = t.task_id
    where t.status in ('pending', 'in_progress') and t.deadline_at <= now()
    for update of t, s skip locked
  ),
  expired as (
    update taskman.tasks t set status = 'failed', error_code = 'timeout', error_message = null
    from overdue where t.task_id = overdue.task_id
    returning 1
  ),
  silent as (
    select t.task_id from taskman.tasks t
    join taskman_private.task_schedule s on s.task_id = t.task_id
    where t.heartbeat_seconds is not null and t.status = 'in_progress'
      and t.deadline_at > now()
      and greatest(t.started_at, t.updated_at, s.alive_at)
          + make_interval(secs => t.heartbeat_seconds) <= now()
    for update of t, s skip locked
  ),
  stopped as (
    update taskman.tasks t
    set status = 'failed', error_code = 'heartbeat_timeout', error_message = null
    from silent where t.task_id = silent.task_id
    returning 1
  )
  select ((select count(*) from expired) + (select count(*) from stopped))::integer
$$;
revoke all on function taskman.expire_overdue_tasks from public, anon, authenticated;
grant execute on function taskman.expire_overdue_tasks to service_role;

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
revoke all on function taskman.release_tasks from public, anon, authenticated;
grant execute on function taskman.release_tasks to service_role;
