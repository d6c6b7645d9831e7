-- Local development seed (`supabase db reset`): one task that waits for a
-- callback, so a fresh project shows something. Built-in response profiles are
-- created by the migrations, not here.
select taskman.create_task(
  task_type => 'generic',
  external_id => 'seed-example',
  metadata => '{"source": "supabase/seed.sql"}'
);
