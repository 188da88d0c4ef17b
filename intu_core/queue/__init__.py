"""The durable queue: what every destination delivers from, and the seam for other backends.

A queue *entry* is one message waiting for one destination (a message fanned out to two
destinations is two entries, enqueued in one transaction). An entry moves through these states::

    enqueue ─▶ pending ──claim──▶ in_flight ──complete──▶ (row deleted, "delivered" counter + 1)
                  ▲                   │  ▲ renew (the lease)
                  └──── retry_later ──┤
                  ▲                   └──dead_letter──▶ dead
                  │                                      │
                  └────────── retry (operator) ◀─────────┘
    record_error ─▶ errored   (a transformer raised: kept with its traceback)

A claim is a *lease*: the entry is held by the claiming node (``QueueStore.node_id``, one per
engine process) until ``lease_s`` seconds from the claim, and the delivery workers ``renew`` the
leases of entries they hold while a send takes long. A node that dies leaves its entries leased:
``recover()``, called when an engine starts, makes the entries of its own node (and any whose lease
has expired) pending again, and ``claim`` takes an entry whose lease has expired like a pending
one. Such an entry may have been delivered already and is sent again (at-least-once delivery;
these duplicates are counted as ``recovered``). This works when several engine processes share one
queue; with the embedded SQLite backend there is one per data folder, its node id is stable, and
recovery at start re-sends what was in flight.

Files a message refers to (``Message.files``) are reference-counted across entries: a file is
deleted only when the last entry that needs it is delivered or purged. Dead and errored entries
keep their files, so that an operator can retry them.

Backends register through the ``intu_queue_backends`` hook (a ``QueueBackend``) and are chosen
with the top-level ``queue: {backend: NAME}`` block of ``intu.yaml``; the engine and ``intu queue``
open the store with ``intu_core.queue.opener.open_queue``. The embedded default is
``intu_core.queue.sqlite`` (one SQLite file in WAL mode under the data directory). A backend
reports "the queue cannot be read or written right now" (disk full, lock held too long, server
unreachable) as ``QueueUnavailable``, and a backend's test module runs the contract suite
``intu_core.testing.queue_contract.QueueContract``.

The store also keeps the message history (``intu_core.history``): every method that changes an
entry records its event (``queued``, ``attempt``, ``delivered``, ``dead``, ``retried``,
``purged``, ``errored``) in the same transaction, and ``record`` adds the events that change no
entry (``filtered``, ``sent``). A PostgreSQL backend for several engine
processes sharing one queue is such a plugin, and nothing else: it would claim with
``SELECT ... FOR UPDATE SKIP LOCKED`` and keep the file reference counts in the same transaction.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from intu_core.history import Event, Journey, MessageQuery, MessageRecord
from intu_core.message import Message, SendResult

if TYPE_CHECKING:
    from intu_core.config.section import Section

#: Queue names for messages that failed in a channel's pipeline (before any destination) start
#: with this prefix (``channel:dicom-router``); every other queue name is a destination's name.
CHANNEL_QUEUE_PREFIX = "channel:"

#: How long a claim holds an entry unless renewed. Delivery workers renew every third of it while
#: a send runs, so it only bounds how long the entries of a node that died wait for another node
#: (a restarted engine takes its own back at once, through ``recover``).
DEFAULT_LEASE_S = 300.0

_BACKEND_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


class QueueUnavailable(RuntimeError):
    """The queue cannot be read or written right now: the disk is full, a lock is held too long,
    the database server cannot be reached. Raised by backends for any such condition, so that the
    engine can refuse a message as busy (the sender tries again later) without knowing the backend.
    """


class QueueDamaged(QueueUnavailable):
    """The queue's storage is damaged (a corrupted page, not a database at all): what it would
    read cannot be trusted, so the engine refuses to start rather than sweep or deliver from it.
    The message says what is wrong and what to do (restore a backup, or ``intu queue recover``).
    """


class QueueNotFound(LookupError):
    """Raised by ``open`` with ``create=False`` when there is no queue yet (nothing was ever
    queued); the message says where it was looked for."""


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
    first; the SQLite store keeps the last 50. An in-flight entry is leased to the node
    ``lease_owner`` until ``lease_expires_at`` (epoch seconds); both are None in other states.
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
    lease_owner: str | None = None
    lease_expires_at: float | None = None


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
    recovered: int = 0  # taken back from a stopped engine's (or expired) lease: possible duplicates

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

    Every method that changes state is durable when it returns, except ``claim`` and ``renew``
    (losing one on a power cut leaves the entry to ``recover``). Methods that take an ``entry_id``
    of an entry that is not in the expected state (for example purged by an operator while it was
    being sent, or in flight under another node's lease) change nothing and return False. A
    backend raises ``QueueUnavailable`` when it cannot read or write for now.
    """

    def enqueue(
        self,
        items: Sequence[tuple[str, Message]],
        *,
        origin: Message | None = None,
        events: Sequence[Event] = (),
    ) -> list[str]:
        """Add each ``(queue, message)`` as a pending entry, all in one transaction; the new ids.

        History, in the same transaction: a ``queued`` event per entry, in the record of
        ``origin`` (the message as the source handed it over: its id, channel and
        ``metadata["history"]``; default: each item's message), created when new; and ``events``
        (e.g. ``sent`` to an unqueued destination, ``filtered`` by a destination's filter).
        """
        ...

    def record_error(self, message: Message, queue: str, reason: str) -> str:
        """Keep a message that failed in the pipeline as ``errored`` with ``reason`` (a traceback);
        an ``errored`` event in its history."""
        ...

    def record(self, message: Message, events: Sequence[Event]) -> None:
        """Create or update ``message``'s history record and add ``events`` (about no entry:
        ``filtered``, ``sent``, ``attempt`` of an unqueued destination), in one transaction."""
        ...

    def find_messages(self, query: MessageQuery) -> list[MessageRecord]:
        """The records matching ``query``, newest received first, at most ``query.limit``."""
        ...

    def journey(self, message_id: str) -> Journey | None:
        """The record of ``message_id``, its events and its entries still queued; None if unknown.
        All three as of one moment: a delivery committed meanwhile is in all of them or in none."""
        ...

    def expire_history(self, older_than: float) -> int:
        """Delete the records (and events) last updated before ``older_than`` (epoch seconds)
        whose message has no entry left in the queue; how many."""
        ...

    #: The node this store claims for (one per engine process; see the module docstring).
    node_id: str

    def claim(
        self, queue: str, now: float | None = None, *, lease_s: float = DEFAULT_LEASE_S
    ) -> Entry | None:
        """An entry of ``queue`` whose lease has expired (it is counted as recovered), else the
        oldest due pending entry; now in flight, leased to ``node_id`` until ``now + lease_s``.
        Never given out twice while its lease lasts."""
        ...

    def renew(self, entry_ids: Sequence[str], lease_s: float = DEFAULT_LEASE_S) -> int:
        """Extend the leases of those ``entry_ids`` this node holds to ``lease_s`` from now; how many."""
        ...

    def next_due(self, queue: str) -> float | None:
        """The earliest ``next_attempt_at`` among the pending entries of ``queue``, or None."""
        ...

    def complete(self, entry_id: str, result: SendResult | None = None) -> bool:
        """Delivered: forget the entry and release its files (only the lease holder can)."""
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
        """At startup: in-flight entries leased by this node, or whose lease has expired, back to
        pending (counted as recovered); how many there were."""
        ...

    def size(self, queue: str) -> int:
        """Pending plus in-flight entries of ``queue``."""
        ...

    def stats(self) -> list[QueueStats]:
        """One ``QueueStats`` per known queue, sorted by name, as of one moment: an entry delivered
        meanwhile is counted once, in flight or delivered."""
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


@dataclass(frozen=True)
class QueueRuntime:
    """What a queue backend is given when it opens its store.

    ``node_id`` None asks for the backend's default, which must be stable for this data folder
    (the same after a restart, so that ``recover`` takes back what this engine held). With
    ``create`` False (``intu queue`` looking at the queue) a backend creates nothing and raises
    ``QueueNotFound`` when there is no queue yet, and it should write nothing: an operator looks
    at the queue precisely when the disk is full.
    """

    data_dir: Path
    node_id: str | None = None
    create: bool = True


@dataclass(frozen=True)
class QueueBackend:
    """A queue backend a plugin provides, chosen with ``queue: {backend: NAME}`` in ``intu.yaml``.

    ``parse_settings(section)`` reads the rest of the ``queue:`` block (``backend`` is read
    already) and returns a settings object, reporting problems through ``section``;
    ``open(settings, runtime)`` returns a ``QueueStore`` (see ``QueueRuntime``).
    """

    name: str
    parse_settings: Callable[[Section], Any]
    open: Callable[[Any, QueueRuntime], QueueStore]
    description: str = ""

    def __post_init__(self) -> None:
        if not _BACKEND_NAME.match(self.name):
            raise ValueError(
                f"queue backend name {self.name!r} must be lowercase letters, digits, '-' or '_',"
                " starting with a letter"
            )


def retryable_states(state: EntryState | None) -> tuple[str, ...]:
    """The entry states ``QueueStore.retry`` takes for ``state`` (None: dead and errored), for
    backends; any other state is a ``ValueError``."""
    if state is None:
        return (EntryState.DEAD.value, EntryState.ERRORED.value)
    if state not in (EntryState.DEAD, EntryState.ERRORED):
        raise ValueError(f"only dead or errored entries can be retried, not {state.value}")
    return (state.value,)


__all__ = [
    "retryable_states",
    "CHANNEL_QUEUE_PREFIX",
    "DEFAULT_LEASE_S",
    "Entry",
    "EntryState",
    "QueueBackend",
    "QueueDamaged",
    "QueueNotFound",
    "QueueRuntime",
    "QueueStats",
    "QueueStore",
    "QueueUnavailable",
    "attempt_record",
    "channel_queue",
]
