-- A CreateGeneration replay answers from its request_id whatever the catalogue says now.
--
-- `credit_create_generation` judged the model before it looked up the request_id, so a replay
-- of a generation whose model has since left the catalogue (the service restarted with another
-- CREDITS_MODELS, which deactivates the models it lacks) was refused as an unknown model
-- instead of returning the original generation. The contract's idempotency is on the key: the
-- same request returns the original result however often it is sent, and the effect happens
-- once. So the request_id is now looked up first, under the profile lock as before, and the
-- catalogue is consulted only for a request that creates something.
--
-- A request_id already used with other parameters is IDEMPOTENCY_KEY_REUSED even when its model
-- is unknown now too: the key exists with other parameters, so no model the caller could name
-- would make this request succeed under it (a known one would be refused as reused as well),
-- and the answer does not change with the catalogue.
--
-- A service call for an unknown user now answers PROFILE_NOT_FOUND before an unknown model
-- (the profile lock comes before the lookup, and such a user has no generation to replay).

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
  -- The profile lock serialises every call for this user: a concurrent first call has either
  -- committed its generation before this lookup or not started it.
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
  select * into v_model from public.credit_models where model = p_model and active;
  if not found then
    perform credits_private.invalid('model', 'is not in the catalogue');
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

-- `create or replace` keeps the function's privileges; they are stated again as the original
-- migration set them, so that this file alone says who may call it.
revoke execute on function public.credit_create_generation(uuid, text, text, jsonb, text)
  from public, anon, authenticated;
grant execute on function public.credit_create_generation(uuid, text, text, jsonb, text)
  to authenticated, service_role;
