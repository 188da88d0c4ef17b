"""The DICOM message body: JSON model with bulk-data references, and writing it back as Part 10."""

from __future__ import annotations

import copy
import errno
import io
import json
import resource
import struct
import tracemalloc
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from intu_dicom_destination.body import (
    InvalidBody,
    body_from_file,
    dataset_digest,
    inflate_part10,
    prepare_for_send,
    scan_file,
    write_part10_from_body,
)
from intu_dicom_destination.body.model import _bulk_vr
from intu_dicom_destination.testing import ct_instance, write_ct_series, write_garbage_instance
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

MiB = 1024 * 1024


@pytest.fixture
def ct(tmp_path: Path) -> Path:
    return write_ct_series(tmp_path / "in", 1, size_kib=32)[0]


def seed_transform(body: dict[str, Any]) -> dict[str, Any]:
    """What the seed's transformer does to a body (a new body; the original is untouched)."""
    new = copy.deepcopy(body)
    new["dataset"]["00081090"] = {"vr": "LO", "Value": ["INTU_PROCESSED"]}
    new["dataset"].setdefault("00080080", {"vr": "LO", "Value": ["General Hospital"]})
    return new


def test_body_shape(ct: Path) -> None:
    body = body_from_file(ct)
    ds = body["dataset"]
    original = dcmread(ct)
    assert body["file"] == str(ct.resolve())
    assert body["sop_class_uid"] == CTImageStorage
    assert body["sop_instance_uid"] == original.SOPInstanceUID
    assert body["transfer_syntax_uid"] == ExplicitVRLittleEndian
    assert body["dataset_digest"] == dataset_digest(ds)
    assert ds["00100020"] == {"vr": "LO", "Value": ["INTU-0001"]}
    assert ds["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]}
    assert ds["0020000D"]["Value"] == [original.StudyInstanceUID]
    assert all(len(k) == 8 and k == k.upper() for k in ds)
    assert list(ds) == sorted(ds)
    # Pixel data is a reference to the value bytes in the stored file.
    uri = ds["7FE00010"]["BulkDataURI"]
    assert ds["7FE00010"]["vr"] == "OW" and "InlineBinary" not in ds["7FE00010"]
    assert uri.startswith("file://" + str(ct.resolve()) + "?offset=")
    offset = int(uri.split("offset=")[1].split("&")[0])
    length = int(uri.split("length=")[1].split("&")[0])
    assert ct.read_bytes()[offset : offset + length] == original.PixelData
    json.dumps(body)  # JSON-serialisable


def test_unchanged_body_sends_the_stored_file(ct: Path, tmp_path: Path) -> None:
    before = ct.read_bytes()
    body = json.loads(json.dumps(body_from_file(ct)))  # as it comes back from the queue
    prepared = prepare_for_send(body, tmp_path / "work")
    assert prepared.path == ct.resolve() and not prepared.temporary
    assert prepared.sop_instance_uid == body["sop_instance_uid"]
    assert prepared.transfer_syntax_uid == ExplicitVRLittleEndian
    prepared.cleanup()
    assert ct.read_bytes() == before


def test_edited_body_writes_a_new_instance_with_the_same_pixels(ct: Path, tmp_path: Path) -> None:
    body = seed_transform(body_from_file(ct))
    del body["dataset"]["00100030"]  # PatientBirthDate removed
    body["dataset"]["00100010"] = {"vr": "PN", "Value": [{"Alphabetic": "Roe^Richard"}]}
    prepared = prepare_for_send(body, tmp_path / "work")
    assert prepared.temporary and prepared.path.parent == tmp_path / "work"
    out, original = dcmread(prepared.path), dcmread(ct)
    assert out.ManufacturerModelName == "INTU_PROCESSED"
    assert out.InstitutionName == "General Hospital"
    assert str(out.PatientName) == "Roe^Richard"
    assert "PatientBirthDate" not in out
    assert out.PixelData == original.PixelData
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    # Everything else is the same: the new file's body equals the edited body except its bulk URI.
    again = body_from_file(prepared.path)["dataset"]
    assert {k for k in again if again[k] != body["dataset"][k]} == {"7FE00010"}
    assert set(again) == set(body["dataset"])
    prepared.cleanup()
    assert not prepared.path.exists() and ct.exists()


def test_changed_sop_instance_uid_updates_file_meta(ct: Path, tmp_path: Path) -> None:
    body = body_from_file(ct)
    uid = generate_uid()
    body["dataset"]["00080018"] = {"vr": "UI", "Value": [uid]}
    prepared = prepare_for_send(body, tmp_path)
    assert prepared.sop_instance_uid == uid
    assert dcmread(prepared.path).file_meta.MediaStorageSOPInstanceUID == uid


def test_implicit_vr_instance_round_trip(tmp_path: Path) -> None:
    ds = ct_instance(study_uid=generate_uid(), series_uid=generate_uid(), number=3, size_kib=16)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = tmp_path / "implicit.dcm"
    ds.save_as(path, enforce_file_format=True)
    body = seed_transform(body_from_file(path))
    assert body["dataset"]["7FE00010"]["vr"] == "OW"
    prepared = prepare_for_send(body, tmp_path / "work")
    out = dcmread(prepared.path)
    assert out.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert out.ManufacturerModelName == "INTU_PROCESSED" and out.PixelData == ds.PixelData


def test_encapsulated_pixel_data_passes_through(tmp_path: Path) -> None:
    ds = ct_instance(study_uid=generate_uid(), series_uid=generate_uid(), number=1, size_kib=32)
    ds.compress(RLELossless)
    path = tmp_path / "rle.dcm"
    ds.save_as(path, enforce_file_format=True)
    original = dcmread(path)
    body = body_from_file(path)
    assert body["transfer_syntax_uid"] == RLELossless
    assert body["dataset"]["7FE00010"]["BulkDataURI"].endswith("&undefined=1")
    prepared = prepare_for_send(seed_transform(body), tmp_path / "work")
    out = dcmread(prepared.path)
    assert out.file_meta.TransferSyntaxUID == RLELossless
    assert out.ManufacturerModelName == "INTU_PROCESSED"
    assert out.PixelData == original.PixelData  # the encapsulated bytes, untouched
    assert (out.pixel_array == original.pixel_array).all()


def test_inline_binary_body_without_file(tmp_path: Path) -> None:
    ds = ct_instance(study_uid=generate_uid(), series_uid=generate_uid(), number=1, size_kib=4)
    model = ds.to_json_dict()  # InlineBinary pixel data
    assert "InlineBinary" in model["7FE00010"]
    prepared = prepare_for_send({"dataset": model}, tmp_path / "work")
    assert prepared.temporary
    out = dcmread(prepared.path)
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.PixelData == ds.PixelData and out.SOPInstanceUID == ds.SOPInstanceUID
    dest = write_part10_from_body(
        {"dataset": model, "transfer_syntax_uid": ImplicitVRLittleEndian}, tmp_path / "x.dcm"
    )
    assert dcmread(dest).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian


def test_bytes_and_path_bodies(ct: Path, tmp_path: Path) -> None:
    data = ct.read_bytes()
    prepared = prepare_for_send(data, tmp_path / "work")
    assert prepared.temporary and prepared.path.read_bytes() == data
    assert prepared.sop_class_uid == CTImageStorage
    prepared.cleanup()
    assert not prepared.path.exists()
    for body in (ct, str(ct)):
        prepared = prepare_for_send(body, tmp_path / "work")
        assert prepared.path == ct and not prepared.temporary


def test_write_part10_from_body(ct: Path, tmp_path: Path) -> None:
    body = body_from_file(ct)
    dest = write_part10_from_body(body, tmp_path / "out" / "same.dcm")
    assert dest.read_bytes() == ct.read_bytes()
    dest = write_part10_from_body(seed_transform(body), tmp_path / "out" / "edited.dcm")
    assert dcmread(dest).ManufacturerModelName == "INTU_PROCESSED"
    assert not list((tmp_path / "out").glob(".intu-*"))


@pytest.mark.parametrize(
    ("make_body", "expected"),
    [
        (lambda ct, tmp: 42, "must be a dict"),
        (lambda ct, tmp: {}, "no 'dataset'"),
        (lambda ct, tmp: {"dataset": []}, "DICOM JSON model"),
        (lambda ct, tmp: {"dataset": {"bad": 1}}, "8 hex digits"),
        (lambda ct, tmp: {"dataset": {"00100020": {"vr": "LO", "Value": ["X"]}}}, "no SOPClassUID"),
        (lambda ct, tmp: b"not dicom at all", "not a DICOM Part-10 file"),
        (lambda ct, tmp: tmp / "missing.dcm", "does not exist"),
        (lambda ct, tmp: {**body_from_file(ct), "file": str(tmp / "gone.dcm")}, "does not exist"),
        (lambda ct, tmp: _bulk_out_of_range(ct), "past the end"),
        (lambda ct, tmp: _bulk_bad_uri(ct), "not supported"),
    ],
)
def test_bad_bodies_raise_invalid_body(ct: Path, tmp_path: Path, make_body: Any, expected: str) -> None:
    with pytest.raises(InvalidBody, match=expected):
        prepare_for_send(make_body(ct, tmp_path), tmp_path / "work")
    assert not list((tmp_path / "work").glob("*")) if (tmp_path / "work").exists() else True


def _bulk_out_of_range(ct: Path) -> dict[str, Any]:
    body = seed_transform(body_from_file(ct))
    body["dataset"]["7FE00010"]["BulkDataURI"] = f"file://{ct.resolve()}?offset=10&length=99999999"
    return body


def _bulk_bad_uri(ct: Path) -> dict[str, Any]:
    body = seed_transform(body_from_file(ct))
    body["dataset"]["7FE00010"]["BulkDataURI"] = "https://pacs.example.org/bulk/1"
    return body


@pytest.mark.parametrize("read", [body_from_file, scan_file])
def test_unparseable_files_raise_invalid_body(tmp_path: Path, read: Any) -> None:
    """``scan_file`` (what the source checks before answering, the model deferred) refuses what
    ``body_from_file`` refuses, with the same reasons."""
    truncated = write_garbage_instance(tmp_path / "truncated.dcm")  # (0008,0016) claims 32767 bytes
    with pytest.raises(InvalidBody, match=r"\(0008,0016\) claims 32767 bytes"):
        read(truncated)
    bad_vr = write_garbage_instance(
        tmp_path / "badvr.dcm", payload=b"\x08\x00\x60\x00ZZ\x02\x00CT" + b"garbage!" * 4
    )
    with pytest.raises(InvalidBody, match="not a DICOM .* can be parsed"):
        read(bad_vr)
    (tmp_path / "text.dcm").write_text("hello")
    with pytest.raises(InvalidBody, match="not a DICOM .* can be parsed"):
        read(tmp_path / "text.dcm")
    with pytest.raises(InvalidBody, match="does not exist"):
        read(tmp_path / "nope.dcm")


def test_a_deferred_body_materializes_to_what_body_from_file_builds(ct: Path) -> None:
    body = scan_file(ct).body()
    assert set(body) == {"sop_class_uid", "sop_instance_uid", "transfer_syntax_uid", "file"}
    full = body_from_file(ct)
    assert {k: full[k] for k in body} == dict(body)
    body.materialize()
    assert body == full


def test_small_binary_values_are_inline_and_sequences_nested(tmp_path: Path) -> None:
    ds = ct_instance(study_uid=generate_uid(), series_uid=generate_uid(), number=1, size_kib=4)
    item = Dataset()
    item.CodeValue = "T-D0050"
    item.CodingSchemeDesignator = "SRT"
    ds.AnatomicRegionSequence = [item]
    ds.add_new(0x00091010, "OB", b"\x01\x02" * 8)  # private, small: inline
    ds.add_new(0x00091011, "OB", b"\x03" * 4096)  # private, large: bulk
    path = tmp_path / "seq.dcm"
    ds.save_as(path, enforce_file_format=True)
    body = body_from_file(path)
    assert body["dataset"]["00082218"]["Value"][0]["00080100"]["Value"] == ["T-D0050"]
    assert "InlineBinary" in body["dataset"]["00091010"]
    assert "BulkDataURI" in body["dataset"]["00091011"]
    body["dataset"]["00082218"]["Value"][0]["00080100"]["Value"] = ["T-D0051"]
    out = dcmread(prepare_for_send(body, tmp_path / "w").path)
    assert out.AnatomicRegionSequence[0].CodeValue == "T-D0051"
    assert out[0x00091011].value == b"\x03" * 4096 and out[0x00091010].value == b"\x01\x02" * 8


def test_memory_stays_flat_for_a_large_instance(tmp_path: Path) -> None:
    path = write_ct_series(tmp_path / "big", 1, size_kib=64 * 1024)[0]
    size = path.stat().st_size
    assert size > 60 * MiB
    tracemalloc.start()
    try:
        body = body_from_file(path)
        _, peak_body = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        prepared = prepare_for_send(seed_transform(body), tmp_path / "work")
        _, peak_send = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_body < 4 * MiB, f"building the body peaked at {peak_body / MiB:.1f} MiB"
    assert peak_send < 8 * MiB, f"writing the edited instance peaked at {peak_send / MiB:.1f} MiB"
    assert prepared.path.stat().st_size == size + (8 + 14) + (8 + 16)
    with open(path, "rb") as a, open(prepared.path, "rb") as b:
        a.seek(size - 4096)
        b.seek(prepared.path.stat().st_size - 4096)
        assert a.read() == b.read()


# -- deflate ------------------------------------------------------------------------------------


class _CountingSink(io.RawIOBase):
    """A write-only stream that keeps nothing: counts the bytes written to it."""

    def __init__(self) -> None:
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.size += len(data)
        return len(data)


def _deflated_part10(payload_chunks: Iterator[bytes], *, raw_payload: bytes | None = None) -> io.BytesIO:
    """A Deflated Explicit VR LE Part-10 stream: the file meta, then the chunks deflated (or
    ``raw_payload`` as is, for a corrupt stream)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(DicomFileLike(out), meta)
    if raw_payload is not None:
        out.write(raw_payload)
    else:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        for chunk in payload_chunks:
            out.write(deflater.compress(chunk))
        out.write(deflater.flush())
    out.seek(0)
    return out


def test_inflating_a_deflate_bomb_keeps_memory_bounded() -> None:
    size = 256 * MiB
    zeros = bytes(MiB)
    header = b"\xe0\x7f\x10\x00OB\x00\x00" + size.to_bytes(4, "little")  # Pixel Data, OB, 256 MiB
    src = _deflated_part10(iter([header, *([zeros] * (size // MiB))]))
    assert len(src.getbuffer()) < MiB  # ~250 KiB that inflate to 256 MiB
    dest = _CountingSink()
    tracemalloc.start()
    try:
        inflate_part10(src, dest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, f"inflating peaked at {peak / MiB:.1f} MiB"
    assert dest.size > size + len(header)  # preamble + file meta + the whole inflated dataset


def test_inflating_a_corrupt_deflate_stream_raises_invalid_body() -> None:
    src = _deflated_part10(iter(()), raw_payload=b"\xff" * 64)  # BTYPE 11: an invalid block type
    with pytest.raises(InvalidBody, match="deflated dataset is corrupt"):
        inflate_part10(src, _CountingSink())


# -- ambiguous VRs in implicit VR files ------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        (0x7FE00010, "OW"),  # Pixel Data: OB or OW
        (0x60003000, "OW"),  # Overlay Data: OB or OW (repeating group)
        (0x54001010, "OW"),  # Waveform Data: OB or OW
        (0x00283006, "OW"),  # LUT Data: US or OW
        (0x00281200, "OW"),  # Gray Lookup Table Data: US or SS or OW
        (0x00280120, "US or SS"),  # Pixel Padding Value: numeric, never bulk binary
        (0x00283002, "US or SS"),  # LUT Descriptor
        (0x00280010, "US"),  # Rows: not ambiguous
        (0x00091010, "UN"),  # private, not in the dictionary
    ],
)
def test_bulk_vr_of_implicit_elements(tag: int, expected: str) -> None:
    raw = RawDataElement(Tag(tag), None, 2048, b"", 0, True, True)
    assert _bulk_vr(raw) == expected


def test_large_us_or_ss_value_in_implicit_vr_is_not_bulk(tmp_path: Path) -> None:
    ds = ct_instance(study_uid=generate_uid(), series_uid=generate_uid(), number=1, size_kib=4)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.PixelRepresentation = 0
    values = list(range(1000))  # 2000 bytes: over BULK_THRESHOLD
    ds.add_new(0x00280120, "US", values)  # Pixel Padding Value, dictionary VR "US or SS"
    path = tmp_path / "implicit-us.dcm"
    ds.save_as(path, enforce_file_format=True)
    body = body_from_file(path)
    assert body["dataset"]["00280120"] == {"vr": "US", "Value": values}
    assert body["dataset"]["7FE00010"]["vr"] == "OW" and "BulkDataURI" in body["dataset"]["7FE00010"]


# -- failures while writing ------------------------------------------------------------------------


@contextmanager
def _file_size_limit(nbytes: int) -> Iterator[None]:
    """Writes past ``nbytes`` fail with EFBIG (a real full-disk stand-in that needs no root)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_write_part10_from_body_never_leaves_a_truncated_dest(ct: Path, tmp_path: Path) -> None:
    body = body_from_file(ct)  # unchanged: the stored file is copied to dest
    assert ct.stat().st_size > 32 * 1024
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "instance.dcm"
    dest.write_bytes(b"previous version")
    with _file_size_limit(16 * 1024), pytest.raises(OSError) as failure:
        write_part10_from_body(body, dest)
    assert failure.value.errno == errno.EFBIG
    assert dest.read_bytes() == b"previous version"  # untouched, not half of the new instance
    assert [p.name for p in out.iterdir()] == ["instance.dcm"]  # no temporary file left
    write_part10_from_body(body, dest)
    assert dest.read_bytes() == ct.read_bytes()
    assert [p.name for p in out.iterdir()] == ["instance.dcm"]


def test_bytes_body_leaves_no_temporary_file_when_the_write_fails(ct: Path, tmp_path: Path) -> None:
    data = ct.read_bytes()
    work = tmp_path / "work"
    work.mkdir()
    with _file_size_limit(16 * 1024), pytest.raises(OSError) as failure:
        prepare_for_send(data, work)
    assert failure.value.errno == errno.EFBIG
    assert list(work.iterdir()) == []


# -- fidelity: untouched elements go out as received, invalid values never block -------------------


def _explicit_element(tag: int, vr: str, value: bytes) -> bytes:
    """One Explicit VR Little Endian element, exactly these bytes (no validation, no padding)."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
    if vr in ("OB", "OW", "SQ", "UN", "UT", "UC"):
        return head + b"\0\0" + struct.pack("<L", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _undefined_sequence(tag: int, items: list[bytes]) -> bytes:
    """An undefined-length sequence of undefined-length items (pydicom parses it while reading)."""
    out = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"SQ\0\0" + struct.pack("<L", 0xFFFFFFFF)
    for item in items:
        out += struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + item + struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    return out + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


def _defined_sequence(tag: int, items: list[bytes]) -> bytes:
    value = b"".join(struct.pack("<HHL", 0xFFFE, 0xE000, len(item)) + item for item in items)
    return _explicit_element(tag, "SQ", value)


def _odd_instance(path: Path) -> dict[int, bytes]:
    """A CT instance whose elements pydicom would re-encode differently, or cannot convert;
    returns each element's exact bytes as written, by tag."""
    sop_instance = generate_uid()
    elements = {
        0x00080005: _explicit_element(0x00080005, "CS", b"ISO_IR 100"),
        0x00080016: _explicit_element(0x00080016, "UI", CTImageStorage.encode() + b"\0"),
        0x00080018: _explicit_element(
            0x00080018, "UI", sop_instance.encode() + b"\0"[: len(sop_instance) % 2]
        ),
        0x00080020: _explicit_element(0x00080020, "DA", b"2020x "),  # invalid date
        0x00080060: _explicit_element(0x00080060, "CS", b"CT"),
        0x00090010: _explicit_element(0x00090010, "LO", b"ACME 1.0"),  # private creator
        0x00091001: _explicit_element(0x00091001, "UN", b"\x01\x02\x03\x04\x05\x06"),  # private, UN
        0x00091002: _explicit_element(0x00091002, "FD", struct.pack("<d", 0.1)),  # private, odd VR
        0x00100010: _explicit_element(0x00100010, "PN", b"Doe^Jane"),
        0x00180050: _explicit_element(0x00180050, "DS", b"5.000000"),
        0x00181000: _explicit_element(0x00181000, "DS", b"abc "),  # invalid DS
        0x00181150: _explicit_element(0x00181150, "DS", b"1.23456789012345"),  # 16 characters
        0x00200013: _explicit_element(0x00200013, "IS", b"01"),
        0x00201041: _explicit_element(0x00201041, "DS", b"0.50000\\-1.2500 "),
        0x00280008: _explicit_element(0x00280008, "IS", b"1A"),  # invalid IS: Number of Frames
        0x00280030: _explicit_element(0x00280030, "UN", b"0.500000\\0.500000"),  # known tag as UN
        0x00281050: _explicit_element(0x00281050, "DS", b"40.0"),
        0x00540016: _defined_sequence(  # a DS and an invalid IS inside an item
            0x00540016,
            [
                _explicit_element(0x00181074, "DS", b"370000000.0000")
                + _explicit_element(0x00281052, "IS", b"x1")
            ],
        ),
        0x00081115: _undefined_sequence(
            0x00081115,
            [
                _explicit_element(0x0020000E, "UI", b"1.2.3.4\0")
                + _explicit_element(0x00201002, "IS", b"007 ")
            ],
        ),
        0x7FE00010: _explicit_element(0x7FE00010, "OW", b"\x00\x01" * 2048),
    }
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(f), meta)
        for tag in sorted(elements):
            f.write(elements[tag])
    return elements


def test_untouched_elements_go_out_byte_for_byte(tmp_path: Path) -> None:
    elements = _odd_instance(tmp_path / "odd.dcm")
    body = body_from_file(tmp_path / "odd.dcm")
    edited = seed_transform(body)
    del edited["dataset"]["00100010"]  # removed
    edited["dataset"]["00281050"] = {"vr": "DS", "Value": [50]}  # changed
    out = prepare_for_send(edited, tmp_path / "w").path.read_bytes()
    for tag, raw in elements.items():
        if tag in (0x00100010, 0x00281050):
            assert raw not in out, f"({tag >> 16:04X},{tag & 0xFFFF:04X}) should have changed"
        else:
            assert raw in out, f"({tag >> 16:04X},{tag & 0xFFFF:04X}) was re-encoded"
    ds = dcmread(io.BytesIO(out))
    assert ds.InstitutionName == "General Hospital" and ds.ManufacturerModelName == "INTU_PROCESSED"
    assert ds.WindowCenter == 50 and "PatientName" not in ds
    assert [int(t) for t in ds.keys()] == sorted(int(t) for t in ds.keys())


def test_group_lengths_are_kept_or_counted_anew(tmp_path: Path) -> None:
    uid = generate_uid()
    group8 = [
        _explicit_element(0x00080016, "UI", CTImageStorage.encode() + b"\0"),
        _explicit_element(0x00080018, "UI", uid.encode() + b"\0"[: len(uid) % 2]),
        _explicit_element(0x00080060, "CS", b"CT"),
    ]
    group10 = [_explicit_element(0x00100010, "PN", b"Doe^Jane"), _explicit_element(0x00100020, "LO", b"ID1 ")]
    # Group lengths, as old writers put them.
    length8 = _explicit_element(0x00080000, "UL", struct.pack("<L", sum(map(len, group8))))
    length10 = _explicit_element(0x00100000, "UL", struct.pack("<L", sum(map(len, group10))))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "gl.dcm"
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(f), meta)
        f.write(b"".join([length8, *group8, length10, *group10]))
    body = body_from_file(path)
    assert "00080000" not in body["dataset"] and "00080000" in body["raw_elements"]
    written = prepare_for_send(seed_transform(body), tmp_path / "w").path
    assert length10 + b"".join(group10) in written.read_bytes()  # group 0010 untouched: as received
    added = _explicit_element(0x00080080, "LO", b"General Hospital")
    added += _explicit_element(0x00081090, "LO", b"INTU_PROCESSED")
    assert dcmread(written)[0x00080000].value == sum(map(len, group8)) + len(added)  # counted anew


def test_invalid_values_are_strings_and_never_block(tmp_path: Path) -> None:
    _odd_instance(tmp_path / "odd.dcm")
    body = body_from_file(tmp_path / "odd.dcm")
    ds = body["dataset"]
    assert ds["00280008"] == {"vr": "IS", "Value": ["1A"]}
    assert ds["00181000"] == {"vr": "DS", "Value": ["abc"]}
    assert ds["00180050"]["Value"] == [5.0]  # valid values are what pydicom's to_json_dict gives
    item = ds["00540016"]["Value"][0]
    assert item["00281052"] == {"vr": "IS", "Value": ["x1"]} and item["00181074"]["Value"] == [370000000.0]
    assert body["invalid_elements"] == ["00181000", "00280008", "00540016/0/00281052"]
    assert json.loads(json.dumps(body)) == body
    # Unchanged: the stored file itself; a transformer may also fix the bad value.
    assert prepare_for_send(body, tmp_path / "w").path == tmp_path / "odd.dcm"
    fixed = copy.deepcopy(body)
    fixed["dataset"]["00280008"] = {"vr": "IS", "Value": [1]}
    assert dcmread(prepare_for_send(fixed, tmp_path / "w").path).NumberOfFrames == 1


def test_a_body_without_raw_elements_is_re_encoded(ct: Path, tmp_path: Path) -> None:
    body = seed_transform(body_from_file(ct))
    del body["raw_elements"]  # e.g. a transformer that built a new body dict
    out = dcmread(prepare_for_send(body, tmp_path / "w").path)
    assert out.ManufacturerModelName == "INTU_PROCESSED" and out.PixelData == dcmread(ct).PixelData


def test_changing_the_character_set_re_encodes_every_element(ct: Path, tmp_path: Path) -> None:
    body = body_from_file(ct)
    body["dataset"]["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
    body["dataset"]["00100010"] = {"vr": "PN", "Value": [{"Alphabetic": "Müller^Jürgen"}]}
    out = dcmread(prepare_for_send(body, tmp_path / "w").path)
    assert str(out.PatientName) == "Müller^Jürgen"
    assert "Müller".encode() in prepare_for_send(body, tmp_path / "w").path.read_bytes()
