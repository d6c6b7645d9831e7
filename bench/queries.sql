-- Named queries of the benchmarks.

-- name: workers_listening
select count(*) from pg_stat_activity
where datname = current_database() and application_name = 'taskman-worker-listen'

-- name: create_due_tasks
-- Through the triggers, as clients create tasks: one statement, so one commit.
insert into taskman.tasks (poll_url)
select %(base_url)s || '/status/' || i from generate_series(1, %(count)s) as i

-- name: create_task
insert into taskman.tasks (poll_url) values (%(poll_url)s) returning task_id

-- name: delete_tasks
-- Between measurements: start from an empty table (history goes with the tasks).
delete from taskman.tasks

-- name: count_completed
select count(*) from taskman.tasks where status = 'completed'

-- name: fill_tasks
-- Bulk rows shaped as the task triggers would leave them (loaded with triggers
-- off: loading is not what is measured): `terminal` finished tasks, `due` live
-- tasks due now, `future` live tasks due in an hour.
insert into taskman.tasks (task_id, user_id, status, task_type, poll_url, poll_method, poll_config,
                          poll_interval_seconds, attempt_count, error_count, max_attempts,
                          timeout_minutes, deadline_at, next_poll_at, metadata, created_at,
                          updated_at, completed_at, result, error_code)
select gen_random_uuid(), gen_random_uuid(), s.status, 'generic',
       'https://api.example.com/status/' || i, 'GET', '{}', 30,
       case when s.finished then 1 else 0 end, 0, 10, 120, now() + interval '2 hours',
       case when s.finished then null
            when i <= %(terminal)s + %(due)s then now() - interval '1 minute' * random()
            else now() + interval '1 hour' end,
       '{}', now() - interval '1 day', now(),
       case when s.finished then now() end,
       case when s.status = 'completed' then '{"ok": true}'::jsonb end,
       case when s.status = 'failed' then 'remote_failed' end
from generate_series(1, %(terminal)s + %(due)s + %(future)s) as i
cross join lateral (
  select i <= %(terminal)s as finished,
         case when i <= %(terminal)s then (array['completed', 'failed', 'cancelled'])[1 + i %% 3]
              else 'pending' end as status
) as s

-- name: first_poll_recorded_ms
-- From a task's creation to its first poll being recorded, in milliseconds.
select percentile_cont(array[0.5, 0.99]) within group (
         order by extract(epoch from e.created_at - t.created_at) * 1000)
from taskman.tasks t
join lateral (select min(e.created_at) as created_at from taskman.task_events e
              where e.task_id = t.task_id and e.event_type = 'polled') e on true

-- name: triggers_off
-- Bulk loading only: skip the task triggers for this session.
set session_replication_role = replica

-- name: analyze_tasks
vacuum analyze taskman.tasks

-- name: create_due_tasks_every_second
-- As create_due_tasks, polled every second (the floor) while they have no news.
insert into taskman.tasks (poll_url, poll_interval_seconds)
select %(base_url)s || '/status/' || i, 1 from generate_series(1, %(count)s) as i

-- name: polls_made
select coalesce(sum(attempt_count), 0)::bigint from taskman.tasks
