"""A disk reserve: a file of allocated space kept in the data folder, given up when the disk is full.

Delivering a queued message frees space (its file is deleted), but recording the delivery is a
write, which a full disk refuses: with ``min_free_disk_mb: 0`` nothing would ever be delivered
again. The SQLite queue keeps ``queue.reserve`` (``reserve_mb`` of its settings) allocated; when a
write that lets delivery go on fails because the disk is full, it deletes the reserve and tries
again, and refuses new messages until the reserve can be allocated again (when twice its size is
free), so that what was freed goes to delivery and not to more incoming instances.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from intu_core.fsutil import fsync_dir

log = logging.getLogger("intu.queue")

RESERVE_NAME = "queue.reserve"


class DiskReserve:
    """``size`` bytes allocated in the file ``path`` (see the module docstring)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        #: True from a release until the reserve is allocated again.
        self.released = False
        #: Why the last ``ensure`` could not allocate it.
        self.why = ""

    def ensure(self) -> bool:
        """Allocate the reserve if it is missing and twice its size is free; whether it is held."""
        if self.path.exists() and self.path.stat().st_size >= self.size:
            self.released = False
            return True
        free = shutil.disk_usage(self.path.parent).free
        if free < 2 * self.size:
            self.why = f"{free // (1024 * 1024)} MiB free, less than twice its size"
            return False
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                # Really allocated (not a sparse file), so deleting it gives the blocks back.
                os.posix_fallocate(fd, 0, self.size)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(self.path.parent)
        except OSError as exc:  # ENOSPC after all, or a filesystem that cannot allocate
            self.path.unlink(missing_ok=True)
            self.why = exc.strerror or str(exc)
            return False
        if self.released:
            log.info("the disk has room again: the queue's reserve (%s) is allocated again", self.path)
        self.released = False
        return True

    def release(self) -> bool:
        """Give the space back to the filesystem; False when there was no reserve to give."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        self.released = True
        log.warning(
            "the disk is full: released the queue's reserve of %d MiB (%s) so that queued messages can"
            " still be delivered (which frees space); new messages are refused until it can be"
            " allocated again",
            self.size // (1024 * 1024),
            self.path,
        )
        return True


__all__ = ["RESERVE_NAME", "DiskReserve"]
