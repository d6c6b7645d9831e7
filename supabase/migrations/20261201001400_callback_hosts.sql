-- Completion callbacks go through their receivers' host circuits (see
-- 20261201001200_remote_hosts.sql): a callback whose receiver host (host_key of its
-- callback_url) has an open circuit or a Retry-After pause is not sent; it stays due,
-- with its delivery id, and spends no attempt. The callback stream skips such hosts in
-- claim_outbox (skip_hosts) and reports callback outcomes with record_host_outcomes.
--
-- - taskman.hold_callbacks: after a callback claim that has rows for hosts that are
--   open or paused, one call for the batch: the rows their hosts do not let go now
--   are given back (lease cleared, due now, attempts unchanged) and returned. Of an
--   open host whose probe is due, the first row goes as the probe and the next probe
--   is scheduled after the cool-down (as admit_tasks does for polls). With
--   take_probes false nothing goes to such a host: the stream gives back a failed
--   probe that way, so probes during an outage do not spend attempts.

create function taskman.hold_callbacks(worker_id text, requests jsonb,
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

revoke all on function
  taskman.hold_callbacks(text, jsonb, double precision, double precision, boolean)
  from public, anon, authenticated;
grant execute on function
  taskman.hold_callbacks(text, jsonb, double precision, double precision, boolean)
  to service_role;
