"""The errors the SQL functions raise on purpose, as domain errors (shared by all transports).

See the header of the migration *_credits_ledger.sql for the SQLSTATEs (CR011: the header of
*_credits_balance_ceiling.sql; CR012, CR013 and CR001's "scope": the grants migration's; CR020
and CR021: the header of *_credits_spend_limits.sql).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from server import errors

# PostgreSQL's insufficient_privilege: a row-level policy or a grant refused the caller.
INSUFFICIENT_PRIVILEGE = "42501"

# SQLSTATE classes after which the call had no effect and may simply be tried again:
# 08 connection exception, 40 transaction rollback (a deadlock or serialization failure undid
# the call), 53 insufficient resources, 57 operator intervention (shutdown, cannot connect now).
_TRANSIENT_CLASSES = ("08", "40", "53", "57")


def is_transient(sqlstate: str) -> bool:
    """Whether an error of `sqlstate` means "unavailable, retry" (BACKEND_UNAVAILABLE)."""
    return sqlstate[:2] in _TRANSIENT_CLASSES


def _details(detail: str | None) -> dict[str, object]:
    try:
        parsed = json.loads(detail or "{}")
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def domain_error(sqlstate: str, message: str, detail: str | None) -> errors.CreditsError | None:
    """The domain error for a SQLSTATE raised by our functions, or None if it is not one."""
    if sqlstate == "CR001":
        fields = _details(detail)
        return errors.InsufficientCredits(
            required=int(str(fields.get("required", 0))),
            available=int(str(fields.get("available", 0))),
            scope=str(fields.get("scope") or ""),
        )
    if sqlstate == "CR005":
        fields = _details(detail)
        return errors.HoldNotPending(
            state=str(fields.get("state", "")), generation_id=str(fields.get("generation_id", ""))
        )
    if sqlstate == "CR013":
        return errors.GrantNotActive(state=str(_details(detail).get("state") or ""))
    if sqlstate == "CR020":
        fields = _details(detail)
        reset = datetime.fromisoformat(str(fields.get("reset_time")))
        return errors.SpendLimitExceeded(
            period=str(fields.get("period", "")),
            limit=int(str(fields.get("limit", 0))),
            spent=int(str(fields.get("spent", 0))),
            reset_time=reset.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
    if sqlstate == "CR021":
        fields = _details(detail)
        return errors.TooManyActiveGenerations(
            limit=int(str(fields.get("limit", 0))), active=int(str(fields.get("active", 0)))
        )
    if sqlstate == "CR008":
        fields = _details(detail)
        return errors.InvalidArgument.one(
            str(fields.get("field", "")), str(fields.get("description", message))
        )
    simple: dict[str, type[errors.CreditsError]] = {
        "CR002": errors.IdempotencyKeyReused,
        "CR003": errors.ProfileNotFound,
        "CR004": errors.HoldNotFound,
        "CR006": errors.TransactionNotFound,
        "CR007": errors.RefundExceedsDebit,
        "CR009": errors.GenerationNotFound,
        "CR010": errors.GenerationNotCancellable,
        "CR011": errors.BalanceLimitExceeded,
        "CR012": errors.GrantNotFound,
        INSUFFICIENT_PRIVILEGE: errors.AccessDeniedByPolicy,
    }
    cls = simple.get(sqlstate)
    return cls() if cls else None
