-- Events (issue 19): a transactional outbox, low-balance thresholds, webhook endpoints and their
-- deliveries, and the balance feed of WatchBalance.
--
-- Every event is written by a trigger on the table whose change it reports, so it is part of
-- the same transaction as the change: a rolled-back change has no event, a committed one has
-- exactly one. No money function is redefined:
--   transaction.created   AFTER INSERT on credit_transactions (every ledger entry)
--   balance.low / .depleted / .recovered
--                         AFTER UPDATE of balance, held on credit_profiles (available =
--                         balance - held crossed a threshold, reached 0, came back)
--   grant.expired         AFTER UPDATE of expired on credit_grants (its EXPIRE entry written)
--   generation.succeeded / .failed / .cancelled
--                         AFTER UPDATE of state on credit_generations (a final state)
--   grant.expiring        credit_notice_expiring_grants(), run by the event pump: once per grant
--                         whose expiry is within the expiry notice
--
-- Order: an event carries the id of the transaction that wrote it (`xid`). Readers (ListEvents,
-- the webhook dispatcher) see only events of transactions older than every transaction still
-- running (pg_snapshot_xmin of their snapshot) and go in (xid, seq) order, so an event that
-- commits late can never land behind a cursor that already moved past it.
--
-- An unknown webhook endpoint or delivery (operators' calls, from the CLI) is CR008 naming
-- `endpoint_id` or `delivery_id`.
--
-- Nobody but the service reads events, endpoints, secrets or deliveries: they live in
-- credits_private, reached only through service-only functions.

-- The deployment's defaults, written by the service at start (credit_configure_events).
alter table credits_private.settings
  add column low_balance_thresholds bigint[] not null default '{}',
  add column expiry_notice_seconds bigint not null default 259200;

-- An event is known by its transaction and its number, (xid, seq), which is also its order;
-- its id is those two as a UUID (credits_private.event_id): one index, nothing random to make.
create table credits_private.events (
  xid xid8 not null default pg_current_xact_id(),
  seq bigint generated always as identity,
  type text not null,
  user_id uuid not null,
  created_at timestamptz not null,
  -- transaction.created: the ledger entry, rendered when read (the ledger is append-only, so it
  -- reads the same then as now); other events carry their payload in `data`.
  transaction_id uuid,
  data jsonb,
  primary key (xid, seq)
);

-- The event id of (xid, seq): 16 hex digits of each, as a UUID.
create function credits_private.event_id(p_xid xid8, p_seq bigint) returns uuid
language sql immutable
set search_path = ''
as $$
  select (pg_catalog.lpad(pg_catalog.to_hex(p_xid::text::bigint), 16, '0')
          || pg_catalog.lpad(pg_catalog.to_hex(p_seq), 16, '0'))::uuid
$$;

-- The event an id names, or none (a row of nulls).
create function credits_private.event_of(p_event_id uuid) returns credits_private.events
language plpgsql stable
set search_path = ''
as $$
declare
  v_hex text := pg_catalog.replace(p_event_id::text, '-', '');
  v_xid bigint := ('x' || pg_catalog.left(v_hex, 16))::bit(64)::bigint;
  v_event credits_private.events;
begin
  if v_xid >= 0 then
    select * into v_event from credits_private.events e
     where e.xid = v_xid::text::xid8
       and e.seq = ('x' || pg_catalog.right(v_hex, 16))::bit(64)::bigint;
  end if;
  return v_event;
end
$$;

-- A user's own thresholds (null: the deployment's defaults), and whether a low or depleted
-- event was sent since the last balance.recovered.
create table credits_private.balance_alerts (
  user_id uuid primary key references public.credit_profiles (user_id),
  thresholds bigint[],
  low boolean not null default false
);

-- Who watches a user's balance (WatchBalance on the direct transport), until when: only their
-- changes are announced with NOTIFY.
create table credits_private.balance_watchers (
  user_id uuid primary key,
  until timestamptz not null
);

-- grant.expiring was sent for these grants.
create table credits_private.grant_notices (
  grant_id uuid primary key references public.credit_grants (grant_id)
);
create index credit_grants_expiring on public.credit_grants (expires_at)
  where live and expires_at is not null;

create table credits_private.webhook_endpoints (
  endpoint_id uuid primary key default gen_random_uuid(),
  url text not null check (char_length(url) between 1 and 2000),
  -- Empty: every type.
  event_types text[] not null default '{}',
  secret text not null,
  -- It receives the events numbered after this one only: no history.
  after_seq bigint not null,
  created_at timestamptz not null default now()
);

create table credits_private.webhook_deliveries (
  delivery_id uuid primary key default gen_random_uuid(),
  endpoint_id uuid not null references credits_private.webhook_endpoints on delete cascade,
  event_xid xid8 not null,
  event_seq bigint not null,
  state text not null default 'pending' check (state in ('pending', 'delivered', 'failed')),
  -- Attempts started (a claim counts one, even if its worker died before the answer).
  attempts integer not null default 0,
  -- Pending: when it may be claimed next (a claim moves it to the end of its lease).
  next_attempt_at timestamptz not null default now(),
  lease_owner text,
  last_status integer,
  last_error text not null default '',
  created_at timestamptz not null default now(),
  delivered_at timestamptz,
  unique (endpoint_id, event_xid, event_seq),
  foreign key (event_xid, event_seq) references credits_private.events (xid, seq)
);
create index webhook_deliveries_due on credits_private.webhook_deliveries (next_attempt_at)
  where state = 'pending';
create index webhook_deliveries_by_state on credits_private.webhook_deliveries (state, created_at);

-- How far the dispatcher has fanned events out into deliveries.
create table credits_private.event_cursor (
  singleton boolean primary key default true check (singleton),
  xid xid8 not null default '0',
  seq bigint not null default 0
);
insert into credits_private.event_cursor default values;

-- The event types, as the contract lists them.
create function credits_private.event_types() returns text[]
language sql immutable
set search_path = ''
as $$
  select array['transaction.created', 'balance.low', 'balance.depleted', 'balance.recovered',
               'grant.expiring', 'grant.expired', 'generation.succeeded', 'generation.failed',
               'generation.cancelled']
$$;

-- An event as ListEvents and the webhooks show it.
create function credits_private.event_json(e credits_private.events) returns jsonb
language plpgsql stable
set search_path = ''
as $$
declare
  v_payload jsonb := e.data;
  v_tx public.credit_transactions;
begin
  if v_payload is null then
    select * into v_tx from public.credit_transactions t where t.transaction_id = e.transaction_id;
    v_payload := credits_private.transaction_json(v_tx) - 'seq';
  end if;
  return pg_catalog.jsonb_build_object(
    'event_id', credits_private.event_id(e.xid, e.seq), 'type', e.type, 'user_id', e.user_id,
    'create_time', e.created_at,
    'payload', v_payload);
end
$$;

-- 1. The triggers.

create function credits_private.on_transaction_created() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  insert into credits_private.events (type, user_id, created_at, transaction_id)
  values ('transaction.created', new.user_id, new.created_at, new.transaction_id);
  return null;
end
$$;

create trigger credit_transactions_event
  after insert on public.credit_transactions
  for each row execute function credits_private.on_transaction_created();

-- The balance as the balance events and WatchBalance show it.
create function credits_private.balance_json(p public.credit_profiles) returns jsonb
language sql immutable
set search_path = ''
as $$
  select pg_catalog.jsonb_build_object(
    'user_id', p.user_id, 'balance', p.balance, 'held', p.held,
    'available', p.balance - p.held, 'update_time', p.updated_at)
$$;

-- Available = balance - held changed: announce it to watchers, and judge the thresholds. A
-- threshold fires when available falls from at or above it to below it (so once per downward
-- crossing: the profile row's lock orders every change of a user), and is armed again by
-- rising to it. Under the same lock, `low` remembers that a low or depleted event went out, so
-- that balance.recovered follows only those.
create function credits_private.on_balance_changed() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_old bigint := old.balance - old.held;
  v_new bigint := new.balance - new.held;
  v_state record;
  v_threshold bigint;
  v_fired boolean := false;
begin
  -- One query for all the trigger needs (this runs in every debit): the thresholds in force
  -- (ascending), whether a low event is out, whether anyone watches.
  select coalesce(a.thresholds, s.low_balance_thresholds) as thresholds,
         coalesce(a.low, false) as low,
         exists (select 1 from credits_private.balance_watchers w
                  where w.user_id = new.user_id and w.until > pg_catalog.now()) as watched
    into v_state
    from credits_private.settings s
    left join credits_private.balance_alerts a on a.user_id = new.user_id;
  if v_state.watched then
    perform pg_catalog.pg_notify('credit_balances',
      (credits_private.balance_json(new)
       || pg_catalog.jsonb_build_object('xid', pg_catalog.pg_current_xact_id()::text))::text);
  end if;
  if v_new < v_old then
    -- Highest first: the order in which a falling balance crosses them.
    for i in reverse pg_catalog.cardinality(v_state.thresholds)..1 loop
      v_threshold := v_state.thresholds[i];
      if v_old >= v_threshold and v_new < v_threshold then
        insert into credits_private.events (type, user_id, created_at, data)
        values ('balance.low', new.user_id, new.updated_at,
                credits_private.balance_json(new)
                || pg_catalog.jsonb_build_object('threshold', v_threshold));
        v_fired := true;
      end if;
    end loop;
    if v_new = 0 then
      insert into credits_private.events (type, user_id, created_at, data)
      values ('balance.depleted', new.user_id, new.updated_at, credits_private.balance_json(new));
      v_fired := true;
    end if;
    if v_fired and not v_state.low then
      insert into credits_private.balance_alerts (user_id, low) values (new.user_id, true)
        on conflict (user_id) do update set low = true;
    end if;
  elsif v_new > v_old and v_state.low and v_new > 0
        and v_new >= coalesce(v_state.thresholds[pg_catalog.cardinality(v_state.thresholds)], 0)
  then
    insert into credits_private.events (type, user_id, created_at, data)
    values ('balance.recovered', new.user_id, new.updated_at, credits_private.balance_json(new));
    update credits_private.balance_alerts set low = false where user_id = new.user_id;
  end if;
  return null;
end
$$;

create trigger credit_profiles_balance_event
  after update of balance, held on public.credit_profiles
  for each row
  when (old.balance is distinct from new.balance or old.held is distinct from new.held)
  execute function credits_private.on_balance_changed();

create function credits_private.on_grant_expired() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_now timestamptz := credits_private.now();
begin
  insert into credits_private.events (type, user_id, created_at, data)
  values ('grant.expired', new.user_id, v_now, credits_private.grant_json(new, v_now) - 'seq');
  return null;
end
$$;

create trigger credit_grants_expired_event
  after update of expired on public.credit_grants
  for each row when (new.expired and not old.expired)
  execute function credits_private.on_grant_expired();

create function credits_private.on_generation_ended() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  insert into credits_private.events (type, user_id, created_at, data)
  values ('generation.' || new.state, new.user_id, new.updated_at,
          credits_private.generation_json(new, false) - 'seq' - 'output');
  return null;
end
$$;

create trigger credit_generations_ended_event
  after update of state on public.credit_generations
  for each row
  when (new.state in ('succeeded', 'failed', 'cancelled') and old.state is distinct from new.state)
  execute function credits_private.on_generation_ended();

-- 2. Configuration, thresholds and the balance watch.

-- The deployment's default thresholds and expiry notice (service only; called at start-up).
create function public.credit_configure_events(
  p_low_balance_thresholds bigint[], p_expiry_notice_seconds bigint
) returns void
language plpgsql
security definer
set search_path = ''
as $$
begin
  perform credits_private.check_thresholds(p_low_balance_thresholds);
  if p_expiry_notice_seconds is null or p_expiry_notice_seconds not between 1 and 366 * 86400 then
    perform credits_private.invalid('expiry_notice_seconds', 'must be between 1 second and 366 days');
  end if;
  update credits_private.settings
     set low_balance_thresholds = p_low_balance_thresholds,
         expiry_notice_seconds = p_expiry_notice_seconds;
end
$$;

-- Thresholds: at most 10, each above 0, ascending without repeats.
create function credits_private.check_thresholds(p_thresholds bigint[]) returns void
language plpgsql immutable
set search_path = ''
as $$
begin
  if p_thresholds is null or pg_catalog.cardinality(p_thresholds) > 10
     or pg_catalog.array_position(p_thresholds, null) is not null
     or exists (select 1 from pg_catalog.unnest(p_thresholds) t where t <= 0)
     or p_thresholds <> array(select distinct t from pg_catalog.unnest(p_thresholds) t order by t)
  then
    perform credits_private.invalid('thresholds',
      'at most 10 whole numbers above 0, ascending, without repeats');
  end if;
end
$$;

-- The profile as GetProfile shows it: credit_get_profile, with the user's thresholds (their
-- own, or the defaults) and whether they are the defaults. Acts for the user as the caller may.
create function public.credit_get_profile_alerts(p_user_id uuid) returns jsonb
language plpgsql stable
security definer
set search_path = ''
as $$
declare
  v_own bigint[];
begin
  perform credits_private.assert_may_act_for(p_user_id);
  select a.thresholds into v_own from credits_private.balance_alerts a where a.user_id = p_user_id;
  return public.credit_get_profile(p_user_id) || pg_catalog.jsonb_build_object(
    'low_balance_thresholds',
    pg_catalog.to_jsonb(coalesce(v_own, (select s.low_balance_thresholds
                                           from credits_private.settings s))),
    'low_balance_thresholds_default', v_own is null);
end
$$;

-- Sets a user's thresholds (null: the deployment's defaults again); service only. Returns the
-- profile as credit_get_profile_alerts does. Sets nothing off: thresholds fire on the next
-- crossing.
create function public.credit_set_balance_alerts(p_user_id uuid, p_thresholds bigint[])
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
begin
  if p_thresholds is not null then
    perform credits_private.check_thresholds(p_thresholds);
  end if;
  if not exists (select 1 from public.credit_profiles where user_id = p_user_id) then
    raise exception using errcode = 'CR003', message = 'no credit profile for this user';
  end if;
  insert into credits_private.balance_alerts (user_id, thresholds)
  values (p_user_id, p_thresholds)
  on conflict (user_id) do update set thresholds = excluded.thresholds;
  return public.credit_get_profile_alerts(p_user_id);
end
$$;

-- WatchBalance's read: the balance now, and the snapshot it was read in (so that the watcher
-- can tell which announced changes it already includes); the user's changes are announced on
-- channel credit_balances for the next `p_seconds`. Acts for the user as the caller may.
create function public.credit_watch_balance(p_user_id uuid, p_seconds integer) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_balance jsonb;
begin
  perform credits_private.assert_may_act_for(p_user_id);
  if p_seconds is null or p_seconds not between 1 and 3600 then
    perform credits_private.invalid('seconds', 'must be between 1 and 3600');
  end if;
  insert into credits_private.balance_watchers as w (user_id, until)
  values (p_user_id, pg_catalog.now() + p_seconds * interval '1 second')
  on conflict (user_id) do update set until = greatest(w.until, excluded.until);
  -- One statement: the snapshot is the one the balance was read in.
  select credits_private.balance_json(p)
         || pg_catalog.jsonb_build_object('snapshot', pg_catalog.pg_current_snapshot()::text)
    into v_balance
    from public.credit_profiles p where p.user_id = p_user_id;
  if v_balance is null then
    raise exception using errcode = 'CR003', message = 'no credit profile for this user';
  end if;
  return v_balance;
end
$$;

-- 3. Reading events, and grant.expiring.

-- Events after `p_after_event_id` (null: from the first) in commit order, of `p_types` (null:
-- all), at most `p_limit`; only events of transactions older than every one still running,
-- so that a later page never holds an event that belongs before this one. Service only.
create function public.credit_list_events(
  p_after_event_id uuid, p_types text[], p_limit integer
) returns jsonb
language plpgsql stable
security definer
set search_path = ''
as $$
declare
  v_after credits_private.events;
  v_horizon xid8 := pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot());
begin
  if p_limit is null or p_limit not between 1 and 1000 then
    perform credits_private.invalid('page_size', 'must be between 1 and 1000');
  end if;
  if p_types is not null and not p_types <@ credits_private.event_types() then
    perform credits_private.invalid('types', 'unknown event type');
  end if;
  if p_after_event_id is not null then
    v_after := credits_private.event_of(p_after_event_id);
    if v_after.seq is null then
      perform credits_private.invalid('after_event_id', 'no such event');
    end if;
  end if;
  return coalesce((
    select pg_catalog.jsonb_agg(credits_private.event_json(e) order by e.xid, e.seq)
      from (select * from credits_private.events e
             where (v_after.seq is null or (e.xid, e.seq) > (v_after.xid, v_after.seq))
               and e.xid < v_horizon
               and (p_types is null or e.type = any (p_types))
             order by e.xid, e.seq
             limit p_limit) e), '[]'::jsonb);
end
$$;

-- Writes grant.expiring, once per grant, for active grants with credits left that expire
-- within the expiry notice; at most `p_limit` per call. Returns how many. Service only (the
-- event pump calls it); several processes may at once.
create function public.credit_notice_expiring_grants(p_limit integer) returns integer
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_now timestamptz := credits_private.now();
  v_notice interval := (select s.expiry_notice_seconds from credits_private.settings s)
                       * interval '1 second';
  v_grant public.credit_grants;
  v_count integer := 0;
begin
  for v_grant in
    select g.* from public.credit_grants g
     where g.live and g.expires_at is not null
       and g.expires_at > v_now and g.expires_at <= v_now + v_notice
       and g.activated and not g.expired and g.voided_at is null and g.remaining > 0
       and not exists (select 1 from credits_private.grant_notices n where n.grant_id = g.grant_id)
     order by g.expires_at
     limit p_limit
  loop
    insert into credits_private.grant_notices (grant_id) values (v_grant.grant_id)
      on conflict do nothing;
    if found then
      insert into credits_private.events (type, user_id, created_at, data)
      values ('grant.expiring', v_grant.user_id, v_now,
              credits_private.grant_json(v_grant, v_now) - 'seq');
      v_count := v_count + 1;
    end if;
  end loop;
  return v_count;
end
$$;

-- 4. Webhooks: endpoints, fan-out, the delivery queue.

create function credits_private.endpoint_json(p credits_private.webhook_endpoints) returns jsonb
language sql immutable
set search_path = ''
as $$
  select pg_catalog.jsonb_build_object(
    'endpoint_id', p.endpoint_id, 'url', p.url, 'event_types', pg_catalog.to_jsonb(p.event_types),
    'create_time', p.created_at)
$$;

create function credits_private.check_event_types(p_types text[]) returns void
language plpgsql immutable
set search_path = ''
as $$
begin
  if p_types is null or not p_types <@ credits_private.event_types() then
    perform credits_private.invalid('events', 'unknown event type');
  end if;
end
$$;

-- A new endpoint for `p_types` (empty: all), signed with `p_secret`; it receives the events
-- written from now on.
create function public.credit_add_webhook(p_url text, p_event_types text[], p_secret text)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_endpoint credits_private.webhook_endpoints;
begin
  perform credits_private.check_event_types(p_event_types);
  if p_url is null or p_url !~ '^https?://[^[:space:]]+$' or pg_catalog.char_length(p_url) > 2000 then
    perform credits_private.invalid('url', 'must be an http:// or https:// URL');
  end if;
  if p_secret is null or p_secret !~ '^whsec_[A-Za-z0-9+/=]{20,}$' then
    perform credits_private.invalid('secret', 'must be whsec_ and base64');
  end if;
  insert into credits_private.webhook_endpoints (url, event_types, secret, after_seq)
  values (p_url, p_event_types, p_secret,
          coalesce(pg_catalog.pg_sequence_last_value(
            pg_catalog.pg_get_serial_sequence('credits_private.events', 'seq')::regclass), 0))
  returning * into v_endpoint;
  return credits_private.endpoint_json(v_endpoint);
end
$$;

create function public.credit_list_webhooks() returns jsonb
language sql stable
security definer
set search_path = ''
as $$
  select coalesce(pg_catalog.jsonb_agg(credits_private.endpoint_json(p) order by p.created_at),
                  '[]'::jsonb)
    from credits_private.webhook_endpoints p
$$;

-- Removes an endpoint and its deliveries.
create function public.credit_remove_webhook(p_endpoint_id uuid) returns void
language plpgsql
security definer
set search_path = ''
as $$
begin
  delete from credits_private.webhook_endpoints where endpoint_id = p_endpoint_id;
  if not found then
    perform credits_private.invalid('endpoint_id', 'no such webhook endpoint');
  end if;
end
$$;

-- A new secret: deliveries from now on are signed with it.
create function public.credit_rotate_webhook_secret(p_endpoint_id uuid, p_secret text)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_endpoint credits_private.webhook_endpoints;
begin
  if p_secret is null or p_secret !~ '^whsec_[A-Za-z0-9+/=]{20,}$' then
    perform credits_private.invalid('secret', 'must be whsec_ and base64');
  end if;
  update credits_private.webhook_endpoints set secret = p_secret
   where endpoint_id = p_endpoint_id
  returning * into v_endpoint;
  if not found then
    perform credits_private.invalid('endpoint_id', 'no such webhook endpoint');
  end if;
  return credits_private.endpoint_json(v_endpoint);
end
$$;

-- Fans the next events (in commit order) out into one delivery per subscribed endpoint and
-- moves the cursor past them; at most `p_limit` events. Returns how many events it passed;
-- 0 when another dispatcher is at it.
create function public.credit_dispatch_events(p_limit integer) returns integer
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_cursor credits_private.event_cursor;
  v_horizon xid8 := pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot());
  v_count integer;
  v_xid xid8;
  v_seq bigint;
begin
  select * into v_cursor from credits_private.event_cursor for update skip locked;
  if not found then
    return 0;
  end if;
  with batch as materialized (
    select e.xid, e.seq, e.type from credits_private.events e
     where (e.xid, e.seq) > (v_cursor.xid, v_cursor.seq) and e.xid < v_horizon
     order by e.xid, e.seq
     limit p_limit
  ), fanned as (
    insert into credits_private.webhook_deliveries (endpoint_id, event_xid, event_seq)
    select p.endpoint_id, b.xid, b.seq
      from batch b
      join credits_private.webhook_endpoints p
        on b.seq > p.after_seq and (p.event_types = '{}' or b.type = any (p.event_types))
    on conflict do nothing
  )
  select (select pg_catalog.count(*) from batch), b.xid, b.seq into v_count, v_xid, v_seq
    from batch b order by b.xid desc, b.seq desc limit 1;
  if v_count is null then
    return 0;
  end if;
  update credits_private.event_cursor set xid = v_xid, seq = v_seq;
  return v_count;
end
$$;

create function credits_private.delivery_json(
  d credits_private.webhook_deliveries, p_url text, p_type text
) returns jsonb
language sql immutable
set search_path = ''
as $$
  select pg_catalog.jsonb_build_object(
    'delivery_id', d.delivery_id, 'endpoint_id', d.endpoint_id, 'url', p_url,
    'event_id', credits_private.event_id(d.event_xid, d.event_seq), 'type', p_type,
    'state', d.state, 'attempts', d.attempts,
    'next_attempt_time', d.next_attempt_at, 'last_status', d.last_status,
    'last_error', d.last_error, 'create_time', d.created_at, 'deliver_time', d.delivered_at)
$$;

-- Leases up to `p_limit` due deliveries to `p_worker` for `p_lease_seconds` (skipping those
-- another worker is leasing), each with its event, URL and secret. A delivery whose worker
-- dies is due again when its lease ends.
create function public.credit_claim_deliveries(
  p_worker text, p_limit integer, p_lease_seconds integer
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_claimed jsonb;
begin
  with due as (
    select d.delivery_id from credits_private.webhook_deliveries d
     where d.state = 'pending' and d.next_attempt_at <= pg_catalog.now()
     order by d.next_attempt_at
     limit p_limit
     for update skip locked
  ), leased as (
    update credits_private.webhook_deliveries d
       set lease_owner = p_worker, attempts = d.attempts + 1,
           next_attempt_at = pg_catalog.now() + p_lease_seconds * interval '1 second'
      from due where d.delivery_id = due.delivery_id
    returning d.*
  )
  select pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
           'delivery_id', l.delivery_id, 'attempt', l.attempts, 'url', p.url,
           'secret', p.secret, 'event', credits_private.event_json(e)))
    into v_claimed
    from leased l
    join credits_private.webhook_endpoints p on p.endpoint_id = l.endpoint_id
    join credits_private.events e on (e.xid, e.seq) = (l.event_xid, l.event_seq);
  return coalesce(v_claimed, '[]'::jsonb);
end
$$;

-- The outcome of `p_worker`'s attempt: delivered, or failed with the receiver's status (null:
-- none) and an error, to be tried again in `p_retry_seconds` (null: never; the delivery is
-- FAILED). Returns the delivery's new state, or null when the lease was no longer the
-- worker's (another took it over, or it was retried or removed meanwhile).
create function public.credit_finish_delivery(
  p_delivery_id uuid, p_worker text, p_delivered boolean, p_status integer, p_error text,
  p_retry_seconds double precision
) returns text
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_state text;
begin
  update credits_private.webhook_deliveries
     set state = case when p_delivered then 'delivered'
                      when p_retry_seconds is null then 'failed' else 'pending' end,
         next_attempt_at = pg_catalog.now()
                           + coalesce(p_retry_seconds, 0) * interval '1 second',
         delivered_at = case when p_delivered then pg_catalog.now() end,
         lease_owner = null, last_status = p_status,
         last_error = pg_catalog.left(coalesce(p_error, ''), 1000)
   where delivery_id = p_delivery_id and lease_owner = p_worker and state = 'pending'
  returning state into v_state;
  return v_state;
end
$$;

-- Deliveries, newest first, in `p_state` (null: any), at most `p_limit`.
create function public.credit_list_deliveries(p_state text, p_limit integer) returns jsonb
language sql stable
security definer
set search_path = ''
as $$
  select coalesce(pg_catalog.jsonb_agg(j.delivery order by j.created_at desc), '[]'::jsonb)
    from (select credits_private.delivery_json(d, p.url, e.type) as delivery, d.created_at
            from credits_private.webhook_deliveries d
            join credits_private.webhook_endpoints p on p.endpoint_id = d.endpoint_id
            join credits_private.events e on (e.xid, e.seq) = (d.event_xid, d.event_seq)
           where p_state is null or d.state = p_state
           order by d.created_at desc
           limit p_limit) j
$$;

-- Delivers it again from now (a failed one, or any other): its attempts start over.
create function public.credit_retry_delivery(p_delivery_id uuid) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_delivery credits_private.webhook_deliveries;
begin
  update credits_private.webhook_deliveries
     set state = 'pending', attempts = 0, next_attempt_at = pg_catalog.now(), lease_owner = null,
         delivered_at = null
   where delivery_id = p_delivery_id
  returning * into v_delivery;
  if not found then
    perform credits_private.invalid('delivery_id', 'no such webhook delivery');
  end if;
  return credits_private.delivery_json(v_delivery, (
    select p.url from credits_private.webhook_endpoints p
     where p.endpoint_id = v_delivery.endpoint_id), (
    select e.type from credits_private.events e
     where (e.xid, e.seq) = (v_delivery.event_xid, v_delivery.event_seq)));
end
$$;

-- For the metrics: deliveries pending and failed, how long the oldest pending one has waited,
-- and events not yet fanned out.
create function public.credit_delivery_stats() returns jsonb
language sql stable
security definer
set search_path = ''
as $$
  select pg_catalog.jsonb_build_object(
    'pending', pg_catalog.count(*) filter (where d.state = 'pending'),
    'failed', pg_catalog.count(*) filter (where d.state = 'failed'),
    'oldest_pending_seconds', coalesce(pg_catalog.date_part('epoch', pg_catalog.now()
      - pg_catalog.min(d.created_at) filter (where d.state = 'pending')), 0))
    from credits_private.webhook_deliveries d
   where d.state in ('pending', 'failed')
$$;

-- Rights: the service only, except the reads a user's own session makes for itself.
revoke all on credits_private.events, credits_private.balance_alerts,
  credits_private.balance_watchers, credits_private.grant_notices,
  credits_private.webhook_endpoints, credits_private.webhook_deliveries,
  credits_private.event_cursor from public, anon, authenticated, service_role;
revoke execute on all functions in schema credits_private from public;
revoke execute on function
  public.credit_configure_events(bigint[], bigint),
  public.credit_get_profile_alerts(uuid),
  public.credit_set_balance_alerts(uuid, bigint[]),
  public.credit_watch_balance(uuid, integer),
  public.credit_list_events(uuid, text[], integer),
  public.credit_notice_expiring_grants(integer),
  public.credit_add_webhook(text, text[], text),
  public.credit_list_webhooks(),
  public.credit_remove_webhook(uuid),
  public.credit_rotate_webhook_secret(uuid, text),
  public.credit_dispatch_events(integer),
  public.credit_claim_deliveries(text, integer, integer),
  public.credit_finish_delivery(uuid, text, boolean, integer, text, double precision),
  public.credit_list_deliveries(text, integer),
  public.credit_retry_delivery(uuid),
  public.credit_delivery_stats()
  from public, anon, authenticated;
grant execute on function
  public.credit_get_profile_alerts(uuid),
  public.credit_watch_balance(uuid, integer)
  to authenticated, service_role;
grant execute on function
  public.credit_configure_events(bigint[], bigint),
  public.credit_set_balance_alerts(uuid, bigint[]),
  public.credit_list_events(uuid, text[], integer),
  public.credit_notice_expiring_grants(integer),
  public.credit_add_webhook(text, text[], text),
  public.credit_list_webhooks(),
  public.credit_remove_webhook(uuid),
  public.credit_rotate_webhook_secret(uuid, text),
  public.credit_dispatch_events(integer),
  public.credit_claim_deliveries(text, integer, integer),
  public.credit_finish_delivery(uuid, text, boolean, integer, text, double precision),
  public.credit_list_deliveries(text, integer),
  public.credit_retry_delivery(uuid),
  public.credit_delivery_stats()
  to service_role;
