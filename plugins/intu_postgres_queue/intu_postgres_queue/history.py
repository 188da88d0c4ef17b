"""The message history on PostgreSQL: the same records and events as the SQLite backend
(``intu_core.history``), written inside the transaction of the queue change they describe.

Nodes settling entries of one message at once (its PACS copy on one node, its archive copy on
another) update the same record: it is read ``FOR UPDATE``, and records are locked in id order, so
two transactions never wait for each other in a cycle.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from psycopg.types.json import Jsonb

from intu_core.history import (
    PROBLEM_STATUSES,
    Event,
    EventKind,
    Journey,
    MessageQuery,
    MessageRecord,
    NewRecord,
    capped,
    history_of,
    next_state,
)
from intu_core.message import Message
from intu_core.queue import CHANNEL_QUEUE_PREFIX
from intu_postgres_queue.connections import Connection

_MESSAGE_COLUMNS = "id, channel, received_at, source, identifiers, tags, status, destinations, updated_at"
_EVENT_COLUMNS = "message_id, at, kind, destination, attempt, status, code, detail"
_SEARCHABLE = ("accession_number", "patient_id", "study_uid", "sop_instance_uid", "channel", "status")
# The condition of messages_by_problem (schema version 3). PostgreSQL infers it from the status
# when it plans with the value; stated, the index also serves a generic plan (a statement psycopg
# has prepared), where the status is a parameter the planner does not know.
_PROBLEM_CLAUSE = "status IN ('errored', 'dead', 'partial')"
EXPIRE_BATCH = 500


class History:
    """Events to write in one transaction, grouped by message, with the records to create for
    messages seen for the first time (``new``)."""

    def __init__(self, schema: str, events: Iterable[Event] = ()) -> None:
        self.messages, self.events_table = f"{schema}.messages", f"{schema}.events"
        self.events: dict[str, list[Event]] = {}
        self.records: dict[str, NewRecord] = {}
        for event in events:
            self.add(event)

    def new(self, message: Message) -> str:
        if message.id not in self.records:
            self.records[message.id] = history_of(message)
        return message.id

    def add(self, event: Event) -> None:
        self.events.setdefault(event.message_id, []).append(event)

    def write(self, conn: Connection, now: float) -> None:
        ids = sorted({*self.records, *self.events})
        if not ids:
            return
        found = {
            row["id"]: row
            for row in conn.execute(
                f"SELECT id, status, destinations FROM {self.messages} WHERE id = ANY(%s)"
                " ORDER BY id FOR UPDATE",
                (ids,),
            ).fetchall()
        }
        rows: list[tuple[Any, ...]] = []
        for message_id in ids:
            events = self.events.get(message_id, [])
            current = found.get(message_id)
            if current is None:
                new = self.records.get(message_id)
                if new is None:
                    continue  # an entry queued before the history existed: it has no record
                detail = f"from {new.source}" if new.source else ""
                events = [Event(message_id, new.received_at, EventKind.RECEIVED, detail=detail), *events]
                status, states = next_state("received", {}, events, channel_queue_prefix=CHANNEL_QUEUE_PREFIX)
                known = new.identifiers
                # ON CONFLICT: another node's first write about the same message won the race.
                conn.execute(
                    f"INSERT INTO {self.messages} (id, channel, received_at, source, patient_id,"
                    " accession_number, study_uid, sop_instance_uid, identifiers, tags, status,"
                    " destinations, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (id) DO NOTHING",
                    (
                        message_id, new.channel, new.received_at, new.source, known.get("patient_id"),
                        known.get("accession_number"), known.get("study_uid"), known.get("sop_instance_uid"),
                        Jsonb(known), Jsonb(new.tags), status, Jsonb(states), now,
                    ),
                )  # fmt: skip
            elif events:
                status, states = next_state(
                    current["status"],
                    current["destinations"],
                    events,
                    channel_queue_prefix=CHANNEL_QUEUE_PREFIX,
                )
                conn.execute(
                    f"UPDATE {self.messages} SET status = %s, destinations = %s, updated_at = %s"
                    " WHERE id = %s",
                    (status, Jsonb(states), now, message_id),
                )
            rows.extend(
                (
                    e.message_id,
                    e.at,
                    e.kind.value,
                    e.destination,
                    e.attempt,
                    e.status,
                    e.code,
                    capped(e.detail),
                )
                for e in events
            )
        if rows:
            with conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO {self.events_table} (message_id, at, kind, destination, attempt, status,"
                    " code, detail) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    rows,
                )


def operator_events(
    schema: str, rows: Sequence[dict[str, Any]], kind: EventKind, detail: str, now: float
) -> History:
    """The events of an operator's retry or purge of the entries in ``rows``."""
    return History(
        schema,
        (
            Event(row["message_id"], now, kind, row["queue"], detail=detail)
            for row in rows
            if row["message_id"]
        ),
    )


def find_messages(conn: Connection, schema: str, query: MessageQuery) -> list[MessageRecord]:
    clauses: list[str] = []
    params: list[Any] = []
    for column in _SEARCHABLE:
        value = getattr(query, column)
        if value is not None:
            clauses.append(f"{column} = %s")
            params.append(value)
    if query.status in PROBLEM_STATUSES:
        clauses.append(_PROBLEM_CLAUSE)  # through messages_by_problem
    if query.since is not None:
        clauses.append("received_at >= %s")
        params.append(query.since)
    if query.until is not None:
        clauses.append("received_at < %s")
        params.append(query.until)
    where = " AND ".join(clauses) or "TRUE"
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM {schema}.messages WHERE {where}"
        " ORDER BY received_at DESC, id LIMIT %s",
        (*params, query.limit),
    ).fetchall()
    return [_record(row) for row in rows]


def journey(conn: Connection, schema: str, message_id: str) -> Journey | None:
    row = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM {schema}.messages WHERE id = %s", (message_id,)
    ).fetchone()
    if row is None:
        return None
    events = conn.execute(
        f"SELECT {_EVENT_COLUMNS} FROM {schema}.events WHERE message_id = %s ORDER BY seq", (message_id,)
    ).fetchall()
    entries = conn.execute(
        f"SELECT id FROM {schema}.entries WHERE message_id = %s ORDER BY seq", (message_id,)
    ).fetchall()
    return Journey(_record(row), tuple(_event(e) for e in events), tuple(e["id"] for e in entries))


def expire(conn: Connection, schema: str, older_than: float) -> int:
    """One batch of ``expire_history``: how many records it deleted."""
    rows = conn.execute(
        f"DELETE FROM {schema}.messages WHERE id IN (SELECT m.id FROM {schema}.messages m"
        f" WHERE m.updated_at < %s AND NOT EXISTS (SELECT 1 FROM {schema}.entries e"
        " WHERE e.message_id = m.id) LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id",
        (older_than, EXPIRE_BATCH),
    ).fetchall()
    ids = [row["id"] for row in rows]
    if ids:
        conn.execute(f"DELETE FROM {schema}.events WHERE message_id = ANY(%s)", (ids,))
    return len(ids)


def _record(row: dict[str, Any]) -> MessageRecord:
    return MessageRecord(
        id=row["id"],
        channel=row["channel"],
        received_at=row["received_at"],
        source=row["source"],
        identifiers=row["identifiers"],
        tags=row["tags"],
        status=row["status"],
        destinations=row["destinations"],
        updated_at=row["updated_at"],
    )


def _event(row: dict[str, Any]) -> Event:
    return Event(
        message_id=row["message_id"],
        at=row["at"],
        kind=EventKind(row["kind"]),
        destination=row["destination"],
        attempt=row["attempt"],
        status=row["status"],
        code=row["code"],
        detail=row["detail"],
    )


__all__ = ["History", "expire", "find_messages", "journey", "operator_events"]
