"""Built-in types, registered through the same hooks as any third-party plugin."""

from __future__ import annotations

from intu_core.builtin.file_destination import FILE_DESTINATION
from intu_core.builtin.log_destination import LOG_DESTINATION
from intu_core.hookspecs import hookimpl
from intu_core.queue.sqlite import SQLITE_BACKEND


@hookimpl
def intu_destination_types():  # type: ignore[no-untyped-def]
    return [FILE_DESTINATION, LOG_DESTINATION]


@hookimpl
def intu_queue_backends():  # type: ignore[no-untyped-def]
    return [SQLITE_BACKEND]
