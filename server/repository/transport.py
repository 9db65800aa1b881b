"""What a transport (direct PostgreSQL, or Supabase's REST API) offers the repository."""

from __future__ import annotations

from typing import Any, Protocol

from server.auth.principal import UserPrincipal
from server.repository.functions import SqlCall


class CredentialsRejected(Exception):
    """The database refused the credentials of a layer (not the request): the repository may
    fall back to another layer. Never raised for business errors or timeouts."""


class Session(Protocol):
    """One identity's access to the database."""

    async def call(self, call: SqlCall[Any]) -> Any:
        """Calls a SQL function and returns its JSON result, undecoded.

        Raises domain errors (server.errors) for what the function refuses, BackendUnavailable
        when the database cannot be reached, and CredentialsRejected for refused credentials.
        """
        ...


class Transport(Protocol):
    def service(self) -> Session:
        """The service-role layer: bypasses row-level security."""
        ...

    def as_user(self, principal: UserPrincipal) -> Session:
        """The user layer: the caller's own JWT, under row-level security."""
        ...

    async def close(self) -> None: ...
