-- Taskman's objects in a schema of their own, taskman, so that it installs into any
-- Supabase project beside that project's own `tasks` table or `create_task` function.
-- Clients reach it as supabase.schema('taskman') once the schema is exposed (README).
--
-- The earlier migrations create everything in taskman on a fresh database. This one
-- moves a database that ran them when they still created Taskman's objects in public:
-- ALTER ... SET SCHEMA keeps rows, indexes, policies, triggers, grants, comments and
-- the Realtime publication entry. Function bodies are stored as text, so every
-- function of Taskman's is re-created with its references to the moved objects
-- rewritten. Only Taskman's own objects move: its tasks table is the one that fires
-- taskman_private.tasks_prepare_insert, and its functions are named by signature.

create schema if not exists taskman;
comment on schema taskman is
  'Taskman: tasks, their history, response profiles and the RPC functions clients call.';
grant usage on schema taskman to anon, authenticated, service_role;

do $$
declare
  functions oid[];
  fn oid;
  definition text;
  rewritten text;
begin
  if not exists (
    select 1 from pg_catalog.pg_trigger tg
    where tg.tgrelid = to_regclass('public.tasks')
      and tg.tgfoid = 'taskman_private.tasks_prepare_insert'::regproc
  ) then
    return;  -- created in taskman already
  end if;

  -- Looked up before the tables move: task_json's argument type is public.tasks until then.
  select array_agg(to_regprocedure(signature)) into functions
  from unnest(array[
    'public.task_json(public.tasks)',
    'public.create_task(text, text, text, text, jsonb, jsonb, jsonb, integer, integer, integer, text, text, jsonb)',
    'public.get_task_status(uuid)',
    'public.update_task(uuid, text, jsonb, text, integer, text, text)',
    'public.cancel_task(uuid)',
    'public.retry_task(uuid)',
    'public.task_stats(timestamptz)',
    'public.claim_due_tasks(text, integer, integer)',
    'public.record_poll_results(jsonb)',
    'public.expire_overdue_tasks()',
    'public.release_tasks(text)',
    'public.claim_outbox(text, integer, integer)',
    'public.record_outbox_results(jsonb, integer, double precision, double precision)',
    'public.callback_profile(uuid, text)'
  ]) as signature;

  alter table public.response_profiles set schema taskman;
  alter table public.tasks set schema taskman;
  alter table public.task_events set schema taskman;
  foreach fn in array functions loop
    execute format('alter function %s set schema taskman', fn::regprocedure);
  end loop;

  for fn in
    select p.oid from pg_catalog.pg_proc p
    where p.pronamespace in ('taskman'::regnamespace, 'taskman_private'::regnamespace)
  loop
    definition := pg_catalog.pg_get_functiondef(fn);
    rewritten := regexp_replace(definition,
      '\mpublic\.(tasks|task_events|response_profiles|task_json|create_task|get_task_status'
      '|update_task|cancel_task|retry_task|task_stats|claim_due_tasks|record_poll_results'
      '|expire_overdue_tasks|release_tasks|claim_outbox|record_outbox_results'
      '|callback_profile)\M',
      'taskman.\1', 'g');
    if rewritten <> definition then
      execute rewritten;
    end if;
  end loop;
end
$$;

-- Supabase's default privileges in public had given the API roles every right on the
-- history's sequence (setval could stop every write); they need none.
revoke all on all sequences in schema taskman from anon, authenticated, public;
