-- Named queries used from Python. The schema and its functions live in
-- supabase/migrations; these are the few statements the service sends itself.

-- name: is_supabase
select exists (select 1 from pg_roles where rolname = 'supabase_admin')

-- name: lock_migrations
select pg_advisory_lock(hashtext('taskman.migrate'))

-- name: unlock_migrations
select pg_advisory_unlock(hashtext('taskman.migrate'))

-- name: create_migrations_table
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (
  version text primary key,
  statements text[],
  name text
)

-- name: applied_migrations
select version from supabase_migrations.schema_migrations

-- name: record_migration
insert into supabase_migrations.schema_migrations (version, statements, name)
values (%(version)s, array[%(statements)s], %(name)s)

-- name: database_exists
select exists (select 1 from pg_database where datname = %(name)s)

-- name: create_taskman_database
create database taskman

-- The edge (worker/edge): run inside db.api_session, so RLS and the functions'
-- own checks decide what each caller may do. Arguments are cast explicitly so
-- an out-of-range number is a clear 22003, not an unresolved function.

-- name: edge_create_task
select public.create_task(
  poll_url => %(poll_url)s::text, poll_method => %(poll_method)s::text,
  task_type => %(task_type)s::text, external_id => %(external_id)s::text,
  poll_headers => %(poll_headers)s::jsonb, poll_body => %(poll_body)s::jsonb,
  poll_config => %(poll_config)s::jsonb,
  poll_interval_seconds => %(poll_interval_seconds)s::integer,
  max_attempts => %(max_attempts)s::integer, timeout_minutes => %(timeout_minutes)s::integer,
  callback_url => %(callback_url)s::text, idempotency_key => %(idempotency_key)s::text,
  metadata => %(metadata)s::jsonb) as task

-- name: edge_get_task
select public.task_json(t) as task
from public.tasks t
where t.task_id = %(task_id)s::uuid

-- name: edge_list_tasks
-- Newest first; keyset pagination on (created_at, task_id), which for a user
-- walks tasks_user_created_idx (RLS adds user_id = auth.uid()).
select public.task_json(t) as task
from public.tasks t
where (%(statuses)s::text[] is null or t.status = any(%(statuses)s::text[]))
  and (%(task_type)s::text is null or t.task_type = %(task_type)s::text)
  and (%(created_from)s::timestamptz is null or t.created_at >= %(created_from)s::timestamptz)
  and (%(created_to)s::timestamptz is null or t.created_at < %(created_to)s::timestamptz)
  and (%(before_created_at)s::timestamptz is null
       or (t.created_at, t.task_id) < (%(before_created_at)s::timestamptz, %(before_task_id)s::uuid))
order by t.created_at desc, t.task_id desc
limit %(limit)s::integer

-- name: edge_task_events
select e.event_id, e.task_id, e.event_type, e.from_status, e.to_status, e.detail, e.created_at
from public.task_events e
where e.task_id = %(task_id)s::uuid and e.event_id > %(after)s::bigint
order by e.event_id
limit %(limit)s::integer

-- name: edge_task_visible
select exists (select 1 from public.tasks t where t.task_id = %(task_id)s::uuid) as visible

-- name: edge_get_task_status
select public.get_task_status(%(task_id)s::uuid) as status

-- name: edge_update_task
select public.update_task(
  task_id => %(task_id)s::uuid, status => %(status)s::text, result => %(result)s::jsonb,
  error_message => %(error_message)s::text, progress => %(progress)s::integer,
  progress_message => %(progress_message)s::text,
  callback_token => %(callback_token)s::text) as task

-- name: edge_set_metadata
update public.tasks t set metadata = %(metadata)s::jsonb
where t.task_id = %(task_id)s::uuid
returning public.task_json(t) as task

-- name: edge_cancel_task
select public.cancel_task(%(task_id)s::uuid) as task

-- name: edge_retry_task
select public.retry_task(%(task_id)s::uuid) as task

-- name: edge_task_stats
select public.task_stats(coalesce(%(since)s::timestamptz, now() - interval '7 days')) as stats

-- name: edge_callback_profile
select public.callback_profile(%(task_id)s::uuid, %(callback_token)s::text) as profile

-- name: edge_tasks_by_status
select t.status, count(*) as n from public.tasks t group by t.status

-- name: edge_ping
select 1

-- name: edge_listen
listen taskman

-- The outbox (worker/notify): claim due deliveries, record what happened.

-- name: outbox_claim
-- Payloads come as JSON text and are parsed row by row: one that Python cannot
-- read (nested thousands deep, say) fails alone instead of the whole claim.
select outbox_id, task_id, channel, payload::text as payload, attempts
from public.claim_outbox(%(worker_id)s::text, %(batch_size)s::integer,
                         %(lease_seconds)s::integer)

-- name: outbox_record
select * from public.record_outbox_results(%(results)s::jsonb, %(max_attempts)s::integer,
                                           %(base_delay_seconds)s::float8,
                                           %(max_delay_seconds)s::float8)

-- The worker (worker/loop.py): claim, record, sweep, release, and when to wake.

-- name: worker_claim
-- poll_body and profile come as JSON text: the body is sent as is, and the
-- profile text keys the worker's cache of compiled profiles.
select task_id, poll_url, poll_method, poll_headers, poll_body::text as poll_body,
       profile::text as profile, attempt_count, error_count, poll_interval_seconds
from public.claim_due_tasks(%(worker_id)s::text, %(batch_size)s::integer,
                            %(lease_seconds)s::integer)

-- name: worker_record
select count(*) as recorded from public.record_poll_results(%(results)s::jsonb)

-- name: worker_expire_overdue
select public.expire_overdue_tasks() as expired

-- name: worker_release
select public.release_tasks(%(worker_id)s::text) as released

-- name: worker_seconds_until_due
-- min() over tasks_due_idx (same predicate): one index probe however many tasks
-- wait. Leased tasks count too, at their lease expiry: a crashed worker's tasks
-- wake a worker when they fall due again.
select extract(epoch from min(t.next_poll_at) - now())::float8 as seconds
from public.tasks t
where t.status in ('pending', 'in_progress') and t.poll_url is not null

-- name: worker_listen
listen taskman

-- name: live_demo_tasks
select exists (
  select 1 from public.tasks
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
