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


# -- lossless transfer-syntax changes against DCMTK (issue 10, items 1 and 4) ---------------------
def _testdata(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom's bundled test file {name} is missing"
    return Path(path)


LOSSLESS = [
    "MR_small_RLE.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
]
BIG_ENDIAN = [
    "MR_small_bigendian.dcm",
    "rtdose_expb.dcm",
    "liver_expb_1frame.dcm",
    "SC_rgb_small_odd_big_endian.dcm",
]


def _same_values(sent, got, where: str = "") -> None:
    for elem in sent:
        if elem.tag == 0x7FE00010 or elem.tag.element == 0:  # pixels: compared decoded; group lengths
            continue
        other = got[elem.tag]
        if elem.VR == "SQ":
            for i, (a, b) in enumerate(zip(elem.value, other.value, strict=True)):
                _same_values(a, b, f"{where}{elem.tag}[{i}].")
        else:
            assert elem.value == other.value, f"{where}{elem.tag}"


def test_storescp_taking_only_implicit_little_endian_gets_the_same_instances(tmp_path):
    """Compressed and big-endian instances into a DCMTK storescp that accepts Implicit VR Little
    Endian only (+xi): decoded losslessly or byte-swapped, with the same SOP Instance UID, the same
    element values and the same pixel values in the file storescp wrote for each."""
    import numpy as np
    from intu_dicom_destination.testing import start_storescp

    # +xi: Implicit VR Little Endian only; +uf: unique file names (the MR_small samples share a UID).
    peer = start_storescp(tmp_path / "received", extra=["+xi", "+uf"], log=tmp_path / "storescp.log")
    settings = DestinationSettings(
        host="127.0.0.1", port=peer.port, called_ae_title=peer.ae_title, timeout_ms=20000
    )
    sender = DicomSender(settings, work_dir=tmp_path / "work")
    seen: set[Path] = set()
    try:
        for name in LOSSLESS + BIG_ENDIAN:
            original = dcmread(_testdata(name))
            result = sender.send_file(_testdata(name))
            assert result.status is SendStatus.SUCCESS, f"{name}: {result.detail}"
            assert result.data["transfer_syntax"] == "1.2.840.10008.1.2", name
            # storescp writes the file before it answers: the new one is this instance's.
            new = set(peer.folder.iterdir()) - seen
            assert len(new) == 1, f"{name}: {new}"
            seen |= new
            got = dcmread(new.pop())
            assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
            assert got.SOPInstanceUID == original.SOPInstanceUID, name
            if name in BIG_ENDIAN:
                _same_values(original, got)
            assert np.array_equal(got.pixel_array, original.pixel_array), name
    finally:
        sender.close()
        peer.stop()


def test_storescp_that_stores_no_ct_is_a_permanent_failure_naming_the_sop_class(tmp_path, ct_files):
    """Issue 10, item 7: DCMTK storescp configured (-xf) to store MR images only."""
    from intu_dicom_destination.testing import start_storescp

    config = tmp_path / "mr-only.cfg"
    config.write_text(
        "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LittleEndianExplicit\n"
        "TransferSyntax2 = LittleEndianImplicit\n"
        "[[PresentationContexts]]\n[MROnly]\nPresentationContext1 = VerificationSOPClass\\Uncompressed\n"
        "PresentationContext2 = MRImageStorage\\Uncompressed\n"
        "[[Profiles]]\n[MROnly]\nPresentationContexts = MROnly\n"
    )
    peer = start_storescp(
        tmp_path / "received", extra=["-xf", str(config), "MROnly"], log=tmp_path / "storescp.log"
    )
    settings = DestinationSettings(
        host="127.0.0.1", port=peer.port, called_ae_title=peer.ae_title, timeout_ms=20000
    )
    sender = DicomSender(settings)
    try:
        result = sender.send_file(ct_files(1)[0])
        mr = sender.send_file(_testdata("MR_small.dcm"))
    finally:
        sender.close()
        peer.stop()
    assert result.status is SendStatus.PERMANENT, result.detail
    assert "CT Image Storage" in result.detail and "accepted none of the" in result.detail
    assert mr.status is SendStatus.SUCCESS, mr.detail  # the same peer stores what it supports
    assert [p.name for p in peer.folder.iterdir()] == [
        f"MR.{dcmread(_testdata('MR_small.dcm')).SOPInstanceUID}"
    ]
