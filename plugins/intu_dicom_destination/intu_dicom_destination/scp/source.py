"""The `dicom` source: a C-STORE SCP that stores each instance durably before answering.

pynetdicom negotiates each association; its data phase is then read in the association's own
thread (``scp.direct``). Each received instance is streamed to a temporary Part-10 file, moved
(or copied, chunk by chunk) into the channel's spool folder (``Runtime.spool_dir``:
``<data_dir>/spool/<channel>``), fsynced with its directory, turned into a message body
(a ``DicomBody``: checked by ``scan_file``, its JSON model with bulk-data references built only
when a filter or transformer reads it) and handed to the engine. The engine owns the file from
then on (``Message.files``); at start it deletes files in the spool folder that no queued
message refers to. The C-STORE status tells the sender what the engine did:

=====================================  ==========================================
engine / receiver outcome              C-STORE status
=====================================  ==========================================
accepted (queued) or filtered          0x0000 success
busy (queue over its limit), disk full 0xA700 out of resources
failed (transformer raised, ...)       0x0110 processing failure + ErrorComment
unparseable dataset, corrupt deflate   0xC000 cannot understand + ErrorComment
empty dataset, compressed pixel data   0xC000 cannot understand + ErrorComment
  in an uncompressed transfer syntax
dataset UIDs missing or not the        0xA900 dataset does not match SOP class
  command's                              + ErrorComment
SOP class not the context's (an image  0x0122 SOP class not supported + ErrorComment
  on the Verification context)
deflate bomb (over max_inflate_ratio)  0xA700 out of resources + ErrorComment
unexpected error while storing         0x0110 processing failure + ErrorComment
=====================================  ==========================================

Connections are guarded (``scp.guard``): deadlines, limits, partial files, one log line per bad
connection. Any storage SOP class is accepted (retired and private ones too, ``checks.is_storage_like``)
unless ``sop_classes`` restricts the list.
"""

from __future__ import annotations

import errno
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification, register_uid, uid_to_service_class  # type: ignore[attr-defined]

from intu_core import Acceptance, AcceptanceStatus, DeliverCallback, Message, Runtime
from intu_dicom_destination import internals
from intu_dicom_destination.body import InvalidBody, ScannedInstance, scan_file
from intu_dicom_destination.scp.checks import Refusal, check_body, check_request, is_storage_like
from intu_dicom_destination.scp.direct import Ending, Peer, Receiver, Reply, StoreRequest
from intu_dicom_destination.scp.guard import Connection, Guard, GuardedServer
from intu_dicom_destination.scp.persist import InflateLimit, begin_persist
from intu_dicom_destination.scp.settings import SourceSettings
from intu_dicom_destination.shared.logs import quiet_pynetdicom
from intu_dicom_destination.shared.tls import server_context

internals.require_pynetdicom()

#: Transfer syntaxes the source accepts for every storage SOP class, in order of preference.
TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_CANNOT_UNDERSTAND = 0xC000


def _refusal(refusal: Refusal) -> Reply:
    return Reply(refusal.status, refusal.reason)


def _status(code: int, comment: str) -> Reply:
    return Reply(code, comment)


@dataclass(frozen=True)
class Origin:
    """Who sent an instance: the association's AE titles and the peer's address."""

    calling_ae_title: str
    called_ae_title: str
    address: str
    port: int

    @classmethod
    def of(cls, assoc: Any) -> Origin:
        """The origin of ``assoc``'s instances."""
        req = assoc.requestor
        return cls(str(req.ae_title), str(assoc.acceptor.ae_title), str(req.address), int(req.port))

    @property
    def who(self) -> str:
        """``AE@address:port`` as the log lines and the history name the sender."""
        return f"{self.calling_ae_title}@{self.address}:{self.port}"


def _application_entity(s: SourceSettings) -> AE:
    ae = AE(ae_title=s.ae_title)
    # Storage contexts are added per association, for what the peer proposes (``_add_storage``):
    # pynetdicom has no "any storage SOP class" and its list stops at current, standard ones.
    for uid in s.sop_classes:
        _storage_service(uid)
        ae.add_supported_context(uid, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.require_calling_aet = list(s.calling_ae_titles)
    ae.require_called_aet = s.require_called_ae_title
    # The guard counts established associations; pynetdicom's own count (its acceptor threads, a
    # port probe included) must never refuse first.
    ae.maximum_associations = s.max_connections + 1
    ae.maximum_pdu_size = s.max_pdu_length
    # Backstops only: the guard closes a connection at association_request_timeout_ms.
    ae.acse_timeout = s.association_request_timeout_ms / 1000 + 5
    ae.network_timeout = s.idle_timeout_ms / 1000
    return ae


_registered_lock = threading.Lock()


def _storage_service(uid: str) -> None:
    """Make pynetdicom hand C-STOREs of ``uid`` (retired, private, newer than pynetdicom) to its
    storage service, i.e. to our EVT_C_STORE handler (a process-wide, additive registration)."""
    with _registered_lock:
        if uid_to_service_class(uid) is not StorageServiceClass:
            register_uid(uid, "IntuStorage_" + uid.replace(".", "_"), StorageServiceClass)


def _add_storage(assoc: Any, allowed: tuple[str, ...]) -> None:
    """Support every storage-like abstract syntax the peer proposes (only ``allowed`` if set)."""
    supported = assoc.acceptor.supported_contexts
    have = {str(cx.abstract_syntax) for cx in supported}
    added: list[PresentationContext] = []
    for cx in assoc.requestor.requested_contexts:
        uid = str(cx.abstract_syntax or "")
        if uid in have or not uid or allowed or not is_storage_like(uid):
            continue
        _storage_service(uid)
        added.append(build_context(uid, list(TRANSFER_SYNTAXES)))
        have.add(uid)
    if added:
        assoc.acceptor.supported_contexts = supported + added


def _answer(acceptance: Acceptance, logger: Any, name: str, sop_instance: str, who: str) -> Reply:
    """The C-STORE status for what the engine did with the instance, logged."""
    status = acceptance.status
    if status in (AcceptanceStatus.ACCEPTED, AcceptanceStatus.FILTERED):
        logger.debug("DICOM source %s: %s from %s %s", name, sop_instance, who, status.value)
        return Reply(STATUS_SUCCESS)
    detail = acceptance.detail or status.value
    if status is AcceptanceStatus.BUSY:
        logger.warning(
            "DICOM source %s: %s from %s not accepted (busy: %s): answered 0xA700",
            name, sop_instance, who, detail,
        )  # fmt: skip
        return _status(STATUS_OUT_OF_RESOURCES, detail)
    logger.error("DICOM source %s: %s from %s failed (%s): answered 0x0110", name, sop_instance, who, detail)
    return _status(STATUS_PROCESSING_FAILURE, detail)


class DicomSource:
    """A C-STORE SCP listening on ``settings.host:settings.port`` (the `dicom` source type)."""

    def __init__(self, settings: SourceSettings, runtime: Runtime) -> None:
        self.settings = settings
        self.runtime = runtime
        self.logger = runtime.logger
        # The engine's spool folder for this channel: it deletes unreferenced files there at start.
        self.received_dir = runtime.spool_dir
        self._deliver: DeliverCallback | None = None
        self._server: Any = None
        self._accept_thread: threading.Thread | None = None
        self._guard: Guard | None = None
        # Where pynetdicom writes datasets being received: under the data folder (its disk guard),
        # outside the engine's spool folder, emptied at start.
        self.incoming_dir = runtime.data_dir / "incoming" / runtime.name
        self._lock = threading.Lock()
        self._in_flight = 0
        self._idle = threading.Condition(self._lock)
        # What only the source knows; the engine counts messages received, accepted and refused.
        metrics, channel = runtime.metrics, runtime.name
        self._bytes_received = metrics.counter(
            "intu_bytes_received_total", "Bytes of instances stored by a source", ["channel"]
        ).labels(channel)
        associations = metrics.counter(
            "intu_dicom_scp_associations_total",
            "Associations requested of a DICOM source",
            ["channel", "result"],
        )
        self._associations_accepted = associations.labels(channel, "accepted")
        metrics.gauge(
            "intu_dicom_scp_open_associations",
            "Associations a DICOM source has accepted and not yet ended",
            ["channel"],
        ).labels(channel).set_function(lambda: self._guard.admitted() if self._guard is not None else 0)
        self._associations_rejected = associations.labels(channel, "rejected")

    @property
    def port(self) -> int:
        """The port actually bound (useful when settings.port is 0 in tests)."""
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    def listening(self) -> bool:
        """Whether the listener is bound and its accept thread runs (``EngineView.ready()``)."""
        server, thread = self._server, self._accept_thread
        if server is None or thread is None:
            return False
        return thread.is_alive() and server.socket.fileno() != -1

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, deliver: DeliverCallback) -> None:
        """Listen for associations; each received instance goes to ``deliver``."""
        quiet_pynetdicom()  # pynetdicom logs 2 INFO lines per C-STORE; keep them for debug
        self._deliver = deliver
        self.received_dir.mkdir(parents=True, exist_ok=True)
        self._sweep_incoming()
        s = self.settings
        ae = _application_entity(s)
        ssl_context = None
        if s.tls.enabled:
            try:
                ssl_context = server_context(s.tls)
            except Exception as exc:  # ssl.SSLError, OSError, tls.TlsConfigError
                raise RuntimeError(f"DICOM source {self.runtime.name}: cannot set up TLS: {exc}") from exc
        guard = Guard(s, self.logger, self.runtime.name)
        # No EVT_C_STORE or EVT_C_ECHO handler: after negotiation scp.direct serves the association.
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_CONN_CLOSE, self._on_ended),
        ]
        try:
            server = ae.make_server(
                (s.host, s.port),
                ae_title=s.ae_title,
                evt_handlers=handlers,
                server_class=GuardedServer,
                guard=guard,
                tls=ssl_context,
            )
        except OSError as exc:  # port taken, address not local, no permission for a port < 1024
            raise RuntimeError(
                f"DICOM source {self.runtime.name}: cannot listen on {s.host}:{s.port}: {exc.strerror or exc}"
            ) from exc
        internals.register_server(ae, server)
        guard.start()
        self._guard = guard
        self._server = server
        self._accept_thread = threading.Thread(
            target=server.serve_forever, name=f"intu-dicom-accept-{self.runtime.name}", daemon=True
        )
        self._accept_thread.start()
        self.logger.info(
            "DICOM source %s listening on %s:%d as %s%s",
            self.runtime.name,
            s.host,
            self.port,
            s.ae_title,
            " (TLS)" if ssl_context else "",
        )

    def _sweep_incoming(self) -> None:
        """Partial receive files left by a crash: nothing refers to them, nothing was acknowledged."""
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        swept = 0
        for path in self.incoming_dir.iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)
                swept += 1
        if swept:
            self.logger.info(
                "DICOM source %s: removed %d partial transfer(s) from %s",
                self.runtime.name,
                swept,
                self.incoming_dir,
            )

    def stop(self) -> None:
        """Stop accepting, let associations finish for ``stop_grace_ms``, close everything else.

        Returns within about ``stop_grace_ms`` + 1 s whatever the peers do: a C-STORE being handled
        is answered first (its instance is then safe), stalled connections are closed."""
        server, self._server = self._server, None
        guard = self._guard
        if server is None or guard is None:
            return
        server.shutdown()  # stops accepting and closes the listening socket
        # A connection that never sent an A-ASSOCIATE-RQ (a port probe, an attacker) has nothing in
        # flight: close it now.
        for conn in guard.open_connections():
            if not conn.requested:
                conn.close("intu is stopping")
        deadline = time.monotonic() + self.settings.stop_grace_ms / 1000
        for conn in guard.open_connections():
            if conn.assoc is not None:
                conn.assoc.join(max(0.0, deadline - time.monotonic()))
        left = [c for c in guard.open_connections() if c.assoc is not None and c.assoc.is_alive()]
        if left:
            # A C-STORE being handled is answered first: its instance is then safe.
            with self._idle:
                self._idle.wait_for(
                    lambda: self._in_flight == 0, timeout=max(5.0, self.settings.stop_grace_ms / 1000)
                )
            for conn in left:
                self.logger.warning(
                    "DICOM source %s: aborting association from %s still open at shutdown",
                    self.runtime.name,
                    conn.who,
                )
                conn.close("intu is stopping")
            end = time.monotonic() + 5
            for conn in left:
                conn.assoc.join(max(0.0, end - time.monotonic()))
        guard.stop()
        self.logger.info("DICOM source %s stopped", self.runtime.name)

    # -- events ----------------------------------------------------------------------------
    def _on_requested(self, event: Any) -> None:
        """A complete A-ASSOCIATE-RQ: count it against the limits, add the storage contexts."""
        assoc = event.assoc
        guard = self._guard
        reason = guard.admit(assoc) if guard is not None else None
        if reason is not None:
            self._associations_rejected.inc()
            internals.reject_for_limit(assoc)
            req = assoc.requestor
            self.logger.warning(
                "DICOM source %s: association from %s (%s:%s) rejected: %s",
                self.runtime.name, req.ae_title, req.address, req.port, reason,
            )  # fmt: skip
            return
        _add_storage(assoc, self.settings.sop_classes)
        internals.hold_reads(assoc)  # the data phase is read by scp.direct (run_data_phase)

    def _on_ended(self, event: Any) -> None:
        internals.release_reads(event.assoc)
        if self._guard is not None:
            self._guard.release(event.assoc)

    def _on_accepted(self, event: Any) -> None:
        self._associations_accepted.inc()
        assoc = event.assoc
        conn = self._guard.connection_of(assoc) if self._guard is not None else None
        if conn is None:  # never expected: every connection is registered by the guard first
            assoc.abort()
            return
        internals.run_data_phase(assoc, lambda sock, intact: self._data_phase(assoc, conn, sock, intact))
        req = event.assoc.requestor
        self.logger.info(
            "DICOM source %s: association from %s (%s:%s) accepted",
            self.runtime.name,
            req.ae_title,
            req.address,
            req.port,
        )

    def _on_rejected(self, event: Any) -> None:
        internals.release_reads(event.assoc)  # the DUL must see the peer close the connection
        self._associations_rejected.inc()
        if self._guard is not None:
            self._guard.release(event.assoc)
        req = event.assoc.requestor
        self.logger.warning(
            "DICOM source %s: association from calling AE %r (%s:%s) to called AE %r rejected",
            self.runtime.name,
            req.ae_title,
            req.address,
            req.port,
            event.assoc.acceptor.ae_title,
        )

    def _data_phase(self, assoc: Any, conn: Connection, sock: Any, intact: bool) -> bool:
        """The association's data phase (``scp.direct``); True when it ended in a release."""
        s = self.settings
        peer = Peer(
            contexts={
                int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in assoc.accepted_contexts
            },
            max_pdu=int(assoc.requestor.maximum_length or 0),
        )
        origin = Origin.of(assoc)
        receiver = Receiver(
            sock,
            conn,
            peer,
            incoming_dir=self.incoming_dir,
            max_instance_bytes=s.max_instance_mb * 1024 * 1024,
            max_pdu=s.max_pdu_length,
            read_timeout_s=s.read_timeout_ms / 1000,
            write_timeout_s=s.write_timeout_ms / 1000,
            idle_timeout_s=s.idle_timeout_ms / 1000,
            store=lambda request: self._handle_store(request, origin),
            echo=lambda: self._answer_echo(origin),
        )
        return receiver.run(intact) is Ending.RELEASED

    def _answer_echo(self, origin: Origin) -> int:
        """The C-ECHO status."""
        return STATUS_SUCCESS

    def _handle_store(self, request: StoreRequest, origin: Origin) -> Reply:
        with self._lock:
            self._in_flight += 1
        try:
            return self._store(request, origin)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _store(self, request: StoreRequest, origin: Origin) -> Reply:
        sop_class = request.sop_class
        sop_instance = request.sop_instance
        transfer_syntax = request.transfer_syntax
        who = origin.who
        name = self.runtime.name

        refusal = check_request(sop_class, sop_instance, request.context_abstract_syntax)
        if refusal is not None:
            return self._refuse(refusal, sop_instance, who)
        failure = request.failure
        if failure is not None:  # writing the received dataset failed (a full disk)
            if failure.errno in (errno.ENOSPC, errno.EDQUOT):
                return self._refuse(Refusal(STATUS_OUT_OF_RESOURCES, "out of disk space"), sop_instance, who)
            refusal = Refusal(STATUS_PROCESSING_FAILURE, f"cannot store instance: {failure.strerror}")
            return self._refuse(refusal, sop_instance, who)
        path = self.received_dir / f"{uuid.uuid4().hex}.dcm"
        try:
            durable = self._persist(request.path, path, transfer_syntax)
            request.moved = True
            # Checked, and its message built, while the file and its folder are being fsynced (the
            # checks read the page cache).
            checked = self._check_stored(path, sop_class, sop_instance, transfer_syntax)
            message = None
            if isinstance(checked, ScannedInstance):
                message = self._message(checked, path, origin, request)
            if durable is not None:
                durable()
            # The size the scan read (fstat) rather than another stat of the file.
            size = checked.size if isinstance(checked, ScannedInstance) and checked.size >= 0 else -1
            self._bytes_received.inc(size if size >= 0 else path.stat().st_size)
        except InflateLimit as exc:
            path.unlink(missing_ok=True)
            return self._refuse(
                Refusal(STATUS_OUT_OF_RESOURCES, f"deflated dataset {exc}"), sop_instance, who
            )
        except OSError as exc:
            path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self.logger.error(
                    "DICOM source %s: no space to store %s from %s (%s): answered 0xA700",
                    name, sop_instance, who, exc,
                )  # fmt: skip
                return _status(STATUS_OUT_OF_RESOURCES, "out of disk space")
            self.logger.error(
                "DICOM source %s: cannot store %s from %s (%s): answered 0x0110",
                name, sop_instance, who, exc,
            )  # fmt: skip
            return _status(STATUS_PROCESSING_FAILURE, f"cannot store instance: {exc.strerror}")
        except (InvalidBody, zlib.error) as exc:  # corrupt deflate stream, unreadable file meta
            path.unlink(missing_ok=True)
            self.logger.error(
                "DICOM source %s: cannot parse %s from %s: %s: answered 0xC000", name, sop_instance, who, exc
            )
            return _status(STATUS_CANNOT_UNDERSTAND, "dataset cannot be parsed")
        except Exception as exc:  # anything else: never let pynetdicom answer 0xC211 for us
            path.unlink(missing_ok=True)
            self.logger.error(
                "DICOM source %s: cannot store %s from %s (unexpected %s: %s): answered 0x0110",
                name, sop_instance, who, type(exc).__name__, exc,
            )  # fmt: skip
            return _status(STATUS_PROCESSING_FAILURE, f"cannot store instance: {type(exc).__name__}")

        if isinstance(checked, InvalidBody):
            path.unlink(missing_ok=True)
            self.logger.error(
                "DICOM source %s: cannot parse %s from %s: %s: answered 0xC000",
                name,
                sop_instance,
                who,
                checked,
            )
            return _status(STATUS_CANNOT_UNDERSTAND, "dataset cannot be parsed")
        if isinstance(checked, Refusal):
            path.unlink(missing_ok=True)
            return self._refuse(checked, sop_instance, who)
        deliver = self._deliver
        assert deliver is not None and message is not None  # (checked was a ScannedInstance)
        # From here on the engine owns message.files: it deletes them when it is done.
        try:
            acceptance = deliver(message)
        except Exception as exc:  # the engine should not raise; answer truthfully if it does
            self.logger.exception(
                "DICOM source %s: engine failed on %s from %s: answered 0x0110", name, sop_instance, who
            )
            return _status(STATUS_PROCESSING_FAILURE, f"engine error: {exc}")
        return _answer(acceptance, self.logger, name, sop_instance, who)

    def _message(self, scan: ScannedInstance, path: Path, origin: Origin, request: StoreRequest) -> Message:
        """The message of a received instance stored at ``path``."""
        return Message(
            body=scan.body(),
            channel=self.runtime.name,
            metadata={
                "dicom": {
                    "calling_ae_title": origin.calling_ae_title,
                    "called_ae_title": origin.called_ae_title,
                    "peer_address": origin.address,
                    "peer_port": origin.port,
                    "transfer_syntax_uid": request.transfer_syntax,
                    "sop_class_uid": request.sop_class,
                    "sop_instance_uid": request.sop_instance,
                },
                # What the message history keeps and searches by (intu_core.history).
                "history": {"source": origin.who, **scan.history_fields()},
            },
            files=(str(path),),
        )

    def _refuse(self, refusal: Refusal, sop_instance: str, who: str) -> Reply:
        self.logger.error(
            "DICOM source %s: %s from %s refused (%s): answered 0x%04X",
            self.runtime.name, sop_instance, who, refusal.reason, refusal.status,
        )  # fmt: skip
        return _refusal(refusal)

    @staticmethod
    def _check_stored(
        path: Path, sop_class: str, sop_instance: str, transfer_syntax: str
    ) -> ScannedInstance | Refusal | InvalidBody:
        """The stored file checked as ``body_from_file`` would check it (its JSON model is built
        only if a stage reads it) and against its command: the scan, or why it is refused."""
        try:
            scan = scan_file(path)
            refusal = check_body(scan, sop_class, sop_instance, transfer_syntax)
        except InvalidBody as exc:
            return exc
        return scan if refusal is None else refusal

    def _persist(self, temp: Path, path: Path, transfer_syntax: str) -> Callable[[], None] | None:
        """The file moved to ``path``; the returned function waits until it is durable. A method:
        tests replace it to simulate a full disk."""
        s = self.settings
        return begin_persist(
            temp,
            path,
            transfer_syntax,
            max_bytes=s.max_instance_mb * 1024 * 1024,
            max_ratio=s.max_inflate_ratio,
        )
