"""C-STORE over an established association without pynetdicom's per-PDU machinery.

pynetdicom sends a C-STORE through four threads' worth of hand-offs: the caller builds the command
as a pydicom dataset, the DIMSE provider fragments it into primitives, a bounded queue hands each
PDU to the DUL thread, which encodes and writes it while the reactor polls; the response comes
back the same way. On the route benchmark that is most of the sending side's ~4 ms of CPU per
512 KiB instance, where writing the same bytes from here costs well under 1 ms (issue 12's table).

Here the caller's thread does the exchange itself, on the association's socket, while the DUL
thread is kept off it (``internals.hold_transport``): the command set is encoded directly (a few
fixed elements, PS3.7 9.3.1.1), the dataset is streamed from the stored file as it is, in PDUs of
the size the peer accepts, and the response PDUs are read and decoded here. pynetdicom keeps
everything else: association negotiation, release and abort, C-ECHO, and any C-STORE this module
declines (``NotDirect``: a transfer syntax change, a deflated file, a file whose meta cannot be
walked), which is sent the usual way.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import DeflatedExplicitVRLittleEndian

from intu_dicom_destination import internals

_P_DATA_TF = 0x04
_A_RELEASE_RQ = 0x05
_A_ABORT = 0x07
_COMMAND, _LAST = 0x01, 0x02  # message control header bits (PS3.8 E.2)
_C_STORE_RSP = 0x8001
_READ_CHUNK = 1024 * 1024
# The largest PDU we write when the peer sets no limit (maximum length 0).
_UNLIMITED_PDU = 1024 * 1024


class NotDirect(Exception):
    """This C-STORE is not one for the direct path; nothing was sent, use pynetdicom's."""


class Died(Exception):
    """The association cannot go on (closed, aborted, a protocol error, a timeout): it must be
    aborted. ``timeout`` is True when the peer did not answer in time."""

    def __init__(self, reason: str, *, timeout: bool = False) -> None:
        super().__init__(reason)
        self.timeout = timeout


@dataclass(frozen=True)
class StoreResponse:
    """What the peer answered: its status and, if any, its error comment."""

    status: int
    comment: str


def dataset_offset(path: Path) -> int:
    """Where the dataset starts in a Part-10 file: after the preamble, 'DICM' and the file meta
    group (explicit VR little endian, PS3.10 7.1). Raises ``NotDirect`` when it cannot be walked."""
    with open(path, "rb") as fp:
        head = fp.read(132)
        if len(head) < 132 or head[128:132] != b"DICM":
            raise NotDirect("no preamble and DICM prefix")
        offset = 132
        while True:
            header = fp.read(8)
            if len(header) < 8:
                raise NotDirect("file meta runs to the end of the file")
            group, _elem = struct.unpack("<HH", header[:4])
            if group != 0x0002:
                return offset
            vr = header[4:6]
            if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
                extra = fp.read(4)
                if len(extra) < 4:
                    raise NotDirect("file meta runs to the end of the file")
                (length,) = struct.unpack("<L", extra)
                size = 12 + length
            else:
                (length,) = struct.unpack("<H", header[6:8])
                size = 8 + length
            if length == 0xFFFFFFFF:
                raise NotDirect("undefined length in the file meta")
            offset += size
            fp.seek(offset)


def _element(group: int, elem: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"  # UIDs are padded with NUL, other command values are even already
    return struct.pack("<HHL", group, elem, len(value)) + value


def store_command(message_id: int, sop_class: str, sop_instance: str, priority: int = 0) -> bytes:
    """A C-STORE-RQ command set, implicit VR little endian, with its group length (PS3.7 9.3.1.1)."""
    body = b"".join(
        (
            _element(0x0000, 0x0002, sop_class.encode("ascii")),
            _element(0x0000, 0x0100, struct.pack("<H", 0x0001)),
            _element(0x0000, 0x0110, struct.pack("<H", message_id)),
            _element(0x0000, 0x0700, struct.pack("<H", priority)),
            _element(0x0000, 0x0800, struct.pack("<H", 0x0000)),  # a dataset follows
            _element(0x0000, 0x1000, sop_instance.encode("ascii")),
        )
    )
    return _element(0x0000, 0x0000, struct.pack("<L", len(body))) + body


def parse_command(data: bytes) -> dict[int, bytes]:
    """The elements of a command set (implicit VR little endian) by tag; ``Died`` if malformed."""
    elements: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        if pos + 8 > len(data):
            raise Died("malformed command set in the response")
        group, elem, length = struct.unpack_from("<HHL", data, pos)
        pos += 8
        if pos + length > len(data):
            raise Died("malformed command set in the response")
        elements[group << 16 | elem] = data[pos : pos + length]
        pos += length
    return elements


class DirectStore:
    """C-STOREs on one established association (one caller at a time, as the pool ensures)."""

    def __init__(self, assoc: Any) -> None:
        self.assoc = assoc
        self._message_id = 0
        peer_max = int(getattr(assoc.acceptor, "maximum_length", 0) or 0)
        self._max_data = (peer_max or _UNLIMITED_PDU) - 6  # a PDV item's header is 6 bytes

    def _context_id(self, sop_class: str, transfer_syntax: str) -> int:
        for cx in self.assoc.accepted_contexts:
            if str(cx.abstract_syntax) == sop_class and str(cx.transfer_syntax[0]) == transfer_syntax:
                return int(cx.context_id)
        raise NotDirect("no accepted presentation context for it")

    def store(
        self, path: Path, sop_class: str, sop_instance: str, transfer_syntax: str, timeout_s: float
    ) -> StoreResponse:
        """Send the stored file's dataset as it is and wait for the response. ``NotDirect``:
        nothing was sent. ``Died``: the association must be aborted."""
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            raise NotDirect("deflated")
        context_id = self._context_id(sop_class, transfer_syntax)
        offset = dataset_offset(path)
        self._message_id = self._message_id % 0xFFFF + 1
        command = store_command(self._message_id, sop_class, sop_instance)
        with internals.hold_transport(self.assoc) as sock:
            deadline = time.monotonic() + timeout_s
            try:
                self._send_message(sock, context_id, command, path, offset, deadline)
                return self._response(sock, deadline)
            except TimeoutError:
                raise Died("no C-STORE response in time", timeout=True) from None
            except OSError as exc:
                raise Died(f"connection lost: {exc}") from None

    def _send_message(
        self, sock: socket.socket, context_id: int, command: bytes, path: Path, offset: int, deadline: float
    ) -> None:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(_pdu(context_id, _COMMAND | _LAST, command))
        size = path.stat().st_size
        left = size - offset
        with open(path, "rb") as fp:
            fp.seek(offset)
            if left == 0:
                raise Died("empty dataset")
            while left > 0:
                chunk = fp.read(min(self._max_data, left, _READ_CHUNK))
                if not chunk:
                    raise Died(f"{path} shrank while it was sent")
                left -= len(chunk)
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.sendall(_pdu(context_id, _LAST if left == 0 else 0, chunk))

    def _response(self, sock: socket.socket, deadline: float) -> StoreResponse:
        command = bytearray()
        while True:
            pdu_type, body = _read_pdu(sock, deadline)
            if pdu_type == _A_ABORT:
                raise Died("the peer aborted the association")
            if pdu_type == _A_RELEASE_RQ:
                raise Died("the peer asked to release the association during a C-STORE")
            if pdu_type != _P_DATA_TF:
                raise Died(f"unexpected PDU type 0x{pdu_type:02X} during a C-STORE")
            pos = 0
            while pos + 6 <= len(body):
                (item_length,) = struct.unpack_from(">L", body, pos)
                control = body[pos + 5]
                if item_length < 2 or pos + 4 + item_length > len(body):
                    raise Died("malformed P-DATA-TF PDU")
                if not control & _COMMAND:
                    raise Died("a dataset fragment in a C-STORE response")
                command += body[pos + 6 : pos + 4 + item_length]
                pos += 4 + item_length
                if control & _LAST:
                    return self._decode(bytes(command))

    def _decode(self, command: bytes) -> StoreResponse:
        elements = parse_command(command)
        try:
            field = struct.unpack("<H", elements[0x00000100][:2])[0]
            responding_to = struct.unpack("<H", elements[0x00000120][:2])[0]
            status = struct.unpack("<H", elements[0x00000900][:2])[0]
        except (KeyError, struct.error):
            raise Died("a C-STORE response without Command Field, Message ID or Status") from None
        if field != _C_STORE_RSP or responding_to != self._message_id:
            raise Died(f"unexpected response (command 0x{field:04X} to message {responding_to})")
        comment = elements.get(0x00000902, b"").decode("latin-1").strip(" \0")
        return StoreResponse(status, comment)


def _pdu(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">BBLLBB", _P_DATA_TF, 0, len(data) + 6, len(data) + 2, context_id, control) + data


def _read_exactly(sock: socket.socket, n: int, deadline: float) -> bytearray:
    data = bytearray(n)
    got = 0
    with memoryview(data) as view:
        while got < n:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            count = sock.recv_into(view[got:])
            if not count:
                raise Died("the peer closed the connection")
            got += count
    return data


def _read_pdu(sock: socket.socket, deadline: float) -> tuple[int, bytearray]:
    header = _read_exactly(sock, 6, deadline)
    pdu_type, _, length = struct.unpack(">BBL", header)
    if length > 16 * 1024 * 1024:
        raise Died(f"a PDU of {length} bytes in a C-STORE response")
    return pdu_type, _read_exactly(sock, length, deadline)
