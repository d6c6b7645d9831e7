-- Supabase Realtime: frontends subscribe to tasks with supabase-js, and RLS
-- filters what each subscriber receives.
do $$
begin
  if exists (select 1 from pg_publication where pubname = 'supabase_realtime')
     and not exists (select 1 from pg_publication_tables
                     where pubname = 'supabase_realtime' and schemaname = 'taskman'
                       and tablename = 'tasks') then
    alter publication supabase_realtime add table taskman.tasks;
  end if;
end
$$;
