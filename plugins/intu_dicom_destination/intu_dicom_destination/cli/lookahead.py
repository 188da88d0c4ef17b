"""Looking at the files to send while `intu dicom send` is still starting.

Importing pydicom and pynetdicom takes the command's first ~0.35 s of one core, and the other
core has nothing to do meanwhile. A child process forked before those imports walks the files'
raw element headers (``body.rawscan.scan``: the same check a worker does before it sends a file,
~0.1-0.25 ms of CPU per 512 KiB instance) and hands back what it found; the workers then send
those files without walking them again. The parent never waits for the child: when its imports
are done it stops the child and takes what arrived, and the files the child did not reach (or
was unsure of) are looked at by the workers, as before.
"""

from __future__ import annotations

import contextlib
import marshal
import multiprocessing
import os
import select
import signal
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from intu_dicom_destination.cli.files import Scanned, scan

__all__ = ["Lookahead", "can_fork"]

_BATCH = 32  # results per message
_FRAME = struct.Struct(">I")
# Room for every result of a few thousand files: the child must not wait for the parent, which
# reads only when its imports are done (Linux allows 1 MiB per pipe to any user by default).
_PIPE_SIZE = 1024 * 1024
_MIN_FILES = 8  # fewer: the workers' own look costs less than the fork

# What the child sends per file: (SOP class, SOP instance, transfer syntax, dataset offset, size)
# or None (not sure, or not readable: the worker looks again and says why).
_Found = tuple[str, str, str, int, int] | None


def can_fork() -> bool:
    """Forking is available and safe: no other thread could be holding a lock."""
    return "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1


class Lookahead:
    """A child process looking at ``files`` in order; ``results()`` stops it and returns what it
    found. Use ``start`` (None when it is not worth a process, or forking is not safe)."""

    def __init__(self, files: Sequence[Path], pid: int, fd: int) -> None:
        self.files = list(files)
        self._pid = pid
        self._fd = fd

    @classmethod
    def start(cls, files: Sequence[Path]) -> Lookahead | None:
        """Fork the child that looks at ``files``, or None (too few files, or no safe fork)."""
        if len(files) < _MIN_FILES or not can_fork():
            return None
        try:
            read_fd, write_fd = os.pipe()
        except OSError:  # (no descriptor left): the workers look at every file, as without it
            return None
        with contextlib.suppress(ImportError, OSError, AttributeError):  # Linux; else it waits
            import fcntl

            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        try:
            pid = os.fork()
        except OSError:  # (no memory or process left): as above
            os.close(read_fd)
            os.close(write_fd)
            return None
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.close(read_fd)
                # Only ahead of need: on a busy machine the parent's imports come first.
                with contextlib.suppress(OSError):
                    os.nice(10)
                _look_at(files, write_fd)
                code = 0
            finally:
                os._exit(code)  # no atexit handlers, no buffers of the parent's flushed twice
        os.close(write_fd)
        return cls(files, pid, read_fd)

    def results(self, wait_s: float = 0.0) -> list[Scanned | None]:
        """Per file what the child's walk found (the UIDs and where the dataset starts: the
        elements stay in the child), None for the files it did not decide. Called once. The
        child is stopped (killed: it only reads files) unless it is done or finishes within
        ``wait_s``; every message it wrote before is still in the pipe."""
        data = bytearray()
        deadline = time.monotonic() + wait_s
        try:
            poller = select.poll()
            poller.register(self._fd, select.POLLIN)
            done = False
            while not done and (left := deadline - time.monotonic()) > 0 and poller.poll(int(left * 1000)):
                chunk = os.read(self._fd, 1 << 20)
                data += chunk
                done = not chunk  # the child closed its end: it has finished
            if not done:  # still looking (or blocked on a full pipe): stop it, read what it wrote
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._pid, signal.SIGKILL)
                while chunk := os.read(self._fd, 1 << 20):
                    data += chunk
        finally:
            os.close(self._fd)
            self._fd = -1
            with contextlib.suppress(ChildProcessError):  # SIGCHLD ignored: reaped already
                os.waitpid(self._pid, 0)
        found: list[Scanned | None] = [None] * len(self.files)
        pos = 0
        while pos + _FRAME.size <= len(data):
            (length,) = _FRAME.unpack_from(data, pos)
            end = pos + _FRAME.size + length
            if end > len(data):
                break  # the child was stopped while it wrote this one
            first, batch = marshal.loads(data[pos + _FRAME.size : end])
            for index, item in enumerate(batch, first):
                if item is not None:
                    sop_class, sop_instance, syntax, offset, size = item
                    found[index] = Scanned(sop_class, sop_instance, syntax, offset, size=size)
            pos = end
        return found


def _look_at(files: Sequence[Path], fd: int) -> None:
    batch: list[_Found] = []
    first = 0
    for index, path in enumerate(files):
        try:
            scanned = scan(path)
        except Exception:  # noqa: BLE001 - the worker looks again and reports why
            scanned = None
        # Only what sending needs: the element index stays here (the file is sent as it is).
        batch.append(
            None
            if scanned is None
            else (
                scanned.sop_class_uid,
                scanned.sop_instance_uid,
                scanned.transfer_syntax_uid,
                scanned.dataset_offset,
                scanned.size,
            )
        )
        if len(batch) == _BATCH or index == len(files) - 1:
            message = marshal.dumps((first, batch))
            _write_all(fd, _FRAME.pack(len(message)) + message)
            first, batch = index + 1, []


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
