"""Hostile DICOM peers on loopback: raw PDUs and DIMSE messages built with pynetdicom's encoders,
sent by hand so that a test can stop, stall, lie or flood where a real SCU never would.

Also ``served_within``: whether a legitimate DCMTK sender is served while an attack lasts (the
availability measure of the hostile-input suite: "served within N seconds", never a timing)."""

from __future__ import annotations

import io
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

from intu_dicom_destination.testing.peers import INTEROP_ENV, require_tool

VERIFICATION = "1.2.840.10008.1.1"
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
A_ABORT = 0x07


def associate_rq(
    contexts: Sequence[tuple[str, Sequence[str]]] = ((VERIFICATION, (ImplicitVRLittleEndian,)),),
    *,
    called: str = "INTU_SCP",
    calling: str = "ATTACKER",
    max_pdu: int = 16384,
) -> bytes:
    """An encoded A-ASSOCIATE-RQ PDU proposing ``contexts`` (IDs 1, 3, 5...)."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    length = MaximumLengthNotification()
    length.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.826.0.1.3680043.9.7433.1"
    primitive.user_information = [length, implementation]
    items = []
    for n, (abstract, syntaxes) in enumerate(contexts):
        cx = build_context(abstract, list(syntaxes))
        cx.context_id = 2 * n + 1
        items.append(cx)
    primitive.presentation_context_definition_list = items
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def p_data(context_id: int, control: int, payload: bytes) -> bytes:
    """One P-DATA-TF PDU holding one PDV (``control``: bit 0 command, bit 1 last fragment)."""
    pdv = struct.pack(">LBB", len(payload) + 2, context_id, control) + payload
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def _pdus(message: Any, context_id: int, max_pdu: int) -> Iterator[bytes]:
    for primitive in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        yield bytes(pdu.encode())


def c_echo_rq(context_id: int = 1, message_id: int = 1) -> bytes:
    """The P-DATA-TF PDU(s) of a C-ECHO-RQ."""
    primitive = C_ECHO()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = VERIFICATION
    message = C_ECHO_RQ()
    message.primitive_to_message(primitive)
    return b"".join(_pdus(message, context_id, 16384))


def store_command(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """The encoded command set (implicit VR LE) of a C-STORE-RQ with a dataset."""
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Priority = 0
    primitive.DataSet = io.BytesIO(b"\0")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True) or b"")


def encode_dataset(ds: Dataset, implicit: bool = True) -> bytes:
    """``ds`` encoded without file meta (implicit or explicit VR little endian)."""
    return bytes(encode(ds, implicit, True) or b"")


def read_pdu(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes] | None:
    """The next PDU (type, body) from ``sock``; None when the connection ended first."""
    sock.settimeout(timeout)
    header = _read_exactly(sock, 6)
    if header is None:
        return None
    pdu_type, _, length = struct.unpack(">BBL", header)
    body = _read_exactly(sock, length)
    return None if body is None else (pdu_type, body)


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    try:
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
    except (ConnectionError, TimeoutError, OSError):
        return None
    return data


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """The peer closed (or reset) ``sock`` within ``seconds``; anything it sent first is skipped."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:  # reset
            return True
    return False


def associate(
    port: int, contexts: Sequence[tuple[str, Sequence[str]]] | None = None, **kw: Any
) -> socket.socket:
    """A raw connection with an established association (asserts the A-ASSOCIATE-AC)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(associate_rq(contexts, **kw) if contexts is not None else associate_rq(**kw))
    answer = read_pdu(sock)
    assert answer is not None and answer[0] == A_ASSOCIATE_AC, f"association not accepted: {answer!r}"
    return sock


def served_within(
    port: int, seconds: float = 10.0, *, called: str = "INTU_SCP", tls: Sequence[str] = ()
) -> bool:
    """A legitimate DCMTK echoscu gets its C-ECHO answered within ``seconds``."""
    exe = require_tool("echoscu")
    timeout = str(max(1, int(seconds)))
    args = [exe, "-aec", called, "-to", timeout, "-ta", timeout, "-td", timeout, *tls, "127.0.0.1", str(port)]
    try:
        done = subprocess.run(args, env=INTEROP_ENV, capture_output=True, timeout=seconds + 5)
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


class StallingProxy:
    """A PACS that stops reading: a TCP proxy to ``port`` that forwards the sender's bytes until
    ``stall_after`` of them went through, then never reads from the sender again (its socket stays
    open, so the sender's writes block once the buffers are full). Answers still flow back."""

    def __init__(self, port: int, stall_after: int) -> None:
        self.target = port
        self.stall_after = stall_after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.stalled = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        server = socket.create_connection(("127.0.0.1", self.target))
        self._socks += [client, server]
        threading.Thread(target=self._back, args=(server, client), daemon=True).start()
        forwarded = 0
        try:
            while forwarded < self.stall_after:
                data = client.recv(4096)
                if not data:
                    return
                server.sendall(data)
                forwarded += len(data)
        except OSError:
            return
        self.stalled.set()

    @staticmethod
    def _back(server: socket.socket, client: socket.socket) -> None:
        try:
            while data := server.recv(65536):
                client.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        """Shut down and close every socket (shutdown wakes the peers' blocked reads: the in-process
        SCP behind the proxy has no socket timeout)."""
        for s in [self.listener, *self._socks]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
