"""One test per private pynetdicom/pydicom use in ``internals.py``: each fails when the installed
library changes under it (the attribute is gone, or no longer behaves as the plugin relies on)."""

from __future__ import annotations

import inspect
import io
import logging
import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom.filereader
import pytest
from intu_dicom_destination import internals
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, build_context
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


@pytest.fixture
def echo_scp() -> Iterator[Any]:
    """A pynetdicom C-ECHO SCP on a free loopback port."""
    ae = AE(ae_title="ECHO_SCP")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        yield server
    finally:
        server.shutdown()


def _associate(server: Any) -> Association:
    ae = AE(ae_title="TEST_SCU")
    assoc = ae.associate(
        "127.0.0.1", server.server_address[1], [build_context(Verification)], ae_title="ECHO_SCP"
    )
    assert assoc.is_established
    return assoc


def ct_instance() -> Dataset:
    """A minimal CT instance with 8 KiB of pixel data."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(64 * 64 * 2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _wait(predicate: Any, seconds: float = 5) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(predicate())


# -- versions and presence ---------------------------------------------------------------------------


def test_installed_versions_are_in_the_supported_ranges() -> None:
    internals.check_versions()
    internals.require_pynetdicom()


def test_an_unsupported_version_is_named_with_the_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(internals, "version", lambda name: "9.9.0")
    with pytest.raises(internals.UnsupportedLibrary) as raised:
        internals.check_versions()
    text = str(raised.value)
    assert "pynetdicom 9.9.0" in text and ">=3.0,<3.1" in text, text


# -- pydicom -----------------------------------------------------------------------------------------


def test_dataset_dict_keeps_deferred_values_raw(tmp_path: Path) -> None:
    path = tmp_path / "ct.dcm"
    ct_instance().save_as(path, enforce_file_format=True)
    ds = dcmread(path, defer_size=1024)
    raw = internals.raw_elements(ds)[0x7FE00010]
    assert isinstance(raw, RawDataElement) and raw.value is None  # not read into memory
    assert raw.value_tell > 0 and raw.length > 1024
    assert isinstance(Dataset()._dict, dict)


def test_read_file_meta_info_from_an_open_stream() -> None:
    assert list(inspect.signature(pydicom.filereader._read_file_meta_info).parameters) == ["fp"]
    buffer = io.BytesIO()
    ct_instance().save_as(buffer, enforce_file_format=True)
    buffer.seek(132)
    meta = internals.read_file_meta_group(buffer)
    assert meta.MediaStorageSOPClassUID
    # Left at the first dataset byte: what follows is group 0008.
    assert buffer.read(2) == b"\x08\x00"


# -- pynetdicom: switches and log text ---------------------------------------------------------------


def test_chunked_dataset_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)
    internals.enable_chunked_send()
    assert _config.STORE_SEND_CHUNKED_DATASET is True


def test_a_refused_connect_is_captured_from_pynetdicom_logging() -> None:
    internals.capture_connect_errors()
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ae = AE(ae_title="TEST_SCU")
    assoc = ae.associate("127.0.0.1", port, [build_context(Verification)])
    assert not assoc.is_established
    error = internals.take_connect_error(assoc)  # the exception, or the logged text
    assert "Connection refused" in str(error), error
    assert any(
        isinstance(f, internals._ConnectErrorFilter)
        for f in logging.getLogger("pynetdicom.transport").filters
    )


# -- pynetdicom: the reactor, the DUL, the DIMSE queue -----------------------------------------------


def test_reactor_parks_on_the_checkpoint_and_sends_still_work(echo_scp: Any) -> None:
    assoc = _associate(echo_scp)
    try:
        assert isinstance(assoc._reactor_checkpoint, threading.Event)
        assert internals.park(assoc)
        assert internals.is_parked(assoc)
        assert assoc._reactor_checkpoint.parked()  # type: ignore[attr-defined]
        assert hasattr(assoc, "_sent_abort") and hasattr(assoc, "_kill")
        for _ in range(3):  # send_* clear and set the checkpoint: the gate holds
            assert assoc.send_c_echo().Status == 0
            assert internals.is_parked(assoc)
    finally:
        internals.unpark(assoc)
        assoc.release()
    assert _wait(lambda: not assoc.is_alive())


def test_hold_transport_keeps_the_dul_off_the_socket(echo_scp: Any) -> None:
    """scu.direct's exchange: while held, a response is read here, not by the DUL thread."""
    from intu_dicom_destination.testing.attacks import c_echo_rq, read_pdu

    assoc = _associate(echo_scp)
    try:
        assert internals.park(assoc)
        context_id = assoc.accepted_contexts[0].context_id
        idle_started = assoc.dul._idle_timer._start_time
        with internals.hold_transport(assoc) as sock:
            sock.sendall(c_echo_rq(context_id, message_id=9))
            time.sleep(0.2)  # the DUL thread polls meanwhile, and must leave the response alone
            pdu = read_pdu(sock)
        assert pdu is not None and pdu[0] == 0x04  # the C-ECHO-RSP, read by us
        assert assoc.dul._idle_timer._start_time != idle_started  # restarted: that was activity
        assert assoc.dul.to_user_queue.qsize() == 0
        assert assoc.send_c_echo().Status == 0  # and pynetdicom's own exchange works after
    finally:
        internals.unpark(assoc)
        assoc.release()


def test_pause_reactor_leaves_the_reactor_waiting_on_its_checkpoint(echo_scp: Any) -> None:
    """tests/conftest.py's fix of pynetdicom's pause race: the reactor is blocked in ``wait()``
    (not merely flagged paused) before a send, and runs again after it."""
    assoc = _associate(echo_scp)
    try:
        internals.pause_reactor(assoc)
        assert assoc._reactor_checkpoint._cond._waiters  # blocked in wait(): cannot take a message
        assert assoc._is_paused
        assert assoc.send_c_echo().Status == 0  # pynetdicom's send sets the checkpoint at its end
        assert assoc._reactor_checkpoint.is_set()
    finally:
        assoc.release()


def test_healthy_sees_a_peer_abort_while_parked(echo_scp: Any) -> None:
    assoc = _associate(echo_scp)
    assert internals.park(assoc)
    assert internals.healthy(assoc)
    assert isinstance(assoc.dul.to_user_queue, queue.Queue)
    assert isinstance(assoc.dimse.msg_queue, queue.Queue)
    for peer in echo_scp.active_associations:
        peer.abort()
    assert _wait(lambda: not internals.healthy(assoc))
    internals.unpark(assoc)
    assert _wait(lambda: not assoc.is_alive())


def test_dul_poll_delay_is_read_by_the_dul_loop(echo_scp: Any) -> None:
    assoc = _associate(echo_scp)
    try:
        assert internals.poll_delay(assoc) == 0.001  # pynetdicom's default
        internals.set_poll_delay(assoc, 0.0001)
        assert assoc.dul._run_loop_delay == 0.0001
        assert "_run_loop_delay" in inspect.getsource(type(assoc.dul).run_reactor)
    finally:
        assoc.release()


def test_bounded_send_queue_replaces_the_dul_queue(echo_scp: Any) -> None:
    assoc = _associate(echo_scp)
    try:
        internals.bound_send_queue(assoc, 4)
        assert assoc.dul.to_provider_queue.maxsize == 4
        assert hasattr(assoc.dul, "_kill_thread")
        assert assoc.send_c_echo().Status == 0  # the DUL thread reads our queue
    finally:
        assoc.release()


def test_a_connection_without_association_request_is_ended(echo_scp: Any) -> None:
    # A port probe: connects and closes without an A-ASSOCIATE-RQ. Its acceptor thread would wait
    # acse_timeout (30 s) for the request; the None we queue is pynetdicom's own "timed out".
    with socket.create_connection(echo_scp.server_address):
        assert _wait(lambda: len(echo_scp.active_associations) == 1)
        (acceptor,) = echo_scp.active_associations
    assert acceptor.requestor.primitive is None
    assert _wait(lambda: acceptor.dul.state_machine.current_state == "Sta1")  # connection closed
    started = time.monotonic()
    internals.end_unassociated(acceptor)
    acceptor.join(5)
    assert not acceptor.is_alive() and time.monotonic() - started < 5


def test_threading_event_condition_has_waiters() -> None:
    event = threading.Event()
    waiter = threading.Thread(target=event.wait, daemon=True)
    waiter.start()
    assert _wait(lambda: bool(event._cond._waiters))  # type: ignore[attr-defined]
    event.set()
    waiter.join(5)


# -- the acceptor side (DICOM source) -------------------------------------------------------------


class _Probe:
    """What the acceptor-side tests saw, from a server built with ``make_server``."""

    def __init__(self) -> None:
        self.assocs: list[Any] = []


@pytest.fixture
def probe_server() -> Iterator[tuple[Any, _Probe]]:
    """An echo server whose request handler creates its association with ``create_acceptor``."""
    from pynetdicom import evt
    from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

    probe = _Probe()

    class Handler(RequestHandler):
        def handle(self) -> None:
            assoc = internals.create_acceptor(self)
            probe.assocs.append(assoc)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()

    ae = AE(ae_title="ECHO_SCP")
    ae.add_supported_context(Verification)
    server = ae.make_server(("127.0.0.1", 0), server_class=ThreadedAssociationServer, request_handler=Handler)
    internals.register_server(ae, server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server, probe
    finally:
        server.shutdown()  # works only if register_server made the AE know it
    assert server not in ae._servers


def _echo_assoc(server: Any) -> Any:
    ae = AE(ae_title="SCU")
    ae.add_requested_context(Verification)
    return ae.associate(*server.server_address, ae_title="ECHO_SCP")


def test_create_acceptor_gives_a_configured_unstarted_association(probe_server: Any) -> None:
    server, probe = probe_server
    assoc = _echo_assoc(server)
    try:
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        (acceptor,) = probe.assocs
        assert acceptor.is_acceptor and acceptor.dul.socket is not None
    finally:
        assoc.release()


def test_reject_for_limit_sends_local_limit_exceeded(probe_server: Any) -> None:
    server, probe = probe_server
    from pynetdicom import evt

    server.bind(evt.EVT_REQUESTED, lambda event: internals.reject_for_limit(event.assoc))
    assoc = _echo_assoc(server)
    assert assoc.is_rejected
    assert (assoc.acceptor.primitive.result, assoc.acceptor.primitive.result_source) == (0x02, 0x03)
    assert assoc.acceptor.primitive.diagnostic == 0x02


def test_contain_dul_errors_catches_what_escapes_the_dul_thread(probe_server: Any) -> None:
    server, probe = probe_server
    from pynetdicom import evt

    errors: list[BaseException] = []

    def arm(event: Any) -> None:
        internals.contain_dul_errors(event.assoc, errors.append)

    def boom(event: Any) -> None:
        raise KeyError("state machine")

    # Bound before the association starts (EVT_CONN_OPEN fires before assoc.start()).
    server.bind(evt.EVT_CONN_OPEN, arm)
    assoc = _echo_assoc(server)
    assert assoc.is_established
    (acceptor,) = probe.assocs
    acceptor.dul.state_machine.do_action = boom  # the next event raises out of run_reactor
    assoc.send_c_echo()
    assert _wait(lambda: bool(errors))
    assert isinstance(errors[0], KeyError) and not acceptor.dul.is_alive()
    assoc.abort()


def test_run_data_phase_hands_the_socket_over_after_the_accept_and_stops_the_dul() -> None:
    """scp.direct's take-over: with reads held from EVT_REQUESTED, ``serve`` gets the socket, intact,
    once the A-ASSOCIATE-AC is sent; the DUL thread is stopped, and a release it answers ends the
    association as released."""
    from intu_dicom_destination.shared import dimse
    from intu_dicom_destination.testing.attacks import read_pdu
    from pynetdicom import evt
    from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

    served: list[Any] = []
    released: list[Any] = []

    def serve(sock: Any, intact: bool) -> bool:
        assert intact  # pynetdicom read nothing after the A-ASSOCIATE-RQ
        served.append(threading.current_thread())
        pdu = read_pdu(sock)
        assert pdu is not None and pdu[0] == 0x04  # the C-ECHO-RQ reaches us, not the DUL
        context_id = pdu[1][4]
        command = dimse.parse_command(pdu[1][6:])
        message_id = dimse.us_value(command, dimse.MESSAGE_ID) or 0
        answer = dimse.response_command(dimse.C_ECHO_RSP, message_id, 0, sop_class=str(Verification))
        sock.sendall(b"".join(dimse.command_pdus(context_id, answer, 16384)))
        assert read_pdu(sock) == (0x05, b"\0\0\0\0")  # A-RELEASE-RQ
        sock.sendall(dimse.release_rp())
        return True

    acceptors: list[Any] = []

    class Handler(RequestHandler):
        def handle(self) -> None:
            assoc = internals.create_acceptor(self)
            acceptors.append(assoc)
            internals.run_data_phase(assoc, serve)
            assoc.start()

    ae = AE(ae_title="ECHO_SCP")
    ae.add_supported_context(Verification)
    handlers = [
        (evt.EVT_REQUESTED, lambda event: internals.hold_reads(event.assoc)),
        (evt.EVT_RELEASED, lambda event: released.append(event.assoc)),
    ]
    server = ae.make_server(
        ("127.0.0.1", 0),
        server_class=ThreadedAssociationServer,
        request_handler=Handler,
        evt_handlers=handlers,
    )
    internals.register_server(ae, server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assoc = _echo_assoc(server)
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
        assert assoc.is_released
        (acceptor,) = acceptors
        assert _wait(lambda: not acceptor.is_alive())
        assert served == [acceptor]  # in the association's own thread
        assert not acceptor.dul.is_alive()
        assert acceptor.is_released and released == [acceptor]
    finally:
        server.shutdown()
