"""The receiving data path's own encodings (``scp.direct``, ``shared.dimse``), checked against
pydicom's and pynetdicom's; its behaviour with real peers is in test_receiver, test_hostile,
test_interop_peers and test_fidelity_corpus."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import socket
import stat
import struct
import threading
import time
from pathlib import Path

import pytest
from intu_dicom_destination.scp.direct import part10_header
from intu_dicom_destination.shared import dimse
from intu_dicom_destination.testing.attacks import c_echo_rq
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


# -- the Receiver over a socket pair -------------------------------------------------------------
def _receiver(  # type: ignore[no-untyped-def]
    sock: socket.socket,
    tmp_path: Path,
    stored: list[bytes],
    write_timeout_s: float = 5.0,
    read_timeout_s: float = 5.0,
):
    from intu_dicom_destination.scp.direct import Peer, Receiver, Reply
    from intu_dicom_destination.scp.guard import Connection

    def store(request):  # type: ignore[no-untyped-def]
        stored.append(request.path.read_bytes())
        return Reply(0x0000)

    conn = Connection(sock, ("127.0.0.1", 1))
    receiver = Receiver(
        sock,
        conn,
        Peer(contexts={1: (CTImageStorage, ExplicitVRLittleEndian)}, max_pdu=0),
        incoming_dir=tmp_path,
        max_instance_bytes=0,
        max_pdu=0,
        read_timeout_s=read_timeout_s,
        write_timeout_s=write_timeout_s,
        idle_timeout_s=5.0,
        store=store,
        echo=lambda: 0x0000,
    )
    return receiver, conn


def test_a_dataset_in_thousands_of_tiny_fragments_is_written_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fragments are written together, one writev per read of the socket, at most IOV_MAX at a
    time: 20,000 fragments of 7 bytes (a peer may send that) arrive intact, after the file header,
    and the disk is asked to start writing the file every 128 KiB."""
    from intu_dicom_destination.scp import direct

    writebacks: list[int] = []
    monkeypatch.setattr(direct, "start_writeback", writebacks.append)
    ours, peer = socket.socketpair()
    stored: list[bytes] = []
    receiver, _ = _receiver(ours, tmp_path, stored)
    dataset = os.urandom(7 * 20000)
    command = dimse.store_command(1, CTImageStorage, "1.2.3.4")
    stream = b"".join(dimse.command_pdus(1, command, 0))
    pieces = [dataset[i : i + 7] for i in range(0, len(dataset), 7)]
    stream += b"".join(
        dimse.p_data(1, dimse.LAST if n == len(pieces) - 1 else 0, piece) for n, piece in enumerate(pieces)
    )
    stream += struct.pack(">BBLL", dimse.A_RELEASE_RQ, 0, 4, 0)
    answers = bytearray()

    def requestor() -> None:  # sends everything, reads the answer and the release, then closes
        peer.sendall(stream)
        while len(answers) < 12 or answers[-10:-4] != bytes([dimse.A_RELEASE_RP, 0, 0, 0, 0, 4]):
            chunk = peer.recv(65536)
            if not chunk:
                break
            answers.extend(chunk)
        peer.close()

    sender = threading.Thread(target=requestor)
    sender.start()
    ending = receiver.run()
    sender.join(10)
    ours.close()
    assert ending.name == "RELEASED"
    assert stored == [part10_header(CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian) + dataset]
    assert len(writebacks) == len(dataset) // (128 * 1024)  # (the header counts too: 1 here)
    response = bytes(answers)
    ds = _read(response[12:-10])  # one PDU: PDU header 6 + PDV header 6; then the A-RELEASE-RP
    assert (ds.CommandField, ds.Status) == (dimse.C_STORE_RSP, 0x0000)
    assert list(tmp_path.iterdir()) == []  # the handler did not move it: the receiver deleted it


def test_a_peer_that_stops_reading_answers_is_closed_after_the_write_timeout(tmp_path: Path) -> None:
    """Answers are sent without blocking; when the peer leaves them unread until both socket
    buffers are full, the connection ends after ``write_timeout_s`` with the reason logged."""
    ours, peer = socket.socketpair()
    for sock in (ours, peer):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    receiver, conn = _receiver(ours, tmp_path, [], write_timeout_s=0.5)
    echo = c_echo_rq() * 16
    stop = threading.Event()

    def flood() -> None:  # C-ECHO requests, never reading the answers
        peer.settimeout(0.2)
        while not stop.is_set():
            try:
                peer.sendall(echo)
            except TimeoutError:
                continue
            except OSError:
                return

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    began = time.monotonic()
    ending = receiver.run()
    stop.set()
    flooder.join(10)
    peer.close()
    ours.close()
    assert ending.name == "CLOSED"
    assert conn.reason == "peer did not read for 0.5 s"
    assert 0.5 <= time.monotonic() - began < 10  # the deadline ran, from the first blocked write


def test_a_short_write_is_written_again_from_where_it_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    """``_write_all``: what a short ``writev`` left (the middle of a buffer, or whole buffers) is
    written next, in order."""
    from intu_dicom_destination.scp import direct

    written = bytearray()

    def short_writev(fd: int, buffers: list[bytes]) -> int:  # at most 5 bytes a call
        data = b"".join(bytes(b) for b in buffers)[:5]
        written.extend(data)
        return len(data)

    monkeypatch.setattr(direct.os, "writev", short_writev)
    pieces = [b"abc", memoryview(b"defghij"), b"", b"k", b"lmnopqrstu"]
    direct._write_all(-1, pieces)
    assert bytes(written) == b"abcdefghijklmnopqrstu"
    assert len(pieces) == 5  # the caller's list is left alone


def test_a_pdu_that_keeps_arriving_must_still_arrive_whole_within_the_read_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads that never have to wait (the peer is faster than the disk) still count against the
    PDU's deadline: a slow disk does not let one PDU hold its association open for ever."""
    from intu_dicom_destination.scp import direct

    real_write_all = direct._write_all

    def slow_disk(fd: int, buffers: list) -> None:  # type: ignore[type-arg]
        time.sleep(0.05)
        real_write_all(fd, buffers)

    monkeypatch.setattr(direct, "_write_all", slow_disk)
    ours, peer = socket.socketpair()
    receiver, conn = _receiver(ours, tmp_path, [], read_timeout_s=0.3)
    command = b"".join(dimse.command_pdus(1, dimse.store_command(1, CTImageStorage, "1.2.3.4"), 0))
    big = dimse.p_data(1, dimse.LAST, bytes(16 * 1024 * 1024))  # 64 reads of the 256 KiB buffer

    def requestor() -> None:
        with contextlib.suppress(OSError):  # cut off: the receiver gave up on the PDU
            peer.sendall(command + big)

    sender = threading.Thread(target=requestor, daemon=True)
    sender.start()
    began = time.monotonic()
    ending = receiver.run()
    ours.close()
    sender.join(10)
    peer.close()
    assert ending.name == "CLOSED" and conn.reason == "no complete PDU within 0.3 s"
    assert time.monotonic() - began < 3  # not the 64 x 50 ms it would take to read it whole
    assert list(tmp_path.iterdir()) == []  # the partial file deleted
