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
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
    """``persist``, in two halves: the file is at ``path`` on return, and the returned function
    waits until it and its folder are fsynced (raising the ``OSError`` of a failed fsync). Between
    the two the caller checks the file, which reads the page cache: the fsyncs (~2 ms for a 512
    KiB instance here, the file's and the folder's at the same time) overlap that work instead of
    adding to every C-STORE's round trip. A deflated instance is inflated and synced at once."""
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
        return _done
    try:
        # pynetdicom unlinks its temporary file after the handler, ignoring a missing one.
        os.replace(temp, path)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with open(temp, "rb") as src, open(path, "wb") as copy:
            shutil.copyfileobj(src, copy, _COPY_CHUNK)
    syncs = (_syncer().submit(fsync_path, path), _syncer().submit(fsync_dir_shared, path.parent))

    def wait() -> None:
        for sync in syncs:
            sync.result()

    return wait


def _done() -> None:
    return None


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _syncer() -> ThreadPoolExecutor:
    """Threads that run fsyncs (which release the GIL) while the receiving thread goes on."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="intu-fsync")
        return _executor
