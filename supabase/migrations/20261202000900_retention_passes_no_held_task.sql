-- Retention no longer loses a finished task that another transaction held when its
-- batch came. The batch locks its tasks with SKIP LOCKED and its cursor moves to the
-- batch's last task, so a held task between others was passed for good: its events,
-- private rows and notifications stayed for ever, and so did its row. Who holds a
-- finished task: retry_task, an owner's metadata edit, or any insert of one of its
-- events (the foreign key's check locks the row for key share).
--
-- - prune_finished_tasks (as in 20261202000500_notification_max_age.sql) lists the tasks
--   of the range its batch covered that it skipped in retention_deferred, where tasks
--   with a pending notification already wait; a later batch takes each one once nobody
--   holds it, while it is still finished, past the period and behind the cursor.
-- - retention_deferred loses its foreign key to taskman.tasks, so that listing a held
--   task does not wait for its holder (the key check would, behind FOR UPDATE).
--   Deleting a task still deletes its entry (tasks_delete_rows, since
--   20261202000800_create_without_row_triggers.sql).
-- - A deployed database's tasks passed that way are listed once: finished tasks behind
--   the cursor that still have events (every task has its `created` event until
--   retention takes it; one kept for a notification is listed already).

alter table taskman_private.retention_deferred drop constraint retention_deferred_task_id_fkey;

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

  if not dry_run then
    -- Tasks passed that way before, whose notifications are all delivered or given up
    -- now, or that nobody holds any more. (A dry run reads every finished task from the start: it counts them already.)
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

insert into taskman_private.retention_deferred (task_id)
select t.task_id
from taskman.tasks t
cross join taskman_private.retention_state r
where t.status in ('completed', 'failed', 'cancelled')
  and (t.completed_at, t.task_id) <= (r.pruned_through, r.pruned_through_id)
  and exists (select 1 from taskman.task_events e where e.task_id = t.task_id)
on conflict do nothing;
