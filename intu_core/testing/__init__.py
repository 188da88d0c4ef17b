"""Helpers for testing plugins and channels without installing anything.

    from intu_core.testing import registry_with, parse_settings, running_engine, manual_source

    registry = registry_with(my_plugin)                   # my_plugin: a module with @hookimpl functions
    settings = parse_settings(registry, "destination", "jsonl", {"path": "out.jsonl"})
    with running_engine(project_dir, registry_with(my_plugin, manual_source)) as engine:
        acceptance = engine_deliver(engine, "my-channel", Message(body={...}))

``manual_source`` provides ``type: manual``: a source that does nothing until a test hands it a
message, so a channel can be driven from a test exactly as a real source drives it.

A queue backend runs the contract suite ``intu_core.testing.queue_contract.QueueContract`` (a
pytest test class; this package itself does not import pytest). ``intu_core.testing.docs``
checks that the docs name every settings key and command (intu's own docs tests use it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from intu_core.config.problems import ConfigError, Problems
from intu_core.config.section import Section
from intu_core.hookspecs import hookimpl
from intu_core.message import Acceptance, Message
from intu_core.plugins import PluginRegistry, load_plugins
from intu_core.types import DeliverCallback, Runtime, SourceType


def registry_with(*plugins: object, entry_points: bool = False) -> PluginRegistry:
    """A plugin registry holding the built-in types and ``plugins`` (modules or objects)."""
    return load_plugins(entry_points=entry_points, extra=plugins)


def parse_settings(registry: PluginRegistry, kind: str, type_name: str, data: Mapping[str, Any]) -> Any:
    """Parse a settings block as the engine would; raise ConfigError listing every problem."""
    registered, why = registry.lookup(kind, type_name)
    if registered is None:
        raise LookupError(why)
    problems = Problems()
    settings = registered.parse_settings(
        Section(dict(data), file=Path("<test>"), path=f"{type_name}", problems=problems)
    )
    if problems:
        raise ConfigError(problems)
    return settings


class ManualSource:
    """A source that hands over whatever a test gives it (see ``engine_deliver``)."""

    def __init__(self, settings: Any, runtime: Runtime) -> None:
        self.runtime = runtime
        self.deliver: DeliverCallback | None = None
        self.stopped = False

    def start(self, deliver: DeliverCallback) -> None:
        self.deliver = deliver

    def stop(self) -> None:
        self.stopped = True

    def push(self, message: Message) -> Acceptance:
        if self.deliver is None or self.stopped:
            raise RuntimeError("the source is not running")
        return self.deliver(message)


def _parse_manual(section: Section) -> None:
    section.done()


@hookimpl
def intu_source_types() -> list[SourceType]:
    return [SourceType("manual", _parse_manual, ManualSource, "A source driven by tests.")]


# ``registry_with(manual_source)`` registers the hook above as a plugin of its own.
manual_source = SimpleNamespace(
    intu_source_types=intu_source_types, __name__="intu_core.testing.manual_source"
)


@contextlib.contextmanager
def running_engine(project_dir: Path, registry: PluginRegistry) -> Iterator[Any]:
    """Load the project at ``project_dir``, start its channels, and stop them afterwards."""
    from intu_core.config.project import load_project
    from intu_core.engine import Engine

    engine = Engine(load_project(Path(project_dir), registry), registry)
    engine.build()
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


def engine_deliver(engine: Any, channel: str, message: Message) -> Acceptance:
    """Hand ``message`` to the ``manual`` source of ``channel``, as a real source would."""
    source = engine.channel(channel).source
    if not isinstance(source, ManualSource):
        raise TypeError(f"channel {channel!r} does not use a manual source")
    return source.push(message)
