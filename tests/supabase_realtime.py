"""A Supabase project's `realtime` schema, as far as Taskman meets it: `subscription` (its
presence says Realtime streams the publication), `messages`, `send()` and `topic()` shaped
as Supabase's own."""

from __future__ import annotations

import psycopg

SUPABASE_REALTIME = """
create schema realtime;
grant usage on schema realtime to anon, authenticated, service_role;
create table realtime.subscription (id bigint primary key, entity regclass);
create table realtime.messages (
  id uuid primary key default gen_random_uuid(),
  topic text not null, extension text not null, payload jsonb, event text,
  private boolean default false, inserted_at timestamp not null default now());
alter table realtime.messages enable row level security;
grant select on realtime.messages to authenticated;
create function realtime.topic() returns text language sql stable
  as $$ select nullif(current_setting('realtime.topic', true), '') $$;
grant execute on function realtime.topic() to authenticated;
create function realtime.send(payload jsonb, event text, topic text, private boolean default true)
returns void language plpgsql as $$
begin
  begin
    execute format('set local realtime.topic to %L', topic);
    insert into realtime.messages (payload, event, topic, private, extension)
    values (payload, event, topic, private, 'broadcast');
  exception when others then
    raise warning 'ErrorSendingBroadcastMessage: %', sqlerrm;
  end;
end $$;
"""


def emulate_supabase_realtime(conn: psycopg.Connection) -> None:
    """Make the test database look like a Supabase project's, Realtime included."""
    conn.execute(SUPABASE_REALTIME)
