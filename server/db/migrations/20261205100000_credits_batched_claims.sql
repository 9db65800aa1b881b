-- Claims and completions of several jobs in one transaction, for the workers of one process
-- (server/repository/coalescing.py joins the calls its workers make at the same time).
--
-- Why: every state change of a generation is announced (NOTIFY), and PostgreSQL serialises the
-- commits of all notifying transactions under one lock, held through the commit's WAL flush.
-- With a claim and a completion per job, each in its own transaction, the queue drained at about
-- one job per two lock hand-overs whatever the number of workers (sampled in pg_stat_activity:
-- five of eight workers' backends waiting on `Lock:object`). One transaction for many jobs
-- takes that lock, and flushes, once for all of them.
--
-- credit_claim_generations(p_workers, p_lease_seconds): up to one job per worker name, each
-- leased to its own worker, in the fair order of credit_claim_generation
-- (20261204003000_credits_fair_claims.sql) as if the workers had claimed one after another: a
-- user's k-th job in this claim ranks as if the user ran k - 1 more jobs already, so one user's
-- backlog never fills a claim while another user's job waits. Everything else is as one claim:
-- runnable means queued and due, or running under a lapsed lease; profile then generation, both
-- `for update skip locked`; a job whose hold expired or whose attempts are used up ends
-- uncharged. A claim commits without waiting for its WAL flush: if the database crashed before
-- it, the jobs are simply still queued (their attempts not counted) and their workers'
-- completions, which do wait for theirs, are refused (the job is not theirs): nothing is
-- charged and the jobs run again. A completion's flush covers every earlier commit, the
-- claim's included.
--
-- credit_complete_generations(p_jobs): credit_complete_generation for each of
-- `[{"generation_id", "worker", "output", "output_mime_type"}]`, in the order of their users
-- (two batches lock profiles in the same order), each in a subtransaction of its own so that one
-- job's error never undoes another's completion: one result per job, in the order given,
-- `{"charged": bool}` or the error it raised (`error_code`, `error_message`, `error_detail`).
--
-- At most 32 jobs in one call (credits_private.check_batch). Service role only.
create function public.credit_claim_generations(p_workers text[], p_lease_seconds integer)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_candidate record;
  v_generation public.credit_generations;
  v_hold_state text;
  v_wanted integer := coalesce(pg_catalog.cardinality(p_workers), 0);
  v_jobs jsonb := '[]'::jsonb;
  v_taken integer := 0;
begin
  perform credits_private.check_batch(v_wanted);
  if v_wanted = 0 then
    return v_jobs;
  end if;
  for v_candidate in
    with busy as (
      select r.user_id, pg_catalog.count(*) as running
        from public.credit_generations r
       where r.state = 'running' and r.lease_expires_at >= pg_catalog.now()
       group by r.user_id),
    runnable as (
      select g.generation_id, g.user_id, g.next_attempt_at, g.seq,
             coalesce(b.running, 0) + pg_catalog.row_number() over (
               partition by g.user_id order by g.next_attempt_at, g.seq) as rank
        from public.credit_generations g
        left join busy b on b.user_id = g.user_id
       where (g.state = 'queued' and g.next_attempt_at <= pg_catalog.now())
          or (g.state = 'running' and g.lease_expires_at < pg_catalog.now()))
    select generation_id, user_id from runnable
     order by rank, next_attempt_at, seq
     limit 20 + 2 * v_wanted
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
      v_taken := v_taken + 1;
      update public.credit_generations
         set state = 'running', attempts = attempts + 1, lease_owner = p_workers[v_taken],
             lease_expires_at = pg_catalog.now()
               + pg_catalog.make_interval(secs => p_lease_seconds),
             updated_at = pg_catalog.now()
       where generation_id = v_generation.generation_id
      returning * into v_generation;
      v_jobs := v_jobs || pg_catalog.jsonb_build_object(
        'generation_id', v_generation.generation_id, 'model', v_generation.model,
        'prompt', v_generation.prompt, 'parameters', v_generation.parameters,
        'attempt', v_generation.attempts, 'worker', v_generation.lease_owner);
      exit when v_taken = v_wanted;
    end if;
  end loop;
  if v_taken > 0 then
    -- For this transaction only (is_local): see above.
    perform pg_catalog.set_config('synchronous_commit', 'off', true);
  end if;
  return v_jobs;
end
$$;

create function public.credit_complete_generations(p_jobs jsonb) returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_job record;
  v_results jsonb[];
  v_code text;
  v_message text;
  v_detail text;
begin
  if pg_catalog.jsonb_typeof(p_jobs) is distinct from 'array' then
    perform credits_private.invalid('jobs', 'must be an array');
  end if;
  perform credits_private.check_batch(pg_catalog.jsonb_array_length(p_jobs));
  v_results := pg_catalog.array_fill(null::jsonb, array[pg_catalog.jsonb_array_length(p_jobs)]);
  for v_job in
    select j.ordinal, j.job ->> 'generation_id' as generation_id, j.job ->> 'worker' as worker,
           j.job ->> 'output' as output, j.job ->> 'output_mime_type' as output_mime_type
      from pg_catalog.jsonb_array_elements(p_jobs) with ordinality as j(job, ordinal)
      left join public.credit_generations g
        on g.generation_id = (j.job ->> 'generation_id')::uuid
     order by g.user_id, j.ordinal
  loop
    begin
      v_results[v_job.ordinal] := pg_catalog.jsonb_build_object('charged',
        public.credit_complete_generation(
          v_job.generation_id::uuid, v_job.worker, v_job.output, v_job.output_mime_type
        ) -> 'charged');
    exception when others then
      get stacked diagnostics v_code = returned_sqlstate, v_message = message_text,
        v_detail = pg_exception_detail;
      v_results[v_job.ordinal] := pg_catalog.jsonb_build_object(
        'error_code', v_code, 'error_message', v_message, 'error_detail', v_detail);
    end;
  end loop;
  return pg_catalog.to_jsonb(v_results);
end
$$;

revoke execute on function
  public.credit_claim_generations(text[], integer),
  public.credit_complete_generations(jsonb)
  from public, anon, authenticated;
grant execute on function
  public.credit_claim_generations(text[], integer),
  public.credit_complete_generations(jsonb)
  to service_role;
