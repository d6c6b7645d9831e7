-- claim_admitted_tasks as before (same arguments, rows, order and held), with less work
-- per claim: each claimed task's host is read from its schedule row (kept there by the
-- triggers whenever the URL it is sent to changes) instead of being computed again
-- from its URL, and admit_tasks runs only when some host of the batch restricts
-- anything (an open circuit, a rate limit, a pause or a resume pace): otherwise it
-- holds nothing back. Measured with the worker's claim statement, steady no-change
-- polls: 56 µs per claimed task before, 52 after, 49 for claim_due_tasks alone. Its
-- reads are by key whatever the statistics say (20261202000200_lookups_by_key.sql).

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
  submit_body jsonb, callback_token text, held boolean)
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
  targets as materialized (
    -- The host each claimed task goes to: its submit URL's while it is still to be
    -- submitted, else its status URL's (task_schedule.host).
    select c.task_id, c.ord, s.host
    from claimed c
    cross join lateral (
      select s.host from taskman_private.task_schedule s where s.task_id = c.task_id offset 0
    ) s
  ),
  held as materialized (
    select h.task_id
    from taskman.admit_tasks(
      claim_admitted_tasks.worker_id,
      (select coalesce(jsonb_agg(jsonb_build_object('task_id', t.task_id, 'host', t.host)
                                 order by t.ord), '[]')
       from targets t),
      claim_admitted_tasks.cooldown_seconds, claim_admitted_tasks.max_cooldown_seconds,
      claim_admitted_tasks.spread_seconds) as h(task_id)
    -- As admit_tasks decides which hosts gate (it returns nothing without one).
    where exists (select 1 from taskman_private.hosts x
                  where x.host in (select t.host from targets t)
                    and (x.state = 'open' or x.rate_limit is not null
                         or x.paused_until > now() or x.resume_until > now()))
  )
  select c.task_id, c.poll_url, c.poll_method, c.poll_headers, c.poll_body, c.profile,
         c.task_type, c.status, c.attempt_count, c.error_count, c.max_attempts,
         c.poll_interval_seconds, c.deadline_at, c.lease_expires_at, c.submit_url,
         c.submit_method, c.submit_headers, c.submit_body, c.callback_token,
         c.task_id in (select h.task_id from held h)
  from claimed c
  order by c.ord;
end
$$;
