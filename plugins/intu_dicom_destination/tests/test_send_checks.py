"""`intu dicom send`'s checks (``scu.checks``): the raw walk (``body.rawscan.scan``) decides most
files; held here to pydicom's reading of the same files: it may be unsure (pydicom then decides),
never wrong."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import pydicom.data
import pytest
from intu_dicom_destination.body.rawscan import Scanned, scan
from intu_dicom_destination.scu.checks import LocalInstance, Refused, check_local_file
from intu_dicom_destination.scu.direct import dataset_offset
from intu_dicom_destination.testing import ct_instance
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian, RLELossless


def _part10_files() -> list[Path]:
    root = Path(pydicom.data.__file__).parent / "test_files"
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                if f.read(132)[128:132] == b"DICM":
                    found.append(path)
    return found


def _by_pydicom(path: Path) -> LocalInstance | Refused:
    from intu_dicom_destination.scu import checks

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return checks._check_with_pydicom(path)


def _agrees(scanned: Scanned, path: Path) -> None:
    checked = _by_pydicom(path)
    assert isinstance(checked, LocalInstance), (path.name, checked)
    assert (scanned.sop_class_uid, scanned.sop_instance_uid, scanned.transfer_syntax_uid) == (
        checked.sop_class_uid,
        checked.sop_instance_uid,
        checked.transfer_syntax_uid,
    )
    assert scanned.dataset_offset == dataset_offset(path)
    ds = dcmread(path, stop_before_pixels=True)
    first = next(iter(ds.keys()))
    raw = path.read_bytes()[scanned.dataset_offset : scanned.dataset_offset + 4]
    assert raw == struct.pack("<HH", first >> 16, first & 0xFFFF)


def test_pydicoms_corpus_and_its_truncations_scan_as_pydicom_reads_them(tmp_path: Path) -> None:
    files = _part10_files()
    assert len(files) > 50
    passed = 0
    for path in files:
        scanned = scan(path)
        if scanned is None:
            continue
        passed += 1
        _agrees(scanned, path)
        data = path.read_bytes()
        for cut in (1, 2, 7, 100, len(data) // 2):
            cut_file = tmp_path / f"cut-{cut}-{path.name}"
            cut_file.write_bytes(data[:-cut])
            cut_scanned = scan(cut_file)
            if cut_scanned is not None:  # cut at an element's end: pydicom cannot tell either
                _agrees(cut_scanned, cut_file)
    assert passed > 30  # most of the corpus takes the fast path


def _save(ds: Dataset, path: Path, **kw: object) -> Path:
    ds.save_as(path, enforce_file_format=True, **kw)
    return path


def test_sequences_of_undefined_and_defined_length_implicit_and_explicit(tmp_path: Path) -> None:
    ds = ct_instance(study_uid="1.2.3", series_uid="1.2.3.4", number=1, size_kib=2)
    inner = Dataset()
    inner.CodeValue, inner.CodeMeaning = "1", "x"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.4.5"
    item.ConceptNameCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, item])
    for name, implicit, undefined in [
        ("explicit-undefined", False, True),
        ("explicit-defined", False, False),
        ("implicit-undefined", True, True),
        ("implicit-defined", True, False),
    ]:
        if implicit:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.ReferencedImageSequence.is_undefined_length = undefined
        ds.ReferencedImageSequence[0].ConceptNameCodeSequence.is_undefined_length = undefined
        for each in ds.ReferencedImageSequence:
            each.is_undefined_length_sequence_item = undefined
        path = _save(ds, tmp_path / f"{name}.dcm", implicit_vr=implicit)
        scanned = scan(path)
        assert scanned is not None, name
        _agrees(scanned, path)


def test_encapsulated_pixel_data_is_walked_fragment_by_fragment(tmp_path: Path) -> None:
    ds = ct_instance(study_uid="1.2.3", series_uid="1.2.3.4", number=1, size_kib=1)
    item = b"\xfe\xff\x00\xe0"
    frags = item + struct.pack("<I", 0) + item + struct.pack("<I", 4) + b"abcd"
    ds.PixelData = frags  # pydicom writes the sequence delimiter
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds["PixelData"].is_undefined_length = True
    good = _save(ds, tmp_path / "rle.dcm")
    scanned = scan(good)
    assert scanned is not None and scanned.transfer_syntax_uid == RLELossless
    _agrees(scanned, good)
    ds.PixelData = frags + item + b"\x03\0\0\0fgh\0"
    odd = _save(ds, tmp_path / "odd.dcm")
    assert scan(odd) is None  # pydicom decides, and refuses it
    refused = check_local_file(odd)
    assert isinstance(refused, Refused) and "odd length" in refused.reason


@pytest.mark.parametrize(
    "damage",
    [
        "meta-uid-differs",
        "no-sop-instance",
        "uid-with-a-letter",
        "unknown-vr",
        "trailing-bytes",
    ],
)
def test_what_the_walk_is_unsure_of_goes_to_pydicom(tmp_path: Path, damage: str) -> None:
    ds = ct_instance(study_uid="1.2.3", series_uid="1.2.3.4", number=1, size_kib=1)
    path = tmp_path / f"{damage}.dcm"
    if damage == "meta-uid-differs":
        ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.99"
        ds.save_as(path, enforce_file_format=False)
    elif damage == "no-sop-instance":
        del ds.SOPInstanceUID
        ds.save_as(path, enforce_file_format=False)
    else:
        _save(ds, path)
        data = bytearray(path.read_bytes())
        if damage == "uid-with-a-letter":
            at = data.index(str(ds.SOPInstanceUID).encode())
            data[at] = ord("x")
        elif damage == "unknown-vr":
            at = data.index(b"\x08\x00\x60\x00CS")  # Modality
            data[at + 4 : at + 6] = b"ZZ"
        else:
            data += b"\0\0\0"
        path.write_bytes(bytes(data))
    assert scan(path) is None
    assert check_local_file(path) == _by_pydicom(path)  # whatever pydicom makes of it


def test_a_file_that_cannot_be_opened_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        scan(tmp_path / "missing.dcm")
