-- Named queries used from Python, each behind one function of worker/store.py (the
-- only code that knows these names). The schema and its functions live in
-- supabase/migrations; these are the few statements the service sends itself.

-- name: is_supabase
select exists (select 1 from pg_roles where rolname = 'supabase_admin')

-- name: lock_migrations
-- Transaction-scoped, so it works through a transaction pooler too (a session lock
-- would stay on whichever server connection the pooler picked). Same key as the
-- session lock older versions took, so they wait for each other as well.
select pg_advisory_xact_lock(hashtext('taskman.migrate'))

-- name: create_migrations_table
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (
  version text primary key,
  statements text[],
  name text
)

-- name: exposed_schemas
-- The schemas PostgREST serves when they are configured in the database (Supabase
-- keeps the Dashboard's list elsewhere); null when the database cannot tell.
select coalesce(
  (select substr(c, length('pgrst.db_schemas=') + 1)
   from pg_db_role_setting s
   join pg_roles r on r.oid = s.setrole and r.rolname = 'authenticator'
   cross join lateral unnest(s.setconfig) c
   where c like 'pgrst.db_schemas=%%' and s.setdatabase in (0, (select oid from pg_database
                                                            where datname = current_database()))
   order by s.setdatabase desc
   limit 1),
  current_setting('pgrst.db_schemas', true)) as schemas

-- name: api_schema_exists
select to_regnamespace('taskman') is not null

-- name: applied_migrations
select version from supabase_migrations.schema_migrations

-- name: record_migration
insert into supabase_migrations.schema_migrations (version, statements, name)
values (%(version)s, array[%(statements)s], %(name)s)

-- name: database_exists
select exists (select 1 from pg_database where datname = %(name)s)

-- name: create_taskman_database
create database taskman

-- Tasks, as the edge and the CLI read and change them. The edge runs these inside
-- db.api_session, so RLS and the functions' own checks decide what each caller may
-- do. Arguments are cast explicitly so an out-of-range number is a clear 22003,
-- not an unresolved function.

-- name: create_task
select taskman.create_task(
  poll_url => %(poll_url)s::text, poll_method => %(poll_method)s::text,
  task_type => %(task_type)s::text, external_id => %(external_id)s::text,
  poll_headers => %(poll_headers)s::jsonb, poll_body => %(poll_body)s::jsonb,
  poll_config => %(poll_config)s::jsonb,
  poll_interval_seconds => %(poll_interval_seconds)s::integer,
  max_attempts => %(max_attempts)s::integer, timeout_minutes => %(timeout_minutes)s::integer,
  callback_url => %(callback_url)s::text, idempotency_key => %(idempotency_key)s::text,
  metadata => %(metadata)s::jsonb, submit_url => %(submit_url)s::text,
  submit_method => %(submit_method)s::text, submit_headers => %(submit_headers)s::jsonb,
  submit_body => %(submit_body)s::jsonb, callback_headers => %(callback_headers)s::jsonb,
  start_at => %(start_at)s::timestamptz, priority => %(priority)s::integer,
  heartbeat_seconds => %(heartbeat_seconds)s::integer) as task

-- name: get_task
select taskman.task_json(t) as task
from taskman.tasks t
where t.task_id = %(task_id)s::uuid

-- name: list_tasks
-- Newest first; keyset pagination on (created_at, task_id), which for a user
-- walks tasks_user_created_idx (RLS adds user_id = auth.uid()).
select taskman.task_json(t) as task
from taskman.tasks t
where (%(statuses)s::text[] is null or t.status = any(%(statuses)s::text[]))
  and (%(task_type)s::text is null or t.task_type = %(task_type)s::text)
  and (%(created_from)s::timestamptz is null or t.created_at >= %(created_from)s::timestamptz)
  and (%(created_to)s::timestamptz is null or t.created_at < %(created_to)s::timestamptz)
  and (%(before_created_at)s::timestamptz is null
       or (t.created_at, t.task_id) < (%(before_created_at)s::timestamptz, %(before_task_id)s::uuid))
order by t.created_at desc, t.task_id desc
limit %(limit)s::integer

-- name: task_events
select e.event_id, e.task_id, e.event_type, e.from_status, e.to_status, e.detail, e.created_at
from taskman.task_events e
where e.task_id = %(task_id)s::uuid and e.event_id > %(after)s::bigint
order by e.event_id
limit %(limit)s::integer

-- name: task_visible
select exists (select 1 from taskman.tasks t where t.task_id = %(task_id)s::uuid) as visible

-- name: get_task_status
select taskman.get_task_status(%(task_id)s::uuid) as status

-- name: update_task
select taskman.update_task(
  task_id => %(task_id)s::uuid, status => %(status)s::text, result => %(result)s::jsonb,
  error_message => %(error_message)s::text, progress => %(progress)s::integer,
  progress_message => %(progress_message)s::text,
  callback_token => %(callback_token)s::text) as task

-- name: set_metadata
update taskman.tasks t set metadata = %(metadata)s::jsonb
where t.task_id = %(task_id)s::uuid
returning taskman.task_json(t) as task

-- name: cancel_task
select taskman.cancel_task(%(task_id)s::uuid) as task

-- name: retry_task
select taskman.retry_task(%(task_id)s::uuid) as task

-- name: rotate_callback_secret
select taskman.rotate_callback_secret(%(keep_previous_seconds)s::integer) as secret

-- name: task_stats
select taskman.task_stats(coalesce(%(since)s::timestamptz, now() - interval '7 days')) as stats

-- name: callback_profile
select taskman.callback_profile(%(task_id)s::uuid, %(callback_token)s::text) as profile

-- name: tasks_by_status
select t.status, count(*) as n from taskman.tasks t group by t.status

-- name: ping
select 1

-- name: listen
listen taskman

-- name: listen_outbox
-- New callbacks in the outbox (the enqueue trigger's NOTIFY; payload: the channel).
listen taskman_outbox

-- Task changes without LISTEN (the edge's /events behind a transaction pooler): the
-- same changes NOTIFY announces, read back from task_events by id.

-- name: latest_task_event_id
select coalesce(max(e.event_id), 0) as event_id from taskman.task_events e

-- name: task_changes
-- Events above `after`, and those of `missing` (ids above an older `after` that were
-- not committed yet when last read), oldest first. Every event comes back, so that
-- gaps in the ids are real; `change` marks those NOTIFY announces (an insert, a
-- status change, progress from a poll or a callback), with NOTIFY's payload fields.
select e.event_id, e.task_id, e.to_status as status, e.user_id,
       (e.event_type in ('created', 'status_changed', 'cancelled', 'retried')
        or (e.event_type in ('polled', 'callback_received') and e.detail ? 'news')) as change
from (
  select * from taskman.task_events m where m.event_id = any(%(missing)s::bigint[])
  union all
  (select * from taskman.task_events n where n.event_id > %(after)s::bigint
   order by n.event_id limit %(limit)s::integer)
) e
order by e.event_id

-- The outbox (worker.notify): claim due deliveries, record what happened.

-- name: claim_outbox
-- Payloads come as JSON text and are parsed row by row: one that Python cannot
-- read (nested thousands deep, say) fails alone instead of the whole claim.
-- A callback comes with its task's callback_headers (service-only).
select outbox_id, task_id, channel, payload::text as payload, attempts, headers
from taskman.claim_deliveries(%(worker_id)s::text, %(batch_size)s::integer,
                              %(lease_seconds)s::integer, %(only_channel)s::text,
                              %(skip_hosts)s::text[])

-- name: record_outbox_results
select outcome from taskman.record_outbox_results(%(results)s::jsonb, %(max_attempts)s::integer,
                                                 %(base_delay_seconds)s::float8,
                                                 %(max_delay_seconds)s::float8)

-- name: release_outbox
-- A worker stopping gives back what it claimed and did not record: due at once.
select taskman.release_outbox(%(worker_id)s::text, %(only_channel)s::text) as released

-- The polling service (worker.polling): claim, record, sweep, release, and when to wake.

-- name: claim_admitted_tasks
-- poll_body, submit_body and profile come as JSON text: bodies are sent as is, and
-- the profile text keys the worker's cache of compiled profiles. The id comes as text
-- (the worker only ever writes it out) and no headers as null: nothing to decode.
select task_id::text as task_id, poll_url, poll_method,
       nullif(poll_headers, '{}') as poll_headers, poll_body::text as poll_body,
       profile::text as profile, attempt_count, error_count, poll_interval_seconds,
       submit_url, submit_method, submit_headers, submit_body::text as submit_body,
       callback_token, owner::text as owner, held
from taskman.claim_admitted_tasks(%(worker_id)s::text, %(batch_size)s::integer,
                                  %(lease_seconds)s::integer, %(cooldown_seconds)s::float8,
                                  %(max_cooldown_seconds)s::float8, %(spread_seconds)s::float8)

-- name: record_polls
-- The results as JSON text, serialised by the worker one outcome at a time.
select taskman.record_polls(%(worker_id)s::text, %(results)s::jsonb, %(host_outcomes)s::jsonb,
                            %(failure_threshold)s::integer, %(cooldown_seconds)s::float8,
                            %(max_cooldown_seconds)s::float8, %(spread_seconds)s::float8)
  as recorded

-- name: record_remote_cancellations
select taskman.record_remote_cancellations(%(results)s::jsonb) as cancelled

-- name: expire_overdue_tasks
select taskman.expire_overdue_tasks() as expired

-- name: release_tasks
select taskman.release_tasks(%(worker_id)s::text) as released

-- name: seconds_until_due
-- The earliest next_poll_at over task_schedule_priority_due_idx: one probe a priority
-- level in use (each level found with one probe too), however many tasks wait. Leased
-- tasks count too, at their lease expiry: a crashed worker's tasks wake a worker when
-- they fall due again.
with recursive levels as (
  (select s.priority from taskman_private.task_schedule s
   where s.next_poll_at is not null order by s.priority desc limit 1)
  union all
  select (select s.priority from taskman_private.task_schedule s
          where s.next_poll_at is not null and s.priority < l.priority
          order by s.priority desc limit 1)
  from levels l where l.priority is not null
)
select extract(epoch from min(d.next_poll_at) - now())::float8 as seconds
from levels l
cross join lateral (
  select s.next_poll_at from taskman_private.task_schedule s
  where s.priority = l.priority and s.next_poll_at is not null
  order by s.next_poll_at limit 1
) d
where l.priority is not null


-- name: live_demo_tasks
select exists (
  select 1 from taskman.tasks
  where metadata @> '{"demo": true}' and status in ('pending', 'in_progress')
) as live

-- The CLI (taskman notifications): deliveries that are failing or were given up.

-- name: troubled_notifications
-- Undelivered rows that have failed at least once (still retrying) or were
-- given up (dead letters), newest first.
select o.outbox_id, o.task_id, o.channel,
       case when o.given_up_at is not null then 'given_up' else 'failing' end as state,
       o.attempts, o.last_error, o.created_at,
       case when o.given_up_at is null then o.next_attempt_at end as next_attempt_at,
       o.given_up_at
from taskman_private.outbox o
where o.delivered_at is null
  and (o.given_up_at is not null or o.attempts > 0)
  and (%(state)s::text is null
       or (%(state)s::text = 'given_up') = (o.given_up_at is not null))
order by o.outbox_id desc
limit %(limit)s::integer

-- Retention (the worker's periodic job and `taskman prune`).

-- name: prune_finished_tasks
-- One small batch; `done` says nothing older is left to prune, `rows_kept` that the task
-- rows stay because Supabase Realtime streams taskman.tasks.
select tasks, task_rows, events, private_rows, schedule_rows, outbox_rows, rows_kept, done
from taskman.prune_finished_tasks(make_interval(secs => %(older_than_seconds)s::float8),
                                  %(batch_size)s::integer, %(dry_run)s::boolean)

-- name: prune_idle_hosts
-- One small batch of what belongs to no task: host rows with nothing to keep and
-- host alerts delivered or given up; `done` says nothing older is left.
select hosts, alerts, done
from taskman.prune_idle_hosts(make_interval(secs => %(older_than_seconds)s::float8),
                              %(batch_size)s::integer, %(dry_run)s::boolean)

-- name: give_up_stale_notifications
-- One small batch of notifications still undelivered `older_than` after they were
-- enqueued, given up; `done` says none is left.
select given_up, done
from taskman.give_up_stale_notifications(make_interval(secs => %(older_than_seconds)s::float8),
                                         %(batch_size)s::integer)

-- Remote hosts (worker.polling.hosts): the gate after each claim, what polls say about
-- their hosts, limits, the overview (edge, CLI) and per-host metrics.

-- name: record_host_outcomes
select held::text
from taskman.record_host_outcomes(%(worker_id)s::text, %(outcomes)s::jsonb,
                                  %(failure_threshold)s::integer, %(cooldown_seconds)s::float8,
                                  %(max_cooldown_seconds)s::float8, %(spread_seconds)s::float8)
  as held

-- name: set_host_limits
select taskman.set_host_limits(%(limits)s::jsonb) as changed

-- name: reset_host
select taskman.reset_host(%(host)s::text, %(spread_seconds)s::float8) as host

-- name: host_status
select taskman.host_status() as hosts

-- name: host_metrics
-- Every host with a row (not the owners' rows on it), and its live tasks (one scan of
-- the schedule).
select h.host, h.state = 'open' as open, coalesce(h.paused_until > now(), false) as paused,
       h.consecutive_failures, h.failures_total, h.throttled_total, h.rate_limit,
       coalesce(w.tasks, 0) as tasks_waiting
from taskman_private.hosts h
left join (select s.host, count(*) as tasks from taskman_private.task_schedule s
           where s.next_poll_at is not null group by s.host) w on w.host = h.host
where h.owner is null
order by h.host

-- Callbacks (worker.notify.callback_hosts): the hosts that hold callbacks back, and the
-- gate after a claim.

-- name: callback_host_states
-- The hosts and owners with an open circuit or a pause (`owner`: null for a host's own
-- circuit); `closed_to_claims`: not even a probe is due.
select h.host, h.owner,
       coalesce(h.paused_until > now(), false)
         or (h.state = 'open' and coalesce(h.next_probe_at > now(), true)) as closed_to_claims
from taskman_private.hosts h
where h.state = 'open' or h.paused_until > now()

-- name: hold_callbacks
select held
from taskman.hold_callbacks(%(worker_id)s::text, %(requests)s::jsonb,
                            %(cooldown_seconds)s::float8, %(max_cooldown_seconds)s::float8,
                            %(take_probes)s::boolean) as held

-- Owners' callback signing secrets (worker.notify.owner_secrets): those rotated after
-- `since` (every one when null), with the database's clock to start the next look from.
-- A look that finds nothing reads one page of callback_secrets_rotated_idx.

-- name: callback_secrets_since
select n.read_at, s.user_id, s.secret,
       case when s.previous_valid_until > n.read_at then s.previous_secret end
         as previous_secret,
       case when s.previous_valid_until > n.read_at then s.previous_valid_until end
         as previous_valid_until
from (select now() as read_at) n
left join taskman_private.callback_secrets s
  on s.rotated_at > coalesce(%(since)s::timestamptz, '-infinity'::timestamptz)

-- Realtime (taskman realtime): how task changes reach browsers.

-- name: realtime_mode
select taskman.realtime_mode() as mode

-- name: set_realtime_mode
select taskman.set_realtime_mode(%(mode)s) as mode
