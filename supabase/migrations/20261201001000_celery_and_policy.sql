-- A remote job that was cancelled reads as `cancelled`, not as a failure.
--
-- Response profiles gain `cancelled_values`: a status in that list ends the task as
-- cancelled, with a neutral error_message and no failure alert (the outbox alerts on
-- failures only; the completion callback goes out as for any end). Celery's REVOKED
-- moves there from failed_values; the generic profile reads cancelled/canceled/revoked.
-- The worker records such polls with record_remote_cancellations, in one statement per
-- batch, beside record_poll_results.

alter table taskman.response_profiles
  add column cancelled_values text[] not null default '{}';

comment on column taskman.response_profiles.cancelled_values is
  'Status values meaning the remote job was cancelled: the task ends cancelled, without an alert.';

update taskman.response_profiles
set failed_values = array_remove(failed_values, 'REVOKED'),
    cancelled_values = '{REVOKED}'
where name = 'celery' and builtin;

update taskman.response_profiles
set cancelled_values = '{cancelled,canceled,revoked,aborted}'
where name = 'generic' and builtin;

-- poll_config may override cancelled_values like the other value lists.
create or replace function taskman_private.validate_poll_config(config jsonb)
returns void
language plpgsql stable
set search_path = ''
as $$
declare
  k text;
  v jsonb;
  problem text;
begin
  if jsonb_typeof(config) <> 'object' then
    perform taskman_private.reject('poll_config', 'must be a JSON object');
  end if;
  if octet_length(config::text) > 16384 then
    perform taskman_private.reject('poll_config', 'must be at most 16 KiB of JSON');
  end if;
  for k, v in select * from jsonb_each(config) loop
    case
      when k = 'profile' then
        if jsonb_typeof(v) <> 'string'
           or not exists (select 1 from taskman.response_profiles p where p.name = v ->> 0) then
          perform taskman_private.reject('poll_config',
            format('.profile %s is not a known response profile', v));
        end if;
      when k = 'status_source' then
        if v not in ('"body"', '"http"') then
          perform taskman_private.reject('poll_config', '.status_source must be "body" or "http"');
        end if;
      when k in ('status_path', 'result_path', 'progress_path', 'progress_message_path', 'error_path') then
        if jsonb_typeof(v) <> 'string' then
          perform taskman_private.reject('poll_config',
            format('.%s must be a JMESPath expression (a string of at most 500 characters)', k));
        end if;
        problem := taskman_private.jmespath_problem(v ->> 0);
        if problem is not null then
          perform taskman_private.reject('poll_config', format('.%s %s', k, problem));
        end if;
      when k in ('completed_values', 'failed_values', 'cancelled_values', 'running_values',
                 'pending_values') then
        if jsonb_typeof(v) <> 'array'
           or exists (select 1 from jsonb_array_elements(v) e where jsonb_typeof(e) <> 'string') then
          perform taskman_private.reject('poll_config', format('.%s must be an array of strings', k));
        end if;
      else
        perform taskman_private.reject('poll_config', format(
          'has an unknown key %s; allowed: profile, status_source, status_path, completed_values, '
          'failed_values, cancelled_values, running_values, pending_values, result_path, '
          'progress_path, progress_message_path, error_path', to_jsonb(k)));
    end case;
  end loop;
end
$$;

-- Ends, as cancelled, the tasks whose remote said their job was cancelled. Each
-- element: task_id, worker_id (the claim answered; ignored if the lease moved on),
-- http_status, latency_ms, raw_response, raw_error, reason. Like record_poll_results:
-- rows locked in task_id order, the schedule moved, a `polled` event, the raw answer
-- kept service-side; the status change writes the `cancelled` event and enqueues the
-- completion callback. Returns how many tasks were cancelled.
create function taskman.record_remote_cancellations(results jsonb)
returns integer
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  cancelled uuid[];
begin
  if jsonb_typeof(results) is distinct from 'array' then
    perform taskman_private.reject('results', 'must be a JSON array of poll outcomes');
  end if;
  if exists (select 1 from jsonb_to_recordset(results) as r(task_id uuid, worker_id text)
             where r.task_id is null or r.worker_id is null) then
    perform taskman_private.reject('results', 'each outcome needs task_id and worker_id');
  end if;

  perform 1
  from jsonb_to_recordset(results) as r(task_id uuid, worker_id text)
  join taskman_private.task_schedule s on s.task_id = r.task_id
  join taskman.tasks t on t.task_id = r.task_id
  where s.lease_owner = r.worker_id and t.status in ('pending', 'in_progress')
  order by t.task_id
  for update of t;

  with outcome as (
    select r.task_id, r.worker_id, r.http_status, r.latency_ms
    from jsonb_to_recordset(results) as r(task_id uuid, worker_id text, http_status integer,
                                          latency_ms double precision)
  ),
  held as (
    update taskman_private.task_schedule s
    set attempt_count = s.attempt_count + 1, error_count = 0, last_polled_at = now(),
        last_http_status = o.http_status, last_latency_ms = o.latency_ms,
        lease_owner = null, lease_expires_at = null, next_poll_at = null
    from outcome o, taskman.tasks t
    where s.task_id = o.task_id and t.task_id = o.task_id and s.lease_owner = o.worker_id
      and t.status in ('pending', 'in_progress')
    returning s.task_id
  )
  select coalesce(array_agg(h.task_id), '{}') into cancelled from held h;

  insert into taskman.task_events (task_id, user_id, event_type, detail)
  select t.task_id, t.user_id, 'polled', jsonb_strip_nulls(jsonb_build_object(
           'http_status', r.http_status, 'latency_ms', round(r.latency_ms::numeric, 1),
           'outcome', 'cancelled', 'reason', left(r.reason, 60), 'attempt', s.attempt_count,
           'error_count', 0))
  from jsonb_to_recordset(results) as r(task_id uuid, http_status integer,
                                        latency_ms double precision, reason text)
  join taskman.tasks t on t.task_id = r.task_id
  join taskman_private.task_schedule s on s.task_id = r.task_id
  where r.task_id = any(cancelled);

  update taskman.tasks t
  set status = 'cancelled',
      error_message = 'The remote job was cancelled.',
      attempt_count = s.attempt_count,
      error_count = 0,
      last_polled_at = s.last_polled_at
  from taskman_private.task_schedule s
  where t.task_id = any(cancelled) and s.task_id = t.task_id;

  insert into taskman_private.task_private as p
    (task_id, last_http_status, last_response, last_error, updated_at)
  select r.task_id, r.http_status, left(r.raw_response, 65536), left(r.raw_error, 4000), now()
  from jsonb_to_recordset(results) as r(task_id uuid, http_status integer, raw_response text,
                                        raw_error text)
  where r.task_id = any(cancelled)
  on conflict on constraint task_private_pkey do update
  set last_http_status = excluded.last_http_status,
      last_response = excluded.last_response,
      last_error = excluded.last_error,
      updated_at = excluded.updated_at;

  return cardinality(cancelled);
end
$$;

revoke all on function taskman.record_remote_cancellations from public, anon, authenticated;
grant execute on function taskman.record_remote_cancellations to service_role;
