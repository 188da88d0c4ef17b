"""The durable queue: what every destination delivers from, and the seam for other backends.

A queue *entry* is one message waiting for one destination (a message fanned out to two
destinations is two entries, enqueued in one transaction). An entry moves through these states::

    enqueue ─▶ pending ──claim──▶ in_flight ──complete──▶ (row deleted, "delivered" counter + 1)
                  ▲                   │
                  └──── retry_later ──┤
                  ▲                   └──dead_letter──▶ dead
                  │                                      │
                  └────────── retry (operator) ◀─────────┘
    record_error ─▶ errored   (a transformer raised: kept with its traceback)

``recover()`` at startup turns ``in_flight`` back into ``pending``: the process died between
claiming an entry and recording the result, so the entry may have been delivered already; it is
sent again (at-least-once delivery, such duplicates are counted as ``recovered``).

Files a message refers to (``Message.files``) are reference-counted across entries: a file is
deleted only when the last entry that needs it is delivered or purged. Dead and errored entries
keep their files, so that an operator can retry them.

``QueueStore`` is deliberately small so that another backend can be added without touching sources,
destinations or the delivery workers: the embedded default is ``intu_core.queue.sqlite``
(``SqliteQueueStore``: one SQLite file in WAL mode under the data directory). A PostgreSQL backend
for several engine processes sharing one queue would implement the same protocol, claiming with
``SELECT ... FOR UPDATE SKIP LOCKED`` and keeping the file reference counts in the same
transaction; it is not built yet.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from intu_core.message import Message, SendResult

#: Queue names for messages that failed in a channel's pipeline (before any destination) start
#: with this prefix (``channel:dicom-router``); every other queue name is a destination's name.
CHANNEL_QUEUE_PREFIX = "channel:"


def channel_queue(channel: str) -> str:
    """The queue name under which a channel's pipeline errors are recorded."""
    return f"{CHANNEL_QUEUE_PREFIX}{channel}"


class EntryState(enum.Enum):
    """Where an entry is in its life. Delivered entries are deleted, so there is no "done" state."""

    PENDING = "pending"  # waiting for a worker, from next_attempt_at on
    IN_FLIGHT = "in_flight"  # claimed by a worker that is sending it now
    DEAD = "dead"  # out of attempts or failed permanently: kept with the reason for an operator
    ERRORED = "errored"  # the pipeline failed (a transformer raised): kept with the traceback


@dataclass(frozen=True)
class Entry:
    """One message waiting for (or given up on by) one queue.

    ``attempts`` counts the sends that have been tried. ``history`` holds the most recent attempts
    (``{"at": epoch seconds, "status": "retryable"|..., "code": int|None, "detail": str}``), oldest
    first; the SQLite store keeps the last 50.
    """

    id: str
    queue: str
    message: Message
    state: EntryState
    attempts: int
    next_attempt_at: float
    created_at: float
    updated_at: float
    last_error: str = ""
    history: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class QueueStats:
    """What ``intu queue list`` shows for one queue. Ages are in seconds."""

    queue: str
    pending: int = 0
    in_flight: int = 0
    dead: int = 0
    errored: int = 0
    oldest_age_s: float | None = None  # of the oldest pending or in-flight entry
    delivered: int = 0  # entries completed since the queue database was created
    recovered: int = 0  # entries found in flight at startup and sent again (possible duplicates)

    @property
    def depth(self) -> int:
        """Entries still to deliver (pending + in flight)."""
        return self.pending + self.in_flight


def attempt_record(at: float, result: SendResult | str) -> dict[str, Any]:
    """The history item for one attempt (a ``SendResult``) or one event given as text."""
    if isinstance(result, SendResult):
        return {"at": at, "status": result.status.value, "code": result.code, "detail": result.detail}
    return {"at": at, "status": "note", "code": None, "detail": result}


@runtime_checkable
class QueueStore(Protocol):
    """A durable store of queue entries, safe for use from many threads and a second process.

    Every method that changes state is durable when it returns. Methods that take an ``entry_id``
    of an entry that is not in the expected state (for example purged by an operator while it was
    being sent) change nothing and return False.
    """

    def enqueue(self, items: Sequence[tuple[str, Message]]) -> list[str]:
        """Add each ``(queue, message)`` as a pending entry, all in one transaction; the new ids."""
        ...

    def record_error(self, message: Message, queue: str, reason: str) -> str:
        """Keep a message that failed in the pipeline as ``errored`` with ``reason`` (a traceback)."""
        ...

    def claim(self, queue: str, now: float | None = None) -> Entry | None:
        """The oldest due pending entry of ``queue``, now marked in flight (never given out twice)."""
        ...

    def next_due(self, queue: str) -> float | None:
        """The earliest ``next_attempt_at`` among the pending entries of ``queue``, or None."""
        ...

    def complete(self, entry_id: str, result: SendResult | None = None) -> bool:
        """Delivered: forget the entry and release its files."""
        ...

    def retry_later(self, entry_id: str, result: SendResult | str, at: float) -> bool:
        """Not delivered: back to pending from ``at`` (epoch seconds), one more attempt recorded."""
        ...

    def dead_letter(self, entry_id: str, result_or_reason: SendResult | str) -> bool:
        """Give up: state dead with the reason; the message and its files are kept."""
        ...

    def release_files(self, paths: Sequence[str]) -> int:
        """Delete those of ``paths`` that no entry refers to (a message filtered out, or sent
        without a queue); returns how many were deleted. Referenced files are left alone."""
        ...

    def recover(self) -> int:
        """At startup: every in-flight entry back to pending; how many there were."""
        ...

    def size(self, queue: str) -> int:
        """Pending plus in-flight entries of ``queue``."""
        ...

    def stats(self) -> list[QueueStats]:
        """One ``QueueStats`` per known queue, sorted by name."""
        ...

    def get(self, entry_id: str) -> Entry | None: ...

    def list_entries(
        self, queue: str | None = None, state: EntryState | None = None, limit: int = 100
    ) -> list[Entry]: ...

    def retry(
        self,
        queue: str | None = None,
        entry_ids: Sequence[str] | None = None,
        state: EntryState | None = EntryState.DEAD,
    ) -> int:
        """Dead (or errored) entries back to pending now with attempts reset; how many."""
        ...

    def purge(
        self,
        queue: str | None = None,
        state: EntryState | None = None,
        entry_ids: Sequence[str] | None = None,
    ) -> int:
        """Delete entries (never in-flight ones) and release their files; how many."""
        ...

    def close(self) -> None: ...


__all__ = [
    "CHANNEL_QUEUE_PREFIX",
    "Entry",
    "EntryState",
    "QueueStats",
    "QueueStore",
    "attempt_record",
    "channel_queue",
]
