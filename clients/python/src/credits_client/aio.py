"""AsyncCreditsClient: the asyncio client of the credits service (on grpc.aio)."""

# `timeout` is the gRPC deadline the call carries to the server (as in grpc.aio itself), not a
# local wait that asyncio.timeout could replace.
# ruff: noqa: ASYNC109

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Self, TypeVar

import grpc
import grpc.aio

from credits_client import _requests as build
from credits_client._config import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_TIMEOUT,
    TLS,
    ChannelOptions,
    channel_options,
    open_aio_channel,
)
from credits_client._proto import credit_service_pb2 as cpb
from credits_client._proto import generation_service_pb2 as gpb
from credits_client._proto import grant_pb2, ledger_pb2, usage_pb2
from credits_client._proto.credit_service_pb2_grpc import CreditServiceStub
from credits_client._proto.generation_service_pb2_grpc import GenerationServiceStub
from credits_client.client import DEFAULT_TARGET
from credits_client.credentials import Credentials, CredentialsLike, as_credentials, authorization
from credits_client.errors import from_call

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


class AsyncCreditsClient:
    """An asyncio client of CreditService and GenerationService (create it in async code).

    Args:
        target: the service's address, ``host:port``.
        credentials: a :class:`~credits_client.credentials.Credentials`, a token string, or a
            function or async function returning a fresh token for each call.
        tls: ``True`` for TLS with the system's roots, a :class:`~credits_client.TLS` for a
            private CA or a client certificate, ``False`` (default) for plaintext.
        timeout: the default deadline of a unary call in seconds (retries included); ``None``
            for none. Each method's ``timeout`` overrides it.
        stream_timeout: the default deadline of ``watch_generation`` (default: none).
        max_attempts: attempts per call while the service is UNAVAILABLE (1 to 5; 1: no retry).
        options: extra gRPC channel options.
        metadata: extra metadata sent with every call.
        channel: an existing channel to use instead of opening one (the client then does not
            close it, and ``target``, ``tls``, ``max_attempts`` and ``options`` are ignored).

    Methods take keyword arguments, return the response messages and raise
    :class:`~credits_client.errors.CreditsError` subclasses. Use the client as an async context
    manager or await :meth:`close`.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        credentials: CredentialsLike | None = None,
        tls: TLS | bool = False,
        timeout: float | None = DEFAULT_TIMEOUT,
        stream_timeout: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        options: ChannelOptions = (),
        metadata: Sequence[tuple[str, str]] = (),
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self._credentials: Credentials | None = as_credentials(credentials)
        self._timeout = timeout
        self._stream_timeout = stream_timeout
        self._extra_metadata = tuple(metadata)
        self._owns_channel = channel is None
        self._channel = (
            channel
            if channel is not None
            else open_aio_channel(target, tls, channel_options(max_attempts, options))
        )
        self._credits = CreditServiceStub(self._channel)
        self._generations = GenerationServiceStub(self._channel)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(credentials={self._credentials!r})"

    # Lifecycle

    async def close(self) -> None:
        """Close the channel (if the client opened it)."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # Plumbing

    async def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self._credentials is None:
            return self._extra_metadata
        token = await self._credentials.token_async()
        return (authorization(token), *self._extra_metadata)

    async def _unary(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response],
        request: _Request,
        timeout: float | None,
    ) -> _Response:
        deadline = self._timeout if timeout is None else timeout
        metadata = await self._metadata()
        try:
            return await method(request, timeout=deadline, metadata=metadata)
        except grpc.RpcError as error:
            raise from_call(error) from error

    # CreditService

    async def get_balance(
        self, *, user_id: str = "", timeout: float | None = None
    ) -> cpb.GetBalanceResponse:
        """The user's balance, held and available credits (``user_id`` empty: the caller)."""
        return await self._unary(self._credits.GetBalance, build.get_balance(user_id), timeout)

    async def get_profile(
        self, *, user_id: str = "", timeout: float | None = None
    ) -> cpb.GetProfileResponse:
        """The user's profile (a user's first call creates it)."""
        return await self._unary(self._credits.GetProfile, build.get_profile(user_id), timeout)

    async def check_credits(
        self, *, amount: int, user_id: str = "", scope: str = "", timeout: float | None = None
    ) -> cpb.CheckCreditsResponse:
        """Whether the user could spend ``amount`` now (for ``scope``, e.g. a model's name;
        empty: unscoped spending, which only unscoped grants pay for). Changes nothing."""
        return await self._unary(
            self._credits.CheckCredits, build.check_credits(user_id, amount, scope), timeout
        )

    async def debit_credits(
        self,
        *,
        amount: int,
        user_id: str = "",
        idempotency_key: str | None = None,
        description: str = "",
        metadata: Mapping[str, str] | None = None,
        scope: str = "",
        timeout: float | None = None,
    ) -> cpb.DebitCreditsResponse:
        """Spend ``amount`` credits now. Without ``idempotency_key`` the client makes a UUID one,
        which keeps the client's own retries safe; pass your own key to make retries across
        processes safe too. ``scope`` says what the spending is for (e.g. a model's name):
        grants scoped to it pay first; empty, only unscoped grants pay. Raises
        InsufficientCredits when the user cannot pay."""
        request = build.debit_credits(
            user_id, amount, idempotency_key, description, metadata, scope
        )
        return await self._unary(self._credits.DebitCredits, request, timeout)

    async def grant_credits(
        self,
        *,
        user_id: str,
        amount: int,
        idempotency_key: str | None = None,
        description: str = "",
        metadata: Mapping[str, str] | None = None,
        expire_time: datetime.datetime | None = None,
        effective_time: datetime.datetime | None = None,
        priority: int | None = None,
        category: grant_pb2.GrantCategory.ValueType = grant_pb2.GRANT_CATEGORY_UNSPECIFIED,
        scopes: Iterable[str] = (),
        timeout: float | None = None,
    ) -> cpb.GrantCreditsResponse:
        """Give ``amount`` credits to the user (services only) as a grant: from
        ``effective_time`` (timezone-aware; default now) until ``expire_time`` (default never),
        spent in ``priority`` order (0 to 100, lower first; default 50), of ``category``
        (default paid), for the spending ``scopes`` it names (default any)."""
        request = build.grant_credits(
            user_id,
            amount,
            idempotency_key,
            description,
            metadata,
            expire_time=expire_time,
            effective_time=effective_time,
            priority=priority,
            category=category,
            scopes=scopes,
        )
        return await self._unary(self._credits.GrantCredits, request, timeout)

    async def void_grant(
        self,
        *,
        grant_id: str,
        idempotency_key: str | None = None,
        description: str = "",
        timeout: float | None = None,
    ) -> cpb.VoidGrantResponse:
        """Remove what is left of a grant, but what pending holds pin of it (services only)."""
        request = build.void_grant(grant_id, idempotency_key, description)
        return await self._unary(self._credits.VoidGrant, request, timeout)

    async def list_grants(
        self,
        *,
        user_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        states: Iterable[grant_pb2.GrantState.ValueType] = (),
        timeout: float | None = None,
    ) -> cpb.ListGrantsResponse:
        """One page of the user's grants, newest first, in ``states`` (default: all)."""
        request = build.list_grants(user_id, page_size, page_token, states)
        return await self._unary(self._credits.ListGrants, request, timeout)

    async def set_balance_alerts(
        self, *, user_id: str, thresholds: Iterable[int] | None, timeout: float | None = None
    ) -> cpb.SetBalanceAlertsResponse:
        """Set the user's low-balance thresholds (services only); None: the defaults again."""
        request = build.set_balance_alerts(user_id, thresholds)
        return await self._unary(self._credits.SetBalanceAlerts, request, timeout)

    async def list_events(
        self,
        *,
        after_event_id: str = "",
        types: Iterable[str] = (),
        page_size: int = 0,
        timeout: float | None = None,
    ) -> cpb.ListEventsResponse:
        """Events in commit order after ``after_event_id`` (services only): pass the last
        event's id to resume."""
        request = build.list_events(after_event_id, types, page_size)
        return await self._unary(self._credits.ListEvents, request, timeout)

    async def set_spend_limit(
        self,
        *,
        user_id: str,
        period: usage_pb2.SpendPeriod.ValueType,
        limit: int,
        timeout: float | None = None,
    ) -> cpb.SetSpendLimitResponse:
        """Set the user's own spending limit for ``period``; 0 removes it (services only)."""
        request = build.set_spend_limit(user_id, period, limit)
        return await self._unary(self._credits.SetSpendLimit, request, timeout)

    async def get_spend_limits(
        self, *, user_id: str = "", timeout: float | None = None
    ) -> cpb.GetSpendLimitsResponse:
        """The user's limits in force, each with what was spent in its current period."""
        return await self._unary(
            self._credits.GetSpendLimits, build.get_spend_limits(user_id), timeout
        )

    async def get_usage(
        self,
        *,
        start_time: datetime.datetime,
        end_time: datetime.datetime,
        granularity: usage_pb2.UsageGranularity.ValueType,
        group_by: usage_pb2.UsageGroupBy.ValueType = usage_pb2.USAGE_GROUP_BY_NONE,
        user_id: str = "",
        timeout: float | None = None,
    ) -> cpb.GetUsageResponse:
        """What the user's ledger moved in [start_time, end_time) (whole hours), in buckets."""
        request = build.get_usage(user_id, start_time, end_time, granularity, group_by)
        return await self._unary(self._credits.GetUsage, request, timeout)

    async def export_transactions(
        self,
        *,
        user_id: str = "",
        all_users: bool = False,
        start_time: datetime.datetime | None = None,
        end_time: datetime.datetime | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[ledger_pb2.Transaction]:
        """The ledger (one user's, or every user's), entry by entry in ledger order, with
        allocations (services only). ``timeout`` defaults to the client's ``stream_timeout``."""
        deadline = self._stream_timeout if timeout is None else timeout
        call = self._credits.ExportTransactions(
            build.export_transactions(user_id, all_users, start_time, end_time),
            timeout=deadline,
            metadata=await self._metadata(),
        )
        try:
            async for message in call:
                for entry in message.transactions:
                    yield entry
        except grpc.RpcError as error:
            raise from_call(error) from error
        finally:
            call.cancel()

    async def refund_credits(
        self,
        *,
        transaction_id: str,
        user_id: str = "",
        amount: int = 0,
        idempotency_key: str | None = None,
        description: str = "",
        timeout: float | None = None,
    ) -> cpb.RefundCreditsResponse:
        """Return credits of a debit or capture (services only); ``amount`` 0 refunds the rest,
        ``user_id`` empty refunds the transaction's owner."""
        request = build.refund_credits(
            user_id, transaction_id, amount, idempotency_key, description
        )
        return await self._unary(self._credits.RefundCredits, request, timeout)

    async def reserve_credits(
        self,
        *,
        amount: int,
        user_id: str = "",
        idempotency_key: str | None = None,
        ttl: float | datetime.timedelta | None = None,
        description: str = "",
        scope: str = "",
        timeout: float | None = None,
    ) -> cpb.ReserveCreditsResponse:
        """Set ``amount`` credits aside in a hold for ``ttl`` (seconds or a timedelta; default:
        the service's 15 minutes) until captured or released; ``scope`` as in debit_credits."""
        request = build.reserve_credits(user_id, amount, idempotency_key, ttl, description, scope)
        return await self._unary(self._credits.ReserveCredits, request, timeout)

    async def capture_credits(
        self,
        *,
        hold_id: str,
        amount: int = 0,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> cpb.CaptureCreditsResponse:
        """Charge a pending hold (``amount`` 0: all of it) and release the rest."""
        request = build.capture_credits(hold_id, amount, idempotency_key)
        return await self._unary(self._credits.CaptureCredits, request, timeout)

    async def release_credits(
        self, *, hold_id: str, timeout: float | None = None
    ) -> cpb.ReleaseCreditsResponse:
        """Release a pending hold without charging it."""
        return await self._unary(
            self._credits.ReleaseCredits, build.release_credits(hold_id), timeout
        )

    async def list_transactions(
        self,
        *,
        user_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        kinds: Iterable[ledger_pb2.TransactionKind.ValueType] = (),
        start_time: datetime.datetime | None = None,
        end_time: datetime.datetime | None = None,
        timeout: float | None = None,
    ) -> cpb.ListTransactionsResponse:
        """One page of the user's ledger, newest first (``next_page_token`` empty on the last)."""
        request = build.list_transactions(
            user_id, page_size, page_token, kinds, start_time, end_time
        )
        return await self._unary(self._credits.ListTransactions, request, timeout)

    # GenerationService

    async def list_models(self, *, timeout: float | None = None) -> gpb.ListModelsResponse:
        """The models on offer and their costs."""
        return await self._unary(self._generations.ListModels, build.list_models(), timeout)

    async def create_generation(
        self,
        *,
        model: str,
        prompt: str,
        parameters: Mapping[str, str] | None = None,
        user_id: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> gpb.CreateGenerationResponse:
        """Queue a generation and reserve its cost. ``request_id`` is its idempotency key (a
        UUID when not given)."""
        request = build.create_generation(user_id, model, prompt, parameters, request_id)
        return await self._unary(self._generations.CreateGeneration, request, timeout)

    async def get_generation(
        self, *, generation_id: str, timeout: float | None = None
    ) -> gpb.GetGenerationResponse:
        """A generation as it is now."""
        request = build.get_generation(generation_id)
        return await self._unary(self._generations.GetGeneration, request, timeout)

    async def list_generations(
        self,
        *,
        user_id: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> gpb.ListGenerationsResponse:
        """One page of the user's generations, newest first."""
        request = build.list_generations(user_id, page_size, page_token)
        return await self._unary(self._generations.ListGenerations, request, timeout)

    async def cancel_generation(
        self, *, generation_id: str, timeout: float | None = None
    ) -> gpb.CancelGenerationResponse:
        """Cancel a queued or running generation and release its hold."""
        request = build.cancel_generation(generation_id)
        return await self._unary(self._generations.CancelGeneration, request, timeout)

    def watch_generation(
        self, *, generation_id: str, timeout: float | None = None
    ) -> AsyncIterator[gpb.WatchGenerationResponse]:
        """The generation now, then once per state change, ending after a final state.

        ``timeout`` defaults to the client's ``stream_timeout``. Leaving the loop early cancels
        the stream.
        """
        request = build.watch_generation(generation_id)
        return self._stream(self._generations.WatchGeneration, request, timeout)

    def watch_balance(
        self, *, user_id: str = "", timeout: float | None = None
    ) -> AsyncIterator[cpb.WatchBalanceResponse]:
        """The user's balance now, then after every change. ``timeout`` defaults to the
        client's ``stream_timeout``. Leaving the loop early cancels the stream."""
        return self._stream(self._credits.WatchBalance, build.watch_balance(user_id), timeout)

    async def _stream(
        self,
        method: grpc.aio.UnaryStreamMultiCallable[_Request, _Response],
        request: _Request,
        timeout: float | None,
    ) -> AsyncIterator[_Response]:
        deadline = self._stream_timeout if timeout is None else timeout
        metadata = await self._metadata()
        call = method(request, timeout=deadline, metadata=metadata)
        try:
            async for message in call:
                yield message
        except grpc.RpcError as error:
            raise from_call(error) from error
        finally:
            call.cancel()
