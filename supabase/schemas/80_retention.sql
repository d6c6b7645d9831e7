-- Retention of finished tasks, in small batches.
--
-- taskman.tasks is in the supabase_realtime publication by default, and Realtime sends
-- every DELETE on a published table to every subscriber (RLS cannot filter a deleted
-- row). So while Realtime streams the table, retention deletes, for finished tasks older
-- than the retention period, everything that is not published and holds the bulk of a
-- task's storage: its history, its private row (secrets, raw answers), its schedule row
-- and its notifications; the task rows stay (README: Retention). In broadcast mode
-- (90_realtime.sql) it deletes whole tasks.
--
-- Batches walk finished tasks by (completed_at, task_id) from a cursor kept in
-- taskman_private.retention_state, so each batch costs the same however much has been
-- pruned, and holds its locks for one short transaction, skipping rows others have
-- locked. A task with a notification still to be delivered, or held by another
-- transaction, waits in retention_deferred until it can go. Idle hosts' rows go the
-- same way (prune_idle_hosts).

-- Finished tasks by (completed_at, task_id): the walk's order.
create index tasks_finished_idx on taskman.tasks (completed_at, task_id)
  where status in ('completed', 'failed', 'cancelled');

-- Where retention's walk has got to: batches walk finished tasks by
-- (completed_at, task_id) from this cursor, so each batch costs the same however much
-- has been pruned. One row.
create table taskman_private.retention_state (
  id boolean primary key default true constraint retention_state_one_row check (id),
  pruned_through timestamptz not null default '-infinity',
  pruned_through_id uuid not null default '00000000-0000-0000-0000-000000000000'
);
insert into taskman_private.retention_state default values;

alter table taskman_private.retention_state enable row level security;
revoke all on taskman_private.retention_state from public, anon, authenticated;
grant select, insert, update, delete on taskman_private.retention_state to service_role;

-- Finished tasks retention passed while a notification of theirs was still to be
-- delivered, or while another transaction held them; each batch takes those that can
-- go now. No foreign key, so that listing a held task does not wait for its holder;
-- tasks_delete_rows deletes a task's entry.
create table taskman_private.retention_deferred (
  task_id uuid primary key
);

alter table taskman_private.retention_deferred enable row level security;
revoke all on taskman_private.retention_deferred from public, anon, authenticated;
grant select, insert, update, delete on taskman_private.retention_deferred to service_role;

-- A task's rows beside it go with it, once per DELETE statement (no foreign keys:
-- cheaper than cascades row by row).
create or replace function taskman_private.tasks_delete_rows()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  -- The schedule rows first: a poll being recorded holds its task's schedule row, so
  -- this waits for it, and the next statement sees the private row it wrote.
  delete from taskman_private.task_schedule s where s.task_id in (select g.task_id from gone g);
  delete from taskman_private.task_private p where p.task_id in (select g.task_id from gone g);
  delete from taskman_private.retention_deferred d
  where d.task_id in (select g.task_id from gone g);
  return null;
end
$$;
revoke all on function taskman_private.tasks_delete_rows from public, anon, authenticated;

create trigger tasks_delete_rows after delete on taskman.tasks
  referencing old table as gone
  for each statement execute function taskman_private.tasks_delete_rows();

-- The arguments of a retention or expiry batch (22023 for each that cannot be used).
create or replace function taskman_private.check_batch(older_than interval, batch_size integer)
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

-- One batch: up to batch_size finished tasks that ended before now() - older_than, past
-- the cursor, and those waiting in retention_deferred that can go now (read only once
-- the cursor has caught up, in the last batches of a round, at most batch_size of them).
-- Returns how many tasks, and how many rows of each kind, went (or would go, with
-- dry_run, which changes nothing and does not move the cursor); rows_kept says the task
-- rows stay because Realtime streams taskman.tasks. A given-up notification does not
-- keep its task: only one still to be delivered does.
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
revoke all on function taskman.prune_finished_tasks from public, anon, authenticated;
grant execute on function taskman.prune_finished_tasks to service_role;

-- One batch of host retention: hosts idle for older_than (closed, no rate limit, no
-- pause or resume pace in force; the next poll of one makes its row again), and host
-- alerts delivered or given up that long ago. Arguments as prune_finished_tasks';
-- returns how many of each went (or would go, with dry_run, which counts everything
-- and deletes nothing).
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
revoke all on function taskman.prune_idle_hosts from public, anon, authenticated;
grant execute on function taskman.prune_idle_hosts to service_role;
