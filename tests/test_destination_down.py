"""A destination that goes down and comes back: one line each way, one probe instead of a back-off
per entry, and the backlog delivered as soon as the probe succeeds (``intu_core.reachability``)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from intu_core.delivery import DeliveryWorkers, RetryPolicy
from intu_core.message import Message, SendResult
from intu_core.metrics import EngineMetrics, MetricsRegistry
from intu_core.queue import EntryState
from intu_core.queue.sqlite import SqliteQueueStore

# A back-off no test could wait for: an entry delivered within the tests' waits did not back off.
SLOW = RetryPolicy(
    max_attempts=0, backoff="constant", initial_delay_ms=600_000, max_delay_ms=600_000, jitter=0
)
FAST_PROBES = {"probe_first_s": 0.05, "probe_max_s": 0.2}


class SwitchedPeer:
    """A destination whose peer is switched off and on: while off, every send and probe finds it
    unreachable. ``probes`` is None for a destination without ``probe``."""

    def __init__(self, *, with_probe: bool = True, probe_answer: SendResult | None = None) -> None:
        self.up = threading.Event()
        self.lock = threading.Lock()
        self.sent: list[int] = []  # body["n"] of each send that reached the peer
        self.tries = 0
        self.probes: list[bool] | None = [] if with_probe else None
        self.probe_answer = probe_answer  # when set, what every probe answers
        if with_probe:
            self.probe = self._probe

    def send(self, message: Message) -> SendResult:
        with self.lock:
            self.tries += 1
            if not self.up.is_set():
                return SendResult.unreachable("cannot connect to 127.0.0.1:1: Connection refused")
            self.sent.append(message.body["n"])
        return SendResult.success()

    def _probe(self) -> SendResult:
        assert self.probes is not None
        with self.lock:
            self.probes.append(self.up.is_set())
        if self.probe_answer is not None:
            return self.probe_answer
        if self.up.is_set():
            return SendResult.success("C-ECHO succeeded", code=0)
        return SendResult.unreachable("cannot connect to 127.0.0.1:1: Connection refused")

    def close(self) -> None:
        pass


def wait_for(check: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def lines(caplog: pytest.LogCaptureFixture, text: str, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level and text in r.getMessage()]


@pytest.fixture
def store(tmp_path: Path):
    s = SqliteQueueStore(tmp_path)
    yield s
    s.close()


@pytest.fixture
def start(store):
    started: list[DeliveryWorkers] = []

    def start(dest: object, **kwargs: object) -> DeliveryWorkers:
        workers = DeliveryWorkers(store, "pacs", dest, SLOW, 2, **{**FAST_PROBES, **kwargs})  # type: ignore[arg-type]
        workers.start()
        started.append(workers)
        return workers

    yield start
    for workers in started:
        workers.stop(5)


def enqueue(store: SqliteQueueStore, count: int) -> list[str]:
    return store.enqueue([("pacs", Message(body={"n": n})) for n in range(count)])


def test_down_then_up_logs_once_each_way_probes_instead_of_backing_off_and_delivers_the_backlog(
    store, start, caplog
) -> None:
    caplog.set_level(logging.DEBUG, logger="intu")
    metrics = EngineMetrics.register(MetricsRegistry())
    peer = SwitchedPeer()
    enqueue(store, 20)
    workers = start(peer, down_summary_s=0.3, metrics=metrics, logger=logging.getLogger("intu.delivery.pacs"))

    wait_for(lambda: len(lines(caplog, "still down since", logging.WARNING)) >= 2)
    state = workers.state()
    assert not state.up and state.waiting == 20 and "Connection refused" in state.last_error
    assert metrics.destination_up.labels("pacs").value == 0
    # The sends that found it down: the first, and what the other worker had claimed meanwhile;
    # after that only probes, however many.
    failed = peer.tries
    assert 1 <= failed <= 4 and peer.probes and not any(peer.probes)
    tried = [e for e in store.list_entries("pacs") if e.attempts]
    assert sum(e.attempts for e in tried) == failed  # each attempt recorded in its entry's history
    for entry in tried:
        assert entry.state is EntryState.PENDING and entry.history[-1]["status"] == "retryable"
        assert "Connection refused" in entry.history[-1]["detail"]
        assert entry.next_attempt_at <= time.time()  # waiting for the probe, not for SLOW's 10 min

    peer.up.set()
    wait_for(lambda: workers.counts["delivered"] == 20)
    assert sorted(peer.sent) == list(range(20)) and store.size("pacs") == 0
    wait_for(lambda: lines(caplog, "is up again"))
    assert workers.state().up and metrics.destination_up.labels("pacs").value == 1

    [record] = [r for r in caplog.records if "is down" in r.getMessage()]
    assert (record.destination, record.destination_state, record.waiting) == ("pacs", "down", 20)  # type: ignore[attr-defined]
    [down] = lines(caplog, "is down", logging.WARNING)
    assert "destination pacs is down: cannot connect" in down and "20 waiting" in down
    [up] = lines(caplog, "is up again")
    assert "probe" in up or "answer" in up
    # No line per entry and attempt: those are debug.
    assert not lines(caplog, "not delivered"), lines(caplog, "not delivered")
    assert len(lines(caplog, "not delivered", logging.DEBUG)) == failed == peer.tries - 20
    assert workers.counts["retries"] == failed


def test_without_a_probe_the_next_entry_is_the_probe(store, start, caplog) -> None:
    caplog.set_level(logging.INFO, logger="intu")
    peer = SwitchedPeer(with_probe=False)
    enqueue(store, 10)
    workers = start(peer, down_summary_s=0.3, logger=logging.getLogger("intu.delivery.pacs"))
    wait_for(lambda: peer.tries >= 6)  # a few probing sends, one at a time
    wait_for(lambda: lines(caplog, "still down since", logging.WARNING))
    assert workers.counts["delivered"] == 0 and not workers.state().up
    peer.up.set()
    wait_for(lambda: workers.counts["delivered"] == 10)
    assert len(lines(caplog, "is down", logging.WARNING)) == 1
    assert len(lines(caplog, "is up again")) == 1
    assert not lines(caplog, "not delivered")


def test_a_probe_that_succeeds_while_sends_still_fail_is_the_same_outage(store, start, caplog) -> None:
    """A peer that answers C-ECHO but refuses every association for a store: no flood of
    down/up lines, and the probes keep their longer delay."""
    caplog.set_level(logging.INFO, logger="intu")
    peer = SwitchedPeer(probe_answer=SendResult.success("C-ECHO succeeded"))
    enqueue(store, 5)
    workers = start(peer, logger=logging.getLogger("intu.delivery.pacs"))
    wait_for(lambda: peer.probes is not None and len(peer.probes) >= 5)
    assert len(lines(caplog, "is down", logging.WARNING)) == 1
    assert not lines(caplog, "is up again")
    peer.up.set()
    wait_for(lambda: workers.counts["delivered"] == 5)
    wait_for(lambda: lines(caplog, "is up again"))
    assert len(lines(caplog, "is down", logging.WARNING)) == 1


def test_a_probe_that_cannot_tell_falls_back_to_sending(store, start, caplog) -> None:
    caplog.set_level(logging.INFO, logger="intu")
    peer = SwitchedPeer(probe_answer=SendResult.permanent("the peer refuses C-ECHO"))
    enqueue(store, 3)
    workers = start(peer, logger=logging.getLogger("intu.delivery.pacs"))
    wait_for(lambda: lines(caplog, "probing by sending the next entry", logging.WARNING))
    tries = peer.tries
    wait_for(lambda: peer.tries > tries)  # the probing send
    assert peer.probes == [False]
    peer.up.set()
    wait_for(lambda: workers.counts["delivered"] == 3)
    assert len(lines(caplog, "is up again")) == 1


def test_other_retryable_failures_still_back_off_per_entry(store, start, caplog) -> None:
    """A PACS that answers "out of resources" for one image is up: that entry backs off alone."""
    caplog.set_level(logging.INFO, logger="intu")

    class Busy(SwitchedPeer):
        def send(self, message: Message) -> SendResult:
            if message.body["n"] == 0:
                return SendResult.retryable("Out of Resources", code=0xA700)
            return super().send(message)

    peer = Busy()
    peer.up.set()
    enqueue(store, 3)
    workers = start(peer, logger=logging.getLogger("intu.delivery.pacs"))
    wait_for(lambda: workers.counts["delivered"] == 2 and workers.counts["retries"] == 1)
    assert workers.state().up and not lines(caplog, "is down")
    assert len(lines(caplog, "not delivered (attempt 1): Out of Resources")) == 1


def test_the_engine_view_and_metrics_show_a_destination_down_and_up(tmp_path, caplog) -> None:
    from types import SimpleNamespace

    from project_files import write

    from intu_core.hookspecs import hookimpl
    from intu_core.testing import engine_deliver, manual_source, registry_with, running_engine
    from intu_core.types import DestinationType

    caplog.set_level(logging.INFO, logger="intu")
    peer = SwitchedPeer()

    def parse(section: object) -> None:
        section.done()  # type: ignore[attr-defined]

    @hookimpl
    def intu_destination_types() -> list[DestinationType]:
        return [DestinationType("switched", parse, lambda settings, runtime: peer)]

    plugin = SimpleNamespace(intu_destination_types=intu_destination_types, __name__="tests.switched")
    write(
        tmp_path / "intu.yaml",
        """
        destinations:
          pacs: {type: switched, queue: {threads: 1}}
          audit: {type: log, queue: {enabled: false}}
        """,
    )
    write(
        tmp_path / "channels" / "ct" / "channel.yaml", "source: {type: manual}\ndestinations: [pacs, audit]\n"
    )
    with running_engine(tmp_path, registry_with(manual_source, plugin)) as engine:
        view = engine.view
        assert {name: state.up for name, state in view.destination_states().items()} == {
            "pacs": True,
            "audit": True,
        }
        identifiers = {"accession_number": "ACC-7", "study_uid": "1.2.3"}
        message = Message(body={"n": 1}, metadata={"history": {"identifiers": identifiers}})
        assert engine_deliver(engine, "ct", message).ok
        wait_for(lambda: not view.destination_states()["pacs"].up)
        down = view.destination_states()["pacs"]
        assert down.waiting == 1 and "Connection refused" in down.last_error and down.since <= time.time()
        assert view.metrics().value("intu_destination_up", destination="pacs") == 0
        peer.up.set()
        wait_for(lambda: view.destination_states()["pacs"].up and peer.sent == [1])
        assert view.metrics().value("intu_destination_up", destination="pacs") == 1
        assert view.destination_states()["pacs"].last_error == ""
    [delivered] = [r for r in caplog.records if "delivered after 2 attempts" in r.getMessage()]
    assert delivered.accession_number == "ACC-7" and delivered.study_uid == "1.2.3"  # type: ignore[attr-defined]


def test_an_unreachable_result_is_retryable_and_keeps_what_it_was_given() -> None:
    result = SendResult.unreachable("no answer", code=None, data={"peer": "10.0.0.5:104"})
    assert result.status.value == "retryable" and not result.delivered and result.peer_unreachable
    assert result.data == {"peer": "10.0.0.5:104", "unreachable": True}
    assert not SendResult.retryable("Out of Resources", code=0xA700).peer_unreachable
    assert not SendResult.permanent("x", data={"unreachable": True}).peer_unreachable
