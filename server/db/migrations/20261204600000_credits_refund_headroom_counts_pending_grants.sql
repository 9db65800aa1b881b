-- A refund is judged against the balance limit with the user's pending grants counted, as a
-- grant is (20261204100020_credits_grants_functions.sql, credit_grant).
--
-- credit_refund judged the headroom against the balance alone. A user with a grant still pending
-- (an effective_time ahead) could be refunded up to the limit; when the pending grant then took
-- effect, its GRANT entry overflowed the balance ("bigint out of range") inside the settlement
-- that every money function and the sweeper run first: from then on every call of that user's
-- failed, and so did every run of the sweeper (which settles the most overdue users first, so it
-- stalled for everyone). Now CR011 refuses such a refund, its detail's balance counting the
-- pending grants as credit_grant's does. Otherwise credit_refund is as that migration defined
-- it; `create or replace` keeps its rights (service_role only).

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
  v_pending numeric;
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
  -- Grants still pending will count too, once effective (as credit_grant judges it): their
  -- activation must not pass the limit either.
  select coalesce(pg_catalog.sum(g.amount), 0) into v_pending
    from public.credit_grants g
   where g.user_id = v_user and g.live and not g.activated and g.voided_at is null;
  perform credits_private.require_headroom(
    least(v_profile.balance + v_pending, 9223372036854775807)::bigint, v_amount);
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
