"""Delivery workers against a scripted in-test destination, and the retry/queue settings."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from intu_core.config.problems import Problems
from intu_core.config.section import Section
from intu_core.delivery import DeliveryWorkers, QueueSettings, RetryPolicy, parse_queue, parse_retry
from intu_core.message import Message, SendResult
from intu_core.queue import EntryState
from intu_core.queue.sqlite import SqliteQueueStore

FAST = RetryPolicy(max_attempts=0, backoff="exponential", initial_delay_ms=20, max_delay_ms=80, jitter=0.0)


class ScriptedDestination:
    """A real destination whose answers are scripted per message number (``body["n"]``).

    ``script[n]`` is a list of results (or exceptions to raise) used one per send; when it runs out,
    the message is delivered. ``gate``, when set, makes every send wait for it.
    """

    def __init__(self, script: dict[int, list[SendResult | Exception]] | None = None) -> None:
        self.script = {n: list(results) for n, results in (script or {}).items()}
        self.sends: list[tuple[float, int]] = []
        self.lock = threading.Lock()
        self.gate: threading.Event | None = None
        self.started = threading.Event()

    def send(self, message: Message) -> SendResult:
        n = message.body["n"]
        self.started.set()
        if self.gate is not None:
            self.gate.wait(10)
        with self.lock:
            self.sends.append((time.time(), n))
            planned = self.script.get(n)
            result = planned.pop(0) if planned else SendResult.success()
        if isinstance(result, Exception):
            raise result
        return result

    def close(self) -> None:
        pass

    def sent(self) -> list[int]:
        with self.lock:
            return [n for _, n in self.sends]


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


@pytest.fixture
def store(tmp_path: Path):
    s = SqliteQueueStore(tmp_path)
    yield s
    s.close()


@pytest.fixture
def running():
    started: list[DeliveryWorkers] = []

    def start(*args, **kwargs) -> DeliveryWorkers:  # type: ignore[no-untyped-def]
        workers = DeliveryWorkers(*args, **kwargs)
        workers.start()
        started.append(workers)
        return workers

    yield start
    for workers in started:
        workers.stop(5)


def enqueue(store: SqliteQueueStore, *numbers: int, queue: str = "pacs") -> list[str]:
    return store.enqueue([(queue, Message(body={"n": n})) for n in numbers])


def test_one_thread_delivers_in_enqueue_order(store, running) -> None:
    dest = ScriptedDestination()
    enqueue(store, *range(20))
    workers = running(store, "pacs", dest, FAST, 1)
    wait_for(lambda: workers.counts["delivered"] == 20)
    assert dest.sent() == list(range(20))
    assert store.size("pacs") == 0 and store.stats()[0].delivered == 20


def test_notify_wakes_an_idle_worker(store, running) -> None:
    dest = ScriptedDestination()
    workers = running(store, "pacs", dest, FAST, 2, idle_recheck_s=60)
    time.sleep(0.1)  # both workers are asleep now, with nothing due
    enqueue(store, 1)
    workers.notify()
    wait_for(lambda: dest.sent() == [1], timeout=2)


def test_retries_follow_the_backoff_then_deliver(store, running, caplog) -> None:
    caplog.set_level(logging.INFO)
    dest = ScriptedDestination({1: [SendResult.retryable("association rejected: busy")] * 3})
    enqueue(store, 1)
    workers = running(store, "pacs", dest, FAST, 1)
    wait_for(lambda: workers.counts["delivered"] == 1)
    times = [t for t, _ in dest.sends]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    expected = [FAST.delay_s(n) for n in (1, 2, 3)]
    assert expected == [0.02, 0.04, 0.08]
    for gap, delay in zip(gaps, expected, strict=True):
        assert delay - 0.005 <= gap < delay + 1.0
    assert workers.counts["retries"] == 3
    assert "not delivered (attempt 1): association rejected: busy; retrying in" in caplog.text
    assert "delivered after 4 attempts" in caplog.text


def test_dead_letter_after_max_attempts_with_history_following_the_policy(store, running) -> None:
    policy = RetryPolicy(max_attempts=4, backoff="linear", initial_delay_ms=30, max_delay_ms=1000, jitter=0)
    dest = ScriptedDestination({1: [SendResult.retryable("timeout", code=0xA700)] * 10})
    [entry_id] = enqueue(store, 1)
    workers = running(store, "pacs", dest, policy, 1)
    wait_for(lambda: workers.counts["dead"] == 1)
    entry = store.get(entry_id)
    assert entry is not None and entry.state is EntryState.DEAD
    assert entry.attempts == 4 and len(entry.history) == 4 and entry.last_error == "timeout"
    ats = [h["at"] for h in entry.history]
    for n, (a, b) in enumerate(zip(ats, ats[1:], strict=False), start=1):
        assert policy.delay_s(n) - 0.005 <= b - a < policy.delay_s(n) + 1.0
    assert len(dest.sends) == 4


def test_permanent_failure_is_dead_lettered_at_once_and_others_go_on(store, running, caplog) -> None:
    dest = ScriptedDestination({2: [SendResult.permanent("SOP class not supported", code=0x0122)]})
    ids = enqueue(store, 1, 2, 3)
    workers = running(store, "pacs", dest, FAST, 2)
    wait_for(lambda: workers.counts["delivered"] == 2 and workers.counts["dead"] == 1)
    dead = store.get(ids[1])
    assert dead is not None and dead.state is EntryState.DEAD and dead.attempts == 1
    assert dead.last_error == "SOP class not supported"
    assert dead.history[0]["code"] == 0x0122
    assert (
        "dead-lettered, failed permanently after 1 attempt(s): SOP class not supported (status 0x0122)"
        in (caplog.text)
    )


def test_retry_of_a_dead_letter_redelivers(store, running) -> None:
    dest = ScriptedDestination({1: [SendResult.permanent("not today")]})
    [entry_id] = enqueue(store, 1)
    workers = running(store, "pacs", dest, FAST, 1, idle_recheck_s=60)
    wait_for(lambda: workers.counts["dead"] == 1)
    assert store.retry(queue="pacs") == 1
    workers.notify()
    wait_for(lambda: workers.counts["delivered"] == 1)
    assert dest.sent() == [1, 1] and store.get(entry_id) is None


def test_entries_retried_from_another_process_are_picked_up_without_notify(tmp_path, running) -> None:
    engine_store, cli_store = SqliteQueueStore(tmp_path), SqliteQueueStore(tmp_path)
    dest = ScriptedDestination({1: [SendResult.permanent("no")]})
    enqueue(engine_store, 1)
    workers = running(engine_store, "pacs", dest, FAST, 1, idle_recheck_s=0.1)
    wait_for(lambda: workers.counts["dead"] == 1)
    assert cli_store.retry() == 1
    wait_for(lambda: workers.counts["delivered"] == 1, timeout=5)
    cli_store.close()
    workers.stop(5)
    engine_store.close()


def test_a_destination_that_raises_is_retried_and_logged(store, running, caplog) -> None:
    dest = ScriptedDestination({1: [RuntimeError("socket exploded")]})
    enqueue(store, 1)
    workers = running(store, "pacs", dest, FAST, 1)
    wait_for(lambda: workers.counts["delivered"] == 1)
    assert workers.counts["raised"] == 1 and workers.counts["retries"] == 1
    assert "the destination raised while sending message" in caplog.text
    assert "RuntimeError: socket exploded" in caplog.text  # the traceback is in the log


def test_warnings_are_delivered_and_logged(store, running, caplog) -> None:
    dest = ScriptedDestination({1: [SendResult.warning("coercion of data elements", code=0xB000)]})
    enqueue(store, 1)
    workers = running(store, "pacs", dest, FAST, 1)
    wait_for(lambda: workers.counts["delivered"] == 1)
    assert workers.counts["warnings"] == 1
    assert "delivered with a warning: coercion of data elements (status 0xB000)" in caplog.text


def test_stop_waits_for_the_send_in_flight_and_starts_no_new_one(store) -> None:
    dest = ScriptedDestination()
    dest.gate = threading.Event()
    ids = enqueue(store, 1, 2)
    workers = DeliveryWorkers(store, "pacs", dest, FAST, 1)
    workers.start()
    assert dest.started.wait(5)
    threading.Timer(0.2, dest.gate.set).start()
    t0 = time.monotonic()
    assert workers.stop(timeout=10) is True
    assert time.monotonic() - t0 >= 0.15
    assert dest.sent() == [1]
    assert store.get(ids[0]) is None  # the in-flight send was recorded as delivered
    second = store.get(ids[1])
    assert second is not None and second.state is EntryState.PENDING


def test_stop_gives_up_after_its_timeout(store) -> None:
    dest = ScriptedDestination()
    dest.gate = threading.Event()
    enqueue(store, 1)
    workers = DeliveryWorkers(store, "pacs", dest, FAST, 1)
    workers.start()
    assert dest.started.wait(5)
    assert workers.stop(timeout=0.1) is False
    dest.gate.set()
    assert workers.stop(timeout=5) is True


def test_idle_workers_use_almost_no_cpu(store, running) -> None:
    # A functional check against busy-waiting: 4 idle workers plus one with a retry due far away.
    dest = ScriptedDestination({1: [SendResult.retryable("down")]})
    slow = RetryPolicy(initial_delay_ms=600_000, max_delay_ms=600_000, jitter=0)
    enqueue(store, 1)
    running(store, "pacs", dest, slow, 4)
    running(store, "archive", ScriptedDestination(), FAST, 4)
    wait_for(lambda: len(dest.sends) == 1)
    time.sleep(0.1)
    cpu0, wall0 = time.process_time(), time.monotonic()
    time.sleep(1.0)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    assert cpu < 0.2 * wall, f"idle workers used {cpu:.3f} s of CPU in {wall:.2f} s"


# -- settings ------------------------------------------------------------------------------
def section(data: object) -> Section:
    return Section(data, file=Path("intu.yaml"), path="destinations.pacs.retry", problems=Problems())


def test_retry_defaults_keep_trying_with_exponential_backoff() -> None:
    policy = parse_retry(section(None))
    assert policy == RetryPolicy(0, "exponential", 1000, 300_000, 0.2)
    assert not policy.exhausted(10_000)
    assert QueueSettings() == parse_queue(section({}))
    assert (QueueSettings().enabled, QueueSettings().threads, QueueSettings().max_size) == (True, 2, 100_000)


def test_delays_per_backoff() -> None:
    const = RetryPolicy(backoff="constant", initial_delay_ms=500, max_delay_ms=30_000, jitter=0)
    linear = RetryPolicy(backoff="linear", initial_delay_ms=500, max_delay_ms=1200, jitter=0)
    expo = RetryPolicy(backoff="exponential", initial_delay_ms=500, max_delay_ms=30_000, jitter=0)
    assert [const.delay_s(n) for n in (1, 2, 5)] == [0.5, 0.5, 0.5]
    assert [linear.delay_s(n) for n in (1, 2, 3)] == [0.5, 1.0, 1.2]
    assert [expo.delay_s(n) for n in (1, 2, 3, 7, 8, 100_000)] == [0.5, 1.0, 2.0, 30.0, 30.0, 30.0]
    jittery = RetryPolicy(initial_delay_ms=1000, max_delay_ms=1000, jitter=0.2)
    rng = random.Random(7)
    delays = [jittery.delay_s(3, rng) for _ in range(200)]
    assert all(0.8 <= d <= 1.2 for d in delays) and max(delays) - min(delays) > 0.2
    assert RetryPolicy(max_attempts=3).exhausted(3) and not RetryPolicy(max_attempts=3).exhausted(2)


def test_parse_retry_and_queue_report_problems() -> None:
    s = section(
        {
            "max_attempts": -1,
            "backoff": "exponentail",
            "initial_delay_ms": 5000,
            "max_delay_ms": 100,
            "jitter": 2,
            "retries": 3,
        }
    )
    policy = parse_retry(s)
    messages = [p.message for p in s.problems]
    assert any("did you mean 'exponential'" in m for m in messages)
    assert any("at least initial_delay_ms" in m for m in messages)
    assert any("fraction from 0 to 1" in m for m in messages)
    assert any("unknown key 'retries'" in m for m in messages)
    assert any("at least 0" in m for m in messages)
    assert policy.max_delay_ms >= policy.initial_delay_ms  # still a usable policy
    q = section({"enabled": False, "threads": 0, "max_sise": 5})
    settings = parse_queue(q)
    assert settings.enabled is False and settings.threads == 2
    assert len(q.problems) == 2
    ok = section({"max_attempts": 10, "backoff": "linear", "initial_delay_ms": 500, "max_delay_ms": 30000})
    assert parse_retry(ok) == RetryPolicy(10, "linear", 500, 30_000, 0.2) and not ok.problems


def test_workers_renew_the_lease_of_an_entry_while_its_send_takes_long(tmp_path, running) -> None:
    engine_store, other_engine = SqliteQueueStore(tmp_path), SqliteQueueStore(tmp_path, node_id="other")
    dest = ScriptedDestination()
    dest.gate = threading.Event()
    [entry_id] = enqueue(engine_store, 1)
    workers = running(engine_store, "pacs", dest, FAST, 1, lease_s=0.3)
    assert dest.started.wait(5)
    time.sleep(1.0)  # three leases long: unrenewed, the entry would be free for another engine
    assert other_engine.claim("pacs") is None
    dest.gate.set()
    wait_for(lambda: workers.counts["delivered"] == 1)
    assert engine_store.get(entry_id) is None and engine_store.stats()[0].recovered == 0
    assert workers.stop(5)
    other_engine.close()
    engine_store.close()


def test_retry_max_age_bounds_retryable_failures_and_is_validated() -> None:
    default = parse_retry(section(None))
    assert default.max_age_ms == 7 * 24 * 3600 * 1000  # a weekend's outage still retries
    assert not default.too_old(3 * 24 * 3600) and default.too_old(8 * 24 * 3600)
    assert not RetryPolicy(max_age_ms=0).too_old(10**9)  # 0: no limit
    s = section({"max_age_ms": -5})
    parse_retry(s)
    assert any("max_age_ms" in p.key_path and "at least 0" in p.message for p in s.problems), [
        (p.key_path, p.message) for p in s.problems
    ]
    with pytest.raises(ValueError, match="max_age_ms"):
        RetryPolicy(max_age_ms=-1)


def test_an_entry_older_than_max_age_is_dead_lettered_with_the_reason(store, running) -> None:
    policy = RetryPolicy(initial_delay_ms=20, max_delay_ms=40, jitter=0.0, max_age_ms=300)
    dest = ScriptedDestination({1: [SendResult.retryable("refused for now: 0xA700", code=0xA700)] * 1000})
    ids = enqueue(store, 1, 2)
    workers = running(store, "pacs", dest, policy, 1)
    wait_for(lambda: workers.counts["dead"] == 1 and workers.counts["delivered"] == 1)
    dead = store.get(ids[0])
    assert dead is not None and dead.state is EntryState.DEAD and dead.attempts > 1
    assert dead.last_error.startswith("gave up after") and "0xA700" in dead.last_error
