-- Owners' own callback signing secrets. A user who has one gets every completion
-- callback of their tasks signed with it (Standard Webhooks `webhook-signature`), not
-- with the deployment's shared TASKMAN_CALLBACK_SECRET, so no other tenant can make a
-- callback their receiver accepts. `rotate_callback_secret` creates or replaces it and
-- returns it once; the one it replaces keeps signing beside it for the grace asked
-- (default a day), so receivers can switch without losing a callback.
--
-- Service-only storage: RLS with no policy, no grant to the API roles. The worker reads
-- what changed since its last look (callback_secrets_rotated_idx) every few seconds.

create table taskman_private.callback_secrets (
  user_id uuid primary key,
  secret text not null,
  previous_secret text,
  previous_valid_until timestamptz,
  rotated_at timestamptz not null default now(),
  check ((previous_secret is null) = (previous_valid_until is null))
);

create index callback_secrets_rotated_idx on taskman_private.callback_secrets (rotated_at);

alter table taskman_private.callback_secrets enable row level security;
revoke all on taskman_private.callback_secrets from public, anon, authenticated;
grant select, insert, update, delete on taskman_private.callback_secrets to service_role;

-- The caller's new secret (`whsec_` + base64 of 32 random bytes: two v4 UUIDs' bytes,
-- 244 random bits from the server's strong random source), shown once.
create function taskman_private.rotate_callback_secret(keep_previous_seconds integer)
returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  owner uuid := auth.uid();
  fresh text := 'whsec_' || pg_catalog.encode(
    pg_catalog.uuid_send(pg_catalog.gen_random_uuid())
      || pg_catalog.uuid_send(pg_catalog.gen_random_uuid()), 'base64');
  kept taskman_private.callback_secrets;
begin
  perform taskman_private.require_user();
  if owner is null then
    raise exception using errcode = '42501',
      message = 'callback secrets belong to signed-in users: the service''s own callbacks'
                ' are signed with TASKMAN_CALLBACK_SECRET';
  end if;
  if keep_previous_seconds is null or keep_previous_seconds not between 0 and 604800 then
    perform taskman_private.reject('keep_previous_seconds',
                                   'must be between 0 and 604800 (7 days)');
  end if;
  insert into taskman_private.callback_secrets as c (user_id, secret, rotated_at)
  values (owner, fresh, pg_catalog.now())
  on conflict (user_id) do update
    set previous_secret = case when keep_previous_seconds > 0 then c.secret end,
        previous_valid_until = case when keep_previous_seconds > 0
                                    then pg_catalog.now()
                                         + pg_catalog.make_interval(secs => keep_previous_seconds)
                               end,
        secret = excluded.secret,
        rotated_at = excluded.rotated_at
  returning * into kept;
  return pg_catalog.jsonb_build_object(
    'secret', fresh, 'rotated_at', kept.rotated_at,
    'previous_valid_until', kept.previous_valid_until);
end
$$;

create function taskman.rotate_callback_secret(keep_previous_seconds integer default 86400)
returns jsonb
language sql volatile security invoker
set search_path = ''
as $$
  select taskman_private.rotate_callback_secret(keep_previous_seconds)
$$;

comment on function taskman.rotate_callback_secret is
  'Create or replace the caller''s callback signing secret (returned once); the one it '
  'replaces keeps signing for keep_previous_seconds. See docs/callbacks.md.';

revoke all on function taskman_private.rotate_callback_secret(integer),
  taskman.rotate_callback_secret(integer) from public, anon;
grant execute on function taskman_private.rotate_callback_secret(integer),
  taskman.rotate_callback_secret(integer) to authenticated, service_role;
