"""`credits webhooks ...`: manage webhook endpoints and their deliveries in the database the
settings name (the one `credits serve` uses)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from server import app, runtime
from server.config import Settings
from server.errors import CreditsError
from server.events.models import EVENT_TYPES, Delivery
from server.events.webhooks import new_secret
from server.repository.breaker import CredentialBreaker
from server.repository.events import EventRepository
from server.repository.layered import LayeredRepository


@contextlib.asynccontextmanager
async def _admin(settings: Settings) -> AsyncIterator[EventRepository]:
    transport, database, _ = await app.open_store(app.resolve(settings))
    try:
        yield EventRepository(LayeredRepository(transport, CredentialBreaker(cooldown=0)))
    finally:
        await transport.close()
        if database is not None:
            await database.astop()


def _types(text: str) -> list[str]:
    types = sorted({t.strip() for t in text.split(",") if t.strip()})
    unknown = [t for t in types if t not in EVENT_TYPES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown event type {unknown[0]!r} (known: {', '.join(EVENT_TYPES)})"
        )
    return types


MAX_LISTED = 1000


def _how_many(text: str) -> int:
    """A count of deliveries to list: 1 to MAX_LISTED."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= count <= MAX_LISTED:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_LISTED}")
    return count


def _delivery_line(d: Delivery) -> str:
    status = "-" if d.last_status is None else str(d.last_status)
    when = d.next_attempt_time.isoformat() if d.state == "pending" else "-"
    return (
        f"{d.delivery_id}  {d.state:<9}  attempts {d.attempts}  {d.type:<20}  event {d.event_id}"
        f"  {d.url}  status {status}  next {when}  {d.last_error}"
    ).rstrip()


async def _add(admin: EventRepository, args: argparse.Namespace) -> None:
    secret = new_secret()
    endpoint = await admin.add(args.url, args.events, secret)
    types = ",".join(endpoint.event_types) or "all"
    print(f"endpoint {endpoint.endpoint_id}  {endpoint.url}  events {types}")
    print(f"secret {secret}  (shown once: give it to the receiver now)")


async def _list(admin: EventRepository, args: argparse.Namespace) -> None:
    for e in await admin.endpoints():
        types = ",".join(e.event_types) or "all"
        print(f"{e.endpoint_id}  {e.url}  events {types}  created {e.create_time.isoformat()}")


async def _remove(admin: EventRepository, args: argparse.Namespace) -> None:
    await admin.remove(args.endpoint_id)
    print(f"removed {args.endpoint_id}")


async def _rotate(admin: EventRepository, args: argparse.Namespace) -> None:
    secret = new_secret()
    await admin.rotate_secret(args.endpoint_id, secret)
    print(f"secret {secret}  (shown once; deliveries from now on are signed with it)")


async def _deliveries(admin: EventRepository, args: argparse.Namespace) -> None:
    for d in await admin.deliveries("failed" if args.failed else None, args.limit):
        print(_delivery_line(d))


async def _retry(admin: EventRepository, args: argparse.Namespace) -> None:
    print(_delivery_line(await admin.retry(args.delivery_id)))


Action = Callable[[EventRepository, argparse.Namespace], Coroutine[Any, Any, None]]


async def run(settings: Settings, action: Action, args: argparse.Namespace) -> int:
    async with _admin(settings) as admin:
        try:
            await action(admin, args)
        except CreditsError as error:
            print(f"credits: {error.message}", file=sys.stderr)
            return 1
    return 0


def add_parser(
    commands: Any, run: Callable[[Settings, argparse.Namespace], int], epilog: str
) -> None:
    """The `webhooks` command and its subcommands, under `commands`."""
    webhooks = commands.add_parser(
        "webhooks",
        help="manage webhook endpoints and deliveries",
        description="Manage the webhook endpoints events are POSTed to (signed per the "
        "Standard Webhooks specification) and their deliveries, in the database `credits "
        "serve` uses (docs/events.md).",
        epilog=epilog,
    )
    sub = webhooks.add_subparsers(dest="webhooks_command", required=True)
    add = sub.add_parser("add", help="add an endpoint; prints its secret, once")
    add.add_argument("url", help="an http:// or https:// URL")
    add.add_argument(
        "--events", type=_types, default=[], help="comma-separated event types (default: all)"
    )
    add.set_defaults(action=_add)
    sub.add_parser("list", help="the endpoints (never their secrets)").set_defaults(action=_list)
    remove = sub.add_parser("remove", help="remove an endpoint and its deliveries")
    remove.add_argument("endpoint_id", type=uuid.UUID)
    remove.set_defaults(action=_remove)
    rotate = sub.add_parser("rotate-secret", help="give an endpoint a new secret; prints it")
    rotate.add_argument("endpoint_id", type=uuid.UUID)
    rotate.set_defaults(action=_rotate)
    deliveries = sub.add_parser("deliveries", help="deliveries, newest first")
    deliveries.add_argument("--failed", action="store_true", help="only those given up on")
    deliveries.add_argument(
        "--limit", type=_how_many, default=50, help=f"at most this many (50; 1 to {MAX_LISTED})"
    )
    deliveries.set_defaults(action=_deliveries)
    retry = sub.add_parser("retry", help="deliver again from now (attempts start over)")
    retry.add_argument("delivery_id", type=uuid.UUID)
    retry.set_defaults(action=_retry)
    webhooks.set_defaults(run=run)


def main(settings: Settings, args: argparse.Namespace) -> int:
    return runtime.run(run(settings, args.action, args))
