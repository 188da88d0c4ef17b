"""Message history: what happened to every message, kept in the queue store beside the queue.

A message's *record* (``MessageRecord``) says where it came from (source, DICOM identifiers, a
few tags by keyword) and where it is now (``status``, and each destination's state); its *events*
(``Event``) say what happened, oldest first: received, filtered, queued per destination, each
attempt with the peer's status code, delivered, dead-lettered, retried or purged by an operator.

The queue store writes them in the same transaction as the queue change they describe (an
enqueue records ``received`` and ``queued``; a completed entry records ``delivered``), so a crash
cannot leave one without the other, and it costs no extra commit per message. The first write
about a message creates its record, with a ``received`` event at ``Message.created_at``; what a
source knows about the sender and the content goes in ``message.metadata["history"]``::

    {"source": "MODALITY@10.0.0.7:40512",
     "identifiers": {"patient_id": ..., "accession_number": ..., "study_uid": ..., ...},
     "tags": {"PatientName": "DOE^JANE", "Modality": "CT", ...}}

(the DICOM source fills it; the core never looks inside a body). Records of finished messages
(no entry left in the queue) are deleted after the retention (``history: {retention_days: 7}``).

Backends share the bookkeeping below (``next_state``, ``history_of``, ``capped``), so that
SQLite and PostgreSQL derive the same status from the same events.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from intu_core.message import Message, SendResult

#: The identifiers a record keeps (and ``intu messages`` searches by), in this order.
IDENTIFIER_KEYS = (
    "patient_id",
    "accession_number",
    "study_uid",
    "series_uid",
    "sop_instance_uid",
    "modality",
)
#: At most this many tags per record, each value at most ``TAG_VALUE_LIMIT`` characters: a
#: summary for people, not a copy of the dataset (which stays in the queue while it is queued).
TAG_LIMIT = 40
TAG_VALUE_LIMIT = 64
#: An event's detail is cut to this many characters (a traceback's end is kept).
DETAIL_LIMIT = 4000

#: What ``MessageRecord.status`` may be.
STATUSES = ("received", "filtered", "errored", "queued", "delivered", "dead", "partial")
#: The statuses an operator searches for when something went wrong. The stores index the records
#: in them by status (a partial index: a message that is received, queued and delivered never
#: enters it, so it costs the data path nothing), since a search for a rare status would
#: otherwise walk every record.
PROBLEM_STATUSES = ("errored", "dead", "partial")


class EventKind(enum.StrEnum):
    """What happened to a message."""

    RECEIVED = "received"  # a source handed it to the engine
    FILTERED = "filtered"  # a filter dropped it (destination "": all of it; else that destination)
    TRANSFORMED = "transformed"  # a transformer ran on it (destination "": the channel's; else that one's)
    ERRORED = "errored"  # a stage raised: kept as an errored entry with the traceback
    QUEUED = "queued"  # durably queued for a destination
    SENT = "sent"  # delivered to an unqueued destination, from the pipeline
    ATTEMPT = "attempt"  # a send that did not deliver; it will be tried again
    DELIVERED = "delivered"  # the destination has it
    DEAD = "dead"  # given up: a dead letter, kept with the reason
    RETRIED = "retried"  # an operator put a dead or errored entry back in its queue
    PURGED = "purged"  # an operator deleted its entry


@dataclass(frozen=True)
class Event:
    """One thing that happened to message ``message_id`` at ``at`` (epoch seconds).

    ``destination`` is the queue it concerns ("" for the whole message); ``attempt`` the send's
    number (1 = the first); ``status`` the ``SendStatus`` value of a send; ``code`` the peer's
    status code (a DICOM status such as 0xA700); ``detail`` a sentence for a person.
    """

    message_id: str
    at: float
    kind: EventKind
    destination: str = ""
    attempt: int | None = None
    status: str = ""
    code: int | None = None
    detail: str = ""

    @classmethod
    def of_send(
        cls,
        message_id: str,
        at: float,
        kind: EventKind,
        destination: str,
        result: SendResult | str,
        attempt: int | None = None,
    ) -> Event:
        """The event of a send's ``result`` (or of a reason given as text)."""
        if isinstance(result, SendResult):
            return cls(
                message_id, at, kind, destination, attempt, result.status.value, result.code, result.detail
            )
        return cls(message_id, at, kind, destination, None, "", None, result)


@dataclass(frozen=True)
class MessageRecord:
    """Where a message came from and where it is now (see the module docstring).

    ``status``: one of ``STATUSES`` (``partial``: some destinations have it, others gave up);
    ``destinations``: each destination's state (``queued``, ``delivered``, ``dead``, ``sent``,
    ``purged``).
    """

    id: str
    channel: str
    received_at: float
    source: str
    identifiers: Mapping[str, str]
    tags: Mapping[str, str]
    status: str
    destinations: Mapping[str, str]
    updated_at: float


@dataclass(frozen=True)
class MessageQuery:
    """What ``find_messages`` looks for; every field narrows (None: any). Times are epoch seconds
    of reception (``since`` inclusive, ``until`` exclusive)."""

    accession_number: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    sop_instance_uid: str | None = None
    channel: str | None = None
    status: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {self.status!r}")
        if self.limit < 1:
            raise ValueError(f"limit must be at least 1, not {self.limit}")


@dataclass(frozen=True)
class Journey:
    """One message's record, its events (oldest first), and the ids of its entries still in the
    queue (a dead letter an operator may retry)."""

    message: MessageRecord
    events: tuple[Event, ...]
    entries: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class HistorySettings:
    """The top-level ``history:`` block of ``intu.yaml``: how long records of finished messages
    are kept (``retention_days``; 0 keeps them for ever)."""

    retention_days: float = 7.0

    @property
    def retention_s(self) -> float:
        return self.retention_days * 86400.0


@dataclass(frozen=True)
class DestinationSummary:
    """What a journey says about one destination: its state, how many sends were tried, and the
    last thing its peer answered (the last attempt, delivery or dead letter)."""

    destination: str
    state: str
    attempts: int
    last: Event | None


def destination_summaries(journey: Journey) -> list[DestinationSummary]:
    """Per destination of ``journey.message``, in the order of its ``destinations``."""
    sends = (EventKind.ATTEMPT, EventKind.DELIVERED, EventKind.DEAD, EventKind.SENT)
    attempts: dict[str, int] = {}
    last: dict[str, Event] = {}
    for event in journey.events:
        if event.kind in sends and event.destination:
            if event.attempt is not None:
                attempts[event.destination] = attempts.get(event.destination, 0) + 1
            last[event.destination] = event
    return [
        DestinationSummary(name, state, attempts.get(name, 0), last.get(name))
        for name, state in journey.message.destinations.items()
    ]


# -- for backends ----------------------------------------------------------------------------
@dataclass(frozen=True)
class NewRecord:
    """The columns of a record created from a message (``history_of``)."""

    id: str
    channel: str
    received_at: float
    source: str
    identifiers: dict[str, str]
    tags: dict[str, str]


def history_of(message: Message) -> NewRecord:
    """The record a backend creates for ``message``, from ``metadata["history"]`` (tolerant of
    anything a source put there: wrong types are left out, values capped)."""
    info = message.metadata.get("history") if isinstance(message.metadata, Mapping) else None
    info = info if isinstance(info, Mapping) else {}
    identifiers_in = info.get("identifiers")
    identifiers = {
        key: _text(identifiers_in[key])
        for key in IDENTIFIER_KEYS
        if isinstance(identifiers_in, Mapping) and identifiers_in.get(key) not in (None, "")
    }
    tags_in = info.get("tags")
    tags: dict[str, str] = {}
    if isinstance(tags_in, Mapping):
        for key, value in tags_in.items():
            if len(tags) >= TAG_LIMIT:
                break
            if isinstance(key, str) and value is not None:
                tags[key] = _text(value)[:TAG_VALUE_LIMIT]
    return NewRecord(
        id=message.id,
        channel=message.channel,
        received_at=message.created_at.timestamp(),
        source=_text(info.get("source") or "")[:200],
        identifiers=identifiers,
        tags=tags,
    )


def capped(detail: str) -> str:
    """``detail`` within ``DETAIL_LIMIT`` characters (the end of a long traceback says most)."""
    if len(detail) <= DETAIL_LIMIT:
        return detail
    return "…" + detail[-(DETAIL_LIMIT - 1) :]


_DESTINATION_STATE = {
    EventKind.QUEUED: "queued",
    EventKind.SENT: "sent",
    EventKind.DELIVERED: "delivered",
    EventKind.DEAD: "dead",
    EventKind.RETRIED: "queued",
    EventKind.PURGED: "purged",
}


def next_state(
    status: str, destinations: Mapping[str, str], events: Sequence[Event], *, channel_queue_prefix: str
) -> tuple[str, dict[str, str]]:
    """A record's ``(status, destinations)`` after ``events``.

    Events about a channel's error queue (``channel:NAME``) do not name a destination: a retried
    errored message shows up as queued once the channel has run it again.
    """
    states = dict(destinations)
    for event in events:
        if event.kind is EventKind.FILTERED and not event.destination:
            status = "filtered"
        elif event.kind is EventKind.ERRORED:
            status = "errored"
        elif event.destination and not event.destination.startswith(channel_queue_prefix):
            state = _DESTINATION_STATE.get(event.kind)
            if state is not None:
                states[event.destination] = state
    return (_status_of(states) if states else status), states


def _status_of(states: Mapping[str, str]) -> str:
    values = set(states.values())
    if "queued" in values:
        return "queued"
    reached = values & {"delivered", "sent"}
    if not values - {"delivered", "sent"}:
        return "delivered"
    return "partial" if reached else "dead"


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value)


__all__ = [
    "IDENTIFIER_KEYS",
    "PROBLEM_STATUSES",
    "STATUSES",
    "DestinationSummary",
    "destination_summaries",
    "Event",
    "EventKind",
    "HistorySettings",
    "Journey",
    "MessageQuery",
    "MessageRecord",
    "NewRecord",
    "capped",
    "history_of",
    "next_state",
]
