-- The insert policy of taskman.tasks reads taskman.task_creator once a statement, not once
-- a row (an init plan, as auth.uid() already is): the same rule, and what Supabase's
-- Performance Advisor asks of every policy (auth_rls_initplan).
alter policy "Users create tasks they own" on taskman.tasks
  with check (user_id = (select auth.uid())
              and (select current_setting('taskman.task_creator', true)) is distinct from 'on');
