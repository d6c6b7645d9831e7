-- The schedule: when each task is next due, which worker holds its lease, and the poll
-- counters, in a narrow service-only table so that polls with no news write nothing a
-- subscriber sees. poll_state reads a task's live figures from it.

-- The worker's side of each task, one row a task, service-only: a claim or a poll that
-- changes nothing a user sees writes only here, never a row version of taskman.tasks
-- (which is in the supabase_realtime publication, so every row version reaches
-- subscribers).
--   next_poll_at: when it is due (null: nothing to poll: finished, or waiting for a
--     callback); a claim pushes it to the lease expiry, so a crashed worker's tasks
--     fall due again when the lease ends.
--   lease_owner, lease_expires_at: who holds it.
--   attempt_count (every poll made), error_count (consecutive failed polls),
--   last_polled_at, and the last poll's HTTP status and latency.
--   priority: the task's, for the claim's order.
--   alive_at: the last poll that worked or callback received: the heartbeat's clock.
--   host: the host of the task's next request (its submit URL until the submit worked,
--     then its poll URL); host_slot_at: its send slot under the host's rate limit,
--     while it waits for it.
--   owner: the task's user_id (the nil uuid for the service's own tasks), for the
--     claim's turns of owners.
-- No foreign key: tasks_delete_rows deletes a task's row here (80_retention.sql).
create table taskman_private.task_schedule (
  task_id uuid primary key,
  next_poll_at timestamptz,
  lease_owner text,
  lease_expires_at timestamptz,
  attempt_count integer not null default 0,
  error_count integer not null default 0,
  last_polled_at timestamptz,
  last_http_status integer,
  last_latency_ms real,
  priority integer not null default 0,
  alive_at timestamptz,
  host text,
  host_slot_at timestamptz,
  owner uuid not null default '00000000-0000-0000-0000-000000000000'
);

comment on table taskman_private.task_schedule is
  'The worker''s side of each task: when it is due, who holds its lease, poll counters. '
  'Written by every claim and poll; taskman.tasks only on visible changes.';
comment on column taskman_private.task_schedule.owner is
  'The task''s user_id (the nil uuid for the service''s own tasks): the claim takes due '
  'tasks in turns of owners.';

-- The claim path, by priority then due time (the claim, and the worker's "when is the
-- next task due", walk it one priority level at a time: a skip scan).
create index task_schedule_priority_due_idx
  on taskman_private.task_schedule (priority desc, next_poll_at)
  where next_poll_at is not null;

-- The owners look-up: each owner's tasks waiting for a poll, by due time.
create index task_schedule_owner_due_idx
  on taskman_private.task_schedule (owner, next_poll_at)
  where next_poll_at is not null and lease_owner is null;

alter table taskman_private.task_schedule enable row level security;
revoke all on taskman_private.task_schedule from public, anon, authenticated;
grant select, insert, update, delete on taskman_private.task_schedule to service_role;

-- The claim's mark: the first 64 bits of the owner after which the next claim starts
-- its turns. A sequence, written without a row lock, so concurrent claims never wait on
-- it.
create sequence taskman_private.claim_turn as bigint
  minvalue -9223372036854775808 maxvalue 9223372036854775807 start with 0;

comment on sequence taskman_private.claim_turn is
  'The first 64 bits of the owner after which the next claim starts its turns.';

-- A task the service gives to another owner takes its turns with that owner's tasks
-- (task_schedule.owner).
create or replace function taskman_private.tasks_owner_changed()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  update taskman_private.task_schedule s
  set owner = coalesce(new.user_id, '00000000-0000-0000-0000-000000000000')
  where s.task_id = new.task_id;
  return null;
end
$$;
revoke all on function taskman_private.tasks_owner_changed from public, anon, authenticated;

create trigger tasks_owner_changed after update of user_id on taskman.tasks
  for each row when (old.user_id is distinct from new.user_id)
  execute function taskman_private.tasks_owner_changed();

-- A schedule row's owner as tasks hold it: null for the service's own (the nil uuid).
create or replace function taskman_private.schedule_owner(owner uuid)
returns uuid
language sql immutable parallel safe
set search_path = ''
as $$
  select nullif(owner, '00000000-0000-0000-0000-000000000000'::uuid)
$$;
revoke all on function taskman_private.schedule_owner from public, anon, authenticated;

-- The live poll figures of a task, for whoever may see the task (owner or service):
-- task_json runs as its caller, who cannot read the schedule itself.
create or replace function taskman_private.poll_state(p_task_id uuid)
returns jsonb
language sql stable security definer
set search_path = ''
as $$
  select jsonb_build_object('attempt_count', s.attempt_count, 'error_count', s.error_count,
                            'next_poll_at', s.next_poll_at, 'last_polled_at', s.last_polled_at)
  from taskman_private.task_schedule s
  join taskman.tasks t on t.task_id = s.task_id
  where s.task_id = p_task_id
    and (taskman_private.caller_is_service() or coalesce(t.user_id = auth.uid(), false))
$$;
revoke all on function taskman_private.poll_state from public, anon;
grant execute on function taskman_private.poll_state to authenticated, service_role;

-- The arguments every claim takes (of tasks, of the outbox), checked once.
create or replace function taskman_private.check_claim(worker_id text, batch_size integer,
                                                       lease_seconds integer)
returns void
language plpgsql immutable
set search_path = ''
as $$
begin
  if worker_id is null or length(worker_id) not between 1 and 200 then
    perform taskman_private.reject('worker_id', 'must be 1 to 200 characters');
  end if;
  if batch_size is null or batch_size not between 1 and 5000 then
    perform taskman_private.reject('batch_size', 'must be between 1 and 5000');
  end if;
  if lease_seconds is null or lease_seconds not between 1 and 3600 then
    perform taskman_private.reject('lease_seconds', 'must be between 1 and 3600');
  end if;
end
$$;
revoke all on function taskman_private.check_claim from public, anon, authenticated;
