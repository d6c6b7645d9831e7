-- Taskman starts the job too: submit requests, completion-callback headers, start
-- times, priority and heartbeats.
--
-- - submit_url, submit_method (default POST), submit_headers (write-only, kept in
--   taskman_private.task_private like poll_headers) and submit_body: the worker
--   sends the request once, with `Idempotency-Key: <task_id>`, and the answer's job
--   handle becomes poll_url (and external_id when a job id is read). submitted_at
--   records the success; once it is set the task is never submitted again. A task
--   whose submit uses {callback_url} keeps its callback token service-side too, so
--   the worker can hand the remote the edge's callback route.
-- - Response profiles read the handle: poll_url_path (JMESPath to a URL), or
--   job_id_path with poll_url_template (which must contain {job_id}).
-- - callback_headers (write-only): extra headers sent with the completion callback.
-- - start_at: the first submit or poll waits for it (the deadline counts from it).
-- - priority (-100..100, default 0): among due tasks, higher first. The claim walks
--   task_schedule_priority_due_idx one priority level at a time (a skip scan), so it
--   stays an index walk whatever the history size.
-- - heartbeat_seconds: a started task without a poll result, callback or update for
--   that long fails with heartbeat_timeout (the sweep checks it, as deadlines).
-- New error codes submit_failed and heartbeat_timeout; new event type submitted.

alter table taskman.tasks
  add column submit_url text,
  add column submit_method text,
  add column submit_headers jsonb
    constraint tasks_submit_headers_write_only check (submit_headers is null),
  add column submit_body jsonb,
  add column submitted_at timestamptz,
  add column callback_headers jsonb
    constraint tasks_callback_headers_write_only check (callback_headers is null),
  add column start_at timestamptz,
  add column priority integer not null default 0,
  add column heartbeat_seconds integer;

comment on column taskman.tasks.submit_headers is
  'Write-only. Headers sent with the submit request; stored where only service_role can read.';
comment on column taskman.tasks.callback_headers is
  'Write-only. Extra headers sent with the completion callback; stored where only service_role can read.';
comment on column taskman.tasks.submitted_at is
  'When the submit request was answered with success; the task is never submitted again after it.';

alter table taskman.tasks drop constraint tasks_error_code_check,
  add constraint tasks_error_code_check check (error_code in (
    'timeout', 'max_attempts', 'remote_failed', 'invalid_response', 'poll_error',
    'submit_failed', 'heartbeat_timeout'));

alter table taskman.task_events drop constraint task_events_type_check,
  add constraint task_events_type_check check (event_type in (
    'created', 'polled', 'status_changed', 'retry_scheduled', 'callback_received',
    'cancelled', 'retried', 'alert_sent', 'notification_delivered',
    'notification_failed', 'notification_given_up', 'submitted'));

alter table taskman_private.task_private
  add column submit_headers jsonb,
  add column callback_headers jsonb,
  -- The callback token in plain text, only for tasks whose submit uses {callback_url}.
  add column submit_callback_token text;

alter table taskman_private.poll_headers_in_flight
  alter column poll_headers drop not null,
  add column submit_headers jsonb,
  add column callback_headers jsonb;

alter table taskman_private.task_schedule
  add column priority integer not null default 0,
  -- The last poll that worked or callback received: the heartbeat's clock.
  add column alive_at timestamptz;

-- The claim path, by priority then due time; it replaces the due-time index (the
-- worker's "when is the next task due" walks it one priority level at a time too).
create index task_schedule_priority_due_idx
  on taskman_private.task_schedule (priority desc, next_poll_at)
  where next_poll_at is not null;
drop index taskman_private.task_schedule_due_idx;

-- The heartbeat sweep reads only started tasks that have a heartbeat.
create index tasks_heartbeat_idx on taskman.tasks (task_id)
  where heartbeat_seconds is not null and status = 'in_progress';

alter table taskman.response_profiles
  add column poll_url_path text,
  add column job_id_path text,
  add column poll_url_template text,
  add constraint response_profiles_poll_url_template_job_id
    check (poll_url_template is null or strpos(poll_url_template, '{job_id}') > 0);

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

-- Header sets a task carries (poll, submit, callback): RFC 9110 names and values, as
-- validate_poll_headers checks them, under the field's own name; `reserved` (lower
-- case; a trailing * matches a prefix) are Taskman's to set.
create function taskman_private.validate_headers(field text, headers jsonb, reserved text[])
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

-- The new fields' rules (validate_task checks the others).
create function taskman_private.validate_submit(t taskman.tasks, old taskman.tasks, is_insert boolean)
returns void
language plpgsql stable
set search_path = ''
as $$
begin
  if is_insert or t.submit_url is distinct from old.submit_url then
    if t.submit_url is not null and not taskman_private.is_http_url(t.submit_url) then
      perform taskman_private.reject('submit_url', 'must be an http:// or https:// URL of at most 2048 characters, with a valid host name');
    end if;
    if is_insert and t.submit_url is not null and t.poll_url is not null then
      perform taskman_private.reject('poll_url',
        'must be left out with submit_url: the submit''s answer gives the status URL '
        '(its Location header, or the profile''s poll_url_path or job_id_path)');
    end if;
  end if;
  if t.submit_url is null
     and (t.submit_method is not null or t.submit_body is not null or t.submit_headers is not null) then
    perform taskman_private.reject('submit_url',
      'is required with submit_method, submit_headers or submit_body');
  end if;
  if t.submit_method not in ('GET', 'POST', 'PUT', 'PATCH') then
    perform taskman_private.reject('submit_method', 'must be one of GET, POST, PUT, PATCH');
  end if;
  if (is_insert or t.submit_body is distinct from old.submit_body)
     and octet_length(t.submit_body::text) > 65536 then
    perform taskman_private.reject('submit_body', 'must be at most 64 KiB of JSON');
  end if;
  if (is_insert or t.start_at is distinct from old.start_at)
     and t.start_at > now() + interval '366 days' then
    perform taskman_private.reject('start_at', 'must be at most a year ahead');
  end if;
  if t.priority is null or t.priority not between -100 and 100 then
    perform taskman_private.reject('priority', 'must be an integer between -100 and 100');
  end if;
  if t.heartbeat_seconds not between 1 and 604800 then
    perform taskman_private.reject('heartbeat_seconds', 'must be between 1 and 604800 (7 days)');
  end if;
  -- A polled task shows life once a poll: a shorter heartbeat would end it between two.
  if t.heartbeat_seconds < t.poll_interval_seconds
     and (t.poll_url is not null or t.submit_url is not null) then
    perform taskman_private.reject('heartbeat_seconds', format(
      'must be at least poll_interval_seconds (%s): each poll that works is a sign of life',
      t.poll_interval_seconds));
  end if;
end
$$;

-- poll_config gains the submit answer's paths: poll_url_path, job_id_path (JMESPath)
-- and poll_url_template (a URL with {job_id}).
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
      when k in ('status_path', 'result_path', 'progress_path', 'progress_message_path', 'error_path',
                 'poll_url_path', 'job_id_path') then
        if jsonb_typeof(v) <> 'string' then
          perform taskman_private.reject('poll_config',
            format('.%s must be a JMESPath expression (a string of at most 500 characters)', k));
        end if;
        problem := taskman_private.jmespath_problem(v ->> 0);
        if problem is not null then
          perform taskman_private.reject('poll_config', format('.%s %s', k, problem));
        end if;
      when k = 'poll_url_template' then
        if jsonb_typeof(v) <> 'string' or strpos(v ->> 0, '{job_id}') = 0
           or not taskman_private.is_http_url(replace(v ->> 0, '{job_id}', 'x')) then
          perform taskman_private.reject('poll_config',
            '.poll_url_template must be an http:// or https:// URL containing {job_id}');
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
          'progress_path, progress_message_path, error_path, poll_url_path, job_id_path, '
          'poll_url_template',
          to_jsonb(k)));
    end case;
  end loop;
end
$$;

create or replace function taskman_private.response_profiles_check()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  field text;
  problem text;
begin
  foreach field in array array['status_path', 'result_path', 'progress_path',
                               'progress_message_path', 'error_path', 'poll_url_path',
                               'job_id_path'] loop
    problem := taskman_private.jmespath_problem(to_jsonb(new) ->> field);
    if problem is not null then
      perform taskman_private.reject(field, problem);
    end if;
  end loop;
  return new;
end
$$;

-- Whether the task's submit request uses {callback_url} (so its token is kept).
create function taskman_private.submit_needs_callback_url(p_task_id uuid)
returns boolean
language sql stable
set search_path = ''
as $$
  select coalesce(bool_or(t.submit_url is not null
                          and (strpos(coalesce(t.submit_body::text, ''), '{callback_url}') > 0
                               or strpos(coalesce(p.submit_headers::text, ''), '{callback_url}') > 0)),
                  false)
  from taskman.tasks t
  left join taskman_private.task_private p on p.task_id = t.task_id
  where t.task_id = p_task_id
$$;

-- As before; for a task whose submit uses {callback_url}, the plain token is kept
-- service-side too (the worker puts it in the URL it hands the remote). Once that
-- submit was sent, the token stays (a retry polls or waits for the same job, whose
-- remote holds that URL).
create or replace function taskman_private.issue_callback_token(task_id uuid)
returns text
language plpgsql volatile
set search_path = ''
as $$
declare
  token text := replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '');
  kept text := case when taskman_private.submit_needs_callback_url(issue_callback_token.task_id)
                    then token end;
  handed text;
begin
  select p.submit_callback_token into handed
  from taskman_private.task_private p
  join taskman.tasks t on t.task_id = p.task_id
  where p.task_id = issue_callback_token.task_id and t.submitted_at is not null;
  if handed is not null then
    return handed;
  end if;
  insert into taskman_private.task_private (task_id, callback_token_hash, submit_callback_token)
  values (issue_callback_token.task_id, sha256(convert_to(token, 'UTF8')), kept)
  on conflict on constraint task_private_pkey do update
  set callback_token_hash = excluded.callback_token_hash,
      submit_callback_token = excluded.submit_callback_token, updated_at = now();
  return token;
end
$$;

-- BEFORE INSERT: as before, with the new fields: submit_method defaults to POST with
-- a submit_url, priority to 0; the first submit or poll waits for start_at, and the
-- deadline counts from it; the three header sets leave the row.
create or replace function taskman_private.tasks_prepare_insert()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  starts timestamptz;
begin
  if new.task_id is not null and not taskman_private.caller_is_service() then
    perform taskman_private.reject('task_id', 'is assigned by Taskman: leave it out');
  end if;
  if new.status is not null and new.status <> 'pending' then
    perform taskman_private.reject('status', 'must be pending (or omitted) when a task is created');
  end if;
  if num_nonnulls(new.result, new.error_code, new.error_message, new.progress, new.progress_message,
                  new.attempt_count, new.error_count, new.deadline_at, new.next_poll_at,
                  new.last_polled_at, new.created_at, new.updated_at, new.started_at,
                  new.completed_at, new.submitted_at) > 0 then
    perform taskman_private.reject('task',
      'fields result, error_code, error_message, progress, progress_message, counters, timestamps '
      'and leases are managed by Taskman and cannot be set when a task is created');
  end if;

  new.task_id := coalesce(new.task_id, gen_random_uuid());
  new.status := 'pending';
  new.task_type := coalesce(new.task_type, 'generic');
  new.poll_method := upper(coalesce(new.poll_method, 'GET'));
  new.submit_method := upper(coalesce(new.submit_method,
                                      case when new.submit_url is not null then 'POST' end));
  new.poll_config := coalesce(new.poll_config, '{}');
  new.poll_interval_seconds := coalesce(new.poll_interval_seconds, 30);
  new.max_attempts := coalesce(new.max_attempts, 10);
  new.timeout_minutes := coalesce(new.timeout_minutes, 120);
  new.metadata := coalesce(new.metadata, '{}');
  new.priority := coalesce(new.priority, 0);
  new.attempt_count := 0;
  new.error_count := 0;

  perform taskman_private.validate_task(new, null::taskman.tasks, true);
  perform taskman_private.validate_submit(new, null::taskman.tasks, true);

  starts := greatest(now(), coalesce(new.start_at, now()));
  new.created_at := now();
  new.updated_at := now();
  new.deadline_at := starts + make_interval(mins => new.timeout_minutes);
  -- A task with neither poll_url nor submit_url waits for a callback; the deadline
  -- still applies.
  new.next_poll_at := case when new.poll_url is not null or new.submit_url is not null
                           then starts end;

  if new.poll_headers is not null then
    perform taskman_private.validate_poll_headers(new.poll_headers);
  end if;
  if new.submit_headers is not null then
    perform taskman_private.validate_headers('submit_headers', new.submit_headers,
                                             array['idempotency-key']);
  end if;
  if new.callback_headers is not null then
    perform taskman_private.validate_headers('callback_headers', new.callback_headers,
                                             array['content-type', 'user-agent', 'x-taskman-*']);
  end if;
  if num_nonnulls(new.poll_headers, new.submit_headers, new.callback_headers) > 0 then
    -- Of two rows with one task_id in a statement, only the first can be inserted.
    insert into taskman_private.poll_headers_in_flight
      (task_id, poll_headers, submit_headers, callback_headers)
    values (new.task_id, new.poll_headers, new.submit_headers, new.callback_headers)
    on conflict (xact_id, task_id) do nothing;
    new.poll_headers := null;
    new.submit_headers := null;
    new.callback_headers := null;
  end if;
  return new;
end
$$;

-- AFTER INSERT, for each row really inserted: its header sets go to task_private, its
-- schedule row is made (with its priority), a submit that uses {callback_url} gets
-- its token, then the `created` event and the NOTIFY.
create or replace function taskman_private.tasks_after_insert()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  f taskman_private.poll_headers_in_flight;
begin
  delete from taskman_private.poll_headers_in_flight x
  where x.xact_id = pg_current_xact_id() and x.task_id = new.task_id
  returning x.* into f;
  if f.task_id is not null then
    insert into taskman_private.task_private (task_id, poll_headers, submit_headers, callback_headers)
    values (new.task_id, f.poll_headers, f.submit_headers, f.callback_headers)
    on conflict (task_id) do update
    set poll_headers = excluded.poll_headers, submit_headers = excluded.submit_headers,
        callback_headers = excluded.callback_headers, updated_at = now();
  end if;
  insert into taskman_private.task_schedule (task_id, next_poll_at, priority)
  values (new.task_id, new.next_poll_at, new.priority);
  if new.submit_url is not null and taskman_private.submit_needs_callback_url(new.task_id) then
    perform taskman_private.issue_callback_token(new.task_id);
  end if;

  insert into taskman.task_events (task_id, user_id, event_type, to_status, detail)
  values (new.task_id, new.user_id, 'created', new.status,
          jsonb_strip_nulls(jsonb_build_object(
            'task_type', new.task_type, 'polled', new.poll_url is not null,
            'submitted', case when new.submit_url is not null then false end)));
  perform taskman_private.notify_task(new);
  return null;
end
$$;

-- BEFORE UPDATE, after tasks_prepare_update (triggers fire in name order): the new
-- fields' header sets leave the row, their values are checked, a new priority (the
-- service's to change) moves to the schedule, and a retried task that was never
-- submitted is due again (for its submit) at its start time.
create function taskman_private.tasks_prepare_update_submit()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  if new.submit_headers is not null then
    perform taskman_private.validate_headers('submit_headers', new.submit_headers,
                                             array['idempotency-key']);
    insert into taskman_private.task_private (task_id, submit_headers)
    values (new.task_id, new.submit_headers)
    on conflict (task_id) do update set submit_headers = excluded.submit_headers, updated_at = now();
    new.submit_headers := null;
  end if;
  if new.callback_headers is not null then
    perform taskman_private.validate_headers('callback_headers', new.callback_headers,
                                             array['content-type', 'user-agent', 'x-taskman-*']);
    insert into taskman_private.task_private (task_id, callback_headers)
    values (new.task_id, new.callback_headers)
    on conflict (task_id) do update set callback_headers = excluded.callback_headers, updated_at = now();
    new.callback_headers := null;
  end if;
  new.submit_method := upper(new.submit_method);
  if (new.submit_url, new.submit_method, new.submit_body, new.start_at, new.priority,
      new.heartbeat_seconds)
     is distinct from
     (old.submit_url, old.submit_method, old.submit_body, old.start_at, old.priority,
      old.heartbeat_seconds) then
    perform taskman_private.validate_submit(new, old, false);
  end if;
  if new.priority is distinct from old.priority then
    update taskman_private.task_schedule s set priority = new.priority
    where s.task_id = new.task_id;
  end if;
  if new.status = 'pending' and old.status is distinct from 'pending'
     and new.submit_url is not null and new.submitted_at is null then
    new.next_poll_at := greatest(now(), coalesce(new.start_at, now()));
  end if;
  return new;
end
$$;

create trigger tasks_prepare_update_submit before update on taskman.tasks
  for each row execute function taskman_private.tasks_prepare_update_submit();

-- The task as its owner sees it: without the write-only columns, with the live poll
-- figures.
create or replace function taskman.task_json(t taskman.tasks)
returns jsonb
language sql stable security invoker
set search_path = ''
as $$
  select (to_jsonb(t) - '{poll_headers,submit_headers,callback_headers}'::text[])
         || coalesce(taskman_private.poll_state(t.task_id), '{}')
$$;

-- create_task gains submit_url, submit_method, submit_headers, submit_body,
-- callback_headers, start_at, priority and heartbeat_seconds (after the others).
drop function taskman.create_task(text, text, text, text, jsonb, jsonb, jsonb, integer, integer,
                                  integer, text, text, jsonb);
drop function taskman_private.create_task(text, text, text, text, jsonb, jsonb, jsonb, integer,
                                          integer, integer, text, text, jsonb);

create function taskman_private.create_task(
  poll_url text default null,
  poll_method text default null,
  task_type text default null,
  external_id text default null,
  poll_headers jsonb default null,
  poll_body jsonb default null,
  poll_config jsonb default null,
  poll_interval_seconds integer default null,
  max_attempts integer default null,
  timeout_minutes integer default null,
  callback_url text default null,
  idempotency_key text default null,
  metadata jsonb default null,
  submit_url text default null,
  submit_method text default null,
  submit_headers jsonb default null,
  submit_body jsonb default null,
  callback_headers jsonb default null,
  start_at timestamptz default null,
  priority integer default null,
  heartbeat_seconds integer default null
)
returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  owner uuid := auth.uid();
  t taskman.tasks;
begin
  if owner is null and not taskman_private.caller_is_service() then
    raise exception using errcode = '42501', message = 'sign in to create tasks';
  end if;
  if create_task.idempotency_key is not null then
    select * into t from taskman.tasks x
    where coalesce(x.user_id, '00000000-0000-0000-0000-000000000000'::uuid)
            = coalesce(owner, '00000000-0000-0000-0000-000000000000'::uuid)
      and x.idempotency_key = create_task.idempotency_key;
    if found then
      return taskman.task_json(t) || '{"idempotent_replay": true}';
    end if;
  end if;

  begin
    insert into taskman.tasks (user_id, poll_url, poll_method, task_type, external_id, poll_headers,
                              poll_body, poll_config, poll_interval_seconds, max_attempts,
                              timeout_minutes, callback_url, idempotency_key, metadata,
                              submit_url, submit_method, submit_headers, submit_body,
                              callback_headers, start_at, priority, heartbeat_seconds)
    values (owner, create_task.poll_url, create_task.poll_method, create_task.task_type,
            create_task.external_id, create_task.poll_headers, create_task.poll_body,
            create_task.poll_config, create_task.poll_interval_seconds, create_task.max_attempts,
            create_task.timeout_minutes, create_task.callback_url, create_task.idempotency_key,
            create_task.metadata, create_task.submit_url, create_task.submit_method,
            create_task.submit_headers, create_task.submit_body, create_task.callback_headers,
            create_task.start_at, create_task.priority, create_task.heartbeat_seconds)
    returning * into t;
  exception when unique_violation then
    -- A concurrent call with the same idempotency key won the race.
    select * into strict t from taskman.tasks x
    where coalesce(x.user_id, '00000000-0000-0000-0000-000000000000'::uuid)
            = coalesce(owner, '00000000-0000-0000-0000-000000000000'::uuid)
      and x.idempotency_key = create_task.idempotency_key;
    return taskman.task_json(t) || '{"idempotent_replay": true}';
  end;

  return taskman.task_json(t)
    || jsonb_build_object('callback_token', taskman_private.issue_callback_token(t.task_id));
end
$$;

create function taskman.create_task(
  poll_url text default null,
  poll_method text default null,
  task_type text default null,
  external_id text default null,
  poll_headers jsonb default null,
  poll_body jsonb default null,
  poll_config jsonb default null,
  poll_interval_seconds integer default null,
  max_attempts integer default null,
  timeout_minutes integer default null,
  callback_url text default null,
  idempotency_key text default null,
  metadata jsonb default null,
  submit_url text default null,
  submit_method text default null,
  submit_headers jsonb default null,
  submit_body jsonb default null,
  callback_headers jsonb default null,
  start_at timestamptz default null,
  priority integer default null,
  heartbeat_seconds integer default null
)
returns jsonb
language sql volatile security invoker
set search_path = ''
as $$
  select taskman_private.create_task(poll_url, poll_method, task_type, external_id, poll_headers,
                                     poll_body, poll_config, poll_interval_seconds, max_attempts,
                                     timeout_minutes, callback_url, idempotency_key, metadata,
                                     submit_url, submit_method, submit_headers, submit_body,
                                     callback_headers, start_at, priority, heartbeat_seconds)
$$;

comment on function taskman.create_task is
  'Register a task; returns it with its callback_token (shown once). See README.';

-- As before, and any report by the token holder or the service is a sign of life for
-- the heartbeat, even one that changes nothing (it writes the schedule only).
create or replace function taskman_private.update_task(
  task_id uuid,
  status text default null,
  result jsonb default null,
  error_message text default null,
  progress integer default null,
  progress_message text default null,
  callback_token text default null
)
returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  t taskman.tasks;
  token_hash bytea;
  by_service boolean := taskman_private.caller_is_service();
begin
  select * into t from taskman.tasks x where x.task_id = update_task.task_id for update;
  if not by_service then
    select p.callback_token_hash into token_hash
    from taskman_private.task_private p where p.task_id = update_task.task_id;
    if t.task_id is null or update_task.callback_token is null or token_hash is null
       or token_hash <> sha256(convert_to(update_task.callback_token, 'UTF8')) then
      raise exception using errcode = 'PT403',
        message = 'a valid callback_token is required to update this task';
    end if;
  elsif t.task_id is null then
    raise exception using errcode = 'PT404', message = format('task %s not found', update_task.task_id);
  end if;

  if update_task.status is not null
     and update_task.status not in ('in_progress', 'completed', 'failed', 'cancelled') then
    perform taskman_private.reject('status', 'must be one of in_progress, completed, failed, cancelled');
  end if;
  if update_task.status = 'cancelled' and not by_service then
    perform taskman_private.reject('status', 'cancelled can only be set by the owner through cancel_task');
  end if;

  if t.status in ('completed', 'failed', 'cancelled') then
    if update_task.status is distinct from t.status then
      raise exception using errcode = 'PT409',
        message = format('task %s is already %s and cannot be updated', t.task_id, t.status),
        hint = 'Terminal tasks change only through retry_task.';
    end if;
    return case when by_service then taskman.task_json(t)
                else jsonb_build_object('task_id', t.task_id, 'status', t.status) end;
  end if;

  if t.heartbeat_seconds is not null then
    update taskman_private.task_schedule s set alive_at = now() where s.task_id = t.task_id;
  end if;

  if (coalesce(update_task.status, t.status), coalesce(update_task.result, t.result),
         coalesce(update_task.progress, t.progress),
         coalesce(update_task.progress_message, t.progress_message))
        is distinct from (t.status, t.result, t.progress, t.progress_message) then
    update taskman.tasks x set
      status = coalesce(update_task.status, x.status),
      result = coalesce(update_task.result, x.result),
      error_code = case when update_task.status = 'failed' then 'remote_failed' else x.error_code end,
      error_message = case when update_task.status = 'failed' and by_service
                           then update_task.error_message else x.error_message end,
      progress = coalesce(update_task.progress, x.progress),
      progress_message = coalesce(update_task.progress_message, x.progress_message)
    where x.task_id = update_task.task_id
    returning * into t;

    insert into taskman.task_events (task_id, user_id, event_type, to_status, detail)
    values (t.task_id, t.user_id, 'callback_received', t.status,
            jsonb_build_object('via', case when by_service then 'service' else 'callback_token' end));
  end if;

  if not by_service and update_task.error_message is not null then
    insert into taskman_private.task_private as p (task_id, last_error)
    values (t.task_id, left(update_task.error_message, 4000))
    on conflict on constraint task_private_pkey
    do update set last_error = excluded.last_error, updated_at = now()
    where p.last_error is distinct from excluded.last_error;
  end if;

  return case when by_service then taskman.task_json(t)
              else jsonb_build_object('task_id', t.task_id, 'status', t.status) end;
end
$$;

-- Claims: highest priority first, then in due order. The walk goes down
-- task_schedule_priority_due_idx one priority level at a time (each level found
-- with one probe, each level's due tasks read in due order), so it touches only
-- due tasks and stops when the batch is full. A task still to be submitted comes
-- with its submit request (and, when it uses {callback_url}, its callback token).
drop function taskman.claim_due_tasks(text, integer, integer);

create function taskman.claim_due_tasks(worker_id text, batch_size integer default 100,
                                       lease_seconds integer default 60)
returns table (
  task_id uuid, poll_url text, poll_method text, poll_headers jsonb, poll_body jsonb,
  profile jsonb, task_type text, status text, attempt_count integer, error_count integer,
  max_attempts integer, poll_interval_seconds integer, deadline_at timestamptz,
  lease_expires_at timestamptz, submit_url text, submit_method text, submit_headers jsonb,
  submit_body jsonb, callback_token text)
language plpgsql volatile security definer
set search_path = ''
as $$
begin
  perform taskman_private.check_claim(worker_id, batch_size, lease_seconds);

  return query
  with recursive levels as (
    (select s.priority from taskman_private.task_schedule s
     where s.next_poll_at is not null
     order by s.priority desc limit 1)
    union all
    select (select s.priority from taskman_private.task_schedule s
            where s.next_poll_at is not null and s.priority < l.priority
            order by s.priority desc limit 1)
    from levels l
    where l.priority is not null
  ),
  due as (
    -- SKIP LOCKED lets concurrent workers take disjoint batches without waiting on
    -- each other. A finished task has no next_poll_at, so only live tasks are found.
    select d.task_id
    from levels l
    cross join lateral (
      select s.task_id
      from taskman_private.task_schedule s
      where s.priority = l.priority and s.next_poll_at <= now()
      order by s.next_poll_at
      limit claim_due_tasks.batch_size
      for update skip locked
    ) d
    where l.priority is not null
    limit claim_due_tasks.batch_size
  ),
  claimed as (
    update taskman_private.task_schedule s
    set lease_owner = claim_due_tasks.worker_id,
        lease_expires_at = now() + make_interval(secs => claim_due_tasks.lease_seconds),
        next_poll_at = now() + make_interval(secs => claim_due_tasks.lease_seconds)
    from due
    where s.task_id = due.task_id
    returning s.task_id, s.attempt_count, s.error_count, s.lease_expires_at
  )
  select c.task_id, t.poll_url, t.poll_method, coalesce(p.poll_headers, '{}'::jsonb), t.poll_body,
         taskman_private.effective_profile(t.task_type, t.poll_config), t.task_type, t.status,
         c.attempt_count, c.error_count, t.max_attempts, t.poll_interval_seconds, t.deadline_at,
         c.lease_expires_at,
         case when t.submitted_at is null then t.submit_url end,
         t.submit_method,
         case when t.submitted_at is null and t.submit_url is not null
              then coalesce(p.submit_headers, '{}'::jsonb) end,
         case when t.submitted_at is null then t.submit_body end,
         case when t.submitted_at is null then p.submit_callback_token end
  from claimed c
  join taskman.tasks t on t.task_id = c.task_id
  left join taskman_private.task_private p on p.task_id = c.task_id
  order by c.task_id;
end
$$;

-- Writes a batch of poll and submit outcomes. As before, plus, for a submit
-- (`submitted: true`): poll_url (the job handle read from the answer), external_id
-- (the job id, when read); a submit that worked (ok) records submitted_at once, moves
-- the task to in_progress (or ends it, if the answer already said so) and its
-- handle becomes poll_url (none: the task waits for a callback). Every submit
-- attempt records a `submitted` event instead of `polled`. A poll or submit that
-- worked is a sign of life for the heartbeat (the schedule's alive_at).
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
                or r.error_code not in ('remote_failed', 'poll_error', 'invalid_response',
                                        'submit_failed')) then
    perform taskman_private.reject('results',
      'each outcome needs task_id and worker_id; status must be in_progress, completed or failed; '
      'error_code must be remote_failed, poll_error, invalid_response or submit_failed');
  end if;

  -- Public rows about to change are locked first, in task_id order, as every other
  -- writer of a task does (the row, then its schedule).
  perform 1
  from jsonb_to_recordset(results) as r(task_id uuid, worker_id text, ok boolean, status text,
                                        result jsonb, progress integer, progress_message text,
                                        submitted boolean)
  join taskman_private.task_schedule s on s.task_id = r.task_id
  join taskman.tasks t on t.task_id = r.task_id
  where s.lease_owner = r.worker_id
    and t.status in ('pending', 'in_progress')
    and (r.status is distinct from null and r.status <> t.status
         or r.result is not null and r.result is distinct from t.result
         or r.progress is not null and least(greatest(r.progress, 0), 100) is distinct from t.progress
         or r.progress_message is not null
            and left(r.progress_message, 1000) is distinct from t.progress_message
         or not coalesce(r.ok, false) and s.error_count + 1 >= t.max_attempts
         or coalesce(r.submitted, false) and coalesce(r.ok, false)
         or t.deadline_at <= now())
  order by t.task_id
  for update of t;

  return query
  with outcome as (
    select r.task_id, r.worker_id, coalesce(r.ok, false) as ok, r.status, r.error_code,
           greatest(coalesce(r.delay_seconds, 0), 0) as delay_seconds, r.result,
           least(greatest(r.progress, 0), 100) as progress,
           left(r.progress_message, 1000) as progress_message,
           left(r.error_message, 2000) as error_message, r.http_status, r.latency_ms,
           left(r.raw_response, 65536) as raw_response, left(r.raw_error, 4000) as raw_error,
           left(r.reason, 60) as reason, coalesce(r.submitted, false) as is_submit,
           r.poll_url as handle, left(r.external_id, 255) as job_id
    from jsonb_to_recordset(results) as r(
      task_id uuid, worker_id text, ok boolean, status text, error_code text,
      delay_seconds double precision, result jsonb, progress integer, progress_message text,
      error_message text, http_status integer, latency_ms double precision,
      raw_response text, raw_error text, reason text, submitted boolean, poll_url text,
      external_id text)
  ),
  read as (
    -- FOR UPDATE of the schedule re-reads a row changed since the snapshot (a sweep,
    -- a cancel clears the lease), so only the lease holder's outcome counts.
    select o.*, t.user_id, t.poll_url as old_poll_url, t.max_attempts, t.deadline_at,
           t.status as old_status, t.result as old_result, t.progress as old_progress,
           t.progress_message as old_progress_message, s.error_count, s.attempt_count,
           o.is_submit and o.ok and t.submitted_at is null as accepted,
           o.handle is not null and not taskman_private.is_http_url(o.handle) as bad_handle
    from outcome o
    join taskman_private.task_schedule s on s.task_id = o.task_id
    join taskman.tasks t on t.task_id = o.task_id
    where s.lease_owner = o.worker_id
      and t.status in ('pending', 'in_progress')
    for update of s
  ),
  decided as (
    select r.*,
           case when r.ok then 0 else r.error_count + 1 end as new_error_count,
           r.attempt_count + 1 as new_attempt_count,
           case
             when r.accepted and r.bad_handle then 'failed'
             when r.status in ('completed', 'failed') then r.status
             when not r.ok and r.error_count + 1 >= r.max_attempts then 'failed'
             when r.deadline_at <= now() then 'failed'
             when r.status = 'in_progress' or r.accepted then 'in_progress'
             else r.old_status
           end as new_status,
           case
             when r.accepted and r.bad_handle then 'invalid_response'
             when r.status = 'failed' then coalesce(r.error_code, 'remote_failed')
             when r.status = 'completed' then null
             when not r.ok and r.error_count + 1 >= r.max_attempts
               then case when r.error_code = 'invalid_response' then 'invalid_response'
                         else 'max_attempts' end
             when r.deadline_at <= now() then 'timeout'
           end as new_error_code,
           (r.result is not null and r.result is distinct from r.old_result
            or r.progress is not null and r.progress is distinct from r.old_progress
            or r.progress_message is not null
               and r.progress_message is distinct from r.old_progress_message
            or r.accepted) as news,
           case when r.accepted and not r.bad_handle then coalesce(r.handle, r.old_poll_url)
                else r.old_poll_url end as new_poll_url
    from read r
  ),
  marked as (
    -- next_poll_at is decided here, once, for the schedule, the row and the events
    -- (joining the schedule's update back costs a nested loop per batch).
    select d.*, (d.news or d.new_status <> d.old_status) as visible, f.finished,
           case when f.finished then null
                -- A submitted task without a handle waits for its callback.
                when d.accepted and d.new_poll_url is null then null
                else now() + make_interval(secs => d.delay_seconds) end as next_poll_at
    from decided d
    cross join lateral (select d.new_status in ('completed', 'failed') as finished) f
  ),
  scheduled as (
    update taskman_private.task_schedule s
    set attempt_count = m.new_attempt_count,
        error_count = m.new_error_count,
        last_polled_at = now(),
        last_http_status = m.http_status,
        last_latency_ms = m.latency_ms,
        alive_at = case when m.ok then now() else s.alive_at end,
        lease_owner = null,
        lease_expires_at = null,
        next_poll_at = m.next_poll_at
    from marked m
    where s.task_id = m.task_id
  ),
  written as (
    update taskman.tasks t
    set status = m.new_status,
        error_code = coalesce(m.new_error_code, t.error_code),
        error_message = case when m.status = 'failed' then m.error_message else t.error_message end,
        result = coalesce(m.result, t.result),
        progress = coalesce(m.progress, t.progress),
        progress_message = coalesce(m.progress_message, t.progress_message),
        poll_url = m.new_poll_url,
        external_id = case when m.accepted then coalesce(m.job_id, t.external_id)
                           else t.external_id end,
        submitted_at = case when m.accepted then now() else t.submitted_at end,
        attempt_count = m.new_attempt_count,
        error_count = m.new_error_count,
        last_polled_at = now(),
        next_poll_at = m.next_poll_at
    from marked m
    where t.task_id = m.task_id and m.visible
    returning t.task_id
  ),
  events as (
    -- `news: progress` (with the status, in to_status) marks a poll whose news was
    -- progress alone: the edge's /events reads it back without LISTEN, as it reads
    -- status changes. A status change has its own event (tasks_after_status_change).
    insert into taskman.task_events (task_id, user_id, event_type, to_status, detail)
    select m.task_id, m.user_id, e.event_type,
           case when e.event_type = 'polled' and m.news and m.new_status = m.old_status
                then m.new_status end,
           jsonb_strip_nulls(jsonb_build_object(
             'news', case when e.event_type = 'polled' and m.news
                               and m.new_status = m.old_status then 'progress' end,
             'progress', case when e.event_type = 'polled' and m.news then m.progress end,
             'http_status', m.http_status, 'latency_ms', round(m.latency_ms::numeric, 1),
             'outcome', case when not m.ok then 'error'
                             when m.is_submit and m.bad_handle then 'invalid_handle'
                             when m.is_submit then
                               case when m.status in ('completed', 'failed') then m.status
                                    else 'accepted' end
                             else coalesce(m.status, 'no_change') end,
             'reason', m.reason,
             'attempt', m.new_attempt_count,
             'error_count', m.new_error_count,
             'polled', case when e.event_type = 'submitted' and m.ok
                            then m.new_poll_url is not null end,
             'next_poll_at', case when e.event_type = 'retry_scheduled' then m.next_poll_at end))
    from marked m
    cross join lateral (
      select case when m.is_submit then 'submitted' else 'polled' end as event_type
      union all
      select 'retry_scheduled' where not m.ok and not m.finished
    ) e
    where m.visible or not m.ok
  ),
  raw as (
    -- The raw answer of a poll that said something (news, an error, the end), kept
    -- service-only; a poll with no news leaves the last one in place.
    insert into taskman_private.task_private as p
      (task_id, last_http_status, last_response, last_error, updated_at)
    select m.task_id, m.http_status, m.raw_response, m.raw_error, now()
    from marked m
    where m.visible or not m.ok
    on conflict on constraint task_private_pkey do update
    set last_http_status = excluded.last_http_status,
        last_response = excluded.last_response,
        last_error = excluded.last_error,
        updated_at = excluded.updated_at
  )
  select m.task_id, m.new_status from marked m;
end
$$;

-- The sweep: every live task past its deadline fails with timeout, and every started
-- task with a heartbeat whose last sign of life (start, a visible change, a poll that
-- worked, a callback) is older than heartbeat_seconds fails with heartbeat_timeout.
create or replace function taskman.expire_overdue_tasks()
returns integer
language sql volatile security definer
set search_path = ''
as $$
  -- The schedule row is locked with the task's (both skipped if either is taken): the
  -- status change rewrites it, and a worker may hold it while it waits for a task row
  -- of its own batch, so waiting for it here could close a cycle.
  with overdue as (
    select t.task_id from taskman.tasks t
    join taskman_private.task_schedule s on s.task_id = t.task_id
    where t.status in ('pending', 'in_progress') and t.deadline_at <= now()
    for update of t, s skip locked
  ),
  expired as (
    update taskman.tasks t set status = 'failed', error_code = 'timeout', error_message = null
    from overdue where t.task_id = overdue.task_id
    returning 1
  ),
  silent as (
    select t.task_id from taskman.tasks t
    join taskman_private.task_schedule s on s.task_id = t.task_id
    where t.heartbeat_seconds is not null and t.status = 'in_progress'
      and t.deadline_at > now()
      and greatest(t.started_at, t.updated_at, s.alive_at)
          + make_interval(secs => t.heartbeat_seconds) <= now()
    for update of t, s skip locked
  ),
  stopped as (
    update taskman.tasks t
    set status = 'failed', error_code = 'heartbeat_timeout', error_message = null
    from silent where t.task_id = silent.task_id
    returning 1
  )
  select ((select count(*) from expired) + (select count(*) from stopped))::integer
$$;

revoke all on function taskman_private.validate_headers, taskman_private.validate_submit,
  taskman_private.submit_needs_callback_url, taskman_private.tasks_prepare_update_submit,
  taskman_private.create_task, taskman_private.issue_callback_token,
  taskman_private.neutral_error from public, anon, authenticated;
revoke all on function taskman.create_task from public;
grant execute on function taskman.create_task, taskman_private.create_task
  to authenticated, service_role;
revoke all on function taskman.claim_due_tasks, taskman.record_poll_results,
  taskman.expire_overdue_tasks from public, anon, authenticated;
grant execute on function taskman.claim_due_tasks, taskman.record_poll_results,
  taskman.expire_overdue_tasks to service_role;
