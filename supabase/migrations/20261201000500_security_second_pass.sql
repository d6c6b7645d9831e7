-- Security, second pass: a signed-in caller without a user id gets nothing of the
-- service's, and host names that cannot be resolved are refused where they enter
-- (validate_task is re-created only for its message: its URL checks now name the
-- host). poll_config's byte limit came with the bounded-input migration.
--
-- PostgREST accepts any JWT signed with the project's key, and custom or
-- third-party auth can mint an `authenticated` one without `sub`: such a caller
-- is neither a user nor the service. Every RPC refuses it (42501) except the
-- callback-token ones (update_task, callback_profile), which need no account, and
-- so does every direct write to taskman.tasks, where RLS alone would silently
-- match nothing.

-- Raises 42501 unless the caller is the service or has a user id. A definer, so
-- the API roles need execute on it alone (the caller is read from the request's
-- role and claims, which a definer does not change).
create function taskman_private.require_user()
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

-- The task row if the caller may act on it (owner or service), else PT404.
create or replace function taskman_private.visible_task(p_task_id uuid, lock_row boolean)
returns taskman.tasks
language plpgsql volatile
set search_path = ''
as $$
declare
  t taskman.tasks;
begin
  perform taskman_private.require_user();
  if lock_row then
    select * into t from taskman.tasks where task_id = p_task_id for update;
  else
    select * into t from taskman.tasks where task_id = p_task_id;
  end if;
  if not found
     or not (taskman_private.caller_is_service() or coalesce(t.user_id = auth.uid(), false)) then
    raise exception using errcode = 'PT404', message = format('task %s not found', p_task_id);
  end if;
  return t;
end
$$;

-- Direct writes (PostgREST's POST, PATCH, DELETE on /tasks): checked once a
-- statement, as the caller. Inside Taskman's own functions current_user is their
-- owner, so token holders reporting through update_task are not affected.
create function taskman_private.tasks_require_user()
returns trigger
language plpgsql security invoker
set search_path = ''
as $$
begin
  if current_user in ('anon', 'authenticated') then
    perform taskman_private.require_user();
  end if;
  return null;
end
$$;

create trigger tasks_require_user before insert or update or delete on taskman.tasks
  for each statement execute function taskman_private.tasks_require_user();

-- task_stats answers a caller without a user id with an error, not with zeros: the
-- figures (still read under the caller's RLS) move behind a check.
alter function taskman.task_stats(timestamptz) set schema taskman_private;

create function taskman.task_stats(since timestamptz default now() - interval '7 days')
returns jsonb
language plpgsql stable security invoker
set search_path = ''
as $$
begin
  perform taskman_private.require_user();
  return taskman_private.task_stats(task_stats.since);
end
$$;

create or replace function taskman_private.validate_task(t taskman.tasks, old taskman.tasks, is_insert boolean)
returns void
language plpgsql stable
set search_path = ''
as $$
begin
  if is_insert or t.poll_url is distinct from old.poll_url then
    if t.poll_url is not null and not taskman_private.is_http_url(t.poll_url) then
      perform taskman_private.reject('poll_url', 'must be an http:// or https:// URL of at most 2048 characters, with a valid host name');
    end if;
  end if;
  if is_insert or t.callback_url is distinct from old.callback_url then
    if t.callback_url is not null and not taskman_private.is_http_url(t.callback_url) then
      perform taskman_private.reject('callback_url', 'must be an http:// or https:// URL of at most 2048 characters, with a valid host name');
    end if;
  end if;
  if t.poll_method not in ('GET', 'POST', 'PUT', 'PATCH') then
    perform taskman_private.reject('poll_method', 'must be one of GET, POST, PUT, PATCH');
  end if;
  if t.task_type !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$' then
    perform taskman_private.reject('task_type',
      'must be 1 to 64 letters, digits or _ . : - and start with a letter or digit');
  end if;
  if length(t.external_id) > 255 then
    perform taskman_private.reject('external_id', 'must be at most 255 characters');
  end if;
  if length(t.idempotency_key) > 255 or t.idempotency_key = '' then
    perform taskman_private.reject('idempotency_key', 'must be 1 to 255 characters');
  end if;
  if t.poll_interval_seconds not between 1 and 86400 then
    perform taskman_private.reject('poll_interval_seconds', 'must be between 1 and 86400');
  end if;
  if t.max_attempts not between 1 and 1000 then
    perform taskman_private.reject('max_attempts', 'must be between 1 and 1000');
  end if;
  if t.timeout_minutes not between 1 and 525600 then
    perform taskman_private.reject('timeout_minutes', 'must be between 1 and 525600 (one year)');
  end if;
  if is_insert or t.poll_config is distinct from old.poll_config then
    perform taskman_private.validate_poll_config(t.poll_config);
  end if;
  if (is_insert or t.poll_body is distinct from old.poll_body)
     and octet_length(t.poll_body::text) > 65536 then
    perform taskman_private.reject('poll_body', 'must be at most 64 KiB of JSON');
  end if;
  if is_insert or t.metadata is distinct from old.metadata then
    if jsonb_typeof(t.metadata) <> 'object' then
      perform taskman_private.reject('metadata', 'must be a JSON object');
    end if;
    if octet_length(t.metadata::text) > 65536 then
      perform taskman_private.reject('metadata', 'must be at most 64 KiB of JSON');
    end if;
  end if;
  if t.progress not between 0 and 100 then
    perform taskman_private.reject('progress', 'must be between 0 and 100');
  end if;
  if length(t.progress_message) > 1000 then
    perform taskman_private.reject('progress_message', 'must be at most 1000 characters');
  end if;
  if length(t.error_message) > 2000 then
    perform taskman_private.reject('error_message', 'must be at most 2000 characters');
  end if;
  if (is_insert or t.result is distinct from old.result) and octet_length(t.result::text) > 1048576 then
    perform taskman_private.reject('result', 'must be at most 1 MiB of JSON');
  end if;
end
$$;


-- Host names as resolvers take them: labels of 1 to 63 characters, 253 in all (a
-- final dot allowed), or an IP literal; a port up to 65535. What a resolver still
-- refuses (say, a long internationalised label) fails that task's poll with
-- poll_error.
create function taskman_private.is_valid_host(host text)
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

create or replace function taskman_private.is_http_url(url text)
returns boolean
language sql immutable
set search_path = ''
as $$
  select url ~* '^https?://[^\s/?#@]+(:[0-9]{1,5})?([/?#][^\s]*)?$'
     and length(url) <= 2048
     and taskman_private.is_valid_host(substring(url from '^[A-Za-z]+://(\[[^]]*\]|[^/?#:]+)'))
     and coalesce(substring(url from '^[A-Za-z]+://(?:\[[^]]*\]|[^/?#:]+):([0-9]+)')::integer, 0)
         <= 65535
$$;

revoke all on function taskman_private.require_user, taskman_private.tasks_require_user,
  taskman_private.is_valid_host, taskman_private.validate_task, taskman_private.is_http_url,
  taskman_private.visible_task from public, anon, authenticated;
grant execute on function taskman_private.require_user to anon, authenticated, service_role;
revoke all on function taskman.task_stats from public, anon;
grant execute on function taskman.task_stats to authenticated, service_role;
