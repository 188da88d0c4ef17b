"""Changing an instance's transfer syntax losslessly, for an SCP that does not accept its own:
decompressing (RLE, JPEG lossless, JPEG-LS, JPEG 2000...) or converting big endian to little endian.

A lossless transfer-syntax change keeps the instance's identity (PS3.5 §10): the SOP Instance UID
never changes. The whole dataset is decoded in memory: this is the fallback, not the path (the
stored bytes go out as they are whenever the peer accepts their transfer syntax).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ImplicitVRLittleEndian

# Bytes per value of the binary VRs that pydicom keeps as raw bytes in the file's byte order
# (numbers of the other VRs (US, SS, UL, SL, FL, FD, AT, UV, SV) are decoded on reading and
# re-encoded in the new order by pydicom). OB and UN are byte streams: never swapped.
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_PIXEL_DATA = 0x7FE00010


class TranscodeWriteFailed(Exception):
    """The converted copy could not be written to the work folder (e.g. a full disk)."""


class TranscodeFailed(Exception):
    """The instance cannot be converted; ``str(exc)`` says what was tried and why it failed."""


def describe_change(source: str, target: str) -> str:
    """What converting ``source`` to ``target`` means, for messages: "decompressing JPEG-LS
    Lossless Image Compression", "converting Explicit VR Big Endian to little endian"..."""
    src, dst = UID(source), UID(target)
    if src.is_compressed:
        return f"decompressing {src.name} to {dst.name}"
    if not src.is_little_endian:
        return f"converting {src.name} to {dst.name} (byte swapping)"
    return f"re-encoding {src.name} as {dst.name}"


def transcode_to(path: Path, target: str, work_dir: Path) -> Path:
    """Write ``path`` in the uncompressed little-endian transfer syntax ``target`` to a new file
    in ``work_dir`` and return it (the caller deletes it).

    Raises ``TranscodeWriteFailed`` when the copy cannot be written, ``TranscodeFailed`` (with
    what was tried) when the instance cannot be converted."""
    ds = dcmread(path)
    source = UID(ds.file_meta.TransferSyntaxUID)
    try:
        if source.is_compressed:
            # Lossless decoders give the original pixel values; generate_instance_uid=False:
            # pydicom gives the decompressed instance a new SOP Instance UID by default.
            ds.decompress(generate_instance_uid=False)
        elif not source.is_little_endian:
            swap_binary_values(ds)
            # pydicom's save_as() refuses to change byte order, as it cannot swap OW/OF/...
            # values itself: they are swapped now, and every other element was decoded by
            # swap_binary_values' walk, so pydicom re-encodes them in little endian.
            ds.set_original_encoding(False, True)
    except Exception as exc:  # noqa: BLE001 - decoders raise many kinds of errors
        raise TranscodeFailed(f"{describe_change(source, target)} failed: {exc}") from exc
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
        if isinstance(exc, Exception):
            raise TranscodeFailed(f"{describe_change(source, target)} failed: {exc}") from exc
        raise
    return Path(name)


#: The name this module's one entry point had before big endian conversion.
decompress_to = transcode_to


def swap_binary_values(ds: Dataset, bits_allocated: int | None = None) -> None:
    """Swap, in place, the byte order of every OW/OF/OL/OD/OV value of ``ds`` and its sequences
    (big ↔ little endian). Pixel Data in OW is swapped by its Bits Allocated (16, 32 or 64 bits
    per value; 2 bytes otherwise: OW is 16-bit words); OB and UN are never swapped.

    Only these VRs need it: pydicom decodes the numbers of every other binary VR on reading and
    encodes them in the byte order it writes."""
    bits = ds.get("BitsAllocated", bits_allocated)
    for elem in ds:
        vr = elem.VR
        if vr == "SQ":
            for item in elem.value or ():
                swap_binary_values(item, bits)
            continue
        width = _SWAP_WIDTH.get(vr)
        if width is None or not isinstance(elem.value, (bytes, bytearray)) or not elem.value:
            continue
        if elem.tag == _PIXEL_DATA and vr == "OW" and bits in (32, 64):
            width = int(bits) // 8
        elem.value = _swapped(bytes(elem.value), width)


def _swapped(data: bytes, width: int) -> bytes:
    import numpy as np

    whole = len(data) - len(data) % width  # a trailing odd byte (padding) stays as it is
    array = np.frombuffer(data, dtype=np.dtype(f"u{width}"), count=whole // width)
    return array.byteswap().tobytes() + data[whole:]


__all__ = [
    "TranscodeFailed",
    "TranscodeWriteFailed",
    "decompress_to",
    "describe_change",
    "swap_binary_values",
    "transcode_to",
]
