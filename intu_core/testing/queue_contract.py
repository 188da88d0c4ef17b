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
from datetime import UTC, datetime
from pathlib import Path

import pytest

from intu_core.history import PROBLEM_STATUSES, Event, EventKind, MessageQuery
from intu_core.message import Message, SendResult
from intu_core.queue import EntryState, QueueStore, channel_queue


def msg(n: int = 0, files: tuple[str, ...] = ()) -> Message:
    """A small message with non-ASCII text and metadata, referring to ``files``."""
    return Message(body={"n": n, "text": "é"}, channel="ch", metadata={"peer": "MOD1"}, files=files)


def study_msg(accession: str, n: int = 0, *, at: float | None = None, patient: str = "P1") -> Message:
    """A message as the DICOM source hands it over: ``metadata["history"]`` filled in."""
    created = datetime.fromtimestamp(at if at is not None else time.time(), UTC)
    history = {
        "source": "MODALITY@127.0.0.1:40000",
        "identifiers": {
            "patient_id": patient,
            "accession_number": accession,
            "study_uid": f"1.2.3.{accession}",
            "series_uid": f"1.2.3.{accession}.1",
            "sop_instance_uid": f"1.2.3.{accession}.1.{n}",
            "modality": "CT",
        },
        "tags": {"PatientName": "DOE^JANE", "Modality": "CT"},
    }
    return Message(body={"n": n}, channel="router", metadata={"history": history}, created_at=created)


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

    def test_concurrent_enqueues_are_all_kept_and_each_failure_is_its_own(
        self, tmp_path: Path, store: QueueStore
    ) -> None:
        # Several associations enqueue at once (a backend may commit them together): every caller
        # told success has its entry, its history and its files' references; the one whose message
        # cannot be stored gets its own error, and takes no other caller down with it.
        threads, each = 8, 15
        start = threading.Barrier(threads)
        kept: dict[tuple[int, int], list[str]] = {}
        errors: dict[tuple[int, int], BaseException] = {}

        def sender(t: int) -> None:
            start.wait(timeout=30)
            for i in range(each):
                message = msg(t * 100 + i, (make_file(tmp_path, f"{t}-{i}.dcm"),))
                if (t, i) == (3, 7):
                    message = Message(body={"x": object()}, files=message.files)
                try:
                    kept[(t, i)] = store.enqueue([("pacs", message), ("archive", message)])
                except BaseException as exc:  # kept to assert on
                    errors[(t, i)] = exc

        workers = [threading.Thread(target=sender, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=60)
        assert list(errors) == [(3, 7)] and isinstance(errors[(3, 7)], TypeError)
        assert len(kept) == threads * each - 1
        stats = {s.queue: s.pending for s in store.stats()}
        assert stats == {"pacs": threads * each - 1, "archive": threads * each - 1}
        listed = {e.id: e for e in store.list_entries("pacs", limit=1000)}
        for (t, i), (pacs_id, _archive_id) in kept.items():
            assert listed[pacs_id].message.body["n"] == t * 100 + i
            journey = store.journey(listed[pacs_id].message.id)
            assert journey is not None and journey.events[0].kind is EventKind.RECEIVED
        # Each kept message holds its file; the refused one's is nobody's.
        files = [str(tmp_path / f"{t}-{i}.dcm") for t, i in kept]
        assert store.release_files([*files, str(tmp_path / "3-7.dcm")]) == 1
        assert all(Path(f).exists() for f in files) and not (tmp_path / "3-7.dcm").exists()

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

    # -- history ---------------------------------------------------------------------------
    def test_an_enqueue_records_the_message_as_received_and_queued(self, store: QueueStore) -> None:
        m = study_msg("ACC1")
        ids = store.enqueue([("pacs", m), ("archive", m)], origin=m)
        journey = store.journey(m.id)
        assert journey is not None
        record = journey.message
        assert (record.id, record.channel, record.source) == (m.id, "router", "MODALITY@127.0.0.1:40000")
        assert record.received_at == pytest.approx(m.created_at.timestamp())
        assert record.identifiers["accession_number"] == "ACC1" and record.identifiers["modality"] == "CT"
        assert record.tags == {"PatientName": "DOE^JANE", "Modality": "CT"}
        assert record.status == "queued" and record.destinations == {"pacs": "queued", "archive": "queued"}
        assert [(e.kind, e.destination) for e in journey.events] == [
            (EventKind.RECEIVED, ""),
            (EventKind.QUEUED, "pacs"),
            (EventKind.QUEUED, "archive"),
        ]
        assert "MODALITY@127.0.0.1:40000" in journey.events[0].detail
        assert set(journey.entries) == set(ids)
        assert store.journey("unknown") is None

    def test_a_transformed_message_is_recorded_under_the_message_received(self, store: QueueStore) -> None:
        received = study_msg("ACC2")
        rebuilt = Message(body={"new": True}, channel="router")  # a transformer built a new Message
        sent = Event(received.id, time.time(), EventKind.SENT, "audit", status="success")
        store.enqueue([("pacs", rebuilt)], origin=received, events=[sent])
        assert store.journey(rebuilt.id) is None
        journey = store.journey(received.id)
        assert journey is not None
        assert journey.message.identifiers["accession_number"] == "ACC2"
        assert journey.message.destinations == {"pacs": "queued", "audit": "sent"}
        assert [e.kind for e in journey.events] == [EventKind.RECEIVED, EventKind.SENT, EventKind.QUEUED]

    def test_attempts_delivery_and_dead_letters_are_in_the_journey(self, store: QueueStore) -> None:
        m = study_msg("ACC3")
        store.enqueue([("pacs", m), ("archive", m)], origin=m)
        first = store.claim("pacs")
        assert first is not None
        store.retry_later(first.id, SendResult.retryable("PACS busy", code=0xA700), time.time())
        again = store.claim("pacs")
        assert again is not None and again.id == first.id
        assert store.complete(again.id, SendResult.success("stored", code=0x0000))
        assert store.journey(m.id).message.status == "queued"  # type: ignore[union-attr]
        archive = store.claim("archive")
        assert archive is not None
        store.dead_letter(archive.id, SendResult.permanent("refused", code=0xA900))
        journey = store.journey(m.id)
        assert journey is not None
        tail = [(e.kind, e.destination, e.attempt, e.status, e.code, e.detail) for e in journey.events[3:]]
        assert tail == [
            (EventKind.ATTEMPT, "pacs", 1, "retryable", 0xA700, "PACS busy"),
            (EventKind.DELIVERED, "pacs", 2, "success", 0x0000, "stored"),
            (EventKind.DEAD, "archive", 1, "permanent", 0xA900, "refused"),
        ]
        assert journey.message.status == "partial"
        assert journey.message.destinations == {"pacs": "delivered", "archive": "dead"}
        assert journey.entries == (archive.id,)  # the dead letter is still there to retry
        assert journey.message.updated_at >= journey.message.received_at

    def test_operator_retry_and_purge_are_in_the_journey(self, store: QueueStore) -> None:
        m = study_msg("ACC4")
        [entry_id] = store.enqueue([("pacs", m)], origin=m)
        claimed = store.claim("pacs")
        assert claimed is not None
        store.dead_letter(claimed.id, SendResult.permanent("no"))
        assert store.journey(m.id).message.status == "dead"  # type: ignore[union-attr]
        assert store.retry(entry_ids=[entry_id]) == 1
        assert store.journey(m.id).message.status == "queued"  # type: ignore[union-attr]
        assert store.purge(entry_ids=[entry_id]) == 1
        journey = store.journey(m.id)
        assert journey is not None and journey.entries == ()
        assert [e.kind for e in journey.events][-2:] == [EventKind.RETRIED, EventKind.PURGED]
        assert journey.message.destinations == {"pacs": "purged"} and journey.message.status == "dead"

    def test_errors_and_filters_are_recorded(self, store: QueueStore) -> None:
        errored = study_msg("ACC5", 1)
        store.record_error(errored, channel_queue("router"), "transformer.py:transform: KeyError: 'x'")
        journey = store.journey(errored.id)
        assert journey is not None and journey.message.status == "errored"
        assert journey.message.destinations == {}
        assert [e.kind for e in journey.events] == [EventKind.RECEIVED, EventKind.ERRORED]
        assert "KeyError" in journey.events[1].detail and len(journey.entries) == 1
        # Retried and run through the channel again: its queue entries show up in the same record.
        assert store.retry(state=EntryState.ERRORED) == 1
        store.enqueue([("pacs", errored)], origin=errored)
        assert store.journey(errored.id).message.status == "queued"  # type: ignore[union-attr]

        filtered = study_msg("ACC5", 2)
        store.record(
            filtered, [Event(filtered.id, time.time(), EventKind.FILTERED, detail="filter.py:filter")]
        )
        journey = store.journey(filtered.id)
        assert journey is not None and journey.message.status == "filtered"
        assert journey.message.identifiers["sop_instance_uid"] == "1.2.3.ACC5.1.2"  # nothing discarded unseen
        assert [e.kind for e in journey.events] == [EventKind.RECEIVED, EventKind.FILTERED]
        assert journey.events[1].detail == "filter.py:filter"

    def test_find_messages_by_identifier_status_and_time(self, store: QueueStore) -> None:
        now = time.time()
        a1, a2 = study_msg("A", 1, at=now - 30), study_msg("A", 2, at=now - 20)
        b = study_msg("B", 1, at=now - 10, patient="P2")
        for m in (a1, a2, b):
            store.enqueue([("pacs", m)], origin=m)
        claimed = store.claim("pacs")
        assert claimed is not None and store.complete(claimed.id, SendResult.success())

        def ids(**kw: object) -> list[str]:
            return [r.id for r in store.find_messages(MessageQuery(**kw))]  # type: ignore[arg-type]

        assert ids(accession_number="A") == [a2.id, a1.id]  # newest first
        assert ids(patient_id="P2") == [b.id]
        assert ids(study_uid="1.2.3.B") == [b.id]
        assert ids(sop_instance_uid="1.2.3.A.1.1") == [a1.id]
        assert ids(status="delivered") == [a1.id]
        assert ids(status="queued", accession_number="A") == [a2.id]
        assert ids(channel="router", limit=2) == [b.id, a2.id]
        assert ids(channel="other") == []
        assert ids(since=now - 25) == [b.id, a2.id]
        assert ids(since=now - 25, until=now - 15) == [a2.id]
        assert ids(accession_number="none") == []
        with pytest.raises(ValueError):
            MessageQuery(status="bogus")

    def test_find_messages_finds_a_record_of_each_problem_status(self, store: QueueStore) -> None:
        # The backends search these through an index of their own (history.PROBLEM_STATUSES).
        errored, dead, partial = study_msg("P", 1), study_msg("P", 2), study_msg("P", 3)
        store.record_error(errored, channel_queue("router"), "transformer.py:transform: KeyError")
        store.enqueue([("pacs", dead)], origin=dead)
        store.enqueue([("pacs", partial), ("archive", partial)], origin=partial)
        while (entry := store.claim("pacs")) is not None:
            if entry.message.id == dead.id:
                store.dead_letter(entry.id, SendResult.permanent("refused"))
            else:
                store.complete(entry.id, SendResult.success())
        archive = store.claim("archive")
        assert archive is not None and store.dead_letter(archive.id, SendResult.permanent("refused"))
        expected = {"errored": errored.id, "dead": dead.id, "partial": partial.id}
        assert set(expected) == set(PROBLEM_STATUSES)
        for status, message_id in expected.items():
            assert [r.id for r in store.find_messages(MessageQuery(status=status))] == [message_id], status
            assert [r.id for r in store.find_messages(MessageQuery(status=status, accession_number="P"))] == [
                message_id
            ], status

    def test_expired_history_is_deleted_unless_still_queued(self, store: QueueStore) -> None:
        done, waiting = study_msg("E", 1), study_msg("E", 2)
        store.enqueue([("pacs", done)], origin=done)
        store.enqueue([("pacs", waiting)], origin=waiting)
        claimed = store.claim("pacs")
        assert claimed is not None and store.complete(claimed.id, SendResult.success())
        filtered = study_msg("E", 3)
        store.record(filtered, [Event(filtered.id, time.time(), EventKind.FILTERED)])
        assert store.expire_history(time.time() - 3600) == 0  # all recent
        assert store.expire_history(time.time() + 1) == 2  # the delivered and the filtered one
        assert store.journey(done.id) is None and store.journey(filtered.id) is None
        kept = store.journey(waiting.id)
        assert kept is not None and len(kept.events) == 2  # still queued: kept with its events
        assert [r.id for r in store.find_messages(MessageQuery(accession_number="E"))] == [waiting.id]
