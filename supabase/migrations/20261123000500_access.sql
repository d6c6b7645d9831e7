-- Who may do what, with Supabase's roles. We revoke everything (Supabase grants
-- the API roles everything in public by default, where these objects once were)
-- and grant back only what each role needs; RLS scopes rows to their owner.
--   anon:          nothing (update_task with a callback token is granted later).
--   authenticated: creates its own tasks, reads its own tasks and events,
--                  edits its own tasks' metadata; status, results and counters
--                  change only through the RPC functions.
--   service_role:  everything (BYPASSRLS).
-- The seed's "anyone can read tasks" policy is deliberately not copied.

revoke all on taskman.tasks, taskman.task_events, taskman.response_profiles from anon, authenticated, public;
grant select, insert on taskman.tasks to authenticated;
grant update (metadata) on taskman.tasks to authenticated;
grant select on taskman.task_events to authenticated;
grant select on taskman.response_profiles to authenticated;
grant all on taskman.tasks, taskman.task_events, taskman.response_profiles to service_role;
grant all on all sequences in schema taskman to service_role;

revoke all on all tables in schema taskman_private from anon, authenticated, public;
revoke all on all functions in schema taskman_private from anon, authenticated, public;
grant usage on schema taskman_private to service_role;
grant select, insert, update, delete on all tables in schema taskman_private to service_role;

revoke all on function taskman.task_json from public, anon, authenticated;
grant execute on function taskman.task_json to authenticated, service_role;

alter table taskman.tasks enable row level security;
alter table taskman.task_events enable row level security;
alter table taskman.response_profiles enable row level security;
alter table taskman_private.task_private enable row level security;
alter table taskman_private.outbox enable row level security;

-- (select auth.uid()) is evaluated once per statement rather than per row.
create policy "Owners read their tasks" on taskman.tasks
  for select to authenticated using (user_id = (select auth.uid()));
create policy "Users create tasks they own" on taskman.tasks
  for insert to authenticated with check (user_id = (select auth.uid()));
create policy "Owners edit their tasks' metadata" on taskman.tasks
  for update to authenticated
  using (user_id = (select auth.uid())) with check (user_id = (select auth.uid()));

create policy "Owners read their tasks' events" on taskman.task_events
  for select to authenticated using (user_id = (select auth.uid()));

create policy "Signed-in users read response profiles" on taskman.response_profiles
  for select to authenticated using (true);
