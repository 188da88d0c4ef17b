"""DicomDestination (message bodies through the pool) and the `intu dicom` command functions."""

from __future__ import annotations

import io
import logging
from dataclasses import replace

import pytest
from intu_dicom_destination.cli import run_echo, run_send
from intu_dicom_destination.scu.destination import DicomDestination
from intu_dicom_destination.scu.settings import DestinationSettings
from pydicom import dcmread

from intu_core.message import Message, SendStatus
from intu_core.types import Runtime


def settings_for(scp, **kw) -> DestinationSettings:
    return replace(DestinationSettings(host="127.0.0.1", port=scp.port, called_ae_title=scp.ae_title), **kw)


def runtime(tmp_path) -> Runtime:
    return Runtime(name="pacs", data_dir=tmp_path / "data", logger=logging.getLogger("test"))


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


def test_delivered_bytes_are_counted_in_the_runtime_metrics(scp_factory, ct_files, tmp_path):
    scp = scp_factory()
    shared = runtime(tmp_path)  # one metrics registry for both destinations
    dest = DicomDestination(settings_for(scp), shared)
    try:
        files = ct_files(2)
        assert all(dest.send(Message(body=str(f))).delivered for f in files)
        refused = DicomDestination(settings_for(scp, called_ae_title="NOT_THERE"), shared)
        assert not refused.send(Message(body=str(files[0]))).delivered
        refused.close()
    finally:
        dest.close()
    sent = shared.metrics.collect().value("intu_bytes_sent_total", destination="pacs")
    assert sent == sum(f.stat().st_size for f in files)  # the refused send is not counted
    assert [scp.dataset(i).SOPInstanceUID for i in range(2)] == [dcmread(f).SOPInstanceUID for f in files]


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


def test_leftover_temporary_files_are_deleted_at_creation(scp_factory, ct_files, tmp_path):
    # A crash between writing an edited or decompressed copy and deleting it leaves the file.
    outgoing = tmp_path / "data" / "dicom" / "outgoing"
    outgoing.mkdir(parents=True)
    leftovers = [outgoing / ".intu-0123456789abcdef.dcm", outgoing / "transcode-abc123.dcm"]
    for path in leftovers:
        path.write_bytes(b"\0" * 4096)
    scp = scp_factory()
    dest = DicomDestination(settings_for(scp), runtime(tmp_path))
    try:
        assert list(outgoing.iterdir()) == []
        assert dest.send(Message(body=ct_files(1)[0].read_bytes())).status is SendStatus.SUCCESS
        assert list(outgoing.iterdir()) == []
    finally:
        dest.close()


def test_unusable_tls_file_refuses_creation_naming_the_destination(tmp_path):
    from intu_dicom_destination.shared.tls import TlsClientSettings
    from intu_dicom_destination.testing import make_pki

    pki = make_pki(tmp_path / "pki")
    bad = tmp_path / "client.key"
    bad.write_text("not a key")
    tls = TlsClientSettings(enabled=True, ca_cert=pki["ca"], client_cert=pki["client"], client_key=bad)
    settings = DestinationSettings(host="127.0.0.1", port=1, called_ae_title="X", tls=tls)
    with pytest.raises(ValueError) as raised:  # TlsConfigError: the engine makes it a config error
        DicomDestination(settings, runtime(tmp_path))
    text = str(raised.value)
    assert "'pacs'" in text and str(bad) in text and "tls.client_key" in text and "PEM" in text, text


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


def test_intu_dicom_echo_with_an_unusable_ca_file_says_so_in_one_line(tmp_path):
    from click.testing import CliRunner

    from intu_core.cli import cli

    (tmp_path / "bad.pem").write_text("not a certificate")
    (tmp_path / "intu.yaml").write_text(
        "destinations:\n  pacs:\n    type: dicom\n    dicom:\n      host: 127.0.0.1\n"
        "      called_ae_title: X\n      tls: {enabled: true, ca_cert: bad.pem}\n"
    )
    result = CliRunner().invoke(cli, ["--dir", str(tmp_path), "dicom", "echo", "pacs"])
    assert result.exit_code == 1
    assert "destination 'pacs': tls.ca_cert" in result.output and "not a PEM" in result.output
    assert "Traceback" not in result.output
    unknown = CliRunner().invoke(cli, ["--dir", str(tmp_path), "dicom", "echo", "nope"])
    assert unknown.exit_code == 2 and "no destination named 'nope'" in unknown.output


def test_a_status_that_never_ends_is_dead_lettered_after_max_age(scp_factory, ct_files, tmp_path):
    """A PACS answering 0xA700 to one image for ever: bounded by retry.max_age_ms (issue 10,
    item 9); the other images are delivered meanwhile."""
    import time

    from intu_core.delivery import DeliveryWorkers, RetryPolicy
    from intu_core.queue import EntryState
    from intu_core.queue.sqlite import SqliteQueueStore

    files = ct_files(3)
    stuck = str(dcmread(files[1]).SOPInstanceUID)
    scp = scp_factory(
        status=lambda n, event: 0xA700 if event.request.AffectedSOPInstanceUID == stuck else 0x0000
    )
    dest = DicomDestination(settings_for(scp, timeout_ms=5000), runtime(tmp_path))
    store = SqliteQueueStore(tmp_path / "queue")
    policy = RetryPolicy(initial_delay_ms=50, max_delay_ms=200, jitter=0.0, max_age_ms=1500)
    workers = DeliveryWorkers(store, "pacs", dest, policy, threads=1)
    try:
        ids = store.enqueue([("pacs", Message(body=str(path))) for path in files])
        workers.start()
        deadline = time.monotonic() + 30
        while workers.counts["dead"] + workers.counts["delivered"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert workers.counts == {**workers.counts, "delivered": 2, "dead": 1}
        dead = store.get(ids[1])
        assert dead is not None and dead.state is EntryState.DEAD and dead.attempts > 1
        assert "gave up after" in dead.last_error and "retry.max_age_ms" in dead.last_error
        assert "0xA700" in dead.last_error and dead.history[-1]["code"] == 0xA700
        received = {r.sop_instance_uid for r in scp.received}  # on the peer's side
        assert received == {str(dcmread(files[i]).SOPInstanceUID) for i in (0, 2)}
    finally:
        workers.stop(10)
        dest.close()
        store.close()


# -- `intu dicom send` refuses broken local files before sending (issue 10, item 6) -------------------
def _uids_differ(ct, folder):
    from pydicom.uid import generate_uid

    ds = dcmread(ct)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = folder / "uids-differ.dcm"
    ds.save_as(path, enforce_file_format=False)  # keeps the (wrong) file meta as it is
    return path, "differs from the file meta's"


def _odd_deflate(ct, folder):
    import struct

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = dcmread(ct)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = folder / "odd-deflate.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    meta_end = 144 + struct.unpack("<I", data[140:144])[0]
    if (len(data) - meta_end) % 2 == 0:  # a stray byte after the stream (zlib ignores it)
        data += b"\0"
    path.write_bytes(data)
    return path, "deflated stream has an odd length"


def _odd_fragment(ct, folder):
    import struct

    from pydicom.uid import RLELossless

    ds = dcmread(ct)
    item = b"\xfe\xff\x00\xe0"
    ds.PixelData = (
        item + struct.pack("<I", 0) + item + struct.pack("<I", 5) + b"abcde" + item + b"\x03\0\0\0fgh"
    )
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds["PixelData"].is_undefined_length = True
    path = folder / "odd-fragment.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, "fragment 1 has an odd length"


def _truncated(ct, folder):
    path = folder / "truncated.dcm"
    path.write_bytes(ct.read_bytes()[:-1000])
    return path, "truncated: element (7FE0,0010)"


@pytest.mark.parametrize("craft", [_uids_differ, _odd_deflate, _odd_fragment, _truncated])
def test_run_send_refuses_a_broken_file_at_once_without_an_association(
    scp_factory, ct_files, tmp_path, craft
):
    scp = scp_factory()
    folder = tmp_path / "bad"
    folder.mkdir()
    path, words = craft(ct_files(1)[0], folder)
    out = io.StringIO()
    code = run_send(settings_for(scp, timeout_ms=30000), [path], out, progress=False, associations=1)
    text = out.getvalue()
    assert code == 1, text
    assert f"FAILED (permanent): {path}: not sent: " in text and words in text, text
    assert "sent 0 of 1" in text
    assert scp.associations == [] and scp.received == []  # refused before any association


def test_run_send_sends_the_datasets_uids(scp_factory, ct_files, tmp_path):
    scp = scp_factory()
    files = ct_files(3)
    out = io.StringIO()
    assert run_send(settings_for(scp), files, out, progress=False, associations=2) == 0, out.getvalue()
    sent = {str(dcmread(p).SOPInstanceUID) for p in files}
    assert {r.sop_instance_uid for r in scp.received} == sent
    assert {str(scp.dataset(i).SOPInstanceUID) for i in range(3)} == sent
