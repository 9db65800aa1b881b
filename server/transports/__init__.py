"""Ways to reach the database: PostgreSQL directly, or a Supabase project's REST API."""
