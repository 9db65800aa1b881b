"""Who may act on which user's credits (the contract's principal rules)."""

from __future__ import annotations

import uuid

from server.auth.principal import Principal, ServicePrincipal, UserPrincipal
from server.domain.validation import parse_uuid
from server.errors import InvalidArgument, PermissionDenied


def target_user(principal: Principal, user_id: str) -> uuid.UUID:
    """The user a request acts on: a user's own id (empty means "me"), or any id a service
    names (a service must name one)."""
    if isinstance(principal, UserPrincipal):
        if not user_id:
            return principal.user_id
        requested = parse_uuid("user_id", user_id)
        if requested != principal.user_id:
            raise PermissionDenied("a user may act only on their own credits")
        return requested
    if not user_id:
        raise InvalidArgument.one("user_id", "is required when a service calls")
    return parse_uuid("user_id", user_id)


def target_user_or_owner(principal: Principal, user_id: str) -> uuid.UUID | None:
    """As `target_user`, for a call whose object names its user (a refund's transaction): a
    service may name none (None: the object's owner). A named user must own the object."""
    if isinstance(principal, ServicePrincipal) and not user_id:
        return None
    return target_user(principal, user_id)


def require_service(principal: Principal) -> None:
    """Refuses anyone but a trusted service."""
    if not isinstance(principal, ServicePrincipal):
        raise PermissionDenied("only a service may call this")


def owner(principal: Principal) -> uuid.UUID | None:
    """Whose holds and generations the caller may touch by id: a user their own, a service
    anyone's (None)."""
    return principal.user_id if isinstance(principal, UserPrincipal) else None
