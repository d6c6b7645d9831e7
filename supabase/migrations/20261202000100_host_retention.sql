-- Retention for what belongs to no task. A remote host gets a row the first time a poll
-- reaches it, and a circuit that opens or closes leaves a Slack alert with no task; task
-- retention never deleted either, so both grew with every host ever polled.
--
-- prune_idle_hosts deletes, in batches:
-- - host rows that hold no state and were not touched for `older_than`: the circuit
--   closed, no rate limit, no pause or resume pace still running. A host that is
--   polled again gets a new row; only its counters (failures_total, throttled_total)
--   start again. An open circuit or an operator's rate limit is never deleted.
-- - host alerts delivered more than `older_than` ago. Undelivered and given-up alerts
--   stay, as a task's notifications do.
-- The worker runs it after prune_finished_tasks with the same period; `taskman prune`
-- too.

create function taskman.prune_idle_hosts(older_than interval, batch_size integer default 200,
                                        dry_run boolean default false)
returns table (hosts bigint, alerts bigint, done boolean)
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  idle_hosts text[];
  old_alerts bigint[];
begin
  if older_than is null or older_than < interval '0' then
    perform taskman_private.reject('older_than', 'must be a non-negative interval');
  end if;
  if batch_size is null or batch_size not between 1 and 10000 then
    perform taskman_private.reject('batch_size', 'must be between 1 and 10000');
  end if;

  -- Locked, skipping any a transaction holds: a worker recording a poll of the host
  -- either goes first (then updated_at is now and the row stays) or inserts it again
  -- after. A dry run counts everything, from the start, and deletes nothing.
  select array_agg(h.host) into idle_hosts
  from (select h.host
        from taskman_private.hosts h
        where h.updated_at < now() - older_than and h.state = 'closed'
          and h.rate_limit is null
          and (h.paused_until is null or h.paused_until <= now())
          and (h.resume_until is null or h.resume_until <= now())
        limit case when dry_run then null else batch_size end
        for update skip locked) h;
  select array_agg(o.outbox_id) into old_alerts
  from (select o.outbox_id
        from taskman_private.outbox o
        where o.task_id is null and o.delivered_at < now() - older_than
        limit case when dry_run then null else batch_size end
        for update skip locked) o;

  if not dry_run then
    delete from taskman_private.hosts h where h.host = any(idle_hosts);
    delete from taskman_private.outbox o where o.outbox_id = any(old_alerts);
  end if;
  return query select coalesce(cardinality(idle_hosts), 0)::bigint,
                      coalesce(cardinality(old_alerts), 0)::bigint,
                      dry_run or (coalesce(cardinality(idle_hosts), 0) < batch_size
                                  and coalesce(cardinality(old_alerts), 0) < batch_size);
end
$$;

revoke all on function taskman.prune_idle_hosts from public, anon, authenticated;
grant execute on function taskman.prune_idle_hosts to service_role;
