-- The task store: tasks, their history, and what only the service may read.
--
-- Columns that Taskman manages (counters, timestamps, leases) and the input
-- defaults are filled by the tasks_prepare trigger (next migration), so that a
-- plain INSERT from any PostgREST client and create_task() behave the same,
-- explicit nulls included.

create schema if not exists taskman_private;
revoke all on schema taskman_private from public;
comment on schema taskman_private is
  'Taskman internals: secrets, raw remote payloads and the outbox. Never exposed through PostgREST.';

create table taskman.tasks (
  task_id uuid primary key default gen_random_uuid(),
  user_id uuid default auth.uid(),
  status text not null
    constraint tasks_status_check
    check (status in ('pending', 'in_progress', 'completed', 'failed', 'cancelled')),
  task_type text not null,
  external_id text,
  poll_url text,
  poll_method text not null,
  -- Write-only: tasks_prepare moves a given value to taskman_private.task_private.
  poll_headers jsonb
    constraint tasks_poll_headers_write_only check (poll_headers is null),
  poll_body jsonb,
  poll_config jsonb not null,
  poll_interval_seconds integer not null,
  result jsonb,
  error_code text
    constraint tasks_error_code_check
    check (error_code in ('timeout', 'max_attempts', 'remote_failed', 'invalid_response', 'poll_error')),
  error_message text,
  progress integer constraint tasks_progress_range check (progress between 0 and 100),
  progress_message text,
  attempt_count integer not null,
  error_count integer not null,
  max_attempts integer not null,
  timeout_minutes integer not null,
  deadline_at timestamptz not null,
  next_poll_at timestamptz,
  last_polled_at timestamptz,
  callback_url text,
  idempotency_key text,
  metadata jsonb not null,
  created_at timestamptz not null,
  updated_at timestamptz not null,
  started_at timestamptz,
  completed_at timestamptz,
  lease_owner text,
  lease_expires_at timestamptz
);

comment on table taskman.tasks is
  'One row per tracked job. Create with create_task() or a plain INSERT; read under RLS.';
comment on column taskman.tasks.poll_headers is
  'Write-only. Headers sent when polling (e.g. an API key); stored where only service_role can read.';

-- The claim path. Only live, pollable tasks are in this index, ordered by when
-- they are due, so claiming stays fast however much history the table holds.
-- A claimed task's next_poll_at is pushed to its lease expiry, so leased tasks
-- sort out of the way and a crashed worker's tasks fall due when the lease ends.
create index tasks_due_idx on taskman.tasks (next_poll_at)
  where status in ('pending', 'in_progress') and poll_url is not null;

-- The overdue sweep reads only live tasks, by deadline.
create index tasks_deadline_idx on taskman.tasks (deadline_at)
  where status in ('pending', 'in_progress');

-- Listing newest first with keyset pagination on (created_at, task_id): for
-- owners (RLS adds user_id = auth.uid()) and for the service, which sees all.
create index tasks_user_created_idx on taskman.tasks (user_id, created_at desc, task_id desc);
create index tasks_created_idx on taskman.tasks (created_at desc, task_id desc);

-- Idempotency: one task per (owner, key). Tasks without an owner share one
-- namespace, the service's.
create unique index tasks_idempotency_key_idx on taskman.tasks
  (coalesce(user_id, '00000000-0000-0000-0000-000000000000'::uuid), idempotency_key)
  where idempotency_key is not null;

-- Releasing a worker's leases finds them by owner.
create index tasks_lease_owner_idx on taskman.tasks (lease_owner) where lease_owner is not null;

-- The task as its owner sees it, everywhere a task is returned (RPCs, the edge,
-- callbacks): every column but the write-only one and the worker's lease.
create function taskman.task_json(t taskman.tasks)
returns jsonb
language sql stable security invoker
set search_path = ''
as $$
  select to_jsonb(t) - '{poll_headers,lease_owner,lease_expires_at}'::text[]
$$;

create table taskman.task_events (
  event_id bigint generated always as identity primary key,
  task_id uuid not null references taskman.tasks (task_id) on delete cascade,
  -- Copied from the task so that RLS on events needs no join.
  user_id uuid,
  event_type text not null
    constraint task_events_type_check check (event_type in (
      'created', 'polled', 'status_changed', 'retry_scheduled', 'callback_received',
      'cancelled', 'retried', 'alert_sent', 'notification_delivered',
      'notification_failed', 'notification_given_up')),
  from_status text,
  to_status text,
  detail jsonb not null default '{}',
  created_at timestamptz not null default clock_timestamp()
);

comment on table taskman.task_events is
  'History of each task. Holds no raw remote bodies and no secrets.';

create index task_events_task_idx on taskman.task_events (task_id, event_id);
create index task_events_user_idx on taskman.task_events (user_id, event_id);

-- Service-only side of a task: secrets and raw remote payloads. The foreign key
-- is deferred because tasks_prepare writes here before the task row exists.
create table taskman_private.task_private (
  task_id uuid primary key
    references taskman.tasks (task_id) on delete cascade deferrable initially deferred,
  poll_headers jsonb,
  callback_token_hash bytea,
  last_http_status integer,
  last_response text,
  last_error text,
  updated_at timestamptz not null default now()
);
