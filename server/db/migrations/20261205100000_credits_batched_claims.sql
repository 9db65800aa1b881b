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
-- credit_claim_generations(p_workers, p_lease_seconds): up to one job for each worker name,
-- each leased to its own worker, from one ranking of credit_claim_generation's fair order
-- (20261204003000_credits_fair_claims.sql): first one job per user in that order, then, for the
-- workers left, the users' next jobs in the same order, so one user's backlog never fills a
-- claim while another user's job waits among the candidates. Everything else is as one claim:
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

-- One candidate of a claim, `p_worker`'s under a lease if it can run: its profile then its row,
-- neither waited for; a job whose hold expired or whose attempts are used up ends uncharged.
-- The row claimed, or null (locked elsewhere, no longer runnable, or ended).
create function credits_private.claim_candidate(
  p_generation_id uuid, p_user_id uuid, p_worker text, p_lease_seconds integer
) returns public.credit_generations
language plpgsql
set search_path = ''
as $$
declare
  v_generation public.credit_generations;
  v_hold_state text;
begin
  perform 1 from public.credit_profiles where user_id = p_user_id for update skip locked;
  if not found then
    return null;
  end if;
  select * into v_generation from public.credit_generations
   where generation_id = p_generation_id
     and ((state = 'queued' and next_attempt_at <= pg_catalog.now())
          or (state = 'running' and lease_expires_at < pg_catalog.now()))
     for update skip locked;
  if not found then
    return null;
  end if;
  perform credits_private.expire_holds(v_generation.user_id);
  select state into v_hold_state from public.credit_holds where hold_id = v_generation.hold_id;
  if v_hold_state is distinct from 'pending' then
    perform credits_private.end_uncharged(
      v_generation, 'failed', 'the reservation expired before the generation could run');
    return null;
  elsif v_generation.attempts >= v_generation.max_attempts then
    perform credits_private.end_uncharged(
      v_generation, 'failed', 'no attempts left (the last worker was lost)');
    return null;
  end if;
  update public.credit_generations
     set state = 'running', attempts = attempts + 1, lease_owner = p_worker,
         lease_expires_at = pg_catalog.now() + pg_catalog.make_interval(secs => p_lease_seconds),
         updated_at = pg_catalog.now()
   where generation_id = p_generation_id
  returning * into v_generation;
  return v_generation;
end
$$;

create function public.credit_claim_generations(p_workers text[], p_lease_seconds integer)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_wanted integer := coalesce(pg_catalog.cardinality(p_workers), 0);
  v_ids uuid[];
  v_owners uuid[];
  v_users uuid[] := '{}';
  v_later integer[] := '{}';
  v_order integer[];
  v_i integer;
  v_generation public.credit_generations;
  v_jobs jsonb := '[]'::jsonb;
  v_taken integer := 0;
begin
  perform credits_private.check_batch(v_wanted);
  if v_wanted = 0 then
    return v_jobs;
  end if;
  -- The ranking of credit_claim_generation, with room for the users' next jobs.
  select pg_catalog.array_agg(c.generation_id order by c.n),
         pg_catalog.array_agg(c.user_id order by c.n)
    into v_ids, v_owners
    from (
      with busy as (
        select r.user_id, pg_catalog.count(*) as running
          from public.credit_generations r
         where r.state = 'running' and r.lease_expires_at >= pg_catalog.now()
         group by r.user_id)
      select g.generation_id, g.user_id, pg_catalog.row_number() over (
               order by coalesce(b.running, 0), g.next_attempt_at, g.seq) as n
        from public.credit_generations g
        left join busy b on b.user_id = g.user_id
       where (g.state = 'queued' and g.next_attempt_at <= pg_catalog.now())
          or (g.state = 'running' and g.lease_expires_at < pg_catalog.now())
       order by coalesce(b.running, 0), g.next_attempt_at, g.seq
       limit 20 + 2 * v_wanted) c;
  -- First one job per user, in that order; then, for the workers left, the users' next jobs
  -- in the same order.
  v_order := array(
    select pg_catalog.generate_series(1, coalesce(pg_catalog.cardinality(v_ids), 0)));
  for v_pass in 1..2 loop
    if v_pass = 2 then
      v_order := v_later;
    end if;
    foreach v_i in array v_order loop
      exit when v_taken = v_wanted;
      if v_pass = 1 and v_owners[v_i] = any(v_users) then
        v_later := v_later || v_i;
        continue;
      end if;
      v_users := v_users || v_owners[v_i];
      v_generation := credits_private.claim_candidate(
        v_ids[v_i], v_owners[v_i], p_workers[v_taken + 1], p_lease_seconds);
      if v_generation.generation_id is not null then
        v_taken := v_taken + 1;
        v_jobs := v_jobs || pg_catalog.jsonb_build_object(
          'generation_id', v_generation.generation_id, 'model', v_generation.model,
          'prompt', v_generation.prompt, 'parameters', v_generation.parameters,
          'attempt', v_generation.attempts, 'worker', v_generation.lease_owner);
      end if;
    end loop;
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

revoke execute on function credits_private.claim_candidate(uuid, uuid, text, integer)
  from public;
revoke execute on function
  public.credit_claim_generations(text[], integer),
  public.credit_complete_generations(jsonb)
  from public, anon, authenticated;
grant execute on function
  public.credit_claim_generations(text[], integer),
  public.credit_complete_generations(jsonb)
  to service_role;
