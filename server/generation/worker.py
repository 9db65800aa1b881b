"""Workers: claim jobs from the queue in PostgreSQL and run them through their providers.

A worker claims one job at a time under a lease (renewed while the provider works), so a worker
that dies loses its jobs to another one after the lease. The SQL decides every transition:
success captures the hold, a final failure releases it, and a job that is no longer the
worker's (cancelled, or taken over) is stopped and its result discarded, never charged.
Workers run inside the server (CREDITS_WORKERS) or on their own (`credits worker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from server import runtime
from server.errors import CreditsError
from server.generation.feed import ChangeFeed
from server.generation.models import ClaimedJob, GenerationState, ModelSpec
from server.generation.ports import JobQueue
from server.generation.providers import registry
from server.generation.providers.base import Closable, Job, Output, Provider, ProviderError
from server.observability import metrics, tracing

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    lease_seconds: int = 30
    # How long an idle worker sleeps between claims when no notification wakes it.
    idle_seconds: float = 1.0
    # Backoff before a retryable failure is attempted again: base * 2^(attempt - 1), capped.
    retry_base_seconds: int = 2
    retry_max_seconds: int = 60
    max_output_bytes: int = 10 * 1024 * 1024


def load_providers(catalogue: Mapping[str, ModelSpec]) -> dict[str, Provider]:
    """One provider per catalogue model, built from its settings (fails fast on bad ones)."""
    return {name: registry.load(spec.provider, spec.settings) for name, spec in catalogue.items()}


class Worker:
    def __init__(
        self,
        queue: JobQueue,
        catalogue: Mapping[str, ModelSpec],
        providers: Mapping[str, Provider],
        feed: ChangeFeed,
        settings: WorkerSettings = WorkerSettings(),
        name: str | None = None,
    ) -> None:
        self._queue = queue
        self._catalogue = catalogue
        self._providers = providers
        self._feed = feed
        self._settings = settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # Set when the worker is to claim no more jobs; `busy` while it claims or runs one.
        self.draining = False
        self.busy = False

    async def run(self) -> None:
        """Claim and run jobs until cancelled, or until draining once the job in hand is done."""
        while not self.draining:
            # Busy from the claim on: a claim in flight may be taking a job (its commit can
            # reach a watcher before its answer reaches this worker).
            self.busy = True
            try:
                job = await self._queue.claim(self.name, self._settings.lease_seconds)
            except CreditsError as error:
                log.warning("worker %s cannot claim (%s)", self.name, error.reason)
                job = None
            except Exception:
                metrics.unexpected("generation_worker", log, "worker %s cannot claim", self.name)
                job = None
            try:
                if job is not None:
                    await self.process(job)
            finally:
                self.busy = False
            if job is None and not self.draining:
                await self._idle()

    async def _idle(self) -> None:
        self._feed.queued.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._settings.idle_seconds):
                await self._feed.queued.wait()

    async def process(self, job: ClaimedJob) -> None:
        """Run one claimed job to its recorded end (or leave it to the lease if we cannot),
        traced as an attempt in the trace of the CreateGeneration that queued it."""
        attributes: dict[str, str | int] = {
            tracing.GENERATION_ID: str(job.generation_id),
            "credits.model": job.model,
            "credits.attempt": job.attempt,
        }
        try:
            with tracing.job(job.traceparent, "generation attempt", attributes):
                await self._process(job)
        except Exception:
            # A bug, or an error the database should not have raised: the lease runs out and
            # the job is tried again; the worker goes on.
            metrics.unexpected(
                "generation_worker",
                log,
                "worker %s: generation %s failed unexpectedly",
                self.name,
                job.generation_id,
            )

    async def _process(self, job: ClaimedJob) -> None:
        spec = self._catalogue.get(job.model)
        provider = self._providers.get(job.model)
        if spec is None or provider is None:
            await self._fail(job, f"model {job.model!r} is no longer offered", retryable=False)
            return
        call = Job(str(job.generation_id), job.model, job.prompt, job.parameters, job.attempt)
        work = asyncio.create_task(self._generate(provider, call, spec.timeout_seconds))
        keeper = asyncio.create_task(self._keep_lease(job, work))
        try:
            output = await work
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the worker itself is stopping: the lease hands the job on
            # The lease keeper stopped the work: the job was cancelled or taken over.
            log.info("generation %s is no longer ours; its work stopped", job.generation_id)
            metrics.WORKER_OUTCOMES.labels("discarded").inc()
            return
        except ProviderError as error:
            await self._fail(job, str(error), retryable=error.retryable)
            return
        except Exception:
            log.exception("provider of %s failed unexpectedly", job.model)
            await self._fail(job, "the provider failed unexpectedly", retryable=True)
            return
        finally:
            await runtime.stop(keeper)
        await self._complete(job, output)

    async def _generate(self, provider: Provider, call: Job, limit_seconds: int) -> Output:
        try:
            async with asyncio.timeout(limit_seconds):
                with tracing.span("provider generate", {"credits.model": call.model}, client=True):
                    output = await provider.generate(call)
        except TimeoutError:
            raise ProviderError(f"timed out after {limit_seconds} s", retryable=True) from None
        if len(output.data) > self._settings.max_output_bytes:
            raise ProviderError(
                f"output of {len(output.data)} bytes exceeds the limit of "
                f"{self._settings.max_output_bytes}",
                retryable=False,
            )
        return output

    async def _keep_lease(self, job: ClaimedJob, work: asyncio.Task[Output]) -> None:
        """Renew the lease while `work` runs; cancel it when the job stops being ours."""
        interval = self._settings.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                ours = await self._queue.renew_lease(
                    job.generation_id, self.name, self._settings.lease_seconds
                )
            except CreditsError as error:
                log.warning("cannot renew the lease of %s (%s)", job.generation_id, error.reason)
                continue
            if not ours:
                work.cancel()
                return

    async def _complete(self, job: ClaimedJob, output: Output) -> None:
        try:
            charged = await self._queue.complete(
                job.generation_id, self.name, output.data, output.mime_type
            )
        except CreditsError as error:
            # Nothing was recorded: the lease runs out and another worker tries again.
            log.warning("cannot record the result of %s (%s)", job.generation_id, error.reason)
            return
        if not charged:
            log.info("generation %s ended meanwhile; result discarded", job.generation_id)
        metrics.WORKER_OUTCOMES.labels("succeeded" if charged else "discarded").inc()

    async def _fail(self, job: ClaimedJob, message: str, *, retryable: bool) -> None:
        delay = min(
            self._settings.retry_base_seconds * 2 ** (job.attempt - 1),
            self._settings.retry_max_seconds,
        )
        try:
            ended = await self._queue.fail(
                job.generation_id,
                self.name,
                message[:1000],
                retryable=retryable,
                retry_delay_seconds=delay,
            )
        except CreditsError as error:
            log.warning("cannot record the failure of %s (%s)", job.generation_id, error.reason)
            return
        outcome = "retried" if ended.state == GenerationState.QUEUED else "failed"
        metrics.WORKER_OUTCOMES.labels(outcome).inc()


class WorkerPool:
    """Workers sharing one process's providers and change feed; stopping the pool closes the
    providers."""

    def __init__(self, workers: list[Worker], providers: Iterable[Provider] = ()) -> None:
        self._workers = workers
        self._providers = list(providers)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(worker.run(), name=f"worker-{i}")
            for i, worker in enumerate(self._workers)
        ]

    async def stop(self, grace: float = 0.0) -> None:
        """Claim no more jobs; let the jobs in hand finish for up to `grace` seconds, then cancel
        what is left (a cancelled job's lease hands it on); then close the providers."""
        for worker in self._workers:
            worker.draining = True
        tasks, self._tasks = self._tasks, []
        # No tasks once stopped: a second stop only closes nothing again.
        busy = [task for task, worker in zip(tasks, self._workers, strict=False) if worker.busy]
        if busy and grace > 0:
            await asyncio.wait(busy, timeout=grace)
        await runtime.stop(*tasks)
        providers, self._providers = self._providers, []
        for provider in providers:
            if isinstance(provider, Closable):
                await provider.aclose()
