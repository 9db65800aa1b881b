"""The `credits` command: `serve` runs the service, `worker` runs generation workers, `token`
prints a signed token for trying it, `check-config` checks a deployment's configuration."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import sys
import uuid
from datetime import timedelta

from server import app, checks, processes, runtime
from server.auth.tokens import DEFAULT_ISSUER, mint_service_token, mint_user_token
from server.config import Settings
from server.observability import logs


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    if settings.processes > 1:
        return processes.supervise(settings)
    runtime.run(app.serve(settings))
    return 0


def _token(settings: Settings, args: argparse.Namespace) -> int:
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
    root = argparse.ArgumentParser(prog="credits", description=__doc__)
    root.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = root.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC service")
    serve.set_defaults(run=_serve)
    token = commands.add_parser(
        "token", help="print a token signed with the service's JWT secret (for local use)"
    )
    who = token.add_mutually_exclusive_group()
    who.add_argument("--user", type=uuid.UUID, help="the user's id (default: a new one)")
    who.add_argument("--service", action="store_true", help="a service_role token")
    token.add_argument("--email", default=None, help="the user's email claim")
    token.add_argument(
        "--ttl-minutes", type=_positive, default=60, help="lifetime in minutes (default 60)"
    )
    token.set_defaults(run=_token)
    worker = commands.add_parser(
        "worker", help="run generation workers only (scale them apart from the API)"
    )
    worker.add_argument("--count", type=int, default=0, help="workers (default CREDITS_WORKERS)")
    worker.set_defaults(run=_worker)
    check = commands.add_parser(
        "check-config", help="check the configuration a deployment will use; exit 1 on a failure"
    )
    check.add_argument(
        "--token", help="also check that this token (one the project issued) verifies"
    )
    check.set_defaults(run=_check_config)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.configure()
    try:
        code: int = args.run(Settings.from_env(), args)
    except (app.ConfigurationError, ValueError, LookupError) as error:
        print(f"credits: {error}", file=sys.stderr)
        return 2
    return code
