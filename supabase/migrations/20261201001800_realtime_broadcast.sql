-- Realtime by Broadcast, so that a Supabase project can follow tasks live and still
-- delete finished ones.
--
-- By default taskman.tasks is in the supabase_realtime publication (Postgres Changes), and
-- retention keeps the task rows there: Realtime would send each deleted row to every
-- subscriber (20261201001500). In broadcast mode the table leaves the publication and each
-- insert and visible change is sent instead with realtime.send (Realtime Broadcast from the
-- database) as the task JSON, on the private topic `taskman:tasks:<owner's user id>`,
-- which only that owner may receive (a policy on realtime.messages). Deletes send nothing,
-- so retention deletes whole tasks. Polls with no news write no task row, so they send
-- nothing either way. realtime.send never raises (it turns a failure into a warning), so
-- a broadcast that cannot be sent never fails the worker's batch.

-- Realtime drops a Broadcast message over its payload limit (256 KB on the smallest
-- plans): a larger task is sent without its result, marked result_omitted, and the
-- client reads the result with get_task_status.
create function taskman_private.broadcast_task_changes()
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

revoke all on function taskman_private.broadcast_task_changes() from public, anon, authenticated;

create function taskman.realtime_mode()
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

comment on function taskman.realtime_mode is
  'How Realtime carries task changes: changes (Postgres Changes), broadcast or none.';

-- Switch how Realtime carries task changes: 'changes' (taskman.tasks in supabase_realtime;
-- retention keeps task rows) or 'broadcast' (realtime.send on a private topic per owner;
-- retention deletes whole tasks). Returns the mode now in force; the same mode again
-- changes nothing.
create function taskman.set_realtime_mode(mode text)
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
    end if;
    if not taskman_private.tasks_in_realtime_publication() then
      alter publication supabase_realtime add table taskman.tasks;
    end if;
  end if;
  return taskman.realtime_mode();
end
$$;

revoke all on function taskman.realtime_mode() from public, anon, authenticated;
grant execute on function taskman.realtime_mode() to service_role;
revoke all on function taskman.set_realtime_mode(text) from public, anon, authenticated;
grant execute on function taskman.set_realtime_mode(text) to service_role;
