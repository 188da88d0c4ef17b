"""What happens on one association to the peer: opening it, C-STORE, C-ECHO, and the results.

``Exchange`` owns the pynetdicom ``AE`` of a destination. It opens associations for the pool
(parked, fast-polling, with a bounded send queue: see ``internals``), C-STOREs one instance by
file path on a checked-out association (decompressing it, or converting big endian, first when
the peer accepts only uncompressed little-endian data) and maps the response status to a
``SendResult``. A failed association request becomes a result that says what happened: refused,
timed out, rejected and why, no context accepted for the SOP class, or the TLS problem and what
to do about it.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from intu_core import SendResult
from intu_dicom_destination import internals
from intu_dicom_destination.scu import statuses
from intu_dicom_destination.scu.contexts import Key, choose_transfer_syntax, contexts_for
from intu_dicom_destination.scu.direct import Died, DirectStore, NotDirect
from intu_dicom_destination.scu.pool import BUSY_DUL_DELAY, NoAssociation, PooledAssociation
from intu_dicom_destination.scu.settings import DestinationSettings
from intu_dicom_destination.scu.transcode import TranscodeFailed, TranscodeWriteFailed, transcode_to
from intu_dicom_destination.shared.logs import quiet_pynetdicom
from intu_dicom_destination.shared.tls import TlsConfigError, client_context, describe_tls_error

internals.require_pynetdicom()
internals.enable_chunked_send()
internals.capture_connect_errors()

# P-DATA primitives waiting for the DUL thread of a pooled association (see internals).
SEND_QUEUE_ITEMS = 64
NODELAY = True  # switched off only by the benchmark/measurement


def _set_nodelay(event: evt.Event) -> None:
    # pynetdicom does not set TCP_NODELAY. Without it a C-STORE response can wait for the
    # peer's delayed ACK (~40 ms per instance with Linux's Nagle + delayed ACK interplay).
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


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
    failure: SendResult | None = None  # why no association was had (unreachable or permanent)


class Exchange:
    """Associations and DIMSE exchanges with one peer (thread-safe: no shared mutable state
    beyond pynetdicom's ``AE``, which is)."""

    def __init__(self, settings: DestinationSettings, logger: logging.Logger, work_dir: Path) -> None:
        self.settings = settings
        self.logger = logger
        self.work_dir = work_dir
        self.ssl: ssl.SSLContext | None = None
        if settings.tls.enabled:
            try:
                self.ssl = client_context(settings.tls)
            except TlsConfigError as exc:
                # Refuse to exist rather than dead-letter every message: a file that cannot be
                # used now will not become usable by retrying (``intu serve`` refuses to start).
                raise TlsConfigError(f"TLS settings of {settings.address}: {exc}") from None
        quiet_pynetdicom()
        self.ae = AE(ae_title=settings.ae_title)
        timeout = settings.timeout_ms / 1000
        self.ae.acse_timeout = timeout
        self.ae.dimse_timeout = timeout
        self.ae.network_timeout = timeout
        self.ae.connection_timeout = timeout
        self.ae.maximum_pdu_size = settings.max_pdu_length
        self.associations_opened = 0
        self._numbers = itertools.count(1)

    def who(self) -> str:
        """``OUR_AE -> THEIR_AE at host:port``, for messages."""
        return f"{self.settings.ae_title} -> {self.settings.called_ae_title} at {self.settings.address}"

    def associate(self, contexts: list[PresentationContext]) -> Association:
        """Request an association proposing ``contexts`` (established or not: check it)."""
        handlers: list[Any] = [(evt.EVT_CONN_OPEN, _set_nodelay)] if NODELAY else []
        # pynetdicom clears the socket's timeout once connected: a PACS that stops reading would
        # then block the DUL's send (and the delivery worker) for ever.
        handlers.append((evt.EVT_CONN_OPEN, self._set_socket_timeout))
        kwargs: dict[str, Any] = {}
        if self.ssl is not None:
            kwargs["tls_args"] = (self.ssl, self.settings.host)
        return self.ae.associate(
            self.settings.host,
            self.settings.port,
            contexts=contexts,
            ae_title=self.settings.called_ae_title,
            max_pdu=self.settings.max_pdu_length,
            evt_handlers=handlers,
            **kwargs,
        )

    def _set_socket_timeout(self, event: evt.Event) -> None:
        """Every read and write of the association's socket under ``timeout_ms``."""
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if sock is not None:
            sock.settimeout(self.settings.timeout_ms / 1000)

    def open(self, key: Key, known: list[Key]) -> PooledAssociation:
        """A new association for the pool; raises ``NoAssociation`` with the reason."""
        contexts, proposed = contexts_for(key, known)
        assoc = self.associate(contexts)
        if not assoc.is_established:
            raise NoAssociation(
                association_failure(assoc, self.settings, self.ssl is not None, self.who(), key)
            )
        self.associations_opened += 1
        try:
            # Park the reactor for as long as the pool owns the association.
            internals.park(assoc)
            internals.bound_send_queue(assoc, SEND_QUEUE_ITEMS)
        except BaseException:
            internals.unpark(assoc)
            assoc.abort()
            raise
        accepted = frozenset(
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
        )
        pooled = PooledAssociation(assoc, next(self._numbers), proposed, accepted)
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

    def store(
        self, pooled: PooledAssociation, path: Path, key: Key, data: dict[str, Any]
    ) -> tuple[SendResult | None, bool]:
        """C-STORE ``path`` on ``pooled``: (result, or None when the association died; whether
        to keep the association)."""
        sop, ts = key
        target = choose_transfer_syntax(pooled.accepted, key)
        if target is None:
            as_other = sorted({UID(t).name for a, t in pooled.accepted if a == sop})
            others = sorted({UID(a).name for a, _ in pooled.accepted if a != sop})
            if as_other:
                accepted = f"it accepts it only as {', '.join(as_other)}"
            else:
                accepted = "it accepted no presentation context for it" + (
                    f" (only {', '.join(others)})" if others else ""
                )
            return SendResult.permanent(
                f"{self.settings.called_ae_title} at {self.settings.address} does not store SOP class "
                f"{sop} ({UID(sop).name}) as {UID(ts).name} or uncompressed: {accepted}",
                data={**data, "association": "no-context"},
            ), True
        send_path, temp = path, None
        info: dict[str, Any] = {
            "association": pooled.number,
            "reused": pooled.sends > 0,
            "transfer_syntax": target,
        }
        if target != ts:
            try:
                temp = transcode_to(path, target, self.work_dir)
            except TranscodeWriteFailed as exc:  # e.g. a full disk: it may clear up
                return SendResult.retryable(
                    f"cannot write the converted copy of {path} in {self.work_dir}: {exc}",
                    data=data,
                ), True
            except Exception as exc:  # noqa: BLE001 - TranscodeFailed, or a file pydicom cannot read
                if not isinstance(exc, TranscodeFailed):
                    exc = TranscodeFailed(f"reading {path} failed: {type(exc).__name__}: {exc}")
                return SendResult.permanent(
                    f"{self.settings.called_ae_title} accepts SOP class {UID(sop).name} only as "
                    f"{UID(target).name}, not {UID(ts).name}; {exc}",
                    data=data,
                ), True
            send_path = temp
            info["transcoded_from"] = ts
        if temp is None:
            done = self._store_direct(pooled, path, key, data, info)
            if done is not None:
                return done
        internals.set_poll_delay(pooled.assoc, BUSY_DUL_DELAY)  # pynetdicom's send needs its DUL
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
                        f"no C-STORE response from {self.who()} within {self.settings.timeout_ms} ms; "
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

    def _store_direct(
        self, pooled: PooledAssociation, path: Path, key: Key, data: dict[str, Any], info: dict[str, Any]
    ) -> tuple[SendResult | None, bool] | None:
        """The C-STORE through ``scu.direct`` (the stored bytes as they are, in this thread); None
        when it declines (nothing sent: pynetdicom's way is used)."""
        if pooled.direct is None:
            pooled.direct = DirectStore(pooled.assoc)
        sop, ts = key
        try:
            response = pooled.direct.store(
                path, sop, str(data["sop_instance_uid"]), ts, self.settings.timeout_ms / 1000
            )
        except NotDirect:
            return None
        except Died as exc:
            if exc.timeout:
                return SendResult.retryable(
                    f"no C-STORE response from {self.who()} within {self.settings.timeout_ms} ms; "
                    "association aborted",
                    data={**data, **info},
                ), False
            self.logger.debug("association #%d to %s: %s", pooled.number, self.settings.address, exc)
            return None, False  # died under us: the sender tries once more on a fresh one
        pooled.sends += 1
        result = statuses.result_for_status(
            response.status, response.comment, duplicate_is_success=self.settings.duplicate_is_success
        )
        merged = {**data, **info, **result.data}
        return SendResult(result.status, result.detail, result.code, merged), True

    def echo(self) -> EchoResult:
        """C-ECHO on a separate association: round trip and what the peer negotiated."""
        t0 = time.perf_counter()
        assoc = self.associate([build_context(Verification)])
        t1 = time.perf_counter()
        if not assoc.is_established:
            failure = association_failure(assoc, self.settings, self.ssl is not None, self.who())
            return EchoResult(False, failure.detail, our_ae_title=self.settings.ae_title, failure=failure)
        try:
            status = assoc.send_c_echo()
            t2 = time.perf_counter()
            code = int(status.Status) if "Status" in status else None
            acceptor = assoc.acceptor
            ok = code == 0
            if ok:
                detail = "C-ECHO succeeded"
            elif code is not None:
                detail = f"C-ECHO answered {statuses.describe(code)}"
            else:
                detail = "no C-ECHO response"
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
                tls=self.ssl is not None,
            )
        finally:
            if assoc.is_established:
                assoc.release()


def association_failure(
    assoc: Association, settings: DestinationSettings, tls: bool, who: str, key: Key | None = None
) -> SendResult:
    """Why ``assoc`` was not established, as a result: rejected (and whether for now), no
    presentation context accepted (the peer does not store ``key``'s SOP class), a TLS problem and
    what to do, refused or timed out, aborted during negotiation. Every retryable one is
    ``SendResult.unreachable``: the peer, not the instance, is the problem, so the delivery
    workers mark the destination down and probe it with a C-ECHO instead of retrying each entry."""
    error = internals.take_connect_error(assoc)
    if assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
        # The peer answered A-ASSOCIATE-AC rejecting every context: pynetdicom then aborts. The
        # same proposal will be refused again: permanent, not "aborted during negotiation".
        return no_context_accepted(assoc.rejected_contexts, who, key)
    if assoc.is_rejected:
        prim = assoc.acceptor.primitive
        if prim is not None:
            what = f"{prim.result_str}, source: {prim.source_str}, reason: {prim.reason_str}"
            transient = prim.result == 2
        else:
            what, transient = "no reason given", False
        detail = (
            f"association rejected ({what}): calling AE title {settings.ae_title!r}, called AE "
            f"title {settings.called_ae_title!r}, {settings.address}"
        )
        if transient:
            return SendResult.unreachable(detail, data={"association": "rejected-transient"})
        hint = " - check that the PACS knows our AE title and the called AE title"
        return SendResult.permanent(detail + hint, data={"association": "rejected"})
    if isinstance(error, (ssl.SSLError, ssl.CertificateError)):
        retryable, text = describe_tls_error(error, settings.address)
        return (SendResult.unreachable if retryable else SendResult.permanent)(text)
    if isinstance(error, BaseException):
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        if isinstance(error, (TimeoutError, socket.timeout)):
            reason = f"timed out after {settings.timeout_ms} ms"
        if isinstance(error, (ConnectionResetError, EOFError)) and tls:
            retryable, text = describe_tls_error(error, settings.address)
            return (SendResult.unreachable if retryable else SendResult.permanent)(text)
        return SendResult.unreachable(f"cannot connect to {settings.address}: {reason}")
    if isinstance(error, str):
        return SendResult.unreachable(f"cannot connect to {settings.address}: {error}")
    if assoc.is_aborted:
        return SendResult.unreachable(
            f"association {who} was aborted by the peer during negotiation"
            + (" (TLS handshake problem?)" if tls else "")
        )
    return SendResult.unreachable(
        f"no association with {who}: no answer to the association request "
        f"within {settings.timeout_ms} ms or the connection was closed"
    )


def no_context_accepted(rejected: list[PresentationContext], who: str, key: Key | None) -> SendResult:
    """The peer accepted none of the presentation contexts proposed: a permanent failure naming
    the SOP class being sent and why the peer refused each SOP class proposed."""
    reasons: dict[str, set[str]] = {}
    for cx in rejected:
        reasons.setdefault(str(cx.abstract_syntax), set()).add(cx.status.lower())
    listed = "; ".join(f"{UID(uid).name}: {', '.join(sorted(why))}" for uid, why in sorted(reasons.items()))
    if key is None:  # C-ECHO
        what = "accept C-ECHO (Verification SOP class)"
    else:
        what = f"store SOP class {key[0]} ({UID(key[0]).name}) as {UID(key[1]).name} or uncompressed"
    return SendResult.permanent(
        f"{who} does not {what}: it accepted none of the {len(rejected)} presentation "
        f"contexts proposed ({listed}) - check the SOP classes and transfer syntaxes the PACS "
        "is configured to accept",
        data={"association": "no-context"},
    )
