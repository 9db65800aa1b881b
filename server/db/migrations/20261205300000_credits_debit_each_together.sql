-- A batch of debits in a few statements for the whole batch (issue 21), instead of a function
-- call, and its half-dozen statements, per debit.
--
-- credits_private.debit_together does, for the debits of a batch that take the common road,
-- what credit_debit's one-statement case does for one: the first grant in burn-down order
-- covers the debit; the profile's balance, the entry, its allocation, the usage rollup and the
-- day's spending are written; the books the statement leaves are checked. It takes a debit when
-- its user has no other call in the batch, its amount, key and scope are valid, the profile
-- exists and has nothing due to settle, the debit keeps the user within their spend limits
-- (their own or the defaults), and the key has never been used (an entry, a hold or a grant).
-- The others (a replay, a refusal, a debit past a limit, a user's second call, a debit two
-- grants share) are left to credit_debit, called one by one as before, after it. Its answers
-- are credit_debit's (credits_private.transaction_json), and the events, rollups and books it
-- leaves are the same (tests/integration/test_debit_together.py compares the two).
--
-- It first locks every profile of the batch, in the order of their users (as the calls after it
-- take theirs), so two batches never wait for each other crosswise. If its statement fails
-- (a constraint, the books), it is undone alone and every call goes one by one.

-- Whether `p_amount` more spent on `p_day` keeps the user within each limit given (null: none),
-- as credits_private.judge_spending judges it after the spending is counted.
create function credits_private.within_limits(
  p_user_id uuid, p_day date, p_amount bigint, p_day_limit bigint, p_week_limit bigint,
  p_month_limit bigint
) returns boolean
language sql stable
set search_path = ''
as $$
  select (p_day_limit is null
          or coalesce(pg_catalog.sum(d.spent) filter (where d.day = p_day), 0) + p_amount
             <= p_day_limit)
     and (p_week_limit is null
          or coalesce(pg_catalog.sum(d.spent)
                        filter (where d.day >= w.first_day and d.day < w.next_day), 0)
             + p_amount <= p_week_limit)
     and (p_month_limit is null
          or coalesce(pg_catalog.sum(d.spent)
                        filter (where d.day >= m.first_day and d.day < m.next_day), 0)
             + p_amount <= p_month_limit)
    from credits_private.period_bounds('week', p_day) w
   cross join credits_private.period_bounds('month', p_day) m
    left join public.credit_spend_days d
      on d.user_id = p_user_id and d.day >= least(w.first_day, m.first_day)
     and d.day < greatest(w.next_day, m.next_day)
$$;

create function credits_private.debit_together(
  p_user_id uuid[], p_amount bigint[], p_idempotency_key text[], p_description text[],
  p_metadata jsonb[], p_scopes text[]
) returns table (ordinal integer, result jsonb)
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_users text;
  v_touched text := coalesce(pg_catalog.current_setting('credits.touched_profiles', true), '');
  -- The SQL clock (credits_private.now()): the entries' time, and what is due by it.
  v_now timestamptz := credits_private.now();
  v_done record;
  v_ordinals integer[] := '{}';
  v_results jsonb[] := '{}';
begin
  perform 1 from public.credit_profiles p
   where p.user_id = any (p_user_id)
   order by p.user_id
     for update;
  -- Each profile's rows are checked by the statement that writes them (as in credit_debit):
  -- the deferred checks of these users are not queued.
  v_users := pg_catalog.array_to_string(p_user_id, ' ');
  perform pg_catalog.set_config('credits.verified_profiles', v_users, true),
          pg_catalog.set_config('credits.touched_profiles', v_touched || ' ' || v_users, true);
  for v_done in
    with calls as (
      select c.ordinal::integer as ordinal, c.user_id, c.amount, c.idempotency_key,
             coalesce(c.description, '') as description,
             coalesce(c.metadata, '{}'::jsonb) as metadata, coalesce(c.scope, '') as scope,
             pg_catalog.count(*) over (partition by c.user_id) as calls_of_user
        from unnest(p_user_id, p_amount, p_idempotency_key, p_description, p_metadata,
                    p_scopes) with ordinality
             as c (user_id, amount, idempotency_key, description, metadata, scope, ordinal)
    ), taken as (
      select c.*,
             -- credit_debit's fingerprint
             pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(
               'debit:' || (pg_catalog.jsonb_build_object(
                  'amount', c.amount, 'description', c.description, 'metadata', c.metadata)
                || case when c.scope = '' then '{}'::jsonb
                        else pg_catalog.jsonb_build_object('scope', c.scope) end)::text,
               'UTF8')), 'hex') as fingerprint,
             v_now as created_at
        from calls c
        join public.credit_profiles p on p.user_id = c.user_id
       cross join credits_private.limit_settings s
        left join public.credit_spend_limits l on l.user_id = c.user_id
       where c.calls_of_user = 1
         and c.amount > 0
         and pg_catalog.char_length(c.idempotency_key) between 1 and 255
         and c.idempotency_key !~ '[[:cntrl:]]'
         and pg_catalog.char_length(c.scope) <= 100 and c.scope !~ '[[:cntrl:]]'
         and pg_catalog.jsonb_typeof(c.metadata) = 'object'
         and (p.next_settle_at is null or p.next_settle_at > v_now)
         -- (credit_debit refuses a debit past a limit, with the limit's details)
         and case when coalesce(l.day_limit, s.daily_limit) is null and l.week_limit is null
                       and coalesce(l.month_limit, s.monthly_limit) is null then true
                  else credits_private.within_limits(
                         c.user_id, (v_now at time zone 'UTC')::date, c.amount,
                         coalesce(l.day_limit, s.daily_limit), l.week_limit,
                         coalesce(l.month_limit, s.monthly_limit)) end
         -- (credits_private.replay's lookups: a key used before is credit_debit's to judge)
         and not exists (select 1 from public.credit_transactions t
                          where t.user_id = c.user_id and t.idempotency_key = c.idempotency_key)
         and not exists (select 1 from public.credit_holds h
                          where h.user_id = c.user_id and h.idempotency_key = c.idempotency_key)
         and not exists (select 1 from public.credit_grants g
                          where g.user_id = c.user_id
                            and (g.idempotency_key = c.idempotency_key
                                 or g.void_idempotency_key = c.idempotency_key))
    ), chosen as (
      select t.ordinal, e.grant_id
        from taken t
       cross join lateral (
         select e.grant_id from public.credit_grants e
          where e.user_id = t.user_id and e.live and e.activated and not e.expired
            and e.voided_at is null and e.remaining > e.pinned
            and (e.scopes = '{}' or t.scope = any (e.scopes))
          order by e.priority, e.scopes = '{}', e.expires_at nulls last, e.created_at, e.seq
          limit 1) e
    ), drawn as (
      update public.credit_grants g set remaining = g.remaining - t.amount
        from chosen, taken t
       where g.grant_id = chosen.grant_id and t.ordinal = chosen.ordinal
         and g.remaining - g.pinned >= t.amount
      returning t.ordinal, g.grant_id, g.category
    ), books as (
      select g.user_id,
             coalesce(pg_catalog.sum(g.remaining) filter (where g.activated and not g.expired),
                      0) as counted,
             coalesce(pg_catalog.sum(g.pinned), 0) as pinned
        from public.credit_grants g
       where g.user_id in (select t.user_id from taken t) and g.live
       group by g.user_id
    ), profile as (
      update public.credit_profiles p
         set balance = p.balance - t.amount, updated_at = pg_catalog.now()
        from drawn d, taken t
       where t.ordinal = d.ordinal and p.user_id = t.user_id
      returning t.ordinal, p.balance, p.held
    ), entry as (
      insert into public.credit_transactions (
        user_id, kind, amount, balance_after, idempotency_key, fingerprint, description,
        metadata, scope, created_at)
      select t.user_id, 'debit', t.amount, p.balance, t.idempotency_key, t.fingerprint,
             t.description, t.metadata, t.scope, t.created_at
        from taken t
        join profile p on p.ordinal = t.ordinal
       order by t.ordinal
      returning *
    ), allocation as (
      insert into public.credit_allocations (transaction_id, grant_id, user_id, ordinal, amount)
      select e.transaction_id, d.grant_id, e.user_id, 1, e.amount
        from entry e
        join taken t on t.user_id = e.user_id
        join drawn d on d.ordinal = t.ordinal
    ), usage as (
      insert into public.credit_usage as u (user_id, day, kind, scope, category, amount, hours)
      select e.user_id, pg_catalog.date_trunc('day', e.created_at, 'UTC'), 'debit', e.scope,
             d.category, e.amount,
             pg_catalog.array_fill(0::numeric, array[h.hour - 1]) || e.amount::numeric
               || pg_catalog.array_fill(0::numeric, array[24 - h.hour])
        from entry e
        join taken t on t.user_id = e.user_id
        join drawn d on d.ordinal = t.ordinal,
             lateral (select pg_catalog.date_part('hour', e.created_at at time zone 'UTC')
                               ::integer + 1 as hour) h
      on conflict (user_id, day, kind, scope, category)
        do update set amount = u.amount + excluded.amount,
                      hours[pg_catalog.array_position(excluded.hours, excluded.amount)] =
                        u.hours[pg_catalog.array_position(excluded.hours, excluded.amount)]
                        + excluded.amount
    ), spend as (
      insert into public.credit_spend_days as s (user_id, day, spent)
      select e.user_id, (e.created_at at time zone 'UTC')::date, e.amount from entry e
      on conflict (user_id, day) do update set spent = s.spent + excluded.spent
    )
    select t.ordinal, e::public.credit_transactions as entry, d.grant_id as drawn_from,
           p.balance = b.counted - t.amount and p.held = b.pinned as kept
      from entry e
      join taken t on t.user_id = e.user_id
      join drawn d on d.ordinal = t.ordinal
      join profile p on p.ordinal = t.ordinal
      join books b on b.user_id = e.user_id
  loop
    if not v_done.kept then
      raise exception using errcode = '23514',
        message = 'the credit balance is out of step with its grants and holds',
        detail = pg_catalog.jsonb_build_object('user_id', (v_done.entry).user_id)::text;
    end if;
    v_ordinals := v_ordinals || v_done.ordinal;
    v_results := v_results || pg_catalog.jsonb_build_object(
      'transaction', credits_private.transaction_json(v_done.entry,
        credits_private.allocations_json(array[v_done.drawn_from], array[(v_done.entry).amount])),
      'balance', (v_done.entry).balance_after, 'replayed', false);
  end loop;
  perform pg_catalog.set_config('credits.verified_profiles', '', true),
          pg_catalog.set_config('credits.touched_profiles', v_touched, true);
  return query select * from unnest(v_ordinals, v_results);
end
$$;

revoke execute on function
  credits_private.within_limits(uuid, date, bigint, bigint, bigint, bigint),
  credits_private.debit_together(uuid[], bigint[], text[], text[], jsonb[], text[])
  from public;
grant execute on function
  credits_private.debit_together(uuid[], bigint[], text[], text[], jsonb[], text[])
  to service_role;

-- As 20261205200000_credits_debit_each_one_subtransaction.sql defined it, with the debits
-- credits_private.debit_together takes done first, in a subtransaction of their own (when its
-- statement fails, it takes none), and the rest by credit_debit, in the order of their users,
-- in one more. When one of those raises, that one is undone and they go again one by one, each
-- in a subtransaction of its own: the one that raised is answered with its error (it runs after
-- the same calls of its user, under the same locks, as it did then).
create or replace function public.credit_debit_each(
  p_user_id uuid[], p_amount bigint[], p_idempotency_key text[], p_description text[],
  p_metadata jsonb[], p_scopes text[] default null
) returns table (
  ordinal integer, result jsonb, error_code text, error_message text, error_detail text
)
language plpgsql
set search_path = ''
as $$
declare
  v_taken integer[] := '{}';
  v_rest integer[];
  v_results jsonb[] := '{}';
  v_call integer;
  v_failed integer;
  v_code text;
  v_message text;
  v_detail text;
begin
  perform credits_private.check_batch(pg_catalog.cardinality(p_user_id));
  begin
    select coalesce(pg_catalog.array_agg(t.ordinal), '{}'),
           coalesce(pg_catalog.array_agg(t.result), '{}')
      into v_taken, v_results
      from credits_private.debit_together(
             p_user_id, p_amount, p_idempotency_key, p_description, p_metadata, p_scopes) t;
  exception when others then
    v_taken := '{}';
    v_results := '{}';
  end;
  -- The others, in the order of their users (as debit_together locked them).
  v_rest := array(select c.ordinal from unnest(p_user_id) with ordinality as c(user_id, ordinal)
                   where c.ordinal <> all (v_taken)
                   order by c.user_id, c.ordinal);
  begin
    foreach v_call in array v_rest loop
      v_results := v_results || public.credit_debit(
        p_user_id[v_call], p_amount[v_call], p_idempotency_key[v_call], p_description[v_call],
        p_metadata[v_call], coalesce(p_scopes[v_call], ''));
    end loop;
  exception when others then
    get stacked diagnostics v_code = returned_sqlstate, v_message = message_text,
      v_detail = pg_exception_detail;
    v_failed := v_call;
    v_results := v_results[1:pg_catalog.cardinality(v_taken)];
  end;
  if v_failed is null then
    return query
      select x.o, x.res, null::text, null::text, null::text
        from unnest(v_taken || v_rest, v_results) as x (o, res);
    return;
  end if;
  return query
    select x.o, x.res, null::text, null::text, null::text
      from unnest(v_taken, v_results) as x (o, res);
  foreach v_call in array v_rest loop
    select v_call, null, null, null, null
      into ordinal, result, error_code, error_message, error_detail;
    if v_call = v_failed then
      error_code := v_code;
      error_message := v_message;
      error_detail := v_detail;
    else
      begin
        result := public.credit_debit(
          p_user_id[v_call], p_amount[v_call], p_idempotency_key[v_call],
          p_description[v_call], p_metadata[v_call], coalesce(p_scopes[v_call], ''));
      exception when others then
        get stacked diagnostics error_code = returned_sqlstate, error_message = message_text,
          error_detail = pg_exception_detail;
      end;
    end if;
    return next;
  end loop;
end
$$;
