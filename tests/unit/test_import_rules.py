"""The layers of docs/architecture.md, enforced by reading every server module's imports.

The domain (server/domain, server/credit, server/generation) speaks to storage only through
its own ports: it imports no adapter, no edge, no composition root, and none of the libraries
of a transport or a protocol. Adapters never reach up into the edges; edges never reach past
the domain into storage; and only the composition root wires transports.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[2] / "server"

DOMAIN = ("server.domain", "server.credit", "server.generation", "server.events")
ROOT = (
    "server.app",
    "server.cli",
    "server.webhook_cli",
    "server.processes",
    "server.checks",
    "server.__main__",
)
EDGES = (
    "server.api",
    "server.edges",
    "server.interceptors",
    "server.serving",
    "server.health",
    "server.reflection",
)
ADAPTERS = ("server.repository", "server.transports", "server.db")
TRANSPORT_LIBRARIES = (
    *("grpc", "grpc_health", "google", "credits", "asyncpg"),
    *("supabase", "postgrest", "gotrue", "supabase_auth"),
)

# (the modules a rule is about, the imports they may not have, why)
RULES = [
    (DOMAIN, (*ADAPTERS, *EDGES, *ROOT, "server.config"), "the domain knows no adapter or edge"),
    (
        DOMAIN,
        TRANSPORT_LIBRARIES,
        "the domain knows no transport",
    ),
    (ADAPTERS, (*EDGES, *ROOT), "adapters never reach up into an edge or the root"),
    (EDGES, ADAPTERS, "edges reach storage only through the domain"),
    (("server.repository",), ("server.transports",), "the repository is handed its transport"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> Iterator[str]:
    """Every module `path` imports (for `from a import b`, both a and a.b), at any depth of the
    file: under TYPE_CHECKING too."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


MODULES = {module_name(path): sorted(set(imports_of(path))) for path in SERVER.rglob("*.py")}


@pytest.mark.parametrize(("subjects", "forbidden", "why"), RULES, ids=[r[2] for r in RULES])
def test_layer_rule(subjects: tuple[str, ...], forbidden: tuple[str, ...], why: str) -> None:
    broken = [
        f"{module} imports {imported}"
        for module, imported_names in MODULES.items()
        if within(module, subjects)
        for imported in imported_names
        if within(imported, forbidden)
    ]
    assert not broken, f"{why}:\n" + "\n".join(broken)


def test_only_the_root_wires_transports() -> None:
    """Transports are built in one place (server/app.py) and handed to the rest."""
    wiring = [
        f"{module} imports {imported}"
        for module, imported_names in MODULES.items()
        if not within(module, (*ROOT, "server.transports"))
        for imported in imported_names
        if within(imported, ("server.transports",))
    ]
    assert not wiring, "\n".join(wiring)


def test_the_rules_see_the_modules_they_are_about() -> None:
    """The walk finds the packages the rules name, so a rule cannot pass by matching nothing."""
    for prefix in (*DOMAIN, *ADAPTERS, *EDGES, "server.app"):
        assert any(within(module, (prefix,)) for module in MODULES), prefix
    assert "server.repository.transport" in MODULES["server.repository.layered"]
    assert within("server.repository.functions", ADAPTERS)
    assert not within("server.repositoryx", ADAPTERS)
