-- Spend controls (issue 20), part 2 of 2: usage reports from a rollup, and the ledger's export.
--
-- The rollup (public.credit_usage) holds, per user, UTC day, entry kind, scope and grant
-- category, the credits the ledger moved that day (`amount`) and in each of its hours (`hours`,
-- 24 of them): one row per combination, added to as each entry is written, in the same
-- transaction (a debit by credit_debit itself, every other entry by the trigger below). An
-- entry's amount is split by the category of the grants its allocations name (paid for entries
-- written before grants existed, which have none: a balance from then became a paid grant).
-- GetUsage answers from it alone: a day or month from a row per day and group, an hour from its
-- element; so its cost grows with the days and groups asked for, never with the ledger.

create table public.credit_usage (
  user_id uuid not null references public.credit_profiles (user_id),
  -- The UTC day (its midnight).
  day timestamptz not null,
  kind text not null,
  scope text not null,
  category text not null,
  -- Numeric: a day's grants (say) may add up past the largest balance.
  amount numeric not null check (amount > 0),
  -- hours[h + 1]: what moved from h:00 to h:59 (UTC); they add up to `amount`.
  hours numeric[] not null check (pg_catalog.cardinality(hours) = 24),
  primary key (user_id, day, kind, scope, category)
);

revoke all on public.credit_usage from public, anon, authenticated, service_role;
grant select on public.credit_usage to authenticated, service_role;
alter table public.credit_usage enable row level security;
create policy credit_usage_read_own on public.credit_usage
  for select to authenticated using (user_id = (select auth.uid()));

-- Adds `p_amount` moved at `p_at` to the user's rollup row of its day, kind, scope and category.
create function credits_private.add_usage(
  p_user_id uuid, p_at timestamptz, p_kind text, p_scope text, p_category text,
  p_amount numeric
) returns void
language plpgsql
set search_path = ''
as $$
declare
  v_hour integer := pg_catalog.date_part('hour', p_at at time zone 'UTC')::integer + 1;
begin
  insert into public.credit_usage as u (user_id, day, kind, scope, category, amount, hours)
  values (p_user_id, pg_catalog.date_trunc('day', p_at, 'UTC'), p_kind, p_scope, p_category,
          p_amount, pg_catalog.array_fill(0::numeric, array[v_hour - 1]) || p_amount
                    || pg_catalog.array_fill(0::numeric, array[24 - v_hour]))
  on conflict (user_id, day, kind, scope, category)
    do update set amount = u.amount + excluded.amount,
                  hours[v_hour] = u.hours[v_hour] + excluded.amount;
end
$$;

-- Adds ledger entry `t` to the rollup, split by the categories of the grants it allocates (its
-- allocations are written by the statement that writes it: called after it).
create function credits_private.roll_up(t public.credit_transactions) returns void
language plpgsql
set search_path = ''
as $$
declare
  v record;
begin
  for v in
    select coalesce(g.category, 'paid') as category,
           pg_catalog.sum(coalesce(a.amount, t.amount)) as amount
      from (select) one
      left join public.credit_allocations a on a.transaction_id = t.transaction_id
      left join public.credit_grants g on g.grant_id = a.grant_id
     group by 1
  loop
    perform credits_private.add_usage(
      t.user_id, t.created_at, t.kind, t.scope, v.category, v.amount);
  end loop;
end
$$;

-- After every entry but a debit (credit_debit rolls its own up, and counts it as spending): the
-- rollup.
create function credits_private.roll_up_entry() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  perform credits_private.roll_up(new);
  return null;
end
$$;

create trigger credit_transactions_usage
  after insert on public.credit_transactions
  for each row when (new.kind <> 'debit') execute function credits_private.roll_up_entry();

-- The ledger so far, rolled up the same way (a capture of a generation's hold has its model as
-- its scope; other entries from before this migration are unscoped).
select credits_private.add_usage(x.user_id, x.hour, x.kind, x.scope, x.category, x.amount)
  from (select t.user_id, pg_catalog.date_trunc('hour', t.created_at, 'UTC') as hour, t.kind,
               coalesce(gen.model, t.scope) as scope, coalesce(g.category, 'paid') as category,
               pg_catalog.sum(coalesce(a.amount, t.amount)) as amount
          from public.credit_transactions t
          left join public.credit_generations gen
            on t.kind = 'capture' and gen.hold_id = t.hold_id
          left join public.credit_allocations a on a.transaction_id = t.transaction_id
          left join public.credit_grants g on g.grant_id = a.grant_id
         group by 1, 2, 3, 4, 5) x;

-- A ledger entry as JSON (as 20261204100010_credits_grants_machinery.sql defined it), with the
-- scope of the spending it records.
create or replace function credits_private.transaction_json(
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
    'allocations', coalesce(p_allocations, '[]'::jsonb),
    'scope', t.scope);
end
$$;

-- The user's usage in [p_start, p_end) (whole hours), in buckets of `p_granularity` ('hour',
-- 'day' or 'month', UTC) grouped by `p_group_by` ('none', 'kind', 'scope' or 'category'):
-- [{"start_time", "kind", "scope", "category", "spent", "granted", "refunded", "expired",
-- "voided"}] by start_time, then group (the group's field set, the others null). Spent: debits
-- and captures. Whole days (for days and months) from the rows' `amount`, hours from their
-- `hours`. User own, service. CR003 when there is no profile; 42501 for another user's.
create function public.credit_get_usage(
  p_user_id uuid, p_start timestamptz, p_end timestamptz, p_granularity text, p_group_by text
) returns jsonb
language plpgsql stable
security definer
set search_path = ''
as $$
declare
  v_first_day timestamptz;
  v_last_day timestamptz;
begin
  perform credits_private.assert_may_act_for(p_user_id);
  if p_granularity is null or p_granularity not in ('hour', 'day', 'month') then
    perform credits_private.invalid('granularity', 'must be hour, day or month');
  end if;
  if p_group_by is null or p_group_by not in ('none', 'kind', 'scope', 'category') then
    perform credits_private.invalid('group_by', 'must be none, kind, scope or category');
  end if;
  if not exists (select 1 from public.credit_profiles where user_id = p_user_id) then
    raise exception using errcode = 'CR003', message = 'no credit profile for this user';
  end if;
  -- The whole UTC days within the range (none when asked by the hour).
  v_first_day := pg_catalog.date_trunc('day', p_start, 'UTC');
  if v_first_day < p_start then
    v_first_day := v_first_day + interval '24 hours';
  end if;
  v_last_day := greatest(pg_catalog.date_trunc('day', p_end, 'UTC'), v_first_day);
  if p_granularity = 'hour' then
    v_last_day := v_first_day;
  end if;
  return (
    select coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
             'start_time', b.bucket, 'kind', b.kind, 'scope', b.scope, 'category', b.category,
             'spent', b.spent, 'granted', b.granted, 'refunded', b.refunded,
             'expired', b.expired, 'voided', b.voided)
             order by b.bucket, b.kind, b.scope, b.category), '[]'::jsonb)
      from (select pg_catalog.date_trunc(p_granularity, u.at, 'UTC') as bucket,
                   case when p_group_by = 'kind' then u.kind end as kind,
                   case when p_group_by = 'scope' then u.scope end as scope,
                   case when p_group_by = 'category' then u.category end as category,
                   -- (int64 in the API: a sum past its largest shows as that)
                   least(coalesce(pg_catalog.sum(u.amount)
                                    filter (where u.kind in ('debit', 'capture')), 0),
                         9223372036854775807) as spent,
                   least(coalesce(pg_catalog.sum(u.amount) filter (where u.kind = 'grant'), 0),
                         9223372036854775807) as granted,
                   least(coalesce(pg_catalog.sum(u.amount) filter (where u.kind = 'refund'), 0),
                         9223372036854775807) as refunded,
                   least(coalesce(pg_catalog.sum(u.amount) filter (where u.kind = 'expire'), 0),
                         9223372036854775807) as expired,
                   least(coalesce(pg_catalog.sum(u.amount) filter (where u.kind = 'void'), 0),
                         9223372036854775807) as voided
              from (select x.day as at, x.kind, x.scope, x.category, x.amount
                      from public.credit_usage x
                     where x.user_id = p_user_id and x.day >= v_first_day
                       and x.day < v_last_day
                    union all
                    -- The hours of the days before and after the whole ones (every day's, by
                    -- the hour), each its own index range.
                    select x.day + (h.i - 1) * interval '1 hour', x.kind, x.scope, x.category,
                           h.v
                      from public.credit_usage x,
                           unnest(x.hours) with ordinality as h (v, i)
                     where x.user_id = p_user_id
                       and x.day >= pg_catalog.date_trunc('day', p_start, 'UTC')
                       and x.day < v_first_day
                       and h.v > 0 and x.day + (h.i - 1) * interval '1 hour' >= p_start
                       and x.day + (h.i - 1) * interval '1 hour' < p_end
                    union all
                    select x.day + (h.i - 1) * interval '1 hour', x.kind, x.scope, x.category,
                           h.v
                      from public.credit_usage x,
                           unnest(x.hours) with ordinality as h (v, i)
                     where x.user_id = p_user_id and x.day >= v_last_day and x.day < p_end
                       and h.v > 0 and x.day + (h.i - 1) * interval '1 hour' >= p_start
                       and x.day + (h.i - 1) * interval '1 hour' < p_end) u
             group by 1, 2, 3, 4) b);
end
$$;

-- Up to `p_limit` ledger entries with their allocations and scope, for accounting (service
-- only): of `p_user_id` (null: every user) created in [p_start, p_end) (null: unbounded), after
-- the entry (`p_after_user`, `p_after_seq`) the previous batch ended with (nulls: from the
-- start). One user's entries in ledger order; every user's user by user (descending user id),
-- each in ledger order. Each batch is one index range scan from where the last one ended, so an
-- export of any size reads the ledger once, in batches the caller can stream.
create function public.credit_export_transactions(
  p_user_id uuid, p_start timestamptz, p_end timestamptz, p_after_user uuid,
  p_after_seq bigint, p_limit integer
) returns jsonb
language plpgsql stable
security definer
set search_path = ''
as $$
begin
  if p_limit is null or p_limit not between 1 and 10000 then
    perform credits_private.invalid('limit', 'must be between 1 and 10000');
  end if;
  return (
    select coalesce(pg_catalog.jsonb_agg(
             credits_private.transaction_json(x.entry) order by x.part, x.user_id desc, x.seq), '[]')
      from ((select 1 as part, t.user_id, t.seq, t as entry
               from public.credit_transactions t
              where t.user_id = coalesce(p_user_id, p_after_user)
                and t.seq > coalesce(p_after_seq, 0)
                and (p_start is null or t.created_at >= p_start)
                and (p_end is null or t.created_at < p_end)
              order by t.seq
              limit p_limit)
            union all
            (select 2, t.user_id, t.seq, t
               from public.credit_transactions t
              where p_user_id is null
                and (p_after_user is null or t.user_id < p_after_user)
                and (p_start is null or t.created_at >= p_start)
                and (p_end is null or t.created_at < p_end)
              order by t.user_id desc, t.seq
              limit p_limit)
            order by 1, 2 desc, 3
            limit p_limit) x);
end
$$;

revoke execute on all functions in schema credits_private from public;
grant execute on function credits_private.transaction_json(public.credit_transactions, jsonb)
  to authenticated, service_role;
revoke execute on function
  public.credit_get_usage(uuid, timestamptz, timestamptz, text, text),
  public.credit_export_transactions(uuid, timestamptz, timestamptz, uuid, bigint, integer)
  from public, anon, authenticated;
grant execute on function public.credit_get_usage(uuid, timestamptz, timestamptz, text, text)
  to authenticated, service_role;
grant execute on function
  public.credit_export_transactions(uuid, timestamptz, timestamptz, uuid, bigint, integer)
  to service_role;
