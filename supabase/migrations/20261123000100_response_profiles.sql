-- Response profiles: how a poll answer is read, as data rather than code.
-- A profile names JMESPath expressions and value lists; a task picks one by
-- task_type or poll_config.profile and may override any field in poll_config.
-- Operators add their own profiles with a plain INSERT as service_role.
--
-- Taskman's client-facing objects live in schema taskman, so that it installs into
-- any Supabase project beside that project's own tables. (Databases that ran these
-- migrations when they still created the objects in public are moved by
-- 20261201000100_taskman_schema.sql.)

create schema if not exists taskman;
comment on schema taskman is
  'Taskman: tasks, their history, response profiles and the RPC functions clients call.';
grant usage on schema taskman to anon, authenticated, service_role;

create table taskman.response_profiles (
  name text primary key
    constraint response_profiles_name_format check (name ~ '^[a-z0-9][a-z0-9_.-]{0,63}$'),
  description text not null default '',
  -- 'body': the status is read from the JSON body with status_path.
  -- 'http': the async request-reply pattern (202 while running, 200 or 303 when done).
  status_source text not null default 'body'
    constraint response_profiles_status_source check (status_source in ('body', 'http')),
  status_path text,
  completed_values text[] not null default '{}',
  failed_values text[] not null default '{}',
  running_values text[] not null default '{}',
  pending_values text[] not null default '{}',
  result_path text,
  progress_path text,
  progress_message_path text,
  error_path text,
  builtin boolean not null default false,
  constraint response_profiles_status_path_required
    check (status_source = 'http' or status_path is not null)
);

comment on table taskman.response_profiles is
  'How poll answers are read: JMESPath paths and status value lists. Values match case-insensitively.';

insert into taskman.response_profiles
  (name, description, status_source, status_path, completed_values, failed_values,
   running_values, pending_values, result_path, progress_path, progress_message_path,
   error_path, builtin)
values
  ('generic', 'A JSON body with a status or state field.', 'body',
   'status || state',
   '{done,completed,complete,succeeded,success,ok,finished}',
   '{failed,error,failure,errored}',
   '{running,in_progress,processing,started,active}',
   '{pending,queued,waiting,created,submitted}',
   'result || data || output', 'progress', 'progress_message || message',
   'error.message || error || error_message', true),
  ('celery', 'Celery AsyncResult states as exposed by a status endpoint.', 'body',
   'status || state',
   '{SUCCESS}', '{FAILURE,REVOKED}', '{STARTED,RETRY,PROGRESS}', '{PENDING,RECEIVED}',
   'result', 'info.progress || meta.progress || progress', 'info.message || meta.message',
   'traceback || result', true),
  ('standard', 'The standard contract: status pending|running|ok|failed|timeout, data and error.', 'body',
   'status',
   '{ok}', '{failed,timeout}', '{running}', '{pending}',
   'data', 'progress', 'message',
   'error.message', true),
  ('http', 'Async request-reply: 202 with Retry-After while running, 200 or 303 Location when done.', 'http',
   null, '{}', '{}', '{}', '{}',
   '@', 'progress', 'message', 'error.message || error', true);
