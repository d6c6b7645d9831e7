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

-- name: live_tasks_remain
-- One look at the due index (a live task has a next poll; a leased one too): cheap
-- however many tasks have ended, unlike counting them.
select exists (select 1 from taskman_private.task_schedule where next_poll_at is not null)

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

-- name: fill_schedule
-- The worker's side of the loaded tasks, as the insert trigger would make it.
insert into taskman_private.task_schedule (task_id, next_poll_at)
select t.task_id, t.next_poll_at from taskman.tasks t
where not exists (select 1 from taskman_private.task_schedule s where s.task_id = t.task_id)

-- name: analyze_schedule
vacuum analyze taskman_private.task_schedule

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

-- The bare SKIP LOCKED loop the hot path is compared with (bench.hot_path): a narrow
-- table, one index on the due time, the same claim-and-reschedule statements.

-- name: bare_create
create table bare_jobs (
  id bigint generated always as identity primary key,
  due timestamptz not null default now(),
  lease text,
  attempts integer not null default 0
);
create index bare_jobs_due_idx on bare_jobs (due)

-- name: bare_fill
insert into bare_jobs (due) select now() from generate_series(1, %(count)s)

-- name: bare_truncate
truncate bare_jobs

-- name: bare_claim
update bare_jobs j set lease = 'bench', due = now() + interval '60 seconds'
from (select id from bare_jobs where due <= now() order by due
      limit %(batch)s for update skip locked) d
where j.id = d.id
returning j.id

-- name: bare_reschedule
update bare_jobs set lease = null, due = now(), attempts = attempts + 1
where id = any(%(ids)s::bigint[])

-- name: bare_finish
delete from bare_jobs where id = any(%(ids)s::bigint[])

-- name: floor_claim
-- The least a claim does in Taskman's data model: lease a batch of due schedule rows
-- (priority 0). No admission, no profiles, no task rows read.
update taskman_private.task_schedule s
set lease_owner = 'floor', lease_expires_at = now() + interval '60 seconds',
    next_poll_at = now() + interval '60 seconds'
where s.task_id = any(array(
  select x.task_id from taskman_private.task_schedule x
  where x.priority = 0 and x.next_poll_at <= now()
  order by x.next_poll_at limit %(batch)s for update skip locked))
returning s.task_id

-- name: floor_finish
-- The least a completion writes in Taskman's data model: the public row once (status,
-- result, the poll figures), the schedule row off the due index, and the transition's
-- one event. Run with taskman.poll_writer on, so the row triggers leave it to this
-- statement; no outcome JSON, raw answer, poll event, host report or lease check.
with finished as (
  update taskman.tasks t
  set status = 'completed', result = '{"ok": true}', progress = 100, completed_at = now(),
      updated_at = now(), attempt_count = t.attempt_count + 1, last_polled_at = now(),
      next_poll_at = null
  where t.task_id = any(%(ids)s::uuid[])
  returning t.task_id, t.user_id
),
unscheduled as (
  update taskman_private.task_schedule s
  set next_poll_at = null, lease_owner = null, lease_expires_at = null,
      attempt_count = s.attempt_count + 1, last_polled_at = now(), last_http_status = 200
  where s.task_id = any(%(ids)s::uuid[])
)
insert into taskman.task_events (task_id, user_id, event_type, from_status, to_status, detail)
select f.task_id, f.user_id, 'status_changed', 'pending', 'completed', '{}' from finished f

-- name: duplicate_polls
-- Polls beyond each task's first (tasks that complete on their first poll).
select coalesce(sum(greatest(s.attempt_count - 1, 0)), 0)::bigint
from taskman_private.task_schedule s

-- Retention while finished tasks wait for their notifications (bench.retention_waiting).

-- name: wait_for_notifications
-- Every finished task: ended 40 days ago, a callback still pending, passed by the
-- retention cursor (as a round leaves them).
update taskman.tasks set completed_at = now() - interval '40 days' where completed_at is not null;
insert into taskman_private.outbox (task_id, channel, payload)
select task_id, 'callback', '{}' from taskman.tasks;
update taskman_private.retention_state
set (pruned_through, pruned_through_id) = (
  select completed_at, task_id from taskman.tasks order by completed_at desc, task_id desc
  limit 1);
insert into taskman_private.retention_deferred (task_id) select task_id from taskman.tasks

-- name: age_new_finished_tasks
-- The tasks fill_tasks just made reached the period since the last round (after those
-- waiting, before the period's end).
update taskman.tasks set completed_at = now() - interval '35 days'
where completed_at > now() - interval '1 day'
