"""Fakes of external services for tests: stand-ins that keep the real thing's documented behaviour.

- `tests.fakes.supabase.FakeSupabase`: a FAKE Supabase project (API gateway + PostgREST + the
  auth JWKS endpoint) in front of a real PostgreSQL database.
"""
