-- RefundCredits names the transaction it refunds, which names its user: a service may leave
-- `p_user_id` NULL and the refund acts on the transaction's owner. A user id that is given must
-- still be the owner's: another user's transaction is CR006 exactly like an unknown one.
-- Otherwise the function is the one of 20261125000100_credits_holds_refunds.sql, unchanged
-- (CREATE OR REPLACE keeps its grants: service role only).
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
  perform credits_private.lock_profile(v_user);
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
  return credits_private.append(
    v_user, 'refund', v_amount, p_idempotency_key, v_fingerprint, p_description, '{}',
    p_refunded_transaction_id => p_transaction_id);
end
$$;
