-- A generation's hold belongs to the generation: only its lifecycle (a worker's completion or
-- failure, CancelGeneration, the expiry of its reservation) captures or releases it. Through
-- `credit_capture` / `credit_release` it is CR005, hold not pending, and nothing changes: a
-- capture there would charge a generation that then fails ("the reservation ..."), a release
-- would cancel it behind its back. The lifecycle functions never call these two; they settle
-- the hold with `credits_private.settle_hold` and `credits_private.release_hold`.
--
-- And a hold that is no longer pending is CR005 for every call, a second release of a released
-- hold too (it used to return the hold as it was). CR005's detail is
-- {"state": <the hold's state>} and, for a generation's hold, "generation_id" as well, so a
-- caller retrying after a lost reply can tell what became of the hold.

-- A generation's hold is found by the generation's `hold_id`.
create index credit_generations_by_hold on public.credit_generations (hold_id)
  where hold_id is not null;

-- CR005 if the hold `p_hold` (locked, its profile locked) belongs to a generation.
create function credits_private.refuse_generation_hold(p_hold public.credit_holds) returns void
language plpgsql stable
set search_path = ''
as $$
declare
  v_generation_id uuid;
begin
  select generation_id into v_generation_id from public.credit_generations
   where hold_id = p_hold.hold_id;
  if v_generation_id is not null then
    raise exception using errcode = 'CR005',
      message = pg_catalog.format(
        'the hold belongs to generation %s: it is captured when the generation succeeds and'
        ' released when it fails or is cancelled', v_generation_id),
      detail = pg_catalog.jsonb_build_object(
        'state', p_hold.state, 'generation_id', v_generation_id)::text;
  end if;
end
$$;

-- CR005 unless the hold `p_hold` is pending.
create function credits_private.require_pending(p_hold public.credit_holds) returns void
language plpgsql immutable
set search_path = ''
as $$
begin
  if p_hold.state <> 'pending' then
    raise exception using errcode = 'CR005',
      message = 'the hold is no longer pending: ' || case p_hold.state
        when 'expired' then 'it expired' else 'it was already ' || p_hold.state end,
      detail = pg_catalog.jsonb_build_object('state', p_hold.state)::text;
  end if;
end
$$;

-- Charges `p_amount` of a pending hold (0: all of it) and releases the rest, in one
-- transaction. `p_owner` is the acting user (null for a service). Idempotent by key: a replay
-- returns the original capture, whatever the hold is now. A generation's hold is CR005.
create or replace function public.credit_capture(
  p_hold_id uuid, p_owner uuid, p_amount bigint, p_idempotency_key text
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_hold public.credit_holds;
  v_fingerprint text := credits_private.fingerprint('capture', pg_catalog.jsonb_build_object(
    'hold_id', p_hold_id, 'amount', p_amount));
  v_tx public.credit_transactions;
  v_amount bigint;
begin
  if p_amount is null or p_amount < 0 then
    perform credits_private.invalid('amount', 'must be 0 (the whole hold) or positive');
  end if;
  perform credits_private.check_key(p_idempotency_key);
  v_hold := credits_private.lock_hold(p_hold_id, p_owner);
  v_tx := credits_private.replay(v_hold.user_id, p_idempotency_key, v_fingerprint);
  if v_tx.transaction_id is not null then
    return credits_private.replayed(v_tx)
      || pg_catalog.jsonb_build_object('hold', credits_private.hold_json(v_hold));
  end if;
  perform credits_private.refuse_generation_hold(v_hold);
  perform credits_private.require_pending(v_hold);
  v_amount := case when p_amount = 0 then v_hold.amount else p_amount end;
  if v_amount > v_hold.amount then
    perform credits_private.invalid('amount', 'must not exceed the hold');
  end if;
  return credits_private.settle_hold(v_hold, v_amount, p_idempotency_key, v_fingerprint);
end
$$;

-- Releases a pending hold without charging it. A hold no longer pending (captured, released or
-- expired) is CR005, and so is a generation's hold.
create or replace function public.credit_release(p_hold_id uuid, p_owner uuid) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_hold public.credit_holds;
begin
  v_hold := credits_private.lock_hold(p_hold_id, p_owner);
  perform credits_private.refuse_generation_hold(v_hold);
  perform credits_private.require_pending(v_hold);
  v_hold := credits_private.release_hold(p_hold_id);
  return pg_catalog.jsonb_build_object(
    'hold', credits_private.hold_json(v_hold),
    'available', credits_private.available(v_hold.user_id));
end
$$;

-- New functions are executable by PUBLIC by default: take that back here too. The grants of
-- the two replaced functions are as 20261125000100_credits_holds_refunds.sql made them.
revoke execute on all functions in schema credits_private from public;
revoke execute on function
  public.credit_capture(uuid, uuid, bigint, text),
  public.credit_release(uuid, uuid)
  from public, anon, authenticated;
grant execute on function
  public.credit_capture(uuid, uuid, bigint, text),
  public.credit_release(uuid, uuid)
  to authenticated, service_role;
