-- Taskman's two schemas. taskman is the API: the tables clients read under RLS and the
-- functions they call (supabase.schema('taskman'), once exposed). taskman_private holds
-- what only the service and Taskman's own functions touch: secrets, raw remote payloads,
-- the schedule, the outbox, host state. It is never exposed through PostgREST.
--
-- The roles are Supabase's (anon, authenticated, service_role); on plain PostgreSQL,
-- sql/supabase_compat.sql creates them, with auth.uid() and the supabase_realtime
-- publication. Every function pins search_path = '' and names objects in full.
-- PostgreSQL lets PUBLIC execute a new function: each function here revokes that,
-- unless anyone may call it (the value tests of the check constraints), and grants
-- back only what each role needs.

create schema taskman;
comment on schema taskman is
  'Taskman: tasks, their history, response profiles and the RPC functions clients call.';
grant usage on schema taskman to anon, authenticated, service_role;

create schema taskman_private;
comment on schema taskman_private is
  'Taskman internals: secrets, raw remote payloads and the outbox. Never exposed through PostgREST.';
grant usage on schema taskman_private to anon, authenticated, service_role;
