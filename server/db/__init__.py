"""The database: embedded PostgreSQL, the Supabase stand-in bootstrap and migrations."""
