-- The credit ledger: profiles, an append-only ledger, holds and generations, guarded by
-- row-level security. Money moves only through the security-definer functions below; a user's
-- own session (anon key + JWT, as Supabase clients use it) can read its rows and change nothing.
--
-- Errors raised on purpose carry SQLSTATEs of class CR, which both transports map to the
-- contract's errors:
--   CR001 insufficient credits (detail: {"required": n, "available": n})
--   CR002 idempotency key reused with different parameters
--   CR003 profile not found          CR004 hold not found
--   CR005 hold not pending           CR006 transaction not found
--   CR007 refund exceeds debit       CR008 invalid argument (detail: {"field": .., "description": ..})
--   CR009 generation not found       CR010 generation not cancellable (already final)
--   42501 the caller may not act on this user (row-level policy)

create schema if not exists credits_private;
revoke all on schema credits_private from public;

-- Deployment settings the functions read; written by the service at start-up.
create table credits_private.settings (
  singleton boolean primary key default true check (singleton),
  signup_credits bigint not null default 0 check (signup_credits >= 0)
);
insert into credits_private.settings default values;

create table public.credit_profiles (
  user_id uuid primary key,
  email text not null default '',
  balance bigint not null default 0,
  -- Sum of pending holds. A pending hold past its expiry stops counting at once (readers
  -- subtract it); the next mutation or the sweeper marks it expired and lowers this column.
  held bigint not null default 0,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint credit_profiles_balance_nonnegative check (balance >= 0),
  constraint credit_profiles_held_within_balance check (held >= 0 and held <= balance)
);

create table public.credit_holds (
  hold_id uuid primary key default gen_random_uuid(),
  user_id uuid not null references public.credit_profiles (user_id),
  amount bigint not null check (amount > 0),
  state text not null default 'pending'
    check (state in ('pending', 'captured', 'released', 'expired')),
  idempotency_key text not null check (char_length(idempotency_key) between 1 and 255),
  fingerprint text not null,
  description text not null default '',
  expires_at timestamptz not null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint credit_holds_user_key unique (user_id, idempotency_key)
);
create index credit_holds_pending_by_user on public.credit_holds (user_id) where state = 'pending';
create index credit_holds_pending_by_expiry on public.credit_holds (expires_at)
  where state = 'pending';

create table public.credit_transactions (
  transaction_id uuid primary key default gen_random_uuid(),
  -- Total order of the ledger: newest first is `seq desc`, stable under equal timestamps.
  seq bigint generated always as identity,
  user_id uuid not null references public.credit_profiles (user_id),
  kind text not null check (kind in ('debit', 'grant', 'refund', 'capture')),
  amount bigint not null check (amount > 0),
  balance_after bigint not null check (balance_after >= 0),
  -- Null only for entries the service makes itself (signup credits).
  idempotency_key text check (char_length(idempotency_key) between 1 and 255),
  fingerprint text not null,
  description text not null default '',
  metadata jsonb not null default '{}' check (jsonb_typeof(metadata) = 'object'),
  refunded_transaction_id uuid references public.credit_transactions (transaction_id),
  hold_id uuid references public.credit_holds (hold_id),
  created_at timestamptz not null default now(),
  constraint credit_transactions_user_key unique (user_id, idempotency_key),
  constraint credit_transactions_refund_names_its_debit
    check ((kind = 'refund') = (refunded_transaction_id is not null)),
  constraint credit_transactions_capture_names_its_hold
    check ((kind = 'capture') = (hold_id is not null))
);
create index credit_transactions_by_user on public.credit_transactions (user_id, seq desc);
create index credit_transactions_refunds on public.credit_transactions (refunded_transaction_id)
  where refunded_transaction_id is not null;

create table public.credit_generations (
  generation_id uuid primary key default gen_random_uuid(),
  user_id uuid not null references public.credit_profiles (user_id),
  model text not null,
  prompt text not null,
  parameters jsonb not null default '{}' check (jsonb_typeof(parameters) = 'object'),
  state text not null default 'queued'
    check (state in ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
  cost bigint not null check (cost >= 0),
  hold_id uuid references public.credit_holds (hold_id),
  transaction_id uuid references public.credit_transactions (transaction_id),
  output bytea,
  output_mime_type text not null default '',
  error_message text not null default '',
  attempts integer not null default 0 check (attempts >= 0),
  request_id text not null check (char_length(request_id) between 1 and 255),
  fingerprint text not null,
  lease_owner text,
  lease_expires_at timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint credit_generations_user_request unique (user_id, request_id)
);
create index credit_generations_by_user on public.credit_generations (user_id, created_at desc);
create index credit_generations_queued on public.credit_generations (created_at)
  where state in ('queued', 'running');

-- The ledger is append-only for every role, the owner included.
create function credits_private.forbid_ledger_change() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  raise exception using errcode = '42501', message = 'the credit ledger is append-only';
end
$$;

create trigger credit_transactions_append_only
  before update or delete on public.credit_transactions
  for each row execute function credits_private.forbid_ledger_change();
create trigger credit_transactions_no_truncate
  before truncate on public.credit_transactions
  for each statement execute function credits_private.forbid_ledger_change();

-- Row-level security: each user reads their own rows; nobody writes but the functions below.
-- (Supabase grants every new public table to anon and authenticated by default: take it back.)
revoke all on public.credit_profiles, public.credit_transactions, public.credit_holds,
  public.credit_generations from public, anon, authenticated, service_role;
grant select on public.credit_profiles, public.credit_transactions, public.credit_holds,
  public.credit_generations to authenticated, service_role;

alter table public.credit_profiles enable row level security;
alter table public.credit_transactions enable row level security;
alter table public.credit_holds enable row level security;
alter table public.credit_generations enable row level security;

create policy credit_profiles_read_own on public.credit_profiles
  for select to authenticated using (user_id = (select auth.uid()));
create policy credit_transactions_read_own on public.credit_transactions
  for select to authenticated using (user_id = (select auth.uid()));
create policy credit_holds_read_own on public.credit_holds
  for select to authenticated using (user_id = (select auth.uid()));
create policy credit_generations_read_own on public.credit_generations
  for select to authenticated using (user_id = (select auth.uid()));

-- Internal helpers. They run inside the security-definer functions, as the owner.

-- A user may act only on their own id; service_role and the owner may act on any.
create function credits_private.assert_may_act_for(p_user_id uuid) returns void
language plpgsql stable
set search_path = ''
as $$
begin
  if pg_catalog.current_setting('role', true) is distinct from 'service_role'
     and pg_catalog.current_setting('role', true) is distinct from 'none'
     and p_user_id is distinct from auth.uid() then
    raise exception using errcode = '42501',
      message = 'a user may act only on their own credits';
  end if;
end
$$;

create function credits_private.invalid(p_field text, p_description text) returns void
language plpgsql
set search_path = ''
as $$
begin
  raise exception using errcode = 'CR008', message = p_field || ': ' || p_description,
    detail = pg_catalog.jsonb_build_object('field', p_field, 'description', p_description)::text;
end
$$;

create function credits_private.key_reused() returns void
language plpgsql
set search_path = ''
as $$
begin
  raise exception using errcode = 'CR002',
    message = 'the idempotency key was already used with different parameters';
end
$$;

-- Refuses `p_required` credits when only `p_available` are available.
create function credits_private.require_available(p_required bigint, p_available bigint)
returns void
language plpgsql
set search_path = ''
as $$
begin
  if p_available < p_required then
    raise exception using errcode = 'CR001', message = 'insufficient credits',
      detail = pg_catalog.jsonb_build_object(
        'required', p_required, 'available', p_available)::text;
  end if;
end
$$;

create function credits_private.check_amount(p_amount bigint) returns void
language plpgsql
set search_path = ''
as $$
begin
  if p_amount is null or p_amount <= 0 then
    perform credits_private.invalid('amount', 'must be a positive whole number of credits');
  end if;
end
$$;

create function credits_private.check_key(
  p_idempotency_key text, p_field text default 'idempotency_key'
) returns void
language plpgsql
set search_path = ''
as $$
begin
  if p_idempotency_key is null or pg_catalog.char_length(p_idempotency_key) not between 1 and 255
     or p_idempotency_key ~ '[[:cntrl:]]' then
    perform credits_private.invalid(p_field, 'must be 1 to 255 printable characters');
  end if;
end
$$;

-- The request's fingerprint: the operation and its parameters, canonicalised by jsonb.
create function credits_private.fingerprint(p_operation text, p_parameters jsonb) returns text
language sql immutable
set search_path = ''
as $$
  select pg_catalog.encode(
    pg_catalog.sha256(pg_catalog.convert_to(p_operation || ':' || p_parameters::text, 'UTF8')),
    'hex')
$$;

-- Marks the user's pending holds past expiry as expired and takes them out of `held`.
-- The caller holds the profile's row lock.
create function credits_private.expire_holds(p_user_id uuid) returns void
language plpgsql
set search_path = ''
as $$
declare
  v_expired bigint;
begin
  with expired as (
    update public.credit_holds
       set state = 'expired', updated_at = pg_catalog.now()
     where user_id = p_user_id and state = 'pending' and expires_at <= pg_catalog.now()
    returning amount
  )
  select pg_catalog.sum(amount) into v_expired from expired;
  if v_expired is not null then
    update public.credit_profiles set held = held - v_expired where user_id = p_user_id;
  end if;
end
$$;

-- Locks the user's profile for this transaction (serialising their money operations), after
-- bringing its holds up to date.
create function credits_private.lock_profile(p_user_id uuid)
returns public.credit_profiles
language plpgsql
set search_path = ''
as $$
declare
  v_profile public.credit_profiles;
begin
  perform 1 from public.credit_profiles where user_id = p_user_id for update;
  if not found then
    raise exception using errcode = 'CR003', message = 'no credit profile for this user';
  end if;
  perform credits_private.expire_holds(p_user_id);
  select * into v_profile from public.credit_profiles where user_id = p_user_id;
  return v_profile;
end
$$;

-- The earlier ledger entry made with this key, if any; a different request under the same key
-- (also a hold's key) is CR002. The caller holds the profile's row lock.
create function credits_private.replay(
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
  if (found and v_tx.fingerprint <> p_fingerprint)
     or exists (select 1 from public.credit_holds
                 where user_id = p_user_id and idempotency_key = p_idempotency_key) then
    perform credits_private.key_reused();
  end if;
  return v_tx;
end
$$;

create function credits_private.transaction_json(t public.credit_transactions) returns jsonb
language sql immutable
set search_path = ''
as $$
  select pg_catalog.jsonb_build_object(
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
    'seq', t.seq)
$$;

-- Appends a ledger entry and moves the balance by `p_delta`, returning the function's result.
-- The caller holds the profile's row lock and has checked that the balance stays >= held.
create function credits_private.append(
  p_user_id uuid, p_kind text, p_delta bigint, p_idempotency_key text, p_fingerprint text,
  p_description text, p_metadata jsonb,
  p_refunded_transaction_id uuid default null, p_hold_id uuid default null
) returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_balance bigint;
  v_tx public.credit_transactions;
begin
  update public.credit_profiles
     set balance = balance + p_delta, updated_at = pg_catalog.now()
   where user_id = p_user_id
  returning balance into v_balance;
  insert into public.credit_transactions (
    user_id, kind, amount, balance_after, idempotency_key, fingerprint, description, metadata,
    refunded_transaction_id, hold_id)
  values (
    p_user_id, p_kind, abs(p_delta), v_balance, p_idempotency_key, p_fingerprint,
    coalesce(p_description, ''), coalesce(p_metadata, '{}'::jsonb),
    p_refunded_transaction_id, p_hold_id)
  returning * into v_tx;
  return pg_catalog.jsonb_build_object(
    'transaction', credits_private.transaction_json(v_tx), 'balance', v_balance,
    'replayed', false);
end
$$;

create function credits_private.replayed(t public.credit_transactions) returns jsonb
language sql immutable
set search_path = ''
as $$
  select pg_catalog.jsonb_build_object(
    'transaction', credits_private.transaction_json(t), 'balance', t.balance_after,
    'replayed', true)
$$;

-- Public API: the only ways to read and move credits.

-- Sets the deployment's settings (service only; called by the service at start-up).
create function public.credit_configure(p_signup_credits bigint) returns void
language plpgsql
security definer
set search_path = ''
as $$
begin
  if p_signup_credits is null or p_signup_credits < 0 then
    perform credits_private.invalid('signup_credits', 'must be a whole number >= 0');
  end if;
  update credits_private.settings set signup_credits = p_signup_credits;
end
$$;

-- Creates the user's profile if missing (with the signup credits, as a ledger grant), and
-- returns it. Race-free: concurrent first calls create it once. A user's own session may call
-- it for itself only, and its email then comes from its verified token.
create function public.credit_provision_profile(p_user_id uuid, p_email text default '')
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_signup bigint;
  v_email text := coalesce(p_email, '');
  v_created boolean;
begin
  perform credits_private.assert_may_act_for(p_user_id);
  if pg_catalog.current_setting('role', true) = 'authenticated' then
    v_email := coalesce(auth.jwt() ->> 'email', '');
  end if;
  select signup_credits into v_signup from credits_private.settings;
  insert into public.credit_profiles (user_id, email)
  values (p_user_id, v_email)
  on conflict (user_id) do nothing;
  v_created := found;
  if v_created and v_signup > 0 then
    perform credits_private.append(
      p_user_id, 'grant', v_signup, null, credits_private.fingerprint('signup', '{}'),
      'signup credits', '{}');
  end if;
  return pg_catalog.jsonb_build_object('created', v_created);
end
$$;

-- The user's profile, with `held` counted by time. CR003 when there is none, or when row-level
-- security hides it: runs with the caller's rights, so policies apply.
create function public.credit_get_profile(p_user_id uuid) returns jsonb
language plpgsql stable
set search_path = ''
as $$
declare
  v_profile jsonb;
begin
  select pg_catalog.jsonb_build_object(
           'user_id', p.user_id,
           'email', p.email,
           'balance', p.balance,
           'held', p.held - e.expired,
           'available', p.balance - p.held + e.expired,
           'create_time', p.created_at,
           'update_time', p.updated_at)
    into v_profile
    from public.credit_profiles p
   cross join lateral (
     select coalesce(pg_catalog.sum(h.amount), 0) as expired
       from public.credit_holds h
      where h.user_id = p.user_id and h.state = 'pending' and h.expires_at <= pg_catalog.now()
   ) e
   where p.user_id = p_user_id;
  if v_profile is null then
    raise exception using errcode = 'CR003', message = 'no credit profile for this user';
  end if;
  return v_profile;
end
$$;

-- One page of the user's ledger, newest first, after `p_before_seq` (null: from the newest),
-- of the kinds `p_kinds` (null: all) created in [p_start, p_end) (each null: unbounded).
-- CR003 when the profile is missing or hidden; runs with the caller's rights.
create function public.credit_list_transactions(
  p_user_id uuid, p_limit integer, p_before_seq bigint default null,
  p_kinds text[] default null, p_start timestamptz default null, p_end timestamptz default null
) returns jsonb
language plpgsql stable
set search_path = ''
as $$
begin
  if not exists (select 1 from public.credit_profiles where user_id = p_user_id) then
    raise exception using errcode = 'CR003', message = 'no credit profile for this user';
  end if;
  return (
    select coalesce(
             pg_catalog.jsonb_agg(credits_private.transaction_json(t) order by t.seq desc),
             '[]'::jsonb)
      from (select * from public.credit_transactions
             where user_id = p_user_id
               and (p_before_seq is null or seq < p_before_seq)
               and (p_kinds is null or kind = any (p_kinds))
               and (p_start is null or created_at >= p_start)
               and (p_end is null or created_at < p_end)
             order by seq desc
             limit p_limit) t);
end
$$;

-- A debit (negative) or grant (positive) of `p_amount`, idempotent by key. The caller has
-- checked who may do it.
create function credits_private.move(
  p_kind text, p_user_id uuid, p_amount bigint, p_idempotency_key text, p_description text,
  p_metadata jsonb
) returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_fingerprint text := credits_private.fingerprint(p_kind, pg_catalog.jsonb_build_object(
    'amount', p_amount, 'description', coalesce(p_description, ''),
    'metadata', coalesce(p_metadata, '{}'::jsonb)));
  v_profile public.credit_profiles;
  v_tx public.credit_transactions;
begin
  perform credits_private.check_amount(p_amount);
  perform credits_private.check_key(p_idempotency_key);
  v_profile := credits_private.lock_profile(p_user_id);
  v_tx := credits_private.replay(p_user_id, p_idempotency_key, v_fingerprint);
  if v_tx.transaction_id is not null then
    return credits_private.replayed(v_tx);
  end if;
  if p_kind = 'debit' then
    perform credits_private.require_available(p_amount, v_profile.balance - v_profile.held);
  end if;
  return credits_private.append(
    p_user_id, p_kind, case when p_kind = 'debit' then -p_amount else p_amount end,
    p_idempotency_key, v_fingerprint, p_description, p_metadata);
end
$$;

-- Spends credits now, if available (balance - held) covers them. Idempotent by key.
create function public.credit_debit(
  p_user_id uuid, p_amount bigint, p_idempotency_key text, p_description text default '',
  p_metadata jsonb default '{}'
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
begin
  perform credits_private.assert_may_act_for(p_user_id);
  return credits_private.move(
    'debit', p_user_id, p_amount, p_idempotency_key, p_description, p_metadata);
end
$$;

-- Gives credits to a user (service only). Idempotent by key.
create function public.credit_grant(
  p_user_id uuid, p_amount bigint, p_idempotency_key text, p_description text default '',
  p_metadata jsonb default '{}'
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
begin
  return credits_private.move(
    'grant', p_user_id, p_amount, p_idempotency_key, p_description, p_metadata);
end
$$;

-- Execute rights: nothing for public or anon; users get what they may call for themselves.
revoke execute on all functions in schema credits_private from public;
revoke execute on function
  public.credit_configure(bigint),
  public.credit_provision_profile(uuid, text),
  public.credit_get_profile(uuid),
  public.credit_list_transactions(uuid, integer, bigint, text[], timestamptz, timestamptz),
  public.credit_debit(uuid, bigint, text, text, jsonb),
  public.credit_grant(uuid, bigint, text, text, jsonb)
  from public, anon, authenticated;
grant usage on schema credits_private to authenticated, service_role;
grant execute on function credits_private.transaction_json(public.credit_transactions)
  to authenticated, service_role;
grant execute on function
  public.credit_provision_profile(uuid, text),
  public.credit_get_profile(uuid),
  public.credit_list_transactions(uuid, integer, bigint, text[], timestamptz, timestamptz),
  public.credit_debit(uuid, bigint, text, text, jsonb)
  to authenticated, service_role;
grant execute on function
  public.credit_configure(bigint),
  public.credit_grant(uuid, bigint, text, text, jsonb)
  to service_role;
