"""CreditService over gRPC: requests to domain calls, results to responses, nothing else.

Errors travel as domain exceptions to the error interceptor, which owns the status mapping.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from credits.v1 import credit_service_pb2 as pb
from credits.v1 import credit_service_pb2_grpc, ledger_pb2
from server.api import convert
from server.auth.principal import current_principal
from server.credit.controls import SpendControls
from server.credit.ledger import CreditLedger
from server.events.service import Events

Context = grpc.aio.ServicerContext[Any, Any]


class CreditServicer(credit_service_pb2_grpc.CreditServiceServicer):
    def __init__(self, ledger: CreditLedger, events: Events, controls: SpendControls) -> None:
        self._ledger = ledger
        self._events = events
        self._controls = controls

    async def GetBalance(
        self, request: pb.GetBalanceRequest, context: Context
    ) -> pb.GetBalanceResponse:
        profile = await self._ledger.get_profile(current_principal(), request.user_id)
        return pb.GetBalanceResponse(
            user_id=str(profile.user_id),
            balance=profile.balance,
            held=profile.held,
            available=profile.available,
            next_expire_time=convert.timestamp_or_none(profile.next_expire_time),
            next_expire_amount=profile.next_expire_amount,
        )

    async def GetProfile(
        self, request: pb.GetProfileRequest, context: Context
    ) -> pb.GetProfileResponse:
        profile = await self._events.get_profile(current_principal(), request.user_id)
        return pb.GetProfileResponse(profile=convert.profile(profile))

    async def CheckCredits(
        self, request: pb.CheckCreditsRequest, context: Context
    ) -> pb.CheckCreditsResponse:
        check = await self._ledger.check(
            current_principal(), request.user_id, request.amount, request.scope
        )
        return pb.CheckCreditsResponse(
            sufficient=check.sufficient, available=check.available, shortfall=check.shortfall
        )

    async def DebitCredits(
        self, request: pb.DebitCreditsRequest, context: Context
    ) -> pb.DebitCreditsResponse:
        result = await self._ledger.debit(
            current_principal(),
            request.user_id,
            amount=request.amount,
            idempotency_key=request.idempotency_key,
            description=request.description,
            metadata=request.metadata,
            scope=request.scope,
        )
        return pb.DebitCreditsResponse(**convert.ledger_result(result))

    async def GrantCredits(
        self, request: pb.GrantCreditsRequest, context: Context
    ) -> pb.GrantCreditsResponse:
        result = await self._ledger.grant(
            current_principal(),
            request.user_id,
            amount=request.amount,
            idempotency_key=request.idempotency_key,
            description=request.description,
            metadata=request.metadata,
            expire_time=convert.optional_time(request, "expire_time"),
            effective_time=convert.optional_time(request, "effective_time"),
            priority=request.priority if request.HasField("priority") else None,
            category=convert.grant_category(request.category),
            scopes=request.scopes,
        )
        return pb.GrantCreditsResponse(**convert.grant_result(result))

    async def RefundCredits(
        self, request: pb.RefundCreditsRequest, context: Context
    ) -> pb.RefundCreditsResponse:
        result = await self._ledger.refund(
            current_principal(),
            request.user_id,
            transaction_id=request.transaction_id,
            amount=request.amount,
            idempotency_key=request.idempotency_key,
            description=request.description,
        )
        return pb.RefundCreditsResponse(**convert.ledger_result(result))

    async def ReserveCredits(
        self, request: pb.ReserveCreditsRequest, context: Context
    ) -> pb.ReserveCreditsResponse:
        reservation = await self._ledger.reserve(
            current_principal(),
            request.user_id,
            amount=request.amount,
            idempotency_key=request.idempotency_key,
            ttl=convert.duration_of(request.ttl, "ttl") if request.HasField("ttl") else None,
            description=request.description,
            scope=request.scope,
        )
        return pb.ReserveCreditsResponse(
            hold=convert.hold(reservation.hold),
            available=reservation.available,
            replayed=reservation.replayed,
        )

    async def CaptureCredits(
        self, request: pb.CaptureCreditsRequest, context: Context
    ) -> pb.CaptureCreditsResponse:
        capture = await self._ledger.capture(
            current_principal(),
            request.hold_id,
            amount=request.amount,
            idempotency_key=request.idempotency_key,
        )
        return pb.CaptureCreditsResponse(
            transaction=convert.transaction(capture.transaction),
            hold=convert.hold(capture.hold),
            balance=capture.balance,
            replayed=capture.replayed,
        )

    async def ReleaseCredits(
        self, request: pb.ReleaseCreditsRequest, context: Context
    ) -> pb.ReleaseCreditsResponse:
        release = await self._ledger.release(current_principal(), request.hold_id)
        return pb.ReleaseCreditsResponse(
            hold=convert.hold(release.hold), available=release.available
        )

    async def ListTransactions(
        self, request: pb.ListTransactionsRequest, context: Context
    ) -> pb.ListTransactionsResponse:
        page = await self._ledger.list_transactions(
            current_principal(),
            request.user_id,
            request.page_size,
            request.page_token,
            convert.transaction_filter(request),
        )
        return pb.ListTransactionsResponse(
            transactions=[convert.transaction(t) for t in page.transactions],
            next_page_token=page.next_page_token,
        )

    async def VoidGrant(
        self, request: pb.VoidGrantRequest, context: Context
    ) -> pb.VoidGrantResponse:
        result = await self._ledger.void_grant(
            current_principal(),
            request.grant_id,
            idempotency_key=request.idempotency_key,
            description=request.description,
        )
        return pb.VoidGrantResponse(**convert.grant_result(result))

    async def ListGrants(
        self, request: pb.ListGrantsRequest, context: Context
    ) -> pb.ListGrantsResponse:
        page = await self._ledger.list_grants(
            current_principal(),
            request.user_id,
            request.page_size,
            request.page_token,
            convert.grant_states(request.states),
        )
        return pb.ListGrantsResponse(
            grants=[convert.grant(g) for g in page.grants],
            next_page_token=page.next_page_token,
        )

    async def SetBalanceAlerts(
        self, request: pb.SetBalanceAlertsRequest, context: Context
    ) -> pb.SetBalanceAlertsResponse:
        profile = await self._events.set_balance_alerts(
            current_principal(), request.user_id, request.thresholds, request.use_defaults
        )
        return pb.SetBalanceAlertsResponse(profile=convert.profile(profile))

    async def ListEvents(
        self, request: pb.ListEventsRequest, context: Context
    ) -> pb.ListEventsResponse:
        events = await self._events.list_events(
            current_principal(), request.after_event_id, request.types, request.page_size
        )
        return pb.ListEventsResponse(events=[convert.event(e) for e in events])

    async def WatchBalance(
        self, request: pb.WatchBalanceRequest, context: Context
    ) -> AsyncIterator[pb.WatchBalanceResponse]:
        async for balance in self._events.watch_balance(current_principal(), request.user_id):
            yield pb.WatchBalanceResponse(
                user_id=str(balance.user_id),
                balance=balance.balance,
                held=balance.held,
                available=balance.available,
                update_time=convert.timestamp(balance.update_time),
            )

    async def SetSpendLimit(
        self, request: pb.SetSpendLimitRequest, context: Context
    ) -> pb.SetSpendLimitResponse:
        limits = await self._controls.set_spend_limit(
            current_principal(),
            request.user_id,
            convert.spend_period_of(request.period),
            request.limit,
        )
        return pb.SetSpendLimitResponse(limits=[convert.spend_limit(x) for x in limits])

    async def GetSpendLimits(
        self, request: pb.GetSpendLimitsRequest, context: Context
    ) -> pb.GetSpendLimitsResponse:
        limits = await self._controls.get_spend_limits(current_principal(), request.user_id)
        return pb.GetSpendLimitsResponse(limits=[convert.spend_limit(x) for x in limits])

    async def GetUsage(self, request: pb.GetUsageRequest, context: Context) -> pb.GetUsageResponse:
        buckets = await self._controls.get_usage(
            current_principal(),
            request.user_id,
            convert.optional_time(request, "start_time"),
            convert.optional_time(request, "end_time"),
            convert.granularity_of(request.granularity),
            convert.group_by_of(request.group_by),
        )
        return pb.GetUsageResponse(buckets=[convert.usage_bucket(b) for b in buckets])

    async def ExportTransactions(
        self, request: pb.ExportTransactionsRequest, context: Context
    ) -> AsyncIterator[pb.ExportTransactionsResponse]:
        batches = await self._controls.export(
            current_principal(),
            request.user_id,
            all_users=request.all_users,
            start=convert.optional_time(request, "start_time"),
            end=convert.optional_time(request, "end_time"),
        )
        async for batch in batches:
            for chunk in _chunks([convert.transaction(t) for t in batch]):
                yield pb.ExportTransactionsResponse(transactions=chunk)


# An export's message carries entries up to about this many bytes (and at least one), far
# below any CREDITS_MAX_SEND_MESSAGE_BYTES.
EXPORT_MESSAGE_BYTES = 1024 * 1024


def _chunks(entries: list[ledger_pb2.Transaction]) -> Iterator[list[ledger_pb2.Transaction]]:
    chunk: list[ledger_pb2.Transaction] = []
    size = 0
    for entry in entries:
        entry_size = entry.ByteSize()
        if chunk and size + entry_size > EXPORT_MESSAGE_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(entry)
        size += entry_size
    if chunk:
        yield chunk
