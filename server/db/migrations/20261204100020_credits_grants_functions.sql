-- Credit grants, part 3 of 3: the public functions.
--
-- New: credit_check, credit_void_grant, credit_list_grants. Replaced with new parameters (the
-- old overloads are dropped, so that no call is ambiguous; every new parameter has a default,
-- so calls naming only the old ones still work): credit_configure (the signup credits' ttl),
-- credit_grant (expiry, effective time, priority, category, scopes), credit_debit and
-- credit_reserve (a scope), credit_debit_each (a scope per call, `p_scopes`). Redefined
-- with the same signature: credit_get_profile (next_expire_time, next_expire_amount; counted
-- by time), credit_refund (back into the grants the credits came from), credit_expire_holds
-- (settles grants too), credit_create_generation (the model is the scope; the clock).
-- credit_capture, credit_release and the generation lifecycle are as before: the helpers they
-- call (part 2) now pin, consume and free grants' credits.
--
-- Replays: requests without the new parameters fingerprint as before, so keys used before
-- grants existed still replay (a grant replayed from then has no grant: "grant" is null).

-- The deployment's settings (service only; called by the service at start-up): the signup
-- credits, and how long they last (null: for ever).
drop function public.credit_configure(bigint);
create function public.credit_configure(
  p_signup_credits bigint, p_signup_ttl_seconds bigint default null
) returns void
language plpgsql
security definer
set search_path = ''
as $$
begin
  if p_signup_credits is null or p_signup_credits < 0 then
    perform credits_private.invalid('signup_credits', 'must be a whole number >= 0');
  end if;
  if p_signup_ttl_seconds is not null
     and p_signup_ttl_seconds not between 1 and 100::bigint * 366 * 86400 then
    perform credits_private.invalid(
      'signup_ttl_seconds', 'must be between 1 second and 100 years (null: never)');
  end if;
  update credits_private.settings
     set signup_credits = p_signup_credits, signup_ttl_seconds = p_signup_ttl_seconds;
end
$$;

-- The user's profile, counted by time: grants that took effect count, expired grants and
-- holds past their expiry do not, whatever has been settled yet. `next_expire_time` is the
-- soonest expiry among active grants with credits left (null when none), `next_expire_amount`
-- what leaves the balance then (0 when none). CR003 when there is no profile, or when
-- row-level security hides it: runs with the caller's rights, so policies apply.
create or replace function public.credit_get_profile(p_user_id uuid) returns jsonb
language plpgsql stable
set search_path = ''
as $$
declare
  v_profile public.credit_profiles;
  v_now timestamptz;
  v_balance bigint;
  v_held bigint;
  v_next_time timestamptz;
  v_next_amount bigint := 0;
begin
  select * into v_profile from public.credit_profiles where user_id = p_user_id;
  if not found then
    raise exception using errcode = 'CR003', message = 'no credit profile for this user';
  end if;
  v_balance := v_profile.balance;
  v_held := v_profile.held;
  -- Nothing ever falls due for a user without next_settle_at: no expiring grant either.
  if v_profile.next_settle_at is not null then
    v_now := credits_private.now();
    if v_profile.next_settle_at <= v_now then
      select t.balance, t.held into v_balance, v_held
        from credits_private.settled_totals(p_user_id, v_now) t;
    end if;
    select e.expire_time, e.amount into v_next_time, v_next_amount
      from credits_private.next_expiry(p_user_id, v_now) e;
  end if;
  return pg_catalog.jsonb_build_object(
    'user_id', v_profile.user_id,
    'email', v_profile.email,
    'balance', v_balance,
    'held', v_held,
    'available', v_balance - v_held,
    'create_time', v_profile.created_at,
    'update_time', v_profile.updated_at,
    'next_expire_time', v_next_time,
    'next_expire_amount', v_next_amount);
end
$$;

-- Whether `p_amount` of spending with scope `p_scope` ('' unscoped) is available now, counted
-- by time as credit_debit would spend it: {sufficient, available, shortfall}. Changes nothing.
-- CR003 when there is no profile or it is hidden: runs with the caller's rights.
create function public.credit_check(p_user_id uuid, p_amount bigint, p_scope text default '')
returns jsonb
language plpgsql stable
set search_path = ''
as $$
declare
  v_scope text := coalesce(p_scope, '');
  v_due timestamptz;
  v_now timestamptz;
  v_available bigint;
begin
  perform credits_private.check_amount(p_amount);
  perform credits_private.check_scope(v_scope);
  select next_settle_at into v_due from public.credit_profiles where user_id = p_user_id;
  if not found then
    raise exception using errcode = 'CR003', message = 'no credit profile for this user';
  end if;
  if v_due is not null then
    v_now := credits_private.now();
  end if;
  v_available := credits_private.available_for(
    p_user_id, v_scope, v_now, coalesce(v_due <= v_now, false));
  return pg_catalog.jsonb_build_object(
    'sufficient', v_available >= p_amount,
    'available', v_available,
    'shortfall', greatest(p_amount - v_available, 0));
end
$$;

-- Spends `p_amount` now, drawing on the grants spending of scope `p_scope` may use, in
-- burn-down order, if they cover it (CR001 otherwise, naming the scope). Idempotent by key.
drop function public.credit_debit_each(uuid[], bigint[], text[], text[], jsonb[]);
drop function public.credit_debit(uuid, bigint, text, text, jsonb);
create function public.credit_debit(
  p_user_id uuid, p_amount bigint, p_idempotency_key text, p_description text default '',
  p_metadata jsonb default '{}', p_scope text default ''
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_scope text := coalesce(p_scope, '');
  v_fingerprint text;
  v_tx public.credit_transactions;
  v_grant record;
  v_left bigint := p_amount;
  v_available bigint := 0;
  v_take bigint;
  v_grants uuid[];
  v_amounts bigint[];
begin
  perform credits_private.assert_may_act_for(p_user_id);
  -- The checks of credits_private.check_amount, check_key and check_scope, called only to
  -- refuse: this is the hottest call of all.
  if p_amount is null or p_amount <= 0 then
    perform credits_private.check_amount(p_amount);
  end if;
  if p_idempotency_key is null or pg_catalog.char_length(p_idempotency_key) not between 1 and 255
     or p_idempotency_key ~ '[[:cntrl:]]' then
    perform credits_private.check_key(p_idempotency_key);
  end if;
  if v_scope <> '' then
    perform credits_private.check_scope(v_scope);
  end if;
  -- credits_private.fingerprint, inline. Unscoped: the fingerprint of before scopes, so that
  -- older keys replay.
  v_fingerprint := pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(
    'debit:' || (pg_catalog.jsonb_build_object(
       'amount', p_amount, 'description', coalesce(p_description, ''),
       'metadata', coalesce(p_metadata, '{}'::jsonb))
     || case when v_scope = '' then '{}'::jsonb
             else pg_catalog.jsonb_build_object('scope', v_scope) end)::text,
    'UTF8')), 'hex');
  perform credits_private.lock_profile(p_user_id);
  v_tx := credits_private.replay(p_user_id, p_idempotency_key, v_fingerprint);
  if v_tx.transaction_id is not null then
    return credits_private.replayed(v_tx);
  end if;
  -- Burn-down (as credits_private.pick chooses). The common case first: the first grant in
  -- burn-down order covers it all.
  update public.credit_grants g set remaining = g.remaining - p_amount
   where g.grant_id = (
           select e.grant_id from public.credit_grants e
            where e.user_id = p_user_id and e.live and e.activated and not e.expired
              and e.voided_at is null and e.remaining > e.pinned
              and (e.scopes = '{}' or v_scope = any (e.scopes))
            order by e.priority, e.scopes = '{}', e.expires_at nulls last, e.created_at, e.seq
            limit 1)
     and g.remaining - g.pinned >= p_amount
  returning array[g.grant_id], array[p_amount] into v_grants, v_amounts;
  if v_grants is not null then
    v_tx := credits_private.record(
      p_user_id, 'debit', -p_amount, p_idempotency_key, v_fingerprint, p_description,
      p_metadata, v_grants, v_amounts, p_verify => true);
    return pg_catalog.jsonb_build_object(
      'transaction', credits_private.transaction_json(
        v_tx, credits_private.allocations_json(v_grants, v_amounts)),
      'balance', v_tx.balance_after, 'replayed', false);
  end if;
  -- Otherwise grant by grant, as they come; if they do not cover the debit, CR001 undoes it
  -- all.
  v_grants := '{}';
  v_amounts := '{}';
  for v_grant in
    select g.grant_id, g.remaining - g.pinned as free
      from public.credit_grants g
     where g.user_id = p_user_id and g.live and g.activated and not g.expired
       and g.voided_at is null and g.remaining > g.pinned
       and (g.scopes = '{}' or v_scope = any (g.scopes))
     order by g.priority, g.scopes = '{}', g.expires_at nulls last, g.created_at, g.seq
  loop
    v_available := v_available + v_grant.free;
    v_take := least(v_grant.free, v_left);
    update public.credit_grants set remaining = remaining - v_take
     where grant_id = v_grant.grant_id;
    v_grants := v_grants || v_grant.grant_id;
    v_amounts := v_amounts || v_take;
    v_left := v_left - v_take;
    exit when v_left = 0;
  end loop;
  if v_left > 0 then
    perform credits_private.require_available(p_amount, v_available, v_scope);
  end if;
  v_tx := credits_private.record(
    p_user_id, 'debit', -p_amount, p_idempotency_key, v_fingerprint, p_description, p_metadata,
    v_grants, v_amounts, p_verify => true);
  return pg_catalog.jsonb_build_object(
    'transaction', credits_private.transaction_json(
      v_tx, credits_private.allocations_json(v_grants, v_amounts)),
    'balance', v_tx.balance_after, 'replayed', false);
end
$$;

-- The batched form (see 20261201000000_credits_batched_calls.sql), with a scope per call
-- (`p_scopes`; null: every call unscoped).
create function public.credit_debit_each(
  p_user_id uuid[], p_amount bigint[], p_idempotency_key text[], p_description text[],
  p_metadata jsonb[], p_scopes text[] default null
) returns table (
  ordinal integer, result jsonb, error_code text, error_message text, error_detail text
)
language plpgsql
set search_path = ''
as $$
declare
  v_call record;
begin
  perform credits_private.check_batch(pg_catalog.cardinality(p_user_id));
  for v_call in
    select c.*
      from unnest(p_user_id, p_amount, p_idempotency_key, p_description, p_metadata, p_scopes)
           with ordinality
           as c(user_id, amount, idempotency_key, description, metadata, scope, ordinal)
     order by c.user_id, c.ordinal
  loop
    select v_call.ordinal, null, null, null, null
      into ordinal, result, error_code, error_message, error_detail;
    begin
      result := public.credit_debit(
        v_call.user_id, v_call.amount, v_call.idempotency_key, v_call.description,
        v_call.metadata, coalesce(v_call.scope, ''));
    exception when others then
      get stacked diagnostics error_code = returned_sqlstate, error_message = message_text,
        error_detail = pg_exception_detail;
    end;
    return next;
  end loop;
end
$$;

-- A grant's result: its ledger entry (null while pending), the grant as it is now, and the
-- balance after its entry (the current balance while pending).
create function credits_private.grant_result(p_grant public.credit_grants, p_replayed boolean)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_tx public.credit_transactions;
begin
  select * into v_tx from public.credit_transactions
   where transaction_id = p_grant.transaction_id;
  return pg_catalog.jsonb_build_object(
    'transaction', case when v_tx.transaction_id is not null
                        then credits_private.transaction_json(v_tx) end,
    'grant', credits_private.grant_json(p_grant, credits_private.now()),
    'balance', coalesce(v_tx.balance_after, (select balance from public.credit_profiles
                                               where user_id = p_grant.user_id)),
    'replayed', p_replayed);
end
$$;

-- Gives credits to a user (service only): a grant of `p_amount`, taking effect at
-- `p_effective_time` (null: now; until then it counts nowhere and has no ledger entry) and
-- expiring at `p_expire_time` (null: never), spent in the order of `p_priority` (0..100, lower
-- first), paying only for spending of `p_scopes` (empty: anything). Idempotent by key: a replay
-- returns the same grant (and its entry once written). CR008 names a field that is wrong.
drop function public.credit_grant(uuid, bigint, text, text, jsonb);
create function public.credit_grant(
  p_user_id uuid, p_amount bigint, p_idempotency_key text, p_description text default '',
  p_metadata jsonb default '{}', p_expire_time timestamptz default null,
  p_effective_time timestamptz default null, p_priority integer default 50,
  p_category text default 'paid', p_scopes text[] default '{}'
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_scopes text[];
  v_fingerprint text;
  v_profile public.credit_profiles;
  v_grant public.credit_grants;
  v_tx public.credit_transactions;
  v_now timestamptz;
  v_effective timestamptz;
  v_pending numeric;
begin
  perform credits_private.check_amount(p_amount);
  perform credits_private.check_key(p_idempotency_key);
  if p_priority is null or p_priority not between 0 and 100 then
    perform credits_private.invalid('priority', 'must be between 0 and 100');
  end if;
  if p_category is null or p_category not in ('paid', 'promotional') then
    perform credits_private.invalid('category', 'must be paid or promotional');
  end if;
  v_scopes := credits_private.normal_scopes(p_scopes);
  -- Only what a request sets beyond the plain grant enters the fingerprint, so that grants
  -- made before grants had these replay as before. Times as epoch seconds: the same whatever
  -- the session's time zone.
  v_fingerprint := credits_private.fingerprint('grant', pg_catalog.jsonb_build_object(
      'amount', p_amount, 'description', coalesce(p_description, ''),
      'metadata', coalesce(p_metadata, '{}'::jsonb))
    || pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
      'expire_time', pg_catalog.date_part('epoch', p_expire_time),
      'effective_time', pg_catalog.date_part('epoch', p_effective_time),
      'priority', case when p_priority <> 50 then p_priority end,
      'category', case when p_category <> 'paid' then p_category end,
      'scopes', case when pg_catalog.cardinality(v_scopes) > 0
                     then pg_catalog.to_jsonb(v_scopes) end)));
  v_profile := credits_private.lock_profile(p_user_id);
  select * into v_grant from public.credit_grants
   where user_id = p_user_id and idempotency_key = p_idempotency_key;
  if found then
    if v_grant.fingerprint <> v_fingerprint then
      perform credits_private.key_reused();
    end if;
    return credits_private.grant_result(v_grant, true);
  end if;
  v_tx := credits_private.replay(p_user_id, p_idempotency_key, v_fingerprint);
  if v_tx.transaction_id is not null then
    return credits_private.replayed(v_tx) || '{"grant": null}'::jsonb;
  end if;
  -- Times are judged after the key: a replay is answered whatever time it is now.
  v_now := credits_private.now();
  v_effective := coalesce(p_effective_time, v_now);
  if p_expire_time is not null and (p_expire_time <= v_effective or p_expire_time <= v_now) then
    perform credits_private.invalid(
      'expire_time', 'must be after the effective time and after now');
  end if;
  -- Grants still pending will count too, once effective.
  select coalesce(pg_catalog.sum(g.amount), 0) into v_pending
    from public.credit_grants g
   where g.user_id = p_user_id and g.live and not g.activated and g.voided_at is null;
  perform credits_private.require_headroom(
    least(v_profile.balance + v_pending, 9223372036854775807)::bigint, p_amount);
  v_grant := credits_private.add_grant(
    p_user_id, p_amount, p_idempotency_key, v_fingerprint, p_description, p_metadata,
    p_category, p_priority, v_scopes, v_effective, p_expire_time, v_now);
  return credits_private.grant_result(v_grant, false);
end
$$;

-- A void's result: its VOID entry (null when nothing unpinned was left, or the grant was
-- pending), the grant as it is now, and the balance after the entry (else the current one).
create function credits_private.void_result(p_grant public.credit_grants, p_replayed boolean)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_tx public.credit_transactions;
begin
  select * into v_tx from public.credit_transactions
   where user_id = p_grant.user_id and idempotency_key = p_grant.void_idempotency_key;
  return pg_catalog.jsonb_build_object(
    'transaction', case when v_tx.transaction_id is not null
                        then credits_private.transaction_json(v_tx) end,
    'grant', credits_private.grant_json(p_grant, credits_private.now()),
    'balance', coalesce(v_tx.balance_after, (select balance from public.credit_profiles
                                               where user_id = p_grant.user_id)),
    'replayed', p_replayed);
end
$$;

-- Voids a grant (service only): its unpinned remainder leaves the balance now in a VOID entry;
-- what pending holds pin of it stays until they settle (a capture spends it, a release or an
-- expiry voids it then). A pending grant is voided without an entry and never takes effect.
-- CR012 for an unknown grant (or another user's, when `p_user_id` names one); CR013 unless it
-- is active or pending. Idempotent by key (kept on the grant; the key may not be one another
-- request of the user used: CR002).
create function public.credit_void_grant(
  p_grant_id uuid, p_idempotency_key text, p_description text default '',
  p_user_id uuid default null
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_user uuid;
  v_grant public.credit_grants;
  v_fingerprint text := credits_private.fingerprint('void', pg_catalog.jsonb_build_object(
    'grant_id', p_grant_id, 'description', coalesce(p_description, '')));
  v_state text;
  v_now timestamptz;
  v_free bigint;
begin
  perform credits_private.check_key(p_idempotency_key);
  select user_id into v_user from public.credit_grants where grant_id = p_grant_id;
  if v_user is null or v_user is distinct from coalesce(p_user_id, v_user) then
    raise exception using errcode = 'CR012', message = 'grant not found';
  end if;
  perform credits_private.lock_profile(v_user);
  select * into v_grant from public.credit_grants where grant_id = p_grant_id for update;
  if v_grant.void_idempotency_key = p_idempotency_key then
    if v_grant.void_fingerprint <> v_fingerprint then
      perform credits_private.key_reused();
    end if;
    return credits_private.void_result(v_grant, true);
  end if;
  if (credits_private.replay(v_user, p_idempotency_key, v_fingerprint)).transaction_id
     is not null then
    perform credits_private.key_reused();
  end if;
  v_now := credits_private.now();
  v_state := credits_private.grant_state(v_grant, v_now);
  if v_state not in ('active', 'pending') then
    raise exception using errcode = 'CR013', message = 'the grant is not active: ' || v_state,
      detail = pg_catalog.jsonb_build_object('state', v_state)::text;
  end if;
  v_free := case when v_grant.activated then v_grant.remaining - v_grant.pinned else 0 end;
  update public.credit_grants
     set voided_at = v_now, void_idempotency_key = p_idempotency_key,
         void_fingerprint = v_fingerprint,
         remaining = case when activated then pinned else remaining end
   where grant_id = p_grant_id
  returning * into v_grant;
  if v_free > 0 then
    perform credits_private.record(
      v_user, 'void', -v_free, p_idempotency_key, v_fingerprint, p_description,
      pg_catalog.jsonb_build_object('grant_id', p_grant_id::text),
      array[p_grant_id], array[v_free]);
  end if;
  return credits_private.void_result(v_grant, false);
end
$$;

-- One page of the user's grants, newest first (seq desc), after `p_before_seq` (null: from
-- the newest), in the states `p_states` (null: all; states by time). CR003 when the profile is
-- missing or hidden; runs with the caller's rights.
create function public.credit_list_grants(
  p_user_id uuid, p_limit integer, p_before_seq bigint default null,
  p_states text[] default null
) returns jsonb
language plpgsql stable
set search_path = ''
as $$
declare
  v_now timestamptz;
begin
  if not exists (select 1 from public.credit_profiles where user_id = p_user_id) then
    raise exception using errcode = 'CR003', message = 'no credit profile for this user';
  end if;
  if exists (select 1 from unnest(p_states) s
              where s is null
                 or s not in ('pending', 'active', 'depleted', 'expired', 'voided')) then
    perform credits_private.invalid(
      'states', 'each must be pending, active, depleted, expired or voided');
  end if;
  v_now := credits_private.now();
  return (
    select coalesce(
             pg_catalog.jsonb_agg(credits_private.grant_json(g, v_now) order by g.seq desc),
             '[]'::jsonb)
      from (select * from public.credit_grants x
             where x.user_id = p_user_id
               and (p_before_seq is null or x.seq < p_before_seq)
               and (p_states is null
                    or credits_private.grant_state(x, v_now) = any (p_states))
             order by x.seq desc
             limit p_limit) g);
end
$$;

-- Sets credits aside for `p_ttl_seconds` for spending of scope `p_scope`, pinning credits of
-- the grants that last as long as the hold, in burn-down order (CR001 if they do not cover it,
-- naming the scope). Idempotent by key: a replay returns the original result, the hold as it
-- was created (pending) and the available credits the reservation returned.
drop function public.credit_reserve(uuid, bigint, text, integer, text);
create function public.credit_reserve(
  p_user_id uuid, p_amount bigint, p_idempotency_key text, p_ttl_seconds integer,
  p_description text default '', p_scope text default ''
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_scope text := coalesce(p_scope, '');
  v_fingerprint text;
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
  perform credits_private.check_scope(v_scope);
  v_fingerprint := credits_private.fingerprint('reserve', pg_catalog.jsonb_build_object(
    'amount', p_amount, 'ttl_seconds', p_ttl_seconds,
    'description', coalesce(p_description, ''))
    || case when v_scope = '' then '{}'::jsonb
            else pg_catalog.jsonb_build_object('scope', v_scope) end);
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
  if (credits_private.replay(p_user_id, p_idempotency_key, v_fingerprint)).transaction_id
     is not null then
    perform credits_private.key_reused();
  end if;
  v_available := v_profile.balance - v_profile.held - p_amount;
  v_hold := credits_private.hold(
    p_user_id, p_amount, p_idempotency_key, v_fingerprint, p_description,
    credits_private.now() + pg_catalog.make_interval(secs => p_ttl_seconds), v_scope,
    v_available);
  return pg_catalog.jsonb_build_object(
    'hold', credits_private.hold_json(v_hold), 'available', v_available, 'replayed', false);
end
$$;

-- Returns credits of a debit or capture (service only): `p_amount` of it, or 0 for what is
-- left of it, as 20261204002000_credits_balance_ceiling.sql defined it (a NULL `p_user_id`
-- acts on the transaction's owner; the headroom judged before anything is written). The credits
-- go back to the grants they came from, the one drawn last first, each up to what was drawn
-- from it and not refunded yet; credits spent before grants existed come back as a new paid,
-- never-expiring grant. One REFUND entry with those allocations; then the part that went to
-- grants expired or voided since leaves again at once (an EXPIRE, then a VOID entry): a refund
-- never revives expired or voided credits. The result's balance is after all of them.
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
  v_now timestamptz;
  v_tx_id uuid := pg_catalog.gen_random_uuid();
  v_grants uuid[];
  v_amounts bigint[];
  v_covered bigint;
  v_new_grant uuid;
  v_settle_at timestamptz;
  v_dead record;
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
  v_now := credits_private.now();

  -- What each grant the transaction drew on has not had back yet, the last drawn first.
  select pg_catalog.array_agg(r.grant_id order by r.ordinal desc)
           filter (where r.through - r.open < v_amount),
         pg_catalog.array_agg(least(r.open, v_amount - (r.through - r.open))
                              order by r.ordinal desc)
           filter (where r.through - r.open < v_amount),
         coalesce(pg_catalog.sum(least(r.open, v_amount - (r.through - r.open)))
                    filter (where r.through - r.open < v_amount), 0)::bigint
    into v_grants, v_amounts, v_covered
    from (select o.grant_id, o.ordinal, o.open,
                 (pg_catalog.sum(o.open) over (
                    order by o.ordinal desc
                    rows between unbounded preceding and current row))::bigint as through
            from (select d.grant_id, d.ordinal,
                         d.amount - coalesce((
                           select pg_catalog.sum(a.amount)
                             from public.credit_transactions f
                             join public.credit_allocations a
                               on a.transaction_id = f.transaction_id
                              and a.grant_id = d.grant_id
                            where f.refunded_transaction_id = p_transaction_id), 0) as open
                    from public.credit_allocations d
                   where d.transaction_id = p_transaction_id) o
           where o.open > 0) r;
  v_grants := coalesce(v_grants, '{}');
  v_amounts := coalesce(v_amounts, '{}');
  if v_amount > v_covered then
    -- Spent before grants existed: no grant to return it to.
    insert into public.credit_grants (
      user_id, amount, remaining, category, priority, scopes, effective_at, expires_at,
      activated, transaction_id, fingerprint, description, created_at)
    values (
      v_user, v_amount - v_covered, 0, 'paid', 50, '{}', v_now, null, true, v_tx_id,
      credits_private.fingerprint('refund',
        pg_catalog.jsonb_build_object('transaction_id', v_tx_id)),
      'refund of credits spent before grants existed', v_now)
    returning grant_id into v_new_grant;
    v_grants := v_grants || v_new_grant;
    v_amounts := v_amounts || (v_amount - v_covered);
  end if;

  -- Back into the grants that still count; a depleted one that expires falls due again.
  with back as (
    update public.credit_grants g set remaining = g.remaining + p.amount
      from unnest(v_grants, v_amounts) as p (grant_id, amount)
     where g.grant_id = p.grant_id and g.voided_at is null and not g.expired
       and (g.expires_at is null or g.expires_at > v_now)
    returning g.expires_at
  )
  select pg_catalog.min(expires_at) into v_settle_at from back;
  v_tx := credits_private.record(
    v_user, 'refund', v_amount, p_idempotency_key, v_fingerprint, p_description, '{}',
    v_grants, v_amounts, p_refunded_transaction_id => p_transaction_id,
    p_transaction_id => v_tx_id, p_settle_at => v_settle_at);

  -- The parts that went to grants that no longer count leave again at once.
  for v_dead in
    select case when g.voided_at is not null then 'void' else 'expire' end as kind,
           pg_catalog.array_agg(p.grant_id order by p.ordinal) as grants,
           pg_catalog.array_agg(p.amount order by p.ordinal) as amounts,
           pg_catalog.sum(p.amount)::bigint as total
      from unnest(v_grants, v_amounts) with ordinality as p (grant_id, amount, ordinal)
      join public.credit_grants g on g.grant_id = p.grant_id
     where g.voided_at is not null or g.expired or g.expires_at <= v_now
     group by 1
     order by 1
  loop
    perform credits_private.record(
      v_user, v_dead.kind, -v_dead.total, null,
      credits_private.fingerprint(v_dead.kind,
        pg_catalog.jsonb_build_object('refund_transaction_id', v_tx_id)),
      case v_dead.kind when 'void' then 'refunded credits of voided grants'
                       else 'refunded credits of expired grants' end,
      pg_catalog.jsonb_build_object('refund_transaction_id', v_tx_id::text),
      v_dead.grants, v_dead.amounts);
  end loop;
  return pg_catalog.jsonb_build_object(
    'transaction', credits_private.transaction_json(
      v_tx, credits_private.allocations_json(v_grants, v_amounts)),
    'balance', (select balance from public.credit_profiles where user_id = v_user),
    'replayed', false);
end
$$;

-- The sweeper (service only): settles everything due (holds past their expiry, grants that took
-- effect or expired) for up to `p_users` users per call, skipping users whose profile another
-- transaction holds (it settles them itself). Returns the users settled.
create or replace function public.credit_expire_holds(p_users integer default 100)
returns integer
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_now timestamptz := credits_private.now();
  v_user uuid;
  v_swept integer := 0;
begin
  for v_user in
    select user_id from public.credit_profiles
     where next_settle_at <= v_now
     order by next_settle_at
     limit p_users
  loop
    perform 1 from public.credit_profiles
     where user_id = v_user and next_settle_at <= v_now
       for update skip locked;
    if found then
      perform credits_private.settle(v_user, v_now);
      v_swept := v_swept + 1;
    end if;
  end loop;
  return v_swept;
end
$$;

-- As 20261202000200_credits_generation_replay.sql defined it, with the cost reserved for
-- spending of the model's scope (grants scoped to the model pay first) and the hold's expiry
-- by the clock.
create or replace function public.credit_create_generation(
  p_user_id uuid, p_model text, p_prompt text, p_parameters jsonb, p_request_id text
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_model public.credit_models;
  v_fingerprint text := credits_private.fingerprint('generation', pg_catalog.jsonb_build_object(
    'model', p_model, 'prompt', p_prompt, 'parameters', coalesce(p_parameters, '{}'::jsonb)));
  v_generation public.credit_generations;
  v_id uuid := pg_catalog.gen_random_uuid();
  v_hold public.credit_holds;
begin
  perform credits_private.assert_may_act_for(p_user_id);
  perform credits_private.check_key(p_request_id, 'request_id');
  if pg_catalog.jsonb_typeof(coalesce(p_parameters, '{}'::jsonb)) <> 'object' then
    perform credits_private.invalid('parameters', 'must be an object of strings');
  end if;
  -- The profile lock serialises every call for this user: a concurrent first call has either
  -- committed its generation before this lookup or not started it.
  perform credits_private.lock_profile(p_user_id);
  select * into v_generation from public.credit_generations
   where user_id = p_user_id and request_id = p_request_id;
  if found then
    if v_generation.fingerprint <> v_fingerprint then
      perform credits_private.key_reused();
    end if;
    return pg_catalog.jsonb_build_object(
      'generation', credits_private.generation_json(v_generation, false), 'replayed', true);
  end if;
  select * into v_model from public.credit_models where model = p_model and active;
  if not found then
    perform credits_private.invalid('model', 'is not in the catalogue');
  end if;
  -- Every attempt may run to its timeout, with a minute of backoff between attempts and five
  -- minutes of margin for queueing: the hold outlives the work it pays for.
  v_hold := credits_private.hold(
    p_user_id, v_model.cost, 'generation:' || v_id, v_fingerprint, 'generation ' || p_model,
    credits_private.now() + pg_catalog.make_interval(
      secs => v_model.max_attempts * (v_model.timeout_seconds + 60) + 300),
    p_model, null);
  insert into public.credit_generations (
    generation_id, user_id, model, prompt, parameters, cost, hold_id, request_id, fingerprint,
    max_attempts)
  values (
    v_id, p_user_id, p_model, p_prompt, coalesce(p_parameters, '{}'::jsonb), v_model.cost,
    v_hold.hold_id, p_request_id, v_fingerprint, v_model.max_attempts)
  returning * into v_generation;
  return pg_catalog.jsonb_build_object(
    'generation', credits_private.generation_json(v_generation, false), 'replayed', false);
end
$$;

-- Execute rights: nothing for public or anon; users get what they may call for themselves.
-- (`create or replace` keeps a function's rights; they are stated again for every function
-- this file defines, so that it alone says who may call them.)
revoke execute on all functions in schema credits_private from public;
revoke execute on function
  public.credit_configure(bigint, bigint),
  public.credit_get_profile(uuid),
  public.credit_check(uuid, bigint, text),
  public.credit_debit(uuid, bigint, text, text, jsonb, text),
  public.credit_debit_each(uuid[], bigint[], text[], text[], jsonb[], text[]),
  public.credit_grant(uuid, bigint, text, text, jsonb, timestamptz, timestamptz, integer, text,
                      text[]),
  public.credit_void_grant(uuid, text, text, uuid),
  public.credit_list_grants(uuid, integer, bigint, text[]),
  public.credit_reserve(uuid, bigint, text, integer, text, text),
  public.credit_refund(uuid, uuid, bigint, text, text),
  public.credit_expire_holds(integer),
  public.credit_create_generation(uuid, text, text, jsonb, text)
  from public, anon, authenticated;
grant execute on function
  public.credit_get_profile(uuid),
  public.credit_check(uuid, bigint, text),
  public.credit_debit(uuid, bigint, text, text, jsonb, text),
  public.credit_list_grants(uuid, integer, bigint, text[]),
  public.credit_reserve(uuid, bigint, text, integer, text, text),
  public.credit_create_generation(uuid, text, text, jsonb, text)
  to authenticated, service_role;
grant execute on function
  public.credit_configure(bigint, bigint),
  public.credit_debit_each(uuid[], bigint[], text[], text[], jsonb[], text[]),
  public.credit_grant(uuid, bigint, text, text, jsonb, timestamptz, timestamptz, integer, text,
                      text[]),
  public.credit_void_grant(uuid, text, text, uuid),
  public.credit_refund(uuid, uuid, bigint, text, text),
  public.credit_expire_holds(integer)
  to service_role;
