"""Sending many files over several associations: threads, or forked worker processes.

One process tops out near 1/(CPU per instance) however many associations it opens (GIL), so
``intu dicom send`` forks one worker process per association (up to the number of cores; beyond
that, the associations are shared out as threads in those processes). With the direct C-STORE
path (~0.5 ms of CPU per 512 KiB instance) two processes still beat one against ``storescp
--fork``: 1000 instances in 1.28-1.72 s against 1.61-2.01 s for the whole command (4 runs each,
2 cores, measured 2026-12-03). The parent imports pynetdicom before it forks (the workers share
it); each worker looks at its own files (``files.look``) as it sends them, unless
``cli.lookahead`` did, has its own ``DicomSender`` and reports every file's result back over a
pipe, so the summary and progress bar are the parent's as before. A worker done with its own
files takes the last ones of a worker still sending (``_Claims``): one association is often
slower than the other for a while, and the command lasts as long as the slower one (the two
finished 6-150 ms apart per 1000 instances, measured 2026-12-03).

Processes are used only where ``fork`` exists and the parent has no other thread (forking a
process with threads can copy a held lock); otherwise the threads of one process do the work.
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import zip_longest
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, cast

from intu_core import SendStatus
from intu_dicom_destination.body.rawscan import Scanned
from intu_dicom_destination.cli.files import look
from intu_dicom_destination.cli.lookahead import can_fork
from intu_dicom_destination.scu.checks import Refused, check_local_file
from intu_dicom_destination.scu.pool import SENDING_DUL_DELAY
from intu_dicom_destination.scu.sender import DicomSender
from intu_dicom_destination.scu.settings import DestinationSettings

# A file to send: its path and either what ``scan`` found (checked), or from its file meta (SOP
# class, SOP instance, transfer syntax) (the worker checks it with ``check_local_file``), or None:
# not looked at yet (the worker does, ``files.look``, and skips a file that is not DICOM).
Item = tuple[Path, Scanned | tuple[str, str, str] | None]
__all__ = ["Item", "Report", "can_fork", "plan", "send_all"]
# index into items, status (None: skipped, not a DICOM Part-10 file), detail
Report = Callable[[int, SendStatus | None, str], None]
_BATCH = 8  # results per pipe message (fewer syscalls; the progress bar lags by at most this)
_LOCK_TIMEOUT_S = 5.0


class _Claims:
    """Which worker sends each file, in memory the forked workers share. A worker claims each of
    its own files before it looks at it; done with its own, it claims the others' files from
    their ends, from the workers that have started (one that died before its first file leaves
    its files failed, as before). Every file is sent by the one worker that claimed it."""

    def __init__(self, ctx: Any, parts: Sequence[Sequence[tuple[int, Item]]], count: int) -> None:
        self.parts = parts
        self.worker = 0  # this process's worker number (1-based); set in each worker
        self._lock = ctx.Lock()
        # Anonymous mmap memory is shared with the processes forked later: per file the number
        # of the worker that claimed it (0: none), then per worker 1 once it has claimed one.
        shared = memoryview(mmap.mmap(-1, 2 * (count + len(parts)))).cast("H")
        self._by, self._started = shared[:count], shared[count:]

    def claim(self, index: int) -> bool:
        """Claim file ``index`` for this worker; False when another worker has it, or when the
        claim cannot be recorded: the lock not had within ``_LOCK_TIMEOUT_S`` (a worker killed or
        stopped while holding it). Nothing is sent unclaimed, so nothing is sent twice: such a
        file is reported not sent, and the command exits 1."""
        if not self._lock.acquire(timeout=_LOCK_TIMEOUT_S):
            return False
        try:
            if self._by[index]:
                return False
            self._by[index] = self.worker
            self._started[self.worker - 1] = 1
            return True
        finally:
            self._lock.release()

    def claimer(self, index: int) -> int:
        """The number of the worker that claimed file ``index`` (0: none)."""
        return int(self._by[index])

    def spare(self) -> list[tuple[int, Item]]:
        """The other started workers' files, from their ends, round robin (claimed as sent)."""
        others = [
            list(reversed(part))
            for k, part in enumerate(self.parts)
            if k != self.worker - 1 and self._started[k]
        ]
        return [entry for row in zip_longest(*others) for entry in row if entry is not None]


# Set in a worker process (each has its own copy of this module's globals): None in the parent.
_claims: _Claims | None = None


def _send_threads(settings: DestinationSettings, items: Sequence[tuple[int, Item]], report: Report) -> None:
    sender = DicomSender(settings, logging.getLogger("intu.dicom.send"), idle_poll_s=SENDING_DUL_DELAY)
    try:

        def one(entry: tuple[int, Item]) -> None:
            index, (path, looked) = entry
            if _claims is not None and not _claims.claim(index):
                return  # another worker sends it
            if looked is None:
                found = look(path)
                if isinstance(found, str):
                    report(index, None, found)
                    return
                looked = found
            # A file the raw walk was unsure of is read here with pydicom: a broken file is
            # refused before any association is spent on it, and the dataset's UIDs (not the
            # file meta's) are the ones sent.
            checked = looked if isinstance(looked, Scanned) else check_local_file(path)
            if isinstance(checked, Refused):
                report(index, SendStatus.PERMANENT, f"not sent: {checked.reason}")
                return
            result = sender.send_file(
                path, checked.sop_class_uid, checked.sop_instance_uid, checked.transfer_syntax_uid
            )
            report(index, result.status, result.detail)

        if settings.max_associations <= 1:
            for entry in items:
                one(entry)
            for entry in _claims.spare() if _claims is not None else ():
                one(entry)
        else:
            with ThreadPoolExecutor(max_workers=settings.max_associations) as pool:
                list(pool.map(one, items))
                list(pool.map(one, _claims.spare() if _claims is not None else ()))
    finally:
        sender.close()


def _worker(
    settings: DestinationSettings,
    items: Sequence[tuple[int, Item]],
    conn: Connection,
    claims: _Claims | None = None,
    number: int = 0,
) -> None:
    global _claims
    if claims is not None:
        claims.worker, _claims = number, claims
    # This forked process only streams files. pynetdicom builds each C-STORE command set as a
    # pydicom Dataset, and pydicom validates every value it sets (regular expressions): ~5 %
    # of the CPU per instance, for values pynetdicom generated itself.
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    batch: list[tuple[int, str | None, str]] = []
    lock = threading.Lock()

    def report(index: int, status: SendStatus | None, detail: str) -> None:
        with lock:
            batch.append((index, status.value if status is not None else None, detail))
            if len(batch) >= _BATCH:
                conn.send(batch[:])
                batch.clear()

    try:
        _send_threads(settings, items, report)
    finally:
        with lock:
            if batch:
                conn.send(batch)
        conn.close()


def plan(associations: int, files: int, cpus: int | None = None) -> list[int]:
    """Associations per worker process: one process per association up to the core count."""
    cpus = max(1, cpus or os.cpu_count() or 1)
    procs = max(1, min(associations, cpus, files))
    return [associations // procs + (1 if k < associations % procs else 0) for k in range(procs)]


def send_all(
    settings: DestinationSettings,
    items: Sequence[Item],
    report: Report,
    *,
    processes: bool | None = None,
    cpus: int | None = None,
) -> None:
    """Send ``items`` over ``settings.max_associations`` associations; ``report`` is called in
    this process (from one thread at a time) once per item. ``processes``: None = when possible."""
    indexed = list(enumerate(items))
    shares = plan(settings.max_associations, len(indexed), cpus)
    if processes is None:
        processes = len(shares) > 1 and can_fork()
    if not processes or len(shares) == 1:
        lock = threading.Lock()

        def locked(index: int, status: SendStatus | None, detail: str) -> None:
            with lock:
                report(index, status, detail)

        _send_threads(settings, indexed, locked)
        return

    # File i goes to association slot i % N; slots belong to workers by their share.
    slots = [k for k, share in enumerate(shares) for _ in range(share)]
    parts: list[list[tuple[int, Item]]] = [[] for _ in shares]
    for n, entry in enumerate(indexed):
        parts[slots[n % len(slots)]].append(entry)
    ctx = multiprocessing.get_context("fork")
    claims = _Claims(ctx, parts, len(indexed))
    workers = []
    readers: dict[Connection, int] = {}
    for k, (share, part) in enumerate(zip(shares, parts, strict=True)):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_worker,
            args=(replace(settings, max_associations=share), part, writer, claims, k + 1),
            name=f"intu-dicom-send-{k + 1}",
            daemon=True,
        )
        proc.start()
        writer.close()
        workers.append(proc)
        readers[reader] = k
    reported: set[int] = set()
    try:
        while readers:
            for ready in wait(list(readers)):
                conn = cast(Connection, ready)  # wait() returns what it was given
                try:
                    batch = conn.recv()
                except EOFError:
                    del readers[conn]
                    continue
                for index, status, detail in batch:
                    reported.add(index)
                    report(index, SendStatus(status) if status is not None else None, detail)
        for proc in workers:
            proc.join()
    finally:
        for proc in workers:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
    for k, part in enumerate(parts):
        for index, _item in part:
            if index not in reported:
                number = claims.claimer(index) or k + 1  # the worker that had it
                code = workers[number - 1].exitcode
                why = (
                    "the worker processes could not share it out (a claim timed out)"
                    if code == 0
                    else f"worker process {number} ended unexpectedly (exit code {code})"
                )
                report(index, SendStatus.RETRYABLE, f"not sent: {why}")
