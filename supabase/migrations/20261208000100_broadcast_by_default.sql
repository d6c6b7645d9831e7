-- A new install carries task changes by Realtime Broadcast (private topic per owner; the
-- mode Supabase recommends for scale and security, in which retention deletes whole
-- tasks), as set_realtime_mode('broadcast') makes it. A database upgraded from an earlier
-- version keeps the mode it has: its frontends subscribe the way that mode needs.
--
-- New install or upgrade? Each migration runs in a transaction of its own (taskman migrate
-- and the Supabase CLI alike), so nothing says "this run began on an empty database": the
-- database's own contents must tell. Every way a task is made (create_task or an insert
-- through PostgREST) writes its 'created' event, and the identity sequence of
-- taskman.task_events.event_id only moves forward: retention deleting every task and its
-- history leaves it where it was, and even a rolled-back create moves it. So its is_called
-- still false (and no task row) means no task was ever created here: no frontend has a
-- task to follow yet. A database that created even one task, however long ago, is an
-- upgrade and keeps its mode. (An earlier install whose frontends already subscribe by
-- Postgres Changes but that never made a task is switched too: `taskman realtime
-- changes` switches it back.)
--
-- Where Broadcast cannot be had (set_realtime_mode refuses it: no realtime.send, or a
-- supabase_realtime that publishes every table or all of schema taskman):
-- - without Supabase Realtime at all (plain PostgreSQL, no realtime.subscription),
--   taskman.tasks leaves supabase_realtime when listed there by name (the publication
--   sql/supabase_compat.sql makes only so that the migrations run), and the mode reads
--   'none': nothing carries task changes and retention deletes whole tasks, both as
--   before (no Realtime streamed the table). Should the database later gain Realtime,
--   it gets no Postgres Changes cost unasked: `taskman realtime broadcast` (or
--   `changes`) chooses;
-- - with a Realtime that cannot send, or a publication that cannot let taskman.tasks go,
--   the mode stays 'changes', the only way task changes reach frontends there; a notice
--   says why.
do $$
begin
  if (select s.is_called from taskman.task_events_event_id_seq s)
     or exists (select 1 from taskman.tasks) then
    return;
  end if;
  begin
    perform taskman.set_realtime_mode('broadcast');
  exception when invalid_parameter_value then
    if pg_catalog.to_regclass('realtime.subscription') is null and exists (
         select 1 from pg_catalog.pg_publication_rel r
         join pg_catalog.pg_publication p on p.oid = r.prpubid
         where p.pubname = 'supabase_realtime' and r.prrelid = 'taskman.tasks'::regclass) then
      alter publication supabase_realtime drop table taskman.tasks;
    end if;
    raise notice 'Realtime mode: % (%)', taskman.realtime_mode(), sqlerrm;
  end;
end
$$;
