"""The plugin contract of intu. Every hook here is public, documented and typed.

A plugin is a module (or object) with functions decorated by ``intu_core.hookimpl``, registered
under the entry-point group ``intu`` of its distribution::

    # pyproject.toml of a plugin
    [project.entry-points.intu]
    my_plugin = "my_plugin"

All hooks are optional. Hook names start with ``intu_``, so a misspelled one is caught when the
plugin is loaded (``check_pending``) instead of being silently ignored.

The engine calls these hooks:

* ``intu_destination_types`` and ``intu_source_types`` when it loads plugins, to learn which
  ``type:`` names exist. Each registration carries a settings parser and a factory
  (see ``intu_core.types``). The object the factory returns implements the ``send`` hook of a
  destination (``Destination.send(message) -> SendResult``) or the ``start``/``stop`` hooks of a
  source (``Source.start(deliver)``: the source calls ``deliver(message)`` and answers its sender
  from the ``Acceptance`` it returns).
* ``intu_queue_backends`` when it loads plugins, to learn which ``queue: {backend: NAME}``
  exist (see ``intu_core.queue``).
* ``intu_settings_blocks`` when it loads plugins, to learn which top-level blocks of
  ``intu.yaml`` plugins read (``metrics:``, say); each is parsed with the plugin's parser.
* ``intu_write_message_file`` when the built-in ``file`` destination writes a message, so a
  plugin that knows a body format (the DICOM plugin: Part-10 files) can write it natively.
* ``intu_cli_commands`` when the ``intu`` command line starts, to add sub-commands.
* ``intu_message_from_file`` when ``intu queue recover`` re-enqueues a quarantined file, so the
  plugin whose source wrote it rebuilds its message.
* ``intu_engine_started`` and ``intu_engine_stopping`` around ``intu serve``, with a read-only
  ``EngineView`` (channels and their state, destinations, queue statistics, metrics, settings).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    import click

    from intu_core.message import Message
    from intu_core.queue import QueueBackend
    from intu_core.types import DestinationType, SettingsBlock, SourceType
    from intu_core.view import EngineView

PROJECT = "intu"
ENTRY_POINT_GROUP = "intu"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def intu_destination_types() -> Sequence[DestinationType]:
    """Return the destination types this plugin provides.

    Example::

        @hookimpl
        def intu_destination_types():
            return [DestinationType(name="webhook", parse_settings=parse, create=WebhookDestination)]

    A name may be provided by one plugin only: a second one is reported as an error naming both
    distributions, and neither is used. Since 0.1.

    The destination's ``send`` returns ``SendResult.unreachable(detail)`` when its peer cannot be
    reached at all; the destination is then down and, if it has the optional ``probe()``, that is
    what its workers call until the peer answers (see ``intu_core.types.Destination``). ``probe``
    since 0.1 (issue 13).
    """


@hookspec
def intu_source_types() -> Sequence[SourceType]:
    """Return the source types this plugin provides (same rules as destination types).

    Example::

        @hookimpl
        def intu_source_types():
            return [SourceType(name="dicom", parse_settings=parse, create=DicomSource)]

    Since 0.1.
    """


@hookspec
def intu_queue_backends() -> Sequence[QueueBackend]:
    """Return the queue backends this plugin provides (same naming rules as the types).

    Example::

        @hookimpl
        def intu_queue_backends():
            return [QueueBackend(name="postgres", parse_settings=parse, open=open_postgres_queue)]

    ``intu.yaml`` chooses one with ``queue: {backend: postgres, ...}``; the rest of that block is
    given to ``parse_settings``. ``open(settings, runtime)`` returns a ``QueueStore`` (see
    ``intu_core.queue``) that passes ``intu_core.testing.queue_contract.QueueContract``. Since 0.2.
    """


@hookspec
def intu_settings_blocks() -> Sequence[SettingsBlock]:
    """Return the top-level blocks of ``intu.yaml`` this plugin reads.

    Example::

        @hookimpl
        def intu_settings_blocks():
            return [SettingsBlock(key="metrics", parse_settings=parse_metrics_settings)]

    A project with ``metrics: {port: 9464}`` then has the block parsed by ``parse_metrics_settings``
    (problems reported with file, line and key path, like every other setting); the plugin reads
    the result with ``engine.settings("metrics")`` in ``intu_engine_started``. A key may be
    provided by one plugin only, and not be one of the core's own keys. Since 0.2.
    """


@hookspec
def intu_cli_commands() -> Sequence[click.Command]:
    """Return ``click`` commands or groups to add to the ``intu`` command line.

    Example: the DICOM plugin returns a ``dicom`` group, giving ``intu dicom echo`` and
    ``intu dicom send``. A command whose name is already taken is skipped with a warning. Commands
    find the project's configuration with ``intu_core.cli.load_project_from_context``. Since 0.1.
    """


@hookspec(firstresult=True)
def intu_write_message_file(message: Message, directory: Path) -> Path | None:
    """Write ``message`` as a file in ``directory`` if this plugin knows its body format.

    Return the path written, or ``None`` to let another plugin (or the ``file`` destination's
    own JSON/bytes writer) handle it. The first non-``None`` answer wins. Example: the DICOM
    plugin writes a DICOM body as ``<SOPInstanceUID>.dcm``. The write should be durable
    (fsync) before returning. Since 0.1.
    """


@hookspec(firstresult=True)
def intu_message_from_file(source_type: str, path: Path, channel: str) -> Message | None:
    """Rebuild the message a source of type ``source_type`` made from the file at ``path``.

    ``intu queue recover`` calls it for each quarantined file (received by channel ``channel``,
    moved back into its spool folder): answer a ``Message`` for ``channel`` whose ``files`` hold
    ``path`` and whose body refers to it where the source's bodies do, or ``None`` when this
    plugin does not own ``source_type``. Raise ``ValueError`` for a file that cannot be read as
    such a message (it stays in quarantine, with the reason printed). Example: the DICOM plugin
    parses a Part-10 file with ``body_from_file``. Since 0.3.
    """


@hookspec
def intu_engine_started(engine: EngineView) -> None:
    """Called once every channel of ``intu serve`` is up and listening.

    ``engine`` is a read-only ``EngineView``: ``channels()``, ``destinations()``,
    ``queue_stats()``, ``metrics()``, ``data_dir`` and ``settings(key)``. Example: a plugin that
    serves ``/metrics`` starts its HTTP server here with ``engine.settings("metrics")`` and
    answers each request with ``engine.metrics()``. Since 0.1 (given an ``EngineView`` since 0.2).
    """


@hookspec
def intu_engine_stopping(engine: EngineView) -> None:
    """Called when ``intu serve`` begins a graceful stop, before sources are stopped.

    ``engine`` is the same ``EngineView`` as in ``intu_engine_started``. Since 0.1.
    """
