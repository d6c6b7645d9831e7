-- taskman.tasks, the private row beside each task, and what keeps them right: RLS and
-- grants (an owner reads their tasks, creates tasks they own and edits only metadata;
-- status, results and counters change only through the RPC functions), and the
-- triggers that make a plain INSERT or UPDATE from any PostgREST client behave like
-- the RPCs. create_task (40_client_api.sql) inserts with taskman.task_creator on and
-- does that work itself, so the insert triggers skip its rows; the worker writes with
-- taskman.poll_writer on and skips the update triggers the same way.

-- One row per tracked job, the client's view of it. Columns Taskman manages (counters,
-- timestamps) and the input defaults are filled by create_task, or by the row triggers
-- below for a plain INSERT, so that both behave the same, explicit nulls included.
-- The schedule's live figures (next_poll_at, attempt_count, error_count,
-- last_polled_at) are copied here on each visible change; taskman_private.task_schedule
-- holds them between (30_schedule_and_leases.sql).
create table taskman.tasks (
  task_id uuid primary key,
  user_id uuid default auth.uid(),
  status text not null
    constraint tasks_status_check check (taskman_private.is_task_status(status)),
  task_type text not null,
  external_id text,
  poll_url text,
  poll_method text not null,
  -- Write-only: the headers go to taskman_private.task_private.
  poll_headers jsonb
    constraint tasks_poll_headers_write_only check (poll_headers is null),
  poll_body jsonb,
  poll_config jsonb not null,
  poll_interval_seconds integer not null,
  result jsonb,
  error_code text
    constraint tasks_error_code_check check (taskman_private.is_error_code(error_code)),
  error_message text,
  progress integer constraint tasks_progress_range check (progress between 0 and 100),
  progress_message text,
  attempt_count integer not null,
  error_count integer not null,
  max_attempts integer not null,
  timeout_minutes integer not null,
  deadline_at timestamptz not null,
  next_poll_at timestamptz,
  last_polled_at timestamptz,
  callback_url text,
  idempotency_key text,
  metadata jsonb not null,
  created_at timestamptz not null,
  updated_at timestamptz not null,
  started_at timestamptz,
  completed_at timestamptz,
  -- The submit request, sent once with `Idempotency-Key: <task_id>`; its answer's job
  -- handle becomes poll_url. submitted_at records the success.
  submit_url text,
  submit_method text,
  submit_headers jsonb
    constraint tasks_submit_headers_write_only check (submit_headers is null),
  submit_body jsonb,
  submitted_at timestamptz,
  -- Write-only: extra headers sent with the completion callback.
  callback_headers jsonb
    constraint tasks_callback_headers_write_only check (callback_headers is null),
  -- The first submit or poll waits for start_at (the deadline counts from it).
  start_at timestamptz,
  -- -100..100: among due tasks, higher first.
  priority integer not null default 0,
  -- A started task without a poll result, callback or update for that long fails
  -- with heartbeat_timeout.
  heartbeat_seconds integer
);

comment on table taskman.tasks is
  'One row per tracked job. Create with create_task() or a plain INSERT; read under RLS.';
comment on column taskman.tasks.poll_headers is
  'Write-only. Headers sent when polling (e.g. an API key); stored where only service_role can read.';
comment on column taskman.tasks.submit_headers is
  'Write-only. Headers sent with the submit request; stored where only service_role can read.';
comment on column taskman.tasks.callback_headers is
  'Write-only. Extra headers sent with the completion callback; stored where only service_role can read.';
comment on column taskman.tasks.submitted_at is
  'When the submit request was answered with success; the task is never submitted again after it.';

-- The overdue sweep reads only live tasks, by deadline.
create index tasks_deadline_idx on taskman.tasks (deadline_at)
  where status in ('pending', 'in_progress');

-- Listing newest first with keyset pagination on (created_at, task_id): for
-- owners (RLS adds user_id = auth.uid()) and for the service, which sees all.
create index tasks_user_created_idx on taskman.tasks (user_id, created_at desc, task_id desc);
create index tasks_created_idx on taskman.tasks (created_at desc, task_id desc);

-- Idempotency: one task per (owner, key). Tasks without an owner share one
-- namespace, the service's.
create unique index tasks_idempotency_key_idx on taskman.tasks
  (coalesce(user_id, '00000000-0000-0000-0000-000000000000'::uuid), idempotency_key)
  where idempotency_key is not null;

-- The heartbeat sweep reads only started tasks that have a heartbeat.
create index tasks_heartbeat_idx on taskman.tasks (task_id)
  where heartbeat_seconds is not null and status = 'in_progress';

alter table taskman.tasks enable row level security;
revoke all on taskman.tasks from public, anon, authenticated;
grant select, insert on taskman.tasks to authenticated;
grant all on taskman.tasks to service_role;
grant update (metadata) on taskman.tasks to authenticated;

-- (select auth.uid()) is evaluated once per statement rather than per row.
create policy "Owners read their tasks" on taskman.tasks
  for select to authenticated using (user_id = (select auth.uid()));

-- A plain INSERT only: create_task's insert (taskman.task_creator on) runs as the
-- function's owner, never as the caller. The setting is read once per statement, in a
-- subquery, as auth.uid() is.
create policy "Users create tasks they own" on taskman.tasks
  for insert to authenticated
  with check (user_id = (select auth.uid())
              and (select current_setting('taskman.task_creator', true)) is distinct from 'on');

create policy "Owners edit their tasks' metadata" on taskman.tasks
  for update to authenticated
  using (user_id = (select auth.uid())) with check (user_id = (select auth.uid()));

-- Service-only side of a task: secrets and raw remote payloads. No foreign key: the
-- tasks_delete_rows trigger deletes a task's rows here once per statement
-- (80_retention.sql), cheaper than a cascade row by row.
create table taskman_private.task_private (
  task_id uuid primary key,
  poll_headers jsonb,
  callback_token_hash bytea,
  last_http_status integer,
  last_response text,
  last_error text,
  updated_at timestamptz not null default now(),
  submit_headers jsonb,
  callback_headers jsonb,
  -- The callback token in plain text, only for tasks whose submit uses {callback_url}.
  submit_callback_token text
);

alter table taskman_private.task_private enable row level security;
revoke all on taskman_private.task_private from public, anon, authenticated;
grant select, insert, update, delete on taskman_private.task_private to service_role;

-- Write-only headers on their way to task_private during a plain INSERT. The BEFORE
-- INSERT trigger cannot write them there: it also runs for rows that ON CONFLICT DO
-- NOTHING then skips, which would plant one caller's headers on another's task. It
-- parks them here, keyed by transaction and task; the AFTER INSERT row trigger, which
-- fires only for rows really inserted, moves them to task_private; and when the
-- outermost INSERT statement ends, whatever is left (skipped rows) is deleted. Only
-- Taskman's triggers touch the table, and nothing is left in it at commit.
create unlogged table taskman_private.poll_headers_in_flight (
  xact_id xid8 not null default pg_current_xact_id(),
  task_id uuid not null,
  poll_headers jsonb,
  submit_headers jsonb,
  callback_headers jsonb,
  primary key (xact_id, task_id)
);

alter table taskman_private.poll_headers_in_flight enable row level security;
revoke all on taskman_private.poll_headers_in_flight from public, anon, authenticated;

-- Direct writes (PostgREST's POST, PATCH, DELETE on /tasks): checked once a
-- statement, as the caller. Inside Taskman's own functions current_user is their
-- owner, so token holders reporting through update_task are not affected.
create or replace function taskman_private.tasks_require_user()
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
revoke all on function taskman_private.tasks_require_user from public, anon, authenticated;

create trigger tasks_require_user before insert or update or delete on taskman.tasks
  for each statement execute function taskman_private.tasks_require_user();

-- poll_config: overrides of the task's response profile (15_response_profiles.sql), by
-- field name; the profile it names must exist, JMESPath paths stay within bounds
-- (jmespath_problem), poll_url_template is a URL with {job_id}, poll_header_origins a
-- list of origins (origins_problem).
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
      when k = 'poll_header_origins' then
        problem := taskman_private.origins_problem(v);
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
          'progress_path, progress_message_path, error_path, poll_url_path, job_id_path, '
          'poll_url_template, poll_header_origins',
          to_jsonb(k)));
    end case;
  end loop;
end
$$;
revoke all on function taskman_private.validate_poll_config from public, anon, authenticated;

-- Checks the caller-supplied fields of a task. On update only changed fields are
-- checked, so the worker's frequent writes stay cheap; an empty poll_config (the
-- default) is not walked, and fields that are absent (most on insert) cost one test
-- per group. poll_body, metadata and result must be servable (json_problem); each
-- document's text is made once, for its size and its shape.
create or replace function taskman_private.validate_task(t taskman.tasks, old taskman.tasks, is_insert boolean)
returns void
language plpgsql stable
set search_path = ''
as $$
declare
  doc_text text;
  problem text;
begin
  if t.poll_url is not null and (is_insert or t.poll_url is distinct from old.poll_url)
     and not taskman_private.is_http_url(t.poll_url) then
    perform taskman_private.reject('poll_url', 'must be an http:// or https:// URL of at most 2048 characters, with a valid host name');
  end if;
  if t.callback_url is not null and (is_insert or t.callback_url is distinct from old.callback_url)
     and not taskman_private.is_http_url(t.callback_url) then
    perform taskman_private.reject('callback_url', 'must be an http:// or https:// URL of at most 2048 characters, with a valid host name');
  end if;
  if t.poll_method not in ('GET', 'POST', 'PUT', 'PATCH') then
    perform taskman_private.reject('poll_method', 'must be one of GET, POST, PUT, PATCH');
  end if;
  if t.task_type !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$' then
    perform taskman_private.reject('task_type',
      'must be 1 to 64 letters, digits or _ . : - and start with a letter or digit');
  end if;
  if num_nonnulls(t.external_id, t.idempotency_key) > 0 then
    if length(t.external_id) > 255 then
      perform taskman_private.reject('external_id', 'must be at most 255 characters');
    end if;
    if length(t.idempotency_key) > 255 or t.idempotency_key = '' then
      perform taskman_private.reject('idempotency_key', 'must be 1 to 255 characters');
    end if;
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
  if (is_insert or t.poll_config is distinct from old.poll_config)
     and t.poll_config is distinct from '{}'::jsonb then
    perform taskman_private.validate_poll_config(t.poll_config);
  end if;
  if t.poll_body is not null and (is_insert or t.poll_body is distinct from old.poll_body) then
    doc_text := t.poll_body::text;
    if octet_length(doc_text) > 65536 then
      perform taskman_private.reject('poll_body', 'must be at most 64 KiB of JSON');
    end if;
    problem := taskman_private.json_problem(t.poll_body, doc_text);
    if problem is not null then
      perform taskman_private.reject('poll_body', problem);
    end if;
  end if;
  if is_insert or t.metadata is distinct from old.metadata then
    if jsonb_typeof(t.metadata) <> 'object' then
      perform taskman_private.reject('metadata', 'must be a JSON object');
    end if;
    doc_text := t.metadata::text;
    if octet_length(doc_text) > 65536 then
      perform taskman_private.reject('metadata', 'must be at most 64 KiB of JSON');
    end if;
    problem := taskman_private.json_problem(t.metadata, doc_text);
    if problem is not null then
      perform taskman_private.reject('metadata', problem);
    end if;
  end if;
  if num_nonnulls(t.progress, t.progress_message, t.error_message, t.result) > 0 then
    if t.progress not between 0 and 100 then
      perform taskman_private.reject('progress', 'must be between 0 and 100');
    end if;
    if length(t.progress_message) > 1000 then
      perform taskman_private.reject('progress_message', 'must be at most 1000 characters');
    end if;
    if length(t.error_message) > 2000 then
      perform taskman_private.reject('error_message', 'must be at most 2000 characters');
    end if;
    if t.result is not null and (is_insert or t.result is distinct from old.result) then
      doc_text := t.result::text;
      if octet_length(doc_text) > 1048576 then
        perform taskman_private.reject('result', 'must be at most 1 MiB of JSON');
      end if;
      problem := taskman_private.json_problem(t.result, doc_text);
      if problem is not null then
        perform taskman_private.reject('result', problem);
      end if;
    end if;
  end if;
end
$$;
revoke all on function taskman_private.validate_task from public, anon, authenticated;

-- The rules of submit_url, submit_method, submit_body (servable, as validate_task's
-- documents), start_at, priority and heartbeat_seconds (validate_task checks the
-- others).
create or replace function taskman_private.validate_submit(t taskman.tasks, old taskman.tasks, is_insert boolean)
returns void
language plpgsql stable
set search_path = ''
as $$
declare
  doc_text text;
  problem text;
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
  if t.submit_body is not null and (is_insert or t.submit_body is distinct from old.submit_body) then
    doc_text := t.submit_body::text;
    if octet_length(doc_text) > 65536 then
      perform taskman_private.reject('submit_body', 'must be at most 64 KiB of JSON');
    end if;
    problem := taskman_private.json_problem(t.submit_body, doc_text);
    if problem is not null then
      perform taskman_private.reject('submit_body', problem);
    end if;
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
revoke all on function taskman_private.validate_submit from public, anon, authenticated;

-- A plain INSERT into taskman.tasks, row triggers and statement triggers together:
-- tasks_insert_began counts the INSERT statements in progress (an INSERT can run
-- inside another's trigger), tasks_prepare_insert applies the rules of a new task and
-- parks its write-only headers in poll_headers_in_flight, tasks_after_insert gives the
-- inserted row its rows beside it (add_task_rows), and tasks_insert_ended, at the end
-- of the outermost INSERT, deletes the headers of rows ON CONFLICT DO NOTHING skipped.
-- The depth is read and written in expressions (not queries): the statement triggers
-- run for every INSERT.
create or replace function taskman_private.tasks_insert_depth()
returns integer
language plpgsql stable
set search_path = ''
as $$
begin
  return greatest(coalesce(
    nullif(current_setting('taskman.tasks_insert_depth', true), '')::integer, 0), 0);
end
$$;
revoke all on function taskman_private.tasks_insert_depth from public, anon, authenticated;

create or replace function taskman_private.tasks_insert_began()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  depth text;
begin
  depth := set_config('taskman.tasks_insert_depth',
                      (taskman_private.tasks_insert_depth() + 1)::text, true);
  return null;
end
$$;
revoke all on function taskman_private.tasks_insert_began from public, anon, authenticated;

create trigger tasks_insert_began before insert on taskman.tasks
  for each statement when (current_setting('taskman.task_creator', true) is distinct from 'on')
  execute function taskman_private.tasks_insert_began();

create or replace function taskman_private.tasks_prepare_insert()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  new := taskman_private.new_task(new);
  if num_nonnulls(new.poll_headers, new.submit_headers, new.callback_headers) > 0 then
    -- Of two rows with one task_id in a statement, only the first can be inserted.
    insert into taskman_private.poll_headers_in_flight
      (task_id, poll_headers, submit_headers, callback_headers)
    values (new.task_id, new.poll_headers, new.submit_headers, new.callback_headers)
    on conflict (xact_id, task_id) do nothing;
    perform set_config('taskman.headers_in_flight', 'on', true);
    new.poll_headers := null;
    new.submit_headers := null;
    new.callback_headers := null;
  end if;
  return new;
end
$$;
revoke all on function taskman_private.tasks_prepare_insert from public, anon, authenticated;

create trigger tasks_prepare_insert before insert on taskman.tasks
  for each row when (current_setting('taskman.task_creator', true) is distinct from 'on')
  execute function taskman_private.tasks_prepare_insert();

create or replace function taskman_private.tasks_after_insert()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  f taskman_private.poll_headers_in_flight;
begin
  if current_setting('taskman.headers_in_flight', true) = 'on' then
    delete from taskman_private.poll_headers_in_flight x
    where x.xact_id = pg_current_xact_id() and x.task_id = new.task_id
    returning x.* into f;
  end if;
  perform taskman_private.add_task_rows(new, f.poll_headers, f.submit_headers,
                                        f.callback_headers, null);
  if new.submit_url is not null and taskman_private.submit_needs_callback_url(new.task_id) then
    perform taskman_private.issue_callback_token(new.task_id);
  end if;
  return null;
end
$$;
revoke all on function taskman_private.tasks_after_insert from public, anon, authenticated;

create trigger tasks_after_insert after insert on taskman.tasks
  for each row when (current_setting('taskman.task_creator', true) is distinct from 'on')
  execute function taskman_private.tasks_after_insert();

-- At the end of the outermost INSERT, headers of rows that were not inserted (ON
-- CONFLICT DO NOTHING) leave the in-flight table; without headers in this transaction
-- there is nothing to delete.
create or replace function taskman_private.tasks_insert_ended()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  depth integer := greatest(taskman_private.tasks_insert_depth() - 1, 0);
  ignored text;
begin
  ignored := set_config('taskman.tasks_insert_depth', depth::text, true);
  if depth = 0 and current_setting('taskman.headers_in_flight', true) = 'on' then
    delete from taskman_private.poll_headers_in_flight f where f.xact_id = pg_current_xact_id();
    ignored := set_config('taskman.headers_in_flight', '', true);
  end if;
  return null;
end
$$;
revoke all on function taskman_private.tasks_insert_ended from public, anon, authenticated;

create trigger tasks_insert_ended after insert on taskman.tasks
  for each statement when (current_setting('taskman.task_creator', true) is distinct from 'on')
  execute function taskman_private.tasks_insert_ended();

-- BEFORE UPDATE, for every writer but the worker's batch functions: task_id and
-- created_at stay, write-only headers move to task_private, changed fields are
-- checked, and only legal transitions happen; entering a state sets its timestamps.
-- Terminal states are final except through retry_task(), which marks its transaction
-- with taskman.retry_task = <task_id>. The schedule follows a status change in
-- tasks_after_status_change (20_history.sql).
create or replace function taskman_private.tasks_prepare_update()
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
  -- The worker's own writes touch no caller-supplied column but these: skip the checks.
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
      else  -- completed, failed, cancelled
        new.completed_at := now();
        new.next_poll_at := null;
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
revoke all on function taskman_private.tasks_prepare_update from public, anon, authenticated;

create trigger tasks_prepare_update before update on taskman.tasks
  for each row when (current_setting('taskman.poll_writer', true) is distinct from 'on'
                     or current_user in ('anon', 'authenticated'))
  execute function taskman_private.tasks_prepare_update();

-- BEFORE UPDATE, after tasks_prepare_update (triggers fire in name order): the submit
-- and callback header sets leave the row, the submit fields are checked, a new
-- priority (the service's to change) moves to the schedule, and a retried task that
-- was never submitted is due again (for its submit) at its start time.
create or replace function taskman_private.tasks_prepare_update_submit()
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
revoke all on function taskman_private.tasks_prepare_update_submit from public, anon, authenticated;

create trigger tasks_prepare_update_submit before update on taskman.tasks
  for each row when (current_setting('taskman.poll_writer', true) is distinct from 'on'
                     or current_user in ('anon', 'authenticated'))
  execute function taskman_private.tasks_prepare_update_submit();
