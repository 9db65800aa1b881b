"""What every provider implements, and how it reports failure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from server.generation.parameters import Parameter


@dataclass(frozen=True, slots=True)
class Job:
    """One attempt at a generation, as a provider sees it."""

    generation_id: str
    model: str
    prompt: str
    parameters: Mapping[str, str]
    attempt: int


@dataclass(frozen=True, slots=True)
class Output:
    data: bytes
    mime_type: str


class ProviderError(Exception):
    """The provider could not produce an output. `retryable` failures (a 5xx, a timeout) may
    be attempted again, up to the model's max attempts; the others fail the generation now."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class Provider(Protocol):
    """Makes outputs for one catalogue model. Called concurrently for different jobs; the
    worker enforces the model's timeout by cancelling the call."""

    async def generate(self, job: Job) -> Output: ...


@runtime_checkable
class Closable(Protocol):
    """A provider holding resources (connections) implements this; it is called once, when
    the workers stop."""

    async def aclose(self) -> None: ...


class ProviderFactory(Protocol):
    """What the entry-point group `credits.providers` names: builds a provider from the
    model's settings (called once per model when a worker starts)."""

    def __call__(self, settings: Mapping[str, Any]) -> Provider: ...


@runtime_checkable
class DeclaresParameters(Protocol):
    """A provider factory (e.g. a provider class, with a classmethod) that says which request
    parameters its models take, from a model's settings and without building a provider.
    CreateGeneration then refuses any other key and any value the declaration does not take.
    None, or a factory without this method, declares nothing: any parameters are passed on."""

    def declare_parameters(self, settings: Mapping[str, Any]) -> Sequence[Parameter] | None: ...
