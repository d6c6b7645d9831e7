-- Supabase Realtime: frontends follow their tasks live. A new install uses Realtime
-- Broadcast (the mode Supabase recommends for scale and security): each insert and
-- visible change is sent with realtime.send (Broadcast from the database) as the task
-- JSON, on the private topic `taskman:tasks:<owner's user id>`, which only that owner may
-- receive (a policy on realtime.messages, made by set_realtime_mode). Deletes send
-- nothing, so retention deletes whole tasks. In changes mode (set_realtime_mode('changes'))
-- taskman.tasks is in the supabase_realtime publication instead (Postgres Changes; RLS
-- filters what each subscriber receives), and retention keeps the task rows (Realtime
-- would send each deleted row to every subscriber). Polls with no news write no task row,
-- so they send nothing either way. realtime.send never raises (it turns a failure into a
-- warning), so a broadcast that cannot be sent never fails the worker's batch.
-- Without Supabase Realtime (plain PostgreSQL; sql/supabase_compat.sql makes an empty
-- supabase_realtime publication) the mode is none: nothing carries task changes and
-- retention deletes whole tasks. A database upgraded from a version whose default was
-- Postgres Changes keeps the mode it had; the end of this file states a new install.

-- Whether supabase_realtime carries taskman.tasks (listed, by schema, or all tables).
create or replace function taskman_private.tasks_in_realtime_publication()
returns boolean
language sql stable
set search_path = ''
as $$
  select exists (select 1 from pg_catalog.pg_publication_tables p
                 where p.pubname = 'supabase_realtime' and p.schemaname = 'taskman'
                   and p.tablename = 'tasks')
$$;
revoke all on function taskman_private.tasks_in_realtime_publication from public, anon, authenticated;
grant execute on function taskman_private.tasks_in_realtime_publication to service_role;

-- Whether Supabase Realtime streams taskman.tasks (Realtime installed and the table
-- published): then retention keeps the task rows.
create or replace function taskman_private.realtime_streams_tasks()
returns boolean
language sql stable
set search_path = ''
as $$
  select pg_catalog.to_regclass('realtime.subscription') is not null
     and taskman_private.tasks_in_realtime_publication()
$$;
revoke all on function taskman_private.realtime_streams_tasks from public, anon, authenticated;
grant execute on function taskman_private.realtime_streams_tasks to service_role;

-- Realtime drops a Broadcast message over its payload limit (256 KB on the smallest
-- plans): a larger task is sent without its result, marked result_omitted, and the
-- client reads the result with get_task_status.
create or replace function taskman_private.broadcast_task_changes()
returns trigger
language plpgsql volatile security definer
set search_path = ''
as $$
begin
  perform realtime.send(
    case when octet_length(j.task::text) > 250000
         then (j.task - 'result') || '{"result_omitted": true}' else j.task end,
    tg_op, 'taskman:tasks:' || coalesce(j.user_id::text, 'service'), true)
  from (select taskman.task_json(t) as task, t.user_id from changed_tasks t) j;
  return null;
end
$$;
revoke all on function taskman_private.broadcast_task_changes from public, anon, authenticated;

create or replace function taskman.realtime_mode()
returns text
language sql stable security invoker
set search_path = ''
as $$
  select case
    when exists (select 1 from pg_catalog.pg_trigger g
                 where g.tgrelid = 'taskman.tasks'::regclass
                   and g.tgname = 'tasks_broadcast_inserts') then 'broadcast'
    when taskman_private.tasks_in_realtime_publication() then 'changes'
    else 'none'
  end
$$;
revoke all on function taskman.realtime_mode from public, anon, authenticated;
grant execute on function taskman.realtime_mode to service_role;
comment on function taskman.realtime_mode is
  'How Realtime carries task changes: changes (Postgres Changes), broadcast or none.';

-- Taskman's Realtime topics (`taskman:…`) are read only by their owner and written only by
-- Taskman, whatever permissive policies the project has on realtime.messages.
--
-- Policies on a table are permissive by default and any one of them lets a row through:
-- a project that also follows Supabase's Broadcast guide ("authenticated users can
-- receive / send broadcasts", `using (true)` / `with check (true)`) let any signed-in
-- user join another owner's task topic, and send a forged message on it. Restrictive
-- policies are ANDed with all the others. For anon and authenticated (the roles clients
-- use, through PostgREST and Realtime's channel checks alike):
-- - a row on a `taskman:` topic is seen only on its owner's topic
--   (`taskman:tasks:<auth.uid()>`); no one else's permissive policy widens that;
-- - no row on a `taskman:` topic is inserted, changed or deleted: Taskman's broadcasts
--   are sent by its own trigger function (security definer), not by those roles.
-- Other topics are left to the project's own policies. Like the permissive policy that
-- lets an owner receive their topic, they exist in broadcast mode: made by
-- set_realtime_mode('broadcast'), dropped by set_realtime_mode('changes').
create or replace function taskman_private.restrict_realtime_topics()
returns void
language plpgsql volatile
set search_path = ''
as $$
begin
  if not exists (select 1 from pg_catalog.pg_policies
                 where schemaname = 'realtime' and tablename = 'messages'
                   and policyname = 'Taskman topics: read by their owner, written by Taskman') then
    -- FOR ALL: its USING bounds what is read (and what an update or delete may touch),
    -- its WITH CHECK what is written.
    create policy "Taskman topics: read by their owner, written by Taskman" on realtime.messages
      as restrictive for all to anon, authenticated
      using (not starts_with(topic, 'taskman:')
             or topic = 'taskman:tasks:' || (select auth.uid())::text)
      with check (not starts_with(topic, 'taskman:'));
  end if;
  if not exists (select 1 from pg_catalog.pg_policies
                 where schemaname = 'realtime' and tablename = 'messages'
                   and policyname = 'Taskman topics: deleted by Taskman only') then
    create policy "Taskman topics: deleted by Taskman only" on realtime.messages
      as restrictive for delete to anon, authenticated
      using (not starts_with(topic, 'taskman:'));
  end if;
end
$$;
revoke all on function taskman_private.restrict_realtime_topics from public, anon, authenticated;

-- Switch how Realtime carries task changes: 'changes' (taskman.tasks in supabase_realtime;
-- retention keeps task rows) or 'broadcast' (realtime.send on a private topic per owner;
-- retention deletes whole tasks; the policies on realtime.messages that let an owner
-- receive their topic and keep Taskman's topics to their owners come with it, and go
-- with it). Returns the mode now in force; the same mode again changes nothing.
create or replace function taskman.set_realtime_mode(mode text)
returns text
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  listed boolean := exists (select 1 from pg_catalog.pg_publication_rel r
                            join pg_catalog.pg_publication p on p.oid = r.prpubid
                            where p.pubname = 'supabase_realtime'
                              and r.prrelid = 'taskman.tasks'::regclass);
begin
  if mode is null or mode not in ('changes', 'broadcast') then
    perform taskman_private.reject('mode', 'must be changes or broadcast');
  end if;

  if mode = 'broadcast' then
    if pg_catalog.to_regprocedure('realtime.send(jsonb,text,text,boolean)') is null then
      perform taskman_private.reject('mode',
        'broadcast needs Supabase Realtime (realtime.send), which this database does not have');
    end if;
    if exists (select 1 from pg_catalog.pg_publication
               where pubname = 'supabase_realtime' and (puballtables or exists (
                 select 1 from pg_catalog.pg_publication_namespace n
                 where n.pnpubid = pg_publication.oid
                   and n.pnnspid = 'taskman'::regnamespace))) then
      perform taskman_private.reject('mode',
        'supabase_realtime publishes every table (or all of schema taskman), so taskman.tasks '
        'cannot leave it: list its tables one by one first');
    end if;
    if not exists (select 1 from pg_catalog.pg_trigger g
                   where g.tgrelid = 'taskman.tasks'::regclass
                     and g.tgname = 'tasks_broadcast_inserts') then
      create trigger tasks_broadcast_inserts after insert on taskman.tasks
        referencing new table as changed_tasks
        for each statement execute function taskman_private.broadcast_task_changes();
      create trigger tasks_broadcast_updates after update on taskman.tasks
        referencing new table as changed_tasks
        for each statement execute function taskman_private.broadcast_task_changes();
    end if;
    perform taskman_private.restrict_realtime_topics();
    if not exists (select 1 from pg_catalog.pg_policies
                   where schemaname = 'realtime' and tablename = 'messages'
                     and policyname = 'Owners receive their tasks'' changes') then
      create policy "Owners receive their tasks' changes" on realtime.messages
        for select to authenticated
        using (extension = 'broadcast'
               and topic = 'taskman:tasks:' || (select auth.uid())::text);
    end if;
    if listed then
      alter publication supabase_realtime drop table taskman.tasks;
      -- Retention walks finished tasks again: the rows it kept can go now.
      update taskman_private.retention_state
      set pruned_through = '-infinity', pruned_through_id = '00000000-0000-0000-0000-000000000000';
    end if;
  else
    if not exists (select 1 from pg_catalog.pg_publication where pubname = 'supabase_realtime') then
      perform taskman_private.reject('mode',
        'changes needs the supabase_realtime publication, which this database does not have');
    end if;
    drop trigger if exists tasks_broadcast_inserts on taskman.tasks;
    drop trigger if exists tasks_broadcast_updates on taskman.tasks;
    if pg_catalog.to_regclass('realtime.messages') is not null then
      drop policy if exists "Owners receive their tasks' changes" on realtime.messages;
      drop policy if exists "Taskman topics: read by their owner, written by Taskman" on realtime.messages;
      drop policy if exists "Taskman topics: deleted by Taskman only" on realtime.messages;
    end if;
    if not taskman_private.tasks_in_realtime_publication() then
      alter publication supabase_realtime add table taskman.tasks;
    end if;
  end if;
  return taskman.realtime_mode();
end
$$;
revoke all on function taskman.set_realtime_mode from public, anon, authenticated;
grant execute on function taskman.set_realtime_mode to service_role;

-- A new install: Broadcast where Supabase Realtime can send it. Where set_realtime_mode
-- refuses it, Postgres Changes when Realtime is there (the only way task changes reach
-- frontends then), else none: taskman.tasks stays out of supabase_realtime.
do $$
begin
  perform taskman.set_realtime_mode('broadcast');
exception when invalid_parameter_value then
  if pg_catalog.to_regclass('realtime.subscription') is not null then
    perform taskman.set_realtime_mode('changes');
  end if;
end
$$;
