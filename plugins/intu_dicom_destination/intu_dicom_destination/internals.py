"""Every private piece of pynetdicom and pydicom the plugin relies on, in one place.

Each use is a small named function, so that the rest of the plugin reads as public API and an
upgrade of either library is checked here (and by ``tests/test_internals.py``, one test per use)
rather than discovered in production.

At import this module checks the installed versions against the ranges the plugin is tested
with (``SUPPORTED``, pinned in the plugin's pyproject too) and that pydicom's private names
exist. pynetdicom's private names are checked by ``require_pynetdicom()``, which the SCU and SCP
modules call when they are imported: the message body codec imports this module for its pydicom
uses and must not pull in pynetdicom (a DICOMweb plugin imports the codec without networking).

Why the pynetdicom internals (measured with 1000 x 512 KiB into DCMTK storescp over one
association on a noisy 2-core machine: plain ~250-330 img/s; parked reactor ~320-400; parked
reactor + 0.1 ms DUL poll ~500-560 img/s):

* The association's reactor thread sleeps 1 ms per loop, and ``send_c_store`` waits (0.1 ms
  steps) for it to *pause* before sending, so every C-STORE waits ~0.5-1 ms for nothing. A
  requestor that only sends needs its reactor only to notice, while idle, that the peer released
  or aborted. We **park** the reactor while the pool owns the association (a ``_ReactorGate``
  replaces ``Association._reactor_checkpoint`` and ignores the ``set()`` each ``send_*`` does at
  its end) and do those idle checks ourselves before each checkout (``healthy``). Parking also
  closes a pynetdicom race: the running reactor can take the C-STORE response off the DIMSE
  queue before ``send_c_store`` does (a 60 s "no response" stall, one in a few thousand sends).
* The DUL thread sleeps ``_run_loop_delay`` (1 ms) whenever it has nothing to do; the pool lowers
  it while an association is checked out (``set_poll_delay``) and raises it when idle.
* The DUL's send queue has no limit: reading a file is faster than a socket drains, so a 1 GiB
  instance piled up in memory (RSS 540 MiB to 1 GiB); bounded, RSS stays ~70 MiB.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Iterator, MutableMapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any, BinaryIO

import pydicom.filereader
from pydicom.dataset import Dataset, FileMetaDataset

#: (distribution, lowest supported version, first unsupported version): the ranges tested.
SUPPORTED = (("pynetdicom", (3, 0), (3, 1)), ("pydicom", (3, 0), (3, 1)))


class UnsupportedLibrary(ImportError):
    """An installed pynetdicom or pydicom that the plugin's private uses were not tested with."""


def _release(text: str) -> tuple[int, int]:
    parts = (text.split(".") + ["0"])[:2]
    return int("".join(c for c in parts[0] if c.isdigit()) or 0), int(
        "".join(c for c in parts[1] if c.isdigit()) or 0
    )


def check_versions() -> None:
    """Raise ``UnsupportedLibrary`` naming the library, the version found and the range supported."""
    for name, low, high in SUPPORTED:
        try:
            found = version(name)
        except PackageNotFoundError:
            continue  # an editable checkout without metadata: the attribute checks still run
        if not low <= _release(found) < high:
            raise UnsupportedLibrary(
                f"intu-dicom-destination supports {name} >={low[0]}.{low[1]},<{high[0]}.{high[1]} "
                f"(it uses private parts of it), found {name} {found}: install a supported version"
            )


def _missing(library: str, what: str) -> UnsupportedLibrary:
    low, high = next((low, high) for name, low, high in SUPPORTED if name == library)
    return UnsupportedLibrary(
        f"intu-dicom-destination needs {what} of {library}, which the installed {library} "
        f"{version(library)} does not have: install {library} >={low[0]}.{low[1]},<{high[0]}.{high[1]}"
    )


def _check_pydicom() -> None:
    if not callable(getattr(pydicom.filereader, "_read_file_meta_info", None)):
        raise _missing("pydicom", "pydicom.filereader._read_file_meta_info")
    if not isinstance(getattr(Dataset(), "_dict", None), dict):
        raise _missing("pydicom", "Dataset._dict")


check_versions()
_check_pydicom()


# -- pydicom ---------------------------------------------------------------------------------------


def raw_elements(ds: Dataset) -> MutableMapping[Any, Any]:
    """The dataset's own tag -> element mapping: a deferred value stays a ``RawDataElement``
    (``ds[tag]`` would read it into memory, e.g. the pixel data of a 1 GiB instance)."""
    return ds._dict


def read_file_meta_group(fp: BinaryIO) -> FileMetaDataset:
    """The file meta group read from ``fp`` (positioned at its first byte, after the preamble);
    leaves ``fp`` at the first dataset byte. The public ``read_file_meta_info`` takes a path."""
    return pydicom.filereader._read_file_meta_info(fp)


# -- pynetdicom: checks ----------------------------------------------------------------------------

_pynetdicom_checked = False


def require_pynetdicom() -> None:
    """Check, once per process, that every pynetdicom private this module uses exists."""
    global _pynetdicom_checked
    if _pynetdicom_checked:
        return
    from pynetdicom import AE, _config
    from pynetdicom.association import Association

    for switch in ("STORE_SEND_CHUNKED_DATASET",):
        if not hasattr(_config, switch):
            raise _missing("pynetdicom", f"pynetdicom._config.{switch}")
    assoc = Association(AE(), "requestor")  # not started: no thread, no socket
    needed = {
        "Association._reactor_checkpoint": getattr(assoc, "_reactor_checkpoint", None),
        "Association._sent_abort": getattr(assoc, "_sent_abort", None),
        "Association._kill": getattr(assoc, "_kill", None),
        "DULServiceProvider._run_loop_delay": getattr(assoc.dul, "_run_loop_delay", None),
        "DULServiceProvider._kill_thread": getattr(assoc.dul, "_kill_thread", None),
        "DULServiceProvider.to_provider_queue": getattr(assoc.dul, "to_provider_queue", None),
        "DULServiceProvider.to_user_queue": getattr(assoc.dul, "to_user_queue", None),
        "DIMSEServiceProvider.msg_queue": getattr(assoc.dimse, "msg_queue", None),
        # The direct C-STORE (hold_transport).
        "DULServiceProvider._is_transport_event": getattr(assoc.dul, "_is_transport_event", None),
        "DULServiceProvider._idle_timer": getattr(assoc.dul, "_idle_timer", None),
    }
    from pynetdicom.transport import RequestHandler

    # The acceptor side (DICOM source guard).
    needed["RequestHandler._create_association"] = getattr(RequestHandler, "_create_association", None)
    # The data phase in the association's thread (run_data_phase).
    needed["Association._run_reactor"] = getattr(assoc, "_run_reactor", None)
    needed["DULServiceProvider.state_machine"] = getattr(assoc.dul, "state_machine", None)
    needed["DULServiceProvider.event_queue"] = getattr(assoc.dul, "event_queue", None)
    needed["DULServiceProvider._recv_pdu"] = getattr(assoc.dul, "_recv_pdu", None)
    needed["ApplicationEntity._servers"] = getattr(AE(), "_servers", None)
    needed["DIMSEServiceProvider.message"] = "message" in vars(assoc.dimse) or None
    for what, value in needed.items():
        if value is None:
            raise _missing("pynetdicom", what)
    if not isinstance(assoc._reactor_checkpoint, threading.Event):
        raise _missing("pynetdicom", "Association._reactor_checkpoint as a threading.Event")
    if not hasattr(threading.Event()._cond, "_waiters"):  # type: ignore[attr-defined]
        # How a parked reactor is seen (``_ReactorGate.parked``).
        raise UnsupportedLibrary("this Python's threading.Condition has no _waiters: unsupported")
    _pynetdicom_checked = True


# -- pynetdicom: process-wide switches -------------------------------------------------------------


def enable_chunked_send() -> None:
    """C-STORE from a file path streams the dataset in PDU-sized chunks, not decoded and re-encoded.

    Process-wide (pynetdicom has no per-association switch): ~3x less CPU per instance and memory
    stays flat for a 1 GiB instance. The price: pynetdicom no longer converts between transfer
    syntaxes itself, so the SCU picks the presentation context."""
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True


# -- pynetdicom: connect errors from its log text --------------------------------------------------
# pynetdicom catches the OSError/SSLError of a failed connect in its DUL thread and only logs it.
# A filter on its transport logger keeps the exception per DUL thread so that a result can say
# what happened (refused, timed out, certificate expired...) instead of "association failed".
_connect_errors: dict[int, BaseException | str] = {}
_connect_errors_lock = threading.Lock()
TCP_ERROR_PREFIX = "TCP Initialisation Error:"
CONNECT_FAILED_PREFIX = "Association request failed: unable to connect"


class _ConnectErrorFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        """Keep a connect failure for ``take_connect_error``; drop the log lines it replaces."""
        msg = record.getMessage()
        ident = threading.get_ident()
        if record.exc_info and record.exc_info[1] is not None:
            with _connect_errors_lock:
                _connect_errors[ident] = record.exc_info[1]
            return False
        if msg.startswith(TCP_ERROR_PREFIX):
            with _connect_errors_lock:
                _connect_errors.setdefault(ident, msg.partition(":")[2].strip())
            return False
        return not msg.startswith(CONNECT_FAILED_PREFIX)


def capture_connect_errors() -> None:
    """Install the filter on pynetdicom's transport logger (idempotent)."""
    logger = logging.getLogger("pynetdicom.transport")
    if not any(isinstance(f, _ConnectErrorFilter) for f in logger.filters):
        logger.addFilter(_ConnectErrorFilter())


def take_connect_error(assoc: Any) -> BaseException | str | None:
    """The exception (or logged text) of the failed connect of ``assoc``'s DUL thread, if any."""
    ident = getattr(assoc.dul, "ident", None)
    with _connect_errors_lock:
        return _connect_errors.pop(ident, None) if ident is not None else None


# -- pynetdicom: the reactor of a requestor association --------------------------------------------
_PARK_TIMEOUT = 0.5


class _ReactorGate(threading.Event):
    """``Association._reactor_checkpoint`` that stays cleared while ``held``.

    pynetdicom's ``send_*`` methods clear the checkpoint, wait for the reactor to pause, and set
    it again at the end; held, the ``set()`` is ignored, so the reactor stays parked in its
    ``wait()`` between sends. Abort and kill paths are honoured (the reactor must be able to
    exit)."""

    def __init__(self, assoc: Any) -> None:
        super().__init__()
        self._assoc = assoc
        self.held = True

    def set(self) -> None:
        """Open the gate unless it is held by a live association."""
        a = self._assoc
        if (
            not self.held
            or getattr(a, "_sent_abort", False)
            or getattr(a, "_kill", False)
            or getattr(a, "is_released", False)
            or getattr(a, "is_aborted", False)
        ):
            super().set()

    def parked(self) -> bool:
        """The reactor thread is blocked in our ``wait()``."""
        cond = getattr(self, "_cond", None)
        return bool(getattr(cond, "_waiters", None))

    def unhold(self) -> None:
        """Let the reactor run again, for good."""
        self.held = False
        super().set()


def park(assoc: Any) -> bool:
    """Park the reactor of an established requestor association until ``unpark``.

    Returns False (and leaves the reactor running) when it cannot be confirmed parked."""
    if not getattr(assoc, "is_established", False) or isinstance(assoc._reactor_checkpoint, _ReactorGate):
        return isinstance(getattr(assoc, "_reactor_checkpoint", None), _ReactorGate)
    gate = _ReactorGate(assoc)
    old = assoc._reactor_checkpoint
    assoc._reactor_checkpoint = gate
    old.set()  # a reactor paused on the old event goes round once and waits on the gate
    deadline = time.monotonic() + _PARK_TIMEOUT
    while not gate.parked():
        if time.monotonic() > deadline or not assoc.is_alive():
            gate.unhold()
            return False
        time.sleep(0.00005)
    return True


def unpark(assoc: Any) -> None:
    """Let the reactor run again (before release/abort, or to let it handle a peer's PDU)."""
    gate = getattr(assoc, "_reactor_checkpoint", None)
    if isinstance(gate, _ReactorGate):
        gate.unhold()


def is_parked(assoc: Any) -> bool:
    """``assoc``'s reactor is held by ``park``."""
    gate = getattr(assoc, "_reactor_checkpoint", None)
    return isinstance(gate, _ReactorGate) and gate.held


def pause_reactor(assoc: Any, timeout: float = 1.0) -> None:
    """Block the reactor of a requestor association on its checkpoint before a pynetdicom
    ``send_*``, closing the race of its own pause: ``send_c_store`` clears the checkpoint and
    waits for ``_is_paused``, which the reactor sets *before* its ``wait()``, so a reactor just
    past the wait is taken for paused and can take a fast C-STORE response off the DIMSE queue
    ("Received unexpected C-STORE service message", then a DIMSE timeout). Here the reactor must
    be seen waiting on the checkpoint's condition. For test SCUs (``tests/conftest.py``); intu's
    own SCU parks its reactor (``park``)."""
    checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    deadline = time.monotonic() + timeout
    while (
        not getattr(checkpoint._cond, "_waiters", None) and assoc.is_alive() and time.monotonic() < deadline
    ):
        time.sleep(0.0001)


def healthy(assoc: Any) -> bool:
    """What the parked reactor would have noticed while the association sat idle: the DUL
    thread ended (connection closed), an abort, or a release request from the peer. Anything
    on the DUL's to-user queue of an idle C-STORE SCU association is one of those."""
    if not assoc.is_established:
        return False
    dul = assoc.dul
    if not dul.is_alive():
        return False
    try:
        if dul.to_user_queue.qsize():
            return False
        if assoc.dimse.msg_queue.qsize():  # a stray message (or an abort's (None, None))
            return False
    except AttributeError:
        return True
    return True


# -- pynetdicom: the DUL thread --------------------------------------------------------------------


def _transport_lock(dul: Any) -> threading.Lock:
    """The lock that keeps ``dul``'s thread from reading the socket while someone holds it: its
    "is there an incoming PDU" step (``_is_transport_event``) is skipped while the lock is taken,
    or while reads are held (``hold_reads``)."""
    lock = getattr(dul, "_intu_transport_lock", None)
    if lock is None:
        lock = threading.Lock()
        check = dul._is_transport_event

        def gated() -> bool:
            if getattr(dul, "_intu_reads_held", False) or not lock.acquire(blocking=False):
                return False
            try:
                return bool(check())
            finally:
                lock.release()

        dul._intu_transport_lock = lock
        dul._is_transport_event = gated
    return lock


def hold_reads(assoc: Any) -> None:
    """From now on the DUL thread of ``assoc`` reads nothing more from its socket (it still writes
    what pynetdicom queues, e.g. the A-ASSOCIATE-AC). Called by an EVT_REQUESTED handler, before
    negotiation, for ``run_data_phase``: a peer's first P-DATA, sent the moment our accept
    arrives, then waits in the socket for ``serve`` instead of racing into pynetdicom's DIMSE
    provider. ``release_reads`` undoes it (a rejected association: the DUL must see the close)."""
    _transport_lock(assoc.dul)
    assoc.dul._intu_reads_held = True


def release_reads(assoc: Any) -> None:
    """Let the DUL thread of ``assoc`` read its socket again (see ``hold_reads``)."""
    assoc.dul._intu_reads_held = False


@contextlib.contextmanager
def hold_transport(assoc: Any) -> Iterator[socket.socket]:
    """The socket of an established association, with its DUL thread kept off it meanwhile: the
    DUL's "is there an incoming PDU" step (``_is_transport_event``) is skipped while held, so
    that the caller reads and writes PDUs itself (``scu.direct``). On exit the socket's timeout
    is put back and the DUL's idle timer restarted (the exchange was activity)."""
    dul = assoc.dul
    lock = _transport_lock(dul)
    sock = dul.socket.socket if dul.socket is not None else None
    if sock is None:
        raise ConnectionError("the association has no socket")
    with lock:
        timeout = sock.gettimeout()
        try:
            yield sock
        finally:
            try:
                sock.settimeout(timeout)
            except OSError:
                pass
            dul._idle_timer.restart()


def set_poll_delay(assoc: Any, seconds: float) -> None:
    """How long the DUL thread sleeps when it has nothing to do (pynetdicom's default: 1 ms)."""
    dul = getattr(assoc, "dul", None)
    if dul is not None:
        dul._run_loop_delay = seconds


def poll_delay(assoc: Any) -> float:
    """The DUL thread's current idle sleep, in seconds."""
    return float(assoc.dul._run_loop_delay)


class _BoundedSendQueue(queue.Queue):  # type: ignore[type-arg]
    """``DULServiceProvider.to_provider_queue`` with a limit, whose ``put`` gives up when the
    DUL thread is gone (an aborted association), instead of blocking for ever."""

    def __init__(self, dul: Any, maxsize: int) -> None:
        super().__init__(maxsize)
        self._dul = dul

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Queue ``item``, waiting for room while the DUL thread lives."""
        while True:
            try:
                super().put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._dul.is_alive() or getattr(self._dul, "_kill_thread", False):
                    raise RuntimeError("the association ended while sending") from None


def bound_send_queue(assoc: Any, maxsize: int) -> None:
    """Give an established association a send queue of ``maxsize`` P-DATA primitives (keeps what
    is already queued)."""
    dul = assoc.dul
    bounded = _BoundedSendQueue(dul, maxsize)
    old = dul.to_provider_queue
    dul.to_provider_queue = bounded
    while True:  # nothing should be queued between negotiation and the first send; be safe
        try:
            bounded.queue.append(old.get_nowait())
        except queue.Empty:
            break


def end_unassociated(assoc: Any) -> None:
    """End the acceptor thread of a connection that never sent an A-ASSOCIATE-RQ.

    pynetdicom's acceptor blocks on its DUL queue for up to acse_timeout (30 s) waiting for the
    request; a None in that queue is its own "timed out" signal, which ends the thread."""
    assoc.dul.to_user_queue.put(None)


# -- pynetdicom: the acceptor side (DICOM source) --------------------------------------------------
# The source hardens pynetdicom's threaded server (limits counted in our code, a supervisor that
# enforces deadlines by closing sockets); these are the private parts it needs.


def create_acceptor(handler: Any) -> Any:
    """The acceptor ``Association`` pynetdicom's ``RequestHandler`` would start for ``handler``'s
    connection, configured (socket, contexts, event handlers) but not started."""
    return handler._create_association()


def register_server(ae: Any, server: Any) -> None:
    """Make a server built with ``AE.make_server`` known to ``ae`` as ``start_server`` does, so that
    ``server.shutdown()`` (which removes it from the AE's list) works."""
    ae._servers.append(server)


def forget_server(ae: Any, server: Any) -> None:
    """Remove a server from ``ae``'s list, as pynetdicom's ``shutdown`` does (``GuardedServer``
    has a shutdown of its own)."""
    if server in ae._servers:
        ae._servers.remove(server)


def reject_for_limit(assoc: Any) -> None:
    """Answer the A-ASSOCIATE-RQ of ``assoc`` (from an EVT_REQUESTED handler) with A-ASSOCIATE-RJ
    rejected-transient, service-provider (presentation), local-limit-exceeded: what pynetdicom's
    own limit sends. Waits, as pynetdicom's own rejection does, until the DUL has sent it (else
    the acceptor closes the socket first); pynetdicom then skips negotiation."""
    assoc.acse.send_reject(0x02, 0x03, 0x02)
    assoc.kill()


def run_data_phase(assoc: Any, serve: Any) -> None:
    """From an EVT_ACCEPTED handler: the data phase of this acceptor association runs as
    ``serve(sock, intact) -> released`` in the association's own thread, instead of pynetdicom's
    reactor and DUL threads (``scp.direct``).

    The DUL thread must not have read anything since the A-ASSOCIATE-RQ (``hold_reads``, from
    EVT_REQUESTED); it is stopped once the A-ASSOCIATE-AC is on the wire. ``intact`` is False when
    pynetdicom nevertheless received something meanwhile, or the accept was not written within
    5 s: ``serve`` must then abort. It returns True when it answered an A-RELEASE-RQ, False when
    the association was aborted or its connection ended; the association's flags and pynetdicom's
    EVT_RELEASED or EVT_ABORTED follow, as its reactor would do them. (Stopping the DUL first and
    checking after closes a race: a check between the DUL taking a P-DATA event off its queue and
    handing it to DIMSE saw nothing, and the data phase then began in the middle of a message.)"""

    def take_over() -> None:
        from pynetdicom import evt

        dul = assoc.dul
        deadline = time.monotonic() + 5
        while not _accept_sent(dul) and dul.is_alive() and time.monotonic() < deadline:
            time.sleep(0.0002)
        sent = _accept_sent(dul)
        dul.kill_dul()
        dul.join(2)
        intact = (
            sent
            and not dul.is_alive()
            and dul.event_queue.empty()
            and dul._recv_pdu.empty()
            and dul.to_user_queue.empty()
            and assoc.dimse.message is None
            and assoc.dimse.msg_queue.empty()
        )
        sock = dul.socket.socket if dul.socket is not None else None
        released = bool(serve(sock, intact)) if sock is not None else False
        assoc.is_established = False
        if released:
            assoc.is_released = True
            evt.trigger(assoc, evt.EVT_RELEASED, {})
        else:
            assoc.is_aborted = True
            evt.trigger(assoc, evt.EVT_ABORTED, {})
        assoc.kill()

    assoc._run_reactor = take_over


def _accept_sent(dul: Any) -> bool:
    """The DUL thread has written the A-ASSOCIATE-AC: state Sta6 (established), nothing queued."""
    return bool(
        dul.state_machine.current_state == "Sta6"
        and dul.to_provider_queue.empty()
        and dul.event_queue.empty()
    )


def contain_dul_errors(assoc: Any, on_error: Any) -> None:
    """An exception escaping the DUL thread of ``assoc`` (pynetdicom's state machine raises
    InvalidEventError on some peer sequences, outside its own error handling) goes to
    ``on_error(exc)`` instead of Python's thread excepthook (a traceback on stderr per bad peer).
    Must be called before the association starts."""
    dul = assoc.dul
    run = dul.run

    def contained() -> None:
        try:
            run()
        except Exception as exc:
            dul._kill_thread = True
            on_error(exc)

    dul.run = contained
