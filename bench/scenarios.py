"""What the load generator sends: one RPC of the service with requests spread over many users.

A scenario is plain data (it is pickled into the load processes) plus the code that turns it
into a stub call and a request for the n-th call of a caller.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc.aio
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from credits.v1 import credit_service_pb2, generation_service_pb2, usage_pb2

Metadata = tuple[tuple[str, str], ...]
DEBIT_FIVE_GRANTS = "DebitCredits, 5 live grants"
HOT_ACCOUNT = "DebitCredits, one hot account"
USAGE_1K = "GetUsage month by day, 1k entries"
USAGE_1M = "GetUsage month by day, 1M entries"
Call = Callable[..., Awaitable[Any]]

_MESSAGES: dict[str, tuple[type[Message], type[Message]]] = {
    "/credits.v1.CreditService/GetBalance": (
        credit_service_pb2.GetBalanceRequest,
        credit_service_pb2.GetBalanceResponse,
    ),
    "/credits.v1.CreditService/DebitCredits": (
        credit_service_pb2.DebitCreditsRequest,
        credit_service_pb2.DebitCreditsResponse,
    ),
    "/credits.v1.CreditService/GetUsage": (
        credit_service_pb2.GetUsageRequest,
        credit_service_pb2.GetUsageResponse,
    ),
    "/credits.v1.GenerationService/CreateGeneration": (
        generation_service_pb2.CreateGenerationRequest,
        generation_service_pb2.CreateGenerationResponse,
    ),
}


@dataclass(frozen=True, slots=True)
class Scenario:
    """Calls of `method`, each as the next of `tokens` (users' access tokens), round robin."""

    name: str
    method: str
    tokens: Sequence[str]
    model: str = "demo-image"

    def bind(self, channel: grpc.aio.Channel) -> Call:
        request_type, response_type = _MESSAGES[self.method]
        return channel.unary_unary(
            self.method,
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )

    def request(self, caller: str, n: int) -> tuple[Message, Metadata]:
        """The n-th request of `caller` (a tag unique to it across all load processes)."""
        token = self.tokens[(hash(caller) + n) % len(self.tokens)]
        metadata = (("authorization", f"Bearer {token}"),)
        key = f"bench-{caller}-{n}"
        if self.method.endswith("/DebitCredits"):
            return credit_service_pb2.DebitCreditsRequest(
                amount=1, idempotency_key=key, description="bench"
            ), metadata
        if self.method.endswith("/CreateGeneration"):
            return generation_service_pb2.CreateGenerationRequest(
                model=self.model, prompt="a lighthouse at dusk", request_id=key
            ), metadata
        if self.method.endswith("/GetUsage"):
            return _month_by_day(), metadata
        return credit_service_pb2.GetBalanceRequest(), metadata


# GetUsage's month: the one bench/users.py fills (USAGE_MONTH), by day and model.
USAGE_START, USAGE_END = Timestamp(seconds=1793491200), Timestamp(seconds=1796083200)


def _month_by_day() -> credit_service_pb2.GetUsageRequest:
    return credit_service_pb2.GetUsageRequest(
        start_time=USAGE_START,
        end_time=USAGE_END,
        granularity=usage_pb2.USAGE_GRANULARITY_DAY,
        group_by=usage_pb2.USAGE_GROUP_BY_SCOPE,
    )


def usage(name: str, token: str) -> Scenario:
    """GetUsage of one user's month by day and scope (bench/users.py, create_with_usage)."""
    return Scenario(name, "/credits.v1.CreditService/GetUsage", (token,))


def get_balance(tokens: Sequence[str]) -> Scenario:
    return Scenario("GetBalance", "/credits.v1.CreditService/GetBalance", tokens)


def debit(tokens: Sequence[str]) -> Scenario:
    return Scenario("DebitCredits", "/credits.v1.CreditService/DebitCredits", tokens)


def debit_five_grants(tokens: Sequence[str]) -> Scenario:
    """DebitCredits of users with five live grants each (bench/users.py, create_with_grants)."""
    return Scenario(DEBIT_FIVE_GRANTS, "/credits.v1.CreditService/DebitCredits", tokens)


def debit_hot(token: str) -> Scenario:
    """DebitCredits of every caller from one user: its calls meet on that user's row."""
    return Scenario(HOT_ACCOUNT, "/credits.v1.CreditService/DebitCredits", [token])


def create_generation(tokens: Sequence[str]) -> Scenario:
    return Scenario("CreateGeneration", "/credits.v1.GenerationService/CreateGeneration", tokens)
