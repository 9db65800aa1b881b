-- Credit grants (issue 17), part 1 of 3: the stored state.
--
-- A user's balance is no longer one number but the sum of the credits left in their grants. A
-- grant has an amount, a remainder, a priority (lower spent first), a category (paid or
-- promotional), scopes (what it may pay for; none: anything), a time it takes effect and a time
-- it expires (none: never). Every debit and capture records which grants paid for it (its
-- allocations), every pending hold pins the credits it sets aside, refunds go back to the
-- grants they came from, and a grant's unspent remainder leaves the balance when it expires (an
-- EXPIRE entry) or is voided (a VOID entry).
--
-- Part 1 (this file): the clock, the tables, row-level security, the conversion of existing
-- balances into grants, and the invariant the database enforces at commit.
-- Part 2 (20261204100010_credits_grants_machinery.sql): settlement, burn-down, pins, entries.
-- Part 3 (20261204100020_credits_grants_functions.sql): the public functions.
--
-- SQLSTATEs, continuing the list at the top of 20261125000000_credits_ledger.sql (CR011: the
-- header of 20261204002000_credits_balance_ceiling.sql):
--
--   CR001 insufficient credits: its detail adds "scope", the scope the spending was judged for
--         ("" for unscoped spending): {"required": n, "available": n, "scope": s}
--   CR012 grant not found (an unknown grant, or another user's when a user is named)
--   CR013 grant not active (detail: {"state": "expired" | "depleted" | "voided"})
--   23514 (at commit) a change left a user's balance, held credits, grants or pins out of step
--
-- Time: every function that judges holds' or grants' times asks `credits_private.now()`, which
-- is the transaction's now() moved by `credits_private.clock` (zero unless a test moves it).

create table credits_private.clock (
  singleton boolean primary key default true check (singleton),
  "offset" interval not null default '0'
);
insert into credits_private.clock default values;

-- The time the credit functions go by. Security definer: the functions that run with the
-- caller's rights (reads) ask it too, and no API role may read the clock itself. PL/pgSQL, not
-- SQL, so that its one query is planned once per session, not at every call.
create function credits_private.now() returns timestamptz
language plpgsql stable
security definer
set search_path = ''
as $$
begin
  return pg_catalog.now() + (select c."offset" from credits_private.clock c);
end
$$;

-- Signup credits are a promotional grant; this is how long they last (null: for ever).
alter table credits_private.settings
  add column signup_ttl_seconds bigint check (signup_ttl_seconds > 0);

-- The earliest time at which something of the user's falls due (a pending hold's expiry, a
-- grant's effective or expire time), or null when nothing will. While it lies ahead, the stored
-- balance and held are exact and nothing needs settling: the money functions and reads use it
-- to skip the work. It may be early (a hold captured before its expiry), never late; the
-- invariant below checks that.
alter table public.credit_profiles add column next_settle_at timestamptz;
create index credit_profiles_to_settle on public.credit_profiles (next_settle_at)
  where next_settle_at is not null;

-- Every update of a row evaluates all of its table's check constraints, and a debit updates a
-- grant: so the constraints here are the few that a change of its amounts can break (one
-- expression), and what is fixed when a grant is made (or voided) is checked by the trigger
-- credit_grants_well_formed below, which fires only when those columns are written.
create table public.credit_grants (
  grant_id uuid primary key default gen_random_uuid(),
  -- Paging (newest first is `seq desc`) and the last tie-break of the burn-down order.
  seq bigint generated always as identity,
  user_id uuid not null references public.credit_profiles (user_id),
  amount bigint not null,
  -- What is left of it. Counts in the balance while the grant is activated and not expired.
  remaining bigint not null,
  -- The part of `remaining` pinned by pending holds (the sum of their pins on this grant).
  pinned bigint not null default 0,
  -- 'paid' or 'promotional'.
  category text not null default 'paid',
  -- 0..100, spent lowest first.
  priority integer not null default 50,
  -- What it pays for (empty: anything). Sorted, distinct, at most 20, each 1 to 100 printable
  -- characters (credit_grant makes them so).
  scopes text[] not null default '{}',
  effective_at timestamptz not null,
  -- Null: never. After effective_at.
  expires_at timestamptz,
  -- Its GRANT ledger entry is written (at creation, or when it fell due).
  activated boolean not null default false,
  -- Its expiry is settled: the EXPIRE entry of its remainder is written (none if nothing was
  -- left), and it holds nothing any more.
  expired boolean not null default false,
  -- Voided: its unpinned remainder left at once (a VOID entry); pinned credits stay until their
  -- hold settles, and then leave too. A grant voided before it took effect never activates.
  voided_at timestamptz,
  -- The GRANT entry, once written. Deferred: a grant and its entry are written together.
  transaction_id uuid references public.credit_transactions (transaction_id)
    deferrable initially deferred,
  -- The GrantCredits request's key and fingerprint (null key: made by the service itself).
  idempotency_key text,
  fingerprint text not null,
  description text not null default '',
  metadata jsonb not null default '{}',
  -- The VoidGrant request's, once voided.
  void_idempotency_key text,
  void_fingerprint text,
  created_at timestamptz not null,
  -- May still hold or receive spendable credits: what allocation and settlement read, through
  -- the partial index below. Stored, so that a debit that leaves a grant non-empty changes no
  -- indexed column (a HOT update).
  live boolean generated always as (remaining > 0 or (not activated and voided_at is null))
    stored,
  -- 0 <= pinned <= remaining <= amount; a settled expiry leaves nothing; a grant not yet
  -- effective is untouched.
  constraint credit_grants_amounts check (
    amount > 0 and remaining >= 0 and remaining <= amount and pinned >= 0
    and pinned <= remaining and (not expired or remaining = 0)
    and (activated or (remaining = amount and pinned = 0 and not expired))),
  constraint credit_grants_user_key unique (user_id, idempotency_key),
  constraint credit_grants_user_void_key unique (user_id, void_idempotency_key)
) with (fillfactor = 90);

-- The checks of what is fixed when a grant is made or voided, as a trigger on writes of those
-- columns (a debit writes none of them). Raises check_violation, as a constraint would.
create function credits_private.check_grant_row() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if new.category not in ('paid', 'promotional')
     or new.priority not between 0 and 100
     or pg_catalog.cardinality(new.scopes) > 20
     or pg_catalog.array_position(new.scopes, null) is not null
     or pg_catalog.array_position(new.scopes, '') is not null
     or (new.expires_at is not null and new.expires_at <= new.effective_at)
     or pg_catalog.char_length(new.idempotency_key) not between 1 and 255
     or pg_catalog.jsonb_typeof(new.metadata) <> 'object'
     or pg_catalog.char_length(new.void_idempotency_key) not between 1 and 255
     or (new.void_idempotency_key is not null and new.voided_at is null)
     or (new.void_idempotency_key is null) <> (new.void_fingerprint is null) then
    raise exception using errcode = '23514', table = 'credit_grants',
      constraint = 'credit_grants_well_formed',
      message = 'new row for relation "credit_grants" violates check constraint'
        || ' "credit_grants_well_formed"';
  end if;
  return new;
end
$$;

create trigger credit_grants_well_formed
  before insert or update of amount, category, priority, scopes, effective_at, expires_at,
    idempotency_key, metadata, voided_at, void_idempotency_key, void_fingerprint
  on public.credit_grants
  for each row execute function credits_private.check_grant_row();

create index credit_grants_live on public.credit_grants (user_id) where live;
create index credit_grants_by_user on public.credit_grants (user_id, seq desc);

-- Which grants paid for (or received, or lost) each ledger entry, in the order they were drawn.
create table public.credit_allocations (
  transaction_id uuid not null references public.credit_transactions (transaction_id),
  grant_id uuid not null references public.credit_grants (grant_id),
  user_id uuid not null,
  ordinal integer not null check (ordinal > 0),
  amount bigint not null check (amount > 0),
  primary key (transaction_id, grant_id)
);

-- The credits a hold sets aside, grant by grant, in burn-down order. A pin is live while its
-- hold is pending; the pins of settled holds stay as their history.
create table public.credit_hold_pins (
  hold_id uuid not null references public.credit_holds (hold_id),
  grant_id uuid not null references public.credit_grants (grant_id),
  user_id uuid not null,
  ordinal integer not null check (ordinal > 0),
  amount bigint not null check (amount > 0),
  primary key (hold_id, grant_id)
);
create index credit_hold_pins_by_grant on public.credit_hold_pins (grant_id);

-- Two new kinds of ledger entry: a grant's remainder leaving at its expiry, or when voided.
alter table public.credit_transactions drop constraint credit_transactions_kind_check;
alter table public.credit_transactions add constraint credit_transactions_kind_check
  check (kind in ('debit', 'grant', 'refund', 'capture', 'expire', 'void'));

-- Row-level security: a user's session reads its own grants, allocations and pins; the service
-- reads all; nobody writes but the functions.
revoke all on public.credit_grants, public.credit_allocations, public.credit_hold_pins
  from public, anon, authenticated, service_role;
grant select on public.credit_grants, public.credit_allocations, public.credit_hold_pins
  to authenticated, service_role;
alter table public.credit_grants enable row level security;
alter table public.credit_allocations enable row level security;
alter table public.credit_hold_pins enable row level security;
create policy credit_grants_read_own on public.credit_grants
  for select to authenticated using (user_id = (select auth.uid()));
create policy credit_allocations_read_own on public.credit_allocations
  for select to authenticated using (user_id = (select auth.uid()));
create policy credit_hold_pins_read_own on public.credit_hold_pins
  for select to authenticated using (user_id = (select auth.uid()));

-- Existing data: each user's balance becomes one paid, unscoped, never-expiring grant, taking
-- effect when the profile was made. No ledger entry: the ledger already sums to it (its
-- transaction_id stays null). Every pending hold pins its whole amount on it (overdue ones
-- too: they are pending until settled, and `held` counts them until then).
insert into public.credit_grants (
  user_id, amount, remaining, pinned, category, priority, scopes, effective_at, expires_at,
  activated, fingerprint, description, created_at)
select p.user_id, p.balance, p.balance, p.held, 'paid', 50, '{}', p.created_at, null, true,
       credits_private.fingerprint('balance', '{}'), 'balance before grants', p.created_at
  from public.credit_profiles p
 where p.balance > 0;

insert into public.credit_hold_pins (hold_id, grant_id, user_id, ordinal, amount)
select h.hold_id, g.grant_id, h.user_id, 1, h.amount
  from public.credit_holds h
  join public.credit_grants g on g.user_id = h.user_id
 where h.state = 'pending';

update public.credit_profiles p
   set next_settle_at = d.due
  from (select user_id, pg_catalog.min(expires_at) as due from public.credit_holds
         where state = 'pending' group by user_id) d
 where p.user_id = d.user_id;

-- The invariant, per user:
--   balance = the sum of `remaining` over the user's activated, unexpired grants (a voided
--             grant keeps only its pinned part, which counts until its hold settles)
--   held    = the sum of the user's pending holds = the sum of their pins = the sum of `pinned`
--   next_settle_at is no later than anything of the user's falling due.
-- (Per grant, 0 <= pinned <= remaining <= amount is a check constraint.)

-- The user's sums as the invariant compares them, for every user (null: all of them).
create view credits_private.books as
select p.user_id, p.balance, p.held, p.next_settle_at,
       coalesce(g.counted, 0) as counted, coalesce(g.pinned, 0) as pinned,
       coalesce(h.amount, 0) as holds, coalesce(h.pins, 0) as pins, least(g.due, h.due) as due
  from public.credit_profiles p
  left join (
    select x.user_id,
           pg_catalog.sum(x.remaining) filter (where x.activated and not x.expired) as counted,
           pg_catalog.sum(x.pinned) as pinned,
           pg_catalog.min(least(
             case when not x.activated and x.voided_at is null then x.effective_at end,
             case when not x.expired and x.voided_at is null then x.expires_at end)) as due
      from public.credit_grants x
     where x.live
     group by x.user_id) g on g.user_id = p.user_id
  left join (
    select y.user_id, pg_catalog.sum(y.amount) as amount,
           pg_catalog.sum((select pg_catalog.sum(q.amount) from public.credit_hold_pins q
                            where q.hold_id = y.hold_id)) as pins,
           pg_catalog.min(y.expires_at) as due
      from public.credit_holds y
     where y.state = 'pending'
     group by y.user_id) h on h.user_id = p.user_id;
revoke all on credits_private.books from public;

-- The conversion above, checked for every user at once before anything else runs on it.
do $$
declare
  v_out record;
begin
  select * into v_out from credits_private.books b
   where b.balance <> b.counted or b.held <> b.holds or b.held <> b.pins or b.held <> b.pinned
      or (b.due is not null and (b.next_settle_at is null or b.next_settle_at > b.due))
   limit 1;
  if found then
    raise exception 'converting balances into grants left a user out of step: %', row_to_json(v_out);
  end if;
end
$$;

-- Checks the changed row's user at commit (or at SET CONSTRAINTS ... IMMEDIATE). A change of a
-- grant, hold or pin is checked through its user's profile row when this transaction changes
-- that row too (the money functions do: see credits_private.touching_profile), so a debit costs
-- one check, not one per row it writes. One query, in the trigger itself: every money call pays
-- for it at commit. Security definer: it fires with the committing session's role, and must see
-- every row of the user.
create function credits_private.check_consistency() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_user uuid;
  v record;
  v_pins numeric := 0;
begin
  foreach v_user in array case
      when tg_op = 'DELETE' then array[old.user_id]
      when tg_op = 'UPDATE' and old.user_id is distinct from new.user_id
        then array[new.user_id, old.user_id]
      else array[new.user_id] end loop
    select p.balance, p.held, p.next_settle_at, g.counted, g.pinned, h.amount as holds,
           least(g.due, h.due) as due
      into v
      from public.credit_profiles p,
           lateral (
             select coalesce(pg_catalog.sum(x.remaining)
                               filter (where x.activated and not x.expired), 0) as counted,
                    coalesce(pg_catalog.sum(x.pinned), 0) as pinned,
                    pg_catalog.min(least(
                      case when not x.activated and x.voided_at is null then x.effective_at end,
                      case when not x.expired and x.voided_at is null then x.expires_at end))
                      as due
               from public.credit_grants x
              where x.user_id = p.user_id and x.live) g,
           lateral (
             select coalesce(pg_catalog.sum(y.amount), 0) as amount,
                    pg_catalog.min(y.expires_at) as due
               from public.credit_holds y
              where y.user_id = p.user_id and y.state = 'pending') h
     where p.user_id = v_user;
    -- No profile: a deleted one has no grants or holds either (foreign keys).
    continue when not found;
    if v.holds > 0 then
      select coalesce(pg_catalog.sum(q.amount), 0) into v_pins
        from public.credit_holds y
        join public.credit_hold_pins q on q.hold_id = y.hold_id
       where y.user_id = v_user and y.state = 'pending';
    end if;
    if v.balance <> v.counted or v.held <> v.holds or v.held <> v_pins or v.held <> v.pinned
       or (v.due is not null and (v.next_settle_at is null or v.next_settle_at > v.due)) then
      raise exception using errcode = '23514',
        message = 'the credit balance is out of step with its grants and holds',
        detail = pg_catalog.jsonb_build_object(
          'user_id', v_user, 'balance', v.balance, 'grants_remaining', v.counted,
          'held', v.held, 'pending_holds', v.holds, 'pins', v_pins, 'pinned', v.pinned,
          'next_settle_at', v.next_settle_at, 'due', v.due)::text;
    end if;
  end loop;
  return null;
end
$$;

-- (A debit verifies its profile row in the statement that writes it: see
-- credits_private.record.)
create constraint trigger credit_profiles_consistent
  after insert or update on public.credit_profiles
  deferrable initially deferred
  for each row
  when (pg_catalog.strpos(
          coalesce(pg_catalog.current_setting('credits.verified_profiles', true), ''),
          new.user_id::text) = 0)
  execute function credits_private.check_consistency();
create constraint trigger credit_profiles_deleted_consistent
  after delete on public.credit_profiles
  deferrable initially deferred
  for each row execute function credits_private.check_consistency();

create constraint trigger credit_grants_consistent
  after insert or update on public.credit_grants
  deferrable initially deferred
  for each row
  when (pg_catalog.strpos(
          coalesce(pg_catalog.current_setting('credits.touched_profiles', true), ''),
          new.user_id::text) = 0)
  execute function credits_private.check_consistency();
create constraint trigger credit_grants_deleted_consistent
  after delete on public.credit_grants
  deferrable initially deferred
  for each row execute function credits_private.check_consistency();
create constraint trigger credit_holds_consistent
  after insert or update on public.credit_holds
  deferrable initially deferred
  for each row
  when (pg_catalog.strpos(
          coalesce(pg_catalog.current_setting('credits.touched_profiles', true), ''),
          new.user_id::text) = 0)
  execute function credits_private.check_consistency();
create constraint trigger credit_holds_deleted_consistent
  after delete on public.credit_holds
  deferrable initially deferred
  for each row execute function credits_private.check_consistency();
create constraint trigger credit_hold_pins_consistent
  after insert or update on public.credit_hold_pins
  deferrable initially deferred
  for each row
  when (pg_catalog.strpos(
          coalesce(pg_catalog.current_setting('credits.touched_profiles', true), ''),
          new.user_id::text) = 0)
  execute function credits_private.check_consistency();
create constraint trigger credit_hold_pins_deleted_consistent
  after delete on public.credit_hold_pins
  deferrable initially deferred
  for each row execute function credits_private.check_consistency();

-- A hold's or grant's time moved by hand (tests age rows as the owner) falls due on time:
-- `next_settle_at` is lowered with it. The functions never change these columns.
create function credits_private.note_due_time() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  v_due timestamptz;
begin
  if tg_table_name = 'credit_holds' then
    v_due := case when new.state = 'pending' then new.expires_at end;
  else
    v_due := least(
      case when not new.activated and new.voided_at is null then new.effective_at end,
      case when new.live and not new.expired and new.voided_at is null then new.expires_at end);
  end if;
  if v_due is not null then
    update public.credit_profiles set next_settle_at = least(next_settle_at, v_due)
     where user_id = new.user_id and (next_settle_at is null or next_settle_at > v_due);
  end if;
  return null;
end
$$;

create trigger credit_holds_due_time_moved
  after update of expires_at on public.credit_holds
  for each row execute function credits_private.note_due_time();
create trigger credit_grants_due_time_moved
  after update of effective_at, expires_at on public.credit_grants
  for each row execute function credits_private.note_due_time();

revoke execute on all functions in schema credits_private from public;
grant execute on function credits_private.now() to authenticated, service_role;
