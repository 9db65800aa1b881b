"""The client installs into a clean virtualenv (from PyPI, without the server) and code using it
passes mypy --strict there: examples/service_flow.py, and a snippet of our own."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "service_flow.py"

SNIPPET = textwrap.dedent(
    """
    import asyncio

    from credits_client import (
        AsyncCreditsClient,
        CreditsClient,
        CreditsError,
        InsufficientCredits,
        ServiceKey,
        TLS,
    )
    from credits_client.types import DebitCreditsResponse


    def charge(client: CreditsClient, user_id: str) -> int | None:
        try:
            reply: DebitCreditsResponse = client.debit_credits(user_id=user_id, amount=5)
        except InsufficientCredits as error:
            missing: int | None = error.required
            return missing
        except CreditsError as error:
            print(error.code, error.reason, error.field_violations, error.retry_delay)
            raise
        return reply.balance


    async def fresh_token() -> str:
        return "token"


    async def main() -> None:
        async with AsyncCreditsClient("localhost:443", credentials=fresh_token, tls=TLS()) as c:
            async for update in c.watch_generation(generation_id="g"):
                print(update.generation.state)


    with CreditsClient(credentials=ServiceKey("key"), timeout=5) as client:
        charge(client, "u")
    asyncio.run(main())
    """
)


@pytest.mark.timeout(600)
def test_the_client_installs_alone_and_type_checks(tmp_path: Path) -> None:
    # Build from a copy so that pip leaves no build/ or egg-info behind in the repository.
    source = tmp_path / "credits-client"
    shutil.copytree(
        ROOT / "clients" / "python",
        source,
        ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build"),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / "bin"
    pip = [
        str(bin_dir / "python"),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]
    subprocess.run([*pip, str(source), "mypy"], check=True, timeout=480)

    installed = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "list", "--format=freeze"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    names = {line.split("==")[0].lower() for line in installed.splitlines()}
    assert "credits-client" in names
    assert "credits" not in names  # the server is not a dependency
    subprocess.run(
        [str(bin_dir / "python"), "-c", "import credits_client, credits_client.aio"],
        check=True,
        cwd=tmp_path,
    )

    snippet = tmp_path / "snippet.py"
    snippet.write_text(SNIPPET)
    files = [str(snippet), str(EXAMPLE)]
    result = subprocess.run(
        [str(bin_dir / "mypy"), "--strict", "--no-incremental", *files],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
