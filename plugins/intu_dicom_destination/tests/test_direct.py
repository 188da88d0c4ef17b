"""The direct C-STORE's encoding (``scu.direct``), checked against pydicom's reading of it; its
behaviour against real peers is in test_sender, test_interop_* and test_fidelity_corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
from intu_dicom_destination.scu.direct import NotDirect, dataset_offset, parse_command, store_command
from intu_dicom_destination.testing import ct_instance
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.uid import CTImageStorage


def test_the_store_command_reads_back_as_a_c_store_rq() -> None:
    uid = "1.2.3.4.5"  # odd length: padded with NUL
    command = store_command(7, CTImageStorage, uid)
    ds = read_dataset(DicomBytesIO(command), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandGroupLength == len(command) - 12
    assert ds.CommandField == 0x0001
    assert ds.MessageID == 7
    assert ds.Priority == 0
    assert ds.CommandDataSetType == 0x0000
    assert ds.AffectedSOPClassUID == CTImageStorage
    assert ds.AffectedSOPInstanceUID == uid
    assert parse_command(command)[0x00001000] == b"1.2.3.4.5\0"


def test_the_dataset_starts_where_pydicom_finds_it(tmp_path: Path) -> None:
    path = tmp_path / "ct.dcm"
    ct_instance(study_uid="1.2.3", series_uid="1.2.3.1", number=1, size_kib=4).save_as(
        path, enforce_file_format=True
    )
    offset = dataset_offset(path)
    first = next(iter(dcmread(path).keys()))
    group, elem = int(first) >> 16, int(first) & 0xFFFF
    assert path.read_bytes()[offset : offset + 4] == group.to_bytes(2, "little") + elem.to_bytes(2, "little")


def test_a_file_without_part10_header_is_declined(tmp_path: Path) -> None:
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(b"\x08\x00\x16\x00" + b"\0" * 200)
    with pytest.raises(NotDirect):
        dataset_offset(bare)


def test_partial_sendmsg_writes_every_buffer_whole_and_in_order() -> None:
    """``_send`` on a socket whose buffers take only part of each ``sendmsg``: the peer reads
    exactly the buffers, in order (the partial-write bookkeeping of a large chunk)."""
    import socket
    import threading
    import time

    from intu_dicom_destination.scu import direct

    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    chunk = bytes(range(256)) * 4096  # 1 MiB
    view = memoryview(chunk)
    buffers: list[bytes | memoryview] = []
    for start in range(0, len(chunk), 16378):
        piece = view[start : start + 16378]
        buffers += [direct.p_data_header(1, 0, len(piece)), piece]
    expected = b"".join(buffers)
    got = bytearray()

    def read() -> None:
        while len(got) < len(expected):
            data = theirs.recv(65536)
            if not data:
                return
            got.extend(data)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        direct._send(ours, buffers, time.monotonic() + 30)
        reader.join(30)
    finally:
        ours.close()
        theirs.close()
    assert bytes(got) == expected
