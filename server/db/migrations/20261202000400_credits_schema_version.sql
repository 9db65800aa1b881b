-- The newest migration a database has applied, for `credits check-config` on a Supabase
-- project: PostgREST does not expose the CLI's own `supabase_migrations` schema, and a probe of
-- one function tells only whether the migration that made it is in. Both the Supabase CLI and
-- the service's own runner record every applied version in that table.
create function public.credit_schema_version() returns text
language sql
stable
security definer
set search_path = ''
as $$
  select pg_catalog.max(version) from supabase_migrations.schema_migrations
$$;

revoke execute on function public.credit_schema_version() from public, anon, authenticated;
grant execute on function public.credit_schema_version() to service_role;
