-- Removing a webhook endpoint while events are dispatched no longer fails the dispatch.
--
-- credit_dispatch_events fanned events out to the endpoints its snapshot saw. An endpoint
-- removed by a transaction that committed after that snapshot was taken, but before the
-- dispatch wrote its deliveries, failed the whole dispatch with a foreign key violation (23503):
-- the event pump saw an error it did not expect, and the events waited for the next dispatch.
-- The dispatch now takes a KEY SHARE lock on the endpoints it fans out to, as the foreign key's
-- own check would: it waits for a removal under way, and skips an endpoint that is gone by then;
-- a removal waits for a dispatch under way, whose deliveries it then removes with the endpoint.
create or replace function public.credit_dispatch_events(p_limit integer) returns integer
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
  ), endpoints as materialized (
    select p.endpoint_id, p.after_seq, p.event_types
      from credits_private.webhook_endpoints p
     where exists (select from batch)  -- nothing to fan out: nothing locked
       for key share
  ), fanned as (
    insert into credits_private.webhook_deliveries (endpoint_id, event_xid, event_seq)
    select p.endpoint_id, b.xid, b.seq
      from batch b
      join endpoints p
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
