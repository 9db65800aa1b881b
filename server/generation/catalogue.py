"""The model catalogue: a TOML file (CREDITS_MODELS, default the one shipped beside this module).

[models.demo-image]
cost = 5
description = "..."
provider = "demo"          # "demo", "http", or a `credits.providers` entry point
timeout_seconds = 30
max_attempts = 3
[models.demo-image.settings]   # handed to the provider
default_delay_ms = 300

Each model's request parameters are what its provider declares for its settings (the demo
provider its own; the http provider what its ``parameters`` setting says); a provider that
declares none accepts any.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

from server.generation.models import ModelSpec
from server.generation.providers import registry

# Package data, found through importlib.resources so that an installed wheel has it too.
DEFAULT_CATALOGUE: Traversable = resources.files("server.generation") / "models.toml"


class CatalogueError(ValueError):
    """The catalogue file is missing, unreadable or wrong; the message says where."""


def load(path: Traversable = DEFAULT_CATALOGUE) -> dict[str, ModelSpec]:
    """The models in the catalogue at `path` (a pathlib.Path or a package resource)."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise CatalogueError(f"{path}: {error}") from error
    entries = document.get("models")
    if not isinstance(entries, dict) or not entries:
        raise CatalogueError(f"{path}: no [models.<id>] tables")
    return {name: _spec(path, name, entry) for name, entry in entries.items()}


def _spec(path: Traversable, name: str, entry: Mapping[str, Any]) -> ModelSpec:
    where = f"{path}: models.{name}"
    unknown = set(entry) - {
        "cost",
        "description",
        "provider",
        "settings",
        "timeout_seconds",
        "max_attempts",
    }
    if unknown:
        raise CatalogueError(f"{where}: unknown keys {sorted(unknown)}")
    cost, timeout, attempts = (
        entry.get("cost"),
        entry.get("timeout_seconds", 60),
        entry.get("max_attempts", 3),
    )
    if not isinstance(cost, int) or cost <= 0:
        raise CatalogueError(f"{where}: cost must be a whole number of credits > 0")
    if not isinstance(timeout, int) or not 1 <= timeout <= 3600:
        raise CatalogueError(f"{where}: timeout_seconds must be 1 to 3600")
    if not isinstance(attempts, int) or not 1 <= attempts <= 10:
        raise CatalogueError(f"{where}: max_attempts must be 1 to 10")
    provider, settings = entry.get("provider"), entry.get("settings", {})
    if not isinstance(provider, str) or not provider:
        raise CatalogueError(f"{where}: provider must name a provider")
    if not isinstance(settings, dict):
        raise CatalogueError(f"{where}: settings must be a table")
    try:
        parameters = registry.declared_parameters(provider, settings)
    except (LookupError, ValueError, TypeError) as error:
        raise CatalogueError(f"{where}: {error}") from None
    return ModelSpec(
        model=name,
        cost=cost,
        description=str(entry.get("description", "")),
        provider=provider,
        settings=settings,
        timeout_seconds=timeout,
        max_attempts=attempts,
        parameters=parameters,
    )
