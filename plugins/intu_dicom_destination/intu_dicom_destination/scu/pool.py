"""The association pool of one destination: checkout, checkin, discard, an idle reaper.

At most ``max_associations`` associations are open or opening at a time. A checkout takes the
most recently used idle association that proposed the instance's (SOP class, transfer syntax),
else opens a new one through the ``open`` function it was given (the exchange's), replacing the
least recently used idle one when the pool is full. Idle associations are released after
``idle_timeout_ms`` by a reaper thread that sleeps until the next expiry: pynetdicom's threads
poll while an association is open, so an idle pooled association is not free.

While the pool owns an association its reactor is parked (``internals.park``) and its DUL thread
polls the socket fast only while pynetdicom sends on it: ``BUSY_DUL_DELAY`` (set by the exchange
for such a send; 0 is a busy loop that steals the GIL and is slower). Otherwise it only has to
notice a peer's release or abort while the association is idle, and a direct C-STORE
(``scu.direct``) keeps it off the socket: ``IDLE_DUL_DELAY`` (20 ms), ``DEEP_IDLE_DUL_DELAY``
once idle for ``DEEP_IDLE_AFTER`` seconds. At pynetdicom's 1 ms, the DUL threads of two busy
associations woke 2000 times a second, each time taking the interpreter lock from the receiving
and delivering threads: route, 500 x 512 KiB, ``intu serve`` CPU 9.5-10.3 ms per instance at 1 ms
against 6.6-7.3 ms at 20 ms (3 pairs of runs, 2026-12-03, a loaded machine).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from intu_core import SendResult
from intu_dicom_destination import internals
from intu_dicom_destination.scu.contexts import Key
from intu_dicom_destination.scu.settings import DestinationSettings

BUSY_DUL_DELAY = 0.0001
# A peer's release or abort is noticed within this (a checkout in that window sends on a dead
# association: the send fails and is retried once on a new one, ``DicomSender.send_file``).
IDLE_DUL_DELAY = 0.02
# With the reactor parked this is the only poll of an idle pooled association (~2.5 % of a core
# at 1 ms, ~0.6 % at 5 ms); a pynetdicom send after such a spell waits at most one sleep.
DEEP_IDLE_DUL_DELAY = 0.05
DEEP_IDLE_AFTER = 1.0
# For a sender that sends back to back and then closes (``intu dicom send``): the release at its
# end waits up to two sleeps of the DUL thread (the A-RELEASE-RQ goes out, then the answer is
# read), 15-35 ms at IDLE_DUL_DELAY against 12-16 ms at this, pynetdicom's own default (1000 x
# 512 KiB, 2 associations, no difference in CPU; measured 2026-12-03).
SENDING_DUL_DELAY = 0.001
# Keep at most this many (SOP class, transfer syntax) pairs to propose on new associations.
MAX_REMEMBERED = 64


@dataclass
class PooledAssociation:
    """An association the pool owns, with what it proposed and what the peer accepted."""

    assoc: Any  # pynetdicom.association.Association
    number: int
    proposed: frozenset[Key]
    accepted: frozenset[Key]
    sends: int = 0
    last_used: float = field(default_factory=time.monotonic)
    deep_idle: bool = False  # its DUL polls slowly (DEEP_IDLE_AFTER)
    direct: Any = None  # its scu.direct.DirectStore, made at the first C-STORE


class NoAssociation(Exception):
    """No association could be had; ``result`` says why (retryable or permanent)."""

    def __init__(self, result: SendResult) -> None:
        super().__init__(result.detail)
        self.result = result


#: Opens an association proposing ``key`` first, then the pairs seen recently.
Opener = Callable[[Key, list[Key]], PooledAssociation]


class AssociationPool:
    """Up to ``settings.max_associations`` reusable associations to one peer. Thread-safe."""

    def __init__(
        self,
        settings: DestinationSettings,
        open: Opener,
        logger: logging.Logger,
        *,
        idle_poll_s: float = IDLE_DUL_DELAY,
    ) -> None:
        self.settings = settings
        self.logger = logger
        self._open = open
        self._idle_poll_s = idle_poll_s
        self._cond = threading.Condition()
        self._idle: list[PooledAssociation] = []
        self._count = 0  # open or opening associations (idle + busy)
        self._closed = False
        self._known: OrderedDict[Key, None] = OrderedDict()
        self._reaper: threading.Thread | None = None

    @property
    def open_associations(self) -> int:
        """Associations open or opening (idle and checked out)."""
        with self._cond:
            return self._count

    def idle(self) -> list[PooledAssociation]:
        """The idle associations, least recently used first (a snapshot)."""
        with self._cond:
            return list(self._idle)

    def checkout(self, key: Key) -> PooledAssociation:
        """An association that proposed ``key``; raises ``NoAssociation`` when none can be had."""
        to_release: list[PooledAssociation] = []
        # Wait at most timeout_ms for a free slot: all associations busy for that long (e.g.
        # more queue workers than max_associations, sending large instances) means "later".
        deadline = time.monotonic() + self.settings.timeout_ms / 1000
        try:
            with self._cond:
                self._known[key] = None
                self._known.move_to_end(key, last=False)
                while len(self._known) > MAX_REMEMBERED:
                    self._known.popitem(last=True)
                while True:
                    if self._closed:
                        raise NoAssociation(SendResult.retryable("destination is shutting down"))
                    now = time.monotonic()
                    for pooled in list(self._idle):
                        if not internals.healthy(pooled.assoc) or self._expired(pooled, now):
                            self._idle.remove(pooled)
                            self._count -= 1
                            to_release.append(pooled)
                    for pooled in reversed(self._idle):  # most recently used first
                        if key in pooled.proposed:
                            self._idle.remove(pooled)
                            return pooled
                    if self._count < self.settings.max_associations:
                        self._count += 1
                        break
                    if self._idle:
                        # Every free association lacks this SOP class / transfer syntax:
                        # replace the least recently used one by one that proposes it.
                        to_release.append(self._idle.pop(0))
                        break  # count stays: the new one takes the old one's place
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise NoAssociation(
                            SendResult.retryable(
                                f"no association to {self.settings.address} available within "
                                f"{self.settings.timeout_ms} ms (all {self.settings.max_associations} "
                                "busy); will retry later"
                            )
                        )
                    self._cond.wait(timeout=remaining)
                proposals = list(self._known)
        finally:
            for pooled in to_release:
                self._release(pooled)
        try:
            return self._open(key, proposals)
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def checkin(self, pooled: PooledAssociation) -> None:
        """Give a healthy association back after a send."""
        pooled.last_used = time.monotonic()
        pooled.deep_idle = False
        internals.set_poll_delay(pooled.assoc, self._idle_poll_s)
        release = False
        with self._cond:
            if self._closed or self.settings.idle_timeout_ms == 0 or not pooled.assoc.is_established:
                self._count -= 1
                release = True
            else:
                self._idle.append(pooled)
                self._ensure_reaper()
            self._cond.notify_all()
        if release:
            self._release(pooled)

    def discard(self, pooled: PooledAssociation) -> None:
        """Abort an association that must not be reused; its slot is free at once."""
        with self._cond:
            self._count -= 1
            self._cond.notify_all()
        try:
            internals.unpark(pooled.assoc)
            if pooled.assoc.is_established:
                pooled.assoc.abort()
        except Exception:  # noqa: BLE001 - the slot is free already; the caller has its result
            self.logger.warning(
                "cannot abort association #%d to %s", pooled.number, self.settings.address, exc_info=True
            )

    def close(self) -> None:
        """Release every idle association and stop the reaper. Idempotent."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for pooled in idle:
            self._release(pooled)
        if self._reaper is not None and self._reaper is not threading.current_thread():
            self._reaper.join(timeout=5)

    def _expired(self, pooled: PooledAssociation, now: float) -> bool:
        return now - pooled.last_used >= self.settings.idle_timeout_ms / 1000

    def _release(self, pooled: PooledAssociation) -> None:
        """Release an association that is no longer counted in the pool; never raises (it is
        called with other associations' slots at stake)."""
        assoc = pooled.assoc
        try:
            was_healthy = internals.healthy(assoc)
            internals.unpark(assoc)
            if not was_healthy and assoc.is_alive():
                # The (parked) reactor now handles what the peer sent while we were idle: it
                # answers a release request or notices the abort, and ends.
                assoc.join(1.0)
            if assoc.is_established:
                # The DUL thread sends the A-RELEASE-RQ and reads the answer between its idle
                # sleeps (20-50 ms while pooled): `intu dicom send` ended 20-40 ms after its last
                # instance waiting for them (measured 2026-12-03).
                internals.set_poll_delay(assoc, BUSY_DUL_DELAY)
                try:
                    assoc.release()
                except Exception:  # noqa: BLE001 - a dying peer must not break the caller
                    assoc.abort()
                self.logger.debug("released association #%d to %s", pooled.number, self.settings.address)
        except Exception:  # noqa: BLE001
            self.logger.warning(
                "cannot release association #%d to %s", pooled.number, self.settings.address, exc_info=True
            )

    def _ensure_reaper(self) -> None:
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(
                target=self._reap, name=f"intu-dicom-idle-{self.settings.called_ae_title}", daemon=True
            )
            self._reaper.start()

    def _reap(self) -> None:
        # Sleeps until the oldest idle association expires (no polling while nothing is idle),
        # or until one has been idle long enough to poll its socket less often.
        while True:
            expired: list[PooledAssociation] = []
            with self._cond:
                if self._closed:
                    return
                if not self._idle:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                idle_s = self.settings.idle_timeout_ms / 1000
                for pooled in list(self._idle):
                    if now - pooled.last_used >= idle_s or not internals.healthy(pooled.assoc):
                        self._idle.remove(pooled)
                        self._count -= 1
                        expired.append(pooled)
                if not expired:
                    wake = min(p.last_used for p in self._idle) + idle_s
                    for pooled in self._idle:
                        if pooled.deep_idle:
                            continue
                        if now - pooled.last_used >= DEEP_IDLE_AFTER:
                            internals.set_poll_delay(pooled.assoc, DEEP_IDLE_DUL_DELAY)
                            pooled.deep_idle = True
                        else:
                            wake = min(wake, pooled.last_used + DEEP_IDLE_AFTER)
                    self._cond.wait(timeout=max(0.01, wake - now))
                    continue
                self._cond.notify_all()
            for pooled in expired:
                self._release(pooled)
