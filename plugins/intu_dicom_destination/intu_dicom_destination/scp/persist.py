"""Persisting a received instance: pynetdicom's temporary file moved into the spool folder and
made durable before the C-STORE is answered.

The file is fsynced on its own; the folder's fsync, which makes its new name durable, is shared by
the associations that renamed a file into it at the same time (``fsync_dir_shared``): one fsync
covers every rename made before it started, so with several associations the folder is synced
about once per round of receptions instead of once per instance.
"""

from __future__ import annotations

import errno
import os
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.uid import DeflatedExplicitVRLittleEndian

from intu_core.fsutil import fsync_dir_shared, fsync_path
from intu_dicom_destination.body import inflate_part10

_COPY_CHUNK = 1024 * 1024
#: A deflated instance may always inflate to this much, whatever its ratio (tiny datasets of
#: repeated values compress far more than images).
_INFLATE_FLOOR = 16 * 1024 * 1024


class InflateLimit(Exception):
    """A deflated instance inflates past ``max_inflate_ratio`` or ``max_instance_mb``: a deflate bomb."""


class _Bounded:
    """A writable file that refuses to grow past ``limit`` bytes (checked while writing)."""

    def __init__(self, dest: BinaryIO, limit: int, why: str) -> None:
        self._dest = dest
        self._limit = limit
        self._why = why
        self._written = 0

    def write(self, data: Any) -> int:
        """Write ``data`` unless the limit would be exceeded."""
        self._written += len(data)
        if self._written > self._limit:
            raise InflateLimit(self._why)
        return self._dest.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dest, name)


def persist(temp: Path, path: Path, transfer_syntax: str, *, max_bytes: int = 0, max_ratio: int = 0) -> None:
    """Move pynetdicom's temporary Part-10 file to ``path`` and make it durable (file and folder
    fsynced: on return a power cut cannot lose it); a deflated instance is stored inflated, to at
    most ``max_ratio`` times its size (and ``max_bytes``; 0 = no limit), else ``InflateLimit`` and
    nothing is left at ``path``."""
    begin_persist(temp, path, transfer_syntax, max_bytes=max_bytes, max_ratio=max_ratio)()


def begin_persist(
    temp: Path, path: Path, transfer_syntax: str, *, max_bytes: int = 0, max_ratio: int = 0
) -> Callable[[], None]:
    """``persist``, in two halves: the file is at ``path`` on return (and nothing is left at
    ``temp``), and the returned function waits until it and its folder are fsynced (raising the
    ``OSError`` of a failed fsync). Between the two the caller checks the file, which reads the
    page cache: the fsyncs (~2 ms for a 512 KiB instance here, the file's and the folder's at the
    same time) overlap that work instead of adding to every C-STORE's round trip. A deflated
    instance is inflated and synced at once."""
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        # Bulk-data offsets cannot point into a deflated stream: store it inflated.
        limit = max(temp.stat().st_size * max_ratio, _INFLATE_FLOOR) if max_ratio else 1 << 62
        why = f"inflates to more than {max_ratio}x its {temp.stat().st_size} bytes"
        if max_bytes and max_bytes < limit:
            limit, why = max_bytes, f"inflates to more than {max_bytes // (1024 * 1024)} MiB"
        with open(temp, "rb") as src, open(path, "wb") as raw:
            dest = _Bounded(raw, limit, why)
            inflate_part10(src, dest)  # type: ignore[arg-type]
            dest.flush()
            os.fsync(dest.fileno())
        fsync_dir_shared(path.parent)
        temp.unlink(missing_ok=True)
        return _done
    try:
        os.replace(temp, path)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with open(temp, "rb") as src, open(path, "wb") as copy:
            shutil.copyfileobj(src, copy, _COPY_CHUNK)
        temp.unlink(missing_ok=True)
    syncs = (_Sync(fsync_path, path), _Sync(fsync_dir_shared, path.parent))

    def wait() -> None:
        for sync in syncs:
            sync.result()

    return wait


def _done() -> None:
    return None


class _Sync:
    """One fsync run by the syncer threads (which release the GIL in it) while the receiving
    thread goes on; ``result()`` waits for it and raises its error. Lighter than a
    ``ThreadPoolExecutor`` (whose ``submit`` and ``Future`` cost ~30 us a call, a tenth of the
    receiving thread's time): a lock held until it is done, a C queue to the threads."""

    __slots__ = ("_fn", "_arg", "_done", "_error")

    def __init__(self, fn: Callable[[Path], None], arg: Path) -> None:
        self._fn, self._arg = fn, arg
        self._error: BaseException | None = None
        self._done = threading.Lock()
        self._done.acquire()
        _queue().put(self)

    def run(self) -> None:
        """Run the fsync (in a syncer thread)."""
        try:
            self._fn(self._arg)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self._error = exc
        finally:
            self._done.release()

    def result(self) -> None:
        """Wait until the fsync is done; raise its error."""
        with self._done:
            if self._error is not None:
                raise self._error


_SYNCERS = 8  # fsyncs at once: two per instance, several associations
_syncs: queue.SimpleQueue[_Sync] | None = None
_syncs_lock = threading.Lock()


def _queue() -> queue.SimpleQueue[_Sync]:
    """The syncer threads' queue (the threads started on first use)."""
    global _syncs
    if _syncs is None:
        with _syncs_lock:
            if _syncs is None:
                syncs: queue.SimpleQueue[_Sync] = queue.SimpleQueue()
                for n in range(_SYNCERS):
                    threading.Thread(
                        target=_syncer, args=(syncs,), name=f"intu-fsync_{n}", daemon=True
                    ).start()
                _syncs = syncs
    return _syncs


def _syncer(syncs: queue.SimpleQueue[_Sync]) -> None:
    while True:
        syncs.get().run()


def _forget_syncers() -> None:
    # A forked child has none of the parent's threads: it starts its own on first use.
    global _syncs, _syncs_lock
    _syncs, _syncs_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_syncers)
