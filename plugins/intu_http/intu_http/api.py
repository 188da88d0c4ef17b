"""The JSON API under ``/api/v1``: one function per route, from an ``EngineView`` to a ``Reply``.

No HTTP here (``server.py`` does that): each function takes the view and the parsed request
and returns the status and the JSON body, so that the answers are values a test can read. The
shapes are described in ``openapi.json`` (served at ``/api/v1/openapi.json``); the tests check
real answers against it.
"""

from __future__ import annotations

import hmac
import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from intu_core.history import STATUSES, Event, Journey, MessageQuery, MessageRecord
from intu_core.metrics import MetricsSnapshot
from intu_core.queue import Entry, EntryState
from intu_core.view import EngineView

#: At most this many messages or dead letters in one answer.
MAX_LIMIT = 1000
#: Throughput is averaged over this many seconds of samples.
THROUGHPUT_WINDOW_S = 60.0
_MESSAGE_PARAMS = (
    "accession_number",
    "patient_id",
    "study_uid",
    "sop_instance_uid",
    "channel",
    "status",
    "since",
    "until",
    "limit",
)


@dataclass(frozen=True)
class Reply:
    """An answer: the HTTP status, a JSON-able body, extra headers."""

    status: int
    body: Any
    headers: tuple[tuple[str, str], ...] = ()


def error(status: int, message: str, *headers: tuple[str, str]) -> Reply:
    """The body every error has: ``{"error": "<what went wrong and what to do>"}``."""
    return Reply(status, {"error": message}, headers)


class BadRequest(ValueError):
    """A query parameter that cannot be used (answered 400 with this text)."""


# -- reading ---------------------------------------------------------------------------------------
def channels(view: EngineView) -> Reply:
    """``GET /channels``: each enabled channel, its state and what its source handed over."""
    snapshot = view.metrics()
    items = []
    for channel in view.channels():
        counts = {
            name: int(snapshot.value(metric, channel=channel.name))
            for name, metric in (
                ("received", "intu_messages_received_total"),
                ("accepted", "intu_messages_accepted_total"),
                ("filtered", "intu_messages_filtered_total"),
            )
        }
        counts["refused"] = int(
            sum(
                snapshot.value("intu_messages_refused_total", channel=channel.name, reason=reason)
                for reason in ("busy", "failed")
            )
        )
        items.append(
            {
                "name": channel.name,
                "source_type": channel.source_type,
                "state": channel.state.value,
                "listening": channel.listening,
                "destinations": list(channel.destinations),
                **counts,
            }
        )
    return Reply(200, {"channels": items})


def destinations(view: EngineView, throughput: Throughput) -> Reply:
    """``GET /destinations``: each destination's state, queue and counts, and its throughput."""
    snapshot = view.metrics()
    stats = {s.queue: s for s in view.queue_stats()}  # QueueUnavailable: 503, by the caller
    states = _destination_states(view)
    rates = throughput.rates(snapshot)
    items = []
    for destination in view.destinations():
        name = destination.name
        s = stats.get(name)
        delivered_since_start = int(snapshot.value("intu_messages_delivered_total", destination=name))
        state = states.get(name)
        items.append(
            {
                "name": name,
                "type": destination.type,
                "queued": destination.queued,
                "state": state,
                "depth": s.depth if s else 0,
                "pending": s.pending if s else 0,
                "in_flight": s.in_flight if s else 0,
                "dead": s.dead if s else 0,
                "oldest_age_s": s.oldest_age_s if s else None,
                # A queue counts deliveries since it was created; an unqueued destination has
                # only the counter since this engine started.
                "delivered": s.delivered if s else delivered_since_start,
                "delivered_since_start": delivered_since_start,
                "failed": int(
                    snapshot.value("intu_messages_retried_total", destination=name)
                    + snapshot.value("intu_messages_dead_lettered_total", destination=name)
                ),
                "dead_lettered": int(snapshot.value("intu_messages_dead_lettered_total", destination=name)),
                "throughput_per_s": rates.get(name, 0.0),
            }
        )
    return Reply(200, {"destinations": items})


def _destination_states(view: EngineView) -> dict[str, dict[str, Any]]:
    return {
        name: {"up": s.up, "since": s.since, "last_error": s.last_error}
        for name, s in view.destination_states().items()
    }


def messages(view: EngineView, params: Mapping[str, list[str]]) -> Reply:
    """``GET /messages?...``: the message history, newest first (see ``message_query``)."""
    query = message_query(params)  # BadRequest: 400, by the caller
    return Reply(200, {"messages": [record_json(r) for r in view.find_messages(query)]})


def message(view: EngineView, message_id: str) -> Reply:
    """``GET /messages/{id}``: one message's journey."""
    journey = view.journey(message_id)
    if journey is None:
        return error(
            404,
            f"no message {message_id!r} in the history (never received here, or older than"
            " history.retention_days)",
        )
    return Reply(200, journey_json(journey))


def dead_letters(view: EngineView, params: Mapping[str, list[str]]) -> Reply:
    """``GET /dead-letters?limit=``: entries given up on (``dead``) and messages that failed in a
    channel (``errored``), oldest first, with their reason."""
    _only(params, ("limit",))
    limit = _limit(params)
    entries = view.entries(state=EntryState.DEAD, limit=limit)
    entries += view.entries(state=EntryState.ERRORED, limit=limit)
    entries.sort(key=lambda e: e.updated_at)
    return Reply(200, {"dead_letters": [entry_json(e) for e in entries[:limit]]})


# -- operator actions ------------------------------------------------------------------------------
def authorize(token: str, authorization: str | None) -> Reply | None:
    """None when ``authorization`` (the request's header) carries ``token``, else the 401 or 403."""
    if not token:
        return error(403, "operator actions are disabled: set http.token in intu.yaml and restart")
    if not authorization:
        return error(
            401,
            "this action needs the operator token: send 'Authorization: Bearer <token>'",
            ("WWW-Authenticate", 'Bearer realm="intu"'),
        )
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return error(
            401,
            "expected 'Authorization: Bearer <token>'",
            ("WWW-Authenticate", 'Bearer realm="intu", error="invalid_request"'),
        )
    # Constant time: the comparison must not tell how much of a guess was right.
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        return error(403, "wrong operator token")
    return None


def retry_entry(view: EngineView, entry_id: str) -> Reply:
    """``POST /entries/{id}/retry``: a dead or errored entry back to its queue, due now."""
    entry = view.entry(entry_id)
    if entry is None:
        return error(404, f"no queue entry {entry_id!r} (delivered, purged, or never existed)")
    if entry.state not in (EntryState.DEAD, EntryState.ERRORED):
        return error(
            409, f"entry {entry_id} is {entry.state.value}: only dead or errored entries are retried"
        )
    count = view.operator().retry([entry_id])
    if count == 0:  # settled by someone else in between
        return error(409, f"entry {entry_id} changed meanwhile; look at it again")
    return Reply(200, {"retried": count, "entry": entry_id, "queue": entry.queue})


def purge_entry(view: EngineView, entry_id: str) -> Reply:
    """``POST /entries/{id}/purge``: delete an entry that is not being sent, and its files."""
    entry = view.entry(entry_id)
    if entry is None:
        return error(404, f"no queue entry {entry_id!r} (delivered, purged, or never existed)")
    if entry.state is EntryState.IN_FLIGHT:
        return error(409, f"entry {entry_id} is being sent; purge it once it is settled")
    count = view.operator().purge([entry_id])
    if count == 0:
        return error(409, f"entry {entry_id} changed meanwhile; look at it again")
    return Reply(200, {"purged": count, "entry": entry_id, "queue": entry.queue})


# -- health ----------------------------------------------------------------------------------------
def readyz(view: EngineView) -> Reply:
    """``GET /readyz``: 200 when the engine can take messages, else 503 with the problems."""
    problems = view.ready()
    return Reply(503 if problems else 200, {"ready": not problems, "problems": problems})


# -- parameters ------------------------------------------------------------------------------------
def message_query(params: Mapping[str, list[str]]) -> MessageQuery:
    """The ``MessageQuery`` of ``/messages``'s parameters; ``BadRequest`` says which is wrong.

    ``since`` and ``until`` are epoch seconds or ISO 8601 times (UTC unless they carry an
    offset); ``status`` is one of the record statuses; ``limit`` from 1 to ``MAX_LIMIT``."""
    _only(params, _MESSAGE_PARAMS)
    text = {key: _single(params, key) for key in _MESSAGE_PARAMS if key in params}
    status = text.get("status")
    if status is not None and status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
    since = _time(text["since"], "since") if "since" in text else None
    until = _time(text["until"], "until") if "until" in text else None
    if since is not None and until is not None and until <= since:
        raise BadRequest("until must be later than since")
    return MessageQuery(
        accession_number=text.get("accession_number"),
        patient_id=text.get("patient_id"),
        study_uid=text.get("study_uid"),
        sop_instance_uid=text.get("sop_instance_uid"),
        channel=text.get("channel"),
        status=status,
        since=since,
        until=until,
        limit=_limit(params),
    )


def _only(params: Mapping[str, list[str]], allowed: tuple[str, ...]) -> None:
    # A misspelt filter would otherwise be ignored and answer with every message.
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise BadRequest(f"unknown query parameter {unknown[0]!r}; expected one of {', '.join(allowed)}")


def _single(params: Mapping[str, list[str]], key: str) -> str:
    values = params[key]
    if len(values) != 1:
        raise BadRequest(f"{key} given {len(values)} times; give it once")
    value = values[0].strip()
    if not value:
        raise BadRequest(f"{key} is empty; leave it out to match any")
    return value


def _limit(params: Mapping[str, list[str]]) -> int:
    if "limit" not in params:
        return 100
    text = _single(params, "limit")
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}, not {text!r}")
    return int(text)


def _time(text: str, key: str) -> float:
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(value) and value >= 0:
            return value
        raise BadRequest(f"{key} must be a time, not {text!r}")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(
            f"{key} must be epoch seconds or an ISO 8601 time (2026-01-31T08:00:00+01:00), not {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# -- JSON shapes -----------------------------------------------------------------------------------
def record_json(record: MessageRecord) -> dict[str, Any]:
    """A ``MessageRecord`` as the API shows it (``MessageRecord`` in ``openapi.json``)."""
    return {
        "id": record.id,
        "channel": record.channel,
        "received_at": record.received_at,
        "source": record.source,
        "identifiers": dict(record.identifiers),
        "tags": dict(record.tags),
        "status": record.status,
        "destinations": dict(record.destinations),
        "updated_at": record.updated_at,
    }


def event_json(event: Event) -> dict[str, Any]:
    """An ``Event`` as the API shows it (``kind`` as its text)."""
    data = asdict(event)
    data["kind"] = event.kind.value
    del data["message_id"]  # the journey's message says whose
    return data


def journey_json(journey: Journey) -> dict[str, Any]:
    """A ``Journey``: the record, its events oldest first, its entries still in the queue."""
    return {
        "message": record_json(journey.message),
        "events": [event_json(e) for e in journey.events],
        "entries": list(journey.entries),
    }


def entry_json(entry: Entry) -> dict[str, Any]:
    """A dead or errored entry, with its reason and the message's identifiers (no body)."""
    history = entry.message.metadata.get("history") if isinstance(entry.message.metadata, Mapping) else None
    identifiers = history.get("identifiers", {}) if isinstance(history, Mapping) else {}
    last = entry.history[-1] if entry.history else {}
    return {
        "id": entry.id,
        "queue": entry.queue,
        "state": entry.state.value,
        "message_id": entry.message.id,
        "channel": entry.message.channel,
        "attempts": entry.attempts,
        "created_at": entry.created_at,
        "updated_at": entry.updated_at,
        "reason": entry.last_error,
        "code": last.get("code") if isinstance(last.get("code"), int) else None,
        "identifiers": {str(k): str(v) for k, v in identifiers.items()},
    }


# -- throughput ------------------------------------------------------------------------------------
@dataclass
class Throughput:
    """Messages delivered per second per destination, over the last ``window_s`` seconds.

    ``sample`` records the delivered counters (the server calls it every few seconds and on each
    request); ``rates`` is the increase over the oldest sample in the window divided by its age.
    """

    window_s: float = THROUGHPUT_WINDOW_S
    _samples: deque[tuple[float, dict[str, float]]] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def sample(self, snapshot: MetricsSnapshot, now: float | None = None) -> None:
        """Record the delivered count of each destination at ``now`` (monotonic seconds)."""
        now = time.monotonic() if now is None else now
        counts = {
            sample.labels["destination"]: sample.value
            for family in snapshot
            if family.name == "intu_messages_delivered_total"
            for sample in family.samples
        }
        with self._lock:
            if len(self._samples) > 1 and now - self._samples[-1][0] < 1.0:
                self._samples[-1] = (now, counts)  # many requests a second add no samples
            else:
                self._samples.append((now, counts))
            while self._samples and self._samples[0][0] < now - self.window_s:
                self._samples.popleft()

    def rates(self, snapshot: MetricsSnapshot, now: float | None = None) -> dict[str, float]:
        """Delivered per second per destination, ``snapshot`` being now."""
        now = time.monotonic() if now is None else now
        self.sample(snapshot, now)
        with self._lock:
            start, first = self._samples[0]
            _, last = self._samples[-1]
        elapsed = now - start
        if elapsed <= 0:
            return {name: 0.0 for name in last}
        return {name: round((count - first.get(name, 0.0)) / elapsed, 3) for name, count in last.items()}


__all__ = [
    "MAX_LIMIT",
    "BadRequest",
    "Reply",
    "Throughput",
    "authorize",
    "channels",
    "dead_letters",
    "destinations",
    "entry_json",
    "error",
    "journey_json",
    "message",
    "message_query",
    "messages",
    "purge_entry",
    "readyz",
    "record_json",
    "retry_entry",
]
