-- A grant or refund that would raise a balance past the largest bigint is refused, not an
-- overflow.
--
-- `balance` is a bigint: a grant or refund that would take it past 2^63 - 1 failed inside
-- `credits_private.append` with "bigint out of range" (SQLSTATE 22003), which the service could
-- only report as INTERNAL. Both functions now judge the headroom after the idempotency key (a
-- replay still returns its original result) and before anything is written, and raise a new
-- SQLSTATE of the CR class (continuing the list at the top of 20261125000000_credits_ledger.sql):
--
--   CR011 balance limit exceeded (detail: {"balance": n, "amount": n, "limit": n})
--
-- Debits and captures only lower a balance, and a hold never exceeds the balance it is held
-- against, so no other function can overflow it.

-- Raises CR011 when crediting `p_amount` (> 0) to a balance of `p_balance` would pass the
-- largest bigint. Written so that the comparison itself cannot overflow.
create function credits_private.require_headroom(p_balance bigint, p_amount bigint)
returns void
language plpgsql
set search_path = ''
as $$
declare
  c_limit constant bigint := 9223372036854775807;
begin
  if p_balance > c_limit - p_amount then
    raise exception using errcode = 'CR011',
      message = 'the balance would exceed the largest the service can hold',
      detail = pg_catalog.jsonb_build_object(
        'balance', p_balance, 'amount', p_amount, 'limit', c_limit)::text;
  end if;
end
$$;

revoke execute on function credits_private.require_headroom(bigint, bigint) from public;

-- Gives credits to a user (service only). Idempotent by key. As `credits_private.move` did for
-- it (same fingerprint, so earlier grants still replay), with the headroom judged before the
-- ledger entry.
create or replace function public.credit_grant(
  p_user_id uuid, p_amount bigint, p_idempotency_key text, p_description text default '',
  p_metadata jsonb default '{}'
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_fingerprint text := credits_private.fingerprint('grant', pg_catalog.jsonb_build_object(
    'amount', p_amount, 'description', coalesce(p_description, ''),
    'metadata', coalesce(p_metadata, '{}'::jsonb)));
  v_profile public.credit_profiles;
  v_tx public.credit_transactions;
begin
  perform credits_private.check_amount(p_amount);
  perform credits_private.check_key(p_idempotency_key);
  v_profile := credits_private.lock_profile(p_user_id);
  v_tx := credits_private.replay(p_user_id, p_idempotency_key, v_fingerprint);
  if v_tx.transaction_id is not null then
    return credits_private.replayed(v_tx);
  end if;
  perform credits_private.require_headroom(v_profile.balance, p_amount);
  return credits_private.append(
    p_user_id, 'grant', p_amount, p_idempotency_key, v_fingerprint, p_description, p_metadata);
end
$$;

-- Returns credits of a debit or capture (service only), as
-- 20261204001000_credits_refund_owner.sql defined it (a NULL `p_user_id` acts on the
-- transaction's owner), with the headroom judged before the ledger entry.
create or replace function public.credit_refund(
  p_user_id uuid, p_transaction_id uuid, p_amount bigint, p_idempotency_key text,
  p_description text default ''
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_fingerprint text := credits_private.fingerprint('refund', pg_catalog.jsonb_build_object(
    'transaction_id', p_transaction_id, 'amount', p_amount,
    'description', coalesce(p_description, '')));
  v_user uuid := p_user_id;
  v_profile public.credit_profiles;
  v_tx public.credit_transactions;
  v_original public.credit_transactions;
  v_remaining bigint;
  v_amount bigint;
begin
  if p_amount is null or p_amount < 0 then
    perform credits_private.invalid('amount', 'must be 0 (what is left) or positive');
  end if;
  perform credits_private.check_key(p_idempotency_key);
  if v_user is null then
    -- Ledger rows are never updated or deleted: the owner read here stays the owner.
    select user_id into v_user from public.credit_transactions
     where transaction_id = p_transaction_id;
    if v_user is null then
      raise exception using errcode = 'CR006', message = 'transaction not found';
    end if;
  end if;
  v_profile := credits_private.lock_profile(v_user);
  v_tx := credits_private.replay(v_user, p_idempotency_key, v_fingerprint);
  if v_tx.transaction_id is not null then
    return credits_private.replayed(v_tx);
  end if;
  select * into v_original from public.credit_transactions
   where transaction_id = p_transaction_id and user_id = v_user;
  if not found then
    raise exception using errcode = 'CR006', message = 'transaction not found';
  end if;
  if v_original.kind not in ('debit', 'capture') then
    perform credits_private.invalid('transaction_id', 'must name a debit or a capture');
  end if;
  select v_original.amount - coalesce(pg_catalog.sum(amount), 0) into v_remaining
    from public.credit_transactions
   where refunded_transaction_id = p_transaction_id;
  v_amount := case when p_amount = 0 then v_remaining else p_amount end;
  if v_amount > v_remaining or v_amount = 0 then
    raise exception using errcode = 'CR007',
      message = 'the refund is larger than what is left of the transaction',
      detail = pg_catalog.jsonb_build_object('remaining', v_remaining)::text;
  end if;
  perform credits_private.require_headroom(v_profile.balance, v_amount);
  return credits_private.append(
    v_user, 'refund', v_amount, p_idempotency_key, v_fingerprint, p_description, '{}',
    p_refunded_transaction_id => p_transaction_id);
end
$$;

-- `create or replace` keeps the functions' privileges; they are stated again as
-- 20261125000000_credits_ledger.sql and 20261125000100_credits_holds_refunds.sql set them, so
-- that this file alone says who may call them: the service only.
revoke execute on function
  public.credit_grant(uuid, bigint, text, text, jsonb),
  public.credit_refund(uuid, uuid, bigint, text, text)
  from public, anon, authenticated;
grant execute on function
  public.credit_grant(uuid, bigint, text, text, jsonb),
  public.credit_refund(uuid, uuid, bigint, text, text)
  to service_role;
