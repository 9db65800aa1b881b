"""README.md's "Try it with grpcurl" session, run against a real `credits serve`.

The section's ```sh blocks run in order through bash, at the repository root (so the README's
`.venv/bin/...` paths resolve), against a fresh embedded-mode server on a free port. Blocks that
are followed by no output block set up variables (the tokens, a hold id) for the blocks after
them; every other block is a command
whose stdout (or, when it fails, the stderr grpcurl writes `-format-error` output to) must equal
the output block after it. Only what legitimately varies is normalised: ids the server made
(any UUID the README's commands do not themselves contain) become <id-1>, <id-2>, ... in order of
first appearance across the whole session, and RFC 3339 timestamps become <time>. Amounts,
kinds, reasons, messages, key order and exit codes are compared exactly.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from server.app import SERVICE_NAMES
from tests.fixtures.process import (
    BIN_DIR,
    GRPCURL,
    REPO_ROOT,
    ServeProcess,
    embedded_env,
    fake_supabase,
    free_port,
    scratch_dir,
    serving,
)

README = REPO_ROOT / "README.md"
SECTION = "## Try it with grpcurl"
DOCUMENTED_ADDRESS = "127.0.0.1:50051"
COMMAND_TIMEOUT = 30.0
# grpcurl exits with 64 + the gRPC status code when an RPC fails.
GRPCURL_STATUS_EXIT_BASE = 64

FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
UUID = re.compile(
    r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"
)
TIMESTAMP = re.compile(r"\b\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})")
ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=", re.MULTILINE)
DESCRIBE = re.compile(r"`describe\s+([\w.]+)`")


@dataclass(frozen=True)
class Step:
    """A command block of the README and the output block documented after it (None for a
    setup block, which only sets variables)."""

    command: str
    expected: str | None

    @property
    def is_setup(self) -> bool:
        return self.expected is None

    @property
    def expected_exit(self) -> int:
        """0, or 64 + code when the documented output is a `-format-error` status."""
        try:
            doc = json.loads(self.expected or "")
        except ValueError:
            return 0
        if isinstance(doc, dict) and isinstance(doc.get("code"), int) and "message" in doc:
            code: int = doc["code"]
            return GRPCURL_STATUS_EXIT_BASE + code
        return 0


@dataclass(frozen=True)
class Session:
    """The section's blocks in order, and the prose's describe symbols."""

    steps: list[Step]
    describe: list[str]

    @property
    def commands(self) -> list[Step]:
        return [step for step in self.steps if not step.is_setup]

    @property
    def typed_uuids(self) -> set[str]:
        """UUIDs the reader types (in the commands): kept as they are when comparing."""
        return {m.group(0).lower() for step in self.steps for m in UUID.finditer(step.command)}


def parse_readme(text: str) -> Session:
    """The "Try it with grpcurl" section of `text`."""
    start = text.find(f"\n{SECTION}\n")
    assert start >= 0, f"README.md has no {SECTION!r} section"
    end = text.find("\n## ", start + len(SECTION) + 1)
    section = text[start : end if end >= 0 else len(text)]

    blocks = list(FENCE.finditer(section))
    steps: list[Step] = []
    for i, block in enumerate(blocks):
        if block.group(1) != "sh":
            continue
        after = blocks[i + 1] if i + 1 < len(blocks) else None
        documented = (
            after is not None
            and after.group(1) != "sh"
            and not section[block.end() : after.start()].strip()
        )
        if documented:
            assert after is not None
            steps.append(Step(block.group(2).strip(), after.group(2).rstrip("\n")))
        else:
            assert ASSIGNMENT.search(block.group(2)), (
                f"a ```sh block with no output block after it that sets nothing:\n{block.group(2)}"
            )
            steps.append(Step(block.group(2).strip(), None))
    describe = DESCRIBE.findall(section[blocks[-1].end() :] if blocks else "")
    return Session(steps, describe)


class Normaliser:
    """Replaces server-made ids by <id-N> (first appearance order) and timestamps by <time>."""

    def __init__(self, kept: set[str]) -> None:
        self._kept = kept
        self._ids: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        def placeholder(match: re.Match[str]) -> str:
            value = match.group(0).lower()
            if value in self._kept:
                return match.group(0)
            return self._ids.setdefault(value, f"<id-{len(self._ids) + 1}>")

        return TIMESTAMP.sub("<time>", UUID.sub(placeholder, text))


@dataclass
class Result:
    step: Step
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """What the reader sees as the command's output: stdout, or stderr when it failed."""
        main, other, other_name = (
            (self.stdout, self.stderr, "stderr")
            if self.returncode == 0
            else (self.stderr, self.stdout, "stdout")
        )
        text = main.rstrip("\n")
        if other.strip():
            text += f"\n[also on {other_name}]\n{other.rstrip()}"
        return _without_unshown_queued_state(self.step, text)


QUEUED_LINE = '    "state": "GENERATION_STATE_QUEUED",\n'


def _without_unshown_queued_state(step: Step, text: str) -> str:
    """A watch started before a worker took the job shows QUEUED first, as the README says it
    may; when the README's block does not show it, that first line is the only one let go."""
    shown = QUEUED_LINE.strip() in (step.expected or "")
    if "WatchGeneration" in step.command and not shown:
        return text.removeprefix(QUEUED_LINE)
    return text


@dataclass
class Run:
    session: Session
    proc: ServeProcess
    env: dict[str, str]
    results: list[Result] = field(default_factory=list)


def _local(script: str, address: str) -> str:
    """The README's script aimed at the test's server (and at this venv if .venv is missing)."""
    assert DOCUMENTED_ADDRESS in script or "credits token" in script, (
        f"the command does not use {DOCUMENTED_ADDRESS}, the test cannot aim it:\n{script}"
    )
    script = script.replace(DOCUMENTED_ADDRESS, address)
    if not (REPO_ROOT / ".venv" / "bin").is_dir():
        script = script.replace(".venv/bin/", f"{BIN_DIR}/")
    return script


def _bash(script: str, env: dict[str, str], *, strict: bool) -> subprocess.CompletedProcess[str]:
    options = "set -euo pipefail" if strict else "set -uo pipefail"
    return subprocess.run(
        ["bash", "-c", f"{options}\n{script}"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def _run_setup(block: str, env: dict[str, str], address: str) -> dict[str, str]:
    """Run a setup block; return the variables it assigned."""
    names = ASSIGNMENT.findall(block)
    dump = "\n".join(f"printf '%s=%s\\n' {name} \"${name}\"" for name in names)
    result = _bash(f"{_local(block, address)}\n{dump}", env, strict=True)
    assert result.returncode == 0, (
        f"setup block failed ({result.returncode}):\n{block}\nstderr:\n{result.stderr}"
    )
    values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    for name in names:
        assert values.get(name), f"{name} is empty after:\n{block}\nstderr:\n{result.stderr}"
    return {name: values[name] for name in names}


@pytest.fixture(scope="module")
def session() -> Session:
    parsed = parse_readme(README.read_text(encoding="utf-8"))
    assert parsed.steps, "no ```sh blocks in the section"
    assert parsed.steps[0].is_setup, (
        "the section does not start with a setup block (USER_TOKEN=..., SERVICE_TOKEN=...)"
    )
    assert len(parsed.commands) >= 5, f"only {len(parsed.commands)} commands found in the section"
    return parsed


@pytest.fixture(scope="module", params=["embedded", "supabase"])
def run(request: pytest.FixtureRequest, session: Session) -> Iterator[Run]:
    """A fresh server, and every command of the session run against it in order: on its
    embedded PostgreSQL, or on the Supabase stand-in as the README's Supabase section says."""
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(scratch_dir("credits-e2e-readme-"))
        exports = stack.enter_context(fake_supabase()) if request.param == "supabase" else {}
        proc = stack.enter_context(serving(workdir, extra_env=exports))
        env = dict(proc.env)
        results = []
        for step in session.steps:
            if step.is_setup:
                env.update(_run_setup(step.command, env, proc.address))
                continue
            done = _bash(_local(step.command, proc.address), env, strict=False)
            results.append(Result(step, done.returncode, done.stdout, done.stderr))
        yield Run(session, proc, env, results)


def _transcript(blocks: list[tuple[str, int, str]], kept: set[str]) -> str:
    normalise = Normaliser(kept)
    return "".join(
        f"$ {command}\n(exit {code})\n{normalise(output)}\n\n" for command, code, output in blocks
    )


def test_readme_session_matches_a_real_server(run: Run) -> None:
    kept = run.session.typed_uuids
    expected = _transcript(
        [(s.command, s.expected_exit, s.expected or "") for s in run.session.commands], kept
    )
    actual = _transcript([(r.step.command, r.returncode, r.output) for r in run.results], kept)
    if expected != actual:
        diff = "\n".join(
            difflib.unified_diff(
                expected.splitlines(),
                actual.splitlines(),
                "README.md (normalised)",
                "real server (normalised)",
                lineterm="",
            )
        )
        pytest.fail(
            f"README.md's {SECTION!r} session differs from what the server answers:\n{diff}\n\n"
            f"{run.proc.describe()}",
            pytrace=False,
        )


def test_reflection_lists_both_credit_services(run: Run) -> None:
    listing = [r for r in run.results if r.step.command.rstrip().endswith(" list")]
    assert listing, "the README session has no `grpcurl ... list` command"
    documented = (listing[0].step.expected or "").splitlines()
    served = listing[0].stdout.splitlines()
    assert listing[0].returncode == 0, listing[0].stderr
    for name in SERVICE_NAMES:
        assert name in documented, f"README's list block lacks {name}"
        assert name in served, f"reflection does not list {name}: {served}"


def test_describe_commands_in_the_prose_work(run: Run) -> None:
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
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Running on a Supabase project") :]
    documented = re.search(
        r"credits check-config\n\s*```\n\s*```\n(.*?)\n\s*```", section, re.DOTALL
    )
    assert documented, "the Supabase section shows no check-config output"
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
