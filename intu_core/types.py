"""Typed registrations a plugin returns from its hooks, and the protocols its objects follow.

A plugin never hands the engine untyped dicts: it registers a ``DestinationType`` or a
``SourceType`` with a name, a settings parser and a factory. The engine parses each configured
block with the parser (which reports problems through the ``Section`` it is given), then calls the
factory with the parsed settings and a ``Runtime``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from intu_core.config.keys import CORE_TOP_LEVEL_KEYS
from intu_core.message import Acceptance, Message, SendResult
from intu_core.metrics import MetricsRegistry

if TYPE_CHECKING:
    from intu_core.config.section import Section

_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_SETTINGS_KEY = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Runtime:
    """What a destination or source is given when it is created.

    ``metrics`` is the engine's ``MetricsRegistry``: count there what only the plugin knows
    (bytes, associations), labelled by ``name``, e.g.
    ``runtime.metrics.counter("intu_bytes_sent_total", "...", ["destination"]).labels(runtime.name)``
    once at creation, then ``.inc(n)`` per message (see ``docs/plugins.md`` for the engine's
    families). Outside an engine (tests) it is a registry of its own.
    """

    name: str  # the destination's name, or the channel's name for a source
    data_dir: Path  # the engine's data directory; a plugin keeps its files under it
    logger: logging.Logger
    hook: Any = None  # the plugin manager's hook relay, to call other plugins' hooks
    metrics: MetricsRegistry = field(default_factory=MetricsRegistry)

    @property
    def spool_dir(self) -> Path:
        """Where a source keeps the files its messages refer to (``Message.files``).

        At start the engine moves files here that no queue entry refers to (left by a crash
        between writing a file and queueing its message) into the data folder's quarantine, so
        keep nothing else in it; ``intu_message_from_file`` rebuilds a message from such a file."""
        return self.data_dir / "spool" / self.name


@runtime_checkable
class Destination(Protocol):
    """A configured destination. ``send`` is the hook every destination implements.

    ``send`` may be called from several threads at once (one per queue worker); it returns a
    ``SendResult`` and never raises for an expected failure (a refused connection, a rejected
    message). ``close`` releases connections; it is called once, at shutdown.

    A destination may also have ``probe() -> SendResult`` (optional, not part of this protocol's
    check): whether its peer can be reached, without sending a message (the DICOM destination
    sends a C-ECHO). Once ``send`` returns ``SendResult.unreachable(...)`` the destination is
    down, and one worker probes until ``probe`` succeeds (``.success()``: delivery resumes at
    once) instead of every entry backing off; ``.retryable`` means still unreachable, and
    ``.permanent`` that the probe cannot tell (the next entry's send probes instead, as for a
    destination without ``probe``). See ``intu_core.reachability``.
    """

    def send(self, message: Message) -> SendResult: ...

    def close(self) -> None: ...


DeliverCallback = Callable[[Message], Acceptance]


@runtime_checkable
class Source(Protocol):
    """A configured source. ``start`` begins listening and hands each message to ``deliver``.

    ``deliver`` returns only once the engine has accepted the message durably (or decided it
    cannot): its ``Acceptance`` is what the source tells its sender. ``stop`` stops accepting new
    work, lets in-flight work finish, and returns.

    A source that listens on a port may also have ``listening() -> bool`` (optional): whether its
    listener is still bound and accepting, for ``EngineView.ready()`` (``/readyz``).
    """

    def start(self, deliver: DeliverCallback) -> None: ...

    def stop(self) -> None: ...


def _check_name(kind: str, name: str) -> None:
    if not _TYPE_NAME.match(name):
        raise ValueError(
            f"{kind} type name {name!r} must be lowercase letters, digits, '-' or '_', starting with a letter"
        )


@dataclass(frozen=True)
class DestinationType:
    """A destination type a plugin provides, e.g. ``type: dicom`` under ``destinations:``.

    ``parse_settings(section)`` reads the block under the type's name (``dicom:`` for
    ``type: dicom``) and returns a settings object (a frozen dataclass, by convention); it
    reports problems through ``section`` instead of raising. ``create(settings, runtime)``
    returns a ``Destination``.
    """

    name: str
    parse_settings: Callable[[Section], Any]
    create: Callable[[Any, Runtime], Destination]
    description: str = ""

    def __post_init__(self) -> None:
        _check_name("destination", self.name)


@dataclass(frozen=True)
class SourceType:
    """A source type a plugin provides, e.g. ``source: {type: dicom, dicom: {...}}``."""

    name: str
    parse_settings: Callable[[Section], Any]
    create: Callable[[Any, Runtime], Source]
    description: str = ""

    def __post_init__(self) -> None:
        _check_name("source", self.name)


@dataclass(frozen=True)
class SettingsBlock:
    """A top-level block of ``intu.yaml`` that a plugin provides, e.g. ``metrics: {port: 9464}``.

    ``parse_settings(section)`` reads the block (only when the project has it) and returns a
    settings object, reporting problems through ``section``; the result is
    ``Project.plugin_settings[key]`` and ``EngineView.settings(key)``. ``key`` is lowercase
    (``[a-z][a-z0-9_]*``) and cannot be one of the core's own keys (``CORE_TOP_LEVEL_KEYS``).
    """

    key: str
    parse_settings: Callable[[Section], Any]
    description: str = ""

    def __post_init__(self) -> None:
        if not _SETTINGS_KEY.match(self.key):
            raise ValueError(
                f"settings block key {self.key!r} must be lowercase letters, digits or '_', starting"
                " with a letter"
            )
        if self.key in CORE_TOP_LEVEL_KEYS:
            raise ValueError(f"settings block key {self.key!r} is one of intu.yaml's own keys")

    @property
    def name(self) -> str:
        """The key, under the name every registration has (for the registry's messages)."""
        return self.key
