"""The record of the RPC being served, filled in as the call passes the pipeline and logged
once at its end (server/edges/calls.py, for either edge).

It is opened with the call's request id and method; authentication adds who called; the error
table (or a rejection) adds how it ended. No token, key or prompt ever goes in.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field

import grpc

from server.auth.principal import Principal, UserPrincipal

REQUEST_ID_HEADER = "x-request-id"


@dataclass(slots=True)
class CallRecord:
    request_id: str
    method: str
    # The edge it came through: "grpc" or "connect".
    protocol: str = "grpc"
    started: float = field(default_factory=time.perf_counter)
    code: grpc.StatusCode = grpc.StatusCode.OK
    reason: str = ""
    principal_kind: str = "none"
    user_id: str = ""

    def identify(self, principal: Principal) -> None:
        if isinstance(principal, UserPrincipal):
            self.principal_kind, self.user_id = "user", str(principal.user_id)
        else:
            self.principal_kind = "service"

    def fail(self, code: grpc.StatusCode, reason: str) -> None:
        self.code, self.reason = code, reason

    def elapsed(self) -> float:
        """Seconds since the call started."""
        return time.perf_counter() - self.started

    def fields(self) -> dict[str, object]:
        """The access-log line's fields."""
        return {
            "request_id": self.request_id,
            "method": self.method,
            "code": self.code.name,
            "reason": self.reason,
            "duration_ms": round(self.elapsed() * 1000, 3),
            "principal": self.principal_kind,
            "user_id": self.user_id,
            "protocol": self.protocol,
        }


_current: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar(
    "credits_call", default=None
)


def current_call() -> CallRecord | None:
    return _current.get()


def open_call(record: CallRecord) -> contextvars.Token[CallRecord | None]:
    return _current.set(record)
