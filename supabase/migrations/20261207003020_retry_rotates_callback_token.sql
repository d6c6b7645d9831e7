-- A retry gives every task a new callback token, and the old one stops working.
--
-- A task whose submit hands the remote `{callback_url}` kept its token across retries
-- (its remote held that URL). Now such a task, once submitted, is submitted again on
-- retry: back to no status URL and not submitted, so that the worker sends the submit
-- with the new token in `{callback_url}`. The old token opens nothing from then on, on
-- update_task and the edge's /callbacks route alike. Other tasks are as before: a
-- submitted task polls the same job again, one whose submit failed is submitted again.

create or replace function taskman_private.retry_task(task_id uuid)
returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  t taskman.tasks := taskman_private.visible_task(retry_task.task_id, true);
  resubmit boolean;
begin
  if t.status not in ('failed', 'cancelled') then
    raise exception using errcode = 'PT409',
      message = format('task %s is %s; only failed or cancelled tasks can be retried', t.task_id, t.status);
  end if;
  resubmit := t.submitted_at is not null
              and taskman_private.submit_needs_callback_url(t.task_id);
  perform set_config('taskman.retry_task', t.task_id::text, true);
  update taskman.tasks x
  set status = 'pending',
      submitted_at = case when resubmit then null else x.submitted_at end,
      poll_url = case when resubmit then null else x.poll_url end
  where x.task_id = t.task_id
  returning * into t;
  perform set_config('taskman.retry_task', '', true);
  -- Not submitted any more: the token is new, and kept for the worker's {callback_url}.
  return taskman.task_json(t)
    || jsonb_build_object('callback_token', taskman_private.issue_callback_token(t.task_id));
end
$$;
