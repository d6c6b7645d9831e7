-- Named queries of bench.history_scale.

-- name: mints_uuidv7
select to_regprocedure('taskman_private.uuidv7()') is not null

-- name: copied_tables
-- Every table that keeps rows of a task (by task_id), with the columns a copy writes
-- (identity columns take their own next values) and which of them are times.
select c.oid::regclass::text as name,
       array_agg(a.attname::text order by a.attnum) as columns,
       array_agg(a.atttypid = 'timestamptz'::regtype order by a.attnum) as timed
from pg_class c
join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
                   and a.attidentity = '' and a.attgenerated = ''
where c.relnamespace in ('taskman'::regnamespace, 'taskman_private'::regnamespace)
  and c.relkind = 'r'
  and exists (select 1 from pg_attribute k
              where k.attrelid = c.oid and k.attname = 'task_id' and not k.attisdropped)
group by c.oid
order by c.oid::regclass::text

-- name: new_history_table
create temp table bench_new_tasks (i bigint primary key, task_id uuid, user_id uuid,
                                   shift interval)

-- name: new_history
-- Tasks first..last of the history: created `spacing` apart from `start`, every other
-- one owned by one of `heavy` users in turn and the rest by one of `users` others in
-- turn (history_scale.owner), with ids as create_task makes them (UUIDv7 at the creation
-- time, or v4).
insert into bench_new_tasks (i, task_id, user_id, shift)
select s.i,
       case when %(v7)s
            then encode(int8send((us / 1000) * 65536 + 28672 + (us %% 1000) * 4096 / 1000)
                        || substr(uuid_send(gen_random_uuid()), 9), 'hex')::uuid
            else gen_random_uuid() end,
       md5('taskman-bench-user-' || case when s.i %% 2 = 0 then s.i / 2 %% %(heavy)s
                                         else %(heavy)s + s.i / 2 %% %(users)s end)::uuid,
       a.at - tpl.created_at
from generate_series(%(first)s::bigint, %(last)s::bigint) as s(i)
cross join lateral (select %(start)s::timestamptz + %(spacing)s::interval * s.i as at) a
cross join lateral (select (extract(epoch from a.at) * 1000000)::bigint as us) c
cross join (select created_at from taskman.tasks where task_id = %(template)s) tpl

-- name: clear_new_history
truncate bench_new_tasks

-- name: template_rows
select count(*) from {table} where task_id = %(template)s

-- name: template_events
select string_agg(event_type, ', ' order by event_id) from taskman.task_events
where task_id = %(template)s

-- name: copy_rows
-- The template task's rows of one table, once for each new task: its id, its owner and
-- its times shifted by the new task's offset; every other column as the template has it.
insert into {table} ({columns})
select {values}
from bench_new_tasks n
join {table} tpl on tpl.task_id = %(template)s
order by n.i, tpl.ctid

-- name: settle
vacuum (analyze) taskman.tasks, taskman.task_events, taskman_private.task_private,
  taskman_private.task_schedule

-- name: analyze
-- Between runs, as autovacuum would soon: at 1k the runs' own tasks outnumber the history.
analyze taskman.tasks, taskman.task_events, taskman_private.task_private,
  taskman_private.task_schedule

-- name: checkpoint
checkpoint

-- name: sizes
-- The events (as the last ANALYZE counted them) and the bytes of tasks, events and all.
select (select reltuples::bigint from pg_class where oid = 'taskman.task_events'::regclass),
       pg_total_relation_size('taskman.tasks'), pg_total_relation_size('taskman.task_events'),
       pg_database_size(current_database())

-- name: create_task
select taskman.create_task(poll_url => %(poll_url)s, task_type => 'report')

-- name: get_task_status
select taskman.get_task_status(%(task_id)s)

-- name: newest_50
-- GET /rest/v1/tasks?select=*&order=created_at.desc&limit=50, under RLS.
select * from taskman.tasks order by created_at desc limit 50

-- name: task_stats
select taskman.task_stats()

-- name: any_task_of
-- A task of the user from about `at` on, read from the index alone (no heap or primary
-- key page is warmed for the read that is measured).
select task_id from taskman.tasks
where user_id = %(user_id)s and created_at >= %(at)s
order by created_at, task_id limit 1

-- name: db_now
select now()

-- name: completed_since
select count(*) from taskman.tasks where created_at >= %(since)s and status = 'completed'

-- name: index_sizes
-- Each index of the tables a task keeps rows in: its bytes per row of its table.
select i.indexrelid::regclass::text, pg_relation_size(i.indexrelid),
       pg_relation_size(i.indexrelid) / greatest(c.reltuples, 1)
from pg_index i join pg_class c on c.oid = i.indrelid
where i.indrelid in ('taskman.tasks'::regclass, 'taskman.task_events'::regclass,
                     'taskman_private.task_private'::regclass,
                     'taskman_private.task_schedule'::regclass)
order by 1

-- name: forget_measured
-- The tasks a measurement made, gone (with their rows) before the history grows again,
-- and the indexes rebuilt: the history goes on in time order, at the end of each index
-- (a deleted page's key range would otherwise stay with the page before it, and the next
-- history would be inserted there, splitting pages in half).
delete from taskman.tasks where created_at >= %(since)s

-- name: rebuild_indexes
reindex table taskman.tasks;
reindex table taskman.task_events;
reindex table taskman_private.task_private;
reindex table taskman_private.task_schedule
