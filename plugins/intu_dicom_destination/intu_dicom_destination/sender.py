"""C-STORE to one DICOM peer through a small pool of reusable associations.

``DicomSender`` owns one pynetdicom ``AE`` and up to ``max_associations`` associations. Each
``send_file`` checks an association out of the pool, sends one instance by file path and checks
it back in; idle associations are released after ``idle_timeout_ms`` by a reaper thread that
sleeps until the next expiry (pynetdicom's reactors poll every 1 ms per open association, so an
idle pooled association is not free). An association that died while idle, or during a send, is
replaced and the instance retried once on a fresh one before a result is reported. While the
pool owns an association its pynetdicom reactor thread is parked and its socket polled fast
only while a send is in flight (``tuning.py``: ~1.5x throughput, and no lost C-STORE responses).

Presentation contexts: for every (SOP class, transfer syntax) seen, we propose the instance's
own transfer syntax and the uncompressed ones as separate contexts, so that the SCP can accept
the compressed bytes as they are *and* tell us whether it would take uncompressed data; new
associations also propose the pairs seen recently (at most 128 contexts, PS3.8 / pynetdicom's
limit). When the SCP accepts only uncompressed data for a compressed instance, we decompress to
Explicit VR Little Endian (transcode) rather than fail.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification as VerificationSOPClass

from intu_core.message import SendResult
from intu_dicom_destination import statuses, tuning
from intu_dicom_destination.settings import DestinationSettings
from intu_dicom_destination.tls import describe_tls_error

# Process-wide on purpose (pynetdicom offers no per-association switch): with a file path, the
# dataset is streamed from the file in PDU-sized chunks without being decoded and re-encoded,
# ~3x less CPU per instance (PERF-NOTES) and memory stays flat for a 1 GiB instance. The price:
# pynetdicom no longer converts between transfer syntaxes itself, so we pick the context.
_config.STORE_SEND_CHUNKED_DATASET = True

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128
# Keep at most this many (SOP class, transfer syntax) pairs to propose on new associations.
_MAX_REMEMBERED = 64

Key = tuple[str, str]  # (SOP class UID, transfer syntax UID)


# -- connect errors ----------------------------------------------------------------------------
# pynetdicom catches the OSError/SSLError of a failed connect in its DUL thread and only logs it.
# A filter on its transport logger keeps the exception per DUL thread so that the result can say
# what happened (refused, timed out, certificate expired...) instead of "association failed".
_connect_errors: dict[int, BaseException | str] = {}
_connect_errors_lock = threading.Lock()


class _ConnectErrorFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        ident = threading.get_ident()
        if record.exc_info and record.exc_info[1] is not None:
            with _connect_errors_lock:
                _connect_errors[ident] = record.exc_info[1]
            return False
        if msg.startswith("TCP Initialisation Error:"):
            with _connect_errors_lock:
                _connect_errors.setdefault(ident, msg.partition(":")[2].strip())
            return False
        return not msg.startswith("Association request failed: unable to connect")


_transport_logger = logging.getLogger("pynetdicom.transport")
if not any(isinstance(f, _ConnectErrorFilter) for f in _transport_logger.filters):
    _transport_logger.addFilter(_ConnectErrorFilter())


def _take_connect_error(assoc: Association) -> BaseException | str | None:
    ident = getattr(assoc.dul, "ident", None)
    with _connect_errors_lock:
        return _connect_errors.pop(ident, None) if ident is not None else None


def _set_nodelay(event: evt.Event) -> None:
    # pynetdicom does not set TCP_NODELAY. Without it a C-STORE response can wait for the
    # peer's delayed ACK (~40 ms per instance with Linux's Nagle + delayed ACK interplay).
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


NODELAY = True  # switched off only by the benchmark/measurement


# -- results -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EchoResult:
    """What a C-ECHO told us about the peer."""

    ok: bool
    detail: str
    round_trip_ms: float | None = None
    association_ms: float | None = None
    status: int | None = None
    our_ae_title: str = ""
    their_ae_title: str = ""
    peer_max_pdu: int | None = None
    our_max_pdu: int | None = None
    implementation_class_uid: str = ""
    implementation_version_name: str = ""
    tls: bool = False


@dataclass
class _Pooled:
    assoc: Association
    number: int
    proposed: frozenset[Key]
    accepted: frozenset[Key]
    sends: int = 0
    last_used: float = field(default_factory=time.monotonic)
    deep_idle: bool = False  # its DUL polls slowly (tuning.DEEP_IDLE_AFTER)


class _OpenFailed(Exception):
    def __init__(self, result: SendResult) -> None:
        self.result = result


class _WriteFailed(Exception):
    """The decompressed copy could not be written to the work folder (e.g. a full disk)."""


class DicomSender:
    """Sends instances (Part-10 files) to one peer. Thread-safe; ``close()`` releases all."""

    def __init__(
        self,
        settings: DestinationSettings,
        logger: logging.Logger | None = None,
        *,
        work_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        self.logger = logger or logging.getLogger("intu.dicom.sender")
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.gettempdir())
        self._ssl: ssl.SSLContext | None = None
        if settings.tls.enabled:
            from intu_dicom_destination.tls import TlsConfigError, client_context

            try:
                self._ssl = client_context(settings.tls)
            except TlsConfigError as exc:
                # Refuse to exist rather than dead-letter every message: a file that cannot be
                # used now will not become usable by retrying (``intu serve`` refuses to start).
                raise TlsConfigError(f"TLS settings of {settings.address}: {exc}") from None
        tuning.quiet_pynetdicom()
        self.ae = AE(ae_title=settings.ae_title)
        timeout = settings.timeout_ms / 1000
        self.ae.acse_timeout = timeout
        self.ae.dimse_timeout = timeout
        self.ae.network_timeout = timeout
        self.ae.connection_timeout = timeout
        self.ae.maximum_pdu_size = settings.max_pdu_length
        self._cond = threading.Condition()
        self._idle: list[_Pooled] = []
        self._count = 0  # open or opening associations (idle + busy)
        self._closed = False
        self._known: OrderedDict[Key, None] = OrderedDict()
        self._numbers = itertools.count(1)
        self.associations_opened = 0
        self._reaper: threading.Thread | None = None

    # -- public ----------------------------------------------------------------------------
    def send_file(
        self,
        path: Path | str,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
        transfer_syntax_uid: str | None = None,
    ) -> SendResult:
        """C-STORE the Part-10 file at ``path``; returns what happened (never raises for a
        network or peer problem). UIDs are read from the file meta when not given."""
        path = Path(path)
        if not (sop_class_uid and sop_instance_uid and transfer_syntax_uid):
            try:
                meta = read_file_meta_info(path)
                sop_class_uid = str(meta.MediaStorageSOPClassUID)
                sop_instance_uid = str(meta.MediaStorageSOPInstanceUID)
                transfer_syntax_uid = str(meta.TransferSyntaxUID)
            except (OSError, InvalidDicomError, AttributeError, ValueError, EOFError) as exc:
                return SendResult.permanent(f"{path}: not a DICOM Part-10 file with file meta ({exc})")
        key: Key = (str(sop_class_uid), str(transfer_syntax_uid))
        data: dict[str, Any] = {"sop_instance_uid": sop_instance_uid, "sop_class_uid": sop_class_uid}
        for attempt in (1, 2):
            try:
                pooled = self._checkout(key)
            except _OpenFailed as failed:
                return failed.result
            except Exception as exc:  # noqa: BLE001 - a bug must cost one attempt, not the queue
                return self._unexpected(exc, "opening an association for", sop_instance_uid, data)
            try:
                result, keep = self._store(pooled, path, key, data)
            except BaseException as exc:
                # Whatever went wrong, the pool slot must be given back: a slot lost per such
                # error and, after max_associations of them, every send waits for ever.
                self._discard(pooled)
                if not isinstance(exc, Exception):
                    raise  # KeyboardInterrupt, SystemExit...
                return self._unexpected(exc, "sending", sop_instance_uid, data)
            if keep:
                self._checkin(pooled)
            else:
                self._discard(pooled)
            if result is not None:
                return result
            # The association died under us: once more, on a fresh one.
            self.logger.info(
                "association #%d to %s died during a send; retrying on a new one (attempt %d)",
                pooled.number,
                self.settings.address,
                attempt + 1,
            )
        return SendResult.retryable(
            f"association to {self.settings.address} was aborted twice while sending "
            f"{sop_instance_uid}; will retry later",
            data=data,
        )

    def _unexpected(
        self, exc: Exception, doing: str, sop_instance_uid: str | None, data: dict[str, Any]
    ) -> SendResult:
        self.logger.error(
            "unexpected error while %s %s to %s", doing, sop_instance_uid, self.settings.address, exc_info=exc
        )
        return SendResult.retryable(
            f"unexpected error while {doing} {sop_instance_uid} to {self.settings.address}: "
            f"{type(exc).__name__}: {exc}",
            data=data,
        )

    def echo(self) -> EchoResult:
        """C-ECHO on a separate association: round trip and what the peer negotiated."""
        t0 = time.perf_counter()
        assoc = self._associate([build_context(VerificationSOPClass)])
        t1 = time.perf_counter()
        if not assoc.is_established:
            result = self._open_failure(assoc)
            return EchoResult(False, result.detail, our_ae_title=self.settings.ae_title)
        try:
            status = assoc.send_c_echo()
            t2 = time.perf_counter()
            code = int(status.Status) if "Status" in status else None
            acceptor = assoc.acceptor
            ok = code == 0
            detail = (
                "C-ECHO succeeded"
                if ok
                else (
                    f"C-ECHO answered {statuses.describe(code)}" if code is not None else "no C-ECHO response"
                )
            )
            return EchoResult(
                ok,
                detail,
                round_trip_ms=(t2 - t1) * 1000,
                association_ms=(t1 - t0) * 1000,
                status=code,
                our_ae_title=self.settings.ae_title,
                their_ae_title=str(acceptor.ae_title or self.settings.called_ae_title),
                peer_max_pdu=acceptor.maximum_length,
                our_max_pdu=self.settings.max_pdu_length,
                implementation_class_uid=str(acceptor.implementation_class_uid or ""),
                implementation_version_name=str(acceptor.implementation_version_name or ""),
                tls=self._ssl is not None,
            )
        finally:
            if assoc.is_established:
                assoc.release()

    @property
    def open_associations(self) -> int:
        with self._cond:
            return self._count

    def close(self) -> None:
        """Release every pooled association and stop the reaper. Idempotent."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for pooled in idle:
            self._release(pooled)
        if self._reaper is not None and self._reaper is not threading.current_thread():
            self._reaper.join(timeout=5)

    # -- the pool --------------------------------------------------------------------------
    def _checkout(self, key: Key) -> _Pooled:
        to_release: list[_Pooled] = []
        # Wait at most timeout_ms for a free slot: all associations busy for that long (e.g.
        # more queue workers than max_associations, sending large instances) means "later".
        deadline = time.monotonic() + self.settings.timeout_ms / 1000
        try:
            with self._cond:
                self._known[key] = None
                self._known.move_to_end(key, last=False)
                while len(self._known) > _MAX_REMEMBERED:
                    self._known.popitem(last=True)
                while True:
                    if self._closed:
                        raise _OpenFailed(SendResult.retryable("destination is shutting down"))
                    now = time.monotonic()
                    for pooled in list(self._idle):
                        if not tuning.healthy(pooled.assoc) or self._expired(pooled, now):
                            self._idle.remove(pooled)
                            self._count -= 1
                            to_release.append(pooled)
                    for pooled in reversed(self._idle):  # most recently used first
                        if key in pooled.proposed:
                            self._idle.remove(pooled)
                            tuning.busy(pooled.assoc)
                            return pooled
                    if self._count < self.settings.max_associations:
                        self._count += 1
                        break
                    if self._idle:
                        # Every free association lacks this SOP class / transfer syntax:
                        # replace the least recently used one by one that proposes it.
                        to_release.append(self._idle.pop(0))
                        break  # count stays: the new one takes the old one's place
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise _OpenFailed(
                            SendResult.retryable(
                                f"no association to {self.settings.address} available within "
                                f"{self.settings.timeout_ms} ms (all {self.settings.max_associations} "
                                "busy); will retry later"
                            )
                        )
                    self._cond.wait(timeout=remaining)
                proposals = list(self._known)
        finally:
            for pooled in to_release:
                self._release(pooled)
        try:
            return self._open(key, proposals)
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _expired(self, pooled: _Pooled, now: float) -> bool:
        return now - pooled.last_used >= self.settings.idle_timeout_ms / 1000

    def _checkin(self, pooled: _Pooled) -> None:
        pooled.last_used = time.monotonic()
        pooled.deep_idle = False
        tuning.idle(pooled.assoc)
        release = False
        with self._cond:
            if self._closed or self.settings.idle_timeout_ms == 0 or not pooled.assoc.is_established:
                self._count -= 1
                release = True
            else:
                self._idle.append(pooled)
                self._ensure_reaper()
            self._cond.notify_all()
        if release:
            self._release(pooled)

    def _discard(self, pooled: _Pooled) -> None:
        with self._cond:
            self._count -= 1
            self._cond.notify_all()
        try:
            tuning.unpark(pooled.assoc)
            if pooled.assoc.is_established:
                pooled.assoc.abort()
        except Exception:  # noqa: BLE001 - the slot is free already; the caller has its result
            self.logger.warning(
                "cannot abort association #%d to %s", pooled.number, self.settings.address, exc_info=True
            )

    def _release(self, pooled: _Pooled) -> None:
        """Release an association that is no longer counted in the pool; never raises (it is
        called with other associations' slots at stake)."""
        assoc = pooled.assoc
        try:
            was_healthy = tuning.healthy(assoc)
            tuning.unpark(assoc)
            if not was_healthy and assoc.is_alive():
                # The (parked) reactor now handles what the peer sent while we were idle: it
                # answers a release request or notices the abort, and ends.
                assoc.join(1.0)
            if assoc.is_established:
                try:
                    assoc.release()
                except Exception:  # noqa: BLE001 - a dying peer must not break the caller
                    assoc.abort()
                self.logger.debug("released association #%d to %s", pooled.number, self.settings.address)
        except Exception:  # noqa: BLE001
            self.logger.warning(
                "cannot release association #%d to %s", pooled.number, self.settings.address, exc_info=True
            )

    def _ensure_reaper(self) -> None:
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(
                target=self._reap, name=f"intu-dicom-idle-{self.settings.called_ae_title}", daemon=True
            )
            self._reaper.start()

    def _reap(self) -> None:
        # Sleeps until the oldest idle association expires (no polling while nothing is idle),
        # or until one has been idle long enough to poll its socket less often.
        while True:
            expired: list[_Pooled] = []
            with self._cond:
                if self._closed:
                    return
                if not self._idle:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                idle_s = self.settings.idle_timeout_ms / 1000
                for pooled in list(self._idle):
                    if now - pooled.last_used >= idle_s or not tuning.healthy(pooled.assoc):
                        self._idle.remove(pooled)
                        self._count -= 1
                        expired.append(pooled)
                if not expired:
                    wake = min(p.last_used for p in self._idle) + idle_s
                    for pooled in self._idle:
                        if pooled.deep_idle:
                            continue
                        if now - pooled.last_used >= tuning.DEEP_IDLE_AFTER:
                            tuning.idle(pooled.assoc, deep=True)
                            pooled.deep_idle = True
                        else:
                            wake = min(wake, pooled.last_used + tuning.DEEP_IDLE_AFTER)
                    self._cond.wait(timeout=max(0.01, wake - now))
                    continue
                self._cond.notify_all()
            for pooled in expired:
                self._release(pooled)

    # -- associations ----------------------------------------------------------------------
    def _contexts_for(self, first: Key, known: list[Key]) -> tuple[list[Any], frozenset[Key]]:
        wanted: list[tuple[str, tuple[str, ...]]] = []
        proposed: set[Key] = set()
        for sop, ts in [first, *[k for k in known if k != first]]:
            options: list[tuple[str, ...]] = [(ts,)]
            if ts not in UNCOMPRESSED:
                options.append(UNCOMPRESSED)
            else:
                options.append(tuple(u for u in UNCOMPRESSED if u != ts))
            new = [(sop, o) for o in options if (sop, o) not in wanted]
            if len(wanted) + len(new) > MAX_CONTEXTS:
                break
            wanted.extend(new)
            proposed.add((sop, ts))
        return [build_context(sop, list(tss)) for sop, tss in wanted], frozenset(proposed)

    def _associate(self, contexts: list[Any]) -> Association:
        handlers = [(evt.EVT_CONN_OPEN, _set_nodelay)] if NODELAY else []
        kwargs: dict[str, Any] = {}
        if self._ssl is not None:
            kwargs["tls_args"] = (self._ssl, self.settings.host)
        return self.ae.associate(
            self.settings.host,
            self.settings.port,
            contexts=contexts,
            ae_title=self.settings.called_ae_title,
            max_pdu=self.settings.max_pdu_length,
            evt_handlers=handlers,
            **kwargs,
        )

    def _open(self, key: Key, known: list[Key]) -> _Pooled:
        contexts, proposed = self._contexts_for(key, known)
        assoc = self._associate(contexts)
        if not assoc.is_established:
            raise _OpenFailed(self._open_failure(assoc))
        self.associations_opened += 1
        try:
            # Park the reactor for as long as the pool owns the association; poll fast while busy.
            tuning.park(assoc)
            tuning.busy(assoc)
            tuning.bound_send_queue(assoc)
        except BaseException:
            tuning.unpark(assoc)
            assoc.abort()
            raise
        accepted = frozenset(
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
        )
        pooled = _Pooled(assoc, next(self._numbers), proposed, accepted)
        self.logger.debug(
            "association #%d to %s %s -> %s: %d of %d contexts accepted",
            pooled.number,
            self.settings.address,
            self.settings.ae_title,
            self.settings.called_ae_title,
            len(accepted),
            len(contexts),
        )
        return pooled

    def _who(self) -> str:
        return f"{self.settings.ae_title} -> {self.settings.called_ae_title} at {self.settings.address}"

    def _open_failure(self, assoc: Association) -> SendResult:
        error = _take_connect_error(assoc)
        if assoc.is_rejected:
            prim = assoc.acceptor.primitive
            if prim is not None:
                what = f"{prim.result_str}, source: {prim.source_str}, reason: {prim.reason_str}"
                transient = prim.result == 2
            else:
                what, transient = "no reason given", False
            detail = (
                f"association rejected ({what}): calling AE title {self.settings.ae_title!r}, called AE "
                f"title {self.settings.called_ae_title!r}, {self.settings.address}"
            )
            if transient:
                return SendResult.retryable(detail, data={"association": "rejected-transient"})
            hint = " - check that the PACS knows our AE title and the called AE title"
            return SendResult.permanent(detail + hint, data={"association": "rejected"})
        if isinstance(error, (ssl.SSLError, ssl.CertificateError)):
            retryable, text = describe_tls_error(error, self.settings.address)
            return (SendResult.retryable if retryable else SendResult.permanent)(text)
        if isinstance(error, BaseException):
            reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
            if isinstance(error, (TimeoutError, socket.timeout)):
                reason = f"timed out after {self.settings.timeout_ms} ms"
            if isinstance(error, (ConnectionResetError, EOFError)) and self._ssl:
                retryable, text = describe_tls_error(error, self.settings.address)
                return (SendResult.retryable if retryable else SendResult.permanent)(text)
            return SendResult.retryable(f"cannot connect to {self.settings.address}: {reason}")
        if isinstance(error, str):
            return SendResult.retryable(f"cannot connect to {self.settings.address}: {error}")
        if assoc.is_aborted:
            return SendResult.retryable(
                f"association {self._who()} was aborted by the peer during negotiation"
                + (" (TLS handshake problem?)" if self._ssl else "")
            )
        return SendResult.retryable(
            f"no association with {self._who()}: no answer to the association request "
            f"within {self.settings.timeout_ms} ms or the connection was closed"
        )

    # -- C-STORE ---------------------------------------------------------------------------
    def _choose(self, pooled: _Pooled, key: Key) -> str | None:
        sop, ts = key
        if key in pooled.accepted:
            return ts
        for plain in UNCOMPRESSED:
            if (sop, plain) in pooled.accepted:
                return plain
        return None

    def _store(
        self, pooled: _Pooled, path: Path, key: Key, data: dict[str, Any]
    ) -> tuple[SendResult | None, bool]:
        """(result or None when the association died, keep the association)."""
        sop, ts = key
        target = self._choose(pooled, key)
        if target is None:
            return SendResult.permanent(
                f"{self.settings.called_ae_title} at {self.settings.address} accepted no presentation "
                f"context for SOP class {sop} ({UID(sop).name}) with {UID(ts).name} or an "
                "uncompressed transfer syntax",
                data=data,
            ), True
        send_path, temp = path, None
        info: dict[str, Any] = {
            "association": pooled.number,
            "reused": pooled.sends > 0,
            "transfer_syntax": target,
        }
        if target != ts:
            try:
                temp = self._transcode(path, target)
            except _WriteFailed as exc:  # e.g. a full disk: it may clear up
                return SendResult.retryable(
                    f"cannot write the decompressed copy of {path} in {self.work_dir}: {exc}",
                    data=data,
                ), True
            except Exception as exc:  # noqa: BLE001 - decoders raise many kinds of errors
                return SendResult.permanent(
                    f"{self.settings.called_ae_title} accepts SOP class {UID(sop).name} only as "
                    f"{UID(target).name} and decompressing {UID(ts).name} failed: {exc}",
                    data=data,
                ), True
            send_path = temp
            info["transcoded_from"] = ts
        try:
            started = time.monotonic()
            try:
                status = pooled.assoc.send_c_store(send_path)
            except RuntimeError:
                return None, False  # not established any more
            except (OSError, ValueError, AttributeError, InvalidDicomError) as exc:
                return SendResult.permanent(
                    f"cannot send {path}: {exc}", data=data
                ), pooled.assoc.is_established
            pooled.sends += 1
            if "Status" not in status:
                if time.monotonic() - started >= (self.settings.timeout_ms / 1000) * 0.95:
                    return SendResult.retryable(
                        f"no C-STORE response from {self._who()} within {self.settings.timeout_ms} ms; "
                        "association aborted",
                        data={**data, **info},
                    ), False
                return None, False
            code = int(status.Status)
            comment = str(status.get("ErrorComment", "") or "")
            result = statuses.result_for_status(
                code, comment, duplicate_is_success=self.settings.duplicate_is_success
            )
            merged = {**data, **info, **result.data}
            return SendResult(result.status, result.detail, result.code, merged), pooled.assoc.is_established
        finally:
            if temp is not None:
                try:
                    os.unlink(temp)
                except OSError:
                    pass

    def _transcode(self, path: Path, target: str) -> Path:
        """Write ``path`` in an uncompressed transfer syntax. The whole dataset is decoded in
        memory here: this is the fallback for an SCP that cannot take the compressed bytes."""
        ds = dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            # pydicom's decoders (pylibjpeg plugins, its own RLE) give the original pixel values
            # for lossless syntaxes; decompress() rewrites the pixel module and sets Explicit VR LE.
            ds.decompress()
        implicit = target == ImplicitVRLittleEndian
        ds.file_meta.TransferSyntaxUID = UID(target)
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(suffix=".dcm", prefix="transcode-", dir=self.work_dir)
        except OSError as exc:
            raise _WriteFailed(exc.strerror or str(exc)) from exc
        try:
            os.close(fd)
            ds.save_as(name, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
        except BaseException as exc:
            try:
                os.unlink(name)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise _WriteFailed(exc.strerror or str(exc)) from exc
            raise
        return Path(name)
