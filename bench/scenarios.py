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

from credits.v1 import credit_service_pb2, generation_service_pb2

Metadata = tuple[tuple[str, str], ...]
DEBIT_FIVE_GRANTS = "DebitCredits, 5 live grants"
HOT_ACCOUNT = "DebitCredits, one hot account"
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
        return credit_service_pb2.GetBalanceRequest(), metadata


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
