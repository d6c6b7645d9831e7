-- A notification that cannot be delivered is given up at last, however it failed. A
-- callback whose receiver's circuit is open spends no attempt (20261201001400): its
-- probes are given back, so a receiver that never comes back kept its callbacks
-- undelivered forever, and task retention keeps a task with an undelivered
-- notification. Every task finished with a callback to a dead receiver stayed.
--
-- give_up_stale_notifications gives up, in batches, the notifications (callbacks and
-- Slack alerts, a task's or a host's) still undelivered `older_than` after they were
-- enqueued: given_up_at is set, last_error says why, and a task's history gets
-- `notification_given_up` with reason `expired`, as a dead letter by attempts does.
-- One being sent now (leased, its lease not over) is left to its sender. The worker runs
-- it with TASKMAN_OUTBOX_MAX_AGE_HOURS (default 72; 0: never by age).
--
-- prune_finished_tasks as before (same arguments, batches, cursor and counts), except:
-- - a given-up notification no longer keeps its task: a dead letter stays listed until
--   its task ends the retention period, then goes with it. Only a notification still to
--   be delivered keeps a finished task.
-- - a task kept that way is not lost behind the cursor: it waits in
--   taskman_private.retention_deferred, and a later batch takes it once its
--   notifications are delivered or given up. Before, the cursor passed it for good, so a
--   task with a given-up notification, or one still retrying when retention reached it,
--   kept its history, private rows and notifications for ever.
--
-- prune_idle_hosts as before, except that host alerts given up that long ago go too, as
-- delivered ones do. Without Slack settings every alert of a circuit opening or closing
-- is given up at once, so they were never pruned.

-- The arguments of a retention or expiry batch (22023 for each that cannot be used).
create function taskman_private.check_batch(older_than interval, batch_size integer)
returns void
language plpgsql immutable
set search_path = ''
as $$
begin
  if older_than is null or older_than < interval '0' then
    perform taskman_private.reject('older_than', 'must be a non-negative interval');
  end if;
  if batch_size is null or batch_size not between 1 and 10000 then
    perform taskman_private.reject('batch_size', 'must be between 1 and 10000');
  end if;
end
$$;

revoke all on function taskman_private.check_batch from public, anon, authenticated;

create function taskman.give_up_stale_notifications(older_than interval,
                                                    batch_size integer default 200)
returns table (given_up bigint, done boolean)
language plpgsql volatile security definer
set search_path = ''
-- The undelivered rows by outbox_due_idx, never the delivered ones kept for retention.
set enable_seqscan = off
as $$
declare
  stale bigint[];
begin
  perform taskman_private.check_batch(older_than, batch_size);

  -- Locked, skipping any a transaction holds (a sender claiming or recording it).
  select array_agg(o.outbox_id) into stale
  from (select o.outbox_id
        from taskman_private.outbox o
        where o.delivered_at is null and o.given_up_at is null
          and o.created_at < now() - older_than
          and (o.lease_owner is null or o.next_attempt_at <= now())
        limit batch_size
        for update skip locked) o;

  with expired as (
    update taskman_private.outbox o
    set given_up_at = now(), lease_owner = null,
        last_error = left('undelivered ' || pg_catalog.justify_interval(
                            date_trunc('minute', now() - o.created_at))::text
                          || ' after it was enqueued'
                          || coalesce(' (last: ' || o.last_error || ')', ''), 4000)
    where o.outbox_id = any(stale)
    returning o.task_id, o.channel, o.attempts
  )
  insert into taskman.task_events (task_id, user_id, event_type, detail)
  select e.task_id, t.user_id, 'notification_given_up',
         jsonb_build_object('channel', e.channel, 'attempt', e.attempts, 'reason', 'expired')
  from expired e
  join taskman.tasks t on t.task_id = e.task_id;

  return query select coalesce(cardinality(stale), 0)::bigint,
                      coalesce(cardinality(stale), 0) < batch_size;
end
$$;

revoke all on function taskman.give_up_stale_notifications from public, anon, authenticated;
grant execute on function taskman.give_up_stale_notifications to service_role;

-- Finished tasks retention passed while a notification of theirs was still to be
-- delivered; each batch takes those whose notifications have since been delivered or
-- given up. A deployed database's passed tasks are listed here once: those behind the
-- cursor that still hold a notification not delivered (still retrying, or given up).
create table taskman_private.retention_deferred (
  task_id uuid primary key references taskman.tasks (task_id) on delete cascade
);
alter table taskman_private.retention_deferred enable row level security;
revoke all on taskman_private.retention_deferred from public, anon, authenticated;
grant select, insert, update, delete on taskman_private.retention_deferred to service_role;

insert into taskman_private.retention_deferred (task_id)
select t.task_id
from taskman.tasks t, taskman_private.retention_state r
where t.status in ('completed', 'failed', 'cancelled')
  and (t.completed_at, t.task_id) <= (r.pruned_through, r.pruned_through_id)
  and exists (select 1 from taskman_private.outbox o
              where o.task_id = t.task_id and o.delivered_at is null);

-- One batch of retention (see the top).
create or replace function taskman.prune_finished_tasks(older_than interval, batch_size integer default 200,
                                            dry_run boolean default false)
returns table (tasks bigint, task_rows bigint, events bigint, private_rows bigint,
               schedule_rows bigint, outbox_rows bigint, rows_kept boolean, done boolean)
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  keep_rows boolean := taskman_private.realtime_streams_tasks();
  cursor_at timestamptz;
  cursor_id uuid;
  ids uuid[];
  kept uuid[];
  revisit uuid[];
  last_at timestamptz;
  last_id uuid;
  n_tasks bigint;
  n_rows bigint := 0;
  n_events bigint;
  n_private bigint;
  n_schedule bigint;
  n_outbox bigint;
begin
  perform taskman_private.check_batch(older_than, batch_size);

  select r.pruned_through, r.pruned_through_id into cursor_at, cursor_id
  from taskman_private.retention_state r
  for update;
  if dry_run then
    -- A dry run counts everything that would go, from the start.
    cursor_at := '-infinity';
    cursor_id := '00000000-0000-0000-0000-000000000000';
  end if;

  -- Rows are locked for update (skipping any a transaction holds), so a concurrent
  -- retry_task or callback either finishes first or waits for this batch.
  with batch as (
    select t.task_id, t.completed_at
    from taskman.tasks t
    where t.status in ('completed', 'failed', 'cancelled')
      and t.completed_at < now() - older_than
      and (t.completed_at, t.task_id) > (cursor_at, cursor_id)
    order by t.completed_at, t.task_id
    limit case when dry_run then null else batch_size end
    for update of t skip locked
  )
  select array_agg(b.task_id order by b.completed_at, b.task_id),
         (array_agg(b.completed_at order by b.completed_at desc, b.task_id desc))[1],
         (array_agg(b.task_id order by b.completed_at desc, b.task_id desc))[1]
  into ids, last_at, last_id
  from batch b;

  -- Tasks with a notification still to be delivered keep everything, for now: the
  -- cursor passes them, so they wait in retention_deferred. One given up (a dead letter,
  -- listed by `taskman notifications --given-up` until now) goes with its task.
  kept := array(
    select i from unnest(ids) as i
    where exists (select 1 from taskman_private.outbox o
                  where o.task_id = i and o.delivered_at is null and o.given_up_at is null));
  ids := array(select i from unnest(ids) as i where i <> all (kept));

  if not dry_run then
    -- Tasks passed that way before, whose notifications are all delivered or given up
    -- now. (A dry run reads every finished task from the start: it counts them already.)
    -- Still finished, still past the period and behind the cursor: one retried since
    -- is live, or it ended again and the cursor will reach it.
    select array_agg(d.task_id) into revisit
    from (select d.task_id
          from taskman_private.retention_deferred d
          join taskman.tasks t on t.task_id = d.task_id
          where t.status in ('completed', 'failed', 'cancelled')
            and t.completed_at < now() - older_than
            and (t.completed_at, t.task_id) <= (cursor_at, cursor_id)
            and not exists (select 1 from taskman_private.outbox o
                            where o.task_id = d.task_id and o.delivered_at is null
                              and o.given_up_at is null)
          limit batch_size
          for update of t skip locked) d;
    ids := ids || coalesce(revisit, '{}');
    delete from taskman_private.retention_deferred d where d.task_id = any(ids);
    insert into taskman_private.retention_deferred (task_id)
    select unnest(kept) on conflict do nothing;
  end if;
  n_tasks := cardinality(ids);

  if last_id is null and n_tasks = 0 then
    return query select 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint,
                        keep_rows, true;
    return;
  end if;

  if dry_run then
    select count(*) into n_events from taskman.task_events e where e.task_id = any(ids);
    select count(*) into n_private from taskman_private.task_private p where p.task_id = any(ids);
    select count(*) into n_schedule from taskman_private.task_schedule s where s.task_id = any(ids);
    select count(*) into n_outbox from taskman_private.outbox o where o.task_id = any(ids);
    return query select n_tasks, case when keep_rows then 0 else n_tasks end, n_events,
                        n_private, n_schedule, n_outbox, keep_rows, true;
    return;
  end if;

  with gone as (delete from taskman.task_events e where e.task_id = any(ids) returning 1)
  select count(*) into n_events from gone;
  with gone as (delete from taskman_private.task_private p where p.task_id = any(ids) returning 1)
  select count(*) into n_private from gone;
  with gone as (delete from taskman_private.task_schedule s where s.task_id = any(ids) returning 1)
  select count(*) into n_schedule from gone;
  with gone as (delete from taskman_private.outbox o
                where o.task_id = any(ids)
                  and (o.delivered_at is not null or o.given_up_at is not null) returning 1)
  select count(*) into n_outbox from gone;
  if not keep_rows then
    with gone as (delete from taskman.tasks t where t.task_id = any(ids) returning 1)
    select count(*) into n_rows from gone;
  end if;

  if last_id is not null then
    update taskman_private.retention_state
    set pruned_through = last_at, pruned_through_id = last_id;
  end if;

  -- Done when the cursor found nothing and the deferred tasks fit in this batch.
  return query select n_tasks, n_rows, n_events, n_private, n_schedule, n_outbox, keep_rows,
                      last_id is null and coalesce(cardinality(revisit), 0) < batch_size;
end
$$;

-- Idle hosts and old host alerts (see the top).
create or replace function taskman.prune_idle_hosts(older_than interval, batch_size integer default 200,
                                        dry_run boolean default false)
returns table (hosts bigint, alerts bigint, done boolean)
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  idle_hosts text[];
  old_alerts bigint[];
begin
  perform taskman_private.check_batch(older_than, batch_size);

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
        where o.task_id is null
          and coalesce(o.delivered_at, o.given_up_at) < now() - older_than
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
