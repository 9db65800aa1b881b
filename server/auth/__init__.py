"""Who is calling: token verification and the principal it yields."""
