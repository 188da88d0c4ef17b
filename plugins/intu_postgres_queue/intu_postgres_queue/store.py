"""``PostgresQueueStore``: the ``QueueStore`` contract on PostgreSQL, for several engine processes
(nodes) sharing one queue.

Each method is one transaction (``Connections.run``). A claim takes its row with ``FOR UPDATE SKIP
LOCKED``, so nodes claiming at once never wait for each other nor get the same entry, and holds it
under a lease (``lease_owner``, ``lease_expires_at``) that the node's delivery workers renew; an
entry whose lease has expired is claimed by any node like a pending one (counted as recovered).
Claims and renewals commit without waiting for the WAL flush (``synchronous_commit = off``):
losing one on a crash only leaves the entry to ``recover``; everything else waits for it.

Lease times are the nodes' clocks (epoch seconds, as the contract's ``now``): keep the nodes'
clocks in sync (NTP) to well under ``lease_s``.

Files are reference-counted in the ``files`` table in the same transaction as the entries that
refer to them and deleted after the commit (a crash in between leaves an orphan file, never an
entry without its file). Paths are absolute and must name the same file on every node: the data
folders are on a shared folder mounted at the same path everywhere.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from psycopg.types.json import Jsonb

from intu_core.history import Event, EventKind, Journey, MessageQuery, MessageRecord, capped
from intu_core.message import Message, SendResult
from intu_core.queue import (
    CHANNEL_QUEUE_PREFIX,
    DEFAULT_LEASE_S,
    Entry,
    EntryState,
    QueueStats,
    attempt_record,
    retryable_states,
)
from intu_postgres_queue import history
from intu_postgres_queue.connections import Connection, Connections
from intu_postgres_queue.schema import prepare, quote_identifier

log = logging.getLogger("intu.queue")

HISTORY_LIMIT = 50

_PENDING = EntryState.PENDING.value
_IN_FLIGHT = EntryState.IN_FLIGHT.value
_DEAD = EntryState.DEAD.value
_ERRORED = EntryState.ERRORED.value

_COLUMNS = (
    "id, queue, state, attempts, next_attempt_at, created_at, updated_at, last_error, history, message,"
    " lease_owner, lease_expires_at"
)


class PostgresQueueStore:
    """The queue kept in ``schema`` of the database at ``dsn``, claiming for ``node_id``.

    Safe for use from many threads; any number of processes on any number of machines may open
    the same queue. ``lease_s`` is what this node's delivery workers lease entries for (the engine
    reads it from here; ``claim`` takes its own argument, as the contract says). With ``create``
    False nothing is created (``QueueNotFound`` when there is no queue yet).
    """

    def __init__(
        self,
        dsn: str,
        *,
        node_id: str,
        schema: str = "intu",
        lease_s: float = DEFAULT_LEASE_S,
        create: bool = True,
        pool_size: int = 8,
        connect_timeout_s: float = 5.0,
        statement_timeout_ms: int = 30_000,
        where: str | None = None,
    ) -> None:
        from intu_postgres_queue.settings import describe_dsn

        self.node_id = node_id
        self.schema = schema
        self.lease_s = lease_s
        self._db = Connections(
            dsn,
            where=where or describe_dsn(dsn),
            size=pool_size,
            connect_timeout_s=connect_timeout_s,
            statement_timeout_ms=statement_timeout_ms,
            application_name=f"intu {node_id}",
        )
        try:
            prepare(self._db, schema, create=create)
        except BaseException:
            self._db.close()
            raise
        s = quote_identifier(schema)
        self._schema = s
        self._entries, self._files, self._counters = f"{s}.entries", f"{s}.files", f"{s}.counters"

    @property
    def where(self) -> str:
        """The database, for messages (without the password)."""
        return self._db.where

    # -- writing ---------------------------------------------------------------------------
    def enqueue(
        self,
        items: Sequence[tuple[str, Message]],
        *,
        origin: Message | None = None,
        events: Sequence[Event] = (),
    ) -> list[str]:
        """Add each ``(queue, message)`` as a pending entry in one transaction; committed (and
        flushed to the server's WAL) on return. Its history (``queued`` events, ``events``) goes
        in the same transaction.

        Raises ``TypeError`` when a message is not JSON-serialisable (nothing is stored then).
        """
        now = time.time()
        rows: list[tuple[Any, ...]] = []
        refs: list[str] = []
        encoded: dict[int, tuple[str, list[str]]] = {}
        recorded = history.History(self._schema, events)
        if origin is not None:
            recorded.new(origin)
        for queue, message in items:
            key = id(message)
            if key not in encoded:
                encoded[key] = (_encode_message(message), _distinct(message.files))
            text, files = encoded[key]
            message_id = origin.id if origin is not None else recorded.new(message)
            rows.append((uuid.uuid4().hex, queue, _PENDING, now, now, now, files, text, message_id))
            refs.extend(files)
            recorded.add(Event(message_id, now, EventKind.QUEUED, queue))
        if not rows:
            return []

        def work(conn: Connection) -> None:
            with conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO {self._entries} (id, queue, state, next_attempt_at, created_at,"
                    " updated_at, files, message, message_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    rows,
                )
            self._add_refs(conn, refs)
            recorded.write(conn, now)

        self._db.run(work)
        return [row[0] for row in rows]

    def record_error(self, message: Message, queue: str, reason: str) -> str:
        """Keep a message the pipeline failed on as ``errored`` with ``reason``; it holds its files."""
        now = time.time()
        files = _distinct(message.files)
        entry_id = uuid.uuid4().hex
        attempts = Jsonb([attempt_record(now, reason)])
        text = _encode_message(message)
        recorded = history.History(
            self._schema, [Event(message.id, now, EventKind.ERRORED, queue, detail=capped(reason))]
        )
        recorded.new(message)

        def work(conn: Connection) -> None:
            conn.execute(
                f"INSERT INTO {self._entries} (id, queue, state, next_attempt_at, created_at, updated_at,"
                " last_error, history, files, message, message_id)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (entry_id, queue, _ERRORED, now, now, now, reason, attempts, files, text, message.id),
            )
            self._add_refs(conn, files)
            recorded.write(conn, now)

        self._db.run(work)
        return entry_id

    def record(self, message: Message, events: Sequence[Event]) -> None:
        """Create or update ``message``'s history record and add ``events``, in one transaction."""
        recorded = history.History(self._schema, events)
        recorded.new(message)
        now = time.time()
        self._db.run(lambda conn: recorded.write(conn, now))

    def claim(
        self, queue: str, now: float | None = None, *, lease_s: float = DEFAULT_LEASE_S
    ) -> Entry | None:
        """An entry of ``queue`` whose lease expired, else the oldest due pending one, leased to
        this node until ``now + lease_s``. Rows other nodes are claiming are skipped, not waited for.
        """
        now = time.time() if now is None else now
        expires = now + lease_s

        def work(conn: Connection) -> dict[str, Any] | None:
            # The row is found and locked by the sub-select (evaluated once), skipping rows other
            # nodes are claiming, and changed by the UPDATE: one statement, one round trip.
            row = conn.execute(
                f"UPDATE {self._entries} SET lease_owner = %s, lease_expires_at = %s, updated_at = %s,"
                " history = history || jsonb_build_array(jsonb_build_object('at', %s::float8,"
                " 'status', 'note', 'code', NULL, 'detail', 'the lease of '"
                " || coalesce(lease_owner, 'an older intu') || ' expired; sending again'))"
                f" WHERE seq = (SELECT seq FROM {self._entries} WHERE queue = %s AND state = '{_IN_FLIGHT}'"
                "  AND lease_expires_at < %s ORDER BY lease_expires_at LIMIT 1 FOR UPDATE SKIP LOCKED)"
                f" RETURNING {_COLUMNS}",
                (self.node_id, expires, now, now, queue, now),
            ).fetchone()
            if row is not None:
                self._count(conn, queue, "recovered", 1)
                return row
            return conn.execute(
                f"UPDATE {self._entries} SET state = '{_IN_FLIGHT}', lease_owner = %s,"
                " lease_expires_at = %s, updated_at = %s"
                f" WHERE seq = (SELECT seq FROM {self._entries} WHERE queue = %s AND state = '{_PENDING}'"
                "  AND next_attempt_at <= %s ORDER BY next_attempt_at, seq LIMIT 1 FOR UPDATE SKIP LOCKED)"
                f" RETURNING {_COLUMNS}",
                (self.node_id, expires, now, queue, now),
            ).fetchone()

        row = self._db.run(work, durable=False)
        return _entry(row) if row is not None else None

    def renew(self, entry_ids: Sequence[str], lease_s: float = DEFAULT_LEASE_S) -> int:
        """Extend this node's leases on ``entry_ids`` to ``lease_s`` from now; how many it holds."""
        if not entry_ids:
            return 0

        def work(conn: Connection) -> int:
            cur = conn.execute(
                f"UPDATE {self._entries} SET lease_expires_at = %s WHERE id = ANY(%s)"
                f" AND state = '{_IN_FLIGHT}' AND lease_owner = %s",
                (time.time() + lease_s, list(entry_ids), self.node_id),
            )
            return cur.rowcount

        return self._db.run(work, durable=False)

    def complete(self, entry_id: str, result: SendResult | None = None) -> bool:
        """Delivered: delete the entry, count it, and delete files no other entry needs."""

        def work(conn: Connection) -> list[str] | None:
            now = time.time()
            row = conn.execute(
                f"DELETE FROM {self._entries} WHERE id = %s AND state = '{_IN_FLIGHT}' AND lease_owner = %s"
                " RETURNING queue, files, message_id, attempts",
                (entry_id, self.node_id),
            ).fetchone()
            if row is None:
                return None
            self._count(conn, row["queue"], "delivered", 1)
            unused = self._release(conn, [row["files"]])
            if row["message_id"] and not row["queue"].startswith(CHANNEL_QUEUE_PREFIX):
                # A channel's replayed entry is not a delivery (see the SQLite backend).
                event = Event.of_send(
                    row["message_id"], now, EventKind.DELIVERED, row["queue"],
                    result or SendResult.success(), row["attempts"] + 1,
                )  # fmt: skip
                history.History(self._schema, [event]).write(conn, now)
            return unused

        unused = self._db.run(work)
        if unused is None:
            return False
        _unlink(unused)
        return True

    def retry_later(self, entry_id: str, result: SendResult | str, at: float) -> bool:
        """Back to pending from ``at`` with one more attempt recorded in the history."""
        return self._settle(entry_id, result, _PENDING, at, (_IN_FLIGHT,))

    def dead_letter(self, entry_id: str, result_or_reason: SendResult | str) -> bool:
        """State dead with the reason. A ``SendResult`` counts as an attempt; text is a note."""
        return self._settle(entry_id, result_or_reason, _DEAD, None, (_IN_FLIGHT, _PENDING))

    def _settle(
        self,
        entry_id: str,
        result: SendResult | str,
        state: str,
        at: float | None,
        from_states: tuple[str, ...],
    ) -> bool:
        now = time.time()
        record = attempt_record(now, result)
        tried = 1 if isinstance(result, SendResult) else 0

        def work(conn: Connection) -> bool:
            # An in-flight entry is settled by the node holding it: after its lease expired and
            # another node took it, a late result of the first send must not undo the second.
            row = conn.execute(
                f"SELECT history, next_attempt_at, queue, message_id, attempts FROM {self._entries}"
                f" WHERE id = %s AND state = ANY(%s) AND (state != '{_IN_FLIGHT}' OR lease_owner = %s)"
                " FOR UPDATE",
                (entry_id, list(from_states), self.node_id),
            ).fetchone()
            if row is None:
                return False
            if row["message_id"]:
                kind = EventKind.ATTEMPT if state == _PENDING else EventKind.DEAD
                attempt = row["attempts"] + 1 if tried else None
                event = Event.of_send(row["message_id"], now, kind, row["queue"], result, attempt)
                history.History(self._schema, [event]).write(conn, now)
            attempts = [*row["history"], record][-HISTORY_LIMIT:]
            conn.execute(
                f"UPDATE {self._entries} SET state = %s, attempts = attempts + %s, next_attempt_at = %s,"
                " updated_at = %s, last_error = %s, history = %s, lease_owner = NULL,"
                " lease_expires_at = NULL WHERE id = %s",
                (
                    state,
                    tried,
                    row["next_attempt_at"] if at is None else at,
                    now,
                    record["detail"] or record["status"],
                    Jsonb(attempts),
                    entry_id,
                ),
            )
            return True

        return self._db.run(work)

    def release_files(self, paths: Sequence[str]) -> int:
        """Delete those of ``paths`` that no entry refers to; returns how many were deleted.

        Only after the database said so: when it cannot be reached this raises
        ``QueueUnavailable`` and deletes nothing (an enqueue whose commit was lost on the way may
        still refer to them). A node releases only files of its own data folder (its spool), and
        only after its own enqueue of them returned, so no other node can add a reference to one
        between the look-up and the unlink.
        """
        return _unlink(self.unreferenced(paths))

    def unreferenced(self, paths: Sequence[str]) -> list[str]:
        """Those of ``paths`` that no entry refers to, through the ``files`` table (the engine's
        start-up sweep asks this of its own spool; it never reads every entry)."""
        wanted = _distinct(paths)
        if not wanted:
            return []

        def work(conn: Connection) -> set[str]:
            rows = conn.execute(f"SELECT path FROM {self._files} WHERE path = ANY(%s)", (wanted,)).fetchall()
            return {row["path"] for row in rows}

        referenced = self._db.run(work)
        return [p for p in wanted if p not in referenced]

    def recover(self) -> int:
        """At startup: in-flight entries of this node (a crash between send and record), or whose
        lease has expired, back to pending; each counted in its queue's ``recovered`` counter.
        Entries leased by other live nodes are left alone."""
        now = time.time()
        note = Jsonb([attempt_record(now, "in flight when the engine stopped; sending again")])

        def work(conn: Connection) -> int:
            rows = conn.execute(
                f"UPDATE {self._entries} SET state = '{_PENDING}', updated_at = %s, lease_owner = NULL,"
                " lease_expires_at = NULL, history = history || %s"
                f" WHERE state = '{_IN_FLIGHT}'"
                "  AND (lease_owner = %s OR lease_owner IS NULL OR lease_expires_at < %s) RETURNING queue",
                (now, note, self.node_id, now),
            ).fetchall()
            per_queue: dict[str, int] = {}
            for row in rows:
                per_queue[row["queue"]] = per_queue.get(row["queue"], 0) + 1
            for queue, n in sorted(per_queue.items()):
                self._count(conn, queue, "recovered", n)
            return len(rows)

        return self._db.run(work)

    def retry(
        self,
        queue: str | None = None,
        entry_ids: Sequence[str] | None = None,
        state: EntryState | None = EntryState.DEAD,
    ) -> int:
        """Dead or errored entries back to pending now, attempts reset; returns how many.

        ``state`` narrows to dead or to errored entries (None: both); errored entries of a
        channel's queue are run through the channel again by a running engine's replay worker.
        """
        where, params = _filters(queue, entry_ids, retryable_states(state))
        now = time.time()
        note = Jsonb([attempt_record(now, "retried by an operator")])

        def work(conn: Connection) -> int:
            rows = conn.execute(
                f"UPDATE {self._entries} SET state = '{_PENDING}', attempts = 0, next_attempt_at = %s,"
                f" updated_at = %s, history = history || %s WHERE {where} RETURNING queue, message_id",
                (now, now, note, *params),
            ).fetchall()
            history.operator_events(
                self._schema, rows, EventKind.RETRIED, "retried by an operator", now
            ).write(conn, now)
            return len(rows)

        return self._db.run(work)

    def purge(
        self,
        queue: str | None = None,
        state: EntryState | None = None,
        entry_ids: Sequence[str] | None = None,
    ) -> int:
        """Delete matching entries (never in-flight ones) and release their files; how many."""
        if state is EntryState.IN_FLIGHT:
            raise ValueError("in-flight entries cannot be purged; wait until they are settled")
        states = (state.value,) if state is not None else (_PENDING, _DEAD, _ERRORED)
        where, params = _filters(queue, entry_ids, states)

        def work(conn: Connection) -> tuple[int, list[str]]:
            now = time.time()
            rows = conn.execute(
                f"DELETE FROM {self._entries} WHERE {where} RETURNING files, queue, message_id", params
            ).fetchall()
            unused = self._release(conn, [r["files"] for r in rows])
            history.operator_events(self._schema, rows, EventKind.PURGED, "purged by an operator", now).write(
                conn, now
            )
            return len(rows), unused

        count, unused = self._db.run(work)
        _unlink(unused)
        return count

    # -- reading ---------------------------------------------------------------------------
    def next_due(self, queue: str) -> float | None:
        row = self._db.run(
            lambda conn: conn.execute(
                f"SELECT min(next_attempt_at) AS due FROM {self._entries}"
                f" WHERE queue = %s AND state = '{_PENDING}'",
                (queue,),
            ).fetchone()
        )
        return None if row is None else row["due"]

    def size(self, queue: str) -> int:
        row = self._db.run(
            lambda conn: conn.execute(
                f"SELECT count(*) AS n FROM {self._entries} WHERE queue = %s"
                f" AND state IN ('{_PENDING}', '{_IN_FLIGHT}')",
                (queue,),
            ).fetchone()
        )
        return 0 if row is None else int(row["n"])

    def stats(self) -> list[QueueStats]:
        now = time.time()

        def work(conn: Connection) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            groups = conn.execute(
                f"SELECT queue, state, count(*) AS n, min(created_at) AS oldest FROM {self._entries}"
                " GROUP BY queue, state"
            ).fetchall()
            counters = conn.execute(
                f"SELECT queue, name, sum(value) AS value FROM {self._counters} GROUP BY queue, name"
            ).fetchall()
            return groups, counters

        groups, counters = self._db.run(work, snapshot=True)
        acc: dict[str, dict[str, Any]] = {}
        for row in groups:
            item = acc.setdefault(row["queue"], {})
            item[row["state"]] = row["n"]
            if row["state"] in (_PENDING, _IN_FLIGHT):
                oldest = item.get("oldest")
                item["oldest"] = row["oldest"] if oldest is None else min(oldest, row["oldest"])
        for row in counters:
            acc.setdefault(row["queue"], {})[row["name"]] = int(row["value"])
        return [
            QueueStats(
                queue=queue,
                pending=item.get(_PENDING, 0),
                in_flight=item.get(_IN_FLIGHT, 0),
                dead=item.get(_DEAD, 0),
                errored=item.get(_ERRORED, 0),
                oldest_age_s=None if item.get("oldest") is None else max(0.0, now - item["oldest"]),
                delivered=item.get("delivered", 0),
                recovered=item.get("recovered", 0),
            )
            for queue, item in sorted(acc.items())
        ]

    def get(self, entry_id: str) -> Entry | None:
        row = self._db.run(
            lambda conn: conn.execute(
                f"SELECT {_COLUMNS} FROM {self._entries} WHERE id = %s", (entry_id,)
            ).fetchone()
        )
        return _entry(row) if row is not None else None

    def list_entries(
        self, queue: str | None = None, state: EntryState | None = None, limit: int = 100
    ) -> list[Entry]:
        """Entries in enqueue order, optionally of one queue and one state."""
        where, params = _filters(queue, None, (state.value,) if state is not None else None)
        rows = self._db.run(
            lambda conn: conn.execute(
                f"SELECT {_COLUMNS} FROM {self._entries} WHERE {where} ORDER BY seq LIMIT %s",
                (*params, limit),
            ).fetchall()
        )
        return [_entry(row) for row in rows]

    # -- history -----------------------------------------------------------------------------
    def find_messages(self, query: MessageQuery) -> list[MessageRecord]:
        """The records matching ``query``, newest received first."""
        return self._db.run(lambda conn: history.find_messages(conn, self._schema, query))

    def journey(self, message_id: str) -> Journey | None:
        """The record of ``message_id``, its events oldest first, and its entries still queued."""
        return self._db.run(lambda conn: history.journey(conn, self._schema, message_id), snapshot=True)

    def expire_history(self, older_than: float) -> int:
        """Delete records last updated before ``older_than`` whose message has no entry left, with
        their events; how many. In batches of short transactions."""
        total = 0
        while True:
            deleted = self._db.run(lambda conn: history.expire(conn, self._schema, older_than))
            total += deleted
            if deleted < history.EXPIRE_BATCH:
                return total

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> PostgresQueueStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers that run inside a transaction ---------------------------------------------
    def _add_refs(self, conn: Connection, paths: list[str]) -> None:
        if paths:
            # Sorted: two transactions adding the same files lock their rows in the same order.
            conn.execute(
                f"INSERT INTO {self._files} AS f (path, refs) SELECT p, count(*) FROM unnest(%s::text[]) p"
                " GROUP BY p ORDER BY p ON CONFLICT (path) DO UPDATE SET refs = f.refs + excluded.refs",
                (sorted(paths),),
            )

    def _release(self, conn: Connection, file_lists: Iterable[list[str]]) -> list[str]:
        """Drop one reference per listed file; the files no entry needs any more (to delete after
        the commit)."""
        paths = sorted(path for files in file_lists for path in files)
        if not paths:
            return []
        conn.execute(
            f"UPDATE {self._files} f SET refs = f.refs - d.n FROM (SELECT p, count(*) AS n"
            " FROM unnest(%s::text[]) p GROUP BY p) d WHERE f.path = d.p",
            (paths,),
        )
        rows = conn.execute(
            f"DELETE FROM {self._files} WHERE refs <= 0 AND path = ANY(%s) RETURNING path", (paths,)
        ).fetchall()
        return [row["path"] for row in rows]

    def _count(self, conn: Connection, queue: str, name: str, n: int) -> None:
        conn.execute(
            f"INSERT INTO {self._counters} AS c (queue, name, node, value) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (queue, name, node) DO UPDATE SET value = c.value + excluded.value",
            (queue, name, self.node_id, n),
        )


# -- helpers -------------------------------------------------------------------------------
def _encode_message(message: Message) -> str:
    try:
        return json.dumps(message.to_json(), separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"message {message.id} cannot be queued: its body or metadata is not JSON-serialisable ({exc})"
        ) from exc


def _distinct(paths: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(str(p) for p in paths))


def _unlink(paths: Iterable[str]) -> int:
    # After the commit: a crash here leaves an orphan file, never an entry without its file.
    deleted = 0
    for path in paths:
        try:
            os.unlink(path)
            deleted += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not delete %s, which no queued message needs any more: %s", path, exc)
    return deleted


def _filters(
    queue: str | None, entry_ids: Sequence[str] | None, states: Sequence[str] | None
) -> tuple[str, tuple[Any, ...]]:
    clauses: list[str] = []
    params: list[Any] = []
    if queue is not None:
        clauses.append("queue = %s")
        params.append(queue)
    if entry_ids is not None:
        clauses.append("id = ANY(%s)")
        params.append(list(entry_ids))
    if states is not None:
        clauses.append("state = ANY(%s)")
        params.append(list(states))
    return (" AND ".join(clauses) or "TRUE"), tuple(params)


def _entry(row: dict[str, Any]) -> Entry:
    return Entry(
        id=row["id"],
        queue=row["queue"],
        message=Message.from_json(json.loads(row["message"])),
        state=EntryState(row["state"]),
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_error=row["last_error"],
        history=tuple(row["history"]),
        lease_owner=row["lease_owner"],
        lease_expires_at=row["lease_expires_at"],
    )


__all__ = ["HISTORY_LIMIT", "PostgresQueueStore"]
