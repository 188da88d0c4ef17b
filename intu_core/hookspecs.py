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
* ``intu_write_message_file`` when the built-in ``file`` destination writes a message, so a
  plugin that knows a body format (the DICOM plugin: Part-10 files) can write it natively.
* ``intu_cli_commands`` when the ``intu`` command line starts, to add sub-commands.
* ``intu_engine_started`` and ``intu_engine_stopping`` around ``intu serve``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    import click

    from intu_core.engine import Engine
    from intu_core.message import Message
    from intu_core.types import DestinationType, SourceType

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


@hookspec
def intu_engine_started(engine: Engine) -> None:
    """Called once every channel of ``intu serve`` is up and listening. Since 0.1."""


@hookspec
def intu_engine_stopping(engine: Engine) -> None:
    """Called when ``intu serve`` begins a graceful stop, before sources are stopped. Since 0.1."""
