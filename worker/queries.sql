-- Named queries used from Python. The schema and its functions live in
-- supabase/migrations; these are the few statements the service sends itself.

-- name: is_supabase
select exists (select 1 from pg_roles where rolname = 'supabase_admin')

-- name: lock_migrations
select pg_advisory_lock(hashtext('taskman.migrate'))

-- name: unlock_migrations
select pg_advisory_unlock(hashtext('taskman.migrate'))

-- name: create_migrations_table
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (
  version text primary key,
  statements text[],
  name text
)

-- name: applied_migrations
select version from supabase_migrations.schema_migrations

-- name: record_migration
insert into supabase_migrations.schema_migrations (version, statements, name)
values (%(version)s, array[%(statements)s], %(name)s)

-- name: database_exists
select exists (select 1 from pg_database where datname = %(name)s)

-- name: create_taskman_database
create database taskman
