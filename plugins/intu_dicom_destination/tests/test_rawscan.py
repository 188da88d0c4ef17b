"""The raw walk (``body.rawscan``) against pydicom: ``scan_file`` gives the same answers from it
as from pydicom's reading, for every file the walk accepts, and the walk accepts the common ones."""

from __future__ import annotations

from pathlib import Path
from unittest.mock import patch

import pydicom.data
import pytest
from intu_dicom_destination.body import model, rawscan
from intu_dicom_destination.scp.checks import _CHECKED, check_body
from intu_dicom_destination.testing import write_ct_series
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian


def _corpus() -> list[Path]:
    """pydicom's bundled test files (``get_testdata_files`` would also download its external ones)."""
    return sorted((Path(pydicom.data.__file__).parent / "test_files").rglob("*.dcm"))


def _same(path: Path) -> bool:
    """True when the walk accepted the file (and then gave pydicom's answers)."""
    fast = model._scan_raw(path.resolve())
    if fast is None:
        return False
    slow = model._scan_pydicom(path)
    assert (fast.sop_class_uid, fast.sop_instance_uid, fast.transfer_syntax_uid) == (
        slow.sop_class_uid,
        slow.sop_instance_uid,
        slow.transfer_syntax_uid,
    )
    assert fast.has_dataset() == slow.has_dataset()
    assert fast.history_fields() == slow.history_fields()
    with patch.object(model, "_plain_text", lambda value, vr, ascii_text: None):
        converted = model._scan_pydicom(path).history_fields()  # every text value as pydicom converts it
        assert fast.history_fields() == converted
    assert fast.history_fields() == converted  # the plain text (LO, SH, PN) read from the raw bytes
    assert fast.size == slow.size == path.stat().st_size
    assert fast.model_of(_CHECKED) == slow.model_of(_CHECKED)
    for scan in (fast, slow):  # Pixel Data's length as its BulkDataURI says
        pixel = scan.model_of(_CHECKED).get("7FE00010")
        if pixel is None or "BulkDataURI" not in pixel:
            assert scan.pixel_data() is None
        else:
            ref = model.parse_bulk_uri(pixel["BulkDataURI"], "(7FE0,0010)")
            assert scan.pixel_data() == (ref.length, ref.undefined)
    s = (fast.sop_class_uid, fast.sop_instance_uid, fast.transfer_syntax_uid)
    # The checks on the walk's dataset with the plain JSON of raw values, against pydicom's
    # reading with pydicom's JSON of every element.
    with patch.object(model, "_plain_json", lambda raw: None):
        expected = check_body(model._scan_pydicom(path), *s)
    assert check_body(fast, *s) == expected
    return True


def test_the_walk_agrees_with_pydicom_on_pydicom_s_test_files() -> None:
    files = _corpus()
    assert len(files) > 50
    accepted = [p for p in files if _same(p)]
    # Most are walked; the rest (deflated, big endian, damaged, odd UIDs...) go to pydicom.
    assert len(accepted) > len(files) // 3, (len(accepted), len(files))


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_the_walk_reads_a_ct_series_as_pydicom_does(tmp_path: Path, syntax: str) -> None:
    paths = write_ct_series(tmp_path, 3, size_kib=8, patient_name="Müller^Jörg")
    for path in paths:
        if syntax == ImplicitVRLittleEndian:
            ds = dcmread(path)
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.file_meta.TransferSyntaxUID = syntax
            ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
        assert _same(path)


def test_a_truncated_file_is_left_to_pydicom(tmp_path: Path) -> None:
    (path,) = write_ct_series(tmp_path, 1, size_kib=8)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    assert rawscan.scan(path) is None
    with pytest.raises(model.InvalidBody):
        model.scan_file(path)


def test_the_file_meta_read_without_pydicom_is_pydicom_s() -> None:
    read = 0
    for path in _corpus():
        fast = rawscan.file_meta(path)
        if fast is None:
            continue
        meta = read_file_meta_info(path)
        assert (fast.sop_class_uid, fast.sop_instance_uid, fast.transfer_syntax_uid) == (
            meta.MediaStorageSOPClassUID,
            meta.MediaStorageSOPInstanceUID,
            meta.TransferSyntaxUID,
        )
        read += 1
    assert read > 50


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        (None, "Doe^John  "),  # trailing spaces: dropped
        ("ISO_IR 192", " Doe^John^^Dr\\Roe^Richard "),  # several names, a leading space kept
        ("ISO_IR 100", "Doe^J=="),  # empty component groups: pydicom drops them
        ("ISO_IR 100", "Müller^Jörg"),
        ("ISO_IR 192", "Wang^XiaoDong=王^小東"),
    ],
)
def test_person_names_in_the_history_are_pydicom_s(tmp_path: Path, charset: str | None, name: str) -> None:
    (path,) = write_ct_series(tmp_path, 1, size_kib=8)
    ds = dcmread(path)
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.ReferringPhysicianName = name
    ds.save_as(path, enforce_file_format=True)
    assert _same(path)  # the raw text (plain ASCII) or pydicom's conversion, as pydicom shows it
