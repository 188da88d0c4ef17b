"""Whether a destination can be reached: down and up again, from its sends and one probe.

A PACS that is switched off must not cost one log line and one back-off per queued image. The
delivery workers of a destination tell its ``Reachability`` what each send found:

- a result made by ``SendResult.unreachable`` (connection refused, no answer, association
  refused for now) marks the destination **down**: one WARNING line, then one summary line every
  ``summary_every_s`` (5 minutes) while it stays down. Its workers stop claiming entries; one of
  them probes (``Destination.probe``, a C-ECHO for DICOM; without one, by sending the next entry)
  after 1 s, then 2, 4, 8 and every 15 s;
- a successful probe **resumes** delivery at once (the entries that failed while it was down are
  due already); the first answer from the peer after that (delivered, refused for good, or any
  status code) confirms that it is **up**: one INFO line. A send that finds it unreachable again
  before that is the same outage (no new line, the probe keeps its longer delay), so a peer that
  answers C-ECHO but refuses every store does not flood the log either.

Everything here is in memory: after a restart a destination starts up, and the first send tells.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from intu_core.message import SendResult, SendStatus
from intu_core.metrics import GaugeChild

#: Seconds before the first probe of an outage, and the cap of the doubling delay between probes.
PROBE_FIRST_S = 1.0
PROBE_MAX_S = 15.0
#: Seconds between the summary lines of an outage.
SUMMARY_EVERY_S = 300.0


@dataclass(frozen=True)
class DestinationState:
    """Whether a destination is up, as its delivery workers last found it.

    ``since`` (epoch seconds): when it went down, or when it was last found up again (the engine's
    start when it never went down); ``last_error``: why it is down (the last failed send or
    probe), empty when up; ``waiting``: its entries pending or in flight (-1 when the queue
    cannot be read)."""

    up: bool
    since: float
    last_error: str = ""
    waiting: int = 0


class Reachability:
    """The up/down state of one destination, shared by its delivery workers (thread-safe).

    ``waiting()`` counts the destination's queued entries, for the log lines (called once per
    outage and per summary, never per send); ``gauge`` is its ``intu_destination_up`` child."""

    def __init__(
        self,
        name: str,
        log: logging.Logger,
        waiting: Callable[[], int],
        gauge: GaugeChild | None = None,
        *,
        probe_first_s: float = PROBE_FIRST_S,
        probe_max_s: float = PROBE_MAX_S,
        summary_every_s: float = SUMMARY_EVERY_S,
        probe_name: str = "a probe",
    ) -> None:
        self.name = name
        self.log = log
        self._waiting = waiting
        self._gauge = gauge
        self.probe_first_s = probe_first_s
        self.probe_max_s = max(probe_first_s, probe_max_s)
        self.summary_every_s = summary_every_s
        self.probe_name = probe_name  # "a C-ECHO", or "the next entry": what the lines say
        self._lock = threading.Lock()
        self._since = time.time()
        self._down_since: float | None = None  # None: up
        self._resumed = False  # a probe succeeded; the next answer from the peer confirms it
        self._last_error = ""
        self._delay = probe_first_s
        self._probes = 0
        self._failed_sends = 0
        self._summary_at = 0.0
        if gauge is not None:
            gauge.set(1)

    # -- what the workers ask ----------------------------------------------------------------
    def is_down(self) -> bool:
        """True while sends should wait for a probe (down, and no probe has succeeded since)."""
        return self._down_since is not None and not self._resumed

    def state(self) -> DestinationState:
        """The state now, with the number of entries waiting."""
        up, since, last_error = self.snapshot()
        return DestinationState(up=up, since=since, last_error=last_error, waiting=self._count_waiting())

    def snapshot(self) -> tuple[bool, float, str]:
        """``state()`` without counting the entries waiting: up, since, last error."""
        with self._lock:
            down, since, error = self.is_down(), self._down_since, self._last_error
            up_since = self._since
        return not down, since if down and since is not None else up_since, error if down else ""

    def next_probe_delay(self) -> float:
        """Seconds to wait before the next probe: doubling from ``probe_first_s`` to ``probe_max_s``."""
        with self._lock:
            delay = self._delay
            self._delay = min(self._delay * 2.0, self.probe_max_s)
            return delay

    # -- what the workers tell -----------------------------------------------------------------
    def observe(self, result: SendResult) -> None:
        """A send ended with ``result`` (cheap when up: called after every send)."""
        if result.peer_unreachable:
            self._unreachable(result.detail, probing=False)
        elif self._down_since is not None and _peer_answered(result):
            self._up(f"a send got a {result.status.value} answer")

    def probe_succeeded(self, result: SendResult) -> None:
        """The probe reached the peer: delivery resumes (confirmed by the next send's answer)."""
        with self._lock:
            if self._down_since is None:
                return
            self._resumed = True
            self._probes += 1
        if self._gauge is not None:
            self._gauge.set(1)
        self.log.debug(
            "destination %s answered %s (%s): resuming delivery", self.name, self.probe_name, result.detail
        )
        if self._count_waiting() == 0:  # nothing to send that would confirm it
            self._up(result.detail or "probe succeeded")

    def probe_failed(self, result: SendResult) -> None:
        """The probe did not reach the peer: still down; a summary line when one is due."""
        with self._lock:
            self._probes += 1
        self._unreachable(result.detail, probing=True)

    # -- transitions ---------------------------------------------------------------------------
    def _unreachable(self, why: str, *, probing: bool) -> None:
        now = time.time()
        with self._lock:
            self._last_error = why
            if not probing:
                self._failed_sends += 1
            started = self._down_since is None
            relapse = not started and self._resumed
            if started:
                self._down_since = now
                self._summary_at = now + self.summary_every_s
                self._delay = self.probe_first_s
                self._probes = 0
                self._failed_sends = 1
            self._resumed = False
            summary_due = not started and not relapse and now >= self._summary_at
            if summary_due:
                self._summary_at = now + self.summary_every_s
            since = self._down_since
        if self._gauge is not None:
            self._gauge.set(0)
        if started:
            waiting = self._count_waiting()
            self.log.warning(
                "destination %s is down: %s; its %d waiting entr(ies) wait for %s (after %.0f s, then"
                " at most every %.0f s) instead of each retrying",
                self.name,
                why,
                waiting,
                self.probe_name,
                self.probe_first_s,
                self.probe_max_s,
                extra=self._fields("down", waiting),
            )
        elif relapse:
            self.log.debug(
                "destination %s answered %s but a send failed: still down: %s",
                self.name,
                self.probe_name,
                why,
            )
        elif summary_due:
            assert since is not None
            waiting = self._count_waiting()
            self.log.warning(
                "destination %s still down since %s (%s): %d entr(ies) waiting, %d probe(s) and %d"
                " failed send(s) so far; last error: %s",
                self.name,
                _clock(since),
                _duration(now - since),
                waiting,
                self._probes,
                self._failed_sends,
                why,
                extra=self._fields("down", waiting),
            )

    def _up(self, how: str) -> None:
        now = time.time()
        with self._lock:
            since = self._down_since
            if since is None:
                return
            self._down_since = None
            self._resumed = False
            self._since = now
            self._last_error = ""
            probes, failed = self._probes, self._failed_sends
        if self._gauge is not None:
            self._gauge.set(1)
        waiting = self._count_waiting()
        self.log.info(
            "destination %s is up again (%s) after %s down since %s (%d probe(s), %d failed send(s));"
            " delivering the %d entr(ies) waiting",
            self.name,
            how,
            _duration(now - since),
            _clock(since),
            probes,
            failed,
            waiting,
            extra={**self._fields("up", waiting), "down_seconds": round(now - since, 3)},
        )

    def _fields(self, state: str, waiting: int) -> dict[str, object]:
        """The structured fields of a state line (JSON log keys)."""
        return {"destination": self.name, "destination_state": state, "waiting": waiting}

    def _count_waiting(self) -> int:
        try:
            return self._waiting()
        except Exception:  # a state line without the count beats no state line
            self.log.debug("cannot count the entries waiting for %s", self.name, exc_info=True)
            return -1


def _peer_answered(result: SendResult) -> bool:
    """Whether a result shows the peer was reached: delivered, refused for good, or a status code."""
    return result.status is not SendStatus.RETRYABLE or result.code is not None


def _clock(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


__all__ = ["PROBE_FIRST_S", "PROBE_MAX_S", "SUMMARY_EVERY_S", "DestinationState", "Reachability"]
