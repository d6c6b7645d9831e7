-- Response profiles: how a poll answer is read, as data rather than code. A profile
-- names JMESPath expressions and value lists; a task picks one by task_type or
-- poll_config.profile and may override any field in poll_config.

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
  -- A status in cancelled_values ends the task as cancelled, with a neutral
  -- error_message and no failure alert.
  cancelled_values text[] not null default '{}',
  -- The job handle a submit answer gives: poll_url_path (JMESPath to a URL), or
  -- job_id_path with poll_url_template (which must contain {job_id}).
  poll_url_path text,
  job_id_path text,
  poll_url_template text,
  -- Origins besides the submit URL's (and poll_url_template's) to which a status URL a
  -- submit's answer names may take the task's poll_headers.
  poll_header_origins text[],
  constraint response_profiles_status_path_required
    check (status_source = 'http' or status_path is not null),
  constraint response_profiles_poll_url_template_job_id
    check (poll_url_template is null or strpos(poll_url_template, '{job_id}') > 0)
);

comment on table taskman.response_profiles is
  'How poll answers are read: JMESPath paths and status value lists. Values match case-insensitively.';
comment on column taskman.response_profiles.cancelled_values is
  'Status values meaning the remote job was cancelled: the task ends cancelled, without an alert.';
comment on column taskman.response_profiles.poll_header_origins is
  'Origins besides the submit URL''s (and poll_url_template''s) to which a status URL named '
  'by a submit''s answer may take the task''s poll_headers, e.g. {https://status.example.com}.';

alter table taskman.response_profiles enable row level security;
revoke all on taskman.response_profiles from public, anon, authenticated;
grant select on taskman.response_profiles to authenticated;
grant all on taskman.response_profiles to service_role;

create policy "Signed-in users read response profiles" on taskman.response_profiles
  for select to authenticated using (true);

-- A profile's JMESPath paths stay within the same bounds as poll_config's
-- (jmespath_problem), whoever writes the profile.
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
revoke all on function taskman_private.response_profiles_check from public, anon, authenticated;

create trigger response_profiles_check before insert or update on taskman.response_profiles
  for each row execute function taskman_private.response_profiles_check();

create or replace function taskman_private.response_profiles_check_origins()
returns trigger
language plpgsql
set search_path = ''
as $$
declare
  problem text := taskman_private.origins_problem(to_jsonb(new.poll_header_origins));
begin
  if problem is not null then
    perform taskman_private.reject('poll_header_origins', problem);
  end if;
  return new;
end
$$;
revoke all on function taskman_private.response_profiles_check_origins from public, anon, authenticated;

create trigger response_profiles_check_origins before insert or update of poll_header_origins
  on taskman.response_profiles
  for each row when (new.poll_header_origins is not null)
  execute function taskman_private.response_profiles_check_origins();

-- The built-in profiles. Operators add their own with a plain INSERT as service_role.
insert into taskman.response_profiles
  (name, description, status_source, status_path, completed_values, failed_values,
   running_values, pending_values, cancelled_values, result_path, progress_path,
   progress_message_path, error_path, builtin)
values
  ('generic', 'A JSON body with a status or state field.', 'body',
   'status || state',
   '{done,completed,complete,succeeded,success,ok,finished}',
   '{failed,error,failure,errored}',
   '{running,in_progress,processing,started,active}',
   '{pending,queued,waiting,created,submitted}',
   '{cancelled,canceled,revoked,aborted}',
   'result || data || output', 'progress', 'progress_message || message',
   'error.message || error || error_message', true),
  ('celery', 'Celery AsyncResult states as exposed by a status endpoint.', 'body',
   'status || state',
   '{SUCCESS}', '{FAILURE}', '{STARTED,RETRY,PROGRESS}', '{PENDING,RECEIVED}', '{REVOKED}',
   'result', 'info.progress || meta.progress || progress', 'info.message || meta.message',
   'traceback || result', true),
  ('standard', 'The standard contract: status pending|running|ok|failed|timeout, data and error.', 'body',
   'status',
   '{ok}', '{failed,timeout}', '{running}', '{pending}', '{}',
   'data', 'progress', 'message',
   'error.message', true),
  ('http', 'Async request-reply: 202 with Retry-After while running, 200 or 303 Location when done.', 'http',
   null, '{}', '{}', '{}', '{}', '{}',
   '@', 'progress', 'message', 'error.message || error', true);

-- The profile a task is read with: the named profile (poll_config.profile, else
-- the task_type's own profile, else generic) with poll_config's overrides.
create or replace function taskman_private.effective_profile(task_type text, poll_config jsonb)
returns jsonb
language sql stable
set search_path = ''
as $$
  select (to_jsonb(p) - '{description,builtin}'::text[]) || (poll_config - 'profile')
  from taskman.response_profiles p
  where p.name in (poll_config ->> 'profile', task_type, 'generic')
  order by p.name = poll_config ->> 'profile' desc nulls last, p.name = task_type desc
  limit 1
$$;
revoke all on function taskman_private.effective_profile from public, anon, authenticated;

-- Whether the task's status URL may have its poll_headers: same origin as its submit URL
-- (or a task without a submit), or an origin its profile names.
create or replace function taskman_private.poll_headers_may_go(t taskman.tasks)
returns boolean
language sql stable
set search_path = ''
as $$
  select t.submit_url is null or t.poll_url is null or coalesce(
    taskman_private.host_key(t.poll_url) = any (
      array[taskman_private.host_key(t.submit_url),
            taskman_private.host_key(replace(p.profile ->> 'poll_url_template', '{job_id}', 'x'))]
      || array(select taskman_private.host_key(o)
               from jsonb_array_elements_text(
                 case when jsonb_typeof(p.profile -> 'poll_header_origins') = 'array'
                      then p.profile -> 'poll_header_origins' else '[]' end) o)),
    false)
  from (select taskman_private.effective_profile(t.task_type, t.poll_config) as profile) p
$$;
revoke all on function taskman_private.poll_headers_may_go from public, anon, authenticated;

create or replace function taskman_private.tasks_drop_foreign_poll_headers()
returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  if not taskman_private.poll_headers_may_go(new) then
    update taskman_private.task_private p set poll_headers = null, updated_at = now()
    where p.task_id = new.task_id and p.poll_headers is not null;
  end if;
  return null;
end
$$;
revoke all on function taskman_private.tasks_drop_foreign_poll_headers from public, anon, authenticated;

-- A status URL comes from a submit's answer once a task (again after a retry that
-- submits anew): fires on that write only, whoever writes the row.
create trigger tasks_drop_foreign_poll_headers after update of poll_url on taskman.tasks
  for each row when (new.submit_url is not null and new.poll_url is not null
                     and old.poll_url is distinct from new.poll_url)
  execute function taskman_private.tasks_drop_foreign_poll_headers();
