-- An event-driven outbox: a new callback wakes the worker at once, and delivery
-- drains what is due without waiting for a tick.
--
-- - Enqueueing a callback sends NOTIFY on the channel `taskman_outbox` (payload
--   'callback'), at the commit that ends the task. It is a channel of its own, so
--   the edge's change feed (channel `taskman`) carries exactly what it did. One
--   transaction ending many tasks sends one notification (PostgreSQL folds equal
--   payloads). Slack alerts send none: they keep their digest window.
-- - claim_outbox gains two optional arguments: `only_channel` (claim only 'callback' or
--   only 'slack' rows) and `skip_hosts` (callback hosts this worker already keeps
--   busy, left for later or for other workers, so one slow receiver cannot fill a
--   worker with its rows). It also keeps each task's notifications of one channel
--   in order: a row is not claimed while an earlier one of its task and channel is
--   undelivered and not given up (claimed, failing or due).

create or replace function taskman_private.tasks_enqueue_notifications()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  body jsonb := taskman.task_json(new);
begin
  if new.callback_url is not null then
    insert into taskman_private.outbox (task_id, channel, payload) values (new.task_id, 'callback', body);
    perform pg_catalog.pg_notify('taskman_outbox', 'callback');
  end if;
  -- Alerts are for final failures only (timeouts included), never for
  -- intermediate states or cancellations.
  if new.status = 'failed' then
    insert into taskman_private.outbox (task_id, channel, payload) values (new.task_id, 'slack', body);
  end if;
  return null;
end
$$;

-- What the in-order check probes, one lookup a candidate row (outbox_due_idx would be
-- walked whole for each: a 2,000-row burst took 0.4 s a claim).
create index outbox_undelivered_task_idx on taskman_private.outbox (task_id, channel, outbox_id)
  where delivered_at is null and given_up_at is null;

drop function taskman.claim_outbox(text, integer, integer);

create function taskman.claim_outbox(worker_id text, batch_size integer default 100,
                                    lease_seconds integer default 60,
                                    only_channel text default null,
                                    skip_hosts text[] default null)
returns table (outbox_id bigint, task_id uuid, channel text, payload jsonb, attempts integer)
language plpgsql volatile security definer
set search_path = ''
as $$
begin
  perform taskman_private.check_claim(worker_id, batch_size, lease_seconds);
  if only_channel is not null and only_channel not in ('slack', 'callback') then
    perform taskman_private.reject('only_channel', 'must be slack, callback or null (both)');
  end if;
  if pg_catalog.cardinality(claim_outbox.skip_hosts) > 10000 then
    perform taskman_private.reject('skip_hosts', 'must list at most 10000 hosts');
  end if;

  return query
  with due as (
    -- Walks outbox_due_idx in due order; SKIP LOCKED lets concurrent workers
    -- take disjoint batches. Pushing next_attempt_at to the lease expiry hides
    -- claimed rows from other workers until the lease ends.
    select o.outbox_id
    from taskman_private.outbox o
    where o.delivered_at is null and o.given_up_at is null and o.next_attempt_at <= now()
      and (claim_outbox.only_channel is null or o.channel = claim_outbox.only_channel)
      -- The host as the worker keys it: the URL's authority, as written.
      and (claim_outbox.skip_hosts is null or o.channel <> 'callback'
           or coalesce(substring(o.payload ->> 'callback_url' from '^[^:/?#]+://([^/?#]*)'), '')
              <> all (claim_outbox.skip_hosts))
      -- In order: nothing of a task and channel goes out before what precedes it
      -- (the first undelivered row of each: one probe of outbox_undelivered_task_idx
      -- a candidate, evaluated only as far as the scan goes).
      and o.outbox_id = (
        select min(p.outbox_id) from taskman_private.outbox p
        where p.task_id = o.task_id and p.channel = o.channel
          and p.delivered_at is null and p.given_up_at is null)
    order by o.next_attempt_at
    limit claim_outbox.batch_size
    for update of o skip locked
  )
  update taskman_private.outbox o
  set lease_owner = claim_outbox.worker_id,
      next_attempt_at = now() + make_interval(secs => claim_outbox.lease_seconds)
  from due
  where o.outbox_id = due.outbox_id
  returning o.outbox_id, o.task_id, o.channel, o.payload, o.attempts;
end
$$;

revoke all on function taskman.claim_outbox(text, integer, integer, text, text[])
  from public, anon, authenticated;
grant execute on function taskman.claim_outbox(text, integer, integer, text, text[])
  to service_role;
