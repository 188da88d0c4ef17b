"""DicomDestination (message bodies through the pool) and the `intu dicom` command functions."""

from __future__ import annotations

import io
import logging
from dataclasses import replace

from intu_dicom_destination.cli import run_echo, run_send
from intu_dicom_destination.destination import DESTINATION_TYPE, DicomDestination
from intu_dicom_destination.settings import DestinationSettings
from pydicom import dcmread

from intu_core.message import Message, SendStatus
from intu_core.types import Runtime


def settings_for(scp, **kw) -> DestinationSettings:
    return replace(DestinationSettings(host="127.0.0.1", port=scp.port, called_ae_title=scp.ae_title), **kw)


def runtime(tmp_path) -> Runtime:
    return Runtime(name="pacs", data_dir=tmp_path / "data", logger=logging.getLogger("test"))


def test_destination_type():
    assert DESTINATION_TYPE.name == "dicom" and DESTINATION_TYPE.create is DicomDestination


def test_send_bodies(scp_factory, ct_files, tmp_path):
    from intu_dicom_destination.body import body_from_file

    scp = scp_factory()
    dest = DicomDestination(settings_for(scp), runtime(tmp_path))
    try:
        files = ct_files(3)
        # A path, Part-10 bytes, and the JSON-model body with an edited tag.
        r1 = dest.send(Message(body=str(files[0])))
        r2 = dest.send(Message(body=files[1].read_bytes()))
        body = body_from_file(files[2])
        body["dataset"]["00081090"] = {"vr": "LO", "Value": ["INTU_PROCESSED"]}
        r3 = dest.send(Message(body=body))
        for result, path in zip((r1, r2, r3), files, strict=True):
            assert result.status is SendStatus.SUCCESS, result.detail
            assert result.data["sop_instance_uid"] == dcmread(path).SOPInstanceUID
            assert result.data["status"] == 0 and result.data["called_ae_title"] == scp.ae_title
        assert len(scp.associations) == 1
        assert scp.dataset(2).ManufacturerModelName == "INTU_PROCESSED"
        assert scp.dataset(2).PixelData == dcmread(files[2]).PixelData
        # Temporary files are cleaned up.
        outgoing = tmp_path / "data" / "dicom" / "outgoing"
        assert not outgoing.exists() or not list(outgoing.iterdir())
    finally:
        dest.close()


def test_no_room_to_prepare_an_edited_instance_is_retryable(scp_factory, ct_files, tmp_path):
    from intu_dicom_destination.body import body_from_file

    scp = scp_factory()
    (tmp_path / "data" / "dicom").mkdir(parents=True)
    (tmp_path / "data" / "dicom" / "outgoing").write_text("a file where the work folder should be")
    dest = DicomDestination(settings_for(scp), runtime(tmp_path))
    try:
        body = body_from_file(ct_files(1)[0])
        body["dataset"]["00081090"] = {"vr": "LO", "Value": ["INTU_PROCESSED"]}
        result = dest.send(Message(body=body))
    finally:
        dest.close()
    assert result.status is SendStatus.RETRYABLE
    assert "cannot prepare the instance in" in result.detail
    assert scp.received == []


def test_invalid_body_is_permanent(scp_factory, tmp_path):
    scp = scp_factory()
    dest = DicomDestination(settings_for(scp), runtime(tmp_path))
    try:
        result = dest.send(Message(body=42))
        assert result.status is SendStatus.PERMANENT and "not a DICOM instance" in result.detail
        assert not scp.associations
    finally:
        dest.close()


def test_run_echo(scp_factory):
    scp = scp_factory()
    out = io.StringIO()
    assert run_echo(settings_for(scp), out) == 0
    text = out.getvalue()
    assert "OK" in text and "round trip" in text and "TEST_SCP" in text and "max PDU" in text
    out = io.StringIO()
    assert run_echo(settings_for(scp, called_ae_title="NOPE"), out) == 1
    assert "Called AE title not recognised" in out.getvalue()


def test_run_send_folder_with_a_failure_and_a_non_dicom_file(scp_factory, ct_files, tmp_path):
    scp = scp_factory(status=lambda n, event: 0xC000 if n == 2 else (0xB000 if n == 3 else 0))
    files = ct_files(5)
    folder = files[0].parent
    (folder / "README.txt").write_text("not dicom")
    out = io.StringIO()
    code = run_send(settings_for(scp), [folder], out, progress=False, associations=1)
    text = out.getvalue()
    assert code == 1
    assert "skipped" in text and "README.txt" in text
    assert "0xC000 Cannot Understand" in text and "FAILED (permanent)" in text
    assert "warning:" in text and "0xB000" in text
    assert "sent 4 of 5" in text and "3 ok, 1 with warnings, 1 failed" in text


def test_run_send_all_ok_in_parallel(scp_factory, ct_files):
    scp = scp_factory()
    files = ct_files(12)
    out = io.StringIO()
    assert run_send(settings_for(scp), files, out, progress=False, associations=3) == 0
    assert "sent 12 of 12" in out.getvalue() and len(scp.received) == 12
    assert len(scp.associations) <= 3
