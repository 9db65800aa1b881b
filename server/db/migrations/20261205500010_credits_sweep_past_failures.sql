-- credit_expire_holds took the `p_users` users due longest and tried each: when that many
-- users' settlements kept failing (each skipped with its WARNING), every call took the same
-- ones, the sweeper saw fewer settled than it asked for and stopped, and nobody due after them
-- was settled any more. Now `p_users` bounds the users settled, not the users tried: a call
-- goes on past the ones that fail, in the order they fell due, until it has settled `p_users`
-- or met every user due. It returns the users settled, as before.
create or replace function public.credit_expire_holds(p_users integer default 100)
returns integer
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_now timestamptz := credits_private.now();
  v_user uuid;
  v_swept integer := 0;
begin
  -- As the LIMIT it replaces: none settles nobody, NULL everyone due, a negative is refused.
  if p_users < 0 then
    raise exception using errcode = '2201W', message = 'LIMIT must not be negative';
  elsif p_users = 0 then
    return 0;
  end if;
  for v_user in
    select user_id from public.credit_profiles
     where next_settle_at <= v_now
     order by next_settle_at
  loop
    begin
      perform 1 from public.credit_profiles
       where user_id = v_user and next_settle_at <= v_now
         for update skip locked;
      if found then
        perform credits_private.settle(v_user, v_now);
        set constraints all immediate;
        set constraints all deferred;
        v_swept := v_swept + 1;
      end if;
    exception when others then
      raise warning 'credit_expire_holds: skipped user %: % (SQLSTATE %)',
        v_user, sqlerrm, sqlstate;
    end;
    exit when v_swept >= p_users;
  end loop;
  return v_swept;
end
$$;
