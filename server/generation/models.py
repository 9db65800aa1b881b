"""Plain values of the generation domain."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from server.generation.parameters import Parameter


class GenerationState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (
            GenerationState.SUCCEEDED,
            GenerationState.FAILED,
            GenerationState.CANCELLED,
        )


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One catalogue entry: what a model costs and how its provider is run."""

    model: str
    cost: int
    description: str
    provider: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    timeout_seconds: int = 60
    max_attempts: int = 3
    # The request parameters its provider declares; None: none declared, any accepted.
    parameters: tuple[Parameter, ...] | None = None


@dataclass(frozen=True, slots=True)
class Generation:
    generation_id: uuid.UUID
    user_id: uuid.UUID
    model: str
    prompt: str
    parameters: Mapping[str, str]
    state: GenerationState
    cost: int
    hold_id: uuid.UUID | None
    transaction_id: uuid.UUID | None
    output: bytes
    output_mime_type: str
    error_message: str
    attempts: int
    create_time: datetime
    update_time: datetime
    seq: int


@dataclass(frozen=True, slots=True)
class GenerationPage:
    generations: Sequence[Generation]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A queued generation a worker has claimed, under a lease it must renew."""

    generation_id: uuid.UUID
    model: str
    prompt: str
    parameters: Mapping[str, str]
    attempt: int
    # The W3C trace context of the CreateGeneration that queued it, when tracing kept one.
    traceparent: str | None = None


@dataclass(frozen=True, slots=True)
class QueueStats:
    queued: int
    running: int
    oldest_queued_seconds: float
