"""The receiving data path's own encodings (``scp.direct``, ``shared.dimse``), checked against
pydicom's and pynetdicom's; its behaviour with real peers is in test_receiver, test_hostile,
test_interop_peers and test_fidelity_corpus."""

from __future__ import annotations

import io
import itertools
import os
import stat
from pathlib import Path

import pytest
from intu_dicom_destination.scp.direct import part10_header
from intu_dicom_destination.shared import dimse
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom.dsutils import create_file_meta


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        (CTImageStorage, "1.2.3.4.5", ExplicitVRLittleEndian),  # odd UID: padded
        (CTImageStorage, "1.2.3.4.56", JPEG2000Lossless),
        ("1.2.3.999.1", "2.25.1234567890123456789012345678901234567", "1.2.840.10008.1.2"),
    ],
)
def test_the_file_header_is_byte_for_byte_what_pynetdicom_writes(
    sop_class: str, sop_instance: str, syntax: str
) -> None:
    expected = io.BytesIO()
    expected.write(b"\0" * 128 + b"DICM")
    meta = create_file_meta(
        sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance), transfer_syntax=UID(syntax)
    )
    write_file_meta_info(expected, meta)  # type: ignore[arg-type]
    assert part10_header(sop_class, sop_instance, syntax) == expected.getvalue()


def _read(command: bytes):  # type: ignore[no-untyped-def]
    return read_dataset(DicomBytesIO(command), is_implicit_VR=True, is_little_endian=True)


def test_a_c_store_response_reads_back_with_pydicom() -> None:
    command = dimse.response_command(
        dimse.C_STORE_RSP,
        9,
        0xA700,
        sop_class=CTImageStorage,
        sop_instance="1.2.3",
        comment="out of disk space",
    )
    ds = _read(command)
    assert ds.CommandGroupLength == len(command) - 12
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status) == (0x8001, 9, 0xA700)
    assert ds.CommandDataSetType == 0x0101
    assert ds.AffectedSOPClassUID == CTImageStorage and ds.AffectedSOPInstanceUID == "1.2.3"
    assert ds.ErrorComment == "out of disk space"


def test_an_error_comment_is_cut_to_64_characters_without_backslashes() -> None:
    ds = _read(dimse.response_command(dimse.C_STORE_RSP, 1, 0x0110, comment="a\\b" + "x" * 100))
    assert ds.ErrorComment == ("a/b" + "x" * 100)[:64]


def test_a_command_longer_than_the_peer_pdu_is_split_into_fragments() -> None:
    command = dimse.response_command(dimse.C_ECHO_RSP, 1, 0, sop_class="1.2.840.10008.1.1")
    pdus = list(dimse.command_pdus(3, command, 40))
    assert len(pdus) > 1 and all(len(p) <= 40 + 6 for p in pdus)
    data = b"".join(p[12:] for p in pdus)  # PDU header 6 + PDV header 6
    assert data == command
    assert [p[11] for p in pdus] == [dimse.COMMAND] * (len(pdus) - 1) + [dimse.COMMAND | dimse.LAST]


def test_a_malformed_command_set_is_refused() -> None:
    with pytest.raises(dimse.MalformedCommand):
        dimse.parse_command(b"\x00\x00\x00\x00\xff\xff\x00\x00")


def test_temporary_files_are_new_private_and_never_reuse_a_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_create_temp`` (``os.open`` with O_EXCL, instead of mkstemp): a name already taken is
    skipped, never opened, and the file is readable by its owner only."""
    from intu_dicom_destination.scp import direct

    names = itertools.count()
    monkeypatch.setattr(direct, "_temp_names", names)
    taken = tmp_path / f"{direct._TEMP_PREFIX}-0.dcm"
    taken.write_bytes(b"someone else's")
    path, fd = direct._create_temp(tmp_path)
    os.close(fd)
    assert path == tmp_path / f"{direct._TEMP_PREFIX}-1.dcm" and path.read_bytes() == b""
    assert taken.read_bytes() == b"someone else's"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    created = {direct._create_temp(tmp_path) for _ in range(3)}
    for _, fd in created:
        os.close(fd)
    assert len({p for p, _ in created} | {path, taken}) == 5
    with pytest.raises(FileNotFoundError):  # as mkstemp: a missing folder is the caller's error
        direct._create_temp(tmp_path / "missing")
