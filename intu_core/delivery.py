"""Delivery from a durable queue to one destination: retry policy, queue settings, workers.

Each destination with a queue gets a ``DeliveryWorkers``: ``threads`` workers that claim entries
from the store, call ``destination.send``, and record what happened::

    SUCCESS / WARNING      → complete (WARNING logged with its detail)
    RETRYABLE              → retry_later after the policy's delay, or dead letter at max_attempts
                             or once the entry is older than max_age_ms
    RETRYABLE, unreachable → (``SendResult.unreachable``: the peer, not the message) the destination
                             is down: the entry waits for one probe (``intu_core.reachability``)
    PERMANENT              → dead letter with the reason
    send raised            → a bug in the destination: logged with the traceback, treated as RETRYABLE

A claim leases the entry to this engine for ``lease_s`` (5 minutes by default); while sends run,
one more thread renews the leases of the entries the workers hold, every third of that, so that a
slow send is never taken over by another engine sharing the queue.

Idle workers block on a ``threading.Condition`` until ``notify()`` (called after an enqueue) or
until the next retry is due. They also look at the queue every ``idle_recheck_s`` seconds (5 s by
default), so that entries put back by ``intu queue retry`` from another process are picked up
without a restart; that is a handful of cheap queries a minute, not a polling loop.

A destination found unreachable is *down*: one line says so, one summary line every 5 minutes,
one line when it is up again. Its workers claim nothing meanwhile; one of them probes it
(``Destination.probe``, or a send of the next entry) after 1 s, then 2, 4, 8 and every 15 s, and
a successful probe resumes delivery at once: the entries that failed while it was down are due
already, so a PACS that comes back gets its backlog within seconds, not after each entry's
back-off (up to ``max_delay_ms``). Attempts made while down are recorded like any other.

Configuration (under a destination in ``intu.yaml``)::

    retry: {max_attempts: 0, max_age_ms: 604800000, backoff: exponential, initial_delay_ms: 1000,
            max_delay_ms: 300000, jitter: 0.2}
    queue: {enabled: true, threads: 2, max_size: 100000}

Defaults, chosen for a DICOM router that must never lose an image: retry a retryable failure
forever (``max_attempts: 0``), backing off exponentially from 1 s to at most 5 minutes with ±20 %
jitter (so that many queued images do not hit a recovering PACS at the same instant). A PACS down
for an hour, or a weekend, costs a few hundred attempts per image and loses nothing; the queue's
depth and oldest age (``intu queue list``) are the alarm, and a source answers "out of resources"
once ``max_size`` entries are waiting. Permanent failures (the PACS refuses the image) are
dead-lettered at once. A retryable failure that never ends (a PACS answering 0xA700 to one image
for ever) is dead-lettered, with its last reason, once the entry has waited ``max_age_ms`` (7 days:
a weekend's outage still retries; ``intu queue retry`` sends it again). Set ``max_attempts`` to
dead-letter retryable failures after that many attempts instead, ``max_age_ms: 0`` to never give up.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from intu_core.logfmt import message_fields
from intu_core.message import SendResult, SendStatus
from intu_core.metrics import EngineMetrics, MetricsRegistry
from intu_core.queue import CHANNEL_QUEUE_PREFIX, DEFAULT_LEASE_S, Entry, QueueStore
from intu_core.reachability import PROBE_FIRST_S, PROBE_MAX_S, SUMMARY_EVERY_S, DestinationState, Reachability
from intu_core.types import Destination

if TYPE_CHECKING:
    from intu_core.config.section import Section

BACKOFFS = ("constant", "linear", "exponential")


class _Uniform(Protocol):
    def uniform(self, a: float, b: float) -> float: ...


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a retryable failure again, and when to give up.

    ``max_attempts``: attempts in all before dead-lettering (0 = no limit on attempts);
    ``max_age_ms``: a retryable failure of an entry enqueued longer ago than this is dead-lettered
    (0 = no limit on age). The delay after attempt *n* (1-based) is ``initial`` (constant), ``initial × n``
    (linear) or ``initial × 2^(n-1)`` (exponential), capped at ``max_delay_ms``, then scaled by a
    random factor in ``[1 - jitter, 1 + jitter]``.
    """

    max_attempts: int = 0
    backoff: str = "exponential"
    initial_delay_ms: int = 1000
    max_delay_ms: int = 300_000
    jitter: float = 0.2
    max_age_ms: int = 604_800_000  # 7 days (last: positional construction keeps its meaning)

    def __post_init__(self) -> None:
        if self.backoff not in BACKOFFS:
            raise ValueError(f"backoff must be one of {', '.join(BACKOFFS)}, not {self.backoff!r}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be between 0 and 1, not {self.jitter}")
        if min(self.max_attempts, self.initial_delay_ms, self.max_delay_ms, self.max_age_ms) < 0:
            raise ValueError("max_attempts, max_age_ms and delays must not be negative")

    def delay_s(self, attempt: int, rng: _Uniform = random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1 = the first send)."""
        n = max(1, attempt)
        if self.backoff == "constant":
            base = float(self.initial_delay_ms)
        elif self.backoff == "linear":
            base = float(self.initial_delay_ms) * n
        else:
            base = float(self.initial_delay_ms) * 2.0 ** min(n - 1, 64)  # 2^64: capped below anyway
        base = min(base, float(self.max_delay_ms))
        if self.jitter:
            base *= rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)
        return max(0.0, base) / 1000.0

    def exhausted(self, attempts: int) -> bool:
        """True when ``attempts`` attempts used up the allowance (never when max_attempts is 0)."""
        return self.max_attempts > 0 and attempts >= self.max_attempts

    def too_old(self, age_s: float) -> bool:
        """True when an entry enqueued ``age_s`` seconds ago has waited past ``max_age_ms``
        (never when max_age_ms is 0)."""
        return self.max_age_ms > 0 and age_s * 1000.0 >= self.max_age_ms


@dataclass(frozen=True)
class QueueSettings:
    """A destination's queue. ``enabled: false`` sends from the pipeline, without a durable queue
    (the source's sender then waits for the destination); ``max_size`` 0 means no limit."""

    enabled: bool = True
    max_size: int = 100_000
    threads: int = 2


def parse_retry(section: Section) -> RetryPolicy:
    """The ``retry:`` block of a destination; problems are recorded in ``section``."""
    default = RetryPolicy()
    max_attempts = section.int("max_attempts", default.max_attempts, min=0)
    backoff = section.str("backoff", default.backoff, choices=BACKOFFS)
    initial = section.int("initial_delay_ms", default.initial_delay_ms, min=0)
    maximum = section.int("max_delay_ms", max(default.max_delay_ms, initial or 0), min=0)
    jitter = section.float("jitter", default.jitter, min=0.0)
    max_age = section.int("max_age_ms", default.max_age_ms, min=0)
    if jitter > 1.0:
        section.error("jitter", f"expected a fraction from 0 to 1, found {jitter}")
        jitter = default.jitter
    if maximum < initial:
        section.error("max_delay_ms", f"expected at least initial_delay_ms ({initial}), found {maximum}")
        maximum = initial
    section.done()
    return RetryPolicy(max_attempts, backoff, initial, maximum, max(0.0, jitter), max_age)


def parse_queue(section: Section) -> QueueSettings:
    """The ``queue:`` block of a destination; problems are recorded in ``section``."""
    default = QueueSettings()
    settings = QueueSettings(
        enabled=section.bool("enabled", default.enabled),
        max_size=section.int("max_size", default.max_size, min=0),
        threads=section.int("threads", default.threads, min=1, max=64),
    )
    section.done()
    return settings


class DeliveryWorkers:
    """``threads`` workers delivering the entries of one queue to one destination.

    With one thread, entries go out in enqueue order (among those due). ``notify()`` after each
    enqueue wakes a sleeping worker. ``stop()`` lets in-flight sends finish and starts no new one.
    What happened is counted in ``metrics`` (the engine's, labelled with the queue's name; a
    registry of its own when not given); ``counts`` sums it up for this queue.
    """

    def __init__(
        self,
        store: QueueStore,
        queue_name: str,
        destination: Destination,
        policy: RetryPolicy,
        threads: int = 2,
        logger: logging.Logger | None = None,
        *,
        idle_recheck_s: float = 5.0,
        lease_s: float = DEFAULT_LEASE_S,
        metrics: EngineMetrics | None = None,
        probe_first_s: float = PROBE_FIRST_S,
        probe_max_s: float = PROBE_MAX_S,
        down_summary_s: float = SUMMARY_EVERY_S,
    ) -> None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self.store = store
        self.queue = queue_name
        self.destination = destination
        self.policy = policy
        self.threads = threads
        self.log = logger or logging.getLogger(f"intu.delivery.{queue_name}")
        self.idle_recheck_s = idle_recheck_s
        self.lease_s = lease_s
        self._held: set[str] = set()  # ids of the entries being sent, whose leases are renewed
        self._held_lock = threading.Lock()
        self._cond = threading.Condition()
        self._generation = 0  # bumped by notify(), so a wake-up between claim and wait is not lost
        self._stopping = False
        self._stop_event = threading.Event()
        self._workers: list[threading.Thread] = []
        metrics = metrics or EngineMetrics.register(MetricsRegistry())
        # Bound once: counting a send is then one locked addition.
        self._delivered = metrics.delivered.labels(queue_name)
        self._warnings = metrics.warnings.labels(queue_name)
        self._retried = metrics.retried.labels(queue_name)
        self._dead = metrics.dead_lettered.labels(queue_name)
        self._raised = metrics.send_errors.labels(queue_name)
        self._send_seconds = metrics.delivery_seconds.labels(queue_name)
        # A channel's replay queue is no destination that could be down.
        up_gauge = (
            None if queue_name.startswith(CHANNEL_QUEUE_PREFIX) else metrics.destination_up.labels(queue_name)
        )
        self._probe = getattr(destination, "probe", None)  # optional: without it, the next entry probes
        self._probing = False  # one worker probes while the destination is down; the others wait
        self.reachability = Reachability(
            queue_name,
            self.log,
            lambda: self.store.size(self.queue),
            up_gauge,
            probe_first_s=probe_first_s,
            probe_max_s=probe_max_s,
            summary_every_s=down_summary_s,
            probe_name="a probe" if self._probe is not None else "a send of the next entry",
        )

    # -- control ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._workers:
            raise RuntimeError(f"delivery workers for {self.queue} are already started")
        for i in range(self.threads):
            thread = threading.Thread(
                target=self._run, name=f"intu-deliver-{self.queue}-{i + 1}", daemon=True
            )
            self._workers.append(thread)
            thread.start()
        renewer = threading.Thread(target=self._renew_leases, name=f"intu-lease-{self.queue}", daemon=True)
        renewer.start()

    def notify(self) -> None:
        """Something was enqueued (or became due): wake one sleeping worker."""
        with self._cond:
            self._generation += 1
            self._cond.notify()

    def request_stop(self) -> None:
        """Start no new send (returns at once; ``stop`` waits for the sends in flight)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._stop_event.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Start no new send, wait up to ``timeout`` seconds for in-flight sends; True if all ended.

        An entry still in flight when the process exits is sent again after the restart
        (``QueueStore.recover``).
        """
        self.request_stop()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._workers:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
        return not any(t.is_alive() for t in self._workers)

    def state(self) -> DestinationState:
        """Whether the destination is up, since when, why not, and how many entries wait for it."""
        return self.reachability.state()

    @property
    def counts(self) -> dict[str, int]:
        """What happened to this queue's sends so far: delivered (warnings included), warnings,
        retries, dead (dead-lettered) and raised (the destination raised: a bug)."""
        children = {
            "delivered": self._delivered,
            "warnings": self._warnings,
            "retries": self._retried,
            "dead": self._dead,
            "raised": self._raised,
        }
        return {name: int(child.value) for name, child in children.items()}

    # -- the worker loop -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                generation = self._generation
            if self.reachability.is_down():
                self._wait_while_down()
                continue
            try:
                entry = self.store.claim(self.queue, lease_s=self.lease_s)
            except Exception:
                self.log.exception("queue %s: could not read the queue; trying again in 1 s", self.queue)
                self._sleep(1.0, generation)
                continue
            if entry is None:
                self._wait_for_work(generation)
                continue
            self._deliver_held(entry)

    def _deliver_held(self, entry: Entry) -> None:
        with self._held_lock:
            self._held.add(entry.id)
        try:
            self._deliver(entry)
        finally:
            with self._held_lock:
                self._held.discard(entry.id)

    # -- while the destination is down -----------------------------------------------------
    def _wait_while_down(self) -> None:
        """One worker probes (after the probe's delay); the others wait for what it finds."""
        with self._cond:
            if self._stopping:
                return
            if self._probing:
                self._cond.wait(self.idle_recheck_s)
                return
            self._probing = True
        try:
            if not self._stop_event.wait(self.reachability.next_probe_delay()):
                self._probe_once()
        finally:
            with self._cond:
                self._probing = False
                self._cond.notify_all()  # resumed (or not): every worker looks again

    def _probe_once(self) -> None:
        if not self.reachability.is_down():
            return  # a send still in flight when it went down came back delivered
        if self._probe is None:
            self._probe_by_sending()
            return
        try:
            result = self._probe()
            if not isinstance(result, SendResult):
                raise TypeError(f"probe() returned {type(result).__name__}, not a SendResult")
        except Exception:
            self.log.exception(
                "queue %s: the destination's probe raised (a bug in the destination); probing by"
                " sending the next entry from now on",
                self.queue,
            )
            self._probe = None
            return
        if result.delivered:
            self.reachability.probe_succeeded(result)
        elif result.status is SendStatus.RETRYABLE:
            self.reachability.probe_failed(result)
        else:
            # The probe cannot tell (e.g. a PACS that refuses C-ECHO): let the entries tell.
            self.log.warning(
                "queue %s: the destination's probe failed for good (%s); probing by sending the next"
                " entry from now on",
                self.queue,
                _why(result),
            )
            self._probe = None

    def _probe_by_sending(self) -> None:
        try:
            entry = self.store.claim(self.queue, lease_s=self.lease_s)
        except Exception:
            self.log.exception("queue %s: could not read the queue", self.queue)
            return
        if entry is not None:  # none: nothing waits, and the next enqueued entry will probe
            self._deliver_held(entry)

    def _renew_leases(self) -> None:
        # Wakes three times per lease (every 100 s by default): nothing measurable when idle.
        while not self._stop_event.wait(self.lease_s / 3):
            with self._held_lock:
                held = list(self._held)
            if not held:
                continue
            try:
                renewed = self.store.renew(held, self.lease_s)
            except Exception:
                self.log.exception("queue %s: could not renew the leases of entries being sent", self.queue)
                continue
            with self._held_lock:  # entries settled since the snapshot need no lease any more
                lost = len(self._held.intersection(held)) - renewed
            if lost > 0:
                self.log.warning(
                    "queue %s: %d entr(ies) being sent are no longer leased to this engine (purged, or"
                    " taken over after the lease expired): they may be sent twice",
                    self.queue,
                    lost,
                )

    def _wait_for_work(self, generation: int) -> None:
        try:
            due = self.store.next_due(self.queue)
        except Exception:
            self.log.exception("queue %s: could not read the queue", self.queue)
            due = None
        timeout = self.idle_recheck_s
        if due is not None:
            # A little late rather than early: waking before the entry is due would loop once more.
            timeout = min(timeout, max(0.0, due - time.time()) + 0.001)
        self._sleep(timeout, generation)

    def _sleep(self, timeout: float, generation: int) -> None:
        with self._cond:
            if self._stopping or self._generation != generation:
                return
            self._cond.wait(timeout)

    def _deliver(self, entry: Entry) -> None:
        attempt = entry.attempts + 1
        message = entry.message
        started = time.monotonic()
        try:
            result = self.destination.send(message)
            if not isinstance(result, SendResult):
                raise TypeError(f"send() returned {type(result).__name__}, not a SendResult")
        except Exception as exc:
            self._raised.inc()
            self.log.error(
                "queue %s: the destination raised while sending message %s (a bug in the destination;"
                " the message is kept and retried)",
                self.queue,
                message.id,
                exc_info=True,
                extra=message_fields(message),
            )
            result = SendResult.retryable(f"destination raised {type(exc).__name__}: {exc}")
        self._send_seconds.observe(time.monotonic() - started)
        self.reachability.observe(result)
        # Recording can fail for a while (the disk is full, another process holds the database
        # longer than the busy timeout). Giving up would leave the entry in flight, never claimed
        # again until a restart: keep trying, once a second, until it is recorded or we stop.
        failures = 0
        while True:
            try:
                self._record(entry, attempt, result)
                if failures:
                    self.log.info("queue %s: result of entry %s recorded at last", self.queue, entry.id)
                return
            except Exception:
                failures += 1
                if failures == 1:
                    self.log.exception(
                        "queue %s: could not record the result of sending message %s (entry %s); trying"
                        " again every second (if the engine stops first, it is sent again after the"
                        " restart)",
                        self.queue,
                        message.id,
                        entry.id,
                        extra=message_fields(message),
                    )
            if self._stop_event.wait(1.0):  # not the condition: its notify() is meant for idle workers
                return

    def _record(self, entry: Entry, attempt: int, result: SendResult) -> None:
        status = result.status
        what = f"message {entry.message.id} (entry {entry.id})"
        if result.delivered:
            self.store.complete(entry.id, result)
            self._delivered.inc()
            if status is SendStatus.WARNING:
                self._warnings.inc()
                self.log.warning(
                    "queue %s: %s delivered with a warning: %s",
                    self.queue,
                    what,
                    _why(result),
                    extra=message_fields(entry.message),
                )
            elif attempt > 1:
                self.log.info(
                    "queue %s: %s delivered after %d attempts",
                    self.queue,
                    what,
                    attempt,
                    extra=message_fields(entry.message),
                )
            elif self.log.isEnabledFor(logging.DEBUG):  # the hot path: not even the fields
                self.log.debug(
                    "queue %s: %s delivered", self.queue, what, extra=message_fields(entry.message)
                )
        elif (
            status is SendStatus.RETRYABLE
            and not self.policy.exhausted(attempt)
            and not self.policy.too_old(age := time.time() - entry.created_at)
        ):
            if result.peer_unreachable:
                # The destination is down: the entry waits for the probe, not for a back-off of
                # its own, and the outage is logged once (``Reachability``), not per entry.
                self.store.retry_later(entry.id, result, time.time())
                self._retried.inc()
                self.log.debug(
                    "queue %s: %s not delivered (attempt %d): %s; waiting for the destination",
                    self.queue,
                    what,
                    attempt,
                    _why(result),
                    extra=message_fields(entry.message),
                )
                return
            delay = self.policy.delay_s(attempt)
            self.store.retry_later(entry.id, result, time.time() + delay)
            self._retried.inc()
            self.log.info(
                "queue %s: %s not delivered (attempt %d): %s; retrying in %.1f s",
                self.queue,
                what,
                attempt,
                _why(result),
                delay,
                extra=message_fields(entry.message),
            )
        else:
            reason = "failed permanently" if status is SendStatus.PERMANENT else "gave up"
            if status is SendStatus.RETRYABLE and not self.policy.exhausted(attempt):
                # Out of time, not of attempts: say so in the reason kept with the dead letter.
                reason = f"gave up (waiting for {age / 3600:.1f} h, past retry.max_age_ms)"
                result = SendResult(
                    result.status,
                    f"gave up after {attempt} attempts over {age / 3600:.1f} h (retry.max_age_ms "
                    f"{self.policy.max_age_ms}); last: {result.detail}",
                    result.code,
                    result.data,
                )
            self.store.dead_letter(entry.id, result)
            self._dead.inc()
            self.log.error(
                "queue %s: %s dead-lettered, %s after %d attempt(s): %s (see: intu queue show %s)",
                self.queue,
                what,
                reason,
                attempt,
                _why(result),
                entry.id,
                extra=message_fields(entry.message),
            )


def _why(result: SendResult) -> str:
    text = result.detail or result.status.value
    return f"{text} (status 0x{result.code:04X})" if result.code is not None else text


__all__ = [
    "BACKOFFS",
    "DeliveryWorkers",
    "QueueSettings",
    "RetryPolicy",
    "parse_queue",
    "parse_retry",
]
