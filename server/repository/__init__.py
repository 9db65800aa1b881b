"""Reads and writes through layered access: service role, then the user's JWT, then provisioning."""
