-- Delivering the outbox (service_role only), and reading a third party's
-- callback with its task's profile (callback token holders).
--
-- Any number of workers deliver one outbox: claims take row locks with SKIP
-- LOCKED and a lease, so a crashed worker's rows fall due again when the lease
-- ends; results are written back only by the lease holder, one statement a
-- batch, each attempt recorded in task_events. Delivery is at least once: a
-- worker that dies between sending and recording sends again.

create function taskman.claim_outbox(worker_id text, batch_size integer default 100,
                                    lease_seconds integer default 60)
returns table (outbox_id bigint, task_id uuid, channel text, payload jsonb, attempts integer)
language plpgsql volatile security definer
set search_path = ''
as $$
begin
  perform taskman_private.check_claim(worker_id, batch_size, lease_seconds);

  return query
  with due as (
    -- Walks outbox_due_idx in due order; SKIP LOCKED lets concurrent workers
    -- take disjoint batches. Pushing next_attempt_at to the lease expiry hides
    -- claimed rows from other workers until the lease ends.
    select o.outbox_id
    from taskman_private.outbox o
    where o.delivered_at is null and o.given_up_at is null and o.next_attempt_at <= now()
    order by o.next_attempt_at
    limit claim_outbox.batch_size
    for update skip locked
  )
  update taskman_private.outbox o
  set lease_owner = claim_outbox.worker_id,
      next_attempt_at = now() + make_interval(secs => claim_outbox.lease_seconds)
  from due
  where o.outbox_id = due.outbox_id
  returning o.outbox_id, o.task_id, o.channel, o.payload, o.attempts;
end
$$;

-- Writes a batch of delivery attempts. Each element of `results`:
--   outbox_id, worker_id   the claim being answered (ignored if the lease moved on)
--   outcome                delivered | failed (retried with backoff) |
--                          given_up (permanent: e.g. no Slack configured)
--   reason                 short machine-readable cause shown to owners
--                          (http_status, timeout, connection_error, ...)
--   http_status, latency_ms, retry_after_seconds (the receiver's Retry-After),
--   digest_size            how many alerts one Slack message carried
--   error                  raw error text, service-only (outbox.last_error)
-- A failed row is retried after base * 2^(attempt-1) seconds, capped at
-- max_delay_seconds, with jitter (50-100%) so a recovering receiver is not hit
-- by every row at once, or after Retry-After when that is longer. The
-- max_attempts-th failure gives up.
create function taskman.record_outbox_results(
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
    for update of o
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
    where o.outbox_id = d.outbox_id
    returning o.outbox_id, o.task_id, o.channel, o.attempts, o.next_attempt_at, d.final
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
             'channel', w.channel, 'attempt', w.attempts, 'reason', d.reason,
             'http_status', d.http_status, 'latency_ms', round(d.latency_ms::numeric, 1),
             'digest_size', d.digest_size,
             'next_attempt_at', case when w.final = 'failed' then w.next_attempt_at end))
    from written w
    join decided d on d.outbox_id = w.outbox_id
    join taskman.tasks t on t.task_id = w.task_id
  )
  select w.outbox_id, w.final from written w;
end
$$;

revoke all on function taskman.claim_outbox, taskman.record_outbox_results
  from public, anon, authenticated;
grant execute on function taskman.claim_outbox, taskman.record_outbox_results to service_role;

-- The profile a third party's callback body is read with, for the holder of the
-- task's callback token (the edge's POST /callbacks/{task_id}?token=...).
-- A wrong token and an unknown task both answer PT403: no existence leak.
create function taskman.callback_profile(task_id uuid, callback_token text)
returns jsonb
language plpgsql stable security definer
set search_path = ''
as $$
declare
  profile jsonb;
begin
  select taskman_private.effective_profile(t.task_type, t.poll_config) into profile
  from taskman.tasks t
  join taskman_private.task_private p on p.task_id = t.task_id
  where t.task_id = callback_profile.task_id
    and p.callback_token_hash = sha256(convert_to(callback_profile.callback_token, 'UTF8'));
  if profile is null then
    raise exception using errcode = 'PT403',
      message = 'a valid callback_token is required to report on this task';
  end if;
  return profile;
end
$$;

revoke all on function taskman.callback_profile from public, anon, authenticated;
grant execute on function taskman.callback_profile to anon, authenticated, service_role;
