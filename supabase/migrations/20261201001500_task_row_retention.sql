-- Retention deletes the rows of finished tasks too, unless Supabase Realtime streams
-- taskman.tasks.
--
-- Supabase Realtime's postgres_changes sends every DELETE of a table it streams to every
-- subscriber of that table (primary key only: RLS cannot check a row that is gone). So
-- while taskman.tasks is in the supabase_realtime publication of a Supabase project (the
-- `realtime` schema is there), the task rows stay, as before, and only their history and
-- service-side rows go. Anywhere else (plain PostgreSQL, where sql/supabase_compat.sql
-- creates an empty supabase_realtime publication only so the migrations run unchanged, or
-- a Supabase project with taskman.tasks taken out of the publication) a finished task
-- past the retention period goes whole, in the same small batches.
--
-- Partitioning taskman.tasks by time and dropping old partitions would avoid the DELETEs,
-- but Realtime decodes changes with wal2json, which names a partition's changes after the
-- partition, not the partitioned table, and Realtime matches subscriptions by that name:
-- subscribers of taskman.tasks would receive nothing at all (README: Retention).

-- Whether supabase_realtime carries taskman.tasks (listed, by schema, or all tables).
create function taskman_private.tasks_in_realtime_publication()
returns boolean
language sql stable
set search_path = ''
as $$
  select exists (select 1 from pg_catalog.pg_publication_tables p
                 where p.pubname = 'supabase_realtime' and p.schemaname = 'taskman'
                   and p.tablename = 'tasks')
$$;

create function taskman_private.realtime_streams_tasks()
returns boolean
language sql stable
set search_path = ''
as $$
  select pg_catalog.to_regclass('realtime.subscription') is not null
     and taskman_private.tasks_in_realtime_publication()
$$;

revoke all on function taskman_private.tasks_in_realtime_publication(),
  taskman_private.realtime_streams_tasks() from public, anon, authenticated;
grant execute on function taskman_private.tasks_in_realtime_publication(),
  taskman_private.realtime_streams_tasks() to service_role;

drop function taskman.prune_finished_tasks(interval, integer, boolean);

-- One batch: up to batch_size finished tasks that ended before now() - older_than, past
-- the cursor. Returns how many tasks, and how many rows of each kind, went (or would go,
-- with dry_run, which changes nothing and does not move the cursor); rows_kept says the
-- task rows stay because Realtime streams taskman.tasks.
create function taskman.prune_finished_tasks(older_than interval, batch_size integer default 200,
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
  last_at timestamptz;
  last_id uuid;
  n_tasks bigint;
  n_rows bigint := 0;
  n_events bigint;
  n_private bigint;
  n_schedule bigint;
  n_outbox bigint;
begin
  if older_than is null or older_than < interval '0' then
    perform taskman_private.reject('older_than', 'must be a non-negative interval');
  end if;
  if batch_size is null or batch_size not between 1 and 10000 then
    perform taskman_private.reject('batch_size', 'must be between 1 and 10000');
  end if;

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

  if ids is null then
    return query select 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint,
                        keep_rows, true;
    return;
  end if;

  -- Tasks whose notifications are not all delivered keep everything.
  ids := array(
    select i from unnest(ids) as i
    where not exists (select 1 from taskman_private.outbox o
                      where o.task_id = i and o.delivered_at is null));
  n_tasks := cardinality(ids);

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
                where o.task_id = any(ids) and o.delivered_at is not null returning 1)
  select count(*) into n_outbox from gone;
  if not keep_rows then
    with gone as (delete from taskman.tasks t where t.task_id = any(ids) returning 1)
    select count(*) into n_rows from gone;
  end if;

  update taskman_private.retention_state
  set pruned_through = last_at, pruned_through_id = last_id;

  return query select n_tasks, n_rows, n_events, n_private, n_schedule, n_outbox, keep_rows,
                      false;
end
$$;

revoke all on function taskman.prune_finished_tasks from public, anon, authenticated;
grant execute on function taskman.prune_finished_tasks to service_role;
