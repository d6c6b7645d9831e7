-- The host functions of 20261207000100_hosts_per_owner.sql read each task's owner from
-- its schedule row (task_schedule.owner, 20261207001000_fair_claim.sql) instead of
-- looking the task up: held_back, row_tasks and claim_admitted_tasks as before
-- otherwise.

-- A schedule row's owner as tasks hold it: null for the service's own (the nil uuid).
create function taskman_private.schedule_owner(owner uuid)
returns uuid
language sql immutable parallel safe
set search_path = ''
as $$
  select nullif(owner, '00000000-0000-0000-0000-000000000000'::uuid)
$$;

revoke all on function taskman_private.schedule_owner(uuid) from public, anon, authenticated;

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

create or replace function taskman.claim_admitted_tasks(
  worker_id text,
  batch_size integer default 100,
  lease_seconds integer default 60,
  cooldown_seconds double precision default 5,
  max_cooldown_seconds double precision default 300,
  spread_seconds double precision default 5)
returns table (
  task_id uuid, poll_url text, poll_method text, poll_headers jsonb, poll_body jsonb,
  profile jsonb, task_type text, status text, attempt_count integer, error_count integer,
  max_attempts integer, poll_interval_seconds integer, deadline_at timestamptz,
  lease_expires_at timestamptz, submit_url text, submit_method text, submit_headers jsonb,
  submit_body jsonb, callback_token text, owner uuid, held boolean)
language plpgsql volatile security definer
set search_path = ''
set enable_seqscan = off
as $$
begin
  return query
  with claimed as materialized (
    select c.*, row_number() over () as ord
    from taskman.claim_due_tasks(claim_admitted_tasks.worker_id,
                                 claim_admitted_tasks.batch_size,
                                 claim_admitted_tasks.lease_seconds) c
  ),
  held as materialized (
    select h.task_id
    from taskman_private.held_back(
      claim_admitted_tasks.worker_id,
      (select array_agg(c.task_id order by c.ord) from claimed c),
      claim_admitted_tasks.cooldown_seconds, claim_admitted_tasks.max_cooldown_seconds,
      claim_admitted_tasks.spread_seconds) as h(task_id)
  )
  select c.task_id, c.poll_url, c.poll_method, c.poll_headers, c.poll_body, c.profile,
         c.task_type, c.status, c.attempt_count, c.error_count, c.max_attempts,
         c.poll_interval_seconds, c.deadline_at, c.lease_expires_at, c.submit_url,
         c.submit_method, c.submit_headers, c.submit_body, c.callback_token,
         (select taskman_private.schedule_owner(s.owner)
          from taskman_private.task_schedule s where s.task_id = c.task_id),
         c.task_id in (select h.task_id from held h)
  from claimed c
  order by c.ord;
end
$$;
