-- Every migration version a database has recorded, for `credits check-config` on a Supabase
-- project to name the ones of this service it lacks (credit_schema_version() gives only the
-- newest, which cannot tell a gap, and PostgREST does not expose the CLI's own
-- `supabase_migrations` schema). Both the Supabase CLI and the service's own runner record every
-- applied version in that table; a project's own migrations are in it too, and the caller
-- compares with the versions it ships. Service role only.
create function public.credit_schema_versions() returns jsonb
language sql
stable
security definer
set search_path = ''
as $$
  select coalesce(pg_catalog.jsonb_agg(version order by version), '[]'::jsonb)
    from supabase_migrations.schema_migrations
$$;

revoke execute on function public.credit_schema_versions() from public, anon, authenticated;
grant execute on function public.credit_schema_versions() to service_role;
