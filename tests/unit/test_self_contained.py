"""The repository stands on its own: nothing in it reads or links a path outside it.

Every file git tracks (binary ones skipped) is searched for the parent-directory path to the
team's `shared` directory, which nobody outside the team has, and for Python that builds that
path with pathlib (`Path(__file__).resolve().parents[N] / "shared"` reaching above the root).
Every relative link of a tracked markdown file must name a file or directory that exists inside
the repository. Only the working tree is read; no server, no network.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Built from pieces, so that this file does not contain what it looks for.
SHARED = "shared"
PARENT_SHARED = (".." + "/" + SHARED, ".." + "\\" + SHARED)
# `Path(__file__)[.resolve()]` followed by `.parent` hops or `.parents[N]`, then `/ "shared"`.
PATHLIB_SHARED = re.compile(
    r"Path\(\s*__file__\s*\)(?:\.resolve\(\))?"
    r"(?P<hops>(?:\.parent)+|\.parents\[(?P<index>\d+)\])"
    r"\s*/\s*[\"']" + SHARED + r"[\"']"
)

# Fenced code blocks and inline code spans hold no links.
FENCED = re.compile(r"^(?P<fence>`{3,}|~{3,}).*?^(?P=fence)[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
# `](target)` or `](<target> "title")`, and reference definitions `[label]: target`.
INLINE_LINK = re.compile(r"\]\(\s*(?:<(?P<angled>[^>]*)>|(?P<bare>[^)\s]*))")
REFERENCE = re.compile(r"^[ ]{0,3}\[[^\]]+\]:\s*(?:<(?P<angled>[^>]*)>|(?P<bare>\S+))", re.M)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@dataclass(frozen=True)
class TrackedText:
    path: str  # relative to the repository root, POSIX separators
    text: str


@cache
def tracked_texts() -> tuple[TrackedText, ...]:
    """Every tracked file that is a readable text file in the working tree."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    texts = []
    for name in filter(None, listed.split("\0")):
        path = REPO_ROOT / name
        if not path.is_file():  # deleted in the working tree, or a link to a directory
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        try:
            texts.append(TrackedText(name, data.decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return tuple(texts)


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def shared_mentions(file: TrackedText) -> list[str]:
    """Where `file` names the shared directory beside the repository."""
    found = []
    for needle in PARENT_SHARED:
        start = file.text.find(needle)
        while start >= 0:
            found.append(f"{file.path}:{line_of(file.text, start)}: {needle}")
            start = file.text.find(needle, start + 1)
    if file.path.endswith(".py"):
        # For a/b/c.py, parents[0] is a/b and parents[2] the root: parents[N] with N >= the
        # number of parts is outside. N `.parent` hops are parents[N - 1].
        depth = len(PurePosixPath(file.path).parts)
        for match in PATHLIB_SHARED.finditer(file.text):
            index = match.group("index")
            up = int(index) if index is not None else match.group("hops").count(".parent") - 1
            if up >= depth:
                found.append(f"{file.path}:{line_of(file.text, match.start())}: {match.group(0)}")
    return found


def markdown_links(text: str) -> list[tuple[int, str]]:
    """(offset, target) of every link in markdown `text`, code left out."""

    def blank(match: re.Match[str]) -> str:
        return re.sub(r"[^\n]", " ", match.group(0))  # offsets and lines stay where they were

    prose = INLINE_CODE.sub(blank, FENCED.sub(blank, text))
    links = []
    for pattern in (INLINE_LINK, REFERENCE):
        for match in pattern.finditer(prose):
            target = (
                match.group("angled") if match.group("angled") is not None else match.group("bare")
            )
            links.append((match.start(), target))
    return sorted(links)


def link_problem(source: str, target: str) -> str | None:
    """Why `target`, linked from the tracked file `source`, is not a path in the repository."""
    if not target or target.startswith("#") or SCHEME.match(target) or target.startswith("//"):
        return None  # an anchor on the same page, or a URL
    path = target.split("#", 1)[0].split("?", 1)[0]
    if not path:
        return None
    if path.startswith("/"):  # GitHub reads these from the repository root
        joined = path.lstrip("/")
    else:
        joined = os.path.join(os.path.dirname(source), path)
    normal = os.path.normpath(joined)
    if normal == ".." or normal.startswith("../") or os.path.isabs(normal):
        return "points outside the repository"
    if not (REPO_ROOT / normal).exists():
        return f"{normal} does not exist"
    return None


def test_no_tracked_file_names_the_shared_directory_beside_the_repository() -> None:
    found = [hit for file in tracked_texts() for hit in shared_mentions(file)]
    assert not found, (
        "these tracked files reach the shared directory outside the repository; the contract is "
        "docs/api-contract.md:\n" + "\n".join(found)
    )


def test_markdown_links_stay_inside_the_repository_and_resolve() -> None:
    broken = []
    for file in tracked_texts():
        if not file.path.endswith(".md"):
            continue
        for offset, target in markdown_links(file.text):
            problem = link_problem(file.path, target)
            if problem is not None:
                broken.append(f"{file.path}:{line_of(file.text, offset)}: ({target}) {problem}")
    assert not broken, "markdown links that leave the repository or lead nowhere:\n" + "\n".join(
        broken
    )


@pytest.mark.parametrize(
    ("source", "target", "ok"),
    [
        ("README.md", "docs/grpcurl.md", True),
        ("docs/grpcurl.md", "api-contract.md#errors", True),
        ("docs/supabase.md", "../README.md#try-it-with-grpcurl", True),
        ("README.md", "https://supabase.com", True),
        ("README.md", "#two-commands", True),
        ("README.md", "/docs/grpcurl.md", True),
        ("README.md", ".." + "/" + SHARED + "/api-contract.md", False),
        ("docs/grpcurl.md", "../../" + SHARED + "/api-contract.md", False),
        ("docs/grpcurl.md", "no-such-file.md", False),
        ("README.md", "/nowhere/api-contract.md", False),
    ],
)
def test_link_rules(source: str, target: str, ok: bool) -> None:
    assert (link_problem(source, target) is None) is ok


def test_the_searches_find_what_they_look_for() -> None:
    """The needles match the forms that once were here, and links in code are not links."""
    built = 'CONTRACT = Path(__file__).resolve().parents[3] / "' + SHARED + '" / "api-contract.md"'
    inside = 'CONTRACT = Path(__file__).resolve().parents[2] / "' + SHARED + '" / "x.md"'
    assert shared_mentions(TrackedText("tests/unit/test_x.py", built))
    assert not shared_mentions(TrackedText("tests/unit/test_x.py", inside))
    assert shared_mentions(TrackedText("README.md", "see [it](" + PARENT_SHARED[0] + "/a.md)"))
    text = "[a](docs/a.md) `[b](c.md)`\n```\n[d](e.md)\n```\n[f]: <g h.md>\n"
    assert [target for _, target in markdown_links(text)] == ["docs/a.md", "g h.md"]


def test_the_readme_reads_in_five_minutes() -> None:
    """The README stays a short start (at most 250 lines); the rest lives in docs/."""
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"
