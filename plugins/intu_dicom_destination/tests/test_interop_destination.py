"""The destination against real peers: DCMTK storescp (plain and TLS) and Orthanc."""

from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from intu_dicom_destination.scu.destination import DicomDestination
from intu_dicom_destination.scu.sender import DicomSender
from intu_dicom_destination.scu.settings import DestinationSettings
from intu_dicom_destination.shared.tls import TlsClientSettings
from pydicom import dcmread

from intu_core.message import Message, SendStatus
from intu_core.types import Runtime

pytestmark = pytest.mark.interop


def _received_by_uid(folder: Path) -> dict[str, object]:
    out = {}
    for path in folder.rglob("*"):
        if path.is_file():
            ds = dcmread(path)
            out[str(ds.SOPInstanceUID)] = ds
    return out


def _send_all(sender: DicomSender, files: list[Path]) -> list:
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(sender.send_file, files))


@pytest.mark.parametrize("tls", [False, True])
def test_storescp_receives_a_series(storescp, ct_files, pki, tls):
    peer = storescp(tls=pki if tls else None)
    settings = DestinationSettings(
        host="127.0.0.1",
        port=peer.port,
        called_ae_title=peer.ae_title,
        timeout_ms=10000,
        tls=TlsClientSettings(True, pki["ca"], pki["client"], pki["client_key"])
        if tls
        else TlsClientSettings(),
    )
    files = ct_files(50)
    sender = DicomSender(settings)
    try:
        results = _send_all(sender, files)
        echo = sender.echo()
    finally:
        sender.close()
    assert all(r.status is SendStatus.SUCCESS for r in results), {r.detail for r in results}
    assert echo.ok and echo.implementation_class_uid
    received = _received_by_uid(peer.folder)
    assert len(received) == 50
    for path in files:
        sent = dcmread(path)
        got = received[str(sent.SOPInstanceUID)]
        assert got.PixelData == sent.PixelData and got.InstanceNumber == sent.InstanceNumber


def test_orthanc_receives_a_series_with_an_edited_tag(orthanc, ct_files, tmp_path):
    from intu_dicom_destination.body import body_from_file

    files = ct_files(50)
    settings = DestinationSettings(
        host="127.0.0.1", port=orthanc.port, called_ae_title="ORTHANC", timeout_ms=10000
    )
    dest = DicomDestination(settings, Runtime("orthanc", tmp_path / "data", logging.getLogger("test")))
    try:

        def one(path: Path):
            body = body_from_file(path)
            body["dataset"]["00081090"] = {"vr": "LO", "Value": ["INTU_PROCESSED"]}
            return dest.send(Message(body=body))

        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(one, files))
    finally:
        dest.close()
    assert all(r.status is SendStatus.SUCCESS for r in results), {r.detail for r in results}
    ids = orthanc.get("/instances")
    assert len(ids) == 50
    by_uid = {}
    for instance in ids:
        tags = orthanc.get(f"/instances/{instance}/simplified-tags")
        assert tags["ManufacturerModelName"] == "INTU_PROCESSED"
        by_uid[tags["SOPInstanceUID"]] = instance
    for path in files[:10]:
        sent = dcmread(path)
        raw = orthanc.get(f"/instances/{by_uid[str(sent.SOPInstanceUID)]}/frames/0/raw")
        assert hashlib.sha256(raw).hexdigest() == hashlib.sha256(sent.PixelData).hexdigest()


def test_orthanc_wrong_called_ae_is_a_clear_rejection(orthanc, ct_files):
    settings = DestinationSettings(host="127.0.0.1", port=orthanc.port, called_ae_title="NOT_ORTHANC")
    sender = DicomSender(settings)
    try:
        result = sender.send_file(ct_files(1)[0])
    finally:
        sender.close()
    assert result.status is SendStatus.PERMANENT
    assert "association rejected" in result.detail
    assert "'INTU_SCU'" in result.detail and "'NOT_ORTHANC'" in result.detail
    assert "Called AE title not recognised" in result.detail, result.detail
