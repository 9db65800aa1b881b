-- What a Supabase project provides and plain PostgreSQL lacks: the API roles, the auth schema
-- with auth.users, and auth.uid()/auth.role()/auth.jwt() as Supabase defines them (reading the
-- claims PostgREST puts in `request.jwt.claims`). Idempotent; never run against Supabase itself.

-- Roles belong to the whole server, not to one database, so two databases bootstrapped at once
-- may race to create them: the loser's duplicate is fine.
do $$
begin
  create role anon nologin noinherit;
exception when duplicate_object or unique_violation then null;
end
$$;
do $$
begin
  create role authenticated nologin noinherit;
exception when duplicate_object or unique_violation then null;
end
$$;
do $$
begin
  create role service_role nologin noinherit bypassrls;
exception when duplicate_object or unique_violation then null;
end
$$;

-- The connecting role switches to these per request, as Supabase's `authenticator` does.
grant anon, authenticated, service_role to current_user;

create schema if not exists auth;
grant usage on schema auth to anon, authenticated, service_role;
grant usage on schema public to anon, authenticated, service_role;

create table if not exists auth.users (
  id uuid primary key,
  email text,
  created_at timestamptz not null default now()
);

create or replace function auth.jwt() returns jsonb
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb
$$;

create or replace function auth.uid() returns uuid
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid
$$;

create or replace function auth.role() returns text
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.role', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
  )::text
$$;

grant execute on function auth.jwt(), auth.uid(), auth.role() to anon, authenticated, service_role;
