-- The durable outbox: when a task ends, its Slack alert (failures only) and its
-- completion callback are written in the same transaction as the status change,
-- so nothing is lost when a receiver is down or the worker restarts. The worker
-- delivers rows and records each attempt in task_events.

create table taskman_private.outbox (
  outbox_id bigint generated always as identity primary key,
  task_id uuid not null references taskman.tasks (task_id) on delete cascade,
  channel text not null constraint outbox_channel_check check (channel in ('slack', 'callback')),
  -- The task's public JSON when it ended: what the receiver is told.
  payload jsonb not null,
  attempts integer not null default 0,
  next_attempt_at timestamptz not null default now(),
  last_error text,
  delivered_at timestamptz,
  given_up_at timestamptz,
  lease_owner text,
  created_at timestamptz not null default now()
);

-- Deliverable rows only, by due time: delivered and abandoned rows drop out.
create index outbox_due_idx on taskman_private.outbox (next_attempt_at)
  where delivered_at is null and given_up_at is null;

create function taskman_private.tasks_enqueue_notifications()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  body jsonb := taskman.task_json(new);
begin
  if new.callback_url is not null then
    insert into taskman_private.outbox (task_id, channel, payload) values (new.task_id, 'callback', body);
  end if;
  -- Alerts are for final failures only (timeouts included), never for
  -- intermediate states or cancellations.
  if new.status = 'failed' then
    insert into taskman_private.outbox (task_id, channel, payload) values (new.task_id, 'slack', body);
  end if;
  return null;
end
$$;

create trigger tasks_enqueue_notifications after update of status on taskman.tasks
  for each row when (old.status is distinct from new.status
                     and new.status in ('completed', 'failed', 'cancelled'))
  execute function taskman_private.tasks_enqueue_notifications();
