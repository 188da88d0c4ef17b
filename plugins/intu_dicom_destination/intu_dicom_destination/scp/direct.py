"""The data phase of an accepted association, read and answered in the association's own thread.

pynetdicom receives a C-STORE through three threads: its DUL thread polls the socket (sleeping
1 ms when idle), decodes each PDU into primitives and queues them; the DIMSE provider rebuilds
the command as a pydicom dataset; the association's reactor polls that queue (another 1 ms
sleep) and calls the handler, whose answer goes back the same way. On the route benchmark that
machinery was most of the receiving side's CPU (issue 12's table: a bare pynetdicom SCP 2.7-3.4
ms per 512 KiB instance, a plain socket loop 1.4-1.6 ms).

Once pynetdicom has negotiated the association, ``Receiver`` takes its socket
(``internals.run_data_phase``) and does the rest in one thread, under the guard's deadlines:
PDUs are read into one buffer, command fragments are collected and decoded by hand
(``shared.dimse``), the dataset fragments of each read go to the instance's file together (one
writev; no PDU is held whole: memory stays flat whatever PDU size the peer uses), the source's
C-STORE handler runs when the last fragment is written, and the response command is encoded by
hand. Each of these system calls lets another association's thread take the GIL, so there are
few: a plain socket is read with MSG_DONTWAIT and polled only when nothing has arrived (with a
timeout set, Python polls before every read and each ``settimeout`` is one more call), and the
disk is asked to start writing the file while it arrives, so that the fsync before the answer
waits for less (``intu_core.fsutil.start_writeback``).
C-ECHO is answered here; any other request is answered "unrecognized operation" (0x0211), as
the source offers only storage and verification. The rules the guard enforced on pynetdicom's
path hold here too, with the same reasons in the log: read and write deadlines, PDU limits, the
DIMSE deadline (``Connection.in_message``, watched by the supervisor), a command in the middle
of a dataset, the instance size limit, partial files deleted.
"""

from __future__ import annotations

import errno
import io
import itertools
import os
import select
import socket
import ssl
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import NoReturn

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from intu_core.fsutil import start_writeback
from intu_dicom_destination.scp.guard import MAX_CONTROL_PDU, Connection
from intu_dicom_destination.shared import dimse

#: Status 0x0211: the source offers storage and verification only.
STATUS_UNRECOGNIZED_OPERATION = 0x0211
_BUFFER = 256 * 1024
#: How long, after answering a release, the peer has to close the connection (pynetdicom's ARTIM
#: default is 30 s; peers close at once).
RELEASE_CLOSE_S = 5.0
_VERIFICATION = "1.2.840.10008.1.1"


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHL", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    data = value.encode("ascii", "replace")
    return data + pad if len(data) % 2 else data


def part10_header(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and file meta group of a received instance's file: byte for byte what
    pynetdicom writes for a chunked C-STORE (its ``create_file_meta`` through pydicom's
    ``write_file_meta_info``; ``tests/test_scp_direct.py`` compares them). Building them as
    pydicom datasets cost ~0.25 ms per instance, a sixth of the receiving thread's time."""
    group = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\0\1"),
            _meta_element(0x0002, b"UI", _even(sop_class, b"\0")),
            _meta_element(0x0003, b"UI", _even(sop_instance, b"\0")),
            _meta_element(0x0010, b"UI", _even(transfer_syntax, b"\0")),
            _meta_element(0x0012, b"UI", _even(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
            _meta_element(0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        )
    )
    return b"\0" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<L", len(group))) + group


# Temporary file names: unique in this process by the counter, across processes by the random
# prefix; O_EXCL refuses a name taken anyway. mkstemp's random names and retries cost ~20 us more
# per instance.
_TEMP_PREFIX = uuid.uuid4().hex[:16]
_temp_names = itertools.count()
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


#: Dataset bytes after which the disk is asked to start writing the file (``start_writeback``),
#: so that its fsync before the answer waits for less: see ``intu_core.fsutil``.
_WRITEBACK_STEP = 128 * 1024


#: At most this many buffers per writev (Linux's IOV_MAX): a peer may send tiny fragments.
_IOV_MAX = 1024


def _write_all(fd: int, buffers: list[memoryview | bytes]) -> None:
    """Write ``buffers`` in order (``os.writev``, again for what a short write left)."""
    buffers = list(buffers)
    while buffers:
        n = os.writev(fd, buffers)
        done = 0  # buffers written whole (counted, then dropped at once: not one list copy each)
        while done < len(buffers) and n >= len(buffers[done]):
            n -= len(buffers[done])
            done += 1
        buffers = buffers[done:]
        if buffers and n:
            buffers[0] = memoryview(buffers[0])[n:]


def _create_temp(folder: Path) -> tuple[Path, int]:
    """A new, empty file in ``folder`` (mode 0600, as mkstemp makes it) and its descriptor."""
    while True:
        path = folder / f"{_TEMP_PREFIX}-{next(_temp_names):x}.dcm"
        try:
            return path, os.open(path, _TEMP_FLAGS, 0o600)
        except FileExistsError:
            continue


class Ending(Enum):
    """How the data phase ended."""

    RELEASED = "released"  # A-RELEASE-RQ answered
    PEER_ABORTED = "aborted by the peer"
    CLOSED = "connection closed"
    ABORTED = "aborted"  # by us: a rule broken, a deadline, an error (the reason is on the connection)


@dataclass
class StoreRequest:
    """A received C-STORE, its dataset in a Part-10 file at ``path`` (file meta as pynetdicom writes
    it), for the source's handler. ``failure``: writing the file failed (the rest was discarded).
    The handler sets ``moved`` once nothing is left at ``path`` (it moved the file into the spool),
    sparing the receiver an unlink that would fail: a directory lookup in the answer's path."""

    sop_class: str
    sop_instance: str
    context_abstract_syntax: str
    transfer_syntax: str
    path: Path
    failure: OSError | None = None
    moved: bool = False


@dataclass(frozen=True)
class Reply:
    """The handler's answer: a status and, for a failure, an Error Comment."""

    status: int
    comment: str = ""


class _Abort(Exception):
    """A rule was broken: the association is aborted with this reason."""


class _Closed(Exception):
    """The connection ended (peer closed it, a deadline shut it, a read failed)."""


@dataclass(frozen=True)
class Peer:
    """What the receiver needs to know of the negotiated association."""

    contexts: dict[int, tuple[str, str]]  # accepted context ID -> (abstract syntax, transfer syntax)
    max_pdu: int  # the peer's maximum PDU length (0: no limit)


class Receiver:
    """Reads the data phase of one association from ``sock`` and answers it (one thread)."""

    def __init__(
        self,
        sock: socket.socket,
        conn: Connection,
        peer: Peer,
        *,
        incoming_dir: Path,
        max_instance_bytes: int,
        max_pdu: int,
        read_timeout_s: float,
        write_timeout_s: float,
        idle_timeout_s: float,
        store: Callable[[StoreRequest], Reply],
        echo: Callable[[], int],
    ) -> None:
        self._sock = sock
        self._conn = conn
        self._peer = peer
        self._incoming_dir = incoming_dir
        self._max_instance = max_instance_bytes
        self._max_p_data = max_pdu or 0xFFFFFFFF
        self._read_timeout = read_timeout_s
        self._write_timeout = write_timeout_s
        self._idle_timeout = idle_timeout_s
        self._store = store
        self._echo = echo
        self._buf = bytearray(_BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._deadline = 0.0
        # The DIMSE message being received.
        self._command = bytearray()
        self._elements: dict[int, bytes] | None = None  # the decoded command, its dataset to come
        self._context_id = 0
        self._file: io.FileIO | None = None
        self._path: Path | None = None
        self._written = 0  # dataset bytes received for the file
        # Fragments received but not yet written: views of the buffer, written together (one
        # writev per read) before the buffer is read into again.
        self._pending: list[memoryview | bytes] = []
        self._unsynced = 0  # bytes written since the disk was last asked to start writing them
        self._failure: OSError | None = None
        # A plain socket is read and written with MSG_DONTWAIT, waiting in poll only when it must:
        # with a timeout set, every read is a poll then a recv, and each settimeout one more
        # system call, each of which lets another association's thread take the GIL. TLS sockets
        # keep the timeouts (their buffered records are not visible to poll).
        self._plain = not isinstance(sock, ssl.SSLSocket)
        self._poll_in = select.poll()
        self._poll_out = select.poll()

    # -- the loop ------------------------------------------------------------------------------
    def run(self, intact: bool = True) -> Ending:
        """Serve PDUs until a release, an abort or the connection's end. Not ``intact``: pynetdicom
        received part of the data phase before it was handed over (``internals.run_data_phase``),
        which only a peer that sends before our accept arrives can cause: aborted."""
        try:
            if not intact:
                raise _Abort("data sent before the A-ASSOCIATE-AC")
            if self._plain:
                self._use_plain_socket()
            while True:
                pdu_type, length = self._next_pdu()
                if pdu_type == dimse.P_DATA_TF:
                    if length > self._max_p_data:
                        raise _Abort(f"PDU of {length} bytes, over the {self._max_p_data} bytes allowed")
                    self._p_data(length)
                    continue
                if length > MAX_CONTROL_PDU:
                    raise _Abort(f"PDU of {length} bytes, over the {MAX_CONTROL_PDU} bytes allowed")
                self._take(length)
                if pdu_type == dimse.A_RELEASE_RQ:
                    self._send(dimse.release_rp())
                    self._await_close()
                    return Ending.RELEASED
                if pdu_type == dimse.A_ABORT:
                    return Ending.PEER_ABORTED
                raise _Abort(f"unexpected PDU type 0x{pdu_type:02X} during data transfer")
        except _Abort as exc:
            self._conn.send_abort(str(exc))
            return Ending.ABORTED
        except _Closed:
            return Ending.CLOSED
        except Exception as exc:  # a bug must end this association, not leave it hanging
            self._conn.send_abort(f"internal error: {type(exc).__name__}: {exc}")
            self._conn.close("internal error")
            return Ending.ABORTED
        finally:
            self._discard_file()

    def _p_data(self, length: int) -> None:
        left = length
        while left:
            if left < 6:
                raise _Abort("malformed P-DATA-TF PDU")
            item_length, context_id, control = struct.unpack(">LBB", self._take(6))
            left -= 6
            size = item_length - 2
            if item_length < 2 or size > left:
                raise _Abort("malformed P-DATA-TF PDU")
            left -= size
            if context_id not in self._peer.contexts:
                raise _Abort(f"P-DATA on presentation context {context_id}, which was not accepted")
            if control & dimse.COMMAND:
                self._command_fragment(context_id, size)
            else:
                self._dataset_fragment(context_id, size)
            if control & dimse.LAST:
                if control & dimse.COMMAND:
                    self._command_complete(context_id)
                else:
                    self._dataset_complete()

    # -- DIMSE messages ------------------------------------------------------------------------
    def _begin_message(self) -> None:
        if not self._conn.in_message:
            self._conn.message_started = self._conn.pdu_started or time.monotonic()
            self._conn.in_message = True

    def _command_fragment(self, context_id: int, size: int) -> None:
        if self._elements is not None:
            raise _Abort("a new DIMSE command started before the previous dataset ended")
        self._begin_message()
        if len(self._command) + size > MAX_CONTROL_PDU:
            raise _Abort("command set larger than 1 MiB")
        while size:
            chunk = self._take_some(size)
            self._command += chunk
            size -= len(chunk)

    def _command_complete(self, context_id: int) -> None:
        try:
            elements = dimse.parse_command(self._command)
        except dimse.MalformedCommand as exc:
            raise _Abort(str(exc)) from None
        self._command.clear()
        field = dimse.us_value(elements, dimse.COMMAND_FIELD)
        if field is None:
            raise _Abort("a command set without Command Field")
        if field & 0x8000:
            raise _Abort(f"unexpected DIMSE response 0x{field:04X} sent to the source")
        self._context_id = context_id
        if dimse.us_value(elements, dimse.DATASET_TYPE) != dimse.NO_DATASET:
            self._elements = elements
            if field == dimse.C_STORE_RQ and self._uids(elements):
                self._open_file(elements, context_id)
            return
        self._conn.in_message = False
        if field == dimse.C_CANCEL_RQ:
            return  # nothing of ours to cancel; C-CANCEL has no response
        if field == dimse.C_STORE_RQ:
            self._respond(elements, Reply(0xC000, "C-STORE request without a dataset"))
        elif field == dimse.C_ECHO_RQ:
            self._respond(elements, Reply(self._echo()))
        else:
            self._respond(elements, Reply(STATUS_UNRECOGNIZED_OPERATION))

    def _dataset_fragment(self, context_id: int, size: int) -> None:
        if self._elements is None:
            raise _Abort("a dataset fragment without a command")
        if context_id != self._context_id:
            raise _Abort("a dataset fragment on another presentation context than its command's")
        self._written += size
        if self._max_instance and self._written > self._max_instance:
            raise _Abort(f"instance larger than the {self._max_instance // (1024 * 1024)} MiB limit")
        while size:
            chunk = self._take_some(size)
            size -= len(chunk)
            if self._file is not None and self._failure is None:
                self._pending.append(chunk)

    def _dataset_complete(self) -> None:
        elements, self._elements = self._elements, None
        assert elements is not None
        self._conn.in_message = False
        field = dimse.us_value(elements, dimse.COMMAND_FIELD)
        if field != dimse.C_STORE_RQ:
            self._respond(elements, Reply(STATUS_UNRECOGNIZED_OPERATION))
            return
        self._flush()
        file, path, failure = self._file, self._path, self._failure
        self._file = self._path = self._failure = None
        self._written = 0
        if file is None or path is None:  # (the command had no UIDs: nothing was written)
            self._respond(elements, Reply(0xC000, "command has no Affected SOP Class/Instance UID"))
            return
        try:
            file.close()
        except OSError as exc:
            failure = failure or exc
        abstract, transfer = self._peer.contexts[self._context_id]
        request = StoreRequest(
            sop_class=dimse.text_value(elements, dimse.AFFECTED_SOP_CLASS),
            sop_instance=dimse.text_value(elements, dimse.AFFECTED_SOP_INSTANCE),
            context_abstract_syntax=abstract,
            transfer_syntax=transfer,
            path=path,
            failure=failure,
        )
        try:
            reply = self._store(request)
        finally:
            if not request.moved:  # else nothing is left at path to delete
                path.unlink(missing_ok=True)
            try:
                self._conn.temp_files.remove(path)
            except ValueError:
                pass
        self._respond(elements, reply)

    def _respond(self, request: dict[int, bytes], reply: Reply) -> None:
        field = dimse.us_value(request, dimse.COMMAND_FIELD) or 0
        sop_class = dimse.text_value(request, dimse.AFFECTED_SOP_CLASS)
        if field == dimse.C_ECHO_RQ and not sop_class:
            sop_class = _VERIFICATION
        command = dimse.response_command(
            field | 0x8000,
            dimse.us_value(request, dimse.MESSAGE_ID) or 0,
            reply.status,
            sop_class=sop_class,
            sop_instance=dimse.text_value(request, dimse.AFFECTED_SOP_INSTANCE),
            comment=reply.comment,
        )
        for pdu in dimse.command_pdus(self._context_id, command, self._peer.max_pdu):
            self._send(pdu)

    # -- the instance's file -------------------------------------------------------------------
    @staticmethod
    def _uids(elements: dict[int, bytes]) -> bool:
        return bool(
            dimse.text_value(elements, dimse.AFFECTED_SOP_CLASS)
            and dimse.text_value(elements, dimse.AFFECTED_SOP_INSTANCE)
        )

    def _open_file(self, elements: dict[int, bytes], context_id: int) -> None:
        self._path, fd = _create_temp(self._incoming_dir)
        self._conn.temp_files.append(self._path)  # deleted by the guard if the connection dies
        self._file = io.FileIO(fd, "wb")
        self._written = self._unsynced = 0
        head = part10_header(
            dimse.text_value(elements, dimse.AFFECTED_SOP_CLASS),
            dimse.text_value(elements, dimse.AFFECTED_SOP_INSTANCE),
            self._peer.contexts[context_id][1],
        )
        self._pending.append(head)

    def _flush(self) -> None:
        """Write the pending fragments to the file; a failed write is ``_fail``'s to handle. Every
        ``_WRITEBACK_STEP`` bytes, the disk is asked to start writing them."""
        pending, self._pending = self._pending, []
        if not pending or self._file is None or self._failure is not None:
            return
        fd = self._file.fileno()
        try:
            for start in range(0, len(pending), _IOV_MAX):
                _write_all(fd, pending[start : start + _IOV_MAX])
        except OSError as exc:
            self._fail(exc)
            return
        self._unsynced += sum(map(len, pending))
        if self._unsynced >= _WRITEBACK_STEP:
            start_writeback(fd)
            self._unsynced = 0

    def _fail(self, exc: OSError) -> None:
        """The disk refused a write: the rest of the dataset is read and dropped, the handler
        answers for it (0xA700 for a full disk), the space is given back at once."""
        self._failure = exc
        if self._file is not None:
            try:
                os.ftruncate(self._file.fileno(), 0)
            except OSError:
                pass

    def _discard_file(self) -> None:
        self._pending = []
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        if self._path is not None:
            self._path.unlink(missing_ok=True)
        self._file = self._path = None

    # -- socket --------------------------------------------------------------------------------
    def _next_pdu(self) -> tuple[int, int]:
        """The next PDU's type and length: waits up to the idle timeout for its first byte, then
        ``read_timeout_s`` for the whole PDU (its body read by the caller under that deadline)."""
        if self._start == self._end:
            self._start = self._end = 0
            self._deadline = time.monotonic() + self._idle_timeout
            self._fill(idle=True)
        self._conn.pdu_started = time.monotonic()
        self._deadline = self._conn.pdu_started + self._read_timeout
        pdu_type, _, length = struct.unpack(">BBL", self._take(6))
        return pdu_type, length

    def _take(self, n: int) -> bytes:
        """Exactly ``n`` bytes (a copy; for headers and control PDUs, at most 1 MiB)."""
        if n > len(self._buf):  # larger than the buffer: collected piece by piece
            collected = bytearray()
            while len(collected) < n:
                collected += self._take_some(n - len(collected))
            return bytes(collected)
        while self._end - self._start < n:
            if n > len(self._buf) - self._start:  # move what is left to the front
                self._flush()  # (pending fragments are views of the buffer)
                kept = self._end - self._start
                self._buf[:kept] = self._buf[self._start : self._end]
                self._start, self._end = 0, kept
            self._fill()
        data = bytes(self._view[self._start : self._start + n])
        self._start += n
        return data

    def _take_some(self, n: int) -> memoryview:
        """Up to ``n`` bytes, at least one: a view into the buffer, valid until the next read."""
        if self._start == self._end:
            self._start = self._end = 0
            self._fill()
        end = min(self._end, self._start + n)
        chunk = self._view[self._start : end]
        self._start = end
        return chunk

    def _fill(self, idle: bool = False) -> None:
        self._flush()  # the read may overwrite what pending fragments point at
        view = self._view[self._end :]
        try:
            n = self._recv_plain(view, idle) if self._plain else self._recv_tls(view, idle)
        except OSError as exc:
            self._conn.note(f"connection lost: {exc.strerror or exc}")
            raise _Closed from None
        if not n:
            self._conn.peer_closed = True
            if not idle or self._start != self._end:
                self._conn.note("connection closed in the middle of a PDU")
            raise _Closed
        self._end += n

    def _use_plain_socket(self) -> None:
        try:
            self._sock.settimeout(None)  # blocking: the reads and writes here pass MSG_DONTWAIT
            self._poll_in.register(self._sock, select.POLLIN)
            self._poll_out.register(self._sock, select.POLLOUT)
        except OSError as exc:  # (closed meanwhile: the peer aborted, the guard shut it)
            self._conn.note(f"connection lost: {exc.strerror or exc}")
            raise _Closed from None

    def _recv_plain(self, view: memoryview, idle: bool) -> int:
        while True:
            # Checked before each read, not only when one would wait: a PDU that keeps arriving
            # faster than it is written must still arrive whole within the read timeout.
            left = self._deadline - time.monotonic()
            if left <= 0:
                self._timed_out(idle)
            try:
                return self._sock.recv_into(view, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not self._poll_in.poll(left * 1000):
                    self._timed_out(idle)

    def _recv_tls(self, view: memoryview, idle: bool) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            self._timed_out(idle)
        try:
            self._sock.settimeout(left)
            return int(self._sock.recv_into(view))
        except TimeoutError:
            self._timed_out(idle)

    def _await_close(self) -> None:
        """After the A-RELEASE-RP the requestor closes the connection (PS3.8 9.2.2, state Sta13):
        wait for that, up to ``RELEASE_CLOSE_S``. Closing first raced with DCMTK's reading of the
        A-RELEASE-RP: it reported the release failed (1 association in ~100 of the corpus test)."""
        deadline = time.monotonic() + RELEASE_CLOSE_S
        try:
            while (left := deadline - time.monotonic()) > 0:
                self._sock.settimeout(left)
                if not self._sock.recv_into(self._view):
                    return
        except OSError:  # closed, reset or timed out: done either way
            return

    def _timed_out(self, idle: bool) -> NoReturn:
        if idle:
            raise _Abort(f"no PDU for {self._idle_timeout:g} s (idle_timeout_ms)")
        self._conn.note(f"no complete PDU within {self._read_timeout:g} s")
        raise _Closed

    def _send(self, data: bytes) -> None:
        try:
            if self._plain:
                self._send_plain(data)
            else:
                self._sock.settimeout(self._write_timeout)
                self._sock.sendall(data)
        except TimeoutError:
            self._conn.note(f"peer did not read for {self._write_timeout:g} s")
            self._conn.close("write timeout")
            raise _Closed from None
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EBADF, errno.ENOTCONN):
                self._conn.note(f"cannot send: {exc.strerror or exc}")
            raise _Closed from None

    def _send_plain(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = 0.0
        while view:
            try:
                view = view[self._sock.send(view, socket.MSG_DONTWAIT) :]
            except BlockingIOError:
                deadline = deadline or time.monotonic() + self._write_timeout
                left = deadline - time.monotonic()
                if left <= 0 or not self._poll_out.poll(left * 1000):
                    raise TimeoutError from None
