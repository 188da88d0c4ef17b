"""The SQLite queue store: durability, claiming, states, file reference counts."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from intu_core.message import Message, SendResult
from intu_core.queue import EntryState, QueueStore, channel_queue
from intu_core.queue.sqlite import SqliteQueueStore


@pytest.fixture
def store(tmp_path: Path):
    s = SqliteQueueStore(tmp_path / "data")
    yield s
    s.close()


def msg(n: int = 0, files: tuple[str, ...] = ()) -> Message:
    return Message(body={"n": n, "text": "é"}, channel="ch", metadata={"peer": "MOD1"}, files=files)


def make_file(tmp_path: Path, name: str) -> str:
    path = tmp_path / name
    path.write_bytes(b"DICM")
    return str(path)


def test_it_is_a_queue_store_in_wal_mode_with_full_sync(store: SqliteQueueStore) -> None:
    assert isinstance(store, QueueStore)
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    with store._read() as c:
        assert c.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_entries_survive_close_and_reopen(tmp_path: Path) -> None:
    store = SqliteQueueStore(tmp_path)
    ids = store.enqueue([("pacs", msg(1)), ("archive", msg(1))])
    store.close()

    again = SqliteQueueStore(tmp_path)
    entry = again.get(ids[0])
    assert entry is not None
    assert entry.queue == "pacs" and entry.state is EntryState.PENDING and entry.attempts == 0
    assert entry.message.body == {"n": 1, "text": "é"}
    assert entry.message.metadata == {"peer": "MOD1"}
    assert again.size("pacs") == 1 and again.size("archive") == 1
    claimed = again.claim("pacs")
    assert claimed is not None and claimed.id == ids[0] and claimed.state is EntryState.IN_FLIGHT
    again.close()


def test_claim_is_oldest_first_and_respects_next_attempt_at(store: SqliteQueueStore) -> None:
    ids = store.enqueue([("q", msg(i)) for i in range(3)])
    first = store.claim("q")
    assert first is not None and first.id == ids[0]
    store.retry_later(first.id, SendResult.retryable("busy"), at=time.time() + 60)
    assert [store.claim("q").id, store.claim("q").id] == ids[1:]  # type: ignore[union-attr]
    assert store.claim("q") is None
    assert store.next_due("q") == pytest.approx(time.time() + 60, abs=5)
    later = store.claim("q", now=time.time() + 61)
    assert later is not None and later.id == ids[0] and later.attempts == 1
    assert store.next_due("q") is None
    assert store.claim("other") is None


def test_recover_after_a_crash_puts_in_flight_entries_back(tmp_path: Path) -> None:
    store = SqliteQueueStore(tmp_path)
    ids = store.enqueue([("q", msg(i)) for i in range(3)])
    assert store.claim("q") is not None
    assert store.claim("q") is not None
    # Simulate kill -9: the connection goes away without any further bookkeeping.
    store._conn.close()

    again = SqliteQueueStore(tmp_path)
    assert again.recover() == 2
    assert again.recover() == 0
    assert [e.state for e in again.list_entries("q")] == [EntryState.PENDING] * 3
    assert again.claim("q").id == ids[0]  # type: ignore[union-attr]
    [stats] = again.stats()
    assert stats.recovered == 2 and stats.in_flight == 1 and stats.pending == 2
    again.close()


def test_concurrent_claims_never_hand_out_an_entry_twice(store: SqliteQueueStore) -> None:
    total = 400
    store.enqueue([("q", msg(i)) for i in range(total)])
    claimed: list[list[str]] = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def worker(i: int) -> None:
        start.wait()
        while (entry := store.claim("q")) is not None:
            claimed[i].append(entry.id)
            store.complete(entry.id, SendResult.success())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [e for c in claimed for e in c]
    assert len(every) == total and len(set(every)) == total
    assert store.size("q") == 0
    assert store.stats()[0].delivered == total


def test_claims_from_two_processes_worth_of_connections(tmp_path: Path) -> None:
    # Two stores on one database behave like the engine and `intu queue` in another process.
    a, b = SqliteQueueStore(tmp_path), SqliteQueueStore(tmp_path)
    a.enqueue([("q", msg(i)) for i in range(50)])
    got: list[str] = []
    lock = threading.Lock()

    def drain(s: SqliteQueueStore) -> None:
        while (entry := s.claim("q")) is not None:
            with lock:
                got.append(entry.id)

    threads = [threading.Thread(target=drain, args=(s,)) for s in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 50 == len(set(got))
    a.close()
    b.close()


def test_files_are_deleted_after_the_last_entry_completes(tmp_path: Path, store: SqliteQueueStore) -> None:
    f = make_file(tmp_path, "instance.dcm")
    ids = store.enqueue([("pacs", msg(1, (f,))), ("archive", msg(1, (f,)))])
    e1 = store.claim("pacs")
    assert e1 is not None and store.complete(e1.id, SendResult.success())
    assert Path(f).exists()  # the archive copy still needs it
    e2 = store.claim("archive")
    assert e2 is not None and e2.id == ids[1]
    assert store.complete(e2.id, SendResult.success())
    assert not Path(f).exists()
    assert store.complete(e2.id, SendResult.success()) is False  # already gone: nothing happens


def test_files_are_deleted_after_the_last_entry_is_purged(tmp_path: Path, store: SqliteQueueStore) -> None:
    f = make_file(tmp_path, "a.dcm")
    store.enqueue([("pacs", msg(1, (f,))), ("archive", msg(1, (f,)))])
    e = store.claim("pacs")
    assert e is not None
    store.dead_letter(e.id, SendResult.permanent("rejected", code=0xA900))
    assert store.purge(queue="pacs") == 1
    assert Path(f).exists()
    # An in-flight entry is never purged.
    assert store.claim("archive") is not None
    assert store.purge(queue="archive") == 0
    assert Path(f).exists()
    with pytest.raises(ValueError):
        store.purge(state=EntryState.IN_FLIGHT)


def test_dead_and_errored_entries_keep_their_files(tmp_path: Path, store: SqliteQueueStore) -> None:
    f, g = make_file(tmp_path, "f.dcm"), make_file(tmp_path, "g.dcm")
    store.enqueue([("pacs", msg(1, (f,)))])
    e = store.claim("pacs")
    assert e is not None
    store.dead_letter(e.id, SendResult.permanent("no"))
    err_id = store.record_error(msg(2, (g,)), channel_queue("router"), "Traceback ...\nKeyError: 'x'")
    assert Path(f).exists() and Path(g).exists()
    # Files of entries are not released by the engine's hand-over clean-up, others are.
    other = make_file(tmp_path, "filtered.dcm")
    assert store.release_files([f, g, other]) == 1
    assert Path(f).exists() and Path(g).exists() and not Path(other).exists()
    errored = store.get(err_id)
    assert errored is not None and errored.state is EntryState.ERRORED
    assert errored.last_error.endswith("KeyError: 'x'")
    assert store.purge(state=EntryState.ERRORED) == 1
    assert not Path(g).exists() and Path(f).exists()


def test_retry_later_records_history_and_attempts(store: SqliteQueueStore) -> None:
    [entry_id] = store.enqueue([("q", msg())])
    for n in range(1, 3):
        e = store.claim("q", now=time.time() + 3600 * n)
        assert e is not None and e.attempts == n - 1
        assert store.retry_later(e.id, SendResult.retryable(f"busy {n}", code=0xA700), time.time())
    e = store.get(entry_id)
    assert e is not None and e.state is EntryState.PENDING and e.attempts == 2
    assert [h["detail"] for h in e.history] == ["busy 1", "busy 2"]
    assert e.history[0]["status"] == "retryable" and e.history[0]["code"] == 0xA700
    assert e.last_error == "busy 2"
    # Not in flight any more: a late result changes nothing.
    assert store.retry_later(entry_id, SendResult.retryable("late"), time.time()) is False
    assert store.complete(entry_id) is False


def test_dead_letter_and_retry(store: SqliteQueueStore) -> None:
    ids = store.enqueue([("q", msg(i)) for i in range(3)])
    for _ in range(2):
        e = store.claim("q")
        assert e is not None
        store.dead_letter(e.id, SendResult.permanent("unknown SOP class", code=0xA900))
    dead = store.list_entries("q", EntryState.DEAD)
    assert [d.id for d in dead] == ids[:2]
    assert dead[0].attempts == 1 and dead[0].last_error == "unknown SOP class"
    assert store.dead_letter(ids[2], "destination removed from intu.yaml")  # pending → dead, a note
    assert store.get(ids[2]).attempts == 0  # type: ignore[union-attr]

    assert store.retry(entry_ids=[ids[0]]) == 1
    again = store.get(ids[0])
    assert again is not None and again.state is EntryState.PENDING and again.attempts == 0
    assert again.history[-1]["detail"] == "retried by an operator"
    assert store.retry(queue="q") == 2
    assert store.retry(queue="q") == 0
    assert store.size("q") == 3


def test_retry_of_errored_entries(store: SqliteQueueStore) -> None:
    in_channel = store.record_error(msg(1), channel_queue("router"), "boom")
    in_dest = store.record_error(msg(2), "pacs", "destination transformer: boom")
    assert store.retry(state=EntryState.DEAD) == 0
    assert store.retry(state=None) == 2
    assert store.get(in_dest).state is EntryState.PENDING  # type: ignore[union-attr]
    # The engine's replay worker of the channel picks this one up and runs it through the channel.
    assert store.get(in_channel).state is EntryState.PENDING  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        store.retry(state=EntryState.PENDING)


def test_stats_and_listing(store: SqliteQueueStore) -> None:
    store.enqueue([("a", msg(1)), ("b", msg(1))])
    store.enqueue([("a", msg(2))])
    e = store.claim("a")
    assert e is not None
    store.record_error(msg(3), channel_queue("ch"), "boom")
    stats = {s.queue: s for s in store.stats()}
    assert set(stats) == {"a", "b", "channel:ch"}
    assert (stats["a"].pending, stats["a"].in_flight, stats["a"].depth) == (1, 1, 2)
    assert stats["a"].oldest_age_s is not None and 0 <= stats["a"].oldest_age_s < 60
    assert stats["channel:ch"].errored == 1 and stats["channel:ch"].oldest_age_s is None
    assert len(store.list_entries()) == 4
    assert len(store.list_entries(limit=2)) == 2
    assert [x.queue for x in store.list_entries(state=EntryState.IN_FLIGHT)] == ["a"]


def test_a_message_that_cannot_be_stored_stores_nothing_of_its_fan_out(store: SqliteQueueStore) -> None:
    bad = Message(body={"x": object()})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        store.enqueue([("a", msg(1)), ("b", bad)])
    assert store.stats() == []
    assert store.enqueue([]) == []


def test_history_is_capped(store: SqliteQueueStore) -> None:
    [entry_id] = store.enqueue([("q", msg())])
    for i in range(60):
        e = store.claim("q", now=time.time() + 10)
        assert e is not None
        store.retry_later(e.id, SendResult.retryable(f"try {i}"), 0.0)
    e = store.get(entry_id)
    assert e is not None and e.attempts == 60 and len(e.history) == 50
    assert e.history[-1]["detail"] == "try 59"
