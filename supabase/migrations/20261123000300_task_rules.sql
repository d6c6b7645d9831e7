-- Task rules enforced by the database itself, whoever writes: input validation
-- with errors that name the field (SQLSTATE 22023), defaults for explicit
-- nulls, legal status transitions (PT409), updated_at, the event history and a
-- NOTIFY on every insert and status change.

create function taskman_private.reject(field text, message text)
returns void
language plpgsql immutable
set search_path = ''
as $$
begin
  raise exception using errcode = '22023', message = field || ' ' || message, column = field;
end
$$;

create function taskman_private.is_http_url(url text)
returns boolean
language sql immutable
set search_path = ''
as $$
  select url ~* '^https?://[^\s/?#@]+(:[0-9]{1,5})?([/?#][^\s]*)?$' and length(url) <= 2048
$$;

-- The neutral, user-facing sentence for each failure code. Raw remote text never
-- reaches users; it stays in taskman_private.task_private.
create function taskman_private.neutral_error(code text)
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
  end
$$;

create function taskman_private.validate_poll_config(config jsonb)
returns void
language plpgsql stable
set search_path = ''
as $$
declare
  k text;
  v jsonb;
begin
  if jsonb_typeof(config) <> 'object' then
    perform taskman_private.reject('poll_config', 'must be a JSON object');
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
        if jsonb_typeof(v) <> 'string' or length(v ->> 0) > 500 then
          perform taskman_private.reject('poll_config',
            format('.%s must be a JMESPath expression (a string of at most 500 characters)', k));
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

-- Checks the caller-supplied fields of a task. On update only changed fields
-- are checked, so the worker's frequent writes stay cheap.
create function taskman_private.validate_task(t taskman.tasks, old taskman.tasks, is_insert boolean)
returns void
language plpgsql stable
set search_path = ''
as $$
begin
  if is_insert or t.poll_url is distinct from old.poll_url then
    if t.poll_url is not null and not taskman_private.is_http_url(t.poll_url) then
      perform taskman_private.reject('poll_url', 'must be an http:// or https:// URL of at most 2048 characters');
    end if;
  end if;
  if is_insert or t.callback_url is distinct from old.callback_url then
    if t.callback_url is not null and not taskman_private.is_http_url(t.callback_url) then
      perform taskman_private.reject('callback_url', 'must be an http:// or https:// URL of at most 2048 characters');
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

create function taskman_private.validate_poll_headers(headers jsonb)
returns void
language plpgsql immutable
set search_path = ''
as $$
begin
  if jsonb_typeof(headers) <> 'object'
     or exists (select 1 from jsonb_each(headers) h
                where jsonb_typeof(h.value) <> 'string' or h.key !~ '^[A-Za-z0-9!#$%&''*+.^_`|~-]+$') then
    perform taskman_private.reject('poll_headers', 'must be a JSON object of header names to string values');
  end if;
  if octet_length(headers::text) > 16384 then
    perform taskman_private.reject('poll_headers', 'must be at most 16 KiB');
  end if;
end
$$;

-- BEFORE INSERT: fill defaults (also for explicit nulls), refuse values only
-- Taskman may set, validate, and move poll_headers out of the readable table.
create function taskman_private.tasks_prepare_insert()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  if new.status is not null and new.status <> 'pending' then
    perform taskman_private.reject('status', 'must be pending (or omitted) when a task is created');
  end if;
  if num_nonnulls(new.result, new.error_code, new.error_message, new.progress, new.progress_message,
                  new.attempt_count, new.error_count, new.deadline_at, new.next_poll_at,
                  new.last_polled_at, new.created_at, new.updated_at, new.started_at,
                  new.completed_at, new.lease_owner, new.lease_expires_at) > 0 then
    perform taskman_private.reject('task',
      'fields result, error_code, error_message, progress, progress_message, counters, timestamps '
      'and leases are managed by Taskman and cannot be set when a task is created');
  end if;

  new.status := 'pending';
  new.task_type := coalesce(new.task_type, 'generic');
  new.poll_method := upper(coalesce(new.poll_method, 'GET'));
  new.poll_config := coalesce(new.poll_config, '{}');
  new.poll_interval_seconds := coalesce(new.poll_interval_seconds, 30);
  new.max_attempts := coalesce(new.max_attempts, 10);
  new.timeout_minutes := coalesce(new.timeout_minutes, 120);
  new.metadata := coalesce(new.metadata, '{}');
  new.attempt_count := 0;
  new.error_count := 0;

  perform taskman_private.validate_task(new, null::taskman.tasks, true);

  new.created_at := now();
  new.updated_at := now();
  new.deadline_at := now() + make_interval(mins => new.timeout_minutes);
  -- A task without poll_url waits for a callback; the deadline still applies.
  new.next_poll_at := case when new.poll_url is not null then now() end;

  if new.poll_headers is not null then
    perform taskman_private.validate_poll_headers(new.poll_headers);
    insert into taskman_private.task_private (task_id, poll_headers)
    values (new.task_id, new.poll_headers);
    new.poll_headers := null;
  end if;
  return new;
end
$$;

-- BEFORE UPDATE: legal transitions only; entering a state sets its timestamps.
-- Terminal states are final except through retry_task(), which marks its
-- transaction with taskman.retry_task = <task_id>.
create function taskman_private.tasks_prepare_update()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  legal boolean;
begin
  if new.task_id <> old.task_id or new.created_at <> old.created_at then
    perform taskman_private.reject('task', 'task_id and created_at cannot change');
  end if;
  if new.poll_headers is not null then
    perform taskman_private.validate_poll_headers(new.poll_headers);
    insert into taskman_private.task_private (task_id, poll_headers)
    values (new.task_id, new.poll_headers)
    on conflict (task_id) do update set poll_headers = excluded.poll_headers, updated_at = now();
    new.poll_headers := null;
  end if;
  new.poll_method := upper(new.poll_method);
  -- Claims and lease changes touch no caller-supplied column: skip the checks.
  if (new.poll_url, new.callback_url, new.poll_method, new.task_type, new.external_id,
      new.idempotency_key, new.poll_interval_seconds, new.max_attempts, new.timeout_minutes,
      new.poll_config, new.poll_body, new.metadata, new.progress, new.progress_message,
      new.error_message, new.result)
     is distinct from
     (old.poll_url, old.callback_url, old.poll_method, old.task_type, old.external_id,
      old.idempotency_key, old.poll_interval_seconds, old.max_attempts, old.timeout_minutes,
      old.poll_config, old.poll_body, old.metadata, old.progress, old.progress_message,
      old.error_message, old.result) then
    perform taskman_private.validate_task(new, old, false);
  end if;

  if new.status is distinct from old.status then
    legal := case old.status
      when 'pending' then new.status in ('in_progress', 'completed', 'failed', 'cancelled')
      when 'in_progress' then new.status in ('completed', 'failed', 'cancelled')
      else new.status = 'pending'
           and coalesce(current_setting('taskman.retry_task', true), '') = old.task_id::text
    end;
    if not coalesce(legal, false) then
      raise exception using errcode = 'PT409',
        message = format('task %s cannot move from %s to %s', old.task_id, old.status, new.status),
        hint = case when old.status in ('completed', 'failed', 'cancelled')
                    then 'Terminal tasks change only through retry_task.'
                    else 'A task moves pending -> in_progress -> completed, failed or cancelled.' end;
    end if;

    case new.status
      when 'in_progress' then
        new.started_at := coalesce(new.started_at, now());
      when 'pending' then  -- retry_task: a fresh run with the same definition
        new.error_count := 0;
        new.error_code := null;
        new.error_message := null;
        new.result := null;
        new.progress := null;
        new.progress_message := null;
        new.started_at := null;
        new.completed_at := null;
        new.deadline_at := now() + make_interval(mins => new.timeout_minutes);
        new.next_poll_at := case when new.poll_url is not null then now() end;
        new.lease_owner := null;
        new.lease_expires_at := null;
      else  -- completed, failed, cancelled
        new.completed_at := now();
        new.next_poll_at := null;
        new.lease_owner := null;
        new.lease_expires_at := null;
        if new.status = 'completed' then
          new.progress := 100;
          new.error_code := null;
          new.error_message := null;
        elsif new.status = 'failed' then
          new.error_code := coalesce(new.error_code, 'remote_failed');
          new.error_message := coalesce(new.error_message, taskman_private.neutral_error(new.error_code));
        end if;
    end case;
  end if;

  new.updated_at := now();
  return new;
end
$$;

create function taskman_private.notify_task(t taskman.tasks)
returns void
language sql volatile
set search_path = ''
as $$
  select pg_notify('taskman', json_build_object(
    'task_id', t.task_id, 'status', t.status, 'user_id', t.user_id)::text)
$$;

create function taskman_private.tasks_after_insert()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  insert into taskman.task_events (task_id, user_id, event_type, to_status, detail)
  values (new.task_id, new.user_id, 'created', new.status,
          jsonb_build_object('task_type', new.task_type, 'polled', new.poll_url is not null));
  perform taskman_private.notify_task(new);
  return null;
end
$$;

create function taskman_private.tasks_after_status_change()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  insert into taskman.task_events (task_id, user_id, event_type, from_status, to_status, detail)
  values (new.task_id, new.user_id,
          case when new.status = 'cancelled' then 'cancelled'
               when new.status = 'pending' then 'retried'
               else 'status_changed' end,
          old.status, new.status,
          jsonb_strip_nulls(jsonb_build_object('error_code', new.error_code)));
  perform taskman_private.notify_task(new);
  return null;
end
$$;

create trigger tasks_prepare_insert before insert on taskman.tasks
  for each row execute function taskman_private.tasks_prepare_insert();
create trigger tasks_prepare_update before update on taskman.tasks
  for each row execute function taskman_private.tasks_prepare_update();
create trigger tasks_after_insert after insert on taskman.tasks
  for each row execute function taskman_private.tasks_after_insert();
create trigger tasks_after_status_change after update of status on taskman.tasks
  for each row when (old.status is distinct from new.status)
  execute function taskman_private.tasks_after_status_change();
