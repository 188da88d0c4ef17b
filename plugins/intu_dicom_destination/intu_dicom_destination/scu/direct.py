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

import os
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.uid import DeflatedExplicitVRLittleEndian

from intu_dicom_destination import internals
from intu_dicom_destination.shared import dimse
from intu_dicom_destination.shared.dimse import (
    A_ABORT,
    A_RELEASE_RQ,
    C_STORE_RSP,
    COMMAND,
    LAST,
    P_DATA_TF,
    MalformedCommand,
    p_data,
    p_data_header,
    parse_command,
    store_command,
)

__all__ = [
    "Died",
    "DirectStore",
    "NotDirect",
    "StoreResponse",
    "dataset_offset",
    "parse_command",
    "store_command",
]
# Bytes of the file read (and so held) at a time: a 512 KiB instance in one read, a 1 GiB one in
# bounded memory.
_READ_CHUNK = 4 * 1024 * 1024
_HEAD = 64 * 1024  # enough for any file meta seen in practice
_IOV_MAX = 1024  # buffers per sendmsg (Linux's UIO_MAXIOV)
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
        head = fp.read(_HEAD)
        offset = _offset_in(head)
        while offset is None:  # a file meta larger than _HEAD: read on
            more = fp.read(_HEAD)
            if not more:
                raise NotDirect("file meta runs to the end of the file")
            head += more
            offset = _offset_in(head)
        return offset


def _offset_in(head: bytes) -> int | None:
    """The dataset's offset in a Part-10 file that starts with ``head``; None when ``head`` ends
    inside the file meta; ``NotDirect`` when it cannot be walked."""
    if len(head) < 132 or head[128:132] != b"DICM":
        raise NotDirect("no preamble and DICM prefix")
    offset = 132
    while offset + 8 <= len(head):
        group, _elem, vr, length = struct.unpack_from("<HH2sH", head, offset)
        if group != 0x0002:
            return offset
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            if offset + 12 > len(head):
                return None
            (length,) = struct.unpack_from("<L", head, offset + 8)
            if length == 0xFFFFFFFF:
                raise NotDirect("undefined length in the file meta")
            offset += 12 + length
        else:
            offset += 8 + length
    return None


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
        with open(path, "rb", buffering=0) as fp:
            size = os.fstat(fp.fileno()).st_size
            head = fp.read(min(size, _READ_CHUNK))
            offset = _offset_in(head)
            if offset is None:  # a file meta larger than a chunk: unusual, walked from the file
                offset = dataset_offset(path)
            if offset >= size:
                raise NotDirect("no dataset after the file meta")
            self._message_id = self._message_id % 0xFFFF + 1
            command = store_command(self._message_id, sop_class, sop_instance)
            with internals.hold_transport(self.assoc) as sock:
                deadline = time.monotonic() + timeout_s
                try:
                    self._send_message(sock, context_id, command, fp, head, offset, size, deadline)
                    return self._response(sock, deadline)
                except TimeoutError:
                    raise Died("no C-STORE response in time", timeout=True) from None
                except OSError as exc:
                    raise Died(f"connection lost: {exc}") from None

    def _send_message(
        self,
        sock: socket.socket,
        context_id: int,
        command: bytes,
        fp: BinaryIO,
        head: bytes,
        offset: int,
        size: int,
        deadline: float,
    ) -> None:
        """The command PDU, then the dataset as P-DATA-TF PDUs of the peer's maximum length: read
        a chunk at a time (one read for a 512 KiB instance) and written with one ``sendmsg`` per
        chunk (a PDU header and its slice of the chunk per PDU: no copies, few system calls)."""
        out: list[bytes | memoryview] = [p_data(context_id, COMMAND | LAST, command)]
        full = p_data_header(context_id, 0, self._max_data)  # every PDU but the last: one header
        chunk, start, left = head, offset, size - offset
        while True:
            with memoryview(chunk) as view:
                for pos in range(start, len(chunk), self._max_data):
                    piece = view[pos : pos + self._max_data]
                    left -= len(piece)
                    if left and len(piece) == self._max_data:
                        out.append(full)
                    else:
                        out.append(p_data_header(context_id, LAST if left == 0 else 0, len(piece)))
                    out.append(piece)
                _send(sock, out, deadline)
                out.clear()
            if left <= 0:
                return
            chunk, start = fp.read(min(left, _READ_CHUNK)), 0
            if not chunk:
                raise Died(f"the file shrank while it was sent ({left} bytes missing)")

    def _response(self, sock: socket.socket, deadline: float) -> StoreResponse:
        command = bytearray()
        while True:
            pdu_type, body = _read_pdu(sock, deadline)
            if pdu_type == A_ABORT:
                raise Died("the peer aborted the association")
            if pdu_type == A_RELEASE_RQ:
                raise Died("the peer asked to release the association during a C-STORE")
            if pdu_type != P_DATA_TF:
                raise Died(f"unexpected PDU type 0x{pdu_type:02X} during a C-STORE")
            pos = 0
            while pos + 6 <= len(body):
                (item_length,) = struct.unpack_from(">L", body, pos)
                control = body[pos + 5]
                if item_length < 2 or pos + 4 + item_length > len(body):
                    raise Died("malformed P-DATA-TF PDU")
                if not control & COMMAND:
                    raise Died("a dataset fragment in a C-STORE response")
                command += body[pos + 6 : pos + 4 + item_length]
                pos += 4 + item_length
                if control & LAST:
                    return self._decode(bytes(command))

    def _decode(self, command: bytes) -> StoreResponse:
        try:
            elements = parse_command(command)
        except MalformedCommand:
            raise Died("malformed command set in the response") from None
        field = dimse.us_value(elements, dimse.COMMAND_FIELD)
        responding_to = dimse.us_value(elements, dimse.RESPONDING_TO)
        status = dimse.us_value(elements, dimse.STATUS)
        if field is None or responding_to is None or status is None:
            raise Died("a C-STORE response without Command Field, Message ID or Status")
        if field != C_STORE_RSP or responding_to != self._message_id:
            raise Died(f"unexpected response (command 0x{field:04X} to message {responding_to})")
        return StoreResponse(status, dimse.text_value(elements, dimse.ERROR_COMMENT))


def _send(sock: socket.socket, buffers: list[bytes | memoryview], deadline: float) -> None:
    """Write ``buffers`` in order, whole: ``sendmsg`` on a plain socket (fewer system calls than a
    ``sendall`` per PDU), joined and ``sendall`` on a TLS socket (which has no ``sendmsg``)."""
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    if isinstance(sock, ssl.SSLSocket):
        sock.sendall(b"".join(buffers))
        return
    pending = buffers
    while pending:
        batch = pending[:_IOV_MAX]
        sent = sock.sendmsg(batch)
        if sent == 0:
            raise Died("the connection is closed")
        if len(batch) == len(pending) and sent == sum(map(len, batch)):
            return  # the usual case on loopback and a LAN: all of it at once
        n = 0
        while n < len(pending) and sent >= len(pending[n]):
            sent -= len(pending[n])
            n += 1
        pending = pending[n:]
        if sent:
            pending[0] = memoryview(pending[0])[sent:]
        if pending:
            sock.settimeout(max(0.001, deadline - time.monotonic()))


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
