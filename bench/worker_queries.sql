-- Named queries of the worker benchmarks (bench/worker_*.py).

-- name: workers_listening
select count(*) from pg_stat_activity
where datname = current_database() and application_name = 'taskman-worker-listen'

-- name: create_due_tasks
-- Through the triggers, as clients create tasks: one statement, so one commit.
insert into public.tasks (poll_url)
select %(base_url)s || '/status/' || i from generate_series(1, %(count)s) as i

-- name: create_task
insert into public.tasks (poll_url) values (%(poll_url)s) returning task_id

-- name: count_completed
select count(*) from public.tasks where status = 'completed'

-- name: fill_future_tasks
-- Pending tasks not due for an hour, shaped as the triggers would leave them
-- (loaded with triggers off: loading is not what is measured).
insert into public.tasks (task_id, status, task_type, poll_url, poll_method, poll_config,
                          poll_interval_seconds, attempt_count, error_count, max_attempts,
                          timeout_minutes, deadline_at, next_poll_at, metadata, created_at,
                          updated_at)
select gen_random_uuid(), 'pending', 'generic', 'https://api.example.com/status/' || i, 'GET',
       '{}', 30, 0, 0, 10, 120, now() + interval '2 hours', now() + interval '1 hour', '{}',
       now(), now()
from generate_series(1, %(count)s) as i

-- name: first_poll_recorded_ms
-- From a task's creation to its first poll being recorded, in milliseconds.
select percentile_cont(array[0.5, 0.99]) within group (
         order by extract(epoch from e.created_at - t.created_at) * 1000)
from public.tasks t
join lateral (select min(e.created_at) as created_at from public.task_events e
              where e.task_id = t.task_id and e.event_type = 'polled') e on true

-- name: triggers_off
-- Bulk loading only: skip the task triggers for this session.
set session_replication_role = replica

-- name: analyze_tasks
vacuum analyze public.tasks
