-- Leases given back at shutdown, progress reported by callbacks in the change feed,
-- and cheaper records of delivery attempts.
--
-- - release_outbox: a worker stopping gracefully gives back the notifications it
--   claimed and did not record (sends cut off by the shutdown grace, rows still
--   waiting for their host): they are due at once, and a callback given back wakes
--   the workers (NOTIFY taskman_outbox) instead of waiting for its lease to end.
--   Not an attempt: the count and the backoff stay as they were, and the delivery id
--   (outbox_id) is the same when it goes out again.
-- - update_task: a report that changes progress and not the status (a callback token
--   holder's, or the service's) marks its `callback_received` event with
--   `news: progress` and the progress, as record_poll_results marks a poll's: the
--   edge's /events, reading task_events when it cannot LISTEN, then carries it as
--   NOTIFY does.
-- - record_outbox_results: the same results, checks and events, with less work a row
--   (see below); the enqueue trigger no longer fires for tasks with nothing to enqueue.

create function taskman.release_outbox(worker_id text, only_channel text default null)
returns integer
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  released integer;
  callbacks boolean;
begin
  if worker_id is null or worker_id = '' then
    perform taskman_private.reject('worker_id', 'must be a non-empty string');
  end if;
  if only_channel is not null and only_channel not in ('slack', 'callback') then
    perform taskman_private.reject('only_channel', 'must be slack, callback or null (both)');
  end if;
  -- Walks outbox_due_idx (undelivered rows only); a lease moved on to another
  -- worker is not this one's to give back.
  with given_back as (
    update taskman_private.outbox o
    set lease_owner = null, next_attempt_at = now()
    where o.lease_owner = release_outbox.worker_id
      and o.delivered_at is null and o.given_up_at is null
      and (release_outbox.only_channel is null or o.channel = release_outbox.only_channel)
    returning o.channel
  )
  select count(*)::integer, coalesce(bool_or(g.channel = 'callback'), false)
  into released, callbacks
  from given_back g;
  if callbacks then
    perform pg_catalog.pg_notify('taskman_outbox', 'callback');
  end if;
  return released;
end
$$;

revoke all on function taskman.release_outbox(text, text) from public, anon, authenticated;
grant execute on function taskman.release_outbox(text, text) to service_role;

-- As in 20261201001100_submit_heartbeat_priority.sql, but for the event's marker.
create or replace function taskman_private.update_task(
  task_id uuid,
  status text default null,
  result jsonb default null,
  error_message text default null,
  progress integer default null,
  progress_message text default null,
  callback_token text default null
)
returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  t taskman.tasks;
  before taskman.tasks;
  token_hash bytea;
  by_service boolean := taskman_private.caller_is_service();
  progressed boolean;
begin
  select * into t from taskman.tasks x where x.task_id = update_task.task_id for update;
  if not by_service then
    select p.callback_token_hash into token_hash
    from taskman_private.task_private p where p.task_id = update_task.task_id;
    if t.task_id is null or update_task.callback_token is null or token_hash is null
       or token_hash <> sha256(convert_to(update_task.callback_token, 'UTF8')) then
      raise exception using errcode = 'PT403',
        message = 'a valid callback_token is required to update this task';
    end if;
  elsif t.task_id is null then
    raise exception using errcode = 'PT404', message = format('task %s not found', update_task.task_id);
  end if;

  if update_task.status is not null
     and update_task.status not in ('in_progress', 'completed', 'failed', 'cancelled') then
    perform taskman_private.reject('status', 'must be one of in_progress, completed, failed, cancelled');
  end if;
  if update_task.status = 'cancelled' and not by_service then
    perform taskman_private.reject('status', 'cancelled can only be set by the owner through cancel_task');
  end if;

  if t.status in ('completed', 'failed', 'cancelled') then
    if update_task.status is distinct from t.status then
      raise exception using errcode = 'PT409',
        message = format('task %s is already %s and cannot be updated', t.task_id, t.status),
        hint = 'Terminal tasks change only through retry_task.';
    end if;
    return case when by_service then taskman.task_json(t)
                else jsonb_build_object('task_id', t.task_id, 'status', t.status) end;
  end if;

  if t.heartbeat_seconds is not null then
    update taskman_private.task_schedule s set alive_at = now() where s.task_id = t.task_id;
  end if;

  if (coalesce(update_task.status, t.status), coalesce(update_task.result, t.result),
         coalesce(update_task.progress, t.progress),
         coalesce(update_task.progress_message, t.progress_message))
        is distinct from (t.status, t.result, t.progress, t.progress_message) then
    before := t;
    update taskman.tasks x set
      status = coalesce(update_task.status, x.status),
      result = coalesce(update_task.result, x.result),
      error_code = case when update_task.status = 'failed' then 'remote_failed' else x.error_code end,
      error_message = case when update_task.status = 'failed' and by_service
                           then update_task.error_message else x.error_message end,
      progress = coalesce(update_task.progress, x.progress),
      progress_message = coalesce(update_task.progress_message, x.progress_message)
    where x.task_id = update_task.task_id
    returning * into t;

    -- What tasks_after_progress_change NOTIFYs: progress moved, the status did not.
    progressed := t.status = before.status
      and (t.progress, t.progress_message) is distinct from (before.progress, before.progress_message);
    insert into taskman.task_events (task_id, user_id, event_type, to_status, detail)
    values (t.task_id, t.user_id, 'callback_received', t.status,
            jsonb_build_object('via', case when by_service then 'service' else 'callback_token' end)
            || case when progressed
                    then jsonb_strip_nulls(jsonb_build_object('news', 'progress',
                                                              'progress', t.progress))
                    else '{}' end);
  end if;

  if not by_service and update_task.error_message is not null then
    insert into taskman_private.task_private as p (task_id, last_error)
    values (t.task_id, left(update_task.error_message, 4000))
    on conflict on constraint task_private_pkey
    do update set last_error = excluded.last_error, updated_at = now()
    where p.last_error is distinct from excluded.last_error;
  end if;

  return case when by_service then taskman.task_json(t)
              else jsonb_build_object('task_id', t.task_id, 'status', t.status) end;
end
$$;

-- record_outbox_results, cheaper for a burst's batches (same arguments, checks and
-- outcomes): the lease is checked where the row is written (a row changed meanwhile,
-- say claimed again by another worker, is re-read there and skipped), instead of by
-- locking every row first; and each event takes what it says from the written row,
-- instead of joining two CTEs, which the planner did in a nested loop (a 500-row batch
-- compared 250,000 pairs).
create or replace function taskman.record_outbox_results(
  results jsonb,
  max_attempts integer default 12,
  base_delay_seconds double precision default 5,
  max_delay_seconds double precision default 3600
)
returns table (outbox_id bigint, outcome text)
language plpgsql volatile security definer
set search_path = ''
as $$
begin
  if jsonb_typeof(results) is distinct from 'array' then
    perform taskman_private.reject('results', 'must be a JSON array of delivery results');
  end if;
  if exists (select 1 from jsonb_to_recordset(results) as r(outbox_id bigint, worker_id text, outcome text)
             where r.outbox_id is null or r.worker_id is null
                or r.outcome is null or r.outcome not in ('delivered', 'failed', 'given_up')) then
    perform taskman_private.reject('results',
      'each result needs outbox_id, worker_id and outcome (delivered, failed or given_up)');
  end if;
  if max_attempts is null or max_attempts not between 1 and 1000 then
    perform taskman_private.reject('max_attempts', 'must be between 1 and 1000');
  end if;
  if base_delay_seconds is null or max_delay_seconds is null
     or base_delay_seconds <= 0 or max_delay_seconds < base_delay_seconds then
    perform taskman_private.reject('base_delay_seconds',
      'must be positive and at most max_delay_seconds');
  end if;

  return query
  with attempt as (
    select r.outbox_id, r.worker_id, r.outcome, left(r.reason, 100) as reason, r.http_status,
           r.latency_ms, greatest(r.retry_after_seconds, 0) as retry_after_seconds, r.digest_size,
           left(r.error, 4000) as error
    from jsonb_to_recordset(results) as r(
      outbox_id bigint, worker_id text, outcome text, reason text, http_status integer,
      latency_ms double precision, retry_after_seconds double precision, digest_size integer,
      error text)
  ),
  decided as (
    -- Only the lease holder writes its rows' attempts, so these counts are current.
    select a.*, o.attempts + 1 as attempt,
           case
             when a.outcome = 'delivered' then 'delivered'
             when a.outcome = 'given_up' or o.attempts + 1 >= record_outbox_results.max_attempts
               then 'given_up'
             else 'failed'
           end as final
    from attempt a
    join taskman_private.outbox o on o.outbox_id = a.outbox_id
    where o.lease_owner = a.worker_id and o.delivered_at is null and o.given_up_at is null
  ),
  written as (
    update taskman_private.outbox o
    set attempts = d.attempt,
        lease_owner = null,
        delivered_at = case when d.final = 'delivered' then now() end,
        given_up_at = case when d.final = 'given_up' then now() end,
        last_error = case when d.final = 'delivered' then null else coalesce(d.error, d.reason) end,
        next_attempt_at = case when d.final <> 'failed' then o.next_attempt_at else
          now() + make_interval(secs => greatest(
            coalesce(d.retry_after_seconds, 0),
            least(record_outbox_results.max_delay_seconds,
                  record_outbox_results.base_delay_seconds * power(2, least(d.attempt - 1, 40)))
              * (0.5 + random() / 2))) end
    from decided d
    -- The lease again, as of the row's latest version if it changed since the snapshot.
    where o.outbox_id = d.outbox_id
      and o.lease_owner = d.worker_id and o.delivered_at is null and o.given_up_at is null
    returning o.outbox_id, o.task_id, o.channel, o.attempts, o.next_attempt_at, d.final,
              d.reason, d.http_status, d.latency_ms, d.digest_size
  ),
  events as (
    insert into taskman.task_events (task_id, user_id, event_type, detail)
    select w.task_id, t.user_id,
           case
             when w.final = 'failed' then 'notification_failed'
             when w.final = 'given_up' then 'notification_given_up'
             when w.channel = 'slack' then 'alert_sent'
             else 'notification_delivered'
           end,
           jsonb_strip_nulls(jsonb_build_object(
             'channel', w.channel, 'attempt', w.attempts, 'reason', w.reason,
             'http_status', w.http_status, 'latency_ms', round(w.latency_ms::numeric, 1),
             'digest_size', w.digest_size,
             'next_attempt_at', case when w.final = 'failed' then w.next_attempt_at end))
    from written w
    join taskman.tasks t on t.task_id = w.task_id
  )
  select w.outbox_id, w.final from written w;
end
$$;

-- The enqueue trigger fires only for a task that has something to enqueue (a
-- callback, or a failure's alert): it built every finished task's JSON, a third of
-- the cost of finishing a task without a callback_url.
drop trigger tasks_enqueue_notifications on taskman.tasks;
create trigger tasks_enqueue_notifications after update of status on taskman.tasks
  for each row when (old.status is distinct from new.status
                     and new.status in ('completed', 'failed', 'cancelled')
                     and (new.callback_url is not null or new.status = 'failed'))
  execute function taskman_private.tasks_enqueue_notifications();
