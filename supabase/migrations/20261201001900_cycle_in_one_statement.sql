-- The worker's claim and its record, each one statement (one round trip) instead of a
-- transaction of two (BEGIN, claim or record, the host table's side, COMMIT: four).
-- Over a network to the database, every round trip is latency a claim or a record
-- waits for; here, on one machine, each is CPU on both ends.
--
-- - claim_admitted_tasks claims as claim_due_tasks does and, in the same statement,
--   asks admit_tasks which of the claimed tasks their hosts hold back (those are back
--   in the schedule). Every claimed task is returned, in claim order, with `held`.
-- - record_polls records what the batch says about its hosts (record_host_outcomes)
--   and then the outcomes of the polls their hosts did not hold back
--   (record_poll_results).
-- Both do what the two statements did in one transaction, with the same locks in the
-- same order: each statement inside a volatile function sees what the one before it
-- wrote. The functions they call stay as they are.

create function taskman.claim_admitted_tasks(
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
    -- Each claimed task goes to its submit URL's host while it is still to be
    -- submitted (claim_due_tasks returns submit_url only then), else its status URL's.
    select h.task_id
    from taskman.admit_tasks(
      claim_admitted_tasks.worker_id,
      (select coalesce(jsonb_agg(jsonb_build_object(
                'task_id', c.task_id,
                'host', taskman_private.host_key(coalesce(c.submit_url, c.poll_url)))
              order by c.ord), '[]')
       from claimed c),
      claim_admitted_tasks.cooldown_seconds, claim_admitted_tasks.max_cooldown_seconds,
      claim_admitted_tasks.spread_seconds) as h(task_id)
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

-- `results` as record_poll_results takes them; `host_outcomes` as record_host_outcomes
-- takes them (the worker sends only what tells the host table something). Returns how
-- many outcomes were recorded.
create function taskman.record_polls(
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

revoke all on function taskman.claim_admitted_tasks, taskman.record_polls
  from public, anon, authenticated;
grant execute on function taskman.claim_admitted_tasks, taskman.record_polls to service_role;
