-- The claim shares the worker fairly between owners. Until now it took all owners' due
-- tasks by priority (any user may set up to 100), so one user's busy tasks at priority
-- 100 left another user's tasks unpolled for as long as they lasted.
--
-- - Each schedule row carries its task's owner (`owner`: the task's user_id, the nil
--   uuid for the service's own tasks), written with the row by add_task_rows and kept
--   when the service gives a task to another owner.
-- - claim_due_tasks takes due tasks in turns of owners: every owner's first task, then
--   every owner's second, and so on; within an owner, higher priority first, then the
--   longest due. Within a turn, the owners after a mark go first (wrapping around),
--   the mark being the last owner the previous claim served: successive claims rotate
--   through the owners, so claims of one task serve each owner in turn too. The claim
--   returns its tasks in that order (admission and sending follow it).
-- - What it looks at: a window of a batch and one of due tasks by priority then due
--   time, taken and locked (SKIP LOCKED) as before, on task_schedule_priority_due_idx. When that
--   window is full and an owner has more than one task in it, other owners' due tasks
--   may be behind it however long it is, so the claim also looks up owners, one probe
--   each on the new task_schedule_owner_due_idx, from the mark on: up to max(batch, 64)
--   of them, each with its longest due task, which it locks too. An owner it did not
--   get round to this time is looked up by the next claim (the mark then moves to the
--   last owner looked up). Of what it locked, the batch is the first in turn order.
-- - The new index holds only tasks not leased (a claim's write adds no entry to it):
--   about half what a second index on the claim path costs each poll.
-- - The mark is a sequence (claim_turn) holding an owner's first 64 bits: written
--   without a row lock, so concurrent claims never wait on it.

alter table taskman_private.task_schedule
  add column owner uuid not null default '00000000-0000-0000-0000-000000000000';

comment on column taskman_private.task_schedule.owner is
  'The task''s user_id (the nil uuid for the service''s own tasks): the claim takes due '
  'tasks in turns of owners.';

update taskman_private.task_schedule s
set owner = t.user_id
from taskman.tasks t
where t.task_id = s.task_id and t.user_id is not null;

-- The owners look-up: each owner's tasks waiting for a poll, by due time.
create index task_schedule_owner_due_idx
  on taskman_private.task_schedule (owner, next_poll_at)
  where next_poll_at is not null and lease_owner is null;

create sequence taskman_private.claim_turn as bigint
  minvalue -9223372036854775808 maxvalue 9223372036854775807 start with 0;

revoke all on sequence taskman_private.claim_turn from public, anon, authenticated;

comment on sequence taskman_private.claim_turn is
  'The first 64 bits of the owner after which the next claim starts its turns.';

-- add_task_rows as in 20261202000800_create_without_row_triggers.sql, with the owner
-- in the schedule row.
create or replace function taskman_private.add_task_rows(t taskman.tasks, poll_headers jsonb,
                                                         submit_headers jsonb,
                                                         callback_headers jsonb,
                                                         callback_token_hash bytea)
returns void
language plpgsql volatile
set search_path = ''
as $$
begin
  if num_nonnulls(poll_headers, submit_headers, callback_headers, callback_token_hash) > 0 then
    insert into taskman_private.task_private
      (task_id, poll_headers, submit_headers, callback_headers, callback_token_hash)
    values (t.task_id, add_task_rows.poll_headers, add_task_rows.submit_headers,
            add_task_rows.callback_headers, add_task_rows.callback_token_hash);
  end if;
  insert into taskman_private.task_schedule (task_id, next_poll_at, priority, host, owner)
  values (t.task_id, t.next_poll_at, t.priority, taskman_private.request_host(t),
          coalesce(t.user_id, '00000000-0000-0000-0000-000000000000'));
  insert into taskman.task_events (task_id, user_id, event_type, to_status, detail)
  values (t.task_id, t.user_id, 'created', t.status,
          jsonb_strip_nulls(jsonb_build_object(
            'task_type', t.task_type, 'polled', t.poll_url is not null,
            'submitted', case when t.submit_url is not null then false end)));
  perform taskman_private.notify_task(t);
end
$$;

revoke all on function taskman_private.add_task_rows from public, anon, authenticated;

-- A task the service gives to another owner takes its turns with that owner's tasks.
create function taskman_private.tasks_owner_changed()
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

-- claim_due_tasks with the same arguments, checks, leases and columns; the tasks in
-- turns of owners (above), returned in that order.
create or replace function taskman.claim_due_tasks(worker_id text, batch_size integer default 100,
                                                  lease_seconds integer default 60)
returns table (
  task_id uuid, poll_url text, poll_method text, poll_headers jsonb, poll_body jsonb,
  profile jsonb, task_type text, status text, attempt_count integer, error_count integer,
  max_attempts integer, poll_interval_seconds integer, deadline_at timestamptz,
  lease_expires_at timestamptz, submit_url text, submit_method text, submit_headers jsonb,
  submit_body jsonb, callback_token text)
language plpgsql volatile security definer
set search_path = ''
set plan_cache_mode = force_generic_plan
set enable_seqscan = off
as $$
declare
  -- How many owners a crowded window looks up.
  reach integer := greatest(batch_size, 64);
  mark_before bigint;
  turn_after uuid;
begin
  perform taskman_private.check_claim(worker_id, batch_size, lease_seconds);

  -- Owners whose first 64 bits are above the previous claim's mark take their turns first.
  select c.last_value, (lpad(pg_catalog.to_hex(c.last_value), 16, '0') || 'ffffffffffffffff')::uuid
  into mark_before, turn_after
  from taskman_private.claim_turn c;

  return query
  with recursive levels as (
    (select s.priority from taskman_private.task_schedule s
     where s.next_poll_at is not null
     order by s.priority desc limit 1)
    union all
    select (select s.priority from taskman_private.task_schedule s
            where s.next_poll_at is not null and s.priority < l.priority
            order by s.priority desc limit 1)
    from levels l
    where l.priority is not null
  ),
  longest_due as (
    -- The window: a batch and one of due tasks by priority then due time. SKIP
    -- LOCKED lets concurrent workers take disjoint batches without waiting on each
    -- other. A finished task has no next_poll_at, so only live tasks are found.
    select d.*
    from levels l
    cross join lateral (
      select s.task_id, s.owner, s.priority, s.next_poll_at
      from taskman_private.task_schedule s
      where s.priority = l.priority and s.next_poll_at <= now()
      order by s.next_poll_at
      limit claim_due_tasks.batch_size + 1
      for update skip locked
    ) d
    where l.priority is not null
    limit claim_due_tasks.batch_size + 1
  ),
  crowded as (
    -- A full window in which an owner has more than one task may hide other owners'
    -- due tasks behind it.
    select count(*) = claim_due_tasks.batch_size + 1
           and count(distinct w.owner) <= claim_due_tasks.batch_size as hides
    from longest_due w
  ),
  owners_after (task_id, owner, priority, next_poll_at) as (
    -- The owners with tasks to poll, from the mark on, each with its longest due task:
    -- one probe each.
    (select s.task_id, s.owner, s.priority, s.next_poll_at from taskman_private.task_schedule s
     where s.owner > turn_after and s.next_poll_at is not null and s.lease_owner is null
     order by s.owner, s.next_poll_at limit 1)
    union all
    select n.*
    from owners_after o
    cross join lateral (
      select s.task_id, s.owner, s.priority, s.next_poll_at
      from taskman_private.task_schedule s
      where s.owner > o.owner and s.next_poll_at is not null and s.lease_owner is null
      order by s.owner, s.next_poll_at limit 1
    ) n
  ),
  owners_before (task_id, owner, priority, next_poll_at) as (
    -- Then around from the first owner up to the mark.
    (select s.task_id, s.owner, s.priority, s.next_poll_at from taskman_private.task_schedule s
     where s.owner <= turn_after and s.next_poll_at is not null and s.lease_owner is null
     order by s.owner, s.next_poll_at limit 1)
    union all
    select n.*
    from owners_before o
    cross join lateral (
      select s.task_id, s.owner, s.priority, s.next_poll_at
      from taskman_private.task_schedule s
      where s.owner > o.owner and s.owner <= turn_after
        and s.next_poll_at is not null and s.lease_owner is null
      order by s.owner, s.next_poll_at limit 1
    ) n
  ),
  looked_up as (
    -- Only when the window is crowded: up to `reach` owners, in turn order.
    select w.*
    from (select * from owners_after union all select * from owners_before) w
    where (select c.hides from crowded c)
    limit reach
  ),
  heads as (
    -- The looked-up owners' longest due tasks that the window does not hold, locked
    -- as the window's are.
    select u.task_id, u.owner, u.priority, u.next_poll_at
    from looked_up u
    cross join lateral (
      select 1 from taskman_private.task_schedule s
      where s.task_id = u.task_id and s.next_poll_at <= now()
      for update skip locked
    ) l
    where u.next_poll_at <= now() and u.task_id not in (select w.task_id from longest_due w)
  ),
  due as (
    -- Every owner's first task, then every owner's second, and so on; within a turn,
    -- the owners after the mark first. What the batch leaves is unlocked when the
    -- claim commits.
    select c.task_id, c.owner,
           row_number() over (order by c.turn, c.owner <= turn_after, c.owner) as ord
    from (select c.*, row_number() over (partition by c.owner
                                         order by c.priority desc, c.next_poll_at) as turn
          from (select * from longest_due union all select * from heads) c) c
    order by ord
    limit claim_due_tasks.batch_size
  ),
  claimed as (
    -- By key (= ANY of the batch): a join with `due` read the whole schedule.
    update taskman_private.task_schedule s
    set lease_owner = claim_due_tasks.worker_id,
        lease_expires_at = now() + make_interval(secs => claim_due_tasks.lease_seconds),
        next_poll_at = now() + make_interval(secs => claim_due_tasks.lease_seconds)
    where s.task_id = any(array(select due.task_id from due))
    returning s.task_id, s.attempt_count, s.error_count, s.lease_expires_at
  ),
  mark as (
    -- The next claim's turns start after the last owner served, or after the last
    -- owner looked up when this claim did not get round them all (the next one looks
    -- further). Written only when it moves.
    select pg_catalog.setval('taskman_private.claim_turn', m.mark)
    from (select ('x' || pg_catalog.translate(left(coalesce(
                   (select u.owner from looked_up u offset reach - 1 limit 1),
                   (select d.owner from due d order by d.ord desc limit 1))::text, 18),
                 '-', ''))::bit(64)::bigint as mark) m
    where m.mark is distinct from mark_before
  ),
  rows as (
    -- Each task's rows by key (OFFSET 0 keeps the lookups per claimed task).
    select d.ord, c.task_id, c.attempt_count, c.error_count, c.lease_expires_at, t.*, p.*
    from claimed c
    join due d on d.task_id = c.task_id
    cross join lateral (
      select t.poll_url, t.poll_method, t.poll_body, t.task_type, t.poll_config, t.status,
             t.max_attempts, t.poll_interval_seconds, t.deadline_at, t.submitted_at,
             t.submit_url, t.submit_method, t.submit_body
      from taskman.tasks t where t.task_id = c.task_id offset 0
    ) t
    left join lateral (
      select p.poll_headers, p.submit_headers, p.submit_callback_token
      from taskman_private.task_private p where p.task_id = c.task_id offset 0
    ) p on true
  ),
  profiles as materialized (
    -- One lookup a distinct (task_type, poll_config) of the batch.
    select k.task_type, k.poll_config,
           taskman_private.effective_profile(k.task_type, k.poll_config) as profile
    from (select distinct r.task_type, r.poll_config from rows r) k
  )
  select r.task_id, r.poll_url, r.poll_method, coalesce(r.poll_headers, '{}'::jsonb), r.poll_body,
         f.profile, r.task_type, r.status,
         r.attempt_count, r.error_count, r.max_attempts, r.poll_interval_seconds, r.deadline_at,
         r.lease_expires_at,
         case when r.submitted_at is null then r.submit_url end,
         r.submit_method,
         case when r.submitted_at is null and r.submit_url is not null
              then coalesce(r.submit_headers, '{}'::jsonb) end,
         case when r.submitted_at is null then r.submit_body end,
         case when r.submitted_at is null then r.submit_callback_token end
  from rows r
  join profiles f on f.task_type = r.task_type and f.poll_config = r.poll_config
  left join mark on true
  order by r.ord;
end
$$;
