-- The worker's outbox claim reads by key whatever the statistics say, as its task claim
-- does (20261202000200_lookups_by_key.sql). It joined task_private for the callbacks'
-- headers in its own statement, planned in the worker's session: on the statistics of
-- empty tables (a new project, right after an ANALYZE) that join read the whole table
-- once per claim, and the callback stream claims on every task that ends with a callback.
--
-- - taskman.claim_deliveries: claim_outbox's rows with each callback's headers, read by
--   key, in a function whose statements cannot choose a sequential scan.
-- - claim_outbox itself (due rows, and the oldest undelivered one of each task) reads by
--   index too.

create function taskman.claim_deliveries(worker_id text, batch_size integer default 100,
                                         lease_seconds integer default 60,
                                         only_channel text default null,
                                         skip_hosts text[] default null)
returns table (outbox_id bigint, task_id uuid, channel text, payload jsonb, attempts integer,
               headers jsonb)
language plpgsql volatile security definer
set search_path = ''
set enable_seqscan = off
as $$
begin
  return query
  select c.outbox_id, c.task_id, c.channel, c.payload, c.attempts,
         case when c.channel = 'callback' then p.callback_headers end
  from taskman.claim_outbox(claim_deliveries.worker_id, claim_deliveries.batch_size,
                            claim_deliveries.lease_seconds, claim_deliveries.only_channel,
                            claim_deliveries.skip_hosts) c
  left join lateral (
    select p.callback_headers from taskman_private.task_private p
    where p.task_id = c.task_id offset 0
  ) p on true;
end
$$;

alter function taskman.claim_outbox(text, integer, integer, text, text[])
  set enable_seqscan = off;

revoke all on function taskman.claim_deliveries from public, anon, authenticated;
grant execute on function taskman.claim_deliveries to service_role;
