-- Generations: created with their cost reserved as a hold, run by workers from a durable queue
-- (claimed with `for update skip locked` under a lease), charged by capturing the hold only on
-- success, and released on failure or cancellation. A generation can never be both charged and
-- released, nor charged twice: every transition locks the owner's profile, then the row, and
-- checks the state it starts from.
--
-- Every state change is announced on the channel `credit_generations` (LISTEN/NOTIFY) with the
-- generation's changed fields (all but the output), for watchers and idle workers.

-- The catalogue as the SQL needs it: cost, timeout and attempts. The service writes it from its
-- catalogue file at start-up; provider settings (URLs, keys) never enter the database.
create table public.credit_models (
  model text primary key check (char_length(model) between 1 and 100),
  cost bigint not null check (cost > 0),
  description text not null default '',
  timeout_seconds integer not null check (timeout_seconds between 1 and 3600),
  max_attempts integer not null check (max_attempts between 1 and 10),
  active boolean not null default true,
  updated_at timestamptz not null default now()
);

revoke all on public.credit_models from public, anon, authenticated, service_role;
grant select on public.credit_models to authenticated, service_role;
alter table public.credit_models enable row level security;
create policy credit_models_read on public.credit_models for select to authenticated using (true);

alter table public.credit_generations
  add column seq bigint generated always as identity,
  add column max_attempts integer not null default 1 check (max_attempts between 1 and 10),
  add column next_attempt_at timestamptz not null default now();
create index credit_generations_by_user_seq on public.credit_generations (user_id, seq desc);
create index credit_generations_claimable on public.credit_generations (next_attempt_at)
  where state = 'queued';
create index credit_generations_leased on public.credit_generations (lease_expires_at)
  where state = 'running';

create function credits_private.notify_generation() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  -- Everything a state change may alter except the output, so that a watcher can send one
  -- message per change without a read; well below NOTIFY's 8000-byte limit.
  perform pg_catalog.pg_notify('credit_generations', pg_catalog.jsonb_build_object(
    'generation_id', new.generation_id, 'user_id', new.user_id, 'state', new.state,
    'attempts', new.attempts, 'error_message', pg_catalog.left(new.error_message, 1000),
    'transaction_id', new.transaction_id, 'output_mime_type', new.output_mime_type,
    'update_time', new.updated_at)::text);
  return null;
end
$$;

create trigger credit_generations_announce
  after insert or update of state on public.credit_generations
  for each row execute function credits_private.notify_generation();

create function credits_private.generation_json(g public.credit_generations, p_output boolean)
returns jsonb
language sql immutable
set search_path = ''
as $$
  select pg_catalog.jsonb_build_object(
    'generation_id', g.generation_id,
    'user_id', g.user_id,
    'model', g.model,
    'prompt', g.prompt,
    'parameters', g.parameters,
    'state', g.state,
    'cost', g.cost,
    'hold_id', g.hold_id,
    'transaction_id', g.transaction_id,
    'output', case when p_output then pg_catalog.encode(g.output, 'base64') end,
    'output_mime_type', g.output_mime_type,
    'error_message', g.error_message,
    'attempts', g.attempts,
    'create_time', g.created_at,
    'update_time', g.updated_at,
    'seq', g.seq)
$$;

-- The generation `p_generation_id`, locked, as the caller may see it: another user's is CR009
-- exactly like an unknown one. Locks the owner's profile first (expiring its overdue holds).
create function credits_private.lock_generation(p_generation_id uuid, p_owner uuid)
returns public.credit_generations
language plpgsql
set search_path = ''
as $$
declare
  v_user uuid;
  v_generation public.credit_generations;
begin
  select user_id into v_user from public.credit_generations
   where generation_id = p_generation_id;
  if v_user is null
     or v_user is distinct from coalesce(p_owner, v_user)
     or (pg_catalog.current_setting('role', true) = 'authenticated'
         and v_user is distinct from auth.uid()) then
    raise exception using errcode = 'CR009', message = 'generation not found';
  end if;
  perform credits_private.lock_profile(v_user);
  select * into v_generation from public.credit_generations
   where generation_id = p_generation_id for update;
  return v_generation;
end
$$;

-- Ends a generation without a charge: `p_state` (failed or cancelled), its hold released.
create function credits_private.end_uncharged(
  p_generation public.credit_generations, p_state text, p_error text
) returns public.credit_generations
language plpgsql
set search_path = ''
as $$
declare
  v_generation public.credit_generations;
begin
  if p_generation.hold_id is not null then
    perform credits_private.release_hold(p_generation.hold_id);
  end if;
  update public.credit_generations
     set state = p_state, error_message = coalesce(p_error, error_message),
         lease_owner = null, lease_expires_at = null, updated_at = pg_catalog.now()
   where generation_id = p_generation.generation_id
  returning * into v_generation;
  return v_generation;
end
$$;

-- Catalogue sync (service only): upserts the given models and deactivates the others.
create function public.credit_sync_models(p_models jsonb) returns void
language plpgsql
security definer
set search_path = ''
as $$
begin
  insert into public.credit_models (
    model, cost, description, timeout_seconds, max_attempts, active, updated_at)
  select m.model, m.cost, coalesce(m.description, ''), m.timeout_seconds, m.max_attempts, true,
         pg_catalog.now()
    from pg_catalog.jsonb_to_recordset(p_models)
      as m(model text, cost bigint, description text, timeout_seconds integer,
           max_attempts integer)
  on conflict (model) do update
     set cost = excluded.cost, description = excluded.description,
         timeout_seconds = excluded.timeout_seconds, max_attempts = excluded.max_attempts,
         active = true, updated_at = excluded.updated_at;
  update public.credit_models set active = false, updated_at = pg_catalog.now()
   where active and model not in (
     select m ->> 'model' from pg_catalog.jsonb_array_elements(p_models) m);
end
$$;

-- Queues a generation of an active catalogue model and reserves its cost as a hold whose ttl
-- covers every attempt. Idempotent by request_id: the same request returns the same generation.
create function public.credit_create_generation(
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
  v_profile public.credit_profiles;
  v_generation public.credit_generations;
  v_id uuid := pg_catalog.gen_random_uuid();
  v_hold public.credit_holds;
begin
  perform credits_private.assert_may_act_for(p_user_id);
  perform credits_private.check_key(p_request_id, 'request_id');
  if pg_catalog.jsonb_typeof(coalesce(p_parameters, '{}'::jsonb)) <> 'object' then
    perform credits_private.invalid('parameters', 'must be an object of strings');
  end if;
  select * into v_model from public.credit_models where model = p_model and active;
  if not found then
    perform credits_private.invalid('model', 'is not in the catalogue');
  end if;
  v_profile := credits_private.lock_profile(p_user_id);
  select * into v_generation from public.credit_generations
   where user_id = p_user_id and request_id = p_request_id;
  if found then
    if v_generation.fingerprint <> v_fingerprint then
      perform credits_private.key_reused();
    end if;
    return pg_catalog.jsonb_build_object(
      'generation', credits_private.generation_json(v_generation, false), 'replayed', true);
  end if;
  perform credits_private.require_available(v_model.cost, v_profile.balance - v_profile.held);
  -- Every attempt may run to its timeout, with a minute of backoff between attempts and five
  -- minutes of margin for queueing: the hold outlives the work it pays for.
  insert into public.credit_holds (
    user_id, amount, idempotency_key, fingerprint, description, expires_at)
  values (
    p_user_id, v_model.cost, 'generation:' || v_id, v_fingerprint, 'generation ' || p_model,
    pg_catalog.now() + pg_catalog.make_interval(
      secs => v_model.max_attempts * (v_model.timeout_seconds + 60) + 300))
  returning * into v_hold;
  update public.credit_profiles
     set held = held + v_model.cost, updated_at = pg_catalog.now()
   where user_id = p_user_id;
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

-- One generation with its output. `p_owner` is the acting user (null for a service); runs with
-- the caller's rights, so policies apply. Another user's generation is CR009 like an unknown one.
create function public.credit_get_generation(p_generation_id uuid, p_owner uuid)
returns jsonb
language plpgsql stable
set search_path = ''
as $$
declare
  v_generation jsonb;
begin
  select credits_private.generation_json(g, true) into v_generation
    from public.credit_generations g
   where g.generation_id = p_generation_id and (p_owner is null or g.user_id = p_owner);
  if v_generation is null then
    raise exception using errcode = 'CR009', message = 'generation not found';
  end if;
  return v_generation;
end
$$;

-- One page of the user's generations, newest first, without outputs (GetGeneration has them).
create function public.credit_list_generations(
  p_user_id uuid, p_limit integer, p_before_seq bigint default null
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
             pg_catalog.jsonb_agg(credits_private.generation_json(g, false) order by g.seq desc),
             '[]'::jsonb)
      from (select * from public.credit_generations
             where user_id = p_user_id and (p_before_seq is null or seq < p_before_seq)
             order by seq desc
             limit p_limit) g);
end
$$;

-- Cancels a queued or running generation and releases its hold; a final one is CR010.
create function public.credit_cancel_generation(p_generation_id uuid, p_owner uuid)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_generation public.credit_generations;
begin
  v_generation := credits_private.lock_generation(p_generation_id, p_owner);
  if v_generation.state not in ('queued', 'running') then
    raise exception using errcode = 'CR010', message = 'the generation is already final',
      detail = pg_catalog.jsonb_build_object('state', v_generation.state)::text;
  end if;
  v_generation := credits_private.end_uncharged(v_generation, 'cancelled', null);
  return credits_private.generation_json(v_generation, false);
end
$$;

-- Workers (service only).

-- Claims the oldest runnable job for `p_worker` under a lease: a queued one that is due, or a
-- running one whose worker's lease ran out. A job whose hold expired, or whose attempts are used
-- up, ends uncharged instead. Returns the job, or null when there is none to take now.
--
-- Locks go profile first, then generation, as everywhere else, and neither is waited for: a job
-- whose owner or row another transaction holds is left for the next claim.
create function public.credit_claim_generation(p_worker text, p_lease_seconds integer)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_candidate record;
  v_generation public.credit_generations;
  v_hold_state text;
begin
  for v_candidate in
    select generation_id, user_id from public.credit_generations
     where (state = 'queued' and next_attempt_at <= pg_catalog.now())
        or (state = 'running' and lease_expires_at < pg_catalog.now())
     order by next_attempt_at
     limit 20
  loop
    perform 1 from public.credit_profiles where user_id = v_candidate.user_id
       for update skip locked;
    continue when not found;
    select * into v_generation from public.credit_generations
     where generation_id = v_candidate.generation_id
       and ((state = 'queued' and next_attempt_at <= pg_catalog.now())
            or (state = 'running' and lease_expires_at < pg_catalog.now()))
       for update skip locked;
    continue when not found;
    perform credits_private.expire_holds(v_generation.user_id);
    select state into v_hold_state from public.credit_holds
     where hold_id = v_generation.hold_id;
    if v_hold_state is distinct from 'pending' then
      perform credits_private.end_uncharged(
        v_generation, 'failed', 'the reservation expired before the generation could run');
    elsif v_generation.attempts >= v_generation.max_attempts then
      perform credits_private.end_uncharged(
        v_generation, 'failed', 'no attempts left (the last worker was lost)');
    else
      update public.credit_generations
         set state = 'running', attempts = attempts + 1, lease_owner = p_worker,
             lease_expires_at = pg_catalog.now()
               + pg_catalog.make_interval(secs => p_lease_seconds),
             updated_at = pg_catalog.now()
       where generation_id = v_generation.generation_id
      returning * into v_generation;
      return pg_catalog.jsonb_build_object(
        'generation_id', v_generation.generation_id, 'model', v_generation.model,
        'prompt', v_generation.prompt, 'parameters', v_generation.parameters,
        'attempt', v_generation.attempts);
    end if;
  end loop;
  return null;
end
$$;

-- Extends `p_worker`'s lease; false when the job is no longer its own to run (cancelled,
-- finished, or taken over), so the worker stops and discards its result.
create function public.credit_renew_generation_lease(
  p_generation_id uuid, p_worker text, p_lease_seconds integer
) returns boolean
language plpgsql
security definer
set search_path = ''
as $$
begin
  update public.credit_generations
     set lease_expires_at = pg_catalog.now() + pg_catalog.make_interval(secs => p_lease_seconds)
   where generation_id = p_generation_id and state = 'running' and lease_owner = p_worker;
  return found;
end
$$;

-- Stores the output and charges the generation's cost by capturing its hold, in one
-- transaction; only while the job is still `p_worker`'s and running (a cancelled or taken-over
-- job's result is discarded uncharged). A hold that expired meanwhile fails it uncharged.
create function public.credit_complete_generation(
  p_generation_id uuid, p_worker text, p_output text, p_output_mime_type text
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_generation public.credit_generations;
  v_hold public.credit_holds;
  v_charge jsonb;
begin
  v_generation := credits_private.lock_generation(p_generation_id, null);
  if v_generation.state <> 'running' or v_generation.lease_owner is distinct from p_worker then
    return pg_catalog.jsonb_build_object(
      'generation', credits_private.generation_json(v_generation, false), 'charged', false);
  end if;
  select * into v_hold from public.credit_holds where hold_id = v_generation.hold_id for update;
  if v_hold.state is distinct from 'pending' then
    v_generation := credits_private.end_uncharged(
      v_generation, 'failed', 'the reservation expired before the generation finished');
    return pg_catalog.jsonb_build_object(
      'generation', credits_private.generation_json(v_generation, false), 'charged', false);
  end if;
  v_charge := credits_private.settle_hold(
    v_hold, v_generation.cost, 'generation:' || p_generation_id, v_generation.fingerprint);
  update public.credit_generations
     set state = 'succeeded', output = pg_catalog.decode(p_output, 'base64'),
         output_mime_type = p_output_mime_type, error_message = '',
         transaction_id = (v_charge -> 'transaction' ->> 'transaction_id')::uuid,
         lease_owner = null, lease_expires_at = null, updated_at = pg_catalog.now()
   where generation_id = p_generation_id
  returning * into v_generation;
  return pg_catalog.jsonb_build_object(
    'generation', credits_private.generation_json(v_generation, false), 'charged', true);
end
$$;

-- Records a failed attempt of `p_worker`'s job: queued again after `p_retry_delay_seconds` when
-- retryable and attempts are left, otherwise failed with its hold released.
create function public.credit_fail_generation(
  p_generation_id uuid, p_worker text, p_error text, p_retryable boolean,
  p_retry_delay_seconds integer
) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_generation public.credit_generations;
begin
  v_generation := credits_private.lock_generation(p_generation_id, null);
  if v_generation.state <> 'running' or v_generation.lease_owner is distinct from p_worker then
    return credits_private.generation_json(v_generation, false);
  end if;
  if p_retryable and v_generation.attempts < v_generation.max_attempts then
    update public.credit_generations
       set state = 'queued', error_message = p_error, lease_owner = null,
           lease_expires_at = null, updated_at = pg_catalog.now(),
           next_attempt_at = pg_catalog.now()
             + pg_catalog.make_interval(secs => p_retry_delay_seconds)
     where generation_id = p_generation_id
    returning * into v_generation;
  else
    v_generation := credits_private.end_uncharged(v_generation, 'failed', p_error);
  end if;
  return credits_private.generation_json(v_generation, false);
end
$$;

-- The queue as operators watch it (service only): jobs queued and running, and how long the
-- oldest queued job has waited.
create function public.credit_queue_stats() returns jsonb
language sql stable
security definer
set search_path = ''
as $$
  select pg_catalog.jsonb_build_object(
    'queued', pg_catalog.count(*) filter (where state = 'queued'),
    'running', pg_catalog.count(*) filter (where state = 'running'),
    'oldest_queued_seconds', coalesce(pg_catalog.date_part('epoch', pg_catalog.now()
      - pg_catalog.min(created_at) filter (where state = 'queued')), 0))
  from public.credit_generations
  where state in ('queued', 'running')
$$;

-- New functions are executable by PUBLIC by default: take that back here too.
revoke execute on all functions in schema credits_private from public;
grant execute on function credits_private.generation_json(public.credit_generations, boolean)
  to authenticated, service_role;
revoke execute on function
  public.credit_sync_models(jsonb),
  public.credit_create_generation(uuid, text, text, jsonb, text),
  public.credit_get_generation(uuid, uuid),
  public.credit_list_generations(uuid, integer, bigint),
  public.credit_cancel_generation(uuid, uuid),
  public.credit_claim_generation(text, integer),
  public.credit_renew_generation_lease(uuid, text, integer),
  public.credit_complete_generation(uuid, text, text, text),
  public.credit_fail_generation(uuid, text, text, boolean, integer),
  public.credit_queue_stats()
  from public, anon, authenticated;
grant execute on function
  public.credit_create_generation(uuid, text, text, jsonb, text),
  public.credit_get_generation(uuid, uuid),
  public.credit_list_generations(uuid, integer, bigint),
  public.credit_cancel_generation(uuid, uuid)
  to authenticated, service_role;
grant execute on function
  public.credit_sync_models(jsonb),
  public.credit_claim_generation(text, integer),
  public.credit_renew_generation_lease(uuid, text, integer),
  public.credit_complete_generation(uuid, text, text, text),
  public.credit_fail_generation(uuid, text, text, boolean, integer),
  public.credit_queue_stats()
  to service_role;
