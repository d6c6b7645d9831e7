-- Notifications: the durable outbox, filled in the transaction that ends a task, and
-- the functions the worker delivers it with (claim, record each attempt with backoff,
-- hold callbacks for hosts that are down, give up stale ones); and owners' own secrets
-- for signing their completion callbacks.

-- The durable outbox: when a task ends, its Slack alert (failures only) and its
-- completion callback are written in the same transaction as the status change,
-- so nothing is lost when a receiver is down or the worker restarts. The worker
-- delivers rows and records each attempt in task_events. Host alerts (a circuit
-- opening or closing) have no task.
create table taskman_private.outbox (
  outbox_id bigint generated always as identity primary key,
  task_id uuid references taskman.tasks (task_id) on delete cascade,
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

-- What the in-order check probes, one lookup a candidate row (outbox_due_idx would be
-- walked whole for each: a 2,000-row burst took 0.4 s a claim).
create index outbox_undelivered_task_idx on taskman_private.outbox (task_id, channel, outbox_id)
  where delivered_at is null and given_up_at is null;

-- Every foreign key covered by an index (the Advisor's performance rule): deleting
-- a task would otherwise scan the whole outbox for its deliveries.
create index outbox_task_idx on taskman_private.outbox (task_id);

alter table taskman_private.outbox enable row level security;
revoke all on taskman_private.outbox from public, anon, authenticated;
grant select, insert, update, delete on taskman_private.outbox to service_role;

-- When a task ends: its completion callback (if it has a callback_url) and, for a
-- failure, its Slack alert, in the transaction that ends it. Enqueueing a callback sends
-- NOTIFY on `taskman_outbox` (payload 'callback') at commit, so a worker delivers it at
-- once; a channel of its own, so the edge's change feed (channel `taskman`) carries only
-- task changes. One transaction ending many tasks sends one notification (PostgreSQL
-- folds equal payloads). Slack alerts send none: they keep their digest window.
create or replace function taskman_private.tasks_enqueue_notifications()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  body jsonb := taskman.task_json(new);
begin
  if new.callback_url is not null then
    insert into taskman_private.outbox (task_id, channel, payload) values (new.task_id, 'callback', body);
    perform pg_catalog.pg_notify('taskman_outbox', 'callback');
  end if;
  -- Alerts are for final failures only (timeouts included), never for
  -- intermediate states or cancellations.
  if new.status = 'failed' then
    insert into taskman_private.outbox (task_id, channel, payload) values (new.task_id, 'slack', body);
  end if;
  return null;
end
$$;
revoke all on function taskman_private.tasks_enqueue_notifications from public, anon, authenticated;

create trigger tasks_enqueue_notifications after update of status on taskman.tasks
  for each row when (old.status is distinct from new.status
                     and new.status in ('completed', 'failed', 'cancelled')
                     and (new.callback_url is not null or new.status = 'failed'))
  execute function taskman_private.tasks_enqueue_notifications();

-- Any number of workers deliver one outbox: claims take row locks with SKIP LOCKED and
-- a lease, so a crashed worker's rows fall due again when the lease ends; results are
-- written back only by the lease holder, one statement a batch, each attempt recorded
-- in task_events. Delivery is at least once: a worker that dies between sending and
-- recording sends again. `only_channel` claims only 'callback' or only 'slack' rows;
-- `skip_hosts` leaves callback hosts this worker already keeps busy for later or for
-- other workers, so one slow receiver cannot fill a worker with its rows. Each task's
-- notifications of one channel go in order: a row is not claimed while an earlier one
-- of its task and channel is undelivered and not given up. Host alerts have no task.
-- Reads by index whatever the statistics say (enable_seqscan off).
create or replace function taskman.claim_outbox(worker_id text, batch_size integer default 100,
                                               lease_seconds integer default 60,
                                               only_channel text default null,
                                               skip_hosts text[] default null)
returns table (outbox_id bigint, task_id uuid, channel text, payload jsonb, attempts integer)
language plpgsql volatile security definer
set search_path = ''
-- Lookups by key stay index scans whatever the statistics say (50_worker_api.sql).
set enable_seqscan = off
as $$
begin
  perform taskman_private.check_claim(worker_id, batch_size, lease_seconds);
  if only_channel is not null and only_channel not in ('slack', 'callback') then
    perform taskman_private.reject('only_channel', 'must be slack, callback or null (both)');
  end if;
  if pg_catalog.cardinality(claim_outbox.skip_hosts) > 10000 then
    perform taskman_private.reject('skip_hosts', 'must list at most 10000 hosts');
  end if;

  return query
  with due as (
    select o.outbox_id
    from taskman_private.outbox o
    where o.delivered_at is null and o.given_up_at is null and o.next_attempt_at <= now()
      and (claim_outbox.only_channel is null or o.channel = claim_outbox.only_channel)
      and (claim_outbox.skip_hosts is null or o.channel <> 'callback'
           or coalesce(substring(o.payload ->> 'callback_url' from '^[^:/?#]+://([^/?#]*)'), '')
              <> all (claim_outbox.skip_hosts))
      and (o.task_id is null or o.outbox_id = (
        select min(p.outbox_id) from taskman_private.outbox p
        where p.task_id = o.task_id and p.channel = o.channel
          and p.delivered_at is null and p.given_up_at is null))
    order by o.next_attempt_at
    limit claim_outbox.batch_size
    for update of o skip locked
  )
  update taskman_private.outbox o
  set lease_owner = claim_outbox.worker_id,
      next_attempt_at = now() + make_interval(secs => claim_outbox.lease_seconds)
  from due
  where o.outbox_id = due.outbox_id
  returning o.outbox_id, o.task_id, o.channel, o.payload, o.attempts;
end
$$;
revoke all on function taskman.claim_outbox from public, anon, authenticated;
grant execute on function taskman.claim_outbox to service_role;

-- The worker's outbox claim: claim_outbox's rows with each callback's headers, read by
-- key in a function whose statements cannot choose a sequential scan (on the statistics
-- of empty tables, a new project or right after an ANALYZE, a join in the worker's own
-- statement read the whole of task_private once per claim).
create or replace function taskman.claim_deliveries(worker_id text, batch_size integer default 100,
                                                    lease_seconds integer default 60,
                                                    only_channel text default null,
                                                    skip_hosts text[] default null)
returns table (outbox_id bigint, task_id uuid, channel text, payload jsonb, attempts integer,
               headers jsonb)
language plpgsql volatile security definer
set search_path = ''
set enable_seqscan = off
as $$
begin
  return query
  select c.outbox_id, c.task_id, c.channel, c.payload, c.attempts,
         case when c.channel = 'callback' then p.callback_headers end
  from taskman.claim_outbox(claim_deliveries.worker_id, claim_deliveries.batch_size,
                            claim_deliveries.lease_seconds, claim_deliveries.only_channel,
                            claim_deliveries.skip_hosts) c
  left join lateral (
    select p.callback_headers from taskman_private.task_private p
    where p.task_id = c.task_id offset 0
  ) p on true;
end
$$;
revoke all on function taskman.claim_deliveries from public, anon, authenticated;
grant execute on function taskman.claim_deliveries to service_role;

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
-- max_delay_seconds, with jitter (50-100%) so a recovering receiver is not hit by every
-- row at once, or after Retry-After when that is longer. The max_attempts-th failure
-- gives up. The lease is checked where the row is written (a row changed meanwhile, say
-- claimed again by another worker, is re-read there and skipped), and each event takes
-- what it says from the written row.
create or replace function taskman.record_outbox_results(
  results jsonb,
  max_attempts integer default 12,
  base_delay_seconds double precision default 5,
  max_delay_seconds double precision default 3600
)
returns table (outbox_id bigint, outcome text)
language plpgsql volatile security definer
set search_path = ''
-- Lookups by key stay index scans whatever the statistics say (50_worker_api.sql).
set enable_seqscan = off
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
revoke all on function taskman.record_outbox_results from public, anon, authenticated;
grant execute on function taskman.record_outbox_results to service_role;

-- A worker stopping gracefully gives back the notifications it claimed and did not
-- record (sends cut off by the shutdown grace, rows still waiting for their host): they
-- are due at once, and a callback given back wakes the workers (NOTIFY taskman_outbox)
-- instead of waiting for its lease to end. Not an attempt: the count and the backoff
-- stay as they were, and the delivery id (outbox_id) is the same when it goes out again.
create or replace function taskman.release_outbox(worker_id text, only_channel text default null)
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
revoke all on function taskman.release_outbox from public, anon, authenticated;
grant execute on function taskman.release_outbox to service_role;

-- Completion callbacks go through their receivers' host circuits (70_hosts.sql): a
-- callback whose receiver host (host_key of its callback_url) has an open circuit or a
-- Retry-After pause is not sent; it stays due, with its delivery id, and spends no
-- attempt. After a callback claim that has rows for such hosts, one call for the batch:
-- the rows their hosts do not let go now are given back (lease cleared, due now,
-- attempts unchanged) and returned. Of an open host whose probe is due, the first row
-- goes as the probe and the next probe is scheduled after the cool-down (as
-- admit_tasks does for polls). With take_probes false nothing goes to such a host: the
-- stream gives back a failed probe that way, so probes during an outage do not spend
-- attempts.
create or replace function taskman.hold_callbacks(worker_id text, requests jsonb,
                                                  cooldown_seconds double precision default 5,
                                                  max_cooldown_seconds double precision default 300,
                                                  take_probes boolean default true)
returns setof bigint
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  probing text[];
begin
  if worker_id is null or length(worker_id) not between 1 and 200 then
    perform taskman_private.reject('worker_id', 'must be 1 to 200 characters');
  end if;
  if jsonb_typeof(requests) is distinct from 'array' then
    perform taskman_private.reject('requests', 'must be a JSON array of {outbox_id, host}');
  end if;
  if jsonb_array_length(requests) > 10000 then
    perform taskman_private.reject('requests', 'must list at most 10000 callbacks');
  end if;
  if exists (select 1 from jsonb_array_elements(requests) e
             where jsonb_typeof(e) is distinct from 'object'
                or jsonb_typeof(e -> 'outbox_id') is distinct from 'number') then
    perform taskman_private.reject('requests', 'each element needs a numeric outbox_id');
  end if;
  perform taskman_private.check_host_timing(cooldown_seconds, max_cooldown_seconds, 0);

  -- Locked in host order, as admit_tasks and record_host_outcomes lock them.
  perform 1 from taskman_private.hosts h
  where h.host in (select e ->> 'host' from jsonb_array_elements(requests) e)
  order by h.host
  for update;

  if take_probes then
    with taken as (
      update taskman_private.hosts h
      set probes = h.probes + 1,
          next_probe_at = now() + taskman_private.host_cooldown(h.probes + 1, cooldown_seconds,
                                                                max_cooldown_seconds),
          updated_at = now()
      where h.host in (select e ->> 'host' from jsonb_array_elements(requests) e)
        and h.state = 'open' and h.next_probe_at <= now()
        and not coalesce(h.paused_until > now(), false)
      returning h.host
    )
    select array_agg(t.host) into probing from taken t;
  end if;

  return query
  with batch as (
    select (b.e ->> 'outbox_id')::bigint as outbox_id, b.e ->> 'host' as host,
           row_number() over (partition by b.e ->> 'host' order by b.ord) as pos
    from jsonb_array_elements(requests) with ordinality as b(e, ord)
  ),
  held as (
    select b.outbox_id
    from batch b
    join taskman_private.hosts h on h.host = b.host
    where h.paused_until > now()
       or h.state = 'open' and not (b.pos = 1 and b.host = any(coalesce(probing, '{}')))
  ),
  counted as (
    update taskman_private.hosts h
    set throttled_total = h.throttled_total + c.n
    from (select b.host, count(*) as n from batch b join held using (outbox_id)
          group by b.host) c
    where h.host = c.host
    returning 1
  )
  update taskman_private.outbox o
  set lease_owner = null, next_attempt_at = now()
  from held hd
  where o.outbox_id = hd.outbox_id and o.lease_owner = hold_callbacks.worker_id
    and o.channel = 'callback' and o.delivered_at is null and o.given_up_at is null
  returning o.outbox_id;
end
$$;
revoke all on function taskman.hold_callbacks from public, anon, authenticated;
grant execute on function taskman.hold_callbacks to service_role;

-- Gives up, in batches, the notifications (callbacks and Slack alerts, a task's or a
-- host's) still undelivered `older_than` after they were enqueued: given_up_at is set,
-- last_error says why, and a task's history gets `notification_given_up` with reason
-- `expired`, as a dead letter by attempts does. One being sent now (leased, its lease
-- not over) is left to its sender. The worker runs it with
-- TASKMAN_OUTBOX_MAX_AGE_HOURS (default 72; 0: never by age).
create or replace function taskman.give_up_stale_notifications(older_than interval,
                                                               batch_size integer default 200)
returns table (given_up bigint, done boolean)
language plpgsql volatile security definer
set search_path = ''
-- The undelivered rows by outbox_due_idx, never the delivered ones kept for retention.
set enable_seqscan = off
as $$
declare
  stale bigint[];
begin
  perform taskman_private.check_batch(older_than, batch_size);

  -- Locked, skipping any a transaction holds (a sender claiming or recording it).
  select array_agg(o.outbox_id) into stale
  from (select o.outbox_id
        from taskman_private.outbox o
        where o.delivered_at is null and o.given_up_at is null
          and o.created_at < now() - older_than
          and (o.lease_owner is null or o.next_attempt_at <= now())
        limit batch_size
        for update skip locked) o;

  with expired as (
    update taskman_private.outbox o
    set given_up_at = now(), lease_owner = null,
        last_error = left('undelivered ' || pg_catalog.justify_interval(
                            date_trunc('minute', now() - o.created_at))::text
                          || ' after it was enqueued'
                          || coalesce(' (last: ' || o.last_error || ')', ''), 4000)
    where o.outbox_id = any(stale)
    returning o.task_id, o.channel, o.attempts
  )
  insert into taskman.task_events (task_id, user_id, event_type, detail)
  select e.task_id, t.user_id, 'notification_given_up',
         jsonb_build_object('channel', e.channel, 'attempt', e.attempts, 'reason', 'expired')
  from expired e
  join taskman.tasks t on t.task_id = e.task_id;

  return query select coalesce(cardinality(stale), 0)::bigint,
                      coalesce(cardinality(stale), 0) < batch_size;
end
$$;
revoke all on function taskman.give_up_stale_notifications from public, anon, authenticated;
grant execute on function taskman.give_up_stale_notifications to service_role;

-- Owners' own callback signing secrets. A user who has one gets every completion
-- callback of their tasks signed with it (Standard Webhooks `webhook-signature`), not
-- with the deployment's shared TASKMAN_CALLBACK_SECRET, so no other tenant can make a
-- callback their receiver accepts. `rotate_callback_secret` creates or replaces it and
-- returns it once; the one it replaces keeps signing beside it for the grace asked
-- (default a day), so receivers can switch without losing a callback. Service-only
-- storage: RLS with no policy, no grant to the API roles. The worker reads what changed
-- since its last look (callback_secrets_rotated_idx) every few seconds.
create table taskman_private.callback_secrets (
  user_id uuid primary key,
  secret text not null,
  previous_secret text,
  previous_valid_until timestamptz,
  rotated_at timestamptz not null default now(),
  check ((previous_secret is null) = (previous_valid_until is null))
);

create index callback_secrets_rotated_idx on taskman_private.callback_secrets (rotated_at);

alter table taskman_private.callback_secrets enable row level security;
revoke all on taskman_private.callback_secrets from public, anon, authenticated;
grant select, insert, update, delete on taskman_private.callback_secrets to service_role;

-- The caller's new secret (`whsec_` + base64 of 32 random bytes: two v4 UUIDs' bytes,
-- 244 random bits from the server's strong random source), shown once.
create or replace function taskman_private.rotate_callback_secret(keep_previous_seconds integer)
returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  owner uuid := auth.uid();
  fresh text := 'whsec_' || pg_catalog.encode(
    pg_catalog.uuid_send(pg_catalog.gen_random_uuid())
      || pg_catalog.uuid_send(pg_catalog.gen_random_uuid()), 'base64');
  kept taskman_private.callback_secrets;
begin
  perform taskman_private.require_user();
  if owner is null then
    raise exception using errcode = '42501',
      message = 'callback secrets belong to signed-in users: the service''s own callbacks'
                ' are signed with TASKMAN_CALLBACK_SECRET';
  end if;
  if keep_previous_seconds is null or keep_previous_seconds not between 0 and 604800 then
    perform taskman_private.reject('keep_previous_seconds',
                                   'must be between 0 and 604800 (7 days)');
  end if;
  insert into taskman_private.callback_secrets as c (user_id, secret, rotated_at)
  values (owner, fresh, pg_catalog.now())
  on conflict (user_id) do update
    set previous_secret = case when keep_previous_seconds > 0 then c.secret end,
        previous_valid_until = case when keep_previous_seconds > 0
                                    then pg_catalog.now()
                                         + pg_catalog.make_interval(secs => keep_previous_seconds)
                               end,
        secret = excluded.secret,
        rotated_at = excluded.rotated_at
  returning * into kept;
  return pg_catalog.jsonb_build_object(
    'secret', fresh, 'rotated_at', kept.rotated_at,
    'previous_valid_until', kept.previous_valid_until);
end
$$;
revoke all on function taskman_private.rotate_callback_secret from public, anon;
grant execute on function taskman_private.rotate_callback_secret to authenticated, service_role;

create or replace function taskman.rotate_callback_secret(keep_previous_seconds integer default 86400)
returns jsonb
language sql volatile security invoker
set search_path = ''
as $$
  select taskman_private.rotate_callback_secret(keep_previous_seconds)
$$;
revoke all on function taskman.rotate_callback_secret from public, anon;
grant execute on function taskman.rotate_callback_secret to authenticated, service_role;
comment on function taskman.rotate_callback_secret is
  'Create or replace the caller''s callback signing secret (returned once); the one it '
  'replaces keeps signing for keep_previous_seconds. See docs/callbacks.md.';
