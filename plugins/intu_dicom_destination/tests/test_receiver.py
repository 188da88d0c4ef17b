"""The `dicom` source (C-STORE SCP) against real peers: pynetdicom SCUs in-process and DCMTK."""

from __future__ import annotations

import logging
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from intu_dicom_destination.body import body_from_file
from intu_dicom_destination.scp.settings import SourceSettings, parse_source_settings
from intu_dicom_destination.scp.source import DicomSource
from intu_dicom_destination.shared.tls import TlsServerSettings
from intu_dicom_destination.testing import (
    INTEROP_ENV,
    RecordingEngine,
    free_port,
    require_tool,
    write_garbage_instance,
)
from pydicom import dcmread
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, _config

from intu_core.config.problems import Problems
from intu_core.config.section import Section
from intu_core.message import Acceptance, AcceptanceStatus, DeferredBody
from intu_core.types import Runtime

VERIFICATION = "1.2.840.10008.1.1"


@pytest.fixture
def source(start_source: Callable[..., DicomSource]) -> Callable[..., DicomSource]:
    return lambda **kw: start_source("test.dicom.source", **kw)


def scu(ae_title: str = "TEST_SCU", contexts: list[tuple[str, list[str] | None]] | None = None) -> AE:
    ae = AE(ae_title=ae_title)
    for uid, syntaxes in contexts or [(CTImageStorage, None), (VERIFICATION, None)]:
        if syntaxes is None:
            ae.add_requested_context(uid)
        else:
            ae.add_requested_context(uid, syntaxes)
    return ae


def associate(src: DicomSource, ae: AE | None = None, called: str = "INTU_SCP", **kw: Any) -> Any:
    return (ae or scu()).associate("127.0.0.1", src.port, ae_title=called, **kw)


def test_store_builds_body_file_and_metadata(source: Any, engine: RecordingEngine, ct_files: Any) -> None:
    src = source()
    files = ct_files(2)
    assoc = associate(src)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    statuses = [assoc.send_c_store(f).Status for f in files]
    local_port = assoc.local["port"]
    assoc.release()
    assert statuses == [0x0000, 0x0000]
    assert len(engine.messages) == 2
    assert list(src.incoming_dir.iterdir()) == []  # each moved into the spool, none left behind
    for message, original_path in zip(engine.messages, files, strict=True):
        original = dcmread(original_path)
        body = message.body
        assert message.channel == "dicom-router"
        # The JSON model is deferred: nothing but the UIDs and the file until a stage reads it.
        assert set(body) == {"sop_class_uid", "sop_instance_uid", "transfer_syntax_uid", "file"}
        assert isinstance(body, DeferredBody)
        body.materialize()
        assert body == body_from_file(Path(body["file"]))
        assert body["dataset"]["00100020"] == {"vr": "LO", "Value": ["INTU-0001"]}
        assert body["dataset"]["00100010"]["Value"] == [{"Alphabetic": "Doe^Jane"}]
        assert body["dataset"]["00080060"]["Value"] == ["CT"]
        assert body["sop_instance_uid"] == original.SOPInstanceUID
        stored = Path(body["file"])
        assert message.files == (str(stored),)
        assert stored.parent == src.received_dir and stored.is_file()
        assert dcmread(stored).PixelData == original.PixelData
        # The bulk reference points at the original pixel bytes inside the stored file.
        uri = body["dataset"]["7FE00010"]["BulkDataURI"]
        offset = int(uri.split("offset=")[1].split("&")[0])
        assert stored.read_bytes()[offset : offset + len(original.PixelData)] == original.PixelData
        assert message.metadata["dicom"] == {
            "calling_ae_title": "TEST_SCU",
            "called_ae_title": "INTU_SCP",
            "peer_address": "127.0.0.1",
            "peer_port": local_port,
            "transfer_syntax_uid": ExplicitVRLittleEndian,
            "sop_class_uid": CTImageStorage,
            "sop_instance_uid": original.SOPInstanceUID,
        }
        history = message.metadata["history"]
        assert history["source"] == f"TEST_SCU@127.0.0.1:{local_port}"
        assert history["identifiers"] == {
            "patient_id": original.PatientID,
            "accession_number": original.AccessionNumber,
            "study_uid": original.StudyInstanceUID,
            "series_uid": original.SeriesInstanceUID,
            "sop_instance_uid": original.SOPInstanceUID,
            "modality": "CT",
        }
        assert history["tags"]["PatientName"] == "Doe^Jane"
        assert history["tags"]["InstanceNumber"] == str(original.InstanceNumber)


def test_source_counts_bytes_and_associations_in_the_runtime_metrics(
    source: Any, engine: RecordingEngine, ct_files: Any
) -> None:
    src = source(calling_ae_titles=("TEST_SCU",))
    files = ct_files(3)
    assoc = associate(src)
    assert [assoc.send_c_store(f).Status for f in files] == [0, 0, 0]
    assoc.release()
    assert associate(src, scu("STRANGER")).is_rejected
    snapshot = src.runtime.metrics.collect()
    stored = sum(Path(m.body["file"]).stat().st_size for m in engine.messages)
    assert stored > 3 * 32 * 1024
    assert snapshot.value("intu_bytes_received_total", channel="dicom-router") == stored
    counted = "intu_dicom_scp_associations_total"
    assert snapshot.value(counted, channel="dicom-router", result="accepted") == 1
    assert snapshot.value(counted, channel="dicom-router", result="rejected") == 1


def test_echoscu_from_dcmtk(source: Any) -> None:
    echoscu = require_tool("echoscu")
    src = source()
    result = subprocess.run(
        [echoscu, "-aet", "DCMTK_SCU", "-aec", "INTU_SCP", "127.0.0.1", str(src.port)],
        env=INTEROP_ENV,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_storescu_from_dcmtk_sends_five(source: Any, engine: RecordingEngine, ct_files: Any) -> None:
    storescu = require_tool("storescu")
    src = source()
    files = ct_files(5)
    result = subprocess.run(
        [storescu, "-aet", "DCMTK_SCU", "-aec", "INTU_SCP", "127.0.0.1", str(src.port), *map(str, files)],
        env=INTEROP_ENV,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(engine.messages) == 5
    sent = {dcmread(f).SOPInstanceUID: dcmread(f).PixelData for f in files}
    for message in engine.messages:
        assert message.metadata["dicom"]["calling_ae_title"] == "DCMTK_SCU"
        stored = dcmread(message.body["file"])
        assert stored.PixelData == sent[stored.SOPInstanceUID]


def test_calling_ae_title_not_in_allow_list_is_rejected(source: Any, engine: RecordingEngine) -> None:
    src = source(calling_ae_titles=("MODALITY1",))
    assoc = associate(src, scu("STRANGER"))
    assert assoc.is_rejected
    reject = assoc.acceptor.primitive
    assert (reject.result, reject.result_source, reject.diagnostic) == (0x01, 0x01, 0x03)
    assert "Calling AE title not recognised" in reject.reason_str
    allowed = associate(src, scu("MODALITY1"))
    assert allowed.is_established
    allowed.release()


def test_called_ae_title_mismatch_is_rejected(source: Any) -> None:
    src = source()
    assoc = associate(src, called="SOMEONE_ELSE")
    assert assoc.is_rejected
    reject = assoc.acceptor.primitive
    assert (reject.result, reject.result_source, reject.diagnostic) == (0x01, 0x01, 0x07)


def test_called_ae_title_check_can_be_turned_off(source: Any) -> None:
    src = source(require_called_ae_title=False)
    assoc = associate(src, called="ANYTHING")
    assert assoc.is_established
    assoc.release()


@pytest.mark.parametrize(
    ("answer", "status", "comment"),
    [
        (Acceptance(AcceptanceStatus.FILTERED, "dropped by filter"), 0x0000, None),
        (
            Acceptance(AcceptanceStatus.BUSY, "queue hospital-pacs is full"),
            0xA700,
            "queue hospital-pacs is full",
        ),
        (
            Acceptance(AcceptanceStatus.FAILED, "transformer raised KeyError: '00100020'" + "x" * 80),
            0x0110,
            ("transformer raised KeyError: '00100020'" + "x" * 80)[:64],
        ),
    ],
)
def test_status_tells_the_sender_what_the_engine_did(
    source: Any, engine: RecordingEngine, ct_files: Any, answer: Acceptance, status: int, comment: str | None
) -> None:
    engine.answer = answer
    src = source()
    assoc = associate(src)
    rsp = assoc.send_c_store(ct_files(1)[0])
    assoc.release()
    assert rsp.Status == status
    if comment is not None:
        assert rsp.ErrorComment == comment
    assert len(engine.messages) == 1  # the engine was asked; it owns the stored file now
    assert Path(engine.messages[0].files[0]).exists()


def test_unparseable_dataset_gets_c000_and_the_server_keeps_serving(
    source: Any,
    engine: RecordingEngine,
    ct_files: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: Any,
) -> None:
    src = source()
    # Send the file's bytes as they are (no pydicom re-encoding on the sender side).
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = associate(src)
    with caplog.at_level(logging.ERROR, logger="test.dicom.source"):
        rsp = assoc.send_c_store(write_garbage_instance(tmp_path / "garbage.dcm"))
    assert rsp.Status == 0xC000
    assert "cannot parse" in caplog.text and "0xC000" in caplog.text
    assert engine.messages == []
    assert list(src.received_dir.iterdir()) == []
    good = assoc.send_c_store(ct_files(1)[0])
    assoc.release()
    assert good.Status == 0x0000 and len(engine.messages) == 1


def test_received_instances_are_stored_in_the_channel_spool_dir(
    source: Any, engine: RecordingEngine, ct_files: Any, tmp_path: Path
) -> None:
    src = source()
    spool = tmp_path / "data" / "spool" / "dicom-router"
    assert src.runtime.spool_dir == spool and spool.is_dir()
    assoc = associate(src)
    rsp = assoc.send_c_store(ct_files(1)[0])
    assoc.release()
    assert rsp.Status == 0x0000
    stored = Path(engine.messages[0].body["file"])
    assert stored.parent == spool and engine.messages[0].files == (str(stored),)
    assert not (tmp_path / "data" / "dicom").exists()


def test_corrupt_deflate_stream_gets_c000_and_the_server_keeps_serving(
    source: Any,
    engine: RecordingEngine,
    ct_files: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: Any,
) -> None:
    src = source()
    # Send the file's bytes as they are: a deflated data set that is not a valid deflate stream.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    garbage = write_garbage_instance(
        tmp_path / "bad-deflate.dcm", DeflatedExplicitVRLittleEndian, payload=b"\xff" * 64
    )
    # Two contexts for CT: a deflated one (the SCP would pick explicit VR from a shared one).
    ae = scu(contexts=[(CTImageStorage, [DeflatedExplicitVRLittleEndian]), (CTImageStorage, None)])
    assoc = associate(src, ae)
    with caplog.at_level(logging.ERROR, logger="test.dicom.source"):
        rsp = assoc.send_c_store(garbage)
    assert rsp.Status == 0xC000 and rsp.ErrorComment == "dataset cannot be parsed"
    assert "deflated dataset is corrupt" in caplog.text and "0xC000" in caplog.text
    assert engine.messages == []
    assert list(src.received_dir.iterdir()) == []
    good = assoc.send_c_store(ct_files(1)[0])
    assoc.release()
    assert good.Status == 0x0000 and len(engine.messages) == 1


def test_unexpected_error_while_storing_answers_0110_and_removes_the_partial_file(
    source: Any, engine: RecordingEngine, ct_files: Any, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    src = source()

    def broken(temp: Path, path: Path, transfer_syntax: str) -> None:
        path.write_bytes(b"half an instance")  # written, then something unforeseen goes wrong
        raise ValueError("unforeseen")

    monkeypatch.setattr(src, "_persist", broken)
    assoc = associate(src)
    with caplog.at_level(logging.ERROR, logger="test.dicom.source"):
        rsp = assoc.send_c_store(ct_files(1)[0])
    assert rsp.Status == 0x0110 and rsp.ErrorComment == "cannot store instance: ValueError"
    assert "unexpected ValueError: unforeseen" in caplog.text and "0x0110" in caplog.text
    assert engine.messages == [] and list(src.received_dir.iterdir()) == []
    monkeypatch.undo()
    good = assoc.send_c_store(ct_files(1)[0])
    assoc.release()
    assert good.Status == 0x0000 and len(engine.messages) == 1


def test_deflated_instances_are_stored_inflated(source: Any, engine: RecordingEngine, ct_files: Any) -> None:
    src = source()
    ae = scu(contexts=[(CTImageStorage, [DeflatedExplicitVRLittleEndian])])
    assoc = associate(src, ae)
    original = dcmread(ct_files(1)[0])
    rsp = assoc.send_c_store(original)
    assoc.release()
    assert rsp.Status == 0x0000
    message = engine.messages[0]
    assert message.metadata["dicom"]["transfer_syntax_uid"] == DeflatedExplicitVRLittleEndian
    assert message.body["transfer_syntax_uid"] == ExplicitVRLittleEndian
    assert dcmread(message.body["file"]).PixelData == original.PixelData
    assert list(src.incoming_dir.iterdir()) == []  # the deflated original is not left behind


# -- TLS -------------------------------------------------------------------------------------------
def _tls_settings(pki: dict[str, Path], require_client_cert: bool) -> TlsServerSettings:
    return TlsServerSettings(
        enabled=True,
        cert=pki["server"],
        key=pki["server_key"],
        ca_cert=pki["ca"],
        require_client_cert=require_client_cert,
    )


def _client_context(pki: dict[str, Path], with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    if with_cert:
        context.load_cert_chain(str(pki["client"]), str(pki["client_key"]))
    return context


def test_tls_with_client_certificate(
    source: Any, engine: RecordingEngine, ct_files: Any, pki: dict[str, Path]
) -> None:
    src = source(tls=_tls_settings(pki, require_client_cert=True))
    assoc = associate(src, tls_args=(_client_context(pki, with_cert=True), "localhost"))
    assert assoc.is_established
    rsp = assoc.send_c_store(ct_files(1)[0])
    assoc.release()
    assert rsp.Status == 0x0000 and len(engine.messages) == 1


def test_tls_key_not_matching_the_certificate_fails_start_clearly(
    tmp_path: Path, engine: RecordingEngine, pki: dict[str, Path]
) -> None:
    tls = TlsServerSettings(enabled=True, cert=pki["server"], key=pki["client_key"], ca_cert=pki["ca"])
    settings = SourceSettings(port=free_port(), host="127.0.0.1", tls=tls)
    src = DicomSource(settings, Runtime("dicom-router", tmp_path / "data", logging.getLogger("test")))
    with pytest.raises(RuntimeError, match="cannot set up TLS: tls.key .* does not match the certificate"):
        src.start(engine.deliver)


def test_tls_client_without_certificate_is_refused(
    source: Any, engine: RecordingEngine, pki: dict[str, Path], caplog: Any
) -> None:
    src = source(tls=_tls_settings(pki, require_client_cert=True))
    with caplog.at_level(logging.WARNING, logger="test.dicom.source"):
        assoc = associate(src, tls_args=(_client_context(pki, with_cert=False), "localhost"))
        assert not assoc.is_established
        # The operator sees who was refused and why, once the connection is gone.
        guard = src._guard
        assert guard is not None
        deadline = time.monotonic() + 10
        while guard.open_connections() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert guard.open_connections() == []
    refused = [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.getMessage()]
    assert len(refused) == 1 and "connection from 127.0.0.1:" in refused[0], caplog.text
    # A plain TCP client gets nowhere either.
    plain = associate(src)
    assert not plain.is_established
    assert engine.messages == []


# -- settings --------------------------------------------------------------------------------------
def parse(data: Any, tmp_path: Path) -> tuple[SourceSettings, list[str]]:
    problems = Problems()
    section = Section(data, file=tmp_path / "channel.yaml", path="source.dicom", problems=problems)
    settings = parse_source_settings(section)
    return settings, [f"{p.key_path}: {p.message}" for p in problems]


def test_settings_defaults(tmp_path: Path) -> None:
    settings, problems = parse({"port": 11113}, tmp_path)
    assert problems == []
    assert settings == SourceSettings(port=11113)
    assert settings.ae_title == "INTU_SCP" and settings.host == "0.0.0.0"
    assert settings.require_called_ae_title and settings.calling_ae_titles == ()
    # The association limit counts established associations: 30 modalities at once fit.
    assert settings.max_pdu_length == 65536 and settings.max_associations == 64
    assert settings.max_associations_per_peer == 16 and settings.max_connections == 256
    assert settings.association_request_timeout_ms == 30_000  # PS3.8's ARTIM, as DCMTK
    assert settings.read_timeout_ms == 30_000 and settings.write_timeout_ms == 30_000
    assert settings.idle_timeout_ms == 300_000 and settings.dimse_timeout_ms == 600_000
    assert settings.max_pending_per_peer == 8
    assert settings.max_instance_mb == 4096 and settings.max_inflate_ratio == 200
    assert settings.sop_classes == ()  # any storage SOP class
    assert settings.stop_grace_ms == 10_000
    assert not settings.tls.enabled


def test_settings_full(tmp_path: Path, pki: dict[str, Path]) -> None:
    data = {
        "port": "11113",
        "ae_title": "ROUTER",
        "host": "127.0.0.1",
        "calling_ae_titles": ["CT1", "MR1"],
        "require_called_ae_title": False,
        "max_pdu_length": 0,
        "max_associations": 4,
        "max_associations_per_peer": 2,
        "max_connections": 8,
        "association_request_timeout_ms": 5000,
        "read_timeout_ms": 6000,
        "write_timeout_ms": 7000,
        "idle_timeout_ms": 8000,
        "dimse_timeout_ms": 9000,
        "max_pending_per_peer": 3,
        "max_instance_mb": 0,
        "max_inflate_ratio": 50,
        "sop_classes": ["1.2.840.10008.5.1.4.1.1.6", "1.2.3.4.5"],
        "stop_grace_ms": 2500,
        "tls": {
            "enabled": True,
            "cert": str(pki["server"]),
            "key": str(pki["server_key"]),
            "ca_cert": str(pki["ca"]),
            "require_client_cert": True,
        },
    }
    settings, problems = parse(data, tmp_path)
    assert problems == []
    assert settings.port == 11113 and settings.calling_ae_titles == ("CT1", "MR1")
    assert settings.stop_grace_ms == 2500
    assert (settings.max_associations_per_peer, settings.max_connections) == (2, 8)
    assert (settings.association_request_timeout_ms, settings.read_timeout_ms) == (5000, 6000)
    assert (settings.write_timeout_ms, settings.idle_timeout_ms) == (7000, 8000)
    assert (settings.dimse_timeout_ms, settings.max_pending_per_peer) == (9000, 3)
    assert (settings.max_instance_mb, settings.max_inflate_ratio) == (0, 50)
    assert settings.sop_classes == ("1.2.840.10008.5.1.4.1.1.6", "1.2.3.4.5")
    assert settings.tls == _tls_settings(pki, require_client_cert=True)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, "source.dicom: missing required key 'port'"),
        ({"port": 70000}, "source.dicom.port: expected an integer from 1 to 65535, found 70000"),
        ({"port": "abc"}, "source.dicom.port: expected an integer from 1 to 65535, found 'abc'"),
        ({"port": 104, "ae_title": "A_VERY_LONG_AE_TITLE"}, "at most 16 characters, found 20"),
        ({"port": 104, "ae_title": "   "}, "(empty or only spaces)"),
        ({"port": 104, "ae_title": "BAD\\AE"}, "expected an AE title without a backslash"),
        (
            {"port": 104, "calling_ae_titles": ["OK", "WAY_TOO_LONG_CALLING_AE"]},
            "calling_ae_titles: expected an AE title of at most 16",
        ),
        ({"port": 104, "max_associations": 0}, "max_associations: expected an integer from 1"),
        (
            {"port": 104, "max_pdu_length": 100},
            "max_pdu_length: expected 0 (no limit) or at least 4096, found 100",
        ),
        (
            {"port": 104, "max_associations_per_peer": 0},
            "max_associations_per_peer: expected an integer from 1",
        ),
        (
            {"port": 104, "max_connections": 4},
            "max_connections: expected at least max_associations (64), found 4",
        ),
        (
            {"port": 104, "association_request_timeout_ms": 0},
            "association_request_timeout_ms: expected an integer",
        ),
        ({"port": 104, "read_timeout_ms": -1}, "read_timeout_ms: expected an integer"),
        (
            {"port": 104, "dimse_timeout_ms": 1000},
            "dimse_timeout_ms: expected at least read_timeout_ms (30000), found 1000",
        ),
        ({"port": 104, "max_pending_per_peer": 0}, "max_pending_per_peer: expected an integer from 1"),
        ({"port": 104, "max_inflate_ratio": 1}, "max_inflate_ratio: expected an integer from 2"),
        ({"port": 104, "sop_classes": ["CT"]}, "sop_classes: expected SOP Class UIDs such as"),
        ({"port": 104, "ae_titel": "X"}, "unknown key 'ae_titel' (did you mean 'ae_title'?)"),
        ({"port": 104, "tls": {"enabled": True}}, "missing required key 'cert'"),
        (
            {"port": 104, "tls": {"enabled": True, "cert": "missing.pem", "key": "missing.key"}},
            "source.dicom.tls.cert: expected an existing file, found 'missing.pem'",
        ),
        ({"port": 104, "tls": {"enabeld": True}}, "unknown key 'enabeld' (did you mean 'enabled'?)"),
    ],
)
def test_settings_errors(tmp_path: Path, data: Any, expected: str) -> None:
    _, problems = parse(data, tmp_path)
    assert any(expected in p for p in problems), problems


def test_require_client_cert_needs_ca(tmp_path: Path, pki: dict[str, Path]) -> None:
    tls = {
        "enabled": True,
        "cert": str(pki["server"]),
        "key": str(pki["server_key"]),
        "require_client_cert": True,
    }
    _, problems = parse({"port": 104, "tls": tls}, tmp_path)
    assert problems == ["source.dicom.tls.require_client_cert: require_client_cert needs 'ca_cert' "
                        "(the CA that signs client certificates)"]  # fmt: skip


def test_stop_closes_the_port(source: Any) -> None:
    src = source()
    port = src.port
    src.stop()
    assoc = scu().associate("127.0.0.1", port, ae_title="INTU_SCP")
    assert not assoc.is_established


def test_stop_also_ends_an_association_accepted_during_shutdown(
    source: Any, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    src = source(stop_grace_ms=500)
    server = src._server
    real_shutdown = server.shutdown
    late: list[Any] = []

    def shutdown_while_a_peer_connects() -> None:
        late.append(associate(src))  # accepted after stop() began, before the socket closes
        real_shutdown()

    monkeypatch.setattr(server, "shutdown", shutdown_while_a_peer_connects)
    with caplog.at_level(logging.WARNING, logger="test.dicom.source"):
        src.stop()
    assoc = late[0]
    try:
        deadline = time.monotonic() + 5
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not assoc.is_established, "the association accepted during shutdown is still open"
        assert assoc.is_aborted
        assert "aborting association from TEST_SCU" in caplog.text
    finally:
        if assoc.is_established:
            assoc.abort()


def test_body_from_received_file_is_stable(source: Any, engine: RecordingEngine, ct_files: Any) -> None:
    src = source()
    assoc = associate(src)
    assoc.send_c_store(ct_files(1)[0])
    assoc.release()
    body = engine.messages[0].body
    body.materialize()
    assert body_from_file(Path(body["file"])) == body


def test_disk_full_answers_a700(
    source: Any, engine: RecordingEngine, ct_files: Any, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    # A full disk cannot be arranged on loopback without root: the only stand-in in this file.
    import errno

    src = source()

    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(src, "_persist", full)
    assoc = associate(src)
    with caplog.at_level(logging.ERROR, logger="test.dicom.source"):
        rsp = assoc.send_c_store(ct_files(1)[0])
    assoc.release()
    assert rsp.Status == 0xA700 and rsp.ErrorComment == "out of disk space"
    assert "no space" in caplog.text and engine.messages == []
    assert list(src.received_dir.iterdir()) == []
