-- A grant's fingerprint is the same whatever the calling session's float output.
--
-- credit_grant (20261204100020_credits_grants_functions.sql) puts a grant's expire and
-- effective times into its fingerprint as epoch seconds, a double precision value, and a double
-- becomes text as the session's `extra_float_digits` says: 1 or more (the default) writes the
-- shortest exact digits, 0 or less rounds to 15 significant digits or fewer. A time with
-- microseconds needs 16, so a retry from a session that sets extra_float_digits = 0 (some drivers
-- and poolers do) fingerprinted differently and was refused as a key reused (CR002) instead of
-- replayed. The function now runs with extra_float_digits = 1, the default every fingerprint so
-- far was made with, so existing keys replay as before. Nothing else it returns is a float.

alter function public.credit_grant(
  uuid, bigint, text, text, jsonb, timestamptz, timestamptz, integer, text, text[]
) set extra_float_digits = 1;
