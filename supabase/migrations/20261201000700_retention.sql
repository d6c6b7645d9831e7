-- Retention of finished tasks' service-side data, in small batches.
--
-- taskman.tasks is in the supabase_realtime publication, and Realtime sends every
-- DELETE on a published table to every subscriber (RLS cannot filter a deleted row).
-- So retention does not delete task rows one by one: it deletes, for finished tasks
-- older than the retention period, everything that is not published and holds the
-- bulk of a task's storage: its history (taskman.task_events), its private row
-- (secrets, raw answers), its schedule row, and its delivered notifications. A task
-- with a notification not yet delivered (still retrying, or given up) keeps
-- everything. The task rows themselves stay (README: Retention).
--
-- Batches walk finished tasks by (completed_at, task_id) from a cursor kept in
-- taskman_private.retention_state, so each batch costs the same however much has
-- been pruned, and holds its locks for one short transaction, skipping rows others
-- have locked. A task whose notification is still undelivered when the cursor passes
-- it (given up, or still retrying after the whole retention period) keeps its data:
-- `taskman notifications` lists those.

create index tasks_finished_idx on taskman.tasks (completed_at, task_id)
  where status in ('completed', 'failed', 'cancelled');

create table taskman_private.retention_state (
  id boolean primary key default true constraint retention_state_one_row check (id),
  pruned_through timestamptz not null default '-infinity',
  pruned_through_id uuid not null default '00000000-0000-0000-0000-000000000000'
);
insert into taskman_private.retention_state default values;
alter table taskman_private.retention_state enable row level security;
revoke all on taskman_private.retention_state from public, anon, authenticated;
grant select, insert, update, delete on taskman_private.retention_state to service_role;

-- One batch: up to batch_size finished tasks that ended before now() - older_than,
-- past the cursor. Returns how many rows of each kind went (or would go, with
-- dry_run, which changes nothing and does not move the cursor).
create function taskman.prune_finished_tasks(older_than interval, batch_size integer default 200,
                                            dry_run boolean default false)
returns table (tasks bigint, events bigint, private_rows bigint, schedule_rows bigint,
               outbox_rows bigint, done boolean)
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  cursor_at timestamptz;
  cursor_id uuid;
  ids uuid[];
  last_at timestamptz;
  last_id uuid;
  n_tasks bigint;
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

  with batch as (
    select t.task_id, t.completed_at
    from taskman.tasks t
    where t.status in ('completed', 'failed', 'cancelled')
      and t.completed_at < now() - older_than
      and (t.completed_at, t.task_id) > (cursor_at, cursor_id)
    order by t.completed_at, t.task_id
    limit case when dry_run then null else batch_size end
    for share of t skip locked
  )
  select array_agg(b.task_id order by b.completed_at, b.task_id),
         (array_agg(b.completed_at order by b.completed_at desc, b.task_id desc))[1],
         (array_agg(b.task_id order by b.completed_at desc, b.task_id desc))[1]
  into ids, last_at, last_id
  from batch b;

  if ids is null then
    return query select 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint, true;
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
    return query select n_tasks, n_events, n_private, n_schedule, n_outbox, true;
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

  update taskman_private.retention_state
  set pruned_through = last_at, pruned_through_id = last_id;

  return query select n_tasks, n_events, n_private, n_schedule, n_outbox,
                      false;
end
$$;

revoke all on function taskman.prune_finished_tasks from public, anon, authenticated;
grant execute on function taskman.prune_finished_tasks to service_role;
