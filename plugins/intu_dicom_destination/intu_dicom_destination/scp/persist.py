"""Persisting a received instance: pynetdicom's temporary file moved into the spool folder and
made durable before the C-STORE is answered."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from pydicom.uid import DeflatedExplicitVRLittleEndian

from intu_core import fsync_dir, fsync_path
from intu_dicom_destination.body import inflate_part10

_COPY_CHUNK = 1024 * 1024


def persist(temp: Path, path: Path, transfer_syntax: str) -> None:
    """Move pynetdicom's temporary Part-10 file to ``path`` and make it durable (file and folder
    fsynced); a deflated instance is stored inflated."""
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        # Bulk-data offsets cannot point into a deflated stream: store it inflated.
        with open(temp, "rb") as src, open(path, "wb") as dest:
            inflate_part10(src, dest)
            dest.flush()
            os.fsync(dest.fileno())
    else:
        try:
            # pynetdicom unlinks its temporary file after the handler, ignoring a missing one.
            os.replace(temp, path)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            with open(temp, "rb") as src, open(path, "wb") as dest:
                shutil.copyfileobj(src, dest, _COPY_CHUNK)
        fsync_path(path)
    fsync_dir(path.parent)
