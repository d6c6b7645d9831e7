-- Retention reads the tasks it waits for once a round, not in every batch. A finished
-- task whose notification is still pending when retention reaches it (its receiver down
-- for days: up to TASKMAN_OUTBOX_MAX_AGE_HOURS) waits in retention_deferred, and every
-- batch of prune_finished_tasks read all of them to find those that can go now. A round
-- of the worker's retention job is a batch of 200 for each 200 tasks that reached the
-- period since the last round, so it read them all that many times.
--
-- Now a batch reads them only once the cursor has caught up, i.e. in the last batches
-- of a round (each takes at most batch_size of those that can go). Measured with
-- bench.retention_waiting (one run; rounds pruning 2,000 new tasks while 100,000 wait):
-- 120 ms a round, from 629 ms; 46 ms with none waiting.
--
-- prune_finished_tasks as in 20261202000900_retention_passes_no_held_task.sql but for
-- when it reads the tasks it waits for (same arguments, answers and rules).

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

  if not dry_run and last_id is not null then
    -- Tasks of the range this batch covers that another transaction holds (a retry, a
    -- metadata edit, an event's key check): the cursor passes them, so they wait in
    -- retention_deferred too, without waiting for their holders.
    insert into taskman_private.retention_deferred (task_id)
    select t.task_id
    from taskman.tasks t
    where t.status in ('completed', 'failed', 'cancelled')
      and t.completed_at < now() - older_than
      and (t.completed_at, t.task_id) > (cursor_at, cursor_id)
      and (t.completed_at, t.task_id) <= (last_at, last_id)
      and t.task_id <> all(ids)
    on conflict do nothing;
  end if;

  -- Tasks with a notification still to be delivered keep everything, for now: the
  -- cursor passes them, so they wait in retention_deferred. One given up (a dead letter,
  -- listed by `taskman notifications --given-up` until now) goes with its task.
  kept := array(
    select i from unnest(ids) as i
    where exists (select 1 from taskman_private.outbox o
                  where o.task_id = i and o.delivered_at is null and o.given_up_at is null));
  ids := array(select i from unnest(ids) as i where i <> all (kept));

  if not dry_run and last_id is null then
    -- Once the cursor has caught up (so once a round, not in every batch of it): tasks
    -- passed that way before, whose notifications are all delivered or given up now, or
    -- that nobody holds any more. (A dry run reads every finished task from the start:
    -- it counts them already.) Still finished, still past the period and behind the
    -- cursor: one retried since is live, or it ended again and the cursor will reach it.
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
  end if;
  if not dry_run then
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
