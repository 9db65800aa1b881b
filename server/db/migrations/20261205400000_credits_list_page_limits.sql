-- The listings a user's own session may call hold their page size to 1 to 1000 rows.
--
-- credit_list_transactions, credit_list_grants and credit_list_generations took `p_limit` as
-- given: a NULL asked for every row at once, and a negative one failed with PostgreSQL's own
-- error (2201W) instead of the contract's. The service always asks for its capped page size
-- plus one (at most 501), but a user's session calls them directly (PostgREST, supabase-js),
-- so each now refuses a `p_limit` outside 1 to 1000 as INVALID_ARGUMENT `page_size` (CR008),
-- before anything else, as credit_list_events already did. Otherwise the same as before.

-- What every listing of a user's rows checks first: a page of 1 to 1000 rows (CR008
-- `page_size`), then the user's profile (CR003 when it is missing, or hidden by row-level
-- security: this runs with the caller's rights).
create function credits_private.check_listing(p_user_id uuid, p_limit integer) returns void
language plpgsql stable
set search_path = ''
as $$
begin
  if p_limit is null or p_limit not between 1 and 1000 then
    perform credits_private.invalid('page_size', 'must be between 1 and 1000');
  end if;
  if not exists (select 1 from public.credit_profiles where user_id = p_user_id) then
    raise exception using errcode = 'CR003', message = 'no credit profile for this user';
  end if;
end
$$;

create or replace function public.credit_list_transactions(
  p_user_id uuid, p_limit integer, p_before_seq bigint default null,
  p_kinds text[] default null, p_start timestamptz default null, p_end timestamptz default null
) returns jsonb
language plpgsql stable
set search_path = ''
as $$
begin
  perform credits_private.check_listing(p_user_id, p_limit);
  return (
    select coalesce(
             pg_catalog.jsonb_agg(credits_private.transaction_json(t) order by t.seq desc),
             '[]'::jsonb)
      from (select * from public.credit_transactions
             where user_id = p_user_id
               and (p_before_seq is null or seq < p_before_seq)
               and (p_kinds is null or kind = any (p_kinds))
               and (p_start is null or created_at >= p_start)
               and (p_end is null or created_at < p_end)
             order by seq desc
             limit p_limit) t);
end
$$;

create or replace function public.credit_list_grants(
  p_user_id uuid, p_limit integer, p_before_seq bigint default null,
  p_states text[] default null
) returns jsonb
language plpgsql stable
set search_path = ''
as $$
declare
  v_now timestamptz;
begin
  perform credits_private.check_listing(p_user_id, p_limit);
  if exists (select 1 from unnest(p_states) s
              where s is null
                 or s not in ('pending', 'active', 'depleted', 'expired', 'voided')) then
    perform credits_private.invalid(
      'states', 'each must be pending, active, depleted, expired or voided');
  end if;
  v_now := credits_private.now();
  return (
    select coalesce(
             pg_catalog.jsonb_agg(credits_private.grant_json(g, v_now) order by g.seq desc),
             '[]'::jsonb)
      from (select * from public.credit_grants x
             where x.user_id = p_user_id
               and (p_before_seq is null or x.seq < p_before_seq)
               and (p_states is null
                    or credits_private.grant_state(x, v_now) = any (p_states))
             order by x.seq desc
             limit p_limit) g);
end
$$;

create or replace function public.credit_list_generations(
  p_user_id uuid, p_limit integer, p_before_seq bigint default null
) returns jsonb
language plpgsql stable
set search_path = ''
as $$
begin
  perform credits_private.check_listing(p_user_id, p_limit);
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

-- `create or replace` kept the listings' rights; their new check runs with the caller's.
revoke execute on function credits_private.check_listing(uuid, integer) from public;
grant execute on function credits_private.check_listing(uuid, integer)
  to authenticated, service_role;
