-- Bulk rows shaped as the task triggers would leave them (loaded with triggers off).
insert into public.tasks (task_id, user_id, status, task_type, poll_url, poll_method, poll_config,
                          poll_interval_seconds, attempt_count, error_count, max_attempts,
                          timeout_minutes, deadline_at, next_poll_at, metadata, created_at,
                          updated_at, completed_at, result)
select gen_random_uuid(), gen_random_uuid(),
       case when i <= %(terminal)s then (array['completed', 'failed', 'cancelled'])[1 + i %% 3]
            else 'pending' end,
       'generic', 'https://api.example.com/status/' || i, 'GET', '{}', 30, 1, 0, 10, 120,
       now() + interval '2 hours',
       case when i <= %(terminal)s then null else now() - interval '1 minute' * random() end,
       '{}', now() - interval '1 day', now(), case when i <= %(terminal)s then now() end,
       case when i <= %(terminal)s then '{"ok": true}'::jsonb end
from generate_series(1, %(terminal)s + %(due)s) as i
