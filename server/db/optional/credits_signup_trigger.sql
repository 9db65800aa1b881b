-- Optional, not applied by the service: the Supabase convention of making a user's credit
-- profile the moment they sign up, with a trigger on auth.users. Without it, a profile is made
-- by the user's first call, or by a service's first call for them (see docs/supabase.md).
-- To use it, copy this file into your project's supabase/migrations/ with a version after the
-- credits migrations, and `supabase db push`. Signup credits are granted once either way.

create function credits_private.profile_at_signup() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  perform credits_private.create_profile(new.id, new.email);
  return new;
end
$$;

revoke execute on function credits_private.profile_at_signup() from public;

create trigger credits_profile_at_signup
  after insert on auth.users
  for each row execute function credits_private.profile_at_signup();
