"""The GenerationService operations of the contract: who may call, what is valid, then the
store. Watching follows the change feed and re-reads the generation at each change."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence

from server.auth.principal import Principal
from server.domain import access, paging, validation
from server.domain.paging import PageTokens
from server.errors import InvalidArgument
from server.generation import parameters as declared
from server.generation.feed import ChangeFeed, StateChange, change_within
from server.generation.models import Generation, GenerationPage, ModelSpec
from server.generation.ports import GenerationStore

# credit_models.model: a longer name never entered a catalogue, so no generation has it.
MAX_MODEL_LENGTH = 100
MAX_PROMPT_LENGTH = 4000
MAX_PARAMETERS = 16
MAX_PARAMETER_KEY_LENGTH = 64
MAX_PARAMETER_VALUE_LENGTH = 1000
# What one generation may store, in bytes of UTF-8 (CREDITS_MAX_PROMPT_BYTES,
# CREDITS_MAX_PARAMETERS_BYTES). The defaults take every prompt of 4000 characters, and every
# ASCII parameter set within the entry limits (16 x (64 + 1000) = 17024 bytes).
DEFAULT_MAX_PROMPT_BYTES = 16 * 1024
DEFAULT_MAX_PARAMETERS_BYTES = 32 * 1024
# A generation's fields besides its texts in a response (ids, numbers, timestamps, framing):
# about 350 bytes at most.
GENERATION_OVERHEAD_BYTES = 512
# A watcher re-reads at least this often: in case a notification was lost (the feed
# reconnecting), or often where no feed publishes changes as they happen (the Supabase API).
WATCH_RECHECK_SECONDS = 5.0
POLL_SECONDS = 0.5


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """How much a generation request may carry (bytes of UTF-8), and how much of a response a
    page of generations may take."""

    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES
    # Every key and value of `parameters`, together.
    max_parameters_bytes: int = DEFAULT_MAX_PARAMETERS_BYTES
    max_page_bytes: int = paging.DEFAULT_MAX_PAGE_BYTES


class Generations:
    def __init__(
        self,
        store: GenerationStore,
        catalogue: Mapping[str, ModelSpec],
        feed: ChangeFeed,
        page_tokens: PageTokens | None = None,
        limits: Limits | None = None,
    ) -> None:
        """`page_tokens` signs the listing's page tokens (None: a key of this process only)."""
        self._store = store
        self._pages = page_tokens or PageTokens.ephemeral()
        self._limits = limits or Limits()
        self._catalogue = catalogue
        self._feed = feed
        self._recheck_seconds = WATCH_RECHECK_SECONDS if feed.live else POLL_SECONDS
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """The server is stopping: every open watch ends now with ServerStopping, instead of
        holding the server for its whole grace period."""
        self._stopping.set()

    def models(self) -> Sequence[ModelSpec]:
        return sorted(self._catalogue.values(), key=lambda m: (m.cost, m.model))

    async def create(
        self,
        principal: Principal,
        user_id: str,
        *,
        model: str,
        prompt: str,
        parameters: Mapping[str, str],
        request_id: str,
    ) -> Generation:
        """Queues a generation and reserves its cost, or returns the one `request_id` made.

        The database judges the request_id before the model: a replay returns its generation
        even after the model left the catalogue, and a key used with other parameters is
        IDEMPOTENCY_KEY_REUSED whatever model it names. Only a request that would create a
        generation is refused for its model, in the same round trip.
        """
        target = access.target_user(principal, user_id)
        prompt = _prompt(prompt, self._limits.max_prompt_bytes)
        parameters = _parameters(parameters, self._limits.max_parameters_bytes)
        spec = self._catalogue.get(model)
        declared.check(model, spec.parameters if spec else None, parameters)
        request_id = validation.idempotency_key(request_id, "request_id")
        if not _could_be_catalogued(model):
            raise self._unknown_model()
        try:
            generation = await self._store.create(
                principal,
                target,
                model=model,
                prompt=prompt,
                parameters=parameters,
                request_id=request_id,
            )
        except InvalidArgument as refused:
            if model not in self._catalogue and [v.field for v in refused.violations] == ["model"]:
                raise self._unknown_model() from None
            raise
        # Wakes this process's idle workers at once, also where no NOTIFY arrives (Supabase).
        self._feed.queued.set()
        return generation

    def _unknown_model(self) -> InvalidArgument:
        offered = ", ".join(sorted(self._catalogue))
        return InvalidArgument.one("model", f"is not in the catalogue ({offered})")

    async def get(self, principal: Principal, generation_id: str) -> Generation:
        return await self._store.get(
            principal,
            validation.parse_uuid("generation_id", generation_id),
            access.owner(principal),
        )

    async def list(
        self, principal: Principal, user_id: str, page_size: int, page_token: str
    ) -> GenerationPage:
        target = access.target_user(principal, user_id)
        page, token = await self._pages.read_page(
            lambda limit, before: self._store.list(principal, target, limit, before),
            user_id=target,
            scope=paging.listing("generations"),
            page_size=page_size,
            page_token=page_token,
            size_of=listed_bytes,
            max_bytes=self._limits.max_page_bytes,
        )
        return GenerationPage(page, token)

    async def cancel(self, principal: Principal, generation_id: str) -> Generation:
        return await self._store.cancel(
            principal,
            validation.parse_uuid("generation_id", generation_id),
            access.owner(principal),
        )

    async def watch(self, principal: Principal, generation_id: str) -> AsyncIterator[Generation]:
        """The generation now, then once per state change, ending after a final state.

        Each change arrives with the fields it altered, so every transition is sent in order
        (a retry's RUNNING, QUEUED, RUNNING too); the final one is re-read for its output. Where
        no change arrives for a while (no feed, or a lost notification), it re-reads.
        """
        target = validation.parse_uuid("generation_id", generation_id)
        owner = access.owner(principal)
        async with self._feed.changes(target) as changes:
            current = await self._store.get(principal, target, owner)
            yield current
            while not current.state.final:
                change = await change_within(changes, self._stopping, self._recheck_seconds)
                if change is None:
                    latest = await self._store.get(principal, target, owner)
                elif change.update_time <= current.update_time:
                    continue  # already in what was sent
                elif change.state.final:
                    latest = await self._store.get(principal, target, owner)
                else:
                    latest = _apply(current, change)
                if latest.state != current.state:
                    yield latest
                current = latest


def _apply(generation: Generation, change: StateChange) -> Generation:
    return dataclasses.replace(
        generation,
        state=change.state,
        attempts=change.attempts,
        error_message=change.error_message,
        transaction_id=change.transaction_id,
        output_mime_type=change.output_mime_type,
        update_time=change.update_time,
    )


def _could_be_catalogued(model: str) -> bool:
    """Whether `model` fits the database's catalogue (`credit_models.model`), so that a
    generation of it may exist."""
    return 1 <= len(model) <= MAX_MODEL_LENGTH and "\x00" not in model


def listed_bytes(generation: Generation) -> int:
    """An upper bound of the generation's size in a ListGenerations response."""
    texts = validation.utf8_size(
        generation.model,
        generation.prompt,
        generation.output_mime_type,
        generation.error_message,
    )
    return (
        GENERATION_OVERHEAD_BYTES
        + texts
        + len(generation.output)
        + paging.entries_bytes(generation.parameters)
    )


def _prompt(prompt: str, max_bytes: int) -> str:
    if not prompt.strip():
        raise InvalidArgument.one("prompt", "must not be empty")
    if len(prompt) > MAX_PROMPT_LENGTH:
        raise InvalidArgument.one("prompt", f"must be at most {MAX_PROMPT_LENGTH} characters")
    if validation.utf8_size(prompt) > max_bytes:
        raise InvalidArgument.one("prompt", f"must be at most {max_bytes} bytes (UTF-8)")
    validation.storable("prompt", prompt)
    return prompt


def _parameters(parameters: Mapping[str, str], max_bytes: int) -> dict[str, str]:
    if len(parameters) > MAX_PARAMETERS:
        raise InvalidArgument.one("parameters", f"at most {MAX_PARAMETERS} entries")
    if validation.utf8_size(*parameters.keys(), *parameters.values()) > max_bytes:
        raise InvalidArgument.one(
            "parameters", f"keys and values must be at most {max_bytes} bytes (UTF-8) in all"
        )
    for key, value in parameters.items():
        if not 1 <= len(key) <= MAX_PARAMETER_KEY_LENGTH:
            raise InvalidArgument.one(
                "parameters", f"keys must be 1 to {MAX_PARAMETER_KEY_LENGTH} characters"
            )
        if len(value) > MAX_PARAMETER_VALUE_LENGTH:
            raise InvalidArgument.one(
                "parameters", f"values must be at most {MAX_PARAMETER_VALUE_LENGTH} characters"
            )
        validation.storable("parameters", key, value)
    return dict(parameters)
