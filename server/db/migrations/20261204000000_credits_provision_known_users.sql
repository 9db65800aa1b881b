-- A service may act for a user who exists in auth.users but has never called: a payment webhook
-- granting credits before the user's first call is the most common flow of all. The service
-- asks `credit_provision_known_user` when a call of its finds no profile; the profile is made
-- exactly as a user's own first call makes it (signup credits included, once). A user id that
-- auth.users does not know stays CR003 (profile not found).
--
-- Both paths now share one private function, which also backs the optional signup trigger
-- (server/db/optional/credits_signup_trigger.sql).

create function credits_private.create_profile(p_user_id uuid, p_email text) returns boolean
language plpgsql
set search_path = ''
as $$
declare
  v_signup bigint;
  v_created boolean;
begin
  select signup_credits into v_signup from credits_private.settings;
  insert into public.credit_profiles (user_id, email)
  values (p_user_id, coalesce(p_email, ''))
  on conflict (user_id) do nothing;
  v_created := found;
  if v_created and v_signup > 0 then
    perform credits_private.append(
      p_user_id, 'grant', v_signup, null, credits_private.fingerprint('signup', '{}'),
      'signup credits', '{}');
  end if;
  return v_created;
end
$$;

revoke execute on function credits_private.create_profile(uuid, text) from public;

create or replace function public.credit_provision_profile(p_user_id uuid, p_email text default '')
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_email text := coalesce(p_email, '');
begin
  perform credits_private.assert_may_act_for(p_user_id);
  if pg_catalog.current_setting('role', true) = 'authenticated' then
    v_email := coalesce(auth.jwt() ->> 'email', '');
  end if;
  return pg_catalog.jsonb_build_object(
    'created', credits_private.create_profile(p_user_id, v_email));
end
$$;

-- The profile of a user auth.users knows, made if missing (with that user's email); CR003 for
-- an id auth.users does not know. Service role only.
create function public.credit_provision_known_user(p_user_id uuid) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_email text;
begin
  select coalesce(u.email, '') into v_email from auth.users u where u.id = p_user_id;
  if not found then
    raise exception using errcode = 'CR003', message = 'no credit profile for this user';
  end if;
  return pg_catalog.jsonb_build_object(
    'created', credits_private.create_profile(p_user_id, v_email));
end
$$;

revoke execute on function public.credit_provision_known_user(uuid) from public, anon, authenticated;
grant execute on function public.credit_provision_known_user(uuid) to service_role;
