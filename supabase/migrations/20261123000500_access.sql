-- Who may do what, with Supabase's roles. Supabase grants anon and
-- authenticated everything in public by default; we revoke and grant back only
-- what each role needs, and RLS scopes rows to their owner.
--   anon:          nothing (update_task with a callback token is granted later).
--   authenticated: creates its own tasks, reads its own tasks and events,
--                  edits its own tasks' metadata; status, results and counters
--                  change only through the RPC functions.
--   service_role:  everything (BYPASSRLS).
-- The seed's "anyone can read tasks" policy is deliberately not copied.

revoke all on public.tasks, public.task_events, public.response_profiles from anon, authenticated, public;
grant select, insert on public.tasks to authenticated;
grant update (metadata) on public.tasks to authenticated;
grant select on public.task_events to authenticated;
grant select on public.response_profiles to authenticated;
grant all on public.tasks, public.task_events, public.response_profiles to service_role;

revoke all on all tables in schema taskman_private from anon, authenticated, public;
revoke all on all functions in schema taskman_private from anon, authenticated, public;
grant usage on schema taskman_private to service_role;
grant select, insert, update, delete on all tables in schema taskman_private to service_role;

revoke all on function public.task_json from public, anon, authenticated;
grant execute on function public.task_json to authenticated, service_role;

alter table public.tasks enable row level security;
alter table public.task_events enable row level security;
alter table public.response_profiles enable row level security;
alter table taskman_private.task_private enable row level security;
alter table taskman_private.outbox enable row level security;

-- (select auth.uid()) is evaluated once per statement rather than per row.
create policy "Owners read their tasks" on public.tasks
  for select to authenticated using (user_id = (select auth.uid()));
create policy "Users create tasks they own" on public.tasks
  for insert to authenticated with check (user_id = (select auth.uid()));
create policy "Owners edit their tasks' metadata" on public.tasks
  for update to authenticated
  using (user_id = (select auth.uid())) with check (user_id = (select auth.uid()));

create policy "Owners read their tasks' events" on public.task_events
  for select to authenticated using (user_id = (select auth.uid()));

create policy "Signed-in users read response profiles" on public.response_profiles
  for select to authenticated using (true);
