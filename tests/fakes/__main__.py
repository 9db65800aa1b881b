"""`python -m tests.fakes [--port 54321]`: run the FAKE Supabase project on its own, for people.

It starts an embedded PostgreSQL in a temp dir, applies supabase/migrations as `supabase db push`
would, serves the fake in front of it, and prints the variables that point `credits` at it.
It stops (and deletes its data) on Ctrl-C or SIGTERM. For trying the Supabase transport locally;
it is not Supabase.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import signal
import tempfile
from pathlib import Path

from server.db import embedded, migrate
from tests.fakes.supabase import FakeSupabase


async def serve(port: int) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="credits-fake-supabase-"))
    database = await embedded.start(data_dir)
    try:
        await migrate.migrate(database.uri)
        secret = secrets.token_urlsafe(32)
        fake = await FakeSupabase.start(database.uri, jwt_secret=secret, port=port)
        print("# A FAKE Supabase project for trying credits locally. Point credits at it with:")
        print(f"export SUPABASE_URL={fake.url}")
        print(f"export SUPABASE_ANON_KEY={fake.anon_key}")
        print(f"export SUPABASE_SERVICE_ROLE_KEY={fake.service_role_key}")
        print(f"export SUPABASE_JWT_SECRET={secret}", flush=True)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        await fake.stop()
    finally:
        await database.astop()
        shutil.rmtree(data_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fakes", description=__doc__)
    parser.add_argument("--port", type=int, default=54321, help="default 54321, as Supabase's")
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
