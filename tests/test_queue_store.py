"""The SQLite queue backend: the queue contract, plus what only SQLite has (WAL, fsync, schema
upgrades, a full database, its registration and settings)."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest

from intu_core.config.problems import ConfigError
from intu_core.config.project import load_project
from intu_core.fsutil import GroupSync
from intu_core.history import PROBLEM_STATUSES, MessageQuery
from intu_core.message import AcceptanceStatus, Message, SendResult
from intu_core.queue import EntryState, QueueDamaged, QueueNotFound, QueueStore, QueueUnavailable
from intu_core.queue import sqlite as sqlite_backend
from intu_core.queue.opener import open_queue
from intu_core.queue.sqlite import DB_NAME, SCHEMA_VERSION, WRITE_LOCK_NAME, SqliteQueueStore, SqliteSettings
from intu_core.testing import engine_deliver, manual_source, registry_with, running_engine
from intu_core.testing.queue_contract import QueueContract, msg


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class TestSqliteQueueStore(QueueContract):
    """The contract every backend passes, run on SQLite."""

    def open_store(self, place: Path, *, node_id: str | None = None) -> QueueStore:
        return SqliteQueueStore(place, node_id=node_id)


@pytest.fixture
def store(tmp_path: Path):
    s = SqliteQueueStore(tmp_path / "data")
    yield s
    s.close()


def test_a_long_read_does_not_hold_up_writes(store: SqliteQueueStore) -> None:
    """A search of the history (an operator, the dashboard) may walk the whole table: the writes
    it would hold up include the enqueue a C-STORE's answer waits for. Reads have a connection of
    their own; here one is kept in the middle of a statement (its read transaction open) while
    another thread enqueues, which must not wait for it."""
    for n in range(3):
        store.enqueue([("q", msg(n))])
    done = threading.Event()
    ids: list[str] = []

    def enqueue() -> None:
        ids.extend(store.enqueue([("q", msg(99))]))
        done.set()

    with store._read() as c:
        rows = c.execute("SELECT id FROM entries ORDER BY seq")
        assert rows.fetchone() is not None  # a statement in progress: its snapshot is held
        writer = threading.Thread(target=enqueue)
        writer.start()
        assert done.wait(30), "the enqueue waited for the read"
        assert len(rows.fetchall()) == 2  # the read still sees its own snapshot
    writer.join()
    assert [e.id for e in store.list_entries("q")][-1:] == ids  # and the next read the new entry


def test_an_operators_long_read_does_not_hold_up_the_engines_reads(store: SqliteQueueStore) -> None:
    """The engine reads too on a message's way in (the queue depth its admission checks, when
    the next entry is due) and the health checks read the counts (`/readyz`): those have
    connections of their own, so that they do not wait behind an operator's search either."""
    for n in range(3):
        store.enqueue([("q", msg(n))])
    answers: list[object] = []
    done = threading.Event()

    def engine_reads() -> None:
        answers.extend([store.size("q"), store.next_due("q") is not None, store.stats()[0].pending])
        done.set()

    with store._read(store._operator_reads) as c:
        rows = c.execute("SELECT id FROM messages ORDER BY received_at")
        assert rows.fetchone() is not None  # an operator's statement in progress
        reader = threading.Thread(target=engine_reads)
        reader.start()
        assert done.wait(30), "the engine's reads waited for the operator's"
    reader.join()
    assert answers == [3, True, 3]


def test_counting_every_entry_does_not_hold_up_the_engines_reads(store: SqliteQueueStore) -> None:
    """The counts (``stats``: the dashboard, `/metrics`, `/readyz`) scan every entry, 22 ms for
    100,000 pending: admission's queue depth and the delivery's next due time do not wait."""
    for n in range(3):
        store.enqueue([("q", msg(n))])
    answers: list[object] = []
    done = threading.Event()

    def engine_reads() -> None:
        answers.extend([store.size("q"), store.next_due("q") is not None])
        done.set()

    with store._read(store._count_reads) as c:
        rows = c.execute("SELECT queue, state FROM entries")
        assert rows.fetchone() is not None  # a count in progress
        reader = threading.Thread(target=engine_reads)
        reader.start()
        assert done.wait(30), "the engine's reads waited for the counts"
    reader.join()
    assert answers == [3, True]


def test_a_store_that_is_closing_answers_no_more_reads(tmp_path: Path) -> None:
    """``close`` waits for an operator's read in progress; meanwhile the engine's reads fail as
    on a closed store, and are never run on the writing connection, which is still open."""
    store = SqliteQueueStore(tmp_path / "data")
    store.enqueue([("q", msg())])
    closer = threading.Thread(target=store.close)
    with store._read(store._operator_reads) as c:
        assert c.execute("SELECT count(*) FROM entries").fetchone()[0] == 1
        closer.start()
        wait_for(lambda: store._closed)
        with pytest.raises(sqlite3.ProgrammingError):
            store.size("q")
    closer.join(30)
    assert not closer.is_alive()
    with pytest.raises(sqlite3.ProgrammingError):
        store.find_messages(MessageQuery())


def test_a_read_that_fails_leaves_its_connection_ready_for_the_next(store: SqliteQueueStore) -> None:
    store.enqueue([("q", msg())])
    with pytest.raises(QueueUnavailable, match="no such column"), store._read() as c:
        c.execute("SELECT count(*) FROM entries").fetchone()
        c.execute("SELECT no_such_column FROM entries")
    with store._read() as c:  # a fresh block on the same connection
        assert c.execute("SELECT count(*) FROM entries").fetchone()[0] == 1
    store.enqueue([("q", msg(1))])
    assert store.size("q") == 2  # and sees what was committed since


def test_the_counts_are_read_from_one_snapshot(store: SqliteQueueStore) -> None:
    """``stats`` reads the entries and the counters in two statements: a delivery committed
    between them must not be seen by the second only (the entry counted twice, in flight and
    delivered). Here the delivery commits right when the second statement starts."""
    [entry_id] = store.enqueue([("q", msg())])
    assert store.claim("q") is not None
    completed: list[bool] = []

    def deliver_in_between(statement: str) -> None:
        if "FROM counters" in statement and not completed:
            completed.append(store.complete(entry_id))  # on the writing connection

    with store._read(store._count_reads) as c:  # open the counts' reading connection to trace it
        c.set_trace_callback(deliver_in_between)
    try:
        [stats] = store.stats()
    finally:
        with store._read(store._count_reads) as c:
            c.set_trace_callback(None)
    assert completed == [True]  # the delivery did commit in between
    assert (stats.in_flight, stats.delivered) == (1, 0)  # the state before it, whole
    [stats] = store.stats()
    assert (stats.in_flight, stats.delivered) == (0, 1)


def test_it_is_in_wal_mode_with_full_sync(store: SqliteQueueStore) -> None:
    # FULL's guarantee: every durable commit fsyncs the WAL before returning. The store commits
    # with NORMAL and runs that fsync itself (shared by concurrent writers): count the fsyncs.
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    conn.close()
    with store._lock:  # the writing connection's setting
        assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL, plus our fsync
    synced: list[int] = []
    real = store._wal_sync
    store._wal_sync = lambda: (synced.append(store.wal_path.stat().st_size), real())[1]  # type: ignore[method-assign]
    [entry_id] = store.enqueue([("q", msg(files=[str(store.data_dir / "a.dcm")]))])
    assert synced and synced[-1] > 0  # after the commit wrote its frames
    assert store.claim("q") is not None
    assert len(synced) == 1  # a claim is not fsynced
    store.release_files([str(store.data_dir / "a.dcm")])  # changes nothing: nothing to sync
    assert len(synced) == 1
    assert store.complete(entry_id)
    assert len(synced) == 2


def test_concurrent_commits_share_one_wal_fsync_taken_outside_the_lock(store: SqliteQueueStore) -> None:
    # Group commit: while one WAL fsync runs, other writers commit and queue up for the next one,
    # which covers them all; nobody returns before a fsync that started after its commit.
    real = store._wal_sync
    entered, release = threading.Event(), threading.Event()
    sizes: list[int] = []

    def held() -> None:
        sizes.append(store.wal_path.stat().st_size)
        if len(sizes) == 1:
            entered.set()
            assert release.wait(30)
        real()

    group = store._wal_sync = GroupSync(held)  # type: ignore[method-assign]
    done: list[int] = []

    def enqueue(n: int) -> None:
        store.enqueue([("q", msg(n))])
        done.append(n)

    first = threading.Thread(target=enqueue, args=(0,))
    first.start()
    assert entered.wait(30)
    assert store.claim("q") is not None  # the fsync holds no lock: delivery goes on meanwhile
    others = [threading.Thread(target=enqueue, args=(n,)) for n in range(1, 6)]
    for t in others:
        t.start()
    wait_for(lambda: group.waiting == 6)
    assert done == []
    release.set()
    for t in [first, *others]:
        t.join(30)
    assert sorted(done) == list(range(6))
    assert len(sizes) == 2  # six enqueues, two fsyncs
    assert sizes[1] >= store.wal_path.stat().st_size  # the second started after every commit
    assert {s.queue: s.pending + s.in_flight for s in store.stats()} == {"q": 6}


def test_a_failed_wal_fsync_fails_the_commits_it_covered_and_refuses_later_ones(tmp_path: Path) -> None:
    store = SqliteQueueStore(tmp_path / "data")

    def broken() -> None:
        raise OSError(errno.EIO, "Input/output error")

    store._wal_sync = GroupSync(broken)  # type: ignore[method-assign]
    with pytest.raises(QueueUnavailable, match="fsync of the queue's write-ahead log .* restart intu"):
        store.enqueue([("q", msg(1))])
    # Committed but not known durable: the sender was told it failed and sends again
    # (at-least-once). Later writes are refused before anything is committed.
    with pytest.raises(QueueUnavailable, match="restart intu"):
        store.enqueue([("q", msg(2))])
    assert [e.message.body["n"] for e in store.list_entries("q")] == [1]
    store.close()
    again = SqliteQueueStore(tmp_path / "data")  # a restart syncs afresh
    assert again.enqueue([("q", msg(3))])
    again.close()


def test_a_commit_whose_wal_sync_comes_after_the_store_closed_is_durable(tmp_path: Path) -> None:
    # The engine stopping closes the store while a receiver's commit waits for its WAL sync:
    # closing checkpointed that commit into the synced database and deleted the WAL.
    store = SqliteQueueStore(tmp_path / "data")
    store.enqueue([("q", msg(1))])
    store.close()
    assert not store.wal_path.exists()
    store._sync_wal()  # no error: nothing left to sync
    again = SqliteQueueStore(tmp_path / "data")
    assert [e.message.body["n"] for e in again.list_entries("q")] == [1]
    again.close()


def test_claims_look_up_entries_through_indexes(store: SqliteQueueStore) -> None:
    # A claim runs for every message sent: both its look-ups must be index searches, never scans
    # (expired leases are sorted, but among the in-flight entries of one queue only: a handful).
    with store._read() as c:
        plans = [
            " ".join(row[3] for row in c.execute(f"EXPLAIN QUERY PLAN {query}", params))
            for query, params in [
                (
                    "SELECT seq FROM entries WHERE queue = ? AND state = 'in_flight'"
                    " AND lease_expires_at < ? ORDER BY lease_expires_at LIMIT 1",
                    ("q", 0.0),
                ),
                (
                    "SELECT seq FROM entries WHERE queue = ? AND state = 'pending'"
                    " AND next_attempt_at <= ? ORDER BY next_attempt_at, seq LIMIT 1",
                    ("q", 0.0),
                ),
            ]
        ]
    assert all(
        p.startswith("SEARCH entries USING") and "entries_by_queue (queue=? AND state=?" in p for p in plans
    )
    assert "TEMP B-TREE" not in plans[1], plans


def test_the_node_id_is_kept_in_the_database(tmp_path: Path) -> None:
    first = SqliteQueueStore(tmp_path / "a")
    second = SqliteQueueStore(tmp_path / "b")
    assert first.node_id != second.node_id  # one per data folder
    first.close()
    second.close()
    (tmp_path / "a").rename(tmp_path / "moved")
    moved = SqliteQueueStore(tmp_path / "moved")
    assert moved.node_id == first.node_id  # stable when the folder moves
    moved.close()


def test_history_is_capped(store: SqliteQueueStore) -> None:
    [entry_id] = store.enqueue([("q", msg())])
    for i in range(60):
        e = store.claim("q", now=time.time() + 10)
        assert e is not None
        store.retry_later(e.id, SendResult.retryable(f"try {i}"), 0.0)
    e = store.get(entry_id)
    assert e is not None and e.attempts == 60 and len(e.history) == 50
    assert e.history[-1]["detail"] == "try 59"


# -- upgrading a database of an earlier intu -------------------------------------------------
V1_SCHEMA = """
CREATE TABLE entries (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, queue TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, last_error TEXT NOT NULL DEFAULT '', history TEXT NOT NULL DEFAULT '[]',
    files TEXT NOT NULL DEFAULT '[]', message TEXT NOT NULL
);
CREATE INDEX entries_by_queue ON entries (queue, state, next_attempt_at, seq);
CREATE TABLE files (path TEXT PRIMARY KEY, refs INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE counters (
    queue TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL, PRIMARY KEY (queue, name)
) WITHOUT ROWID;
PRAGMA user_version = 1;
"""


def write_v1_database(data_dir: Path, spooled: str) -> None:
    """A queue.db as intu 0.1 left it: a pending entry and one in flight when it was killed."""
    data_dir.mkdir(parents=True)
    conn = sqlite3.connect(data_dir / DB_NAME)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(V1_SCHEMA)
    now = time.time()
    for entry_id, state in (("old-pending", "pending"), ("old-flying", "in_flight")):
        message = Message(body={"id": entry_id}, files=(spooled,))
        conn.execute(
            "INSERT INTO entries (id, queue, state, next_attempt_at, created_at, updated_at, files, message)"
            " VALUES (?, 'pacs', ?, ?, ?, ?, ?, ?)",
            (entry_id, state, now, now, now, json.dumps([spooled]), json.dumps(message.to_json())),
        )
    conn.execute("INSERT INTO files VALUES (?, 2)", (spooled,))
    conn.execute("INSERT INTO counters VALUES ('pacs', 'delivered', 7)")
    conn.commit()
    conn.close()


def test_a_version_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    spooled = tmp_path / "spooled.dcm"
    spooled.write_bytes(b"DICM")
    data_dir = tmp_path / "data"
    write_v1_database(data_dir, str(spooled))

    store = SqliteQueueStore(data_dir)
    with store._read() as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    # What was in flight when the old engine stopped is sent again, as before leases.
    assert store.recover() == 1
    [stats] = store.stats()
    assert (stats.pending, stats.in_flight, stats.delivered, stats.recovered) == (2, 0, 7, 1)
    first, second = store.claim("pacs"), store.claim("pacs")
    assert first is not None and second is not None
    assert {first.id, second.id} == {"old-pending", "old-flying"}
    assert store.renew([first.id, second.id]) == 2
    assert store.complete(first.id, SendResult.success()) and store.complete(second.id, SendResult.success())
    assert not spooled.exists()  # the old reference counts carried over
    node = store.node_id
    store.close()
    again = SqliteQueueStore(data_dir)  # upgraded once: the same node, nothing to migrate
    assert again.node_id == node
    again.close()


def write_v2_database(data_dir: Path, spooled: Path) -> None:
    """A queue.db as intu 0.2 left it (absolute paths): one pending entry whose body names its
    spooled file as a path and as a ``file://`` URI, the way a DICOM body does."""
    SqliteQueueStore(data_dir).close()
    conn = sqlite3.connect(data_dir / DB_NAME)
    conn.execute("PRAGMA user_version = 2")
    conn.execute("DELETE FROM meta")
    conn.execute("INSERT INTO meta VALUES ('node_id', 'old-node')")
    body = {"file": str(spooled), "pixels": f"file://{spooled}?offset=10&length=4", "other": "/etc/hosts"}
    message = Message(body=body, files=(str(spooled),))
    now = time.time()
    conn.execute(
        "INSERT INTO entries (id, queue, state, next_attempt_at, created_at, updated_at, files, message)"
        " VALUES ('old', 'pacs', 'pending', ?, ?, ?, ?, ?)",
        (now, now, now, json.dumps([str(spooled)]), json.dumps(message.to_json())),
    )
    conn.execute("INSERT INTO files VALUES (?, 1)", (str(spooled),))
    conn.commit()
    conn.close()


@pytest.mark.parametrize("moved", [False, True])
def test_a_version_2_database_is_upgraded_to_paths_relative_to_the_data_folder(
    tmp_path: Path, moved: bool
) -> None:
    data_dir = tmp_path / "old" / "data"
    spooled = data_dir / "spool" / "router" / "a.dcm"
    spooled.parent.mkdir(parents=True)
    spooled.write_bytes(b"DICM")
    write_v2_database(data_dir, spooled)
    if moved:  # the project was moved before the new intu first opened it
        (tmp_path / "old").rename(tmp_path / "new")
        data_dir = tmp_path / "new" / "data"
        spooled = data_dir / "spool" / "router" / "a.dcm"

    store = SqliteQueueStore(data_dir)
    with store._read() as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        assert [tuple(r) for r in c.execute("SELECT path FROM files")] == [("spool/router/a.dcm",)]
        assert c.execute("SELECT files FROM entries").fetchone()[0] == '["spool/router/a.dcm"]'
    [entry] = store.list_entries()
    assert entry.message.files == (str(spooled),)
    assert entry.message.body == {
        "file": str(spooled),
        "pixels": f"file://{spooled}?offset=10&length=4",
        "other": "/etc/hosts",  # outside the data folder: as it was
    }
    assert store.node_id == "sqlite-old-node"
    assert store.unreferenced([str(spooled), str(data_dir / "spool" / "router" / "b.dcm")]) == [
        str(data_dir / "spool" / "router" / "b.dcm")
    ]
    claimed = store.claim("pacs")
    assert claimed is not None and store.complete(claimed.id)
    assert not spooled.exists()  # the reference count carried over, under the relative path
    store.close()


def write_v3_database(data_dir: Path) -> None:
    """A queue.db as intu 0.3 left it (no history): a pending entry and a dead letter."""
    data_dir.mkdir(parents=True)
    conn = sqlite3.connect(data_dir / DB_NAME)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(V1_SCHEMA)
    conn.executescript(sqlite_backend._MIGRATIONS[1])
    conn.execute("INSERT INTO meta VALUES ('node_id', 'v3-node')")
    now = time.time()
    for entry_id, state in (("old-pending", "pending"), ("old-dead", "dead")):
        message = Message(body={"id": entry_id}, id=f"msg-{entry_id}")
        conn.execute(
            "INSERT INTO entries (id, queue, state, next_attempt_at, created_at, updated_at, message)"
            " VALUES (?, 'pacs', ?, ?, ?, ?, ?)",
            (entry_id, state, now, now, now, json.dumps(message.to_json())),
        )
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()


def test_a_version_3_database_gets_the_history_tables(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    write_v3_database(data_dir)
    store = SqliteQueueStore(data_dir)
    with store._read() as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        indexes = {row[0] for row in c.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "messages_by_problem" in indexes  # v5
        rows = c.execute("SELECT id, message_id FROM entries ORDER BY seq").fetchall()
        assert [tuple(r) for r in rows] == [("old-pending", "msg-old-pending"), ("old-dead", "msg-old-dead")]
    assert store.node_id == "sqlite-v3-node"
    # Entries queued before the upgrade have no record; they are delivered and retried as before.
    assert store.journey("msg-old-pending") is None
    assert store.retry(entry_ids=["old-dead"]) == 1
    for _ in range(2):
        claimed = store.claim("pacs")
        assert claimed is not None and store.complete(claimed.id, SendResult.success())
    assert store.find_messages(MessageQuery()) == []
    new = Message(body={}, channel="ch")
    store.enqueue([("pacs", new)])
    journey = store.journey(new.id)
    assert journey is not None and journey.message.status == "queued"
    store.close()


def test_history_searches_use_indexes(store: SqliteQueueStore) -> None:
    with store._read() as c:
        plans = {
            column: " ".join(
                row[3]
                for row in c.execute(
                    f"EXPLAIN QUERY PLAN SELECT id FROM messages WHERE {column} = ?"
                    " ORDER BY received_at DESC, id LIMIT 100",
                    ("x",),
                )
            )
            for column in ("accession_number", "patient_id", "study_uid", "sop_instance_uid")
        }
        expire = " ".join(
            row[3]
            for row in c.execute(
                "EXPLAIN QUERY PLAN SELECT id FROM messages WHERE received_at < ? AND updated_at < ?"
                " AND entries = '[]' LIMIT 10",
                (0.0, 0.0),
            )
        )
        journey = " ".join(
            row[3]
            for row in c.execute(
                "EXPLAIN QUERY PLAN SELECT * FROM events WHERE message_id = ? ORDER BY seq", ("x",)
            )
        )
    assert all(plan.startswith("SEARCH messages USING INDEX") for plan in plans.values()), plans
    assert "messages_by_received" in expire, expire
    assert journey.startswith("SEARCH events USING PRIMARY KEY") and "TEMP B-TREE" not in journey, journey


def test_a_search_by_problem_status_goes_through_its_index(store: SqliteQueueStore) -> None:
    """The statements find_messages runs, planned by SQLite: a search for a rare status (dead,
    errored, partial) reads the partial index messages_by_problem instead of walking every record
    by reception time; other searches are as before. Their answers are the queue contract's."""
    statements: list[str] = []
    with store._read(store._operator_reads) as c:
        c.set_trace_callback(statements.append)
    try:
        for status in (*PROBLEM_STATUSES, "delivered", None):
            statements.clear()
            assert store.find_messages(MessageQuery(status=status)) == []
            [statement] = [s for s in statements if s.startswith("SELECT")]  # with its values filled in
            with store._read() as c:
                plan = " ".join(row[3] for row in c.execute(f"EXPLAIN QUERY PLAN {statement}"))
            if status in PROBLEM_STATUSES:
                assert plan.startswith("SEARCH messages USING INDEX messages_by_problem"), (status, plan)
            else:
                assert "messages_by_problem" not in plan, (status, plan)
    finally:
        with store._read(store._operator_reads) as c:
            c.set_trace_callback(None)


def test_the_problem_clause_is_the_index_condition_and_names_the_problem_statuses() -> None:
    # SQLite uses the partial index only for its condition word for word; the migration's text
    # is fixed once released, so a new problem status needs a new index (and migration).
    clause = sqlite_backend._PROBLEM_CLAUSE
    assert clause == "status IN ({})".format(", ".join(f"'{s}'" for s in PROBLEM_STATUSES))
    index = next(m for m in sqlite_backend._MIGRATIONS if "messages_by_problem" in m)
    assert f"WHERE {clause};" in index


def test_a_moved_data_folder_keeps_its_queue_and_files(tmp_path: Path) -> None:
    data_dir = tmp_path / "a" / "data"
    spooled = data_dir / "spool" / "router" / "with space.dcm"
    spooled.parent.mkdir(parents=True)
    spooled.write_bytes(b"DICM")
    uri = f"file://{quote(str(spooled))}?offset=0&length=4"
    with SqliteQueueStore(data_dir) as store:
        store.enqueue([("pacs", Message(body={"uri": uri, "file": str(spooled)}, files=(str(spooled),)))])
    (tmp_path / "a").rename(tmp_path / "b moved")
    data_dir = tmp_path / "b moved" / "data"
    spooled = data_dir / "spool" / "router" / "with space.dcm"
    with SqliteQueueStore(data_dir) as store:
        assert store.unreferenced([str(spooled)]) == []
        entry = store.claim("pacs")
        assert entry is not None
        assert entry.message.files == (str(spooled),)
        assert entry.message.body == {
            "uri": f"file://{quote(str(spooled))}?offset=0&length=4",
            "file": str(spooled),
        }
        assert store.complete(entry.id)
    assert not spooled.exists()


def test_files_outside_the_data_folder_are_kept_absolute(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.dcm"
    outside.write_bytes(b"DICM")
    with SqliteQueueStore(tmp_path / "data") as store:
        store.enqueue([("pacs", Message(body={"f": str(outside)}, files=(str(outside),)))])
        with store._read() as c:
            assert [tuple(r) for r in c.execute("SELECT path FROM files")] == [(str(outside),)]
        assert store.unreferenced([str(outside)]) == []
        [entry] = store.list_entries()
        assert entry.message.body == {"f": str(outside)}


def test_the_database_is_created_private_to_the_service_user(tmp_path: Path) -> None:
    with SqliteQueueStore(tmp_path / "data") as store:
        store.enqueue([("pacs", msg(1))])
        for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"):
            assert (tmp_path / "data" / name).stat().st_mode & 0o777 == 0o600, name
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("damage", ["empty-header", "header", "page"])
def test_a_damaged_database_is_refused_with_what_to_do(tmp_path: Path, damage: str) -> None:
    with SqliteQueueStore(tmp_path) as store:
        store.enqueue([("pacs", msg(n)) for n in range(200)])
    with open(tmp_path / DB_NAME, "r+b") as f:
        f.seek(4096 if damage == "page" else 0)
        f.write(b"\0" * 100 if damage == "empty-header" else b"junk" * 1024)
    with pytest.raises(QueueDamaged) as raised:
        SqliteQueueStore(tmp_path, check=True).close()
    text = str(raised.value)
    assert "is damaged" in text and "intu queue recover" in text and "restore" in text
    assert isinstance(raised.value, QueueUnavailable)  # callers that only know that one still cope


def test_a_database_of_a_newer_intu_is_refused(tmp_path: Path) -> None:
    SqliteQueueStore(tmp_path).close()
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer than this intu understands"):
        SqliteQueueStore(tmp_path)


# -- a full database -------------------------------------------------------------------------
def fill_up(store: SqliteQueueStore) -> None:
    """Make the database full as a full disk would: SQLite's own SQLITE_FULL at the next page
    (a setting of the writing connection)."""
    with store._lock:
        pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
        store._conn.execute(f"PRAGMA max_page_count = {pages}")


def test_a_full_database_is_unavailable_and_keeps_nothing_half_written(store: SqliteQueueStore) -> None:
    [kept] = store.enqueue([("q", msg(1))])
    fill_up(store)
    big = Message(body={"pad": "x" * 20_000})
    with pytest.raises(QueueUnavailable, match="full"):
        store.enqueue([("q", big), ("r", big)])
    with pytest.raises(QueueUnavailable):
        store.record_error(big, "q", "boom")
    assert [e.id for e in store.list_entries()] == [kept]  # reading still works
    entry = store.claim("q")  # and so do claims and results that need no new page
    assert entry is not None and store.complete(entry.id, SendResult.success())
    with store._lock:  # the disk has room again: the same store goes on, no reopening
        store._conn.execute("PRAGMA max_page_count = 1073741823")
    assert store.enqueue([("q", big)])


def test_queue_database_full_at_enqueue_answers_busy_and_releases_the_files(tmp_path: Path) -> None:
    """SQLite reports a full disk as ``sqlite3.OperationalError`` ("database or disk is full"), not
    as an OSError: the backend turns it into ``QueueUnavailable``, and the source must still answer
    "out of resources" (0xA700), not a processing failure, and keep no file of the refused message.
    The database is made full for real (``max_page_count``), not by a mock."""
    (tmp_path / "intu.yaml").write_text(
        "destinations:\n  archive:\n    type: file\n    file: {directory: out}\n"
        "    queue: {enabled: true, threads: 1}\n"
    )
    channel = tmp_path / "channels" / "inbound"
    channel.mkdir(parents=True)
    (channel / "channel.yaml").write_text("source: {type: manual}\ndestinations: [archive]\n")
    attachment = tmp_path / "attachment.bin"
    attachment.write_bytes(b"pixels")
    with running_engine(tmp_path, registry_with(manual_source)) as engine:
        assert isinstance(engine.store, SqliteQueueStore)
        fill_up(engine.store)
        body = {"pad": "x" * 20_000}
        result = engine_deliver(engine, "inbound", Message(body=body, files=(str(attachment),)))
    assert result.status is AcceptanceStatus.BUSY, result
    assert "cannot queue the message" in result.detail and "full" in result.detail
    assert not attachment.exists()


def test_a_result_that_cannot_be_recorded_for_a_while_is_recorded_later(tmp_path: Path) -> None:
    """Without retrying the record, the entry stayed in flight (never re-claimed) until a restart."""
    from intu_core.delivery import DeliveryWorkers, RetryPolicy

    class FlakyStore(SqliteQueueStore):
        failures = {"complete": 2, "retry_later": 2}

        def _maybe_fail(self, name: str) -> None:
            if self.failures[name] > 0:
                self.failures[name] -= 1
                raise QueueUnavailable("database or disk is full")

        def complete(self, entry_id, result=None):  # type: ignore[no-untyped-def]
            self._maybe_fail("complete")
            return super().complete(entry_id, result)

        def retry_later(self, entry_id, result, at):  # type: ignore[no-untyped-def]
            self._maybe_fail("retry_later")
            return super().retry_later(entry_id, result, at)

    class Destination:
        def __init__(self) -> None:
            self.sent: list[int] = []

        def send(self, message: Message) -> SendResult:
            self.sent.append(message.body["n"])
            if message.body["n"] == 2 and self.sent.count(2) == 1:
                return SendResult.retryable("busy", code=0xA700)
            return SendResult.success()

        def close(self) -> None:
            pass

    store = FlakyStore(tmp_path)
    destination = Destination()
    policy = RetryPolicy(max_attempts=0, backoff="constant", initial_delay_ms=10, max_delay_ms=10, jitter=0)
    workers = DeliveryWorkers(store, "pacs", destination, policy, 1, idle_recheck_s=60)  # type: ignore[arg-type]
    workers.start()
    try:
        store.enqueue([("pacs", Message(body={"n": n})) for n in (1, 2)])
        workers.notify()
        deadline = time.monotonic() + 10
        while store.size("pacs") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.size("pacs") == 0, "both entries recorded as delivered"
    finally:
        assert workers.stop(5)
        store.close()
    assert sorted(destination.sent) == [1, 2, 2], "no re-send of an entry that was already sent"


def test_opening_the_queue_does_not_write(tmp_path: Path) -> None:
    """`intu queue list` opens the store: it must neither need disk space nor wait for the
    engine's write lock (before the fix, every open ran a write transaction)."""
    SqliteQueueStore(tmp_path).close()
    engine = sqlite3.connect(tmp_path / "queue.db", isolation_level=None)
    engine.execute("BEGIN IMMEDIATE")  # the engine in the middle of a write
    try:
        started = time.monotonic()
        with SqliteQueueStore(tmp_path, busy_timeout_ms=300) as store:
            assert store.stats() == []
        assert time.monotonic() - started < 0.3
    finally:
        engine.execute("ROLLBACK")
        engine.close()


# -- writers in other processes ------------------------------------------------------------------
# Another process (the delivery process, an `intu queue` command) taking its turn to write: it
# holds the turn's lock until told to let go on stdin, and leaves a mark just before it does.
_TURN_HOLDER = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("holding", flush=True)
sys.stdin.readline()
open(sys.argv[2], "w").close()
os.close(fd)
"""


@contextmanager
def _turn_held_by_another_process(data_dir: Path) -> Iterator[Callable[[], None]]:
    """Yields ``let_go``; the process is killed on the way out whatever happened."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _TURN_HOLDER, str(data_dir / WRITE_LOCK_NAME), str(data_dir / "let-go")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None

    def let_go() -> None:
        assert holder.stdin is not None
        holder.stdin.write("go\n")
        holder.stdin.close()
        assert holder.wait(10) == 0

    try:
        assert holder.stdout.readline() == "holding\n"
        yield let_go
    finally:
        holder.kill()
        holder.wait(10)
        holder.stdout.close()
        if not holder.stdin.closed:
            holder.stdin.close()


def _turn_is_free(data_dir: Path) -> bool:
    """Another process can take the turn at once."""
    probe = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR);"
        " fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)"
    )
    return (
        subprocess.run([sys.executable, "-c", probe, str(data_dir / WRITE_LOCK_NAME)], check=False).returncode
        == 0
    )


def test_a_write_waits_while_another_process_writes_and_goes_once_it_is_done(tmp_path: Path) -> None:
    with SqliteQueueStore(tmp_path) as store, _turn_held_by_another_process(tmp_path) as let_go:
        done = threading.Event()
        failed: list[BaseException] = []

        def enqueue() -> None:
            try:
                store.enqueue([("pacs", msg(1))])
            except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
                failed.append(exc)
            done.set()

        writer = threading.Thread(target=enqueue)
        writer.start()
        try:
            assert not done.wait(0.3), "the enqueue waited for the other process's turn"
            assert store.size("pacs") == 0
            let_go()
        finally:
            writer.join(40)  # (at most the busy timeout, should letting go have failed)
        assert not writer.is_alive()
        assert failed == []
        assert (tmp_path / "let-go").exists(), "written after the other process let go, not before"
        assert store.size("pacs") == 1


def test_a_write_gives_up_after_the_busy_timeout_when_another_process_keeps_writing(tmp_path: Path) -> None:
    with SqliteQueueStore(tmp_path, busy_timeout_ms=200) as store:
        with _turn_held_by_another_process(tmp_path) as let_go:
            with pytest.raises(QueueUnavailable, match="busy_timeout_ms"):
                store.enqueue([("pacs", msg(2))])
            assert store.size("pacs") == 0, "nothing written"
            let_go()
        store.enqueue([("pacs", msg(3))])
        assert store.size("pacs") == 1


def test_the_turn_is_given_back_after_a_write_that_fails(store: SqliteQueueStore) -> None:
    store.enqueue([("pacs", msg(1))])
    with pytest.raises(ValueError, match="in the middle"), store._write() as conn:
        conn.execute("DELETE FROM entries")
        assert not _turn_is_free(store.data_dir)  # held while the transaction runs
        raise ValueError("in the middle")
    assert _turn_is_free(store.data_dir)
    assert store.size("pacs") == 1, "rolled back"


# Another intu process writing to the same queue as fast as it can (the delivery process, say).
_WRITER = r"""
import sys
from pathlib import Path
from intu_core.queue.sqlite import SqliteQueueStore
from intu_core.testing.queue_contract import msg
with SqliteQueueStore(Path(sys.argv[1])) as store:
    print("ready", flush=True)
    sys.stdin.readline()
    for n in range(int(sys.argv[2])):
        store.enqueue([("other", msg(n))])
"""


def test_two_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    count = 200
    with SqliteQueueStore(tmp_path) as store:
        other = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path), str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert other.stdin is not None and other.stdout is not None
            assert other.stdout.readline() == "ready\n"
            other.stdin.write("go\n")
            other.stdin.close()
            for n in range(count):
                store.enqueue([("here", msg(n))])
            assert other.wait(60) == 0
        finally:
            other.kill()
            other.wait(10)
            if other.stdout is not None:
                other.stdout.close()
        assert (store.size("here"), store.size("other")) == (count, count)


def test_writes_go_through_when_the_lock_file_cannot_be_made(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite's own wait is then all there is (as before the lock file), and a warning says so once."""
    (tmp_path / WRITE_LOCK_NAME).mkdir()  # cannot be opened as a file
    with SqliteQueueStore(tmp_path) as store:
        store.enqueue([("pacs", msg(4))])
        store.enqueue([("pacs", msg(5))])
        assert store.size("pacs") == 2
    warnings = [r.getMessage() for r in caplog.records if "write lock" in r.getMessage()]
    assert len(warnings) == 1 and "as SQLite does" in warnings[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can create a file another user owns")
def test_a_lock_file_root_creates_belongs_to_the_queues_owner(tmp_path: Path) -> None:
    """`sudo intu queue retry` before the engine's first write: the service user can still open
    the lock file (SQLite gives its -wal and -shm files to the database's owner the same way)."""
    SqliteQueueStore(tmp_path).close()
    os.chown(tmp_path / DB_NAME, 4242, 4343)  # the service user's, say
    with SqliteQueueStore(tmp_path) as store:
        store.enqueue([("pacs", msg())])
    lock = (tmp_path / WRITE_LOCK_NAME).stat()
    assert (lock.st_uid, lock.st_gid) == (4242, 4343)


# -- registration, settings and the opener ----------------------------------------------------
def project_at(tmp_path: Path, intu_yaml: str = ""):  # type: ignore[no-untyped-def]
    (tmp_path / "intu.yaml").write_text(intu_yaml)
    return load_project(tmp_path, registry_with())


def test_sqlite_is_the_default_backend_and_registers_like_any_plugin(tmp_path: Path) -> None:
    registry = registry_with()
    assert registry.queue_backends["sqlite"].plugin.distribution == "intu-core"
    project = project_at(tmp_path)
    assert project.queue.backend == "sqlite" and project.queue.settings == SqliteSettings()
    project = project_at(tmp_path, "queue: {backend: sqlite, busy_timeout_ms: 500}\n")
    assert project.queue.settings == SqliteSettings(busy_timeout_ms=500)


@pytest.mark.parametrize(
    ("intu_yaml", "expected"),
    [
        (
            "queue:\n  backend: sqlit\n",
            "intu.yaml:2: queue.backend: unknown queue type 'sqlit'; installed queue types: sqlite"
            " (intu-core) (did you mean 'sqlite'?)",
        ),
        (
            "queue:\n  backend: postgres\n  dsn: x\n",
            "intu.yaml:2: queue.backend: unknown queue type 'postgres'; installed queue types: sqlite"
            " (intu-core); install the plugin that provides it (e.g. pip install intu-postgres-queue)",
        ),
        (
            "queue:\n  busy_timeout: 10\n",
            "intu.yaml:2: queue.busy_timeout: unknown key 'busy_timeout' (did you mean 'busy_timeout_ms'?)",
        ),
        (
            "queue:\n  busy_timeout_ms: soon\n",
            "intu.yaml:2: queue.busy_timeout_ms: expected an integer of at least 0, found 'soon'",
        ),
    ],
)
def test_queue_settings_errors_say_where(tmp_path: Path, intu_yaml: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        project_at(tmp_path, intu_yaml)
    assert [str(p).replace(f"{tmp_path}/", "") for p in err.value.problems] == [expected]


def test_open_queue_creates_only_when_asked(tmp_path: Path) -> None:
    project = project_at(tmp_path)
    with pytest.raises(QueueNotFound, match="no queue database yet at"):
        open_queue(project, registry_with(), create=False)
    assert not project.data_dir.exists()  # looking creates nothing
    store = open_queue(project, registry_with())
    assert isinstance(store, SqliteQueueStore) and store.path == project.data_dir / DB_NAME
    store.enqueue([("q", msg())])
    store.close()
    looking = open_queue(project, registry_with(), create=False, node_id="operator")
    assert looking.node_id == "operator" and looking.list_entries()[0].state is EntryState.PENDING
    looking.close()


# -- the disk reserve ------------------------------------------------------------------------
def test_the_reserve_is_kept_released_on_a_full_disk_and_taken_again(tmp_path: Path, monkeypatch) -> None:
    import shutil
    from collections import namedtuple

    from intu_core.queue import reserve as reserve_module
    from intu_core.queue.reserve import RESERVE_NAME

    store = SqliteQueueStore(tmp_path, reserve_bytes=1024 * 1024)
    path = tmp_path / RESERVE_NAME
    assert path.stat().st_size == 1024 * 1024 and path.stat().st_blocks * 512 >= 1024 * 1024  # not sparse
    [entry_id] = store.enqueue([("q", msg(1))])
    assert store._reserve is not None and store._reserve.release()
    assert not path.exists()
    # While the disk has no room for it again, new messages are refused and delivery goes on.
    usage = namedtuple("usage", "total used free")
    real_disk_usage = shutil.disk_usage
    monkeypatch.setattr(reserve_module.shutil, "disk_usage", lambda _: usage(10, 10, 1024))
    with pytest.raises(QueueUnavailable, match="reserve is in use"):
        store.enqueue([("q", msg(2))])
    claimed = store.claim("q")
    assert claimed is not None and store.complete(claimed.id)
    assert not path.exists()
    monkeypatch.setattr(reserve_module.shutil, "disk_usage", real_disk_usage)
    assert store.enqueue([("q", msg(3))])  # room again: the reserve first, then the message
    assert path.stat().st_size == 1024 * 1024
    store.close()


def test_a_reserve_given_up_by_another_process_refuses_new_messages_here_too(
    tmp_path: Path, monkeypatch
) -> None:
    """The engine and its delivery process (``delivery: {process: true}``) each open the queue
    with the reserve. When the delivery process gives it up on a full disk, the engine, whose own
    reserve was never released, must see the file gone and refuse new messages too."""
    import shutil
    from collections import namedtuple

    from intu_core.queue import reserve as reserve_module
    from intu_core.queue.reserve import RESERVE_NAME

    engine = SqliteQueueStore(tmp_path, reserve_bytes=1024 * 1024)
    delivery = SqliteQueueStore(tmp_path, reserve_bytes=1024 * 1024)
    assert engine.enqueue([("q", msg(1))])
    assert delivery._reserve is not None and delivery._reserve.release()
    assert not (tmp_path / RESERVE_NAME).exists()
    assert engine._reserve is not None and not engine._reserve.released  # it did not see it go
    usage = namedtuple("usage", "total used free")
    real_disk_usage = shutil.disk_usage
    monkeypatch.setattr(reserve_module.shutil, "disk_usage", lambda _: usage(10, 10, 1024))
    with pytest.raises(QueueUnavailable, match="reserve is in use"):
        engine.enqueue([("q", msg(2))])
    monkeypatch.setattr(reserve_module.shutil, "disk_usage", real_disk_usage)
    assert engine.enqueue([("q", msg(3))])  # room again: the reserve first, then the message
    assert (tmp_path / RESERVE_NAME).stat().st_size == 1024 * 1024
    assert len(engine.list_entries()) == 2  # the first and the third
    engine.close()
    delivery.close()


def test_a_store_opened_for_looking_keeps_no_reserve(tmp_path: Path) -> None:
    from intu_core.queue.reserve import RESERVE_NAME

    project = tmp_path / "p"
    project.mkdir()
    (project / "intu.yaml").write_text("queue: {backend: sqlite, reserve_mb: 2}\n")
    loaded = load_project(project, registry_with())
    assert loaded.queue.settings == SqliteSettings(reserve_mb=2)
    open_queue(loaded, registry_with()).close()
    assert (loaded.data_dir / RESERVE_NAME).stat().st_size == 2 * 1024 * 1024
    (loaded.data_dir / RESERVE_NAME).unlink()
    open_queue(loaded, registry_with(), create=False).close()
    assert not (loaded.data_dir / RESERVE_NAME).exists()
