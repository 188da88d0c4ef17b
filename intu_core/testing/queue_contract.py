"""The contract every queue backend passes: the ``QueueStore`` protocol, as pytest tests.

A backend's test module subclasses ``QueueContract`` and says how to open its store::

    from intu_core.testing.queue_contract import QueueContract

    class TestPostgresQueue(QueueContract):
        def open_store(self, place, *, node_id=None):
            return PostgresQueueStore(dsn_for(place), node_id=node_id or "node-a")

``open_store(place, node_id=...)`` opens the queue kept at ``place`` (a fresh folder per test);
opening the same place again opens the same queue, as a second engine process or ``intu queue``
would. ``node_id`` None means the backend's default, which must be the same at every opening of a
place (what a restarted engine gets). Stores the tests open are closed by the tests.

This module imports pytest; ``intu_core.testing`` itself does not. For pytest's detailed assertion
messages, call ``pytest.register_assert_rewrite("intu_core.testing.queue_contract")`` in your
``conftest.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from intu_core.message import Message, SendResult
from intu_core.queue import EntryState, QueueStore, channel_queue


def msg(n: int = 0, files: tuple[str, ...] = ()) -> Message:
    """A small message with non-ASCII text and metadata, referring to ``files``."""
    return Message(body={"n": n, "text": "é"}, channel="ch", metadata={"peer": "MOD1"}, files=files)


def make_file(folder: Path, name: str) -> str:
    """A file for a message to refer to (as a source's spooled file)."""
    path = folder / name
    path.write_bytes(b"DICM")
    return str(path)


class QueueContract:
    """Tests of the ``QueueStore`` protocol; subclass it (as ``Test...``) and define ``open_store``."""

    def open_store(self, place: Path, *, node_id: str | None = None) -> QueueStore:
        """The backend's store kept at ``place``, claiming for ``node_id``."""
        raise NotImplementedError("a QueueContract subclass defines open_store(place, node_id=...)")

    @pytest.fixture
    def place(self, tmp_path: Path) -> Path:
        """Where this test's queue is kept (message files go next to it, in ``tmp_path``)."""
        return tmp_path / "queue"

    @pytest.fixture
    def store(self, place: Path) -> Iterator[QueueStore]:
        """The store at ``place`` for the default node, closed after the test."""
        store = self.open_store(place)
        yield store
        store.close()

    # -- the basics ------------------------------------------------------------------------
    def test_it_is_a_queue_store_with_a_stable_node_id(self, place: Path, store: QueueStore) -> None:
        assert isinstance(store, QueueStore)
        assert isinstance(store.node_id, str) and store.node_id
        again = self.open_store(place)
        assert again.node_id == store.node_id  # a restarted engine takes back what it held
        again.close()
        other = self.open_store(place, node_id="node-b")
        assert other.node_id == "node-b"
        other.close()

    def test_entries_survive_close_and_reopen(self, place: Path) -> None:
        store = self.open_store(place)
        ids = store.enqueue([("pacs", msg(1)), ("archive", msg(1))])
        store.close()

        again = self.open_store(place)
        entry = again.get(ids[0])
        assert entry is not None
        assert entry.queue == "pacs" and entry.state is EntryState.PENDING and entry.attempts == 0
        assert entry.message.body == {"n": 1, "text": "é"}
        assert entry.message.metadata == {"peer": "MOD1"}
        assert again.size("pacs") == 1 and again.size("archive") == 1
        claimed = again.claim("pacs")
        assert claimed is not None and claimed.id == ids[0] and claimed.state is EntryState.IN_FLIGHT
        again.close()

    def test_a_message_that_cannot_be_stored_stores_nothing_of_its_fan_out(self, store: QueueStore) -> None:
        bad = Message(body={"x": object()})
        with pytest.raises(TypeError, match="not JSON-serialisable"):
            store.enqueue([("a", msg(1)), ("b", bad)])
        assert store.stats() == []
        assert store.enqueue([]) == []

    # -- claiming --------------------------------------------------------------------------
    def test_claim_is_oldest_first_and_respects_next_attempt_at(self, store: QueueStore) -> None:
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

    def test_concurrent_claims_never_hand_out_an_entry_twice(self, store: QueueStore) -> None:
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

    def test_claims_through_two_stores_never_hand_out_an_entry_twice(self, place: Path) -> None:
        # Two stores on one queue behave like two engine processes (or the engine and `intu queue`).
        a, b = self.open_store(place), self.open_store(place, node_id="node-b")
        a.enqueue([("q", msg(i)) for i in range(50)])
        got: list[str] = []
        lock = threading.Lock()

        def drain(s: QueueStore) -> None:
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

    # -- leases ----------------------------------------------------------------------------
    def test_an_expired_lease_is_claimable_by_another_node_and_a_live_one_is_not(self, place: Path) -> None:
        a, b = self.open_store(place, node_id="node-a"), self.open_store(place, node_id="node-b")
        [entry_id] = a.enqueue([("q", msg(1))])
        now = time.time()
        assert a.get(entry_id).lease_owner is None  # type: ignore[union-attr]
        held = a.claim("q", now=now, lease_s=30)
        assert held is not None and held.id == entry_id
        assert (held.lease_owner, held.lease_expires_at) == ("node-a", pytest.approx(now + 30))
        assert b.claim("q", now=now + 29) is None  # the lease still runs
        taken = b.claim("q", now=now + 31)  # node-a stopped renewing: it died
        assert taken is not None and taken.id == entry_id and taken.state is EntryState.IN_FLIGHT
        assert (taken.lease_owner, taken.lease_expires_at) == ("node-b", pytest.approx(now + 331))
        assert "expired" in taken.history[-1]["detail"]
        assert a.claim("q", now=now + 32) is None  # now leased to node-b
        # The first holder's late result changes nothing; the new holder's counts.
        assert a.complete(entry_id, SendResult.success()) is False
        assert a.retry_later(entry_id, SendResult.retryable("late"), now) is False
        assert a.dead_letter(entry_id, SendResult.permanent("late")) is False
        assert b.complete(entry_id, SendResult.success()) is True
        [stats] = b.stats()
        assert stats.recovered == 1 and stats.delivered == 1 and stats.depth == 0
        a.close()
        b.close()

    def test_renew_extends_only_the_leases_this_node_holds(self, place: Path) -> None:
        a, b = self.open_store(place, node_id="node-a"), self.open_store(place, node_id="node-b")
        ids = a.enqueue([("q", msg(i)) for i in range(3)])
        mine = a.claim("q", lease_s=1)
        theirs = b.claim("q", lease_s=1)
        assert mine is not None and theirs is not None
        assert a.renew([mine.id, theirs.id, ids[2], "unknown"], lease_s=3600) == 1  # pending: not held
        renewed = a.get(mine.id)
        assert renewed is not None and renewed.lease_expires_at == pytest.approx(time.time() + 3600, abs=60)
        assert a.renew([]) == 0
        later = time.time() + 60
        # The pending entry and node-b's own expired lease; not node-a's renewed one.
        taken = [b.claim("q", now=later), b.claim("q", now=later)]
        assert {e.id for e in taken if e is not None} == {theirs.id, ids[2]}
        assert b.claim("q", now=later) is None
        a.close()
        b.close()

    def test_recover_after_a_crash_puts_this_nodes_entries_back(self, place: Path) -> None:
        store = self.open_store(place)
        ids = store.enqueue([("q", msg(i)) for i in range(3)])
        assert store.claim("q") is not None
        assert store.claim("q") is not None
        # A crash: this store is abandoned without any further bookkeeping; the restarted engine
        # opens the queue again with the same (default) node id.
        again = self.open_store(place)
        assert again.recover() == 2
        assert again.recover() == 0
        assert [e.state for e in again.list_entries("q")] == [EntryState.PENDING] * 3
        assert {e.lease_owner for e in again.list_entries("q")} == {None}
        assert again.claim("q").id == ids[0]  # type: ignore[union-attr]
        [stats] = again.stats()
        assert stats.recovered == 2 and stats.in_flight == 1 and stats.pending == 2
        again.close()
        store.close()

    def test_recover_leaves_live_leases_of_other_nodes_alone(self, place: Path) -> None:
        a, b = self.open_store(place, node_id="node-a"), self.open_store(place, node_id="node-b")
        a.enqueue([("q", msg(i)) for i in range(3)])
        assert a.claim("q") is not None  # node-a is alive and sending it
        expired = b.claim("q", lease_s=0.01)
        assert expired is not None
        time.sleep(0.05)
        restarted = self.open_store(place, node_id="node-c")
        assert restarted.recover() == 1  # only node-b's expired lease
        assert restarted.get(expired.id).state is EntryState.PENDING  # type: ignore[union-attr]
        assert [s.in_flight for s in restarted.stats()] == [1]
        for s in (a, b, restarted):
            s.close()

    # -- settling --------------------------------------------------------------------------
    def test_unknown_entries_or_entries_in_another_state_change_nothing(self, store: QueueStore) -> None:
        assert store.complete("unknown", SendResult.success()) is False
        assert store.retry_later("unknown", SendResult.retryable("x"), time.time()) is False
        assert store.dead_letter("unknown", "gone") is False
        [entry_id] = store.enqueue([("q", msg())])
        assert store.complete(entry_id, SendResult.success()) is False  # pending, not in flight
        assert store.retry_later(entry_id, SendResult.retryable("x"), time.time()) is False
        assert store.get(entry_id).state is EntryState.PENDING  # type: ignore[union-attr]
        assert store.get("unknown") is None

    def test_retry_later_records_history_and_attempts(self, store: QueueStore) -> None:
        [entry_id] = store.enqueue([("q", msg())])
        for n in range(1, 3):
            e = store.claim("q", now=time.time() + 3600 * n)
            assert e is not None and e.attempts == n - 1
            assert store.retry_later(e.id, SendResult.retryable(f"busy {n}", code=0xA700), time.time())
        e = store.get(entry_id)
        assert e is not None and e.state is EntryState.PENDING and e.attempts == 2
        assert e.lease_owner is None and e.lease_expires_at is None  # settled: no lease
        assert [h["detail"] for h in e.history] == ["busy 1", "busy 2"]
        assert e.history[0]["status"] == "retryable" and e.history[0]["code"] == 0xA700
        assert e.last_error == "busy 2"
        # Not in flight any more: a late result changes nothing.
        assert store.retry_later(entry_id, SendResult.retryable("late"), time.time()) is False
        assert store.complete(entry_id) is False

    def test_dead_letter_and_retry(self, store: QueueStore) -> None:
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
        assert store.dead_letter(ids[2], "again") is False  # dead already

        assert store.retry(entry_ids=[ids[0]]) == 1
        again = store.get(ids[0])
        assert again is not None and again.state is EntryState.PENDING and again.attempts == 0
        assert again.history[-1]["detail"] == "retried by an operator"
        assert store.retry(queue="q") == 2
        assert store.retry(queue="q") == 0
        assert store.size("q") == 3

    def test_retry_of_errored_entries(self, store: QueueStore) -> None:
        in_channel = store.record_error(msg(1), channel_queue("router"), "boom")
        in_dest = store.record_error(msg(2), "pacs", "destination transformer: boom")
        assert store.retry(state=EntryState.DEAD) == 0
        assert store.retry(state=None) == 2
        assert store.get(in_dest).state is EntryState.PENDING  # type: ignore[union-attr]
        # The engine's replay worker of the channel picks this one up and runs it through the channel.
        assert store.get(in_channel).state is EntryState.PENDING  # type: ignore[union-attr]
        with pytest.raises(ValueError):
            store.retry(state=EntryState.PENDING)

    # -- files -----------------------------------------------------------------------------
    def test_files_are_deleted_after_the_last_entry_completes(
        self, tmp_path: Path, store: QueueStore
    ) -> None:
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

    def test_files_are_deleted_after_the_last_entry_is_purged(
        self, tmp_path: Path, store: QueueStore
    ) -> None:
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

    def test_dead_and_errored_entries_keep_their_files(self, tmp_path: Path, store: QueueStore) -> None:
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
        assert store.release_files([]) == 0
        assert Path(f).exists() and Path(g).exists() and not Path(other).exists()
        errored = store.get(err_id)
        assert errored is not None and errored.state is EntryState.ERRORED
        assert errored.last_error.endswith("KeyError: 'x'")
        assert store.purge(state=EntryState.ERRORED) == 1
        assert not Path(g).exists() and Path(f).exists()

    # -- looking ---------------------------------------------------------------------------
    def test_stats_and_listing(self, store: QueueStore) -> None:
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
        assert store.size("a") == 2 and store.size("channel:ch") == 0 and store.size("none") == 0
        assert len(store.list_entries()) == 4
        assert len(store.list_entries(limit=2)) == 2
        assert [x.queue for x in store.list_entries(state=EntryState.IN_FLIGHT)] == ["a"]
