"""The `credits` command: `serve` runs the service, `worker` runs generation workers, `token`
prints a signed token for trying it, `check-config` checks a deployment's configuration,
`webhooks` manages webhook endpoints and deliveries, `export` writes the ledger for accounting."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import sys
import uuid
from datetime import UTC, datetime, timedelta

from server import app, checks, ledger_export, processes, runtime, serving, webhook_cli
from server.auth.secret_store import secret_path
from server.auth.tokens import DEFAULT_ISSUER, mint_service_token, mint_user_token
from server.config import Settings
from server.observability import logs

# What every command's --help says of where its configuration comes from.
CONFIGURATION = (
    "Configuration comes from environment variables, not options (CREDITS_LISTEN, "
    "CREDITS_DATA_DIR, DATABASE_URL, SUPABASE_URL, ...): docs/configuration.md lists them all, "
    "and `credits check-config` checks them."
)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    if settings.processes > 1:
        return processes.supervise(settings)
    runtime.run(app.serve(settings))
    return 0


def _token(settings: Settings, args: argparse.Namespace) -> int:
    if settings.embedded and not settings.jwt_secret and not args.init:
        # The server's secret, found by the same rule (CREDITS_DATA_DIR, else ./.data): a secret
        # made up here would sign tokens the running server refuses.
        path = secret_path(settings.data_dir)
        if not path.exists():
            raise app.ConfigurationError(
                f"no JWT secret at {path.absolute()}: run this where `credits serve` runs (its "
                "working directory, or its CREDITS_DATA_DIR), set SUPABASE_JWT_SECRET, or pass "
                "--init to make a new secret there"
            )
    settings = app.resolve(settings)
    if not settings.jwt_secret:
        raise app.ConfigurationError("`credits token` needs SUPABASE_JWT_SECRET (or embedded mode)")
    ttl = timedelta(minutes=args.ttl_minutes)
    if args.service:
        print(mint_service_token(settings.jwt_secret, ttl=ttl))
        return 0
    user = args.user
    if user is None:
        user = uuid.uuid4()
        print(f"user id: {user}", file=sys.stderr)
    token = mint_user_token(
        settings.jwt_secret,
        user,
        email=args.email,
        ttl=ttl,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer or DEFAULT_ISSUER,
    )
    print(token)
    return 0


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    runtime.run(app.run_workers(settings, args.count or settings.workers or 1))
    return 0


def _check_config(settings: Settings, args: argparse.Namespace) -> int:
    results = asyncio.run(checks.run(app.resolve(settings), args.token))
    for result in results:
        print(result.line())
    return 0 if all(result.ok for result in results) else 1


def _export(settings: Settings, args: argparse.Namespace) -> int:
    written = asyncio.run(
        app.export_ledger(
            settings,
            sys.stdout,
            args.format,
            user_id=args.user,
            start=args.since,
            end=args.until,
        )
    )
    print(f"credits: exported {written} ledger entries", file=sys.stderr)
    return 0


def _time(text: str) -> datetime:
    """An RFC 3339 / ISO 8601 time; one without an offset is UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _version() -> str:
    """The installed distribution's version (what pip installed, or the editable checkout's)."""
    try:
        return importlib.metadata.version("credits")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree never installed
        return "unknown"


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="credits", description=__doc__, epilog=CONFIGURATION)
    root.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = root.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the gRPC service",
        description="Run the gRPC service until SIGTERM or SIGINT: on an embedded PostgreSQL "
        "in CREDITS_DATA_DIR (default ./.data) unless DATABASE_URL or SUPABASE_URL names "
        "another database; CREDITS_PROCESSES server processes on CREDITS_LISTEN (default "
        "127.0.0.1:50051). A port already in use is refused (exit 2).",
        epilog=CONFIGURATION,
    )
    serve.set_defaults(run=_serve)
    token = commands.add_parser(
        "token",
        help="print a token signed with the service's JWT secret (for local use)",
        description="Print a JWT signed with SUPABASE_JWT_SECRET or, in embedded mode, with the "
        "secret `credits serve` keeps in CREDITS_DATA_DIR (default ./.data): run it where the "
        "server runs. A user token by default (its new id on stderr), or a service token.",
        epilog=CONFIGURATION,
    )
    who = token.add_mutually_exclusive_group()
    who.add_argument("--user", type=uuid.UUID, help="the user's id (default: a new one)")
    who.add_argument("--service", action="store_true", help="a service_role token")
    token.add_argument("--email", default=None, help="the user's email claim")
    token.add_argument(
        "--ttl-minutes", type=_positive, default=60, help="lifetime in minutes (default 60)"
    )
    token.add_argument(
        "--init",
        action="store_true",
        help="in embedded mode, make the data dir's JWT secret if it has none yet (as the "
        "first `credits serve` would); without it, a missing secret is an error",
    )
    token.set_defaults(run=_token)
    worker = commands.add_parser(
        "worker",
        help="run generation workers only (scale them apart from the API)",
        description="Run generation workers only, until SIGTERM or SIGINT, on the database "
        "`credits serve` uses (scale them apart from the API; CREDITS_WORKERS=0 keeps the "
        "servers' own).",
        epilog=CONFIGURATION,
    )
    worker.add_argument("--count", type=int, default=0, help="workers (default CREDITS_WORKERS)")
    worker.set_defaults(run=_worker)
    check = commands.add_parser(
        "check-config",
        help="check the configuration a deployment will use; exit 1 on a failure",
        description="Check the configuration a deployment will use, one line per check (OK, or "
        "FAIL with a hint): the database or Supabase project and its migrations, the token "
        "keys, the serving options. Exit 1 when a check fails, 2 when the configuration "
        "cannot be read.",
        epilog=CONFIGURATION,
    )
    check.add_argument(
        "--token", help="also check that this token (one the project issued) verifies"
    )
    check.set_defaults(run=_check_config)
    webhook_cli.add_parser(commands, webhook_cli.main, CONFIGURATION)
    export = commands.add_parser(
        "export",
        help="write the ledger with its allocations to stdout, for accounting",
        description="Write the ledger (one user's, or every user's user by user), each entry "
        "with its allocations and scope, to stdout as CSV (a header row; metadata and "
        "allocations as JSON in their cells) or JSON Lines, streamed batch by batch from the "
        "database `credits serve` uses. --since and --until bound the entries' create times "
        "(ISO 8601; UTC without an offset): [since, until).",
        epilog=CONFIGURATION,
    )
    whose = export.add_mutually_exclusive_group(required=True)
    whose.add_argument("--user", type=uuid.UUID, help="the user's id")
    whose.add_argument("--all", action="store_true", help="every user")
    export.add_argument("--since", type=_time, help="entries created at or after this time")
    export.add_argument("--until", type=_time, help="entries created before this time")
    export.add_argument(
        "--format", choices=ledger_export.FORMATS, default="csv", help="csv (default) or jsonl"
    )
    export.set_defaults(run=_export)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.configure()
    try:
        code: int = args.run(Settings.from_env(), args)
    except (app.ConfigurationError, serving.AddressUnavailable, ValueError, LookupError) as error:
        print(f"credits: {error}", file=sys.stderr)
        return 2
    return code
