-- A batch of debits in one subtransaction (issue 21): under load most debits now go in batches
-- (server/transports/batching.py), and a subtransaction per call was about 27 µs of each
-- debit's database time. Same signature, results and errors; `create or replace` keeps the
-- function's rights.

-- As 20261204100020_credits_grants_functions.sql defined it (a scope per call), with all the
-- calls in one subtransaction first, each call's result kept until all of them are done. When
-- one raises, that subtransaction undoes them all and the batch goes again as before, call by
-- call, each in a subtransaction of its own: the calls before the one that raised run again,
-- it is answered with the error it raised (it ran after the same calls, under the same locks,
-- as it would have then), and the calls after it run.
create or replace function public.credit_debit_each(
  p_user_id uuid[], p_amount bigint[], p_idempotency_key text[], p_description text[],
  p_metadata jsonb[], p_scopes text[] default null
) returns table (
  ordinal integer, result jsonb, error_code text, error_message text, error_detail text
)
language plpgsql
set search_path = ''
as $$
declare
  v_call record;
  v_ordinals integer[] := '{}';
  v_results jsonb[] := '{}';
  v_failed integer;
  v_position integer := 0;
  v_code text;
  v_message text;
  v_detail text;
begin
  perform credits_private.check_batch(pg_catalog.cardinality(p_user_id));
  begin
    for v_call in
      select c.*
        from unnest(p_user_id, p_amount, p_idempotency_key, p_description, p_metadata, p_scopes)
             with ordinality
             as c(user_id, amount, idempotency_key, description, metadata, scope, ordinal)
       order by c.user_id, c.ordinal
    loop
      v_results := pg_catalog.array_append(v_results, public.credit_debit(
        v_call.user_id, v_call.amount, v_call.idempotency_key, v_call.description,
        v_call.metadata, coalesce(v_call.scope, '')));
      v_ordinals := pg_catalog.array_append(v_ordinals, v_call.ordinal::integer);
    end loop;
  exception when others then
    get stacked diagnostics v_code = returned_sqlstate, v_message = message_text,
      v_detail = pg_exception_detail;
    v_failed := pg_catalog.cardinality(v_results) + 1;
  end;
  if v_failed is null then
    return query
      select x.o, x.res, null::text, null::text, null::text
        from unnest(v_ordinals, v_results) with ordinality as x (o, res, n)
       order by x.n;
    return;
  end if;
  for v_call in
    select c.*
      from unnest(p_user_id, p_amount, p_idempotency_key, p_description, p_metadata, p_scopes)
           with ordinality
           as c(user_id, amount, idempotency_key, description, metadata, scope, ordinal)
     order by c.user_id, c.ordinal
  loop
    v_position := v_position + 1;
    select v_call.ordinal, null, null, null, null
      into ordinal, result, error_code, error_message, error_detail;
    if v_position = v_failed then
      error_code := v_code;
      error_message := v_message;
      error_detail := v_detail;
    else
      begin
        result := public.credit_debit(
          v_call.user_id, v_call.amount, v_call.idempotency_key, v_call.description,
          v_call.metadata, coalesce(v_call.scope, ''));
      exception when others then
        get stacked diagnostics error_code = returned_sqlstate, error_message = message_text,
          error_detail = pg_exception_detail;
      end;
    end if;
    return next;
  end loop;
end
$$;
