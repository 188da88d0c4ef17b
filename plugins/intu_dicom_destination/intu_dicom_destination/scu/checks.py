"""Checks of a local Part-10 file before it is sent (``intu dicom send``).

A file that is broken here is broken for every peer: sending it costs an association, then a
peer's abort or a timeout, then retries, and ends with a misleading "retryable". So the file is
read once before sending and refused at once, with the reason, when its dataset's SOP Class or
Instance UID is missing or differs from the file meta's, when it is truncated, when its deflated
stream or an encapsulated fragment has an odd length (PS3.5 A.5 and A.4 require even lengths;
peers abort on the odd P-DATA). The UIDs sent are the dataset's, not the file meta's.

Most files are decided by ``body.rawscan.scan`` (a walk of the raw element headers, no pydicom);
pydicom reads only those it is unsure of, and gives the reason of every refusal.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from intu_dicom_destination import internals
from intu_dicom_destination.body.rawscan import scan

_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xE000FFFE  # (FFFE,E000) read as a little-endian 32-bit number: group low, element high
_SEQUENCE_DELIMITER = 0xE0DDFFFE
_DEFER = 4096  # bytes: values larger than this are not read by the check


@dataclass(frozen=True)
class LocalInstance:
    """A file that may be sent: its dataset's UIDs and the transfer syntax of its bytes."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class Refused:
    """A file that must not be sent: ``reason`` says why; ``not_dicom`` when it is no Part-10
    file at all (skipped rather than failed)."""

    reason: str
    not_dicom: bool = False


def check_local_file(path: Path) -> LocalInstance | Refused:
    """Read ``path`` once and say whether it can be sent as it is (never raises for a bad file)."""
    try:
        scanned = scan(path)
    except OSError:
        scanned = None  # pydicom's reading below says what it is
    if scanned is not None:
        return LocalInstance(scanned.sop_class_uid, scanned.sop_instance_uid, scanned.transfer_syntax_uid)
    return _check_with_pydicom(path)


def _check_with_pydicom(path: Path) -> LocalInstance | Refused:
    try:
        size = path.stat().st_size
        # Large values are not read (their extent is checked against the file's size instead):
        # reading 512 KiB of pixel data only to check it is there was ~1 ms of `intu dicom send`'s
        # CPU per instance. Encapsulated pixel data is read whole (its fragments are checked), and
        # so is a deflated dataset (its offsets are in the inflated stream, not the file).
        ds = dcmread(path, defer_size=_DEFER)
        syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "") or ""))
        if syntax.is_encapsulated or syntax.is_deflated:
            ds = dcmread(path)
    except InvalidDicomError as exc:
        return Refused(f"not a DICOM Part-10 file ({exc})", not_dicom=True)
    except OSError as exc:
        return Refused(f"cannot read it ({exc.strerror or exc})")
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds of errors on bad input
        return Refused(f"cannot be parsed, truncated or damaged ({type(exc).__name__}: {exc})")
    meta = ds.file_meta
    ts = meta.get("TransferSyntaxUID")
    if ts is None:
        return Refused("not a DICOM Part-10 file (no file meta with a Transfer Syntax UID)", not_dicom=True)
    for elem in internals.raw_elements(ds).values():  # as read: ds.elements() would read deferred values
        if isinstance(elem, RawDataElement) and elem.length != _UNDEFINED:
            deferred = elem.value is None and elem.length > _DEFER
            got = min(elem.length, size - elem.value_tell) if deferred else len(elem.value or b"")
            if got < elem.length:
                return Refused(
                    f"truncated: element {elem.tag} has {got} of its {elem.length} bytes "
                    f"(the file ends at byte {size})"
                )
    sop_class, sop_instance = ds.get("SOPClassUID"), ds.get("SOPInstanceUID")
    missing = [
        name for name, uid in (("SOP Class UID", sop_class), ("SOP Instance UID", sop_instance)) if not uid
    ]
    if missing:
        return Refused(
            f"the dataset has no {' and no '.join(missing)}: the file is truncated or damaged, or "
            "it is not a composite instance"
        )
    for what, in_dataset, key in (
        ("SOP Class UID", sop_class, "MediaStorageSOPClassUID"),
        ("SOP Instance UID", sop_instance, "MediaStorageSOPInstanceUID"),
    ):
        in_meta = meta.get(key)
        if in_meta is not None and str(in_meta) != str(in_dataset):
            return Refused(
                f"the dataset's {what} {in_dataset} differs from the file meta's {in_meta}: fix the "
                "file (e.g. dcmodify or gdcmconv) before sending it"
            )
    syntax = UID(ts)
    if syntax.is_deflated:
        odd = _odd_deflated_stream(path, size)
        if odd:
            return Refused(odd)
    if syntax.is_encapsulated and _PIXEL_DATA in ds:
        odd = _odd_fragment(ds.get_item(_PIXEL_DATA))
        if odd:
            return Refused(odd)
    return LocalInstance(str(sop_class), str(sop_instance), str(syntax))


def _odd_deflated_stream(path: Path, size: int) -> str:
    """Why the deflated stream after the file meta has an odd length, or ""."""
    with open(path, "rb") as fh:
        head = fh.read(144)
    # Preamble (128), "DICM", then (0002,0000) UL: explicit VR little endian, 4-byte value.
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        return ""
    meta_end = 144 + struct.unpack("<I", head[140:144])[0]
    stream = size - meta_end
    if stream % 2:
        return (
            f"its deflated stream has an odd length ({stream} bytes; PS3.5 A.5 requires a trailing "
            "null byte): peers abort on it"
        )
    return ""


def _odd_fragment(elem: object) -> str:
    """Why an encapsulated Pixel Data item has an odd or impossible length, or ""."""
    value = getattr(elem, "value", None)
    if not isinstance(value, (bytes, bytearray)):
        return ""
    offset, n = 0, 0
    while offset + 8 <= len(value):
        tag, length = struct.unpack_from("<II", value, offset)
        if tag == _SEQUENCE_DELIMITER:
            return ""
        if tag != _ITEM:
            return f"encapsulated Pixel Data is damaged: no item tag at byte {offset} of its value"
        if length % 2:
            what = "basic offset table" if n == 0 else f"fragment {n}"
            return f"encapsulated Pixel Data {what} has an odd length ({length} bytes; PS3.5 A.4)"
        if offset + 8 + length > len(value):
            return f"truncated: encapsulated Pixel Data fragment {n} ends past the end of the file"
        offset += 8 + length
        n += 1
    if offset != len(value):  # pydicom's value ends before the delimiter: only whole items
        return f"truncated: encapsulated Pixel Data ends inside an item header (byte {offset})"
    return ""
