-- How far behind settlement is, for operators (service only): the seconds since the user due
-- longest fell due (a hold or grant expiring, a grant becoming effective), 0 when nobody is due.
-- The sweeper settles users as they fall due, so this stays under its interval; a user whose
-- settlement keeps failing (credit_expire_holds names it in a WARNING, which reaches only the
-- database's log over PostgREST) keeps it growing. One read of credit_profiles_to_settle.
create function public.credit_settlement_lag() returns double precision
language sql stable
security definer
set search_path = ''
as $$
  select coalesce(
    pg_catalog.date_part('epoch', credits_private.now() - pg_catalog.min(next_settle_at)), 0)
  from public.credit_profiles
  where next_settle_at <= credits_private.now()
$$;

revoke execute on function public.credit_settlement_lag() from public, anon, authenticated;
grant execute on function public.credit_settlement_lag() to service_role;
