"""What a received C-STORE must satisfy before it is answered success: what the sender will need
to forward it, and what DCMTK and Orthanc also refuse (issue 10 item 8, issue 11 item 3).

Each check returns a ``Refusal`` (the C-STORE status and a reason for its Error Comment) or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from intu_dicom_destination.body import ScannedInstance

VERIFICATION = "1.2.840.10008.1.1"
#: Every storage SOP class of the standard, retired ones included, lives under this root.
STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."
DICOM_ROOT = "1.2.840.10008."
UNCOMPRESSED = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
)

STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_DATASET_DOES_NOT_MATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class Refusal:
    """A failure status for the C-STORE and why."""

    status: int
    reason: str


def is_storage_like(uid: str) -> bool:
    """A storage SOP class of the standard (current or retired) or a private (non-DICOM root) UID."""
    return uid.startswith(STORAGE_ROOT) or not uid.startswith(DICOM_ROOT)


def check_request(sop_class: str, sop_instance: str, context_abstract_syntax: str) -> Refusal | None:
    """The command against its presentation context (e.g. an image sent on the Verification context)."""
    if not sop_class or not sop_instance:
        return Refusal(STATUS_CANNOT_UNDERSTAND, "command has no Affected SOP Class/Instance UID")
    if sop_class != context_abstract_syntax:
        return Refusal(
            STATUS_SOP_CLASS_NOT_SUPPORTED,
            f"SOP class {sop_class} sent on the context of {context_abstract_syntax}",
        )
    return None


def _uid(dataset: dict[str, Any], key: str) -> str:
    elem = dataset.get(key)
    if isinstance(elem, dict):
        value = elem.get("Value")
        if isinstance(value, list) and value and isinstance(value[0], str):
            return value[0].strip("\0 ")
    return ""


def _int(dataset: dict[str, Any], key: str, default: int | None = None) -> int | None:
    elem = dataset.get(key)
    if isinstance(elem, dict):
        value = elem.get("Value")
        if isinstance(value, list) and value:
            try:
                return int(str(value[0]).strip())
            except ValueError:
                return None
    return default


# The elements the checks read: a model of these only (not of the whole dataset) is built.
_CHECKED = (
    "00080016",  # SOP Class UID
    "00080018",  # SOP Instance UID
    "00280002",  # Samples per Pixel
    "00280004",  # Photometric Interpretation
    "00280008",  # Number of Frames
    "00280010",  # Rows
    "00280011",  # Columns
    "00280100",  # Bits Allocated
    "7FE00010",  # Pixel Data
)
# Pixel Data's length is read from the scan (``ScannedInstance.pixel_data``), not from a model.
_MODELLED = tuple(key for key in _CHECKED if key != "7FE00010")


def check_body(
    scan: ScannedInstance, sop_class: str, sop_instance: str, transfer_syntax: str
) -> Refusal | None:
    """The received dataset against its command and transfer syntax."""
    if not scan.has_dataset():
        return Refusal(STATUS_CANNOT_UNDERSTAND, "empty dataset (nothing but file meta)")
    dataset = scan.model_of(_MODELLED)
    for key, name, expected in (
        ("00080016", "SOP Class UID", sop_class),
        ("00080018", "SOP Instance UID", sop_instance),
    ):
        found = _uid(dataset, key)
        if not found:
            return Refusal(STATUS_DATASET_DOES_NOT_MATCH, f"dataset has no {name}")
        if found != expected:
            return Refusal(
                STATUS_DATASET_DOES_NOT_MATCH, f"dataset {name} {found} is not the command's {expected}"
            )
    return _check_pixel_data(dataset, scan.pixel_data(), transfer_syntax)


def _check_pixel_data(
    dataset: dict[str, Any], pixel: tuple[int, bool] | None, transfer_syntax: str
) -> Refusal | None:
    """Pixel Data (``pixel``: its length and whether it is undefined) against the image module."""
    if transfer_syntax not in UNCOMPRESSED or pixel is None:
        return None
    length, undefined = pixel
    if undefined:
        return Refusal(STATUS_CANNOT_UNDERSTAND, "compressed pixel data in an uncompressed transfer syntax")
    photometric = (
        dataset.get("00280004", {}).get("Value", [""]) if isinstance(dataset.get("00280004"), dict) else [""]
    )
    if str(photometric[0] if photometric else "").startswith(("YBR_FULL_422", "YBR_PARTIAL")):
        return None  # chroma subsampled: fewer bytes than Rows x Columns x 3 by design
    rows, columns = _int(dataset, "00280010"), _int(dataset, "00280011")
    bits = _int(dataset, "00280100")
    samples, frames = _int(dataset, "00280002", 1), _int(dataset, "00280008", 1)
    if None in (rows, columns, bits, samples, frames):
        return None  # not an image module we can size (or an invalid value): leave it to the PACS
    assert rows is not None and columns is not None and bits is not None
    assert samples is not None and frames is not None
    pixels = rows * columns * samples * max(frames, 1)
    expected = (pixels + 7) // 8 if bits == 1 else pixels * (bits // 8)
    if length < expected:
        return Refusal(
            STATUS_CANNOT_UNDERSTAND,
            f"pixel data {length} bytes, {expected} expected: compressed or truncated?",
        )
    return None
