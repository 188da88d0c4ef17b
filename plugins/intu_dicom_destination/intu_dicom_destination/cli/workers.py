"""Sending many files over several associations: threads, or forked worker processes.

One process tops out near 1/(CPU per instance) however many associations it opens (GIL), so
``intu dicom send`` forks one worker process per association (up to the number of cores; beyond
that, the associations are shared out as threads in those processes). With the direct C-STORE
path (~0.5 ms of CPU per 512 KiB instance) two processes still beat one against ``storescp
--fork``: 1000 instances in 1.28-1.72 s against 1.61-2.01 s for the whole command (4 runs each,
2 cores, measured 2026-12-03). The parent imports pynetdicom before it forks (the workers share
it); each worker looks at its own files (``files.look``) as it sends them, has its own
``DicomSender`` and reports every file's result back over a pipe, so the summary and progress bar
are the parent's as before.

Processes are used only where ``fork`` exists and the parent has no other thread (forking a
process with threads can copy a held lock); otherwise the threads of one process do the work.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import cast

from intu_core import SendStatus
from intu_dicom_destination.body.rawscan import Scanned
from intu_dicom_destination.cli.files import look
from intu_dicom_destination.scu.checks import Refused, check_local_file
from intu_dicom_destination.scu.sender import DicomSender
from intu_dicom_destination.scu.settings import DestinationSettings

# A file to send: its path and either what ``scan`` found (checked), or from its file meta (SOP
# class, SOP instance, transfer syntax) (the worker checks it with ``check_local_file``), or None:
# not looked at yet (the worker does, ``files.look``, and skips a file that is not DICOM).
Item = tuple[Path, Scanned | tuple[str, str, str] | None]
# index into items, status (None: skipped, not a DICOM Part-10 file), detail
Report = Callable[[int, SendStatus | None, str], None]
_BATCH = 8  # results per pipe message (fewer syscalls; the progress bar lags by at most this)


def _send_threads(settings: DestinationSettings, items: Sequence[tuple[int, Item]], report: Report) -> None:
    sender = DicomSender(settings, logging.getLogger("intu.dicom.send"))
    try:

        def one(entry: tuple[int, Item]) -> None:
            index, (path, looked) = entry
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
        else:
            with ThreadPoolExecutor(max_workers=settings.max_associations) as pool:
                list(pool.map(one, items))
    finally:
        sender.close()


def _worker(settings: DestinationSettings, items: Sequence[tuple[int, Item]], conn: Connection) -> None:
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


def can_fork() -> bool:
    """Forking is available and safe: no other thread could be holding a lock."""
    return "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1


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
    workers = []
    readers: dict[Connection, int] = {}
    for k, (share, part) in enumerate(zip(shares, parts, strict=True)):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_worker,
            args=(replace(settings, max_associations=share), part, writer),
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
    for k, (proc, part) in enumerate(zip(workers, parts, strict=True)):
        for index, _item in part:
            if index not in reported:
                report(
                    index,
                    SendStatus.RETRYABLE,
                    f"not sent: worker process {k + 1} ended unexpectedly (exit code {proc.exitcode})",
                )
