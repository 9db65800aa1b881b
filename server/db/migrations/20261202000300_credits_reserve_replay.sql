-- A ReserveCredits replay returns the original result.
--
-- `credit_reserve` answered a replay with the hold as it is now (captured, released or expired
-- since) and the user's available credits of today. The contract's idempotency says the same
-- key with the same parameters returns the original result, however often it is sent. So a
-- replay now answers with the hold as the reservation created it (pending, and every other
-- field as it was: a hold's id, user, amount, expiry and creation time never change) and the
-- `available` that the reservation itself returned, which the hold now keeps.
--
-- What became of the hold since is for the caller to read elsewhere (a capture's or a
-- release's own answer, CR005's detail when it is settled again, the user's own holds).

-- The user's available credits right after the reservation that created this hold, as that
-- call returned them. Null for a generation's hold (`credit_create_generation` makes those, and
-- nothing replays them through `credit_reserve`) and for holds made before this migration.
alter table public.credit_holds add column available_after bigint;

-- Sets credits aside for `p_ttl_seconds` if available (balance - held) covers them.
-- Idempotent by key: a replay returns the original result, the hold as it was created (pending)
-- and the available credits the reservation returned, whatever happened to the hold since.
create or replace function public.credit_reserve(
  p_user_id uuid, p_amount bigint, p_idempotency_key text, p_ttl_seconds integer,
  p_description text default ''
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_fingerprint text := credits_private.fingerprint('reserve', pg_catalog.jsonb_build_object(
    'amount', p_amount, 'ttl_seconds', p_ttl_seconds,
    'description', coalesce(p_description, '')));
  v_profile public.credit_profiles;
  v_hold public.credit_holds;
  v_available bigint;
begin
  perform credits_private.assert_may_act_for(p_user_id);
  perform credits_private.check_amount(p_amount);
  perform credits_private.check_key(p_idempotency_key);
  if p_ttl_seconds is null or p_ttl_seconds not between 1 and 86400 then
    perform credits_private.invalid('ttl', 'must be between 1 second and 24 hours');
  end if;
  v_profile := credits_private.lock_profile(p_user_id);
  select * into v_hold from public.credit_holds
   where user_id = p_user_id and idempotency_key = p_idempotency_key;
  if found then
    if v_hold.fingerprint <> v_fingerprint then
      perform credits_private.key_reused();
    end if;
    return pg_catalog.jsonb_build_object(
      'hold', credits_private.hold_json(v_hold) || '{"state": "pending"}'::jsonb,
      -- A hold made before 20261202000300_credits_reserve_replay.sql has no `available_after`:
      -- its replay answers with today's available credits, as replays did then.
      'available', coalesce(v_hold.available_after, v_profile.balance - v_profile.held),
      'replayed', true);
  end if;
  if exists (select 1 from public.credit_transactions
              where user_id = p_user_id and idempotency_key = p_idempotency_key) then
    perform credits_private.key_reused();
  end if;
  perform credits_private.require_available(p_amount, v_profile.balance - v_profile.held);
  v_available := v_profile.balance - v_profile.held - p_amount;
  insert into public.credit_holds (
    user_id, amount, idempotency_key, fingerprint, description, expires_at, available_after)
  values (
    p_user_id, p_amount, p_idempotency_key, v_fingerprint, coalesce(p_description, ''),
    pg_catalog.now() + pg_catalog.make_interval(secs => p_ttl_seconds), v_available)
  returning * into v_hold;
  update public.credit_profiles
     set held = held + p_amount, updated_at = pg_catalog.now()
   where user_id = p_user_id;
  return pg_catalog.jsonb_build_object(
    'hold', credits_private.hold_json(v_hold), 'available', v_available, 'replayed', false);
end
$$;

-- `create or replace` keeps the function's privileges; they are stated again as
-- 20261125000100_credits_holds_refunds.sql set them, so that this file alone says who may call
-- it. The new column is readable as the table's others are: `select` on the table, row-level
-- security keeping a user's session to their own holds.
revoke execute on function public.credit_reserve(uuid, bigint, text, integer, text)
  from public, anon, authenticated;
grant execute on function public.credit_reserve(uuid, bigint, text, integer, text)
  to authenticated, service_role;
