-- Poll headers stay with their origin.
--
-- A submit's answer names the status URL (its Location, or what the profile's
-- poll_url_path reads): a remote could name another origin than the submit URL's, and the
-- task's poll_headers (often its remote API key) went there on every poll. Now, when an
-- accepted submit gives the task a status URL on another origin (scheme, host and port),
-- its poll_headers are dropped (they are never sent anywhere again) unless the task or its
-- profile names that origin:
-- - the origin of the profile's poll_url_template (the task's own choice of URL), or
-- - one listed in `poll_header_origins`, a new profile field (a column of
--   taskman.response_profiles, or a key of poll_config, which overrides it): an array of
--   origins such as "https://status.example.com" or "http://10.0.0.7:8080".
-- A poll's own redirect to another origin already went without them (the worker).
-- Tasks submitted before this migration get the same rule now.

alter table taskman.response_profiles add column poll_header_origins text[];

comment on column taskman.response_profiles.poll_header_origins is
  'Origins besides the submit URL''s (and poll_url_template''s) to which a status URL named '
  'by a submit''s answer may take the task''s poll_headers, e.g. {https://status.example.com}.';

-- Why `origins` (JSON) is not a list of origins; null if it is one.
create function taskman_private.origins_problem(origins jsonb)
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

-- Whether the task's status URL may have its poll_headers: same origin as its submit URL
-- (or a task without a submit), or an origin its profile names.
create function taskman_private.poll_headers_may_go(t taskman.tasks)
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

create function taskman_private.tasks_drop_foreign_poll_headers()
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

revoke all on function taskman_private.origins_problem(jsonb),
  taskman_private.poll_headers_may_go(taskman.tasks),
  taskman_private.tasks_drop_foreign_poll_headers() from public, anon, authenticated;

-- A status URL comes from a submit's answer once a task (again after a retry that
-- submits anew): fires on that write only, whoever writes the row.
create trigger tasks_drop_foreign_poll_headers after update of poll_url on taskman.tasks
  for each row when (new.submit_url is not null and new.poll_url is not null
                     and old.poll_url is distinct from new.poll_url)
  execute function taskman_private.tasks_drop_foreign_poll_headers();

create function taskman_private.response_profiles_check_origins()
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

revoke all on function taskman_private.response_profiles_check_origins()
  from public, anon, authenticated;

create trigger response_profiles_check_origins before insert or update of poll_header_origins
  on taskman.response_profiles
  for each row when (new.poll_header_origins is not null)
  execute function taskman_private.response_profiles_check_origins();

-- As before, with poll_header_origins.
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

-- Tasks already given a status URL on a foreign origin.
update taskman_private.task_private p set poll_headers = null, updated_at = now()
from taskman.tasks t
where t.task_id = p.task_id and p.poll_headers is not null
  and t.submit_url is not null and t.poll_url is not null
  and not taskman_private.poll_headers_may_go(t);
