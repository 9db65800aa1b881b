-- Spend controls (issue 20), part 1 of 2: spending caps per period and a cap on running
-- generations, judged in the transaction that spends, under the user's profile lock.
--
-- SQLSTATEs, continuing the lists of the earlier migrations:
--
--   CR020 spend limit exceeded (detail: {"period": "day" | "week" | "month", "limit": n,
--         "spent": n, "reset_time": t}): the spending would take what the user spent in the
--         current period (calendar-aligned in UTC; weeks start on Monday) past their limit
--   CR021 too many active generations (detail: {"limit": n, "active": n})
--
-- How spending is counted, per user and UTC day (public.credit_spend_days): a DEBIT entry counts
-- on its day, a reservation (a hold: ReserveCredits, or CreateGeneration) on the day it is made.
-- When a hold leaves pending (captured, released, expired) its amount is given back to its day,
-- and a capture counts what it charges on the hold's day again: a capture converts what the
-- reservation counted, it never counts twice. A refund gives back what it returns to the day its
-- debit (or its capture's hold) counted on. A week's or month's spending is the sum of its days.
-- Counts never go below zero (spending from before this migration was never counted).
--
-- Everything is done by triggers (of this file, and the ledger's of the next) on the existing
-- tables, firing inside the money function's transaction while it holds the user's profile row
-- lock (every function that writes a ledger entry, a hold or a generation takes it first): a
-- refused call changes nothing, and concurrent calls of one user are judged one after the other.
-- Two functions are redefined, to record the spending's scope, which no row carried (the usage
-- reports group by it): `credits_private.hold` (the hold's scope) and `public.credit_debit` (the
-- DEBIT entry's), which also counts its spending and rolls itself up in its one statement, so
-- that the hottest call of all pays for no trigger.
--
-- Time: a ledger entry's `created_at` is now the SQL clock's (`credits_private.now()`, its column
-- default), as a hold's and a grant's already were, so that periods roll over with the clock in
-- tests.

-- The defaults every user has unless they have their own limit (null: none), and the cap on
-- queued plus running generations per user. Written by the service at start-up
-- (credit_configure_limits), from CREDITS_DEFAULT_DAILY_LIMIT, CREDITS_DEFAULT_MONTHLY_LIMIT and
-- CREDITS_MAX_ACTIVE_GENERATIONS.
create table credits_private.limit_settings (
  singleton boolean primary key default true check (singleton),
  daily_limit bigint check (daily_limit > 0),
  monthly_limit bigint check (monthly_limit > 0),
  max_active_generations integer not null default 8 check (max_active_generations > 0)
);
insert into credits_private.limit_settings default values;

-- A user's own limits (null: the default for day and month, none for week).
create table public.credit_spend_limits (
  user_id uuid primary key references public.credit_profiles (user_id),
  day_limit bigint check (day_limit > 0),
  week_limit bigint check (week_limit > 0),
  month_limit bigint check (month_limit > 0),
  updated_at timestamptz not null default now()
);

-- What each user spent per UTC day, as the caps count it (see the top of this file). Numeric:
-- a day's spending may add up past the largest balance (credits granted again and spent again).
create table public.credit_spend_days (
  user_id uuid not null references public.credit_profiles (user_id),
  day date not null,
  spent numeric not null check (spent >= 0),
  primary key (user_id, day)
);

revoke all on public.credit_spend_limits, public.credit_spend_days
  from public, anon, authenticated, service_role;
grant select on public.credit_spend_limits, public.credit_spend_days to authenticated, service_role;
alter table public.credit_spend_limits enable row level security;
alter table public.credit_spend_days enable row level security;
create policy credit_spend_limits_read_own on public.credit_spend_limits
  for select to authenticated using (user_id = (select auth.uid()));
create policy credit_spend_days_read_own on public.credit_spend_days
  for select to authenticated using (user_id = (select auth.uid()));

-- The scope of the spending an entry or hold records ('' unscoped, and for entries that are not
-- spending). Grants and expiries have none; a capture takes its hold's, a refund its entry's.
alter table public.credit_transactions add column scope text not null default '';
alter table public.credit_holds add column scope text not null default '';
-- Pending generations' holds learn their model (holds made before this migration).
update public.credit_holds h set scope = g.model
  from public.credit_generations g
 where g.hold_id = h.hold_id and h.state = 'pending';

-- The first day of the period `p_period` that `p_day` lies in, and the first of the next.
create function credits_private.period_bounds(
  p_period text, p_day date, out first_day date, out next_day date
)
language plpgsql immutable
set search_path = ''
as $$
begin
  if p_period = 'day' then
    first_day := p_day;
    next_day := p_day + 1;
  elsif p_period = 'week' then
    first_day := p_day - (pg_catalog.date_part('isodow', p_day)::integer - 1);
    next_day := first_day + 7;
  else
    first_day := p_day - (pg_catalog.date_part('day', p_day)::integer - 1);
    next_day := (first_day + interval '1 month')::date;
  end if;
end
$$;

-- The user's limits in force: their own, else the defaults (null: none).
create function credits_private.limits_of(
  p_user_id uuid, out day_limit bigint, out week_limit bigint, out month_limit bigint,
  out own_day boolean, out own_week boolean, out own_month boolean
)
language plpgsql stable
set search_path = ''
as $$
begin
  select coalesce(l.day_limit, s.daily_limit), l.week_limit,
         coalesce(l.month_limit, s.monthly_limit), l.day_limit is not null,
         l.week_limit is not null, l.month_limit is not null
    into day_limit, week_limit, month_limit, own_day, own_week, own_month
    from credits_private.limit_settings s
    left join public.credit_spend_limits l on l.user_id = p_user_id;
end
$$;

-- Refuses (CR020) new spending of `p_amount` on day `p_day` that took the user's spending of
-- that day to `p_spent` (counted already), when a period's spending is now past its limit
-- (`p_day_limit`, `p_week_limit`, `p_month_limit`; null: none). The caller holds the profile's
-- row lock; the refusal undoes the count with everything else.
create function credits_private.judge_spending(
  p_user_id uuid, p_day date, p_spent numeric, p_amount bigint, p_day_limit bigint,
  p_week_limit bigint, p_month_limit bigint
) returns void
language plpgsql
set search_path = ''
as $$
declare
  v_spent numeric := p_spent;
  v_period text;
  v_limit bigint;
  v_bounds record;
begin
  foreach v_period in array array['day', 'week', 'month'] loop
    v_limit := case v_period when 'day' then p_day_limit when 'week' then p_week_limit
                             else p_month_limit end;
    continue when v_limit is null;
    v_bounds := credits_private.period_bounds(v_period, p_day);
    if v_period <> 'day' then
      select pg_catalog.sum(d.spent) into v_spent
        from public.credit_spend_days d
       where d.user_id = p_user_id and d.day >= v_bounds.first_day
         and d.day < v_bounds.next_day;
    end if;
    if v_spent > v_limit then
      raise exception using errcode = 'CR020', message = 'spend limit exceeded',
        detail = pg_catalog.jsonb_build_object(
          'period', v_period, 'limit', v_limit,
          'spent', least(v_spent - p_amount, 9223372036854775807),
          'reset_time', v_bounds.next_day::timestamp at time zone 'UTC')::text;
    end if;
  end loop;
end
$$;

-- Counts `p_amount` of new spending of the user at `p_at`, and refuses it (CR020) when it takes
-- a period's spending past the user's limit. The caller holds the profile's row lock. (The
-- debit of one statement does the same inline: see credit_debit below.)
create function credits_private.count_spending(p_user_id uuid, p_at timestamptz, p_amount bigint)
returns void
language plpgsql
set search_path = ''
as $$
declare
  v record;
begin
  with spend as (
    insert into public.credit_spend_days as d (user_id, day, spent)
    values (p_user_id, (p_at at time zone 'UTC')::date, p_amount)
    on conflict (user_id, day) do update set spent = d.spent + excluded.spent
    returning d.day, d.spent
  )
  select spend.day, spend.spent, coalesce(l.day_limit, s.daily_limit) as day_limit,
         l.week_limit, coalesce(l.month_limit, s.monthly_limit) as month_limit
    into v
    from spend, credits_private.limit_settings s
    left join public.credit_spend_limits l on l.user_id = p_user_id;
  if v.day_limit is not null or v.week_limit is not null or v.month_limit is not null then
    perform credits_private.judge_spending(
      p_user_id, v.day, v.spent, p_amount, v.day_limit, v.week_limit, v.month_limit);
  end if;
end
$$;

-- Gives `p_amount` of spending counted on the day of `p_at` back (never below zero).
create function credits_private.give_back_spending(
  p_user_id uuid, p_at timestamptz, p_amount bigint
) returns void
language plpgsql
set search_path = ''
as $$
begin
  update public.credit_spend_days
     set spent = greatest(spent - p_amount, 0)
   where user_id = p_user_id and day = (p_at at time zone 'UTC')::date;
end
$$;

-- A ledger entry's time is the SQL clock's; a debit's scope is the one its function names (the
-- debit of one statement writes it; one written by credits_private.record gets it from
-- `credits.debit_scope`, which credit_debit sets around that call alone). Column defaults: the
-- hottest insert of all pays no trigger for them. The time is credits_private.now() without
-- its `security definer` and `search_path` (the owner's functions insert entries, and every
-- name in it is qualified), which every call would pay for.
create function credits_private.entry_time() returns timestamptz
language plpgsql stable
as $$
begin
  return pg_catalog.now() + (select c."offset" from credits_private.clock c);
end
$$;

alter table public.credit_transactions
  alter column created_at set default credits_private.entry_time(),
  alter column scope set default coalesce(
    pg_catalog.current_setting('credits.debit_scope', true), '');

-- Before a capture or refund is written: its scope and spending from what it settles.
create function credits_private.settled_spending() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  v_origin record;
begin
  if new.kind = 'capture' then
    select h.scope, h.created_at into v_origin
      from public.credit_holds h where h.hold_id = new.hold_id;
    new.scope := v_origin.scope;
    -- The hold gave its whole amount back as it left pending; what it charges counts again,
    -- on the day the reservation counted (never refused: the reservation was allowed).
    insert into public.credit_spend_days as d (user_id, day, spent)
    values (new.user_id, (v_origin.created_at at time zone 'UTC')::date, new.amount)
    on conflict (user_id, day) do update set spent = d.spent + excluded.spent;
  else
    select t.scope, coalesce(h.created_at, t.created_at) as at into v_origin
      from public.credit_transactions t
      left join public.credit_holds h on h.hold_id = t.hold_id
     where t.transaction_id = new.refunded_transaction_id;
    new.scope := v_origin.scope;
    perform credits_private.give_back_spending(new.user_id, v_origin.at, new.amount);
  end if;
  return new;
end
$$;

create trigger credit_transactions_settled_spending
  before insert on public.credit_transactions
  for each row when (new.kind in ('capture', 'refund'))
  execute function credits_private.settled_spending();

-- A reservation counts when it is made (and is refused over a cap).
create function credits_private.hold_spending() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  perform credits_private.count_spending(new.user_id, new.created_at, new.amount);
  return new;
end
$$;

create trigger credit_holds_spending
  before insert on public.credit_holds
  for each row when (new.state = 'pending') execute function credits_private.hold_spending();

-- A hold leaving pending gives its amount back (a capture counts what it charges again).
create function credits_private.hold_settled_spending() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  perform credits_private.give_back_spending(old.user_id, old.created_at, old.amount);
  return null;
end
$$;

create trigger credit_holds_settled_spending
  after update of state on public.credit_holds
  for each row when (old.state = 'pending' and new.state <> 'pending')
  execute function credits_private.hold_settled_spending();

-- The cap on a user's queued plus running generations, judged as one is created (under the
-- profile lock credit_create_generation takes first, so concurrent creates are judged in turn).
create index credit_generations_active_by_user on public.credit_generations (user_id)
  where state in ('queued', 'running');

create function credits_private.generation_cap() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  v_limit integer;
  v_active integer;
begin
  select s.max_active_generations into v_limit from credits_private.limit_settings s;
  select pg_catalog.count(*) into v_active
    from public.credit_generations g
   where g.user_id = new.user_id and g.state in ('queued', 'running');
  if v_active >= v_limit then
    raise exception using errcode = 'CR021', message = 'too many active generations',
      detail = pg_catalog.jsonb_build_object('limit', v_limit, 'active', v_active)::text;
  end if;
  return new;
end
$$;

create trigger credit_generations_cap
  before insert on public.credit_generations
  for each row when (new.state in ('queued', 'running'))
  execute function credits_private.generation_cap();

-- As 20261204100030_credits_hold_create_time_by_clock.sql defined it, recording the hold's scope.
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
    created_at, scope)
  values (
    p_user_id, p_amount, p_idempotency_key, p_fingerprint, coalesce(p_description, ''),
    p_expires_at, p_available_after,
    -- credits_private.now() (this runs as the owner): the instant the callers added ttl to.
    pg_catalog.now() + (select c."offset" from credits_private.clock c),
    coalesce(p_scope, ''))
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

-- The deployment's limits (service only; called by the service at start-up): the default daily
-- and monthly limits (null: none) and the cap on a user's queued plus running generations.
create function public.credit_configure_limits(
  p_daily_limit bigint, p_monthly_limit bigint, p_max_active_generations integer
) returns void
language plpgsql
security definer
set search_path = ''
as $$
begin
  if p_daily_limit is not null and p_daily_limit <= 0 then
    perform credits_private.invalid('daily_limit', 'must be above 0 (null: none)');
  end if;
  if p_monthly_limit is not null and p_monthly_limit <= 0 then
    perform credits_private.invalid('monthly_limit', 'must be above 0 (null: none)');
  end if;
  if p_max_active_generations is null or p_max_active_generations <= 0 then
    perform credits_private.invalid('max_active_generations', 'must be above 0');
  end if;
  update credits_private.limit_settings
     set daily_limit = p_daily_limit, monthly_limit = p_monthly_limit,
         max_active_generations = p_max_active_generations;
end
$$;

-- The user's limits in force, each with what was spent in its current period (at the SQL
-- clock's now) and when that period ends: {"limits": [{"period", "limit", "spent",
-- "reset_time", "default"}]}, day, week, month. Holds past their expiry count no more, settled
-- or not. The caller has locked the profile or reads (the caller's own or a service's).
create function credits_private.spend_limits_json(p_user_id uuid) returns jsonb
language plpgsql stable
set search_path = ''
as $$
declare
  v_now timestamptz := credits_private.now();
  v_day date := (v_now at time zone 'UTC')::date;
  v_limits record;
  v_limit bigint;
  v_bounds record;
  v_spent numeric;
  v_period text;
  v_out jsonb := '[]';
begin
  v_limits := credits_private.limits_of(p_user_id);
  foreach v_period in array array['day', 'week', 'month'] loop
    v_limit := case v_period when 'day' then v_limits.day_limit
                             when 'week' then v_limits.week_limit else v_limits.month_limit end;
    continue when v_limit is null;
    v_bounds := credits_private.period_bounds(v_period, v_day);
    select coalesce(pg_catalog.sum(d.spent), 0) into v_spent
      from public.credit_spend_days d
     where d.user_id = p_user_id and d.day >= v_bounds.first_day
       and d.day < v_bounds.next_day;
    select greatest(v_spent - coalesce(pg_catalog.sum(h.amount), 0), 0) into v_spent
      from public.credit_holds h
     where h.user_id = p_user_id and h.state = 'pending' and h.expires_at <= v_now
       and (h.created_at at time zone 'UTC')::date >= v_bounds.first_day
       and (h.created_at at time zone 'UTC')::date < v_bounds.next_day;
    v_out := v_out || pg_catalog.jsonb_build_object(
      -- (int64 in the API: what passed its largest shows as that)
      'period', v_period, 'limit', v_limit, 'spent', least(v_spent, 9223372036854775807),
      'reset_time', v_bounds.next_day::timestamp at time zone 'UTC',
      'default', not case v_period when 'day' then v_limits.own_day
                                   when 'week' then v_limits.own_week
                                   else v_limits.own_month end);
  end loop;
  return pg_catalog.jsonb_build_object('limits', v_out);
end
$$;

-- Sets the user's own limit for `p_period` ('day', 'week' or 'month'); 0 removes it (the
-- default, if any, applies again). Service only. Returns the limits in force, as
-- credit_get_spend_limits. CR003 when the user has no profile.
create function public.credit_set_spend_limit(p_user_id uuid, p_period text, p_limit bigint)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_limit bigint;
begin
  if p_period is null or p_period not in ('day', 'week', 'month') then
    perform credits_private.invalid('period', 'must be day, week or month');
  end if;
  if p_limit is null or p_limit < 0 then
    perform credits_private.invalid('limit', 'must be 0 (none) or positive');
  end if;
  perform credits_private.lock_profile(p_user_id);
  v_limit := nullif(p_limit, 0);
  insert into public.credit_spend_limits as l (user_id, day_limit, week_limit, month_limit)
  values (p_user_id, case when p_period = 'day' then v_limit end,
          case when p_period = 'week' then v_limit end,
          case when p_period = 'month' then v_limit end)
  on conflict (user_id) do update set
    day_limit = case when p_period = 'day' then v_limit else l.day_limit end,
    week_limit = case when p_period = 'week' then v_limit else l.week_limit end,
    month_limit = case when p_period = 'month' then v_limit else l.month_limit end,
    updated_at = pg_catalog.now();
  delete from public.credit_spend_limits
   where user_id = p_user_id and day_limit is null and week_limit is null
     and month_limit is null;
  return credits_private.spend_limits_json(p_user_id);
end
$$;

-- The user's limits in force with what was spent in each current period (user own, service).
-- CR003 when there is no profile; 42501 for another user's.
create function public.credit_get_spend_limits(p_user_id uuid) returns jsonb
language plpgsql stable
security definer
set search_path = ''
as $$
begin
  perform credits_private.assert_may_act_for(p_user_id);
  if not exists (select 1 from public.credit_profiles where user_id = p_user_id) then
    raise exception using errcode = 'CR003', message = 'no credit profile for this user';
  end if;
  return credits_private.spend_limits_json(p_user_id);
end
$$;

-- As 20261204100040_credits_debit_in_one_statement.sql defined it, recording the debit's scope
-- on its entry (in the one statement's insert; for a debit spread over several grants, written
-- by credits_private.record, through `credits.debit_scope`, which the entry's column default
-- reads, set for that one call), adding the debit to the usage rollup and counting it as
-- spending, refused (CR020) over a limit. The one statement does all of it inline: the ledger's
-- trigger (20261204300010_credits_usage_rollup.sql) passes debits by, as every other entry's
-- work costs a debit less this way. Same signature and results; CR020 besides its errors.
create or replace function public.credit_debit(
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
  v_done record;
  v_grant record;
  v_left bigint := p_amount;
  v_available bigint := 0;
  v_take bigint;
  v_grants uuid[];
  v_amounts bigint[];
begin
  -- The checks of credits_private.assert_may_act_for, check_amount, check_key and
  -- check_scope, each called only to refuse: this is the hottest call of all.
  if pg_catalog.current_setting('role', true) is distinct from 'service_role'
     and pg_catalog.current_setting('role', true) is distinct from 'none'
     and p_user_id is distinct from auth.uid() then
    perform credits_private.assert_may_act_for(p_user_id);
  end if;
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
  -- The common case, in one statement: the first grant in burn-down order covers it all. The
  -- statement checks the books it leaves (credits_private.record explains how), from the
  -- grants as they were before it drew on one.
  perform pg_catalog.set_config('credits.verified_profiles', p_user_id::text, true);
  with chosen as (
    select e.grant_id from public.credit_grants e
     where e.user_id = p_user_id and e.live and e.activated and not e.expired
       and e.voided_at is null and e.remaining > e.pinned
       and (e.scopes = '{}' or v_scope = any (e.scopes))
     order by e.priority, e.scopes = '{}', e.expires_at nulls last, e.created_at, e.seq
     limit 1
  ), drawn as (
    update public.credit_grants g set remaining = g.remaining - p_amount
      from chosen
     where g.grant_id = chosen.grant_id and g.remaining - g.pinned >= p_amount
    returning g.grant_id, g.category
  ), books as (
    select coalesce(pg_catalog.sum(g.remaining) filter (where g.activated and not g.expired),
                    0) as counted,
           coalesce(pg_catalog.sum(g.pinned), 0) as pinned
      from public.credit_grants g
     where g.user_id = p_user_id and g.live
  ), profile as (
    update public.credit_profiles
       set balance = balance - p_amount, updated_at = pg_catalog.now()
     where user_id = p_user_id and exists (select 1 from drawn)
    returning balance, held
  ), entry as (
    insert into public.credit_transactions (
      user_id, kind, amount, balance_after, idempotency_key, fingerprint, description, metadata,
      scope, created_at)
    select p_user_id, 'debit', p_amount, profile.balance, p_idempotency_key, v_fingerprint,
           coalesce(p_description, ''), coalesce(p_metadata, '{}'::jsonb), v_scope,
           -- (the column's default, credits_private.entry_time(), inline)
           pg_catalog.now() + (select c."offset" from credits_private.clock c)
      from profile
    returning *
  ), allocation as (
    insert into public.credit_allocations (transaction_id, grant_id, user_id, ordinal, amount)
    select entry.transaction_id, drawn.grant_id, p_user_id, 1, p_amount from entry, drawn
  ), usage as (
    -- The usage rollup and the day's spending (credits_private.add_usage and count_spending,
    -- inline: the ledger's trigger passes debits by).
    insert into public.credit_usage as u (user_id, day, kind, scope, category, amount, hours)
    select p_user_id, pg_catalog.date_trunc('day', entry.created_at, 'UTC'), 'debit', v_scope,
           drawn.category, p_amount,
           pg_catalog.array_fill(0::numeric, array[h.hour - 1]) || p_amount::numeric
             || pg_catalog.array_fill(0::numeric, array[24 - h.hour])
      from entry, drawn,
           lateral (select pg_catalog.date_part('hour', entry.created_at at time zone 'UTC')
                             ::integer + 1 as hour) h
    on conflict (user_id, day, kind, scope, category)
      -- (the hour's element: the one the new row's hours hold the amount in, all others 0)
      do update set amount = u.amount + excluded.amount,
                    hours[pg_catalog.array_position(excluded.hours, excluded.amount)] =
                      u.hours[pg_catalog.array_position(excluded.hours, excluded.amount)]
                      + excluded.amount
  ), spend as (
    insert into public.credit_spend_days as d (user_id, day, spent)
    select p_user_id, (entry.created_at at time zone 'UTC')::date, p_amount from entry
    on conflict (user_id, day) do update set spent = d.spent + excluded.spent
    returning d.day, d.spent
  ), limits as (
    select coalesce(l.day_limit, s.daily_limit) as day_limit, l.week_limit,
           coalesce(l.month_limit, s.monthly_limit) as month_limit
      from credits_private.limit_settings s
      left join public.credit_spend_limits l on l.user_id = p_user_id
  )
  select e.*, d.grant_id as drawn_from,
         p.balance = b.counted - p_amount and p.held = b.pinned as kept,
         sp.day as spend_day, sp.spent as spend_total, li.day_limit, li.week_limit,
         li.month_limit
    into v_done
    from entry e, drawn d, profile p, books b, spend sp, limits li;
  if v_done.transaction_id is not null then
    if not v_done.kept then
      raise exception using errcode = '23514',
        message = 'the credit balance is out of step with its grants and holds',
        detail = pg_catalog.jsonb_build_object('user_id', p_user_id)::text;
    end if;
    if v_done.day_limit is not null or v_done.week_limit is not null
       or v_done.month_limit is not null then
      perform credits_private.judge_spending(
        p_user_id, v_done.spend_day, v_done.spend_total, p_amount, v_done.day_limit,
        v_done.week_limit, v_done.month_limit);
    end if;
    perform pg_catalog.set_config('credits.verified_profiles', '', true),
            pg_catalog.set_config('credits.touched_profiles', pg_catalog.replace(
              pg_catalog.current_setting('credits.touched_profiles', true),
              ' ' || p_user_id::text, ''), true);
    return pg_catalog.jsonb_build_object(
      'transaction', pg_catalog.jsonb_build_object(
        'transaction_id', v_done.transaction_id,
        'user_id', v_done.user_id,
        'kind', v_done.kind,
        'amount', v_done.amount,
        'balance_after', v_done.balance_after,
        'idempotency_key', v_done.idempotency_key,
        'description', v_done.description,
        'metadata', v_done.metadata,
        'create_time', v_done.created_at,
        'refunded_transaction_id', null,
        'hold_id', null,
        'seq', v_done.seq,
        'allocations', pg_catalog.jsonb_build_array(pg_catalog.jsonb_build_object(
          'grant_id', v_done.drawn_from, 'amount', p_amount)),
        'scope', v_scope),
      'balance', v_done.balance_after, 'replayed', false);
  end if;
  perform pg_catalog.set_config('credits.verified_profiles', '', true);
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
  perform pg_catalog.set_config('credits.debit_scope', v_scope, true);
  v_tx := credits_private.record(
    p_user_id, 'debit', -p_amount, p_idempotency_key, v_fingerprint, p_description, p_metadata,
    v_grants, v_amounts, p_verify => true);
  perform pg_catalog.set_config('credits.debit_scope', '', true);
  perform credits_private.roll_up(v_tx),
          credits_private.count_spending(p_user_id, v_tx.created_at, p_amount);
  return pg_catalog.jsonb_build_object(
    'transaction', credits_private.transaction_json(
      v_tx, credits_private.allocations_json(v_grants, v_amounts)),
    'balance', v_tx.balance_after, 'replayed', false);
end
$$;

revoke execute on all functions in schema credits_private from public;
revoke execute on function
  public.credit_configure_limits(bigint, bigint, integer),
  public.credit_set_spend_limit(uuid, text, bigint),
  public.credit_get_spend_limits(uuid)
  from public, anon, authenticated;
grant execute on function public.credit_get_spend_limits(uuid) to authenticated, service_role;
grant execute on function
  public.credit_configure_limits(bigint, bigint, integer),
  public.credit_set_spend_limit(uuid, text, bigint)
  to service_role;
