"""Latency tuning of pynetdicom requestor associations (measured: see issue 6, PERF-NOTES).

pynetdicom hands every C-STORE over between threads that poll; on one association that costs
more wall time than the work itself (~3x CPU time). Two polls dominate on the sending side:

* The association's reactor thread sleeps 1 ms per loop, and ``send_c_store`` waits (0.1 ms
  steps) for it to *pause* before sending, so every C-STORE waits ~0.5-1 ms for nothing. A
  requestor that only sends (a C-STORE SCU) needs its reactor only to notice, while idle, that
  the peer released or aborted. We **park** the reactor for as long as the association is ours
  (a ``_ReactorGate`` replaces ``Association._reactor_checkpoint`` and ignores the ``set()`` that
  each ``send_*`` does at its end) and do those idle checks ourselves before each checkout
  (``healthy``). Parking also closes a pynetdicom race: the running reactor can take the
  C-STORE response off the DIMSE queue before ``send_c_store`` does (seen as a 60 s "no
  response" stall, one in a few thousand sends).
* The DUL thread sleeps ``_run_loop_delay`` (1 ms) whenever it has nothing to do: between
  P-DATA fragments the sender has not produced yet, and while waiting for the response. While
  an association is checked out we lower it to ``BUSY_DUL_DELAY`` (0.1 ms; 0 is a busy loop
  that steals the GIL and is slower); back in the pool it is pynetdicom's 1 ms again, and 5 ms
  once idle for a second (the pool's reaper does that), so an idle pooled association costs
  less than before (parked reactor, slower DUL poll).

Measured (1000 x 512 KiB into DCMTK storescp, one association, noisy 2-core machine): plain
~250-330 img/s; parked reactor ~320-400; parked + 0.1 ms DUL delay ~500-560 img/s.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

BUSY_DUL_DELAY = 0.0001
IDLE_DUL_DELAY = 0.001  # back in the pool: pynetdicom's default (the next checkout may be soon)
# Idle in the pool for DEEP_IDLE_AFTER seconds: poll every 5 ms. With the reactor parked this is
# the only poll of an idle pooled association (~2.5 % of a core at 1 ms, ~0.6 % at 5 ms); the
# first send after such a spell waits at most one 5 ms sleep.
DEEP_IDLE_DUL_DELAY = 0.005
DEEP_IDLE_AFTER = 1.0
_PARK_TIMEOUT = 0.5


class _ReactorGate(threading.Event):
    """``Association._reactor_checkpoint`` that stays cleared while ``held``.

    pynetdicom's ``send_*`` methods clear the checkpoint, wait for the reactor to pause, and set
    it again at the end; held, the ``set()`` is ignored, so the reactor stays parked in its
    ``wait()`` between sends. Abort and kill paths are honoured (the reactor must be able to
    exit)."""

    def __init__(self, assoc: Any) -> None:
        super().__init__()
        self._assoc = assoc
        self.held = True

    def set(self) -> None:
        a = self._assoc
        if (
            not self.held
            or getattr(a, "_sent_abort", False)
            or getattr(a, "_kill", False)
            or getattr(a, "is_released", False)
            or getattr(a, "is_aborted", False)
        ):
            super().set()

    def parked(self) -> bool:
        """The reactor thread is blocked in our ``wait()``."""
        cond = getattr(self, "_cond", None)
        return bool(getattr(cond, "_waiters", None))

    def unhold(self) -> None:
        self.held = False
        super().set()


def park(assoc: Any) -> bool:
    """Park the reactor of an established requestor association until ``unpark``.

    Returns False (and leaves the reactor running) when it cannot be confirmed parked."""
    if not getattr(assoc, "is_established", False) or isinstance(assoc._reactor_checkpoint, _ReactorGate):
        return isinstance(getattr(assoc, "_reactor_checkpoint", None), _ReactorGate)
    gate = _ReactorGate(assoc)
    old = assoc._reactor_checkpoint
    assoc._reactor_checkpoint = gate
    old.set()  # a reactor paused on the old event goes round once and waits on the gate
    deadline = time.monotonic() + _PARK_TIMEOUT
    while not gate.parked():
        if time.monotonic() > deadline or not assoc.is_alive():
            gate.unhold()
            return False
        time.sleep(0.00005)
    # pynetdicom's send_* wait for this flag; the reactor set it just before waiting.
    return True


def unpark(assoc: Any) -> None:
    """Let the reactor run again (before release/abort, or to let it handle a peer's PDU)."""
    gate = getattr(assoc, "_reactor_checkpoint", None)
    if isinstance(gate, _ReactorGate):
        gate.unhold()


def is_parked(assoc: Any) -> bool:
    gate = getattr(assoc, "_reactor_checkpoint", None)
    return isinstance(gate, _ReactorGate) and gate.held


def healthy(assoc: Any) -> bool:
    """What the parked reactor would have noticed while the association sat idle: the DUL
    thread ended (connection closed), an abort, or a release request from the peer. Anything
    on the DUL's to-user queue of an idle C-STORE SCU association is one of those."""
    if not assoc.is_established:
        return False
    dul = assoc.dul
    if not dul.is_alive():
        return False
    try:
        if dul.to_user_queue.qsize():
            return False
        if assoc.dimse.msg_queue.qsize():  # a stray message (or an abort's (None, None))
            return False
    except AttributeError:
        return True
    return True


def busy(assoc: Any) -> None:
    """The association is about to send: poll the socket at 0.1 ms instead of 1 ms."""
    dul = getattr(assoc, "dul", None)
    if dul is not None:
        dul._run_loop_delay = BUSY_DUL_DELAY


def idle(assoc: Any, deep: bool = False) -> None:
    dul = getattr(assoc, "dul", None)
    if dul is not None:
        dul._run_loop_delay = DEEP_IDLE_DUL_DELAY if deep else IDLE_DUL_DELAY


# P-DATA primitives waiting for the DUL thread. pynetdicom's queue has no limit, and reading a file
# is faster than a socket drains: a 1 GiB instance piled up in memory (measured: RSS 540 MiB to
# 1 GiB). Bounded, the sender waits for the socket instead (RSS stays ~70 MiB).
SEND_QUEUE_ITEMS = 64


class _BoundedSendQueue(queue.Queue):  # type: ignore[type-arg]
    """``DULServiceProvider.to_provider_queue`` with a limit, whose ``put`` gives up when the
    DUL thread is gone (an aborted association), instead of blocking for ever."""

    def __init__(self, dul: Any, maxsize: int) -> None:
        super().__init__(maxsize)
        self._dul = dul

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        while True:
            try:
                super().put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._dul.is_alive() or getattr(self._dul, "_kill_thread", False):
                    raise RuntimeError("the association ended while sending") from None


def bound_send_queue(assoc: Any, maxsize: int = SEND_QUEUE_ITEMS) -> None:
    """Give an established association a bounded send queue (keeps what is already queued)."""
    dul = assoc.dul
    bounded = _BoundedSendQueue(dul, maxsize)
    old = dul.to_provider_queue
    dul.to_provider_queue = bounded
    while True:  # nothing should be queued between negotiation and the first send; be safe
        try:
            bounded.queue.append(old.get_nowait())
        except queue.Empty:
            break


def quiet_pynetdicom() -> None:
    """pynetdicom logs two INFO lines per C-STORE ('Sending Store Request', 'Received Store
    Response'; the SCP side likewise). Keep them only when intu runs at debug level."""
    pn = logging.getLogger("pynetdicom")
    if pn.level == logging.NOTSET and logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        pn.setLevel(logging.WARNING)
