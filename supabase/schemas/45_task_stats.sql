-- task_stats: figures over the tasks the caller may see, at a cost that does not grow
-- with history. Finished tasks are counted in taskman_private.finished_task_counts as
-- they finish, by owner and hour of creation (a trigger, once per UPDATE statement);
-- live tasks (pending, in_progress) are counted from taskman.tasks, by a partial index
-- that holds only them. The figures keep tasks that retention has deleted (README:
-- Quiet polls, history and retention).

-- Finished tasks by owner (the zero UUID for tasks without one), and for everyone (the
-- service's figures: rows with everyone, owner the zero UUID), by UTC hour of creation,
-- UTC day of the end, status and, for completed tasks, the bucket of their duration
-- (-1 otherwise). A batch of N tasks ending writes one row per key it touches, not N; a
-- retried task leaves its rows (-1) and counts again when it ends.
create table taskman_private.finished_task_counts (
  everyone boolean not null,
  owner uuid not null,
  created_hour timestamptz not null,
  finished_day date not null,
  status text not null,
  duration_bucket smallint not null,
  tasks bigint not null,
  primary key (everyone, owner, created_hour, finished_day, status, duration_bucket)
);

alter table taskman_private.finished_task_counts enable row level security;
revoke all on taskman_private.finished_task_counts from public, anon, authenticated;
grant select on taskman_private.finished_task_counts to service_role;

-- Live tasks by owner and creation time: what task_stats counts from taskman.tasks.
create index tasks_live_created_idx on taskman.tasks (user_id, created_at)
  where status in ('pending', 'in_progress');

-- A point of bucket b, the fraction `at` (0..1) of the way through it (geometrically;
-- linearly in bucket 0), in seconds.
create or replace function taskman_private.duration_in_bucket(b smallint, at double precision)
returns double precision
language sql immutable parallel safe
set search_path = ''
as $$
  select case when b = 0 then 0.001 * greatest(0, least(1, at))
              else power(2, (b - 1 + greatest(0, least(1, at))) / 8.0) / 1000 end
$$;
revoke all on function taskman_private.duration_in_bucket from public, anon, authenticated;

-- After each UPDATE statement on taskman.tasks (one that writes no row, like a batch
-- of polls without news, stops at the first check): every row that leaves a finished state
-- or its key (a retry, a new owner) counts -1, every row that enters one +1; keys whose
-- changes cancel out (a metadata edit of a finished task) are not written. Rows are
-- written in key order, so concurrent batches never wait on each other in a cycle.
create or replace function taskman_private.tasks_count_finished()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  -- Most statements end nothing (a poll with news but no end, a metadata edit).
  if not exists (select 1 from new_tasks x where x.status in ('completed', 'failed', 'cancelled'))
     and not exists (select 1 from old_tasks o
                     where o.status in ('completed', 'failed', 'cancelled')) then
    return null;
  end if;
  insert into taskman_private.finished_task_counts as c
    (everyone, owner, created_hour, finished_day, status, duration_bucket, tasks)
  select w.everyone, w.owner, k.created_hour, k.finished_day, r.status, k.duration_bucket,
         sum(r.n)
  from (select o.user_id, o.status, o.created_at, coalesce(o.completed_at, o.updated_at) as ended_at,
               -1 as n
        from old_tasks o where o.status in ('completed', 'failed', 'cancelled')
        union all
        select x.user_id, x.status, x.created_at, coalesce(x.completed_at, x.updated_at), 1
        from new_tasks x where x.status in ('completed', 'failed', 'cancelled')) r
  cross join lateral (select extract(epoch from r.ended_at - r.created_at)::double precision as took) d
  cross join lateral (
    select coalesce(r.user_id, '00000000-0000-0000-0000-000000000000') as owner,
           date_trunc('hour', r.created_at at time zone 'UTC') at time zone 'UTC' as created_hour,
           (r.ended_at at time zone 'UTC')::date as finished_day,
           -- The duration's bucket: 0 below 1 ms, then eight a doubling (bucket k holds
           -- [2^((k-1)/8), 2^(k/8)) ms, each 9% wide), the last (280, a year) open-ended.
           case when r.status <> 'completed' then -1
                when d.took < 0.001 then 0
                else least(280, 1 + floor(8 * ln(d.took * 1000) / ln(2))) end::smallint
             as duration_bucket
  ) k
  -- Each task counts for its owner and for everyone (the service's figures).
  cross join lateral (values (false, k.owner),
                             (true, '00000000-0000-0000-0000-000000000000'::uuid)) as w(everyone, owner)
  group by 1, 2, 3, 4, 5, 6
  having sum(r.n) <> 0
  order by 1, 2, 3, 4, 5, 6
  on conflict (everyone, owner, created_hour, finished_day, status, duration_bucket)
  do update set tasks = c.tasks + excluded.tasks;
  return null;
end
$$;
revoke all on function taskman_private.tasks_count_finished from public, anon, authenticated;

create trigger tasks_count_finished after update on taskman.tasks
  referencing old table as old_tasks new table as new_tasks
  for each statement execute function taskman_private.tasks_count_finished();

-- The figures since the start of the UTC hour of `since` (the period is counted in
-- whole hours; `since` in the answer is that start): the service's over every task,
-- a user's over their own. total and by_status count tasks created in the period by
-- their status now; daily counts those of them that completed or failed, by UTC day of
-- the end; duration_seconds, from creation to completion of the completed ones, is
-- read from the duration buckets (within 9% of the exact percentile).
create or replace function taskman_private.task_stats(since timestamptz default now() - interval '7 days')
returns jsonb
language plpgsql stable security definer
set search_path = ''
-- Planned once a session: a custom plan each call cost more than running it.
set plan_cache_mode = force_generic_plan
as $$
declare
  service boolean := taskman_private.caller_is_service();
  uid uuid := auth.uid();
  start timestamptz;
begin
  perform taskman_private.require_user();
  if since is null or since = 'infinity' then
    perform taskman_private.reject('since', 'must be a time (the start of the period)');
  end if;
  start := date_trunc('hour', since at time zone 'UTC') at time zone 'UTC';
  return (
    with finished as (
      select c.status, c.finished_day, c.duration_bucket, c.tasks
      from taskman_private.finished_task_counts c
      where service and c.everyone
        and c.owner = '00000000-0000-0000-0000-000000000000' and c.created_hour >= start
      union all
      select c.status, c.finished_day, c.duration_bucket, c.tasks
      from taskman_private.finished_task_counts c
      where not service and not c.everyone and c.owner = uid and c.created_hour >= start
    ),
    live as (
      select t.status, count(*) as n
      from taskman.tasks t
      where service and t.status in ('pending', 'in_progress') and t.created_at >= start
      group by t.status
      union all
      select t.status, count(*)
      from taskman.tasks t
      where not service and t.user_id = uid and t.status in ('pending', 'in_progress')
        and t.created_at >= start
      group by t.status
    ),
    counts as (
      select s.status, coalesce(l.n, f.n, 0) as n
      from unnest(array['pending', 'in_progress', 'completed', 'failed', 'cancelled']) as s(status)
      left join live l using (status)
      left join (select f.status, sum(f.tasks) as n from finished f group by f.status) f using (status)
    ),
    daily as (
      select f.finished_day as day,
             sum(f.tasks) filter (where f.status = 'completed') as completed,
             sum(f.tasks) filter (where f.status = 'failed') as failed
      from finished f
      where f.status in ('completed', 'failed')
      group by f.finished_day
      having sum(f.tasks) > 0
    ),
    buckets as (
      select b.duration_bucket, b.n, sum(b.n) over (order by b.duration_bucket) - b.n as before,
             sum(b.n) over () as total
      from (select f.duration_bucket, sum(f.tasks) as n from finished f
            where f.status = 'completed' group by f.duration_bucket having sum(f.tasks) > 0) b
    ),
    percentiles as (
      -- As percentile_cont: between the values ranked floor(r) and ceil(r), r = p of the
      -- way from the first to the last; each value is placed within its bucket by its
      -- rank there.
      select x.p, round((lo.v + (x.r - floor(x.r)) * (hi.v - lo.v))::numeric, 6) as v
      from (select p.p, p.p * (t.total - 1) as r
            from (values (0.5), (0.95)) as p(p)
            cross join (select max(b.total) as total from buckets b) t) x
      cross join lateral (
        select taskman_private.duration_in_bucket(b.duration_bucket, (floor(x.r) - b.before + 0.5) / b.n) as v
        from buckets b where b.before <= floor(x.r) and floor(x.r) < b.before + b.n) lo
      cross join lateral (
        select taskman_private.duration_in_bucket(b.duration_bucket, (ceil(x.r) - b.before + 0.5) / b.n) as v
        from buckets b where b.before <= ceil(x.r) and ceil(x.r) < b.before + b.n) hi
    )
    select jsonb_build_object(
      'since', start,
      'total', (select sum(c.n) from counts c),
      'by_status', (select jsonb_object_agg(c.status, c.n) from counts c),
      'success_rate', (select round(sum(c.n) filter (where c.status = 'completed')
                                    / nullif(sum(c.n) filter (where c.status in ('completed', 'failed')), 0), 4)
                       from counts c),
      'daily', (select coalesce(jsonb_agg(jsonb_build_object(
                  'day', d.day, 'completed', coalesce(d.completed, 0), 'failed', coalesce(d.failed, 0))
                  order by d.day), '[]') from daily d),
      'duration_seconds', jsonb_build_object(
        'median', (select v from percentiles where p = 0.5),
        'p95', (select v from percentiles where p = 0.95))));
end
$$;
revoke all on function taskman_private.task_stats from public, anon;
grant execute on function taskman_private.task_stats to authenticated, service_role;

create or replace function taskman.task_stats(since timestamptz default now() - interval '7 days')
returns jsonb
language plpgsql stable security invoker
set search_path = ''
as $$
begin
  perform taskman_private.require_user();
  return taskman_private.task_stats(task_stats.since);
end
$$;
revoke all on function taskman.task_stats from public, anon;
grant execute on function taskman.task_stats to authenticated, service_role;
