-- Remote hosts, shared by all workers: circuit breakers, Retry-After pauses and rate
-- limits, per host (scheme://host:port) and per owner on a host, so that what one
-- owner's tasks are told by a host holds back that owner's tasks only (a per-key 429 is
-- the norm). Admission decides which claimed tasks may be sent now; a host that fails
-- opens its circuit and its tasks wait, without costing a poll each.

-- Two kinds of row. A host row (`host` = the host key, scheme://host:port) holds the
-- operator's rate limit and the shared circuit. An owner row (`host` = host key || '#' ||
-- the owner's user id, or '#service' for tasks without an owner) holds that owner's
-- circuit and Retry-After pause on the host. `base` and `owner` are derived from the
-- key (hosts_base_idx finds a host's rows).
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
  updated_at timestamptz not null default now(),
  base text generated always as (split_part(host, '#', 1)) stored,
  owner text generated always as (nullif(split_part(host, '#', 2), '')) stored
);

comment on table taskman_private.hosts is
  'Remote hosts (scheme://host:port) shared by all workers: circuit breaker state, the '
  'Retry-After pause, the rate limit (requests per second, null: none) and counters. '
  'Operators may set rate_limit with plain SQL.';
comment on column taskman_private.hosts.base is
  'The host key (scheme://host:port) of the row: the host itself on a host row.';
comment on column taskman_private.hosts.owner is
  'Null on a host row (rate limit, shared circuit); on an owner row the user id whose '
  'tasks its circuit and pause hold, or ''service'' for tasks without an owner.';

create index hosts_base_idx on taskman_private.hosts (base);

alter table taskman_private.hosts enable row level security;
revoke all on taskman_private.hosts from public, anon, authenticated;
grant select, insert, update, delete on taskman_private.hosts to service_role;

-- The owner row key of a host for the tasks of `owner` (null: the service's own).
create or replace function taskman_private.owner_host(host text, owner uuid)
returns text
language sql immutable parallel safe
set search_path = ''
as $$
  select host || '#' || coalesce(owner::text, 'service')
$$;
revoke all on function taskman_private.owner_host from public, anon, authenticated;

-- The live tasks a host or owner row holds: a host row, every task whose next request
-- goes to the host; an owner row, that owner's.
create or replace function taskman_private.row_tasks(key text)
returns table (task_id uuid, next_poll_at timestamptz, lease_owner text)
language sql stable
set search_path = ''
as $$
  select s.task_id, s.next_poll_at, s.lease_owner
  from taskman_private.task_schedule s
  where s.host = split_part(key, '#', 1) and s.next_poll_at is not null
    and (position('#' in key) = 0
         or coalesce(taskman_private.schedule_owner(s.owner)::text, 'service')
            = split_part(key, '#', 2))
$$;
revoke all on function taskman_private.row_tasks from public, anon, authenticated;

-- The host a task's next request goes to: its submit URL's until the submit worked,
-- then its poll URL's. The schedule keeps it (task_schedule.host), and
-- tasks_request_url_changed keeps it right when those URLs change.
create or replace function taskman_private.request_host(t taskman.tasks)
returns text
language plpgsql immutable
set search_path = ''
as $$
begin
  return taskman_private.host_key(case when t.submit_url is not null and t.submitted_at is null
                                       then t.submit_url else t.poll_url end);
end
$$;
revoke all on function taskman_private.request_host from public, anon, authenticated;

create or replace function taskman_private.tasks_request_url_changed()
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
revoke all on function taskman_private.tasks_request_url_changed from public, anon, authenticated;

create trigger tasks_request_url_changed after update of poll_url, submit_url, submitted_at
  on taskman.tasks
  for each row when ((old.poll_url, old.submit_url, old.submitted_at)
                     is distinct from (new.poll_url, new.submit_url, new.submitted_at))
  execute function taskman_private.tasks_request_url_changed();

-- The wait before probe number `probes` + 1: base * 2^probes, at most max_seconds,
-- then 50-100% of that (jitter, so workers and hosts do not probe in step).
create or replace function taskman_private.host_cooldown(probes integer, base_seconds double precision,
                                                         max_seconds double precision)
returns interval
language sql volatile
set search_path = ''
as $$
  select make_interval(secs => least(max_seconds, base_seconds * power(2, least(probes, 40)))
                               * (0.5 + pg_catalog.random() / 2))
$$;
revoke all on function taskman_private.host_cooldown from public, anon, authenticated;

-- The circuit timing arguments the host functions take, checked once.
create or replace function taskman_private.check_host_timing(cooldown_seconds double precision,
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
revoke all on function taskman_private.check_host_timing from public, anon, authenticated;

-- The live tasks a host or owner row holds (row_tasks) that wait for it (not leased,
-- due by `until`) move to `until` (push: a circuit opened) or to a random moment of the
-- next `spread` seconds (resume: it closed). Rows locked by a claim in progress are
-- skipped: its gate decides for them.
create or replace function taskman_private.move_host_tasks(hosts text[], until timestamptz,
                                                resume boolean, spread_seconds double precision,
                                                due_by timestamptz default 'infinity')
returns integer
language sql volatile
set search_path = ''
as $$
  with waiting as (
    select s.task_id
    from taskman_private.task_schedule s
    where s.task_id in (select r.task_id from unnest(move_host_tasks.hosts) k
                        cross join lateral taskman_private.row_tasks(k) r
                        where r.lease_owner is null
                          and r.next_poll_at <= case when resume then move_host_tasks.due_by
                                                     else move_host_tasks.until end)
      and s.lease_owner is null and s.next_poll_at is not null
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
revoke all on function taskman_private.move_host_tasks from public, anon, authenticated;

-- A host whose circuit just closed: its waiting tasks (due by due_by) resume at
-- random moments of the next spread_seconds, and for that long the gate lets its
-- tasks go at most twice that pace (tasks a claim held while it closed included).
create or replace function taskman_private.resume_host(p_host text, spread_seconds double precision,
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
  select count(*) into waiting from taskman_private.row_tasks(p_host);
  update taskman_private.hosts x
  set resume_until = now() + make_interval(secs => spread_seconds),
      resume_rate = greatest(1, 2 * waiting / spread_seconds),
      next_slot_at = null
  where x.host = p_host;
  perform taskman_private.move_host_tasks(array[p_host], now(), true, spread_seconds, due_by);
end
$$;
revoke all on function taskman_private.resume_host from public, anon, authenticated;

-- One Slack row of the outbox for a circuit opening or closing: the host's, or one
-- owner's on it (`owner` names them; the service's own tasks' circuit alerts as the
-- host's does).
create or replace function taskman_private.enqueue_host_alert(p_host text, p_event text)
returns void
language sql volatile
set search_path = ''
as $$
  insert into taskman_private.outbox (task_id, channel, payload)
  select null, 'slack', jsonb_build_object(
           'kind', 'host_circuit', 'event', p_event, 'host', h.base, 'owner', h.owner,
           'since', h.opened_at, 'at', now(), 'last_error', h.last_error,
           'consecutive_failures', h.consecutive_failures,
           'tasks_waiting', (select count(*) from taskman_private.row_tasks(h.host)))
  from taskman_private.hosts h
  where h.host = p_host
$$;
revoke all on function taskman_private.enqueue_host_alert from public, anon, authenticated;

-- After a claim: which of the claimed tasks must wait (admit_tasks). First each task's
-- owner row (that owner's circuit and pause), then, for the tasks it lets go, the host
-- row (the rate limit and the shared circuit), in turns of owners: the first task of
-- each owner, then the second of each, so one owner's many tasks do not take every slot
-- of a rate-limited host; and tasks whose owner's own circuit is closed come first, so
-- the shared circuit's probe is not taken by an owner whose requests keep failing.
-- Nearly always no host of the batch restricts anything, and that is all it asks. A
-- volatile function: each statement sees what was committed when it starts, as
-- admit_tasks' own do (in the claim's statement, a task created while the claim ran
-- would be claimed but missing from the batch's hosts, so sent without admission).
create or replace function taskman_private.held_back(worker_id text, task_ids uuid[],
                                          cooldown_seconds double precision,
                                          max_cooldown_seconds double precision,
                                          spread_seconds double precision)
returns setof uuid
language plpgsql volatile
set search_path = ''
as $$
declare
  b_tasks uuid[];
  b_hosts text[];
  b_keys text[];
  held_by_owner uuid[];
  requests jsonb;
begin
  -- As admit_tasks decides which rows gate (without one it holds nothing back). Each
  -- task goes to its submit URL's host while it is still to be submitted, else to its
  -- status URL's (task_schedule.host).
  if not exists (select 1 from taskman_private.hosts x
                 where x.base in (select s.host from taskman_private.task_schedule s
                                  where s.task_id = any(task_ids))
                   and (x.state = 'open' or x.rate_limit is not null
                        or x.paused_until > now() or x.resume_until > now())) then
    return;
  end if;

  -- The batch in claim order, with each task's owner row key.
  select array_agg(s.task_id order by u.ord), array_agg(s.host order by u.ord),
         array_agg(taskman_private.owner_host(s.host, taskman_private.schedule_owner(s.owner))
                   order by u.ord)
  into b_tasks, b_hosts, b_keys
  from unnest(task_ids) with ordinality as u(task_id, ord)
  join taskman_private.task_schedule s on s.task_id = u.task_id;

  select jsonb_agg(jsonb_build_object('task_id', b.task_id, 'host', b.key) order by b.ord)
  into requests
  from unnest(b_tasks, b_keys) with ordinality as b(task_id, key, ord)
  where b.key in (select x.host from taskman_private.hosts x
                  where x.base = any(b_hosts) and x.owner is not null
                    and (x.state = 'open' or x.paused_until > now() or x.resume_until > now()));
  if requests is not null then
    select array_agg(h) into held_by_owner
    from taskman.admit_tasks(worker_id, requests, cooldown_seconds, max_cooldown_seconds,
                             spread_seconds) h;
    return query select unnest(held_by_owner);
  end if;

  select jsonb_agg(jsonb_build_object('task_id', r.task_id, 'host', r.host)
                   order by r.failing, r.turn, r.ord)
  into requests
  from (select b.task_id, b.host, b.ord,
               coalesce(x.state = 'open', false) as failing,
               row_number() over (partition by b.host, b.key order by b.ord) as turn
        from unnest(b_tasks, b_hosts, b_keys) with ordinality as b(task_id, host, key, ord)
        left join taskman_private.hosts x on x.host = b.key
        where b.task_id <> all(coalesce(held_by_owner, '{}'))) r;
  if requests is not null then
    return query select h from taskman.admit_tasks(worker_id, requests, cooldown_seconds,
                                                   max_cooldown_seconds, spread_seconds) h;
  end if;
end
$$;
revoke all on function taskman_private.held_back from public, anon, authenticated;

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
create or replace function taskman.admit_tasks(worker_id text, requests jsonb,
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
revoke all on function taskman.admit_tasks from public, anon, authenticated;
grant execute on function taskman.admit_tasks to service_role;

-- Before recording a batch of requests (in its transaction): what they say about their
-- hosts. Each element of `outcomes`: task_id (polls and submits), host, owner (the
-- task's or callback's user id, null for the service's own; looked up from task_id when
-- absent), result ('success': the host answered, whatever it said about the task;
-- 'failure': a transport error, a 5xx or a 429; 'unsent': claimed, then not sent
-- because its circuit opened meanwhile), error (a short code for a failure) and
-- retry_after_seconds (a 429's Retry-After: the owner's tasks pause that long).
-- Failures open the owner's circuit after failure_threshold in a row; the shared
-- circuit opens only when two owners' circuits opened since anyone last got an answer
-- from the host, or the service's own tasks' did, and any answer closes it. Returns the
-- tasks to leave unrecorded, released to the schedule: failed requests of an owner or
-- host that is now open (not by this batch) or paused, due at the next probe or the
-- end of the pause, and the unsent ones.
create or replace function taskman.record_host_outcomes(worker_id text, outcomes jsonb,
                                             failure_threshold integer default 10,
                                             cooldown_seconds double precision default 5,
                                             max_cooldown_seconds double precision default 300,
                                             spread_seconds double precision default 5)
returns setof uuid
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  o_hosts text[];
  o_keys text[];
  o_results text[];
  o_errors text[];
  o_retry double precision[];
  o_tasks uuid[];
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
                or position('#' in e ->> 'host') > 0
                or (e ->> 'result') is distinct from 'success'
                   and (e ->> 'result') is distinct from 'failure'
                   and (e ->> 'result') is distinct from 'unsent'
                or jsonb_typeof(e -> 'owner') not in ('null', 'string')
                or (e ->> 'owner') !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                or jsonb_typeof(e -> 'task_id') not in ('null', 'string')
                or (e ->> 'task_id') !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                or (e ->> 'result') = 'unsent' and e ->> 'task_id' is null) then
    perform taskman_private.reject('outcomes',
      'each outcome needs a host key (at most 1000 characters) and a result: success, '
      'failure or unsent (with a task_id); owner and task_id, when given, are UUIDs');
  end if;
  if failure_threshold is null or failure_threshold not between 1 and 1000000 then
    perform taskman_private.reject('failure_threshold', 'must be between 1 and 1000000');
  end if;
  perform taskman_private.check_host_timing(cooldown_seconds, max_cooldown_seconds, spread_seconds);

  select array_agg(e ->> 'host' order by n),
         array_agg(taskman_private.owner_host(e ->> 'host', k.owner) order by n),
         array_agg(e ->> 'result' order by n),
         array_agg(left(e ->> 'error', 200) order by n),
         array_agg((e ->> 'retry_after_seconds')::double precision order by n),
         array_agg((e ->> 'task_id')::uuid order by n)
  into o_hosts, o_keys, o_results, o_errors, o_retry, o_tasks
  from jsonb_array_elements(outcomes) with ordinality as a(e, n)
  cross join lateral (
    select case when e ? 'owner' then (e ->> 'owner')::uuid
                else (select t.user_id from taskman.tasks t
                      where t.task_id = (e ->> 'task_id')::uuid) end as owner
  ) k;

  -- The common case: successes of owners and hosts that were not failing. Nothing to
  -- write. (A host row whose last failure is newer than its last success takes the
  -- success: it says the host answers, which the shared circuit counts from.)
  if not ('failure' = any(o_results) or 'unsent' = any(o_results))
     and not exists (select 1 from taskman_private.hosts x
                     where (x.host = any(o_keys) or x.host = any(o_hosts))
                       and (x.consecutive_failures > 0 or x.state = 'open'
                            or x.last_failure_at > coalesce(x.last_success_at, '-infinity'))) then
    return;
  end if;

  insert into taskman_private.hosts (host)
  select distinct k.key
  from unnest(o_keys, o_hosts, o_results) as o(key, host, result)
  cross join lateral (values (o.key), (o.host)) k(key)
  where o.result = 'failure'
  order by 1
  on conflict (host) do nothing;

  perform 1 from taskman_private.hosts x
  where x.host = any(o_keys) or x.host = any(o_hosts)
  order by x.host
  for update;

  -- Each owner row first (its circuit and pause), then the host rows (the shared
  -- circuit, which counts the owner rows just written).
  with o as (
    select u.key, u.host, u.result, u.error, u.retry_after, u.ord
    from unnest(o_keys, o_hosts, o_results, o_errors, o_retry)
           with ordinality as u(key, host, result, error, retry_after, ord)
    where u.result <> 'unsent'
  ),
  marked as (
    select o.*, max(o.ord) filter (where o.result = 'success') over (partition by o.key) as last_ok
    from o
  ),
  agg as (
    select m.key,
           count(*) filter (where m.result = 'success') as successes,
           count(*) filter (where m.result = 'failure') as failures,
           count(*) filter (where m.result = 'failure' and m.ord > coalesce(m.last_ok, 0)) as trailing,
           (array_agg(m.error order by m.ord desc) filter (where m.result = 'failure'))[1] as error,
           max(m.retry_after) filter (where m.result = 'failure') as retry_after
    from marked m
    group by m.key
  ),
  planned as (
    select a.*, x.state as old_state,
           greatest(x.next_probe_at, x.paused_until) as old_until,
           case when a.successes > 0 then a.trailing
                else x.consecutive_failures + a.trailing end as consecutive
    from agg a
    join taskman_private.hosts x on x.host = a.key
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
    where x.host = p.key
    returning x.host, x.state, p.old_state, p.old_until
  )
  select array_agg(w.host) filter (where w.old_state = 'closed' and w.state = 'open'),
         array_agg(w.host) filter (where w.old_state = 'open' and w.state = 'closed'),
         array_agg(coalesce(w.old_until, now())) filter (where w.old_state = 'open' and w.state = 'closed')
  into opened, closed, waited_until
  from written w;

  with o as (
    select u.host, u.result, u.error, u.ord
    from unnest(o_hosts, o_results, o_errors) with ordinality as u(host, result, error, ord)
    where u.result <> 'unsent'
  ),
  agg as (
    select o.host,
           count(*) filter (where o.result = 'success') as successes,
           count(*) filter (where o.result = 'failure') as failures,
           count(*) filter (where o.result = 'failure'
                              and o.ord > coalesce((select max(p.ord) from o p
                                                    where p.host = o.host
                                                      and p.result = 'success'), 0)) as trailing,
           (array_agg(o.error order by o.ord desc) filter (where o.result = 'failure'))[1] as error
    from o
    group by o.host
  ),
  planned as (
    select a.*, x.state as old_state,
           x.next_probe_at as old_until,
           -- Down for more than one owner: two owners' circuits (or the service's) opened
           -- since the host last answered anyone.
           a.successes = 0 and x.state = 'closed'
             and ((select count(*) from taskman_private.hosts y
                   where y.base = x.host and y.owner is not null and y.state = 'open'
                     and y.opened_at > coalesce(x.last_success_at, '-infinity')) >= 2
                  or exists (select 1 from taskman_private.hosts y
                             where y.host = x.host || '#service' and y.state = 'open'
                               and y.opened_at > coalesce(x.last_success_at, '-infinity')))
             as opens
    from agg a
    join taskman_private.hosts x on x.host = a.host
    where a.failures > 0 or x.consecutive_failures > 0 or x.state = 'open'
       or x.last_failure_at > coalesce(x.last_success_at, '-infinity')
  ),
  written as (
    update taskman_private.hosts x
    set consecutive_failures = case when p.successes > 0 then p.trailing
                                    else x.consecutive_failures + p.trailing end,
        state = case when p.opens then 'open' when p.successes > 0 then 'closed'
                     else x.state end,
        opened_at = case when p.opens then now() else x.opened_at end,
        probes = case when p.opens then 0 else x.probes end,
        next_probe_at = case
          when p.opens
            then now() + taskman_private.host_cooldown(0, cooldown_seconds, max_cooldown_seconds)
          when p.successes > 0 then null
          else x.next_probe_at end,
        last_error = coalesce(p.error, x.last_error),
        last_failure_at = case when p.failures > 0 then now() else x.last_failure_at end,
        last_success_at = case when p.successes > 0 then now() else x.last_success_at end,
        failures_total = x.failures_total + p.failures,
        updated_at = now()
    from planned p
    where x.host = p.host
    returning x.host, x.state, p.old_state, p.old_until
  )
  select opened || array_agg(w.host) filter (where w.old_state = 'closed' and w.state = 'open'),
         closed || array_agg(w.host) filter (where w.old_state = 'open' and w.state = 'closed'),
         waited_until
           || array_agg(coalesce(w.old_until, now())) filter (where w.old_state = 'open'
                                                                and w.state = 'closed')
  into opened, closed, waited_until
  from written w;

  -- Tasks resumed on close: those waiting up to the probe time (held or pushed); a
  -- task not due before then keeps its own time. The service's own circuit alerts as
  -- its host's does, so only the host's is sent for it.
  for i in 1 .. coalesce(cardinality(closed), 0) loop
    perform taskman_private.resume_host(closed[i], spread_seconds, waited_until[i]);
    if closed[i] not like '%#service' then
      perform taskman_private.enqueue_host_alert(closed[i], 'closed');
    end if;
  end loop;
  for i in 1 .. coalesce(cardinality(opened), 0) loop
    perform taskman_private.move_host_tasks(
      array[opened[i]], (select x.next_probe_at from taskman_private.hosts x where x.host = opened[i]),
      false, spread_seconds);
    if opened[i] not like '%#service' then
      perform taskman_private.enqueue_host_alert(opened[i], 'opened');
    end if;
  end loop;

  return query
  with given as (
    select u.task_id, u.key, u.host, u.result
    from unnest(o_tasks, o_keys, o_hosts, o_results) as u(task_id, key, host, result)
    where u.task_id is not null and u.result <> 'success'
  ),
  held as (
    select g.task_id,
           coalesce(greatest(case when w.state = 'open' then w.next_probe_at end,
                             case when w.paused_until > now()
                                  then w.paused_until
                                       + make_interval(secs => pg_catalog.random() * spread_seconds)
                             end,
                             case when h.state = 'open' then h.next_probe_at end),
                    now()) as until
    from given g
    left join taskman_private.hosts w on w.host = g.key
    left join taskman_private.hosts h on h.host = g.host
    where g.result = 'unsent'
       or w.state = 'open' and not w.host = any(coalesce(opened, '{}'))
       or w.paused_until > now()
       or h.state = 'open' and not h.host = any(coalesce(opened, '{}'))
  )
  update taskman_private.task_schedule s
  set lease_owner = null, lease_expires_at = null, next_poll_at = hd.until
  from held hd
  where s.task_id = hd.task_id and s.lease_owner = record_host_outcomes.worker_id
  returning s.task_id;
end
$$;
revoke all on function taskman.record_host_outcomes from public, anon, authenticated;
grant execute on function taskman.record_host_outcomes to service_role;

-- Closes a host's circuit by hand, and every owner's circuit and pause on it: its tasks
-- resume, spread over spread_seconds; a closing alert goes out for each circuit that
-- was open. Returns the host's row as JSON, or null for a host Taskman has no row for.
create or replace function taskman.reset_host(host text, spread_seconds double precision default 5)
returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  r record;
  host_row jsonb;
begin
  if reset_host.host is null or length(reset_host.host) not between 1 and 1000
     or position('#' in reset_host.host) > 0 then
    perform taskman_private.reject('host', 'must be a host key of 1 to 1000 characters');
  end if;
  perform taskman_private.check_host_timing(1, 1, spread_seconds);
  if not exists (select 1 from taskman_private.hosts x where x.host = reset_host.host) then
    return null;
  end if;
  for r in
    select x.host, x.state as was, greatest(x.next_probe_at, x.paused_until) as probe_at
    from taskman_private.hosts x
    where x.base = reset_host.host
    order by x.host
    for update
  loop
    update taskman_private.hosts x
    set state = 'closed', consecutive_failures = 0, next_probe_at = null, paused_until = null,
        probes = 0, next_slot_at = null, updated_at = now()
    where x.host = r.host;
    perform taskman_private.resume_host(r.host, spread_seconds, coalesce(r.probe_at, now()));
    if r.was = 'open' and r.host not like '%#service' then
      perform taskman_private.enqueue_host_alert(r.host, 'closed');
    end if;
  end loop;
  select to_jsonb(x) - 'base' - 'owner' into host_row
  from taskman_private.hosts x where x.host = reset_host.host;
  return host_row;
end
$$;
revoke all on function taskman.reset_host from public, anon, authenticated;
grant execute on function taskman.reset_host to service_role;

-- Sets the rate limits of hosts (an object: host key -> requests per second, null to
-- remove a limit), as TASKMAN_HOST_RATE_LIMITS does when a worker starts.
create or replace function taskman.set_host_limits(limits jsonb)
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
revoke all on function taskman.set_host_limits from public, anon, authenticated;
grant execute on function taskman.set_host_limits to service_role;

create or replace function taskman_private.host_status_of(uid uuid)
returns jsonb
language sql stable
set search_path = ''
as $$
  with mine as (
    select s.host, s.next_poll_at
    from taskman_private.task_schedule s
    join taskman.tasks t on t.task_id = s.task_id
    where t.user_id = uid and s.next_poll_at is not null and s.host is not null
  ),
  own as (
    select y.*
    from taskman_private.hosts y
    where uid is not null and y.owner = uid::text
      and (y.state = 'open' or y.paused_until > now() or y.consecutive_failures > 0)
  ),
  shared as (
    select x.*
    from taskman_private.hosts x
    where x.owner is null and x.state = 'open'
      and exists (select 1 from mine m where m.host = x.host and m.next_poll_at <= x.next_probe_at)
  ),
  listed as (
    select coalesce(y.base, x.host) as host, y as own, x as shared
    from own y
    full join shared x on x.host = y.base
  )
  select coalesce(jsonb_agg(jsonb_build_object(
           'host', l.host,
           'state', case when (l.own).state = 'open' or (l.shared).state = 'open' then 'open'
                         when (l.own).paused_until > now() then 'paused' else 'closed' end,
           'since', coalesce(case when (l.own).state = 'open' then (l.own).opened_at end,
                             (l.shared).opened_at),
           'next_probe_at', greatest(case when (l.own).state = 'open' then (l.own).next_probe_at end,
                                     (l.shared).next_probe_at),
           'paused_until', case when (l.own).paused_until > now() then (l.own).paused_until end,
           'consecutive_failures', coalesce((l.own).consecutive_failures, 0),
           'last_error', (l.own).last_error,
           'rate_limit', null,
           'owners_held', 0,
           'tasks_waiting', (select count(*) from mine m where m.host = l.host))
           order by ((l.own).state = 'open' or (l.shared).state = 'open') desc, l.host), '[]'::jsonb)
  from listed l
$$;
revoke all on function taskman_private.host_status_of from public, anon, authenticated;

-- Hosts that hold tasks back or are failing, with how many live tasks wait on each.
-- The service sees every host, with how many owners' own circuits or pauses hold them
-- there. A user sees only what their own requests met: the hosts where their own
-- circuit is open, they are paused or their requests failed (their own errors), and a
-- host whose circuit is open for everyone while their tasks wait for it (its state,
-- none of the errors that opened it); never a rate limit, nor other owners' failures.
create or replace function taskman_private.host_status_all()
returns jsonb
language sql stable
set search_path = ''
as $$
  with owners as (
    select y.base, count(*) as held
    from taskman_private.hosts y
    where y.owner is not null and (y.state = 'open' or y.paused_until > now())
    group by y.base
  ),
  listed as (
    select x.*, coalesce(o.held, 0) as owners_held
    from taskman_private.hosts x
    left join owners o on o.base = x.host
    where x.owner is null
      and (x.state = 'open' or x.rate_limit is not null or x.paused_until > now()
           or x.consecutive_failures > 0 or o.held > 0)
  ),
  waiting as (
    select s.host, count(*) as n
    from taskman_private.task_schedule s
    where s.next_poll_at is not null and s.host in (select l.host from listed l)
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
           'owners_held', x.owners_held,
           'tasks_waiting', coalesce(w.n, 0))
           order by x.state = 'open' desc, x.host), '[]'::jsonb)
  from listed x
  left join waiting w on w.host = x.host
$$;
revoke all on function taskman_private.host_status_all from public, anon, authenticated;

-- Hosts that hold tasks back (an open circuit, a pause, a rate limit) or are failing,
-- with how many live tasks wait on each: all of them for the service, only the
-- caller's own tasks (and hosts) for a user.
create or replace function taskman_private.host_status()
returns jsonb
language sql stable security definer
set search_path = ''
as $$
  select case when taskman_private.caller_is_service() then taskman_private.host_status_all()
              else taskman_private.host_status_of(auth.uid()) end
$$;
revoke all on function taskman_private.host_status from public, anon;
grant execute on function taskman_private.host_status to authenticated, service_role;

create or replace function taskman.host_status()
returns jsonb
language sql stable security invoker
set search_path = ''
as $$
  select taskman_private.host_status()
$$;
revoke all on function taskman.host_status from public, anon;
grant execute on function taskman.host_status to authenticated, service_role;
