"""Log output for people and for log shippers: the text and JSON formats of ``intu --log-format``.

Lines about one message carry who it is about, as structured fields rather than only in the text,
so that a log shipper can index them and a person can grep for an accession number::

    log.info("message %s filtered", message.id, extra=message_fields(message))

gives, in text (the default)::

    2026-12-03 10:00:00,123 INFO    intu.channel.ct: message 3f2a... filtered [acc=A123 study=1.2.3]

and with ``--log-format json``, one JSON object per line::

    {"time": "2026-12-03T10:00:00.123Z", "level": "INFO", "logger": "intu.channel.ct",
     "message": "message 3f2a... filtered", "message_id": "3f2a...", "accession_number": "A123",
     "study_uid": "1.2.3"}

The identifiers come from ``message.metadata["history"]["identifiers"]``, which sources fill (the
DICOM source does; the core knows nothing about DICOM). Patient identifiers are deliberately left
out: log files travel further than the queue database.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

from intu_core.message import Message

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# Identifier keys of the history metadata that go into log lines, and their short text names.
_IDENTIFIERS = {"accession_number": "acc", "study_uid": "study"}

# Attributes every LogRecord has: anything else on a record came in through ``extra=``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


def message_fields(message: Message) -> dict[str, str]:
    """The ``extra=`` fields of a log line about ``message``: its id, and its accession number and
    study UID when its source recorded them (absent ones are left out)."""
    fields = {"message_id": message.id}
    history = message.metadata.get("history")
    identifiers = history.get("identifiers") if isinstance(history, Mapping) else None
    if isinstance(identifiers, Mapping):
        for key in _IDENTIFIERS:
            value = identifiers.get(key)
            if value:
                fields[key] = str(value)
    return fields


def structured_fields(record: logging.LogRecord) -> dict[str, Any]:
    """What ``extra=`` added to ``record``, by name."""
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """The default format, with a message's identifiers appended as ``[acc=... study=...]``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        tags = [
            f"{short}={getattr(record, key)}" for key, short in _IDENTIFIERS.items() if hasattr(record, key)
        ]
        if not tags:
            return text
        # The traceback, if any, stays last, where people look for it.
        first, sep, rest = text.partition("\n")
        return f"{first} [{' '.join(tags)}]{sep}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``,
    ``message``, any structured fields, and ``exception`` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, Any] = {
            "time": f"{seconds}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in structured_fields(record).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: a field that is not JSON (a Path, an enum) must not lose the whole line.
        return json.dumps(line, default=str, ensure_ascii=False)


def formatter(fmt: str) -> logging.Formatter:
    """The formatter for ``--log-format`` ``fmt`` (one of ``FORMATS``)."""
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return TextFormatter()
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def configure(level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level`` in format ``fmt``, unless logging is configured already (as
    ``logging.basicConfig`` does: a test harness's handlers stay)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    logging.basicConfig(level=level.upper(), handlers=[handler])


__all__ = [
    "FORMATS",
    "TEXT_FORMAT",
    "JsonFormatter",
    "TextFormatter",
    "configure",
    "formatter",
    "message_fields",
    "structured_fields",
]
