-- Fair claiming: a worker takes the oldest runnable job of the user with the fewest jobs running
-- now, instead of the oldest job of anyone. One user's backlog can no longer hold every worker
-- while another user's job waits behind it: when a worker frees up, the job of a user with
-- nothing running goes first. Ties (users equally busy) go to the job due first, then the one
-- created first (`seq`), so the order is the same for every worker.
--
-- Everything else is as before (20261125000200_credits_generations.sql): runnable means queued
-- and due, or running under a lease that ran out; locks go profile first, then generation, both
-- `for update skip locked`; a job whose hold expired or whose attempts are used up ends
-- uncharged; the lease is `p_lease_seconds`. `create or replace` keeps the function's grants
-- (service_role only).
--
-- No new index: the running jobs counted per user are few (one per worker) and found through
-- credit_generations_leased; the candidates through credit_generations_claimable, as before.
create or replace function public.credit_claim_generation(p_worker text, p_lease_seconds integer)
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
    with busy as (
      select r.user_id, pg_catalog.count(*) as running
        from public.credit_generations r
       where r.state = 'running' and r.lease_expires_at >= pg_catalog.now()
       group by r.user_id)
    select g.generation_id, g.user_id from public.credit_generations g
      left join busy b on b.user_id = g.user_id
     where (g.state = 'queued' and g.next_attempt_at <= pg_catalog.now())
        or (g.state = 'running' and g.lease_expires_at < pg_catalog.now())
     order by coalesce(b.running, 0), g.next_attempt_at, g.seq
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
