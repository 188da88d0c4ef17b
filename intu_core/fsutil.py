"""Durable file writes: what 'on disk' means when we tell a sender that we have its data.

``GroupSync`` shares one fsync among threads that need the same file or folder durable at the
same time (group commit): the C-STORE path needs its spool folder and the queue's write-ahead log
synced once per instance, and with several associations those fsyncs would otherwise run one after
the other. Measured on this project's machine (2026-12-03, ext4 on a virtual disk, others' tests
running): an fsync of a received 512 KiB file 2.4-2.9 ms, of its folder after the rename 0.4-0.5 ms,
of the WAL after a commit ~1 ms; with 4 writers at once each took 2-5x longer (one disk queue).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by its path."""
    _sync_path(path, os.fsync)


def fdatasync_path(path: Path) -> None:
    """fdatasync a file by its path: its data and size, not its times (what SQLite does on Linux)."""
    _sync_path(path, os.fdatasync)


def _sync_path(path: Path, sync: Callable[[int], None]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        sync(fd)
    finally:
        os.close(fd)


SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>


def start_writeback(fd: int) -> None:
    """Start writing ``fd``'s dirty pages to disk now, without waiting (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``), so that the fsync that follows has less left to
    wait for. Only a hint: it makes nothing durable, and where the call is missing it does nothing.
    Measured 2026-12-03 on this project's machine (ext4 on a virtual disk), a 512 KiB file written
    in four 128 KiB steps 0.1 ms apart, 3 x 200 files: the fsync after it took a median of
    1.35-1.46 ms, and 1.00-1.16 ms with writeback started after each step."""
    call = _sync_file_range()
    if call is not None:
        call(fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # errors ignored: the fsync reports real ones


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    # ctypes only when first needed: `intu` commands that never receive start faster without it.
    import ctypes

    try:
        call = ctypes.CDLL(None).sync_file_range
    except (AttributeError, OSError):  # not Linux (or not glibc/musl)
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", call)


def fsync_dir(directory: Path) -> None:
    """Make a new or renamed directory entry durable (the file's own fsync does not)."""
    fsync_path(directory)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class GroupSync:
    """Runs ``sync`` (an fsync of one file or folder) on behalf of concurrent callers.

    A call returns once a run of ``sync`` that *started after the call began* has finished, so
    everything the caller wrote before calling is covered. Callers arriving while a run is in
    progress wait for it to end and then share the next run: one caller leads it, the others
    follow. A lone caller runs ``sync`` at once, with no timer or wait added.

    A run that fails raises its error in every caller it was meant to cover (each gets it: none
    is told its data is durable); later callers get a run of their own.
    """

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._cond = threading.Condition()
        self._started = 0  # runs started so far; run n is the n-th
        self._finished = 0  # runs finished (they finish in order: one at a time)
        self._running = False
        self._errors: dict[int, BaseException] = {}  # failed runs that callers still wait for
        self._waiting: dict[int, int] = {}  # run -> callers that wait for it
        self.runs = 0  # how many times ``sync`` ran (for tests and measurements)

    @property
    def waiting(self) -> int:
        """How many callers are waiting for a run (leaders included)."""
        with self._cond:
            return sum(self._waiting.values())

    def __call__(self) -> None:
        """Return when what this thread wrote before the call is durable; raise if the sync failed."""
        with self._cond:
            # A run already in progress may have started before our write: we need the next one.
            need = self._started + 1
            self._waiting[need] = self._waiting.get(need, 0) + 1
            try:
                while self._finished < need:
                    if self._running:
                        self._cond.wait()
                        continue
                    self._lead()
            finally:
                left = self._waiting[need] - 1
                if left:
                    self._waiting[need] = left
                else:
                    del self._waiting[need]
                error = self._errors.get(need)
                if not left:
                    self._errors.pop(need, None)
            if error is not None:
                raise error

    def _lead(self) -> None:
        # Called with the condition held; runs the sync without it so that others can queue up.
        self._running = True
        self._started += 1
        run = self._started
        self.runs += 1
        error: BaseException | None = None
        self._cond.release()
        try:
            self._sync()
        except BaseException as exc:  # handed to every caller this run covers
            error = exc
        finally:
            self._cond.acquire()
            self._running = False
            self._finished = run
            if error is not None and run in self._waiting:
                self._errors[run] = error
            self._cond.notify_all()


_folder_syncs: dict[str, GroupSync] = {}
_folder_syncs_lock = threading.Lock()


def _forget_folder_syncs() -> None:
    # A child forked while a thread of the parent led a sync would otherwise wait for it forever.
    global _folder_syncs_lock
    _folder_syncs.clear()
    _folder_syncs_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_folder_syncs)


def fsync_dir_shared(directory: Path) -> None:
    """``fsync_dir``, with concurrent calls for the same folder covered by one fsync.

    For threads that each renamed a file into ``directory`` and must see it durable before going
    on (receivers of several associations): one fsync of the folder covers every entry renamed
    into it before that fsync started.
    """
    key = os.path.abspath(directory)
    with _folder_syncs_lock:
        group = _folder_syncs.get(key)
        if group is None:
            group = _folder_syncs[key] = GroupSync(lambda: fsync_dir(Path(key)))
    group()
