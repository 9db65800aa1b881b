"""README.md's "Try it with grpcurl" session, run against a real `credits serve`.

The section's ```sh blocks run in order through bash, at the repository root (so the README's
`.venv/bin/...` paths resolve), against a fresh server on a free port: in embedded mode, and on
the Supabase stand-in. Blocks that are followed by no output block set up variables (the tokens,
a hold id) for the blocks after them; every other block is a command whose stdout (or, when it
fails, the stderr grpcurl writes `-format-error` output to) must equal the output block after it.
Only what legitimately varies is normalised: ids the server made (any UUID the README's commands
do not themselves contain) become <id-1>, <id-2>, ... in order of first appearance across the
whole session, and RFC 3339 timestamps become <time>. Amounts, kinds, reasons, messages, key
order and exit codes are compared exactly. The machinery is shared with docs/grpcurl.md's test,
in tests/fixtures/transcript.py.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Iterator

import pytest

from server.app import SERVICE_NAMES
from tests.fixtures.process import (
    BIN_DIR,
    GRPCURL,
    REPO_ROOT,
    embedded_env,
    fake_supabase,
    free_port,
    scratch_dir,
    serving,
)
from tests.fixtures.transcript import (
    COMMAND_TIMEOUT,
    Normaliser,
    Session,
    SessionRun,
    parse_session,
    run_session,
    section_of,
    session_diff,
)

README = REPO_ROOT / "README.md"
SUPABASE_GUIDE = REPO_ROOT / "docs" / "supabase.md"
SECTION = "## Try it with grpcurl"


def parse_readme(text: str) -> Session:
    """The "Try it with grpcurl" section of `text`."""
    assert f"\n{SECTION}\n" in text, f"README.md has no {SECTION!r} section"
    return parse_session(section_of(text, SECTION))


@pytest.fixture(scope="module")
def session() -> Session:
    """The README's session, checked to be one worth running."""
    parsed = parse_readme(README.read_text(encoding="utf-8"))
    assert parsed.steps, "no ```sh blocks in the section"
    assert parsed.steps[0].is_setup, (
        "the section does not start with a setup block (USER_TOKEN=..., SERVICE_TOKEN=...)"
    )
    assert len(parsed.commands) >= 5, f"only {len(parsed.commands)} commands found in the section"
    return parsed


@pytest.fixture(scope="module", params=["embedded", "supabase"])
def run(request: pytest.FixtureRequest, session: Session) -> Iterator[SessionRun]:
    """A fresh server, and every command of the session run against it in order: on its
    embedded PostgreSQL, or on the Supabase stand-in as docs/supabase.md says."""
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(scratch_dir("credits-e2e-readme-"))
        exports = stack.enter_context(fake_supabase()) if request.param == "supabase" else {}
        proc = stack.enter_context(serving(workdir, extra_env=exports))
        yield run_session(session, proc)


def test_readme_session_matches_a_real_server(run: SessionRun) -> None:
    """Every command's output and exit code are what the README shows (normalised)."""
    diff = session_diff(run, "README.md (normalised)", "real server (normalised)")
    if diff:
        pytest.fail(
            f"README.md's {SECTION!r} session differs from what the server answers:\n{diff}\n\n"
            f"{run.proc.describe()}",
            pytrace=False,
        )


def test_reflection_lists_both_credit_services(run: SessionRun) -> None:
    """The README's `list` block, and reflection itself, name both credits services."""
    listing = [r for r in run.results if r.step.command.rstrip().endswith(" list")]
    assert listing, "the README session has no `grpcurl ... list` command"
    documented = (listing[0].step.expected or "").splitlines()
    served = listing[0].stdout.splitlines()
    assert listing[0].returncode == 0, listing[0].stderr
    for name in SERVICE_NAMES:
        assert name in documented, f"README's list block lacks {name}"
        assert name in served, f"reflection does not list {name}: {served}"


def test_describe_commands_in_the_prose_work(run: SessionRun) -> None:
    """The `describe` symbols the prose suggests resolve through reflection."""
    assert {"credits.v1.CreditService", "credits.v1.DebitCreditsRequest"} <= set(
        run.session.describe
    ), f"describe examples found after the session: {run.session.describe}"
    for symbol in run.session.describe:
        done = subprocess.run(
            [str(GRPCURL), "-plaintext", run.proc.address, "describe", symbol],
            cwd=REPO_ROOT,
            env=run.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        assert done.returncode == 0, f"describe {symbol}: exit {done.returncode}\n{done.stderr}"
        assert done.stdout.startswith(f"{symbol} is a "), done.stdout


def test_normaliser_keeps_typed_ids_and_maps_made_ones_consistently() -> None:
    """Typed UUIDs stay; made ones get stable <id-N> names; timestamps become <time>."""
    kept = "5b0c3a4e-8f7d-4a53-9a55-6c1f3f0f3a11"
    made = ["21c5f2ea-c474-4a6f-b920-00d39eba0970", "ebb3ec3d-1f10-461f-a805-947a737ba0d8"]
    normalise = Normaliser({kept})
    assert normalise(f'"{made[0]}" "{kept}" 2026-11-25T14:41:40.512933Z') == (
        f'"<id-1>" "{kept}" <time>'
    )
    assert normalise(f"{made[1]} {made[0]} {made[1]} 2026-01-02T03:04:05+01:00") == (
        "<id-2> <id-1> <id-2> <time>"
    )


def test_readme_check_config_output_is_what_the_stand_in_gives() -> None:
    """docs/supabase.md's `check-config` output is what the stand-in makes it print."""
    text = SUPABASE_GUIDE.read_text(encoding="utf-8")
    documented = re.search(r"credits check-config\n\s*```\n\s*```\n(.*?)\n\s*```", text, re.DOTALL)
    assert documented, "docs/supabase.md shows no check-config output"
    expected = [line.strip() for line in documented.group(1).splitlines()]
    with fake_supabase() as exports:
        env = embedded_env(REPO_ROOT / ".data-unused", free_port(), exports)
        done = subprocess.run(
            [str(BIN_DIR / "credits"), "check-config"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == expected
