-- The small helpers everything else uses: the value lists the tables' check constraints
-- test (status, error code, event type), the one way bad input is refused
-- (reject: SQLSTATE 22023 naming the field), who is calling, and URL, host, header and
-- JMESPath checks. Defined first because the tables' constraints call them.

-- The values of tasks.status, tasks.error_code and task_events.event_type, each tested
-- through a function: a CHECK's expression is read back from the catalog and planned for
-- every INSERT or UPDATE statement, and constant arrays inline would be most of that work
-- (~8% of a create_task call, paid by every claim, poll result and event too).
create or replace function taskman_private.is_task_status(value text)
returns boolean
language plpgsql immutable
set search_path = ''
as $$
begin
  return value in ('pending', 'in_progress', 'completed', 'failed', 'cancelled');
end
$$;

create or replace function taskman_private.is_error_code(value text)
returns boolean
language plpgsql immutable
set search_path = ''
as $$
begin
  return value in ('timeout', 'max_attempts', 'remote_failed', 'invalid_response', 'poll_error',
                   'submit_failed', 'heartbeat_timeout');
end
$$;

create or replace function taskman_private.is_event_type(value text)
returns boolean
language plpgsql immutable
set search_path = ''
as $$
begin
  return value in ('created', 'polled', 'status_changed', 'retry_scheduled', 'callback_received',
                   'cancelled', 'retried', 'alert_sent', 'notification_delivered',
                   'notification_failed', 'notification_given_up', 'submitted');
end
$$;

-- The one way bad input is refused, whoever writes: SQLSTATE 22023 with a message that
-- starts with the field's name, which is also the error's column.
create or replace function taskman_private.reject(field text, message text)
returns void
language plpgsql immutable
set search_path = ''
as $$
begin
  raise exception using errcode = '22023', message = field || ' ' || message, column = field;
end
$$;
revoke all on function taskman_private.reject from public, anon, authenticated;

-- The error_message a task gets for each error_code, in words that reveal nothing of
-- the remote's answer (which stays service-side).
create or replace function taskman_private.neutral_error(code text)
returns text
language sql immutable
set search_path = ''
as $$
  select case code
    when 'timeout' then 'The task did not finish before its deadline.'
    when 'max_attempts' then 'The status endpoint kept failing; Taskman gave up after repeated attempts.'
    when 'remote_failed' then 'The remote job reported that it failed.'
    when 'invalid_response' then 'The status endpoint answered with something Taskman could not read.'
    when 'poll_error' then 'The status endpoint refused the request.'
    when 'submit_failed' then 'The remote refused the request that starts the job.'
    when 'heartbeat_timeout' then 'The remote job sent no sign of life within its heartbeat interval.'
  end
$$;
revoke all on function taskman_private.neutral_error from public, anon, authenticated;

-- Who is calling: the role in force (PostgREST's SET LOCAL ROLE) or the login.
-- caller_is_service: service_role, a member of it, or a superuser or BYPASSRLS login
-- (the worker), unless the request's claims say another role. Both are plpgsql: a
-- call is an expression, where a non-inlined SQL function starts an executor each
-- time. The subquery on pg_roles runs only for a login that is neither service_role
-- nor a member of it.
create or replace function taskman_private.session_role()
returns text
language plpgsql stable
set search_path = ''
as $$
begin
  return coalesce(nullif(current_setting('role'), 'none'), session_user::text);
end
$$;
revoke all on function taskman_private.session_role from public, anon, authenticated;

create or replace function taskman_private.caller_is_service()
returns boolean
language plpgsql stable
set search_path = ''
as $$
declare
  name text := taskman_private.session_role();
begin
  if coalesce(auth.role(), 'service_role') <> 'service_role' then
    return false;
  end if;
  if name = 'service_role' then
    return true;
  end if;
  if name = 'authenticator' then
    return false;
  end if;
  if pg_catalog.pg_has_role(name, 'service_role', 'member') then
    return true;
  end if;
  return exists (select 1 from pg_catalog.pg_roles x
                 where x.rolname = name and (x.rolsuper or x.rolbypassrls));
end
$$;
revoke all on function taskman_private.caller_is_service from public, anon, authenticated;

-- Raises 42501 unless the caller is the service or has a user id. A definer, so
-- the API roles need execute on it alone (the caller is read from the request's
-- role and claims, which a definer does not change).
create or replace function taskman_private.require_user()
returns void
language plpgsql stable security definer
set search_path = ''
as $$
begin
  if auth.uid() is null and not taskman_private.caller_is_service() then
    raise exception using errcode = '42501',
      message = 'sign in: this request has no user id (the token has no sub claim)';
  end if;
end
$$;
revoke all on function taskman_private.require_user from public;
grant execute on function taskman_private.require_user to anon, authenticated, service_role;

-- An absolute http or https URL of at most 2048 characters with a valid host and port.
-- The common form (a plain host name, an optional port) is checked with one match and
-- split without capturing ones (those dominated its cost); a label rule without the
-- label walk: no empty label, none over 63.
create or replace function taskman_private.is_http_url(url text)
returns boolean
language plpgsql immutable
set search_path = ''
as $$
declare
  authority text;
  host text;
begin
  if url ~ '^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?([/?#][^\s]*)?$' then
    authority := split_part(split_part(split_part(url, '/', 3), '?', 1), '#', 1);
    host := split_part(authority, ':', 1);
    return length(url) <= 2048 and length(host) <= 254 and host !~ '^\.|\.\.|[^.]{64}'
       and coalesce(nullif(split_part(authority, ':', 2), '')::integer, 0) <= 65535;
  end if;
  return url ~* '^https?://[^\s/?#@]+(:[0-9]{1,5})?([/?#][^\s]*)?$'
     and length(url) <= 2048
     and taskman_private.is_valid_host(substring(url from '^[A-Za-z]+://(\[[^]]*\]|[^/?#:]+)'))
     and coalesce(substring(url from '^[A-Za-z]+://(?:\[[^]]*\]|[^/?#:]+):([0-9]+)')::integer, 0)
         <= 65535;
end
$$;
revoke all on function taskman_private.is_http_url from public, anon, authenticated;

-- Host names as resolvers take them: labels of 1 to 63 characters, 253 in all (a
-- final dot allowed), or an IP literal; a port up to 65535. What a resolver still
-- refuses (say, a long internationalised label) fails that task's poll with
-- poll_error.
create or replace function taskman_private.is_valid_host(host text)
returns boolean
language sql immutable
set search_path = ''
as $$
  select case
    when host ~ '^\[[0-9A-Fa-f:.]+\]$' then true
    else length(host) <= 254
         and not exists (
           select 1 from unnest(string_to_array(
             case when host ~ '[^.]\.$' then left(host, -1) else host end, '.')) as label
           where length(label) not between 1 and 63)
  end
$$;
revoke all on function taskman_private.is_valid_host from public, anon, authenticated;

-- The key of a URL's host, scheme://host:port (lower case, default port filled in),
-- as taskman_private.hosts and the worker name hosts; null for a URL without one. The
-- common form (http or https, a plain host name, an optional port) is split without a
-- capturing match; any other URL goes through the full match, evaluated once.
create or replace function taskman_private.host_key(url text)
returns text
language plpgsql immutable parallel safe
set search_path = ''
as $$
declare
  authority text;
begin
  if url ~ '^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?([/?#]|$)' then
    authority := split_part(split_part(split_part(url, '/', 3), '?', 1), '#', 1);
    return split_part(url, ':', 1) || '://' || lower(split_part(authority, ':', 1)) || ':'
           || coalesce(nullif(split_part(authority, ':', 2), '')::numeric::text,
                       case split_part(url, ':', 1) when 'http' then '80' else '443' end);
  end if;
  return (
    select lower(m[1]) || '://' || lower(m[2])
           || coalesce(':' || coalesce((nullif(m[3], '')::numeric)::text,
                                       case lower(m[1]) when 'http' then '80'
                                                        when 'https' then '443' end), '')
    from (select pg_catalog.regexp_match(
            url, '^([A-Za-z][A-Za-z0-9+.-]*)://(?:[^@/?#]*@)?(\[[^]/?#]*\]|[^:/?#]*)(?::([0-9]{0,9}))?(?:[/?#]|$)'
          ) as m offset 0) x
    where m is not null and m[2] <> '');
end
$$;
revoke all on function taskman_private.host_key from public, anon, authenticated;
grant execute on function taskman_private.host_key to service_role;

-- Header sets a task carries (poll, submit, callback): RFC 9110 names and values, as
-- validate_poll_headers checks them, under the field's own name; `reserved` (lower
-- case; a trailing * matches a prefix) are Taskman's to set.
create or replace function taskman_private.validate_headers(field text, headers jsonb, reserved text[])
returns void
language plpgsql immutable
set search_path = ''
as $$
declare
  field_value constant text := '^([!-~]([ ' || chr(9) || '!-~]*[!-~])?)?$';
  h record;
begin
  if jsonb_typeof(headers) <> 'object' then
    perform taskman_private.reject(field, 'must be a JSON object of header names to string values');
  end if;
  if octet_length(headers::text) > 16384 then
    perform taskman_private.reject(field, 'must be at most 16 KiB');
  end if;
  for h in select key, value from jsonb_each(headers) loop
    if h.key !~ '^[A-Za-z0-9!#$%&''*+.^_`|~-]+$' then
      perform taskman_private.reject(field, format(
        'has a header name %s that is not a valid HTTP field name (letters, digits and !#$%%&''*+.^_`|~-)',
        to_jsonb(left(h.key, 60))));
    end if;
    if lower(h.key) in ('connection', 'content-length', 'keep-alive', 'proxy-connection', 'te',
                        'trailer', 'transfer-encoding', 'upgrade', 'host')
       or exists (select 1 from unnest(reserved) r
                  where lower(h.key) = r or (r like '%*' and lower(h.key) like left(r, -1) || '%')) then
      perform taskman_private.reject(field, format(
        'cannot set %s: Taskman sets it', to_jsonb(h.key)));
    end if;
    if jsonb_typeof(h.value) <> 'string' then
      perform taskman_private.reject(field, format('value of %s must be a string', to_jsonb(h.key)));
    end if;
    if (h.value ->> 0) !~ field_value then
      perform taskman_private.reject(field, format(
        'value of %s is not a valid HTTP field value: visible ASCII only, with spaces or '
        'tabs inside but not at the ends; no line breaks, control or non-ASCII characters',
        to_jsonb(h.key)));
    end if;
  end loop;
end
$$;
revoke all on function taskman_private.validate_headers from public, anon, authenticated;

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
revoke all on function taskman_private.validate_poll_headers from public, anon, authenticated;

-- What makes a JMESPath expression too large or too complex, or null if it is
-- within bounds. Literals ("quoted", 'raw', `json`) are blanked first. The
-- worker applies the same rules with the same words (worker/expression_limits.py).
create or replace function taskman_private.jmespath_problem(expression text)
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
revoke all on function taskman_private.jmespath_problem from public, anon, authenticated;

-- What makes `doc` (whose text is `doc_text`) unservable, or null. Both rules need a
-- long text (a 65th level takes 130 characters, a number of 1e308 309 digits), so a
-- short document costs two length tests; a number is looked for only where the text has
-- a run of 309 digits.
create or replace function taskman_private.json_problem(doc jsonb, doc_text text)
returns text
language plpgsql immutable parallel safe
set search_path = ''
as $$
begin
  if doc is null or length(doc_text) < 130 then
    return null;
  end if;
  if jsonb_path_exists(doc, 'strict $.**{64} ? (@.type() == "array" || @.type() == "object")') then
    return 'must nest arrays and objects at most 64 deep';
  end if;
  if length(doc_text) >= 309 and doc_text ~ '[0-9]{250}[0-9]{59}'
     and jsonb_path_exists(doc, 'strict $.** ? (@.type() == "number" && (@ >= 1e308 || @ <= -1e308))') then
    return 'must hold only numbers of magnitude below 1e308';
  end if;
  return null;
end
$$;
revoke all on function taskman_private.json_problem from public, anon, authenticated;

-- Why `origins` (JSON) is not a list of origins; null if it is one.
create or replace function taskman_private.origins_problem(origins jsonb)
returns text
language sql immutable
set search_path = ''
as $$
  select case
    when jsonb_typeof(origins) <> 'array' then 'must be an array of origins'
    when jsonb_array_length(origins) > 20 then 'must list at most 20 origins'
    when exists (select 1 from jsonb_array_elements(origins) e
                 where jsonb_typeof(e) <> 'string'
                    or (e #>> '{}') !~* '^https?://([a-z0-9.-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?/?$')
      then 'must be an array of origins: "https://host" or "http://host:port", no path, '
           'query or credentials'
  end
$$;
revoke all on function taskman_private.origins_problem from public, anon, authenticated;
