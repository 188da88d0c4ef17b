"""Decompressing an instance to an uncompressed transfer syntax, for an SCP that accepts only
uncompressed data. The whole dataset is decoded in memory: this is the fallback, not the path."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID, ImplicitVRLittleEndian


class TranscodeWriteFailed(Exception):
    """The decompressed copy could not be written to the work folder (e.g. a full disk)."""


def decompress_to(path: Path, target: str, work_dir: Path) -> Path:
    """Write ``path`` in the uncompressed transfer syntax ``target`` to a new file in
    ``work_dir`` and return it (the caller deletes it). Decoder errors propagate as they are."""
    ds = dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        # pydicom's decoders (pylibjpeg plugins, its own RLE) give the original pixel values
        # for lossless syntaxes; decompress() rewrites the pixel module and sets Explicit VR LE.
        ds.decompress()
    implicit = target == ImplicitVRLittleEndian
    ds.file_meta.TransferSyntaxUID = UID(target)
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(suffix=".dcm", prefix="transcode-", dir=work_dir)
    except OSError as exc:
        raise TranscodeWriteFailed(exc.strerror or str(exc)) from exc
    try:
        os.close(fd)
        ds.save_as(name, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    except BaseException as exc:
        try:
            os.unlink(name)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise TranscodeWriteFailed(exc.strerror or str(exc)) from exc
        raise
    return Path(name)
