-- Two-phase holds (reserve, capture, release, expiry) and refunds.
--
-- A hold's expiry is decided by time: a pending hold past `expires_at` counts nowhere and cannot
-- be captured, whether or not anything has marked it expired yet. `credit_expire_holds` (the
-- service's sweeper) only does the bookkeeping.

create function credits_private.hold_json(h public.credit_holds) returns jsonb
language sql stable
set search_path = ''
as $$
  select pg_catalog.jsonb_build_object(
    'hold_id', h.hold_id,
    'user_id', h.user_id,
    'amount', h.amount,
    'state', case when h.state = 'pending' and h.expires_at <= pg_catalog.now() then 'expired'
                  else h.state end,
    'expire_time', h.expires_at,
    'create_time', h.created_at,
    'idempotency_key', h.idempotency_key,
    'description', h.description)
$$;

-- The hold `p_hold_id`, locked, as the caller may see it: for a user (`p_owner`, or the user
-- of a user session) another user's hold is CR004 exactly like an unknown one. Locks the
-- owner's profile first (the order every money function takes locks in), which also expires
-- the owner's overdue holds.
create function credits_private.lock_hold(p_hold_id uuid, p_owner uuid)
returns public.credit_holds
language plpgsql
set search_path = ''
as $$
declare
  v_user uuid;
  v_hold public.credit_holds;
begin
  select user_id into v_user from public.credit_holds where hold_id = p_hold_id;
  if v_user is null
     or v_user is distinct from coalesce(p_owner, v_user)
     or (pg_catalog.current_setting('role', true) = 'authenticated'
         and v_user is distinct from auth.uid()) then
    raise exception using errcode = 'CR004', message = 'hold not found';
  end if;
  perform credits_private.lock_profile(v_user);
  select * into v_hold from public.credit_holds where hold_id = p_hold_id for update;
  return v_hold;
end
$$;

create function credits_private.available(p_user_id uuid) returns bigint
language sql stable
set search_path = ''
as $$
  select balance - held from public.credit_profiles where user_id = p_user_id
$$;

-- Captures `p_amount` of the pending hold `p_hold` (locked, its profile locked) and releases the
-- rest: one CAPTURE entry naming the hold. Returns the capture's result with the settled hold.
create function credits_private.settle_hold(
  p_hold public.credit_holds, p_amount bigint, p_idempotency_key text, p_fingerprint text
) returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_hold public.credit_holds;
  v_result jsonb;
begin
  update public.credit_holds
     set state = 'captured', updated_at = pg_catalog.now()
   where hold_id = p_hold.hold_id
  returning * into v_hold;
  update public.credit_profiles set held = held - v_hold.amount where user_id = v_hold.user_id;
  v_result := credits_private.append(
    v_hold.user_id, 'capture', -p_amount, p_idempotency_key, p_fingerprint, v_hold.description,
    '{}', p_hold_id => v_hold.hold_id);
  return v_result || pg_catalog.jsonb_build_object('hold', credits_private.hold_json(v_hold));
end
$$;

-- Releases the pending hold `p_hold_id` (its profile locked); returns it.
create function credits_private.release_hold(p_hold_id uuid) returns public.credit_holds
language plpgsql
set search_path = ''
as $$
declare
  v_hold public.credit_holds;
begin
  update public.credit_holds
     set state = 'released', updated_at = pg_catalog.now()
   where hold_id = p_hold_id and state = 'pending'
  returning * into v_hold;
  if found then
    update public.credit_profiles
       set held = held - v_hold.amount, updated_at = pg_catalog.now()
     where user_id = v_hold.user_id;
  end if;
  return v_hold;
end
$$;

-- Sets credits aside for `p_ttl_seconds` if available (balance - held) covers them.
-- Idempotent by key: a replay returns the same hold, as it is now.
create function public.credit_reserve(
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
      'hold', credits_private.hold_json(v_hold),
      'available', v_profile.balance - v_profile.held, 'replayed', true);
  end if;
  if exists (select 1 from public.credit_transactions
              where user_id = p_user_id and idempotency_key = p_idempotency_key) then
    perform credits_private.key_reused();
  end if;
  perform credits_private.require_available(p_amount, v_profile.balance - v_profile.held);
  insert into public.credit_holds (
    user_id, amount, idempotency_key, fingerprint, description, expires_at)
  values (
    p_user_id, p_amount, p_idempotency_key, v_fingerprint, coalesce(p_description, ''),
    pg_catalog.now() + pg_catalog.make_interval(secs => p_ttl_seconds))
  returning * into v_hold;
  update public.credit_profiles
     set held = held + p_amount, updated_at = pg_catalog.now()
   where user_id = p_user_id;
  return pg_catalog.jsonb_build_object(
    'hold', credits_private.hold_json(v_hold),
    'available', v_profile.balance - v_profile.held - p_amount, 'replayed', false);
end
$$;

-- Charges `p_amount` of a pending hold (0: all of it) and releases the rest, in one
-- transaction. `p_owner` is the acting user (null for a service). Idempotent by key.
create function public.credit_capture(
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
  if v_hold.state <> 'pending' then
    raise exception using errcode = 'CR005', message = 'the hold is no longer pending',
      detail = pg_catalog.jsonb_build_object('state', v_hold.state)::text;
  end if;
  v_amount := case when p_amount = 0 then v_hold.amount else p_amount end;
  if v_amount > v_hold.amount then
    perform credits_private.invalid('amount', 'must not exceed the hold');
  end if;
  return credits_private.settle_hold(v_hold, v_amount, p_idempotency_key, v_fingerprint);
end
$$;

-- Releases a pending hold without charging it. Releasing a released hold returns it as it
-- is; a captured or expired hold is CR005.
create function public.credit_release(p_hold_id uuid, p_owner uuid) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_hold public.credit_holds;
begin
  v_hold := credits_private.lock_hold(p_hold_id, p_owner);
  if v_hold.state = 'pending' then
    v_hold := credits_private.release_hold(p_hold_id);
  elsif v_hold.state <> 'released' then
    raise exception using errcode = 'CR005', message = 'the hold is no longer pending',
      detail = pg_catalog.jsonb_build_object('state', v_hold.state)::text;
  end if;
  return pg_catalog.jsonb_build_object(
    'hold', credits_private.hold_json(v_hold),
    'available', credits_private.available(v_hold.user_id));
end
$$;

-- Returns credits of a debit or capture (service only): `p_amount` of it, or 0 for what is
-- left of it. The refunds of one transaction never add up to more than it. Idempotent by key.
create function public.credit_refund(
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
  v_tx public.credit_transactions;
  v_original public.credit_transactions;
  v_remaining bigint;
  v_amount bigint;
begin
  if p_amount is null or p_amount < 0 then
    perform credits_private.invalid('amount', 'must be 0 (what is left) or positive');
  end if;
  perform credits_private.check_key(p_idempotency_key);
  perform credits_private.lock_profile(p_user_id);
  v_tx := credits_private.replay(p_user_id, p_idempotency_key, v_fingerprint);
  if v_tx.transaction_id is not null then
    return credits_private.replayed(v_tx);
  end if;
  select * into v_original from public.credit_transactions
   where transaction_id = p_transaction_id and user_id = p_user_id;
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
    p_user_id, 'refund', v_amount, p_idempotency_key, v_fingerprint, p_description, '{}',
    p_refunded_transaction_id => p_transaction_id);
end
$$;

-- Marks overdue pending holds expired, for up to `p_users` users per call, skipping users whose
-- profile another transaction holds (it expires their holds itself). Returns the users swept.
create function public.credit_expire_holds(p_users integer default 100) returns integer
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_user uuid;
  v_swept integer := 0;
begin
  for v_user in
    select distinct user_id from public.credit_holds
     where state = 'pending' and expires_at <= pg_catalog.now()
     limit p_users
  loop
    perform 1 from public.credit_profiles where user_id = v_user for update skip locked;
    if found then
      perform credits_private.expire_holds(v_user);
      v_swept := v_swept + 1;
    end if;
  end loop;
  return v_swept;
end
$$;

-- New functions are executable by PUBLIC by default: take that back here too.
revoke execute on all functions in schema credits_private from public;
revoke execute on function
  public.credit_reserve(uuid, bigint, text, integer, text),
  public.credit_capture(uuid, uuid, bigint, text),
  public.credit_release(uuid, uuid),
  public.credit_refund(uuid, uuid, bigint, text, text),
  public.credit_expire_holds(integer)
  from public, anon, authenticated;
grant execute on function
  public.credit_reserve(uuid, bigint, text, integer, text),
  public.credit_capture(uuid, uuid, bigint, text),
  public.credit_release(uuid, uuid)
  to authenticated, service_role;
grant execute on function
  public.credit_refund(uuid, uuid, bigint, text, text),
  public.credit_expire_holds(integer)
  to service_role;
