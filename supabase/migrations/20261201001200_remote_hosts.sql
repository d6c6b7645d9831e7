-- Remote hosts as first-class citizens: one row a host (scheme + host + port), shared
-- by every worker, with a circuit breaker and a rate limit.
--
-- - taskman_private.hosts: circuit state, consecutive failures, next probe time, the
--   Retry-After pause, the rate limit (requests per second, as send slots 1/rate
--   apart) and counters (failures, throttled requests). A host has a row once it has failed or
--   been given a limit; a host without one restricts nothing.
-- - task_schedule.host: the host of each task's next request (submit or poll URL),
--   kept by triggers, so a host's waiting tasks are found without reading tasks.
-- - taskman.admit_tasks: after each claim, in the claim's transaction, one call for
--   the batch: the tasks their hosts do not let go now come back, and are back in the
--   schedule (lease cleared, next_poll_at = when the host has room: the next probe,
--   the end of a Retry-After pause, a rate-limit slot). Holding a task writes its
--   schedule row only: no error budget spent, no poll counted, nothing published.
-- - taskman.record_host_outcomes: before each record_poll_results, in its
--   transaction, one call for the batch: host successes and failures (transport
--   errors, 5xx, 429). threshold consecutive failures open the circuit (its tasks
--   wait for the probe time, an alert goes to the outbox); a success closes it (the
--   tasks resume, spread over a few seconds; an alert). A failed poll against a host
--   that was already open, or is paused, is held back (returned, and released to the
--   schedule) instead of being recorded: it does not spend its task's error budget.
--   (The failures that open a circuit are recorded as before: a lone task against a
--   dead host still fails after its max_attempts.)
-- - Host alerts are Slack rows of the outbox without a task (payload kind
--   'host_circuit'); claim_outbox keeps its order rule for rows that have a task.

-- The host key of a URL: lower-case scheme, '://', lower-case host (IPv6 in
-- brackets), ':', port (the scheme's default when absent). worker/remote/host_keys.py
-- derives the same key with the same pattern. Null for text that is not an
-- absolute URL.
create function taskman_private.host_key(url text)
returns text
language sql immutable parallel safe
set search_path = ''
as $$
  select lower(m[1]) || '://' || lower(m[2])
         || coalesce(':' || coalesce((nullif(m[3], '')::numeric)::text,
                                     case lower(m[1]) when 'http' then '80'
                                                      when 'https' then '443' end), '')
  from (select pg_catalog.regexp_match(
          url, '^([A-Za-z][A-Za-z0-9+.-]*)://(?:[^@/?#]*@)?(\[[^]/?#]*\]|[^:/?#]*)(?::([0-9]{0,9}))?(?:[/?#]|$)'
        ) as m) x
  where m is not null and m[2] <> ''
$$;

create table taskman_private.hosts (
  host text primary key,
  state text not null default 'closed' constraint hosts_state_check check (state in ('closed', 'open')),
  consecutive_failures integer not null default 0,
  opened_at timestamptz,
  probes integer not null default 0,
  next_probe_at timestamptz,
  paused_until timestamptz,
  last_error text,
  last_failure_at timestamptz,
  last_success_at timestamptz,
  failures_total bigint not null default 0,
  throttled_total bigint not null default 0,
  rate_limit double precision constraint hosts_rate_limit_check check (rate_limit > 0),
  -- The next free send slot under the rate limit (or the resume pace).
  next_slot_at timestamptz,
  -- Just after closing: the host's tasks go at most resume_rate a second until then.
  resume_until timestamptz,
  resume_rate double precision,
  updated_at timestamptz not null default now()
);

comment on table taskman_private.hosts is
  'Remote hosts (scheme://host:port) shared by all workers: circuit breaker state, the '
  'Retry-After pause, the rate limit (requests per second, null: none) and counters. '
  'Operators may set rate_limit with plain SQL.';

alter table taskman_private.hosts enable row level security;
revoke all on taskman_private.hosts from public, anon, authenticated;
grant select, insert, update, delete on taskman_private.hosts to service_role;

-- host: the host of the task's next request (its submit URL until the submit
-- worked, then its poll URL); host_slot_at: its send slot under the host's rate
-- limit, while it waits for it.
alter table taskman_private.task_schedule add column host text,
  add column host_slot_at timestamptz;

create function taskman_private.request_host(t taskman.tasks)
returns text
language sql immutable
set search_path = ''
as $$
  select taskman_private.host_key(case when t.submit_url is not null and t.submitted_at is null
                                       then t.submit_url else t.poll_url end)
$$;

update taskman_private.task_schedule s
set host = taskman_private.request_host(t)
from taskman.tasks t
where t.task_id = s.task_id and (t.poll_url is not null or t.submit_url is not null);

-- A host's live tasks are found by scanning the schedule, with no index on host:
-- every claim and poll moves next_poll_at, so each index on this table takes a new
-- entry per poll (measured: about 200 bytes of WAL and 8% of the no-change poll
-- rate), while looking tasks up by host happens when a circuit opens or closes and
-- when /metrics or the host overview is read.

create function taskman_private.task_schedule_set_host()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  if new.host is null then
    select taskman_private.request_host(t) into new.host
    from taskman.tasks t where t.task_id = new.task_id;
  end if;
  return new;
end
$$;

create trigger task_schedule_set_host before insert on taskman_private.task_schedule
  for each row execute function taskman_private.task_schedule_set_host();

create function taskman_private.tasks_request_url_changed()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  update taskman_private.task_schedule s
  set host = taskman_private.request_host(new)
  where s.task_id = new.task_id
    and s.host is distinct from taskman_private.request_host(new);
  return null;
end
$$;

create trigger tasks_request_url_changed after update of poll_url, submit_url, submitted_at
  on taskman.tasks
  for each row when ((old.poll_url, old.submit_url, old.submitted_at)
                     is distinct from (new.poll_url, new.submit_url, new.submitted_at))
  execute function taskman_private.tasks_request_url_changed();

-- The wait before probe number `probes` + 1: base * 2^probes, at most max_seconds,
-- then 50-100% of that (jitter, so workers and hosts do not probe in step).
create function taskman_private.host_cooldown(probes integer, base_seconds double precision,
                                              max_seconds double precision)
returns interval
language sql volatile
set search_path = ''
as $$
  select make_interval(secs => least(max_seconds, base_seconds * power(2, least(probes, 40)))
                               * (0.5 + pg_catalog.random() / 2))
$$;

create function taskman_private.check_host_timing(cooldown_seconds double precision,
                                                  max_cooldown_seconds double precision,
                                                  spread_seconds double precision)
returns void
language plpgsql immutable
set search_path = ''
as $$
begin
  if cooldown_seconds is null or max_cooldown_seconds is null
     or cooldown_seconds <= 0 or max_cooldown_seconds < cooldown_seconds
     or max_cooldown_seconds > 86400 then
    perform taskman_private.reject('cooldown_seconds',
      'must be positive and at most max_cooldown_seconds (at most 86400)');
  end if;
  if spread_seconds is null or spread_seconds not between 0 and 3600 then
    perform taskman_private.reject('spread_seconds', 'must be between 0 and 3600');
  end if;
end
$$;

-- A host's live tasks waiting for it (not leased, due by `until`) move to `until`
-- (push: a circuit opened) or to a random moment of the next `spread` seconds
-- (resume: it closed). Rows locked by a claim in progress are skipped: its gate
-- decides for them.
create function taskman_private.move_host_tasks(hosts text[], until timestamptz,
                                                resume boolean, spread_seconds double precision,
                                                due_by timestamptz default 'infinity')
returns integer
language sql volatile
set search_path = ''
as $$
  with waiting as (
    select s.task_id
    from taskman_private.task_schedule s
    where s.host = any(move_host_tasks.hosts) and s.next_poll_at is not null
      and s.lease_owner is null
      and s.next_poll_at <= case when resume then move_host_tasks.due_by
                                 else move_host_tasks.until end
    order by s.task_id
    for update of s skip locked
  ),
  moved as (
    update taskman_private.task_schedule s
    set next_poll_at = case when resume
                            then least(s.next_poll_at,
                                       now() + make_interval(secs => pg_catalog.random() * spread_seconds))
                            else move_host_tasks.until end
    from waiting w
    where s.task_id = w.task_id
    returning 1
  )
  select count(*)::integer from moved
$$;

-- A host whose circuit just closed: its waiting tasks (due by due_by) resume at
-- random moments of the next spread_seconds, and for that long the gate lets its
-- tasks go at most twice that pace (tasks a claim held while it closed included).
create function taskman_private.resume_host(p_host text, spread_seconds double precision,
                                            due_by timestamptz)
returns void
language plpgsql volatile
set search_path = ''
as $$
declare
  waiting bigint;
begin
  if spread_seconds <= 0 then
    return;
  end if;
  select count(*) into waiting from taskman_private.task_schedule s
  where s.host = p_host and s.next_poll_at is not null;
  update taskman_private.hosts x
  set resume_until = now() + make_interval(secs => spread_seconds),
      resume_rate = greatest(1, 2 * waiting / spread_seconds),
      next_slot_at = null
  where x.host = p_host;
  perform taskman_private.move_host_tasks(array[p_host], now(), true, spread_seconds, due_by);
end
$$;

-- One Slack row of the outbox for a host's circuit opening or closing.
create function taskman_private.enqueue_host_alert(p_host text, p_event text)
returns void
language sql volatile
set search_path = ''
as $$
  insert into taskman_private.outbox (task_id, channel, payload)
  select null, 'slack', jsonb_build_object(
           'kind', 'host_circuit', 'event', p_event, 'host', h.host,
           'since', h.opened_at, 'at', now(), 'last_error', h.last_error,
           'consecutive_failures', h.consecutive_failures,
           'tasks_waiting', (select count(*) from taskman_private.task_schedule s
                             where s.host = h.host and s.next_poll_at is not null))
  from taskman_private.hosts h
  where h.host = p_host
$$;

-- After a claim (in its transaction): which of the claimed tasks must wait. Each
-- element of `requests`: task_id and host (the key of the host it is to be sent to),
-- in claim order. Returns the tasks held back (none while their hosts restrict
-- nothing); the others may be sent now. Tasks of a host with an open
-- circuit wait for the next probe (one task is let through as the probe when it is
-- due, and the following probe is scheduled after the cool-down); tasks of a host
-- paused by Retry-After wait for the pause to end (spread over spread_seconds). A
-- host with a rate limit hands out send slots 1/rate apart (hosts.next_slot_at is
-- the next free one): a task whose slot is now goes; the others keep their slot
-- (task_schedule.host_slot_at) and are due then, when they go without taking
-- another. Held tasks go back to the schedule.
create function taskman.admit_tasks(worker_id text, requests jsonb,
                                    cooldown_seconds double precision default 5,
                                    max_cooldown_seconds double precision default 300,
                                    spread_seconds double precision default 5)
returns setof uuid
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  gated text[];
begin
  if worker_id is null or length(worker_id) not between 1 and 200 then
    perform taskman_private.reject('worker_id', 'must be 1 to 200 characters');
  end if;
  if jsonb_typeof(requests) is distinct from 'array' then
    perform taskman_private.reject('requests', 'must be a JSON array of {task_id, host}');
  end if;
  if jsonb_array_length(requests) > 10000 then
    perform taskman_private.reject('requests', 'must list at most 10000 tasks');
  end if;
  perform taskman_private.check_host_timing(cooldown_seconds, max_cooldown_seconds, spread_seconds);

  -- The batch's hosts that restrict anything, locked in host order (workers gating
  -- the same host take turns; the statement below reads their latest state).
  select array_agg(l.host) into gated
  from (select h.host from taskman_private.hosts h
        where h.host in (select e ->> 'host' from jsonb_array_elements(requests) e)
          and (h.state = 'open' or h.rate_limit is not null or h.paused_until > now()
               or h.resume_until > now())
        order by h.host
        for update) l;
  if gated is null then
    return;
  end if;

  return query
  with batch as (
    select (b.e ->> 'task_id')::uuid as task_id, b.e ->> 'host' as host, b.ord
    from jsonb_array_elements(requests) with ordinality as b(e, ord)
  ),
  ranked as (
    -- pos: place among the host's tasks in the batch; rank: among those without a slot.
    select b.task_id, b.host, s.host_slot_at as slot_at,
           row_number() over (partition by b.host order by b.ord) as pos,
           row_number() over (partition by b.host, s.host_slot_at is null order by b.ord) as rank
    from batch b
    join taskman_private.task_schedule s on s.task_id = b.task_id
    where b.host = any(gated)
  ),
  host_now as (
    select h.host, h.paused_until, r.rate, x.mode,
           (select count(*) from ranked k where k.host = h.host and k.slot_at is null) as unslotted,
           greatest(now(), coalesce(h.next_slot_at, now())) as slots_from,
           case when x.mode = 'probe'
                then now() + taskman_private.host_cooldown(h.probes + 1, cooldown_seconds,
                                                           max_cooldown_seconds)
                else h.next_probe_at end as probe_at
    from taskman_private.hosts h
    cross join lateral (
      select case when h.resume_until > now()
                  then least(coalesce(h.rate_limit, 'infinity'), h.resume_rate)
                  else h.rate_limit end as rate
    ) r
    cross join lateral (
      select case when h.state = 'open' then
                    case when h.next_probe_at <= now() then 'probe' else 'hold' end
                  when h.paused_until > now() then 'pause'
                  when r.rate is not null then 'limit'
                  else 'pass' end as mode
    ) x
    where h.host = any(gated)
  ),
  decided as (
    -- until: when a held task is due again (null: it goes now); slot: its send slot.
    select k.task_id, k.host, k.slot_at, v.until, v.slot
    from ranked k
    join host_now d on d.host = k.host
    cross join lateral (
      select case when d.mode = 'limit' and k.slot_at is null
                  then d.slots_from + make_interval(secs => (k.rank - 1) / d.rate) end as new_slot
    ) n
    cross join lateral (
      select case d.mode
               when 'pass' then null
               when 'probe' then case when k.pos > 1 then d.probe_at end
               when 'hold' then d.probe_at
               when 'pause' then d.paused_until
                                 + make_interval(secs => pg_catalog.random() * spread_seconds)
               else nullif(greatest(coalesce(k.slot_at, n.new_slot), now()), now())
             end as until,
             case when d.mode = 'limit'
                  then nullif(greatest(coalesce(k.slot_at, n.new_slot), now()), now()) end as slot
    ) v
  ),
  host_written as (
    update taskman_private.hosts h
    set probes = case when d.mode = 'probe' then h.probes + 1 else h.probes end,
        next_probe_at = d.probe_at,
        next_slot_at = case when d.mode = 'limit' and d.unslotted > 0
                            then d.slots_from + make_interval(secs => d.unslotted / d.rate)
                            else h.next_slot_at end,
        throttled_total = h.throttled_total
          + (select count(*) from decided x where x.host = h.host and x.until is not null),
        updated_at = now()
    from host_now d
    where h.host = d.host
    returning h.host
  ),
  written as (
    update taskman_private.task_schedule s
    set lease_owner = case when dd.until is null then s.lease_owner end,
        lease_expires_at = case when dd.until is null then s.lease_expires_at end,
        next_poll_at = coalesce(dd.until, s.next_poll_at),
        host_slot_at = dd.slot
    from decided dd
    where s.task_id = dd.task_id and s.lease_owner = admit_tasks.worker_id
      and (dd.until is not null or s.host_slot_at is not null)
    returning s.task_id
  )
  select dd.task_id from decided dd where dd.until is not null;
end
$$;

-- Before recording a batch of polls (in its transaction): what they say about their
-- hosts. Each element of `outcomes`, in the order the polls ended: task_id, host,
-- result ('success': the host answered, whatever it said about the task; 'failure':
-- a transport error, a 5xx or a 429), error (a short code for a failure) and
-- retry_after_seconds (a 429's Retry-After: the host pauses that long). Returns the
-- failed polls held back: their hosts are now open or paused, so instead of being
-- recorded (spending their tasks' error budget) they are released to the schedule,
-- due at the next probe or the end of the pause.
create function taskman.record_host_outcomes(worker_id text, outcomes jsonb,
                                             failure_threshold integer default 10,
                                             cooldown_seconds double precision default 5,
                                             max_cooldown_seconds double precision default 300,
                                             spread_seconds double precision default 5)
returns setof uuid
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  opened text[];
  closed text[];
  waited_until timestamptz[];
begin
  if worker_id is null or length(worker_id) not between 1 and 200 then
    perform taskman_private.reject('worker_id', 'must be 1 to 200 characters');
  end if;
  if jsonb_typeof(outcomes) is distinct from 'array' then
    perform taskman_private.reject('outcomes', 'must be a JSON array of host outcomes');
  end if;
  if jsonb_array_length(outcomes) > 10000 then
    perform taskman_private.reject('outcomes', 'must list at most 10000 outcomes');
  end if;
  if exists (select 1 from jsonb_array_elements(outcomes) e
             where jsonb_typeof(e) is distinct from 'object'
                or e ->> 'host' is null or length(e ->> 'host') > 1000
                or (e ->> 'result') is distinct from 'success'
                   and (e ->> 'result') is distinct from 'failure') then
    perform taskman_private.reject('outcomes',
      'each outcome needs a host (at most 1000 characters) and a result: success or failure');
  end if;
  if failure_threshold is null or failure_threshold not between 1 and 1000000 then
    perform taskman_private.reject('failure_threshold', 'must be between 1 and 1000000');
  end if;
  perform taskman_private.check_host_timing(cooldown_seconds, max_cooldown_seconds, spread_seconds);

  -- The common case: successes of hosts that were not failing. Nothing to write.
  if not exists (select 1 from jsonb_array_elements(outcomes) e where e ->> 'result' = 'failure')
     and not exists (select 1 from taskman_private.hosts x
                     where x.host in (select e ->> 'host' from jsonb_array_elements(outcomes) e)
                       and (x.consecutive_failures > 0 or x.state = 'open')) then
    return;
  end if;

  insert into taskman_private.hosts (host)
  select distinct e ->> 'host' from jsonb_array_elements(outcomes) e
  where e ->> 'result' = 'failure'
  order by 1
  on conflict (host) do nothing;

  perform 1 from taskman_private.hosts x
  where x.host in (select e ->> 'host' from jsonb_array_elements(outcomes) e)
  order by x.host
  for update;

  with o as (
    select e ->> 'host' as host, e ->> 'result' as result, left(e ->> 'error', 200) as error,
           (e ->> 'retry_after_seconds')::double precision as retry_after, n as ord
    from jsonb_array_elements(outcomes) with ordinality as a(e, n)
  ),
  marked as (
    select o.*, max(o.ord) filter (where o.result = 'success') over (partition by o.host) as last_ok
    from o
  ),
  agg as (
    select m.host,
           count(*) filter (where m.result = 'success') as successes,
           count(*) filter (where m.result = 'failure') as failures,
           count(*) filter (where m.result = 'failure' and m.ord > coalesce(m.last_ok, 0)) as trailing,
           (array_agg(m.error order by m.ord desc) filter (where m.result = 'failure'))[1] as error,
           max(m.retry_after) filter (where m.result = 'failure') as retry_after
    from marked m
    group by m.host
  ),
  planned as (
    select a.*, x.state as old_state,
           greatest(x.next_probe_at, x.paused_until) as old_until,
           case when a.successes > 0 then a.trailing
                else x.consecutive_failures + a.trailing end as consecutive
    from agg a
    join taskman_private.hosts x on x.host = a.host
    where a.failures > 0 or x.consecutive_failures > 0 or x.state = 'open'
  ),
  written as (
    update taskman_private.hosts x
    set consecutive_failures = p.consecutive,
        state = case when p.consecutive >= failure_threshold then 'open'
                     when p.successes > 0 then 'closed' else x.state end,
        opened_at = case when p.old_state = 'closed' and p.consecutive >= failure_threshold
                         then now() else x.opened_at end,
        probes = case when p.old_state = 'closed' and p.consecutive >= failure_threshold
                      then 0 else x.probes end,
        next_probe_at = case
          when p.old_state = 'closed' and p.consecutive >= failure_threshold
            then now() + taskman_private.host_cooldown(0, cooldown_seconds, max_cooldown_seconds)
          when p.consecutive < failure_threshold and p.successes > 0 then null
          else x.next_probe_at end,
        paused_until = case when p.retry_after > 0
                            then greatest(x.paused_until,
                                          now() + make_interval(secs => least(p.retry_after, 86400)))
                            else x.paused_until end,
        last_error = coalesce(p.error, x.last_error),
        last_failure_at = case when p.failures > 0 then now() else x.last_failure_at end,
        last_success_at = case when p.successes > 0 then now() else x.last_success_at end,
        failures_total = x.failures_total + p.failures,
        updated_at = now()
    from planned p
    where x.host = p.host
    returning x.host, x.state, p.old_state, p.old_until
  )
  select array_agg(w.host) filter (where w.old_state = 'closed' and w.state = 'open'),
         array_agg(w.host) filter (where w.old_state = 'open' and w.state = 'closed'),
         array_agg(coalesce(w.old_until, now())) filter (where w.old_state = 'open' and w.state = 'closed')
  into opened, closed, waited_until
  from written w;

  -- Tasks resumed on close: those waiting up to the probe time (held or pushed); a
  -- task not due before then keeps its own time.
  for i in 1 .. coalesce(cardinality(closed), 0) loop
    perform taskman_private.resume_host(closed[i], spread_seconds, waited_until[i]);
    perform taskman_private.enqueue_host_alert(closed[i], 'closed');
  end loop;
  for i in 1 .. coalesce(cardinality(opened), 0) loop
    perform taskman_private.move_host_tasks(
      array[opened[i]], (select x.next_probe_at from taskman_private.hosts x where x.host = opened[i]),
      false, spread_seconds);
    perform taskman_private.enqueue_host_alert(opened[i], 'opened');
  end loop;

  return query
  with failed as (
    select (e ->> 'task_id')::uuid as task_id, e ->> 'host' as host
    from jsonb_array_elements(outcomes) e
    where e ->> 'result' = 'failure' and e ->> 'task_id' is not null
  ),
  held as (
    select f.task_id,
           case when x.state = 'open' then x.next_probe_at
                else x.paused_until + make_interval(secs => pg_catalog.random() * spread_seconds)
           end as until
    from failed f
    join taskman_private.hosts x on x.host = f.host
    where x.state = 'open' and not x.host = any(coalesce(opened, '{}'))
       or x.paused_until > now()
  )
  update taskman_private.task_schedule s
  set lease_owner = null, lease_expires_at = null, next_poll_at = hd.until
  from held hd
  where s.task_id = hd.task_id and s.lease_owner = record_host_outcomes.worker_id
  returning s.task_id;
end
$$;

-- Closes a host's circuit by hand (and ends a Retry-After pause): its tasks resume,
-- spread over spread_seconds; a closing alert goes out if it was open. Returns the
-- host's row as JSON, or null for a host Taskman has no row for.
create function taskman.reset_host(host text, spread_seconds double precision default 5)
returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  was text;
  probe_at timestamptz;
  host_row jsonb;
begin
  if reset_host.host is null or length(reset_host.host) not between 1 and 1000 then
    perform taskman_private.reject('host', 'must be 1 to 1000 characters');
  end if;
  perform taskman_private.check_host_timing(1, 1, spread_seconds);
  select x.state, greatest(x.next_probe_at, x.paused_until) into was, probe_at
  from taskman_private.hosts x where x.host = reset_host.host for update;
  if not found then
    return null;
  end if;
  update taskman_private.hosts x
  set state = 'closed', consecutive_failures = 0, next_probe_at = null, paused_until = null,
      probes = 0, next_slot_at = null, updated_at = now()
  where x.host = reset_host.host
  returning to_jsonb(x) into host_row;
  perform taskman_private.resume_host(reset_host.host, spread_seconds, coalesce(probe_at, now()));
  if was = 'open' then
    perform taskman_private.enqueue_host_alert(reset_host.host, 'closed');
  end if;
  return host_row;
end
$$;

-- Sets the rate limits of hosts (an object: host key -> requests per second, null to
-- remove a limit), as TASKMAN_HOST_RATE_LIMITS does when a worker starts.
create function taskman.set_host_limits(limits jsonb)
returns integer
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  n integer;
begin
  if jsonb_typeof(limits) is distinct from 'object' then
    perform taskman_private.reject('limits', 'must be a JSON object of host -> requests per second');
  end if;
  if exists (select 1 from jsonb_each(limits) l
             where taskman_private.host_key(l.key) is distinct from l.key
                or not case jsonb_typeof(l.value)
                         when 'null' then true
                         when 'number' then (l.value)::numeric > 0 and (l.value)::numeric <= 1000000
                         else false end) then
    perform taskman_private.reject('limits',
      'each key must be a host key (scheme://host:port) and each value a number of requests '
      'per second above 0 (at most 1000000), or null');
  end if;
  with l as (
    select l.key as host, (l.value #>> '{}')::double precision as rate
    from jsonb_each(limits) l
    order by l.key
  ),
  upserted as (
    insert into taskman_private.hosts as x (host, rate_limit)
    select l.host, l.rate from l
    on conflict (host) do update set rate_limit = excluded.rate_limit, updated_at = now()
    where x.rate_limit is distinct from excluded.rate_limit
    returning 1
  )
  select count(*) into n from upserted;
  return n;
end
$$;

-- Hosts that hold tasks back (an open circuit, a pause, a rate limit) or are failing,
-- with how many live tasks wait on each: all of them for the service, only the
-- caller's own tasks (and hosts) for a user.
create function taskman_private.host_status()
returns jsonb
language sql stable security definer
set search_path = ''
as $$
  with mine as (
    select s.host, count(*) as n
    from taskman_private.task_schedule s
    where s.next_poll_at is not null and s.host is not null
      and (taskman_private.caller_is_service()
           or exists (select 1 from taskman.tasks t
                      where t.task_id = s.task_id and t.user_id = auth.uid()))
      and s.host in (select x.host from taskman_private.hosts x
                     where x.state = 'open' or x.rate_limit is not null
                        or x.paused_until > now() or x.consecutive_failures > 0)
      -- Evaluated once: with every host healthy (the usual case) the schedule is not read.
      and exists (select 1 from taskman_private.hosts x
                  where x.state = 'open' or x.rate_limit is not null
                     or x.paused_until > now() or x.consecutive_failures > 0)
    group by s.host
  )
  select coalesce(jsonb_agg(jsonb_build_object(
           'host', x.host,
           'state', case when x.state = 'open' then 'open'
                         when x.paused_until > now() then 'paused' else 'closed' end,
           'since', case when x.state = 'open' then x.opened_at end,
           'next_probe_at', case when x.state = 'open' then x.next_probe_at end,
           'paused_until', case when x.paused_until > now() then x.paused_until end,
           'consecutive_failures', x.consecutive_failures,
           'last_error', x.last_error,
           'rate_limit', x.rate_limit,
           'tasks_waiting', coalesce(m.n, 0))
           order by x.state = 'open' desc, x.host), '[]'::jsonb)
  from taskman_private.hosts x
  left join mine m on m.host = x.host
  where (x.state = 'open' or x.rate_limit is not null or x.paused_until > now()
         or x.consecutive_failures > 0)
    and (taskman_private.caller_is_service() or m.n is not null)
$$;

create function taskman.host_status()
returns jsonb
language sql stable security invoker
set search_path = ''
as $$
  select taskman_private.host_status()
$$;

-- Host alerts have no task: claim_outbox as before, with its order rule (a task's
-- notifications of one channel in order) for rows that have a task.
alter table taskman_private.outbox alter column task_id drop not null;

create or replace function taskman.claim_outbox(worker_id text, batch_size integer default 100,
                                               lease_seconds integer default 60,
                                               only_channel text default null,
                                               skip_hosts text[] default null)
returns table (outbox_id bigint, task_id uuid, channel text, payload jsonb, attempts integer)
language plpgsql volatile security definer
set search_path = ''
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

revoke all on function taskman_private.host_key(text),
  taskman_private.task_schedule_set_host(), taskman_private.tasks_request_url_changed(),
  taskman_private.request_host(taskman.tasks),
  taskman_private.host_cooldown(integer, double precision, double precision),
  taskman_private.check_host_timing(double precision, double precision, double precision),
  taskman_private.move_host_tasks(text[], timestamptz, boolean, double precision, timestamptz),
  taskman_private.enqueue_host_alert(text, text),
  taskman_private.resume_host(text, double precision, timestamptz),
  taskman_private.host_status()
  from public, anon, authenticated;
grant execute on function taskman_private.host_status() to authenticated, service_role;
grant execute on function taskman_private.host_key(text) to service_role;
revoke all on function
  taskman.admit_tasks(text, jsonb, double precision, double precision, double precision),
  taskman.record_host_outcomes(text, jsonb, integer, double precision, double precision,
                               double precision),
  taskman.reset_host(text, double precision), taskman.set_host_limits(jsonb)
  from public, anon, authenticated;
grant execute on function
  taskman.admit_tasks(text, jsonb, double precision, double precision, double precision),
  taskman.record_host_outcomes(text, jsonb, integer, double precision, double precision,
                               double precision),
  taskman.reset_host(text, double precision), taskman.set_host_limits(jsonb)
  to service_role;
revoke all on function taskman.host_status() from public, anon;
grant execute on function taskman.host_status() to authenticated, service_role;
