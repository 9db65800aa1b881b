-- A hold's create_time by the same clock as its expire_time.
--
-- Since 20261204100010_credits_grants_machinery.sql a hold's expiry is `credits_private.now()`
-- plus its ttl, but its `created_at` stayed the column default, the transaction's now(): with
-- the clock moved (as tests move it), a hold's expire_time minus its create_time was no longer
-- its ttl. Both are now taken from the clock, as a grant's create time is. Otherwise
-- `credits_private.hold` is as that migration defined it.

create or replace function credits_private.hold(
  p_user_id uuid, p_amount bigint, p_idempotency_key text, p_fingerprint text,
  p_description text, p_expires_at timestamptz, p_scope text, p_available_after bigint
) returns public.credit_holds
language plpgsql
set search_path = ''
as $$
declare
  v_pick record;
  v_hold public.credit_holds;
begin
  v_pick := credits_private.pick(p_user_id, p_amount, p_scope, p_expires_at);
  perform credits_private.require_available(p_amount, v_pick.available, p_scope);
  insert into public.credit_holds (
    user_id, amount, idempotency_key, fingerprint, description, expires_at, available_after,
    created_at)
  values (
    p_user_id, p_amount, p_idempotency_key, p_fingerprint, coalesce(p_description, ''),
    p_expires_at, p_available_after,
    -- credits_private.now() (this runs as the owner): the instant the callers added ttl to.
    pg_catalog.now() + (select c."offset" from credits_private.clock c))
  returning * into v_hold;
  update public.credit_grants g set pinned = g.pinned + a.amount
    from unnest(v_pick.grants, v_pick.amounts) as a (grant_id, amount)
   where g.grant_id = a.grant_id;
  insert into public.credit_hold_pins (hold_id, grant_id, user_id, ordinal, amount)
  select v_hold.hold_id, a.grant_id, p_user_id, a.ordinal, a.amount
    from unnest(v_pick.grants, v_pick.amounts) with ordinality as a (grant_id, amount, ordinal);
  update public.credit_profiles
     set held = held + p_amount, next_settle_at = least(next_settle_at, p_expires_at),
         updated_at = pg_catalog.now()
   where user_id = p_user_id;
  return v_hold;
end
$$;

revoke execute on function
  credits_private.hold(uuid, bigint, text, text, text, timestamptz, text, bigint)
  from public;
