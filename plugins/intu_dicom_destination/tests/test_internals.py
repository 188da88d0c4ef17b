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


def test_chunked_dataset_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)
    internals.enable_chunked_send()
    internals.enable_chunked_receive()
    assert _config.STORE_SEND_CHUNKED_DATASET is True
    assert _config.STORE_RECV_CHUNKED_DATASET is True


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
