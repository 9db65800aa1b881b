-- Batched forms of the two hottest calls, for the service's direct PostgreSQL transport: while
-- all its connections are busy, concurrent calls of one function wait together and go to the
-- database as one call of its `_each` form, one round trip and one commit for all of them.
--
-- Each `_each` function takes the single function's parameters as arrays (element i of every
-- array is call i), runs every call in a subtransaction of its own, so one call's refusal never
-- undoes another's work, and returns one row per call: its result, or the SQLSTATE, message and
-- detail of the error it raised, exactly as the single call would have. A batch holds at most
-- 32 calls: each writing call takes a subtransaction id, and PostgreSQL caches only 64 per
-- transaction before snapshots of every session get slower.
--
-- Service role only: a user's own session always calls the single functions.

create function credits_private.check_batch(p_size integer) returns void
language plpgsql immutable
set search_path = ''
as $$
begin
  if p_size > 32 then
    raise exception using errcode = 'CR008', message = 'batch: at most 32 calls in one batch',
      detail = '{"field": "batch", "description": "at most 32 calls in one batch"}';
  end if;
end
$$;

-- Debits in the order of their users (calls for one user keep their order), so that two
-- batches lock profiles in the same order and never deadlock one another.
create function public.credit_debit_each(
  p_user_id uuid[], p_amount bigint[], p_idempotency_key text[], p_description text[],
  p_metadata jsonb[]
) returns table (
  ordinal integer, result jsonb, error_code text, error_message text, error_detail text
)
language plpgsql
set search_path = ''
as $$
declare
  v_call record;
begin
  perform credits_private.check_batch(pg_catalog.cardinality(p_user_id));
  for v_call in
    select c.*
      from unnest(p_user_id, p_amount, p_idempotency_key, p_description, p_metadata)
           with ordinality as c(user_id, amount, idempotency_key, description, metadata, ordinal)
     order by c.user_id, c.ordinal
  loop
    select v_call.ordinal, null, null, null, null
      into ordinal, result, error_code, error_message, error_detail;
    begin
      result := public.credit_debit(
        v_call.user_id, v_call.amount, v_call.idempotency_key, v_call.description,
        v_call.metadata);
    exception when others then
      get stacked diagnostics error_code = returned_sqlstate, error_message = message_text,
        error_detail = pg_exception_detail;
    end;
    return next;
  end loop;
end
$$;

create function public.credit_get_profile_each(p_user_id uuid[]) returns table (
  ordinal integer, result jsonb, error_code text, error_message text, error_detail text
)
language plpgsql
set search_path = ''
as $$
declare
  v_call record;
begin
  perform credits_private.check_batch(pg_catalog.cardinality(p_user_id));
  for v_call in
    select c.* from unnest(p_user_id) with ordinality as c(user_id, ordinal)
  loop
    select v_call.ordinal, null, null, null, null
      into ordinal, result, error_code, error_message, error_detail;
    begin
      result := public.credit_get_profile(v_call.user_id);
    exception when others then
      get stacked diagnostics error_code = returned_sqlstate, error_message = message_text,
        error_detail = pg_exception_detail;
    end;
    return next;
  end loop;
end
$$;

revoke execute on function
  credits_private.check_batch(integer),
  public.credit_debit_each(uuid[], bigint[], text[], text[], jsonb[]),
  public.credit_get_profile_each(uuid[])
  from public, anon, authenticated;
grant execute on function
  credits_private.check_batch(integer),
  public.credit_debit_each(uuid[], bigint[], text[], text[], jsonb[]),
  public.credit_get_profile_each(uuid[])
  to service_role;
