-- Credit grants, part 2 of 3: the private machinery every money function shares.
--
-- Settlement ("time decides"). Reads count by time: a hold past its expiry counts nowhere, a
-- grant counts from its effective time and stops counting at its expiry. Every money function
-- locks the user's profile (`credits_private.lock_profile`) and, when something of the user's
-- has fallen due (`credit_profiles.next_settle_at`), settles it first, in the order the events
-- happened: pending holds past their expiry are marked expired (their pins freed), grants that
-- took effect get their GRANT entry, grants that expired lose their remainder in an EXPIRE entry
-- (a grant that took effect and expired while its user was idle gets both, in that order).
-- `credit_expire_holds`, the sweeper, does the same for idle users.
--
-- Burn-down. Spending with scope s (empty: unscoped) may use the activated, unexpired, unvoided
-- grants whose unpinned remainder is positive and whose scopes are empty or contain s (so
-- unscoped spending uses unscoped grants only), in this order: lowest priority number first;
-- then grants scoped to this spending before unscoped ones; then the soonest expiry
-- (never-expiring last); then the oldest (create time, then seq). A reservation uses only
-- grants that expire no sooner than the hold does, so no grant's expiry ever takes pinned
-- credits.
--
-- Companion entries. A capture whose hold had pinned credits of a voided grant, and a refund
-- into expired or voided grants, write a second entry right after their own, taking the part
-- that may not count out again (VOID or EXPIRE, no idempotency key). Its metadata names what it
-- follows ({"hold_id": ...} or {"refund_transaction_id": ...}); the call returns the balance
-- after both, and so does its replay (`credits_private.balance_after`).
--
-- Helpers that run on every debit are PL/pgSQL: their queries are planned once per session.

-- Allocations as the JSON results carry them: [{grant_id, amount}], in the order drawn.
create function credits_private.allocations_json(p_grants uuid[], p_amounts bigint[])
returns jsonb
language plpgsql immutable
set search_path = ''
as $$
begin
  if p_grants is null then
    return '[]'::jsonb;
  end if;
  if pg_catalog.cardinality(p_grants) = 1 then
    return pg_catalog.jsonb_build_array(
      pg_catalog.jsonb_build_object('grant_id', p_grants[1], 'amount', p_amounts[1]));
  end if;
  return (
    select pg_catalog.jsonb_agg(
             pg_catalog.jsonb_build_object('grant_id', a.grant_id, 'amount', a.amount)
             order by a.ordinal)
      from unnest(p_grants, p_amounts) with ordinality as a (grant_id, amount, ordinal));
end
$$;

-- A ledger entry as JSON, with the allocations given. PL/pgSQL: every money call builds one.
create function credits_private.transaction_json(
  t public.credit_transactions, p_allocations jsonb
) returns jsonb
language plpgsql immutable
set search_path = ''
as $$
begin
  return pg_catalog.jsonb_build_object(
    'transaction_id', t.transaction_id,
    'user_id', t.user_id,
    'kind', t.kind,
    'amount', t.amount,
    'balance_after', t.balance_after,
    'idempotency_key', coalesce(t.idempotency_key, ''),
    'description', t.description,
    'metadata', t.metadata,
    'create_time', t.created_at,
    'refunded_transaction_id', t.refunded_transaction_id,
    'hold_id', t.hold_id,
    'seq', t.seq,
    'allocations', coalesce(p_allocations, '[]'::jsonb));
end
$$;

-- A ledger entry as JSON, with its stored allocations (as the caller may read them).
create or replace function credits_private.transaction_json(t public.credit_transactions)
returns jsonb
language plpgsql stable
set search_path = ''
as $$
begin
  return credits_private.transaction_json(t, (
    select pg_catalog.jsonb_agg(
             pg_catalog.jsonb_build_object('grant_id', a.grant_id, 'amount', a.amount)
             order by a.ordinal)
      from public.credit_allocations a
     where a.transaction_id = t.transaction_id));
end
$$;

-- The request's fingerprint (as 20261125000000_credits_ledger.sql defined it), in PL/pgSQL:
-- a SQL function that cannot be inlined is planned at every call, and every call has one.
create or replace function credits_private.fingerprint(p_operation text, p_parameters jsonb)
returns text
language plpgsql immutable
set search_path = ''
as $$
begin
  return pg_catalog.encode(pg_catalog.sha256(
    pg_catalog.convert_to(p_operation || ':' || p_parameters::text, 'UTF8')), 'hex');
end
$$;

-- The user's balance after entry `t` and its companion entry, if it has one.
create function credits_private.balance_after(t public.credit_transactions) returns bigint
language plpgsql stable
set search_path = ''
as $$
declare
  v_balance bigint;
begin
  if t.kind in ('capture', 'refund') then
    select c.balance_after into v_balance
      from (select * from public.credit_transactions n
             where n.user_id = t.user_id and n.seq > t.seq
             order by n.seq
             limit 2) c
     where c.kind in ('expire', 'void') and c.idempotency_key is null
       and (c.metadata ->> 'refund_transaction_id' = t.transaction_id::text
            or (t.kind = 'capture' and c.metadata ->> 'hold_id' = t.hold_id::text))
     order by c.seq desc
     limit 1;
  end if;
  return coalesce(v_balance, t.balance_after);
end
$$;

create or replace function credits_private.replayed(t public.credit_transactions) returns jsonb
language sql stable
set search_path = ''
as $$
  select pg_catalog.jsonb_build_object(
    'transaction', credits_private.transaction_json(t),
    'balance', credits_private.balance_after(t),
    'replayed', true)
$$;

-- Refuses `p_required` credits when only `p_available` are available for spending of scope
-- `p_scope`.
create function credits_private.require_available(
  p_required bigint, p_available bigint, p_scope text
) returns void
language plpgsql
set search_path = ''
as $$
begin
  if p_available < p_required then
    raise exception using errcode = 'CR001', message = 'insufficient credits',
      detail = pg_catalog.jsonb_build_object(
        'required', p_required, 'available', p_available, 'scope', p_scope)::text;
  end if;
end
$$;

-- CR008 unless `p_scope` is a scope spending may name: empty (unscoped), or 1 to 100
-- printable characters.
create function credits_private.check_scope(p_scope text) returns void
language plpgsql
set search_path = ''
as $$
begin
  if p_scope <> '' and (pg_catalog.char_length(p_scope) > 100 or p_scope ~ '[[:cntrl:]]') then
    perform credits_private.invalid('scope', 'must be at most 100 printable characters');
  end if;
end
$$;

-- The scopes of a new grant as stored (sorted, distinct), or CR008 naming `scopes`.
create function credits_private.normal_scopes(p_scopes text[]) returns text[]
language plpgsql
set search_path = ''
as $$
begin
  if p_scopes is null or pg_catalog.cardinality(p_scopes) = 0 then
    return '{}';
  end if;
  if pg_catalog.array_ndims(p_scopes) > 1 then
    perform credits_private.invalid('scopes', 'must be a list of scopes');
  end if;
  if exists (select 1 from unnest(p_scopes) s
              where s is null or pg_catalog.char_length(s) not between 1 and 100
                 or s ~ '[[:cntrl:]]') then
    perform credits_private.invalid('scopes', 'each must be 1 to 100 printable characters');
  end if;
  p_scopes := array(select distinct s collate "C" from unnest(p_scopes) s order by 1);
  if pg_catalog.cardinality(p_scopes) > 20 then
    perform credits_private.invalid('scopes', 'at most 20 scopes');
  end if;
  return p_scopes;
end
$$;

-- Notes that this transaction changes (or is about to change) the profile row of `p_user_id`,
-- whose invariant is then checked at commit through that row: changes of that user's grants,
-- holds and pins need no check of their own (their triggers pass them by). Every money
-- function notes it when it locks the profile (credits_private.lock_profile); all of them that
-- change a user's money change the profile row too. Undone with the subtransaction if that
-- rolls back, as the changes are.
create function credits_private.touching_profile(p_user_id uuid) returns void
language plpgsql
set search_path = ''
as $$
declare
  v_touched text := coalesce(pg_catalog.current_setting('credits.touched_profiles', true), '');
begin
  if pg_catalog.strpos(v_touched, p_user_id::text) = 0 then
    perform pg_catalog.set_config(
      'credits.touched_profiles', v_touched || ' ' || p_user_id::text, true);
  end if;
end
$$;

-- Appends a ledger entry of `p_delta` (its sign gives the direction) with its allocations, and
-- moves the profile: balance by `p_delta`, held by `p_held_delta`, next_settle_at down to
-- `p_settle_at` if that is sooner. The caller holds the profile's row lock and has moved the
-- grants and holds to match.
--
-- With `p_verify` (the debit, whose every change is made when it records its entry), the same
-- statement checks the user's invariant as it leaves it (balance = the remaining of the counted
-- grants, held = their pinned credits; a debit changes no hold), instead of the check at commit
-- that the profile row's change would cost: its trigger passes by a profile being verified
-- (credits.verified_profiles, set for this one statement). The user's other rows are checked as
-- usual again from then on (credits.touched_profiles loses the user), so nothing written after
-- it in the transaction escapes a check.
create function credits_private.record(
  p_user_id uuid, p_kind text, p_delta bigint, p_idempotency_key text, p_fingerprint text,
  p_description text, p_metadata jsonb, p_grants uuid[], p_amounts bigint[],
  p_held_delta bigint default 0, p_refunded_transaction_id uuid default null,
  p_hold_id uuid default null, p_transaction_id uuid default null,
  p_settle_at timestamptz default null, p_verify boolean default false
) returns public.credit_transactions
language plpgsql
set search_path = ''
as $$
declare
  v_tx public.credit_transactions;
begin
  if p_verify then
    perform pg_catalog.set_config('credits.verified_profiles', p_user_id::text, true);
  end if;
  -- One statement: every money call makes one of these.
  with profile as (
    update public.credit_profiles
       set balance = balance + p_delta, held = held + p_held_delta,
           next_settle_at = least(next_settle_at, p_settle_at), updated_at = pg_catalog.now()
     where user_id = p_user_id
    returning balance, held
  ), entry as (
    insert into public.credit_transactions (
      transaction_id, user_id, kind, amount, balance_after, idempotency_key, fingerprint,
      description, metadata, refunded_transaction_id, hold_id)
    select coalesce(p_transaction_id, pg_catalog.gen_random_uuid()), p_user_id, p_kind,
           pg_catalog.abs(p_delta), profile.balance, p_idempotency_key, p_fingerprint,
           coalesce(p_description, ''), coalesce(p_metadata, '{}'::jsonb),
           p_refunded_transaction_id, p_hold_id
      from profile
    returning *
  ), allocations as (
    insert into public.credit_allocations (transaction_id, grant_id, user_id, ordinal, amount)
    select entry.transaction_id, a.grant_id, p_user_id, a.ordinal, a.amount
      from entry, unnest(p_grants, p_amounts) with ordinality as a (grant_id, amount, ordinal)
  ), books as (
    select coalesce(pg_catalog.sum(g.remaining) filter (where g.activated and not g.expired),
                    0) as counted,
           coalesce(pg_catalog.sum(g.pinned), 0) as pinned
      from public.credit_grants g
     where p_verify and g.user_id = p_user_id and g.live
  )
  select e.* into v_tx
    from entry e
   where not p_verify
      or exists (select 1 from profile, books
                  where profile.balance = books.counted and profile.held = books.pinned);
  if p_verify then
    if v_tx.transaction_id is null then
      raise exception using errcode = '23514',
        message = 'the credit balance is out of step with its grants and holds',
        detail = pg_catalog.jsonb_build_object('user_id', p_user_id)::text;
    end if;
    perform pg_catalog.set_config('credits.verified_profiles', '', true),
            pg_catalog.set_config('credits.touched_profiles', pg_catalog.replace(
              pg_catalog.current_setting('credits.touched_profiles', true),
              ' ' || p_user_id::text, ''), true);
  end if;
  return v_tx;
end
$$;

-- The grants that would pay `p_amount` of spending with scope `p_scope`, in burn-down order,
-- and how much each pays (`grants`, `amounts`: null when nothing is available), and how much
-- is available for it in all. With `p_until`, only grants that last until then (a hold's
-- expiry). The caller holds the profile's row lock, settled.
create function credits_private.pick(
  p_user_id uuid, p_amount bigint, p_scope text, p_until timestamptz,
  out grants uuid[], out amounts bigint[], out available bigint
)
language plpgsql stable
set search_path = ''
as $$
begin
  select pg_catalog.array_agg(e.grant_id order by e.through)
           filter (where e.through - e.free < p_amount),
         pg_catalog.array_agg(least(e.free, p_amount - (e.through - e.free)) order by e.through)
           filter (where e.through - e.free < p_amount),
         coalesce(pg_catalog.max(e.through), 0)
    into grants, amounts, available
    from (select g.grant_id, g.remaining - g.pinned as free,
                 (pg_catalog.sum(g.remaining - g.pinned) over (
                    order by g.priority, g.scopes = '{}', g.expires_at nulls last, g.created_at,
                             g.seq
                    rows between unbounded preceding and current row))::bigint as through
            from public.credit_grants g
           where g.user_id = p_user_id and g.live and g.activated and not g.expired
             and g.voided_at is null and g.remaining > g.pinned
             and (g.scopes = '{}' or p_scope = any (g.scopes))
             and (p_until is null or g.expires_at is null or g.expires_at >= p_until)) e;
end
$$;

-- Closes the pending hold `p_hold_id` (its profile locked) as `p_state`: 'captured' charging
-- `p_amount` of it (a CAPTURE entry drawing on its pins in pin order, returned), 'released' or
-- 'expired' charging nothing. Every pin is freed; what a freed pin held of a voided grant
-- leaves in a VOID entry. Does nothing (returns null) if the hold is not pending.
create function credits_private.close_hold(
  p_hold_id uuid, p_state text, p_amount bigint, p_idempotency_key text, p_fingerprint text
) returns public.credit_transactions
language plpgsql
set search_path = ''
as $$
declare
  v_hold public.credit_holds;
  v_taken_grants uuid[];
  v_taken bigint[];
  v_voided_grants uuid[];
  v_voided bigint[];
  v_voided_total bigint;
  v_tx public.credit_transactions;
begin
  update public.credit_holds
     set state = p_state, updated_at = pg_catalog.now()
   where hold_id = p_hold_id and state = 'pending'
  returning * into v_hold;
  if not found then
    return null;
  end if;
  with pins as (
    select q.grant_id, q.ordinal, q.amount,
           greatest(0, least(q.amount, p_amount - ((pg_catalog.sum(q.amount) over (
             order by q.ordinal rows between unbounded preceding and current row))::bigint
             - q.amount))) as taken
      from public.credit_hold_pins q
     where q.hold_id = p_hold_id
  ), freed as (
    update public.credit_grants g
       set pinned = g.pinned - p.amount,
           remaining = g.remaining - p.taken
             - case when g.voided_at is not null then p.amount - p.taken else 0 end
      from pins p
     where g.grant_id = p.grant_id
    returning g.grant_id, p.ordinal, p.taken,
              case when g.voided_at is not null then p.amount - p.taken else 0 end as voided
  )
  select pg_catalog.array_agg(f.grant_id order by f.ordinal) filter (where f.taken > 0),
         pg_catalog.array_agg(f.taken order by f.ordinal) filter (where f.taken > 0),
         pg_catalog.array_agg(f.grant_id order by f.ordinal) filter (where f.voided > 0),
         pg_catalog.array_agg(f.voided order by f.ordinal) filter (where f.voided > 0),
         coalesce(pg_catalog.sum(f.voided), 0)
    into v_taken_grants, v_taken, v_voided_grants, v_voided, v_voided_total
    from freed f;
  if p_amount > 0 then
    v_tx := credits_private.record(
      v_hold.user_id, 'capture', -p_amount, p_idempotency_key, p_fingerprint,
      v_hold.description, '{}', v_taken_grants, v_taken, p_held_delta => -v_hold.amount,
      p_hold_id => v_hold.hold_id);
  else
    update public.credit_profiles
       set held = held - v_hold.amount, updated_at = pg_catalog.now()
     where user_id = v_hold.user_id;
  end if;
  if v_voided_total > 0 then
    perform credits_private.record(
      v_hold.user_id, 'void', -v_voided_total, null,
      credits_private.fingerprint('void', pg_catalog.jsonb_build_object('hold_id', p_hold_id)),
      'voided credits the hold had set aside',
      pg_catalog.jsonb_build_object('hold_id', p_hold_id::text), v_voided_grants, v_voided);
  end if;
  return v_tx;
end
$$;

-- The soonest time anything of the user's falls due, or null.
create function credits_private.next_due(p_user_id uuid) returns timestamptz
language plpgsql stable
set search_path = ''
as $$
begin
  return least(
    (select pg_catalog.min(h.expires_at) from public.credit_holds h
      where h.user_id = p_user_id and h.state = 'pending'),
    (select pg_catalog.min(least(
              case when not g.activated and g.voided_at is null then g.effective_at end,
              case when not g.expired and g.voided_at is null then g.expires_at end))
       from public.credit_grants g
      where g.user_id = p_user_id and g.live));
end
$$;

-- Settles everything of the user's due at `p_now`, in the order it fell due (see the top of
-- this file). The caller holds the profile's row lock.
create function credits_private.settle(p_user_id uuid, p_now timestamptz) returns void
language plpgsql
set search_path = ''
as $$
declare
  v_event record;
  v_grant public.credit_grants;
  v_tx_id uuid;
begin
  perform credits_private.touching_profile(p_user_id);
  for v_event in
    select 0 as what, h.hold_id as id, h.expires_at as at, 0::bigint as seq
      from public.credit_holds h
     where h.user_id = p_user_id and h.state = 'pending' and h.expires_at <= p_now
    union all
    select 1, g.grant_id, g.effective_at, g.seq
      from public.credit_grants g
     where g.user_id = p_user_id and g.live and not g.activated and g.voided_at is null
       and g.effective_at <= p_now
    union all
    select 2, g.grant_id, g.expires_at, g.seq
      from public.credit_grants g
     where g.user_id = p_user_id and g.live and not g.expired and g.voided_at is null
       and g.expires_at <= p_now
     order by at, what, seq
  loop
    if v_event.what = 0 then
      -- A hold's expiry. At the same instant as a grant's expiry it goes first: its pins are
      -- free by then.
      perform credits_private.close_hold(v_event.id, 'expired', 0, null, null);
      continue;
    end if;
    select * into v_grant from public.credit_grants where grant_id = v_event.id for update;
    if v_event.what = 1 then
      v_tx_id := pg_catalog.gen_random_uuid();
      update public.credit_grants set activated = true, transaction_id = v_tx_id
       where grant_id = v_grant.grant_id;
      perform credits_private.record(
        p_user_id, 'grant', v_grant.amount, v_grant.idempotency_key, v_grant.fingerprint,
        v_grant.description, v_grant.metadata, array[v_grant.grant_id], array[v_grant.amount],
        p_transaction_id => v_tx_id);
    else
      if v_grant.pinned > 0 then
        -- Reservations pin only grants that outlive them: this cannot happen.
        raise exception 'grant % expires with % credits pinned', v_grant.grant_id,
          v_grant.pinned;
      end if;
      update public.credit_grants set remaining = 0, expired = true
       where grant_id = v_grant.grant_id;
      if v_grant.remaining > 0 then
        perform credits_private.record(
          p_user_id, 'expire', -v_grant.remaining, null,
          credits_private.fingerprint('expire',
            pg_catalog.jsonb_build_object('grant_id', v_grant.grant_id)),
          'expired credits', pg_catalog.jsonb_build_object('grant_id', v_grant.grant_id::text),
          array[v_grant.grant_id], array[v_grant.remaining]);
      end if;
    end if;
  end loop;
  update public.credit_profiles set next_settle_at = credits_private.next_due(p_user_id)
   where user_id = p_user_id;
end
$$;

-- Locks the user's profile for this transaction (serialising their money operations), after
-- settling whatever of theirs has fallen due. CR003 when there is no profile.
create or replace function credits_private.lock_profile(p_user_id uuid)
returns public.credit_profiles
language plpgsql
set search_path = ''
as $$
declare
  v_profile public.credit_profiles;
  v_now timestamptz;
  v_touched text;
begin
  select * into v_profile from public.credit_profiles where user_id = p_user_id for update;
  if not found then
    raise exception using errcode = 'CR003', message = 'no credit profile for this user';
  end if;
  -- (credits_private.touching_profile, inline: every money call passes here.)
  v_touched := coalesce(pg_catalog.current_setting('credits.touched_profiles', true), '');
  if pg_catalog.strpos(v_touched, p_user_id::text) = 0 then
    perform pg_catalog.set_config(
      'credits.touched_profiles', v_touched || ' ' || p_user_id::text, true);
  end if;
  if v_profile.next_settle_at is not null then
    -- (credits_private.now(), read here directly: this runs as the owner.)
    v_now := pg_catalog.now() + (select c."offset" from credits_private.clock c);
    if v_profile.next_settle_at <= v_now then
      perform credits_private.settle(p_user_id, v_now);
      select * into v_profile from public.credit_profiles where user_id = p_user_id;
    end if;
  end if;
  return v_profile;
end
$$;

-- Settles what is due for a user whose profile the caller has locked (the generation worker's
-- claim locks it with `skip locked` itself). Kept under its old name, which the claim calls.
create or replace function credits_private.expire_holds(p_user_id uuid) returns void
language plpgsql
set search_path = ''
as $$
declare
  v_due timestamptz;
  v_now timestamptz;
begin
  select next_settle_at into v_due from public.credit_profiles where user_id = p_user_id;
  if v_due is not null then
    v_now := credits_private.now();
    if v_due <= v_now then
      perform credits_private.settle(p_user_id, v_now);
    end if;
  end if;
end
$$;

-- The earlier ledger entry made with this key, if any; a different request under the same key
-- (a hold's, a grant's or a void's key too) is CR002. The caller holds the profile's row lock.
create or replace function credits_private.replay(
  p_user_id uuid, p_idempotency_key text, p_fingerprint text
) returns public.credit_transactions
language plpgsql
set search_path = ''
as $$
declare
  v_tx public.credit_transactions;
begin
  select * into v_tx from public.credit_transactions
   where user_id = p_user_id and idempotency_key = p_idempotency_key;
  if found then
    -- Keys are unique across entries, holds and grants (each is judged here before it is
    -- used), so an entry found is the only use of the key.
    if v_tx.fingerprint <> p_fingerprint then
      perform credits_private.key_reused();
    end if;
  elsif exists (select 1 from public.credit_holds
                 where user_id = p_user_id and idempotency_key = p_idempotency_key)
     or exists (select 1 from public.credit_grants
                 where user_id = p_user_id and idempotency_key = p_idempotency_key)
     or exists (select 1 from public.credit_grants
                 where user_id = p_user_id and void_idempotency_key = p_idempotency_key) then
    perform credits_private.key_reused();
  end if;
  return v_tx;
end
$$;

-- A hold's state by time.
create or replace function credits_private.hold_json(h public.credit_holds) returns jsonb
language sql stable
set search_path = ''
as $$
  select pg_catalog.jsonb_build_object(
    'hold_id', h.hold_id,
    'user_id', h.user_id,
    'amount', h.amount,
    'state', case when h.state = 'pending' and h.expires_at <= credits_private.now()
                  then 'expired' else h.state end,
    'expire_time', h.expires_at,
    'create_time', h.created_at,
    'idempotency_key', h.idempotency_key,
    'description', h.description)
$$;

-- Sets `p_amount` aside for spending of scope `p_scope` until `p_expires_at`: a pending hold
-- pinning credits of the grants that last that long, in burn-down order; CR001 when they do
-- not cover it. The caller holds the profile's row lock, settled, and has judged the key.
create function credits_private.hold(
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
    user_id, amount, idempotency_key, fingerprint, description, expires_at, available_after)
  values (
    p_user_id, p_amount, p_idempotency_key, p_fingerprint, coalesce(p_description, ''),
    p_expires_at, p_available_after)
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

-- Captures `p_amount` of the pending hold `p_hold` (locked, its profile locked) and releases
-- the rest: one CAPTURE entry naming the hold. Returns the capture's result with the settled
-- hold (the balance after a companion VOID entry, if there is one).
create or replace function credits_private.settle_hold(
  p_hold public.credit_holds, p_amount bigint, p_idempotency_key text, p_fingerprint text
) returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_tx public.credit_transactions;
  v_hold public.credit_holds;
begin
  v_tx := credits_private.close_hold(
    p_hold.hold_id, 'captured', p_amount, p_idempotency_key, p_fingerprint);
  select * into v_hold from public.credit_holds where hold_id = p_hold.hold_id;
  return pg_catalog.jsonb_build_object(
    'transaction', credits_private.transaction_json(v_tx),
    'balance', (select balance from public.credit_profiles where user_id = v_hold.user_id),
    'replayed', false,
    'hold', credits_private.hold_json(v_hold));
end
$$;

-- Releases the pending hold `p_hold_id` (its profile locked); returns it.
create or replace function credits_private.release_hold(p_hold_id uuid)
returns public.credit_holds
language plpgsql
set search_path = ''
as $$
declare
  v_hold public.credit_holds;
begin
  perform credits_private.close_hold(p_hold_id, 'released', 0, null, null);
  select * into v_hold from public.credit_holds where hold_id = p_hold_id;
  return v_hold;
end
$$;

-- Adds a grant made at `p_now`: activated with its GRANT entry at once if it is already
-- effective, else pending (counting nowhere) until the settlement that finds it due. The
-- caller holds the profile's row lock (or has just made the profile) and judged the key.
create function credits_private.add_grant(
  p_user_id uuid, p_amount bigint, p_idempotency_key text, p_fingerprint text,
  p_description text, p_metadata jsonb, p_category text, p_priority integer, p_scopes text[],
  p_effective_at timestamptz, p_expires_at timestamptz, p_now timestamptz
) returns public.credit_grants
language plpgsql
set search_path = ''
as $$
declare
  v_active boolean := p_effective_at <= p_now;
  v_tx_id uuid;
  v_grant public.credit_grants;
begin
  if v_active then
    v_tx_id := pg_catalog.gen_random_uuid();
  end if;
  insert into public.credit_grants (
    user_id, amount, remaining, category, priority, scopes, effective_at, expires_at,
    activated, transaction_id, idempotency_key, fingerprint, description, metadata, created_at)
  values (
    p_user_id, p_amount, p_amount, p_category, p_priority, p_scopes, p_effective_at,
    p_expires_at, v_active, v_tx_id, p_idempotency_key, p_fingerprint,
    coalesce(p_description, ''), coalesce(p_metadata, '{}'::jsonb), p_now)
  returning * into v_grant;
  if v_active then
    perform credits_private.record(
      p_user_id, 'grant', p_amount, p_idempotency_key, p_fingerprint, p_description,
      p_metadata, array[v_grant.grant_id], array[p_amount], p_transaction_id => v_tx_id,
      p_settle_at => p_expires_at);
  else
    update public.credit_profiles set next_settle_at = least(next_settle_at, p_effective_at)
     where user_id = p_user_id;
  end if;
  return v_grant;
end
$$;

-- A grant's state at `p_now`, by time (whatever settlement has written yet).
create function credits_private.grant_state(g public.credit_grants, p_now timestamptz)
returns text
language sql immutable
set search_path = ''
as $$
  select case
    when g.voided_at is not null then 'voided'
    when not g.activated and g.effective_at > p_now then 'pending'
    when g.expired or g.expires_at <= p_now then 'expired'
    when g.remaining = 0 then 'depleted'
    else 'active'
  end
$$;

-- The pinned credits of grant `p_grant_id` whose holds are past their expiry at `p_now`
-- (free by time, not yet settled).
create function credits_private.due_pins(p_grant_id uuid, p_now timestamptz) returns bigint
language sql stable
set search_path = ''
as $$
  select coalesce(pg_catalog.sum(q.amount), 0)::bigint
    from public.credit_hold_pins q
    join public.credit_holds h on h.hold_id = q.hold_id
   where q.grant_id = p_grant_id and h.state = 'pending' and h.expires_at <= p_now
$$;

-- A grant as the API shows it at `p_now`: its state and remainder by time (an expired grant
-- has nothing left; a voided one only what pending holds still pin of it).
create function credits_private.grant_json(g public.credit_grants, p_now timestamptz)
returns jsonb
language sql stable
set search_path = ''
as $$
  select pg_catalog.jsonb_build_object(
    'grant_id', g.grant_id,
    'user_id', g.user_id,
    'amount', g.amount,
    'remaining', case s.state
                   when 'expired' then 0
                   when 'voided' then case when g.activated
                     then g.remaining - credits_private.due_pins(g.grant_id, p_now) else 0 end
                   else g.remaining end,
    'category', g.category,
    'priority', g.priority,
    'scopes', pg_catalog.to_jsonb(g.scopes),
    'effective_time', g.effective_at,
    'expire_time', g.expires_at,
    'state', s.state,
    'transaction_id', g.transaction_id,
    'create_time', g.created_at,
    'seq', g.seq)
    from (select credits_private.grant_state(g, p_now) as state) s
$$;

-- The user's balance and held credits at `p_now` as if everything due were settled (for reads,
-- which write nothing). Runs with the caller's rights.
create function credits_private.settled_totals(
  p_user_id uuid, p_now timestamptz, out balance bigint, out held bigint
)
language plpgsql stable
set search_path = ''
as $$
begin
  select coalesce(pg_catalog.sum(h.amount), 0) into held
    from public.credit_holds h
   where h.user_id = p_user_id and h.state = 'pending' and h.expires_at > p_now;
  select coalesce(pg_catalog.sum(case
           when g.voided_at is not null then case when g.activated
             then g.remaining - credits_private.due_pins(g.grant_id, p_now) else 0 end
           when g.expired or g.expires_at <= p_now then 0
           when g.activated or g.effective_at <= p_now then g.remaining
           else 0 end), 0)
    into balance
    from public.credit_grants g
   where g.user_id = p_user_id and g.live;
end
$$;

-- What spending of scope `p_scope` may use at `p_now`, as if everything due were settled: the
-- unpinned remainder of the grants eligible for it. `p_due`: something is due (else the stored
-- state is exact and the time checks are moot). Runs with the caller's rights.
create function credits_private.available_for(
  p_user_id uuid, p_scope text, p_now timestamptz, p_due boolean
) returns bigint
language plpgsql stable
set search_path = ''
as $$
begin
  return (
    select coalesce(pg_catalog.sum(g.remaining - g.pinned
             + case when p_due and g.pinned > 0
                    then credits_private.due_pins(g.grant_id, p_now) else 0 end), 0)::bigint
      from public.credit_grants g
     where g.user_id = p_user_id and g.live and not g.expired and g.voided_at is null
       and (g.scopes = '{}' or p_scope = any (g.scopes))
       and (g.activated or (p_due and g.effective_at <= p_now))
       and (not p_due or g.expires_at is null or g.expires_at > p_now));
end
$$;

-- The soonest expiry among the user's active grants with credits left at `p_now`, and how much
-- leaves then (null and 0 when none will). Runs with the caller's rights.
create function credits_private.next_expiry(
  p_user_id uuid, p_now timestamptz, out expire_time timestamptz, out amount bigint
)
language plpgsql stable
set search_path = ''
as $$
begin
  select g.expires_at, pg_catalog.sum(g.remaining)::bigint into expire_time, amount
    from public.credit_grants g
   where g.user_id = p_user_id and g.live and g.voided_at is null and not g.expired
     and g.remaining > 0 and g.expires_at > p_now
     and (g.activated or g.effective_at <= p_now)
   group by g.expires_at
   order by g.expires_at
   limit 1;
  amount := coalesce(amount, 0);
end
$$;

-- Creates the user's profile if missing, with the signup credits as a promotional, unscoped
-- grant of priority 50 that expires after the configured ttl (null: never).
create or replace function credits_private.create_profile(p_user_id uuid, p_email text)
returns boolean
language plpgsql
set search_path = ''
as $$
declare
  v_settings credits_private.settings;
  v_created boolean;
  v_now timestamptz;
begin
  select * into v_settings from credits_private.settings;
  insert into public.credit_profiles (user_id, email)
  values (p_user_id, coalesce(p_email, ''))
  on conflict (user_id) do nothing;
  v_created := found;
  if v_created and v_settings.signup_credits > 0 then
    perform credits_private.touching_profile(p_user_id);
    v_now := credits_private.now();
    perform credits_private.add_grant(
      p_user_id, v_settings.signup_credits, null, credits_private.fingerprint('signup', '{}'),
      'signup credits', '{}', 'promotional', 50, '{}', v_now,
      v_now + pg_catalog.make_interval(secs => v_settings.signup_ttl_seconds), v_now);
  end if;
  return v_created;
end
$$;

-- The helpers these replace: they moved balances without grants.
drop function credits_private.move(text, uuid, bigint, text, text, jsonb);
drop function credits_private.append(uuid, text, bigint, text, text, text, jsonb, uuid, uuid);
drop function credits_private.require_available(bigint, bigint);

revoke execute on all functions in schema credits_private from public;
-- What the functions that run with the caller's rights (reads) use.
grant execute on function
  credits_private.transaction_json(public.credit_transactions, jsonb),
  credits_private.grant_state(public.credit_grants, timestamptz),
  credits_private.due_pins(uuid, timestamptz),
  credits_private.grant_json(public.credit_grants, timestamptz),
  credits_private.settled_totals(uuid, timestamptz),
  credits_private.available_for(uuid, text, timestamptz, boolean),
  credits_private.next_expiry(uuid, timestamptz),
  credits_private.check_scope(text),
  credits_private.invalid(text, text),
  credits_private.check_amount(bigint)
  to authenticated, service_role;
