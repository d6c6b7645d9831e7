-- JSON that every reader can read back: a task's result, metadata, poll_body and
-- submit_body nest arrays and objects at most 64 deep and hold numbers of magnitude
-- below 1e308 only. Deeper documents, or larger numbers (PostgreSQL writes them out
-- digit by digit: Python reads an integer of more than 4,300 digits as an error, a larger
-- fraction as infinity, JavaScript either as infinity), were stored but could not be
-- served. Refused where they are written (create_task, update_task, callbacks, plain
-- inserts and updates), with 22023 naming the field. The worker applies the same rules to
-- a poll's result before recording it (worker/remote/json_bounds.py).

-- What makes `doc` (whose text is `doc_text`) unservable, or null. Both rules need a
-- long text (a 65th level takes 130 characters, a number of 1e308 309 digits), so a
-- short document costs two length tests; a number is looked for only where the text has
-- a run of 309 digits.
create function taskman_private.json_problem(doc jsonb, doc_text text)
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

-- As in 20261201001600_faster_create.sql, and poll_body, metadata and result must be
-- servable (each document's text is made once, for its size and its shape).
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

-- As in 20261201001100_submit_heartbeat_priority.sql, and submit_body must be servable.
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
