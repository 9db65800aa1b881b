"""Finds a provider by its catalogue name: the built-ins, then in-process plug-ins.

A catalogue entry names its provider (``demo``, ``http``, or a plug-in's name) and gives it a
settings table; the worker calls `load` once per model when it starts. Plug-ins are installed
packages that declare an entry point in the group ``credits.providers`` whose object is a
`ProviderFactory`::

    [project.entry-points."credits.providers"]
    echoer = "my_package.providers:factory"

Built-in names win: a plug-in that declares ``demo`` or ``http`` is ignored (with a warning),
so installing a package can never silently replace a built-in provider.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from server.generation.parameters import Parameter
from server.generation.providers.base import DeclaresParameters, Provider, ProviderFactory
from server.generation.providers.demo import DemoProvider
from server.generation.providers.http import HttpProvider

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "credits.providers"
BUILTINS: Mapping[str, ProviderFactory] = {"demo": DemoProvider, "http": HttpProvider}


def available() -> list[str]:
    """Every name `load` accepts, sorted: the built-ins and the installed plug-ins."""
    return sorted({*BUILTINS, *_plugins()})


def load(name: str, settings: Mapping[str, Any]) -> Provider:
    """Build the provider called `name` with a model's settings.

    Built-ins (``demo``, ``http``) cannot be shadowed by a plug-in of the same name. Raises
    LookupError, listing the available names, when nothing is called `name`; TypeError when a
    plug-in's entry point is not callable; the factory's own errors (e.g. ValueError for bad
    settings) pass through.
    """
    return _factory(name)(settings)


def declared_parameters(name: str, settings: Mapping[str, Any]) -> tuple[Parameter, ...] | None:
    """The request parameters the provider called `name` takes with a model's settings, or
    None when it declares none (any parameters are then accepted). Raises what `load` raises
    for an unknown name, and ValueError for bad declarations."""
    factory = _factory(name)
    if not isinstance(factory, DeclaresParameters):
        return None
    declared = factory.declare_parameters(settings)
    if declared is None:
        return None
    parameters = tuple(declared)
    if not all(isinstance(p, Parameter) for p in parameters):
        raise ValueError(f"provider {name!r} declared parameters that are not Parameter values")
    names = [p.name for p in parameters]
    if len(set(names)) != len(names):
        raise ValueError(f"provider {name!r} declared a parameter twice")
    return parameters


def _factory(name: str) -> ProviderFactory:
    return BUILTINS.get(name) or _plugin_factory(name)


def _plugin_factory(name: str) -> ProviderFactory:
    entry_point = _plugins().get(name)
    if entry_point is None:
        names = ", ".join(available())
        raise LookupError(f"unknown provider {name!r}; available: {names}")
    factory = entry_point.load()
    if not callable(factory):
        raise TypeError(f"provider plug-in {name!r} ({entry_point.value}) is not callable")
    return factory  # type: ignore[no-any-return]


def _plugins() -> dict[str, EntryPoint]:
    """Installed plug-ins by name, minus any that would shadow a built-in."""
    found: dict[str, EntryPoint] = {}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in BUILTINS:
            log.warning(
                "ignoring provider plug-in %r (%s): the name belongs to a built-in provider",
                entry_point.name,
                entry_point.value,
            )
        elif entry_point.name in found:
            log.warning("provider plug-in %r is declared twice; using the first", entry_point.name)
        else:
            found[entry_point.name] = entry_point
    return found
