-- Each task's history, taskman.task_events, readable by its owner, and the triggers that
-- write it and wake listeners (NOTIFY) when a task changes status or progress outside
-- the worker's own batch functions (which write their events themselves).

create table taskman.task_events (
  event_id bigint generated always as identity primary key,
  task_id uuid not null references taskman.tasks (task_id) on delete cascade,
  -- Copied from the task so that RLS on events needs no join.
  user_id uuid,
  event_type text not null
    constraint task_events_type_check check (taskman_private.is_event_type(event_type)),
  from_status text,
  to_status text,
  detail jsonb not null default '{}',
  created_at timestamptz not null default clock_timestamp()
);

comment on table taskman.task_events is
  'History of each task. Holds no raw remote bodies and no secrets.';

create index task_events_task_idx on taskman.task_events (task_id, event_id);

create index task_events_user_idx on taskman.task_events (user_id, event_id);

alter table taskman.task_events enable row level security;
revoke all on taskman.task_events from public, anon, authenticated;
grant select on taskman.task_events to authenticated;
grant all on taskman.task_events to service_role;

create policy "Owners read their tasks' events" on taskman.task_events
  for select to authenticated using (user_id = (select auth.uid()));
grant all on sequence taskman.task_events_event_id_seq to service_role;

-- NOTIFY taskman with the task's id, status and owner, at commit: the worker's wake-up
-- and the edge's change feed (/events).
create or replace function taskman_private.notify_task(t taskman.tasks)
returns void
language sql volatile
set search_path = ''
as $$
  select pg_notify('taskman', json_build_object(
    'task_id', t.task_id, 'status', t.status, 'user_id', t.user_id)::text)
$$;
revoke all on function taskman_private.notify_task from public, anon, authenticated;

-- AFTER a status change: the event, the NOTIFY, and the schedule: a finished task
-- has nothing to poll and no lease; a retried one is due at once with a fresh error
-- budget. (record_poll_results has already done this for its own changes, and the
-- update is skipped then.)
create or replace function taskman_private.tasks_after_status_change()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  insert into taskman.task_events (task_id, user_id, event_type, from_status, to_status, detail)
  values (new.task_id, new.user_id,
          case when new.status = 'cancelled' then 'cancelled'
               when new.status = 'pending' then 'retried'
               else 'status_changed' end,
          old.status, new.status,
          jsonb_strip_nulls(jsonb_build_object('error_code', new.error_code)));
  if new.status = 'pending' then
    update taskman_private.task_schedule s
    set next_poll_at = new.next_poll_at, lease_owner = null, lease_expires_at = null,
        error_count = 0
    where s.task_id = new.task_id;
  elsif new.status in ('completed', 'failed', 'cancelled') then
    update taskman_private.task_schedule s
    set next_poll_at = null, lease_owner = null, lease_expires_at = null
    where s.task_id = new.task_id
      and (s.next_poll_at is not null or s.lease_owner is not null);
  end if;
  perform taskman_private.notify_task(new);
  return null;
end
$$;
revoke all on function taskman_private.tasks_after_status_change from public, anon, authenticated;

create trigger tasks_after_status_change after update of status on taskman.tasks
  for each row when (old.status is distinct from new.status
                     and (current_setting('taskman.poll_writer', true) is distinct from 'on'
                          or current_user in ('anon', 'authenticated')))
  execute function taskman_private.tasks_after_status_change();

-- Progress is a visible change too: NOTIFY it (Realtime carries the row already).
create or replace function taskman_private.tasks_after_progress_change()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  perform taskman_private.notify_task(new);
  return null;
end
$$;
revoke all on function taskman_private.tasks_after_progress_change from public, anon, authenticated;

create trigger tasks_after_progress_change after update of progress, progress_message
  on taskman.tasks
  for each row when (old.status is not distinct from new.status
                     and (old.progress, old.progress_message)
                         is distinct from (new.progress, new.progress_message)
                     and (current_setting('taskman.poll_writer', true) is distinct from 'on'
                          or current_user in ('anon', 'authenticated')))
  execute function taskman_private.tasks_after_progress_change();
