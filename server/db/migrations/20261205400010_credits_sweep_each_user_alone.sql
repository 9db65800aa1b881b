-- The sweeper settles each user on its own: a user whose settlement fails is skipped and
-- reported, instead of failing everyone's.
--
-- credit_expire_holds settled up to `p_users` users in one transaction, and settlement's checks
-- of the books run at commit (deferred constraint triggers). One user whose settlement failed,
-- at once or at commit, failed the whole call; and as the sweeper takes the users due longest
-- first, it failed every call after too, so nobody's holds and grants were settled any more
-- (every function still judges expiry by time, but the expiry entries and their events waited).
-- Now each user is settled in a subtransaction of its own, whose deferred checks run before it
-- ends (`set constraints all immediate`, then back to deferred for the next user): a user that
-- fails is left as it was, named in a WARNING with the error (the database's log, and a notice
-- to the caller), and the others are settled. It returns the users settled, as before.
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
  for v_user in
    select user_id from public.credit_profiles
     where next_settle_at <= v_now
     order by next_settle_at
     limit p_users
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
  end loop;
  return v_swept;
end
$$;
