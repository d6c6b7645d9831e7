-- Named queries of bench.task_stats.

-- name: history
-- Finished tasks first..last (loaded with triggers off: loading is not what is
-- measured), created evenly over the 8 days before now, owned in turn by `owners` users,
-- each ending `i %% 997` seconds to an hour after its creation: 80%% completed, 15%%
-- failed, 5%% cancelled.
insert into taskman.tasks (task_id, user_id, status, task_type, poll_url, poll_method, poll_config,
                          poll_interval_seconds, attempt_count, error_count, max_attempts,
                          timeout_minutes, deadline_at, metadata, created_at, updated_at,
                          completed_at, error_code)
select gen_random_uuid(), md5('taskman-bench-owner-' || i %% %(owners)s)::uuid, s.status,
       'generic', 'https://api.example.com/status/' || i, 'GET', '{}', 30, 1, 0, 10, 120,
       c.at + interval '2 hours', '{}', c.at, c.at + d.took, c.at + d.took,
       case when s.status = 'failed' then 'remote_failed' end
from generate_series(%(first)s::bigint, %(last)s::bigint) as i
cross join lateral (select now() - interval '8 days' * (i * 0.6180339887 %% 1) as at) c
cross join lateral (select make_interval(secs => (i %% 997) * 3.6 * random() + 0.05) as took) d
cross join lateral (select case when i %% 20 < 16 then 'completed' when i %% 20 < 19 then 'failed'
                                else 'cancelled' end as status) s

-- name: live
-- `live` tasks waiting for their first poll, created over the last hour.
insert into taskman.tasks (task_id, user_id, status, task_type, poll_url, poll_method, poll_config,
                          poll_interval_seconds, attempt_count, error_count, max_attempts,
                          timeout_minutes, deadline_at, metadata, created_at, updated_at)
select gen_random_uuid(), md5('taskman-bench-owner-' || i %% %(owners)s)::uuid, 'pending',
       'generic', 'https://api.example.com/status/' || i, 'GET', '{}', 30, 0, 0, 10, 120,
       now() + interval '2 hours', '{}', now() - interval '1 hour' * random(), now()
from generate_series(1, %(live)s) as i

-- name: recount
-- The rollups rebuilt from every finished task, as the upgrade counts them (its
-- statement, timed: writes to tasks wait that long during the upgrade).
truncate taskman_private.finished_task_counts;
insert into taskman_private.finished_task_counts
  (everyone, owner, created_hour, finished_day, status, duration_bucket, tasks)
select w.everyone, w.owner, k.created_hour, k.finished_day, k.status, k.duration_bucket,
       sum(k.tasks)
from (select coalesce(t.user_id, '00000000-0000-0000-0000-000000000000') as owner,
             date_trunc('hour', t.created_at at time zone 'UTC') at time zone 'UTC' as created_hour,
             (coalesce(t.completed_at, t.updated_at) at time zone 'UTC')::date as finished_day,
             t.status,
             case when t.status <> 'completed' then -1
                  when d.took < 0.001 then 0
                  else least(280, 1 + floor(8 * ln(d.took * 1000) / ln(2))) end as duration_bucket,
             count(*) as tasks
      from taskman.tasks t
      cross join lateral (
        select extract(epoch from coalesce(t.completed_at, t.updated_at) - t.created_at)::double precision
          as took) d
      where t.status in ('completed', 'failed', 'cancelled')
      group by 1, 2, 3, 4, 5) k
cross join lateral (values (false, k.owner),
                           (true, '00000000-0000-0000-0000-000000000000'::uuid)) as w(everyone, owner)
group by 1, 2, 3, 4, 5, 6

-- name: settle
vacuum (analyze) taskman.tasks, taskman_private.finished_task_counts

-- name: sizes
select (select count(*) from taskman_private.finished_task_counts) as rollup_rows,
       pg_total_relation_size('taskman.tasks') as task_bytes

-- name: owner
select md5('taskman-bench-owner-0')::uuid::text

-- name: task_stats
select taskman.task_stats()

-- name: scan_every_task
-- What task_stats did before the rollups: every task of the period, read and sorted.
with scoped as (
  select t.status, t.created_at, t.completed_at from taskman.tasks t
  where t.created_at >= now() - interval '7 days'
)
select count(*), count(*) filter (where status = 'completed'),
       (select count(*) from scoped where status in ('completed', 'failed')
        group by date_trunc('day', completed_at at time zone 'UTC') limit 1),
       (select percentile_cont(array[0.5, 0.95]) within group
          (order by extract(epoch from completed_at - created_at))
        from scoped where status = 'completed')
from scoped
