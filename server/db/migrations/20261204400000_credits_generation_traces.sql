-- Traces (docs/tracing.md): a generation keeps the W3C `traceparent` of the CreateGeneration that
-- queued it, so that every attempt at it joins that trace, whichever process runs it and however
-- much later. Only a traced service writes it; it is NULL otherwise.
--
-- credit_create_generation is not redefined: credit_create_generation_traced sets the
-- transaction-local setting `credits.traceparent` and calls it, and a BEFORE INSERT trigger
-- copies the setting onto the row it inserts, in the same transaction. This works through both
-- transports alike (one function call, over asyncpg or PostgREST), and without tracing the
-- trigger's WHEN clause keeps it from running at all. A value that is not a well-formed
-- traceparent is ignored: a generation is never refused for its trace context.
alter table public.credit_generations add column traceparent text;

create function credits_private.remember_traceparent() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  v_traceparent text := pg_catalog.current_setting('credits.traceparent', true);
begin
  if v_traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$' then
    new.traceparent := v_traceparent;
  end if;
  return new;
end
$$;

create trigger credit_generations_traceparent
  before insert on public.credit_generations
  for each row
  when (pg_catalog.current_setting('credits.traceparent', true) <> '')
  execute function credits_private.remember_traceparent();

-- credit_create_generation with the caller's trace context: the same rights (it runs as its
-- caller, and credit_create_generation decides), the same result.
create function public.credit_create_generation_traced(
  p_user_id uuid, p_model text, p_prompt text, p_parameters jsonb, p_request_id text,
  p_traceparent text
) returns jsonb
language plpgsql
security invoker
set search_path = ''
as $$
declare
  v_result jsonb;
begin
  perform pg_catalog.set_config('credits.traceparent', coalesce(p_traceparent, ''), true);
  v_result := public.credit_create_generation(
    p_user_id, p_model, p_prompt, p_parameters, p_request_id);
  perform pg_catalog.set_config('credits.traceparent', '', true);
  return v_result;
end
$$;

-- The trace context a worker's attempt joins (NULL: none was kept).
create function public.credit_generation_traceparent(p_generation_id uuid) returns text
language sql
stable
security definer
set search_path = ''
as $$
  select traceparent from public.credit_generations where generation_id = p_generation_id
$$;

revoke execute on function credits_private.remember_traceparent() from public;
revoke execute on function
  public.credit_create_generation_traced(uuid, text, text, jsonb, text, text),
  public.credit_generation_traceparent(uuid)
  from public, anon, authenticated;
grant execute on function
  public.credit_create_generation_traced(uuid, text, text, jsonb, text, text)
  to authenticated, service_role;
grant execute on function public.credit_generation_traceparent(uuid) to service_role;
