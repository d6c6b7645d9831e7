-- Bounded input: one task's data must not be able to stall the worker or the
-- outbox for everyone. JMESPath expressions (poll_config overrides and
-- response_profiles) are refused when too long, too deeply nested, or with too
-- many projections or function calls (the worker also bounds their evaluation);
-- poll_config is size-capped; poll_headers must be valid HTTP field names and
-- values (RFC 9110) that a task may set; poll outcomes carry a short reason
-- code into task_events, so a failed or retried poll says why.

-- What makes a JMESPath expression too large or too complex, or null if it is
-- within bounds. Literals ("quoted", 'raw', `json`) are blanked first. The
-- worker applies the same rules with the same words (worker/expression_limits.py).
create function taskman_private.jmespath_problem(expression text)
returns text
language plpgsql immutable
set search_path = ''
as $$
declare
  max_length constant integer := 500;
  max_depth constant integer := 10;
  max_projections constant integer := 5;
  max_functions constant integer := 8;
  code text;
  brackets text;
  depth integer := 0;
  deepest integer := 0;
  projections integer;
  functions integer;
  c text;
begin
  if expression is null then
    return null;
  end if;
  if length(expression) > max_length then
    return format('is longer than %s characters', max_length);
  end if;
  code := regexp_replace(expression,
    '"(?:\\.|[^"\\])*"|''(?:\\.|[^''\\])*''|`(?:\\.|[^`\\])*`', '0', 'g');
  brackets := regexp_replace(code, '[^][(){}]', '', 'g');
  foreach c in array string_to_array(brackets, null) loop
    if c in ('[', '(', '{') then
      depth := depth + 1;
      deepest := greatest(deepest, depth);
    else
      depth := depth - 1;
    end if;
  end loop;
  if deepest > max_depth then
    return format('nests brackets %s deep; at most %s levels are allowed', deepest, max_depth);
  end if;
  projections := (length(code) - length(replace(code, '*', '')))
               + (length(code) - length(replace(code, '[]', ''))) / 2
               + (length(code) - length(replace(code, '[?', ''))) / 2;
  if projections > max_projections then
    return format('has %s projections ([*], [], .*, [?...]); at most %s are allowed',
                  projections, max_projections);
  end if;
  functions := regexp_count(code, '[A-Za-z_][A-Za-z0-9_]*\s*\(');
  if functions > max_functions then
    return format('has %s function calls; at most %s are allowed', functions, max_functions);
  end if;
  return null;
end
$$;

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
      when k in ('completed_values', 'failed_values', 'running_values', 'pending_values') then
        if jsonb_typeof(v) <> 'array'
           or exists (select 1 from jsonb_array_elements(v) e where jsonb_typeof(e) <> 'string') then
          perform taskman_private.reject('poll_config', format('.%s must be an array of strings', k));
        end if;
      else
        perform taskman_private.reject('poll_config', format(
          'has an unknown key %s; allowed: profile, status_source, status_path, completed_values, '
          'failed_values, running_values, pending_values, result_path, progress_path, '
          'progress_message_path, error_path', to_jsonb(k)));
    end case;
  end loop;
end
$$;

-- The same bounds for the expressions of a profile, whoever writes it.
create function taskman_private.response_profiles_check()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  field text;
  problem text;
begin
  foreach field in array array['status_path', 'result_path', 'progress_path',
                               'progress_message_path', 'error_path'] loop
    problem := taskman_private.jmespath_problem(to_jsonb(new) ->> field);
    if problem is not null then
      perform taskman_private.reject(field, problem);
    end if;
  end loop;
  return new;
end
$$;

create trigger response_profiles_check before insert or update on taskman.response_profiles
  for each row execute function taskman_private.response_profiles_check();

-- RFC 9110 field names (tokens) and values: visible ASCII, with spaces and tabs
-- inside but not at the ends; no control characters (CR, LF, NUL) and no
-- obs-text (a JSON string is Unicode; which bytes would it be sent as?). The
-- headers that frame a message belong to the HTTP client, not to a task.
create or replace function taskman_private.validate_poll_headers(headers jsonb)
returns void
language plpgsql immutable
set search_path = ''
as $$
declare
  field_value constant text := '^([!-~]([ ' || chr(9) || '!-~]*[!-~])?)?$';
  h record;
begin
  if jsonb_typeof(headers) <> 'object' then
    perform taskman_private.reject('poll_headers', 'must be a JSON object of header names to string values');
  end if;
  if octet_length(headers::text) > 16384 then
    perform taskman_private.reject('poll_headers', 'must be at most 16 KiB');
  end if;
  for h in select key, value from jsonb_each(headers) loop
    if h.key !~ '^[A-Za-z0-9!#$%&''*+.^_`|~-]+$' then
      perform taskman_private.reject('poll_headers', format(
        'has a header name %s that is not a valid HTTP field name (letters, digits and !#$%%&''*+.^_`|~-)',
        to_jsonb(left(h.key, 60))));
    end if;
    if lower(h.key) in ('connection', 'content-length', 'keep-alive', 'proxy-connection', 'te',
                        'trailer', 'transfer-encoding', 'upgrade') then
      perform taskman_private.reject('poll_headers', format(
        'cannot set %s: it is set by Taskman''s HTTP client', to_jsonb(h.key)));
    end if;
    if jsonb_typeof(h.value) <> 'string' then
      perform taskman_private.reject('poll_headers', format(
        'value of %s must be a string', to_jsonb(h.key)));
    end if;
    if (h.value ->> 0) !~ field_value then
      perform taskman_private.reject('poll_headers', format(
        'value of %s is not a valid HTTP field value: visible ASCII only, with spaces or '
        'tabs inside but not at the ends; no line breaks, control or non-ASCII characters',
        to_jsonb(h.key)));
    end if;
  end loop;
end
$$;

-- As before, plus `reason`: a short code for why a poll failed or was retried
-- (timeout, http_status, response_too_large, evaluation_budget, invalid_request,
-- ...), shown to owners in the poll's event. Raw text stays raw_error.
create or replace function taskman.record_poll_results(results jsonb)
returns table (task_id uuid, status text)
language plpgsql volatile security definer
set search_path = ''
as $$
begin
  if jsonb_typeof(results) is distinct from 'array' then
    perform taskman_private.reject('results', 'must be a JSON array of poll outcomes');
  end if;
  if exists (select 1 from jsonb_to_recordset(results) as r(task_id uuid, worker_id text,
                                                          status text, error_code text)
             where r.task_id is null or r.worker_id is null
                or r.status not in ('in_progress', 'completed', 'failed')
                or r.error_code not in ('remote_failed', 'poll_error', 'invalid_response')) then
    perform taskman_private.reject('results',
      'each outcome needs task_id and worker_id; status must be in_progress, completed or failed; '
      'error_code must be remote_failed, poll_error or invalid_response');
  end if;

  return query
  with outcome as (
    select r.task_id, r.worker_id, coalesce(r.ok, false) as ok, r.status, r.error_code,
           greatest(coalesce(r.delay_seconds, 0), 0) as delay_seconds, r.result,
           least(greatest(r.progress, 0), 100) as progress,
           left(r.progress_message, 1000) as progress_message,
           left(r.error_message, 2000) as error_message, r.http_status, r.latency_ms,
           left(r.raw_response, 65536) as raw_response, left(r.raw_error, 4000) as raw_error,
           left(r.reason, 60) as reason
    from jsonb_to_recordset(results) as r(
      task_id uuid, worker_id text, ok boolean, status text, error_code text,
      delay_seconds double precision, result jsonb, progress integer, progress_message text,
      error_message text, http_status integer, latency_ms double precision,
      raw_response text, raw_error text, reason text)
  ),
  decided as (
    -- FOR UPDATE re-reads a row changed since the snapshot (a sweep, a cancel),
    -- so counts and transitions are decided on its latest version.
    select o.task_id,
           case when o.ok then 0 else t.error_count + 1 end as error_count,
           case
             when o.status in ('completed', 'failed') then o.status
             when not o.ok and t.error_count + 1 >= t.max_attempts then 'failed'
             when t.deadline_at <= now() then 'failed'
             when o.status = 'in_progress' then 'in_progress'
             else t.status
           end as status,
           case
             when o.status = 'failed' then coalesce(o.error_code, 'remote_failed')
             when o.status = 'completed' then null
             when not o.ok and t.error_count + 1 >= t.max_attempts
               then case when o.error_code = 'invalid_response' then 'invalid_response'
                         else 'max_attempts' end
             when t.deadline_at <= now() then 'timeout'
           end as error_code
    from outcome o
    join taskman.tasks t on t.task_id = o.task_id
    where t.lease_owner = o.worker_id
      and t.status in ('pending', 'in_progress')
    for update of t
  ),
  written as (
    update taskman.tasks t
    set status = d.status,
        error_code = coalesce(d.error_code, t.error_code),
        error_message = case when o.status = 'failed' then o.error_message else t.error_message end,
        result = coalesce(o.result, t.result),
        progress = coalesce(o.progress, t.progress),
        progress_message = coalesce(o.progress_message, t.progress_message),
        attempt_count = t.attempt_count + 1,
        error_count = d.error_count,
        last_polled_at = now(),
        lease_owner = null,
        lease_expires_at = null,
        next_poll_at = now() + make_interval(secs => o.delay_seconds)
    from decided d
    join outcome o on o.task_id = d.task_id
    where t.task_id = d.task_id
    returning t.task_id, t.user_id, t.status, t.error_count, t.next_poll_at
  ),
  events as (
    insert into taskman.task_events (task_id, user_id, event_type, detail)
    select w.task_id, w.user_id, e.event_type,
           jsonb_strip_nulls(jsonb_build_object(
             'http_status', o.http_status, 'latency_ms', round(o.latency_ms::numeric, 1),
             'outcome', case when not o.ok then 'error' else coalesce(o.status, 'no_change') end,
             'reason', o.reason,
             'error_count', w.error_count,
             'next_poll_at', case when e.event_type = 'retry_scheduled' then w.next_poll_at end))
    from written w
    join outcome o on o.task_id = w.task_id
    cross join lateral (
      select 'polled' as event_type
      union all
      select 'retry_scheduled' where not o.ok and w.status in ('pending', 'in_progress')
    ) e
  ),
  raw as (
    insert into taskman_private.task_private as p
      (task_id, last_http_status, last_response, last_error, updated_at)
    select w.task_id, o.http_status, o.raw_response, o.raw_error, now()
    from written w
    join outcome o on o.task_id = w.task_id
    on conflict on constraint task_private_pkey do update
    set last_http_status = excluded.last_http_status,
        last_response = excluded.last_response,
        last_error = excluded.last_error,
        updated_at = excluded.updated_at
  )
  select w.task_id, w.status from written w;
end
$$;

revoke all on function taskman_private.jmespath_problem, taskman_private.response_profiles_check
  from public, anon, authenticated;
