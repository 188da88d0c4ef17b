"""DicomSender against a real in-process pynetdicom SCP on loopback."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from intu_dicom_destination.scu.sender import DicomSender
from intu_dicom_destination.scu.settings import DestinationSettings
from intu_dicom_destination.shared.tls import TlsClientSettings
from intu_dicom_destination.testing import UNCOMPRESSED_ONLY, free_port
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from intu_core.message import SendStatus


def settings_for(scp, **kw) -> DestinationSettings:
    base = DestinationSettings(
        host="127.0.0.1", port=scp.port, called_ae_title=scp.ae_title, timeout_ms=5000, idle_timeout_ms=5000
    )
    return replace(base, **kw)


@pytest.fixture
def senders():
    made: list[DicomSender] = []

    def make(settings: DestinationSettings, **kw) -> DicomSender:
        sender = DicomSender(settings, **kw)
        made.append(sender)
        return sender

    yield make
    for s in made:
        s.close()


def test_success_and_association_reuse(scp_factory, senders, ct_files):
    scp = scp_factory()
    sender = senders(settings_for(scp))
    files = ct_files(10)
    results = [sender.send_file(f) for f in files]
    assert all(r.status is SendStatus.SUCCESS for r in results), results
    assert len(scp.associations) == 1
    assert results[0].code == 0 and results[0].data["sop_instance_uid"] == dcmread(files[0]).SOPInstanceUID
    assert results[-1].data["reused"] is True
    # The bytes arrived unchanged (chunked send from the file).
    sent = dcmread(files[3])
    got = scp.dataset(3)
    assert got.SOPInstanceUID == sent.SOPInstanceUID and got.PixelData == sent.PixelData


@pytest.mark.parametrize(
    ("code", "status", "words"),
    [
        (0xB000, SendStatus.WARNING, "0xB000 Coercion of Data Elements"),
        (0xB006, SendStatus.WARNING, "0xB006 Element Discarded"),
        (0xB007, SendStatus.WARNING, "0xB007 Data Set Does Not Match SOP Class"),
        (0xA700, SendStatus.RETRYABLE, "0xA700 Refused: Out of Resources"),
        (0xA702, SendStatus.RETRYABLE, "0xA702 Refused: Out of Resources"),
        (0xC000, SendStatus.PERMANENT, "0xC000 Cannot Understand"),
        (0xA900, SendStatus.PERMANENT, "0xA900 Data Set Does Not Match SOP Class"),
        (0x0122, SendStatus.PERMANENT, "0x0122 Refused: SOP Class Not Supported"),
    ],
)
def test_statuses_of_the_third_image(scp_factory, senders, ct_files, code, status, words):
    scp = scp_factory(status=lambda n, event: code if n == 3 else 0)
    sender = senders(settings_for(scp))
    results = [sender.send_file(f) for f in ct_files(4)]
    assert [r.status for r in results] == [SendStatus.SUCCESS, SendStatus.SUCCESS, status, SendStatus.SUCCESS]
    assert results[2].code == code
    assert words in results[2].detail
    assert results[2].data["status"] == code
    assert len(scp.associations) == 1  # a failure status does not cost the association


@pytest.mark.parametrize("duplicate_is_success", [True, False])
def test_duplicate(scp_factory, senders, ct_files, duplicate_is_success):
    scp = scp_factory(status=lambda n, event: 0x0111)
    sender = senders(settings_for(scp, duplicate_is_success=duplicate_is_success))
    result = sender.send_file(ct_files(1)[0])
    assert result.code == 0x0111
    assert "Duplicat" in result.detail or duplicate_is_success
    expected = SendStatus.SUCCESS if duplicate_is_success else SendStatus.PERMANENT
    assert result.status is expected


def test_parallel_associations(scp_factory, senders, ct_files):
    scp = scp_factory(delay=0.02)
    sender = senders(settings_for(scp, max_associations=3))
    files = ct_files(24)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(sender.send_file, files))
    assert all(r.delivered for r in results)
    assert 1 < len(scp.associations) <= 3
    assert scp.max_active <= 3
    assert len(scp.received) == 24


def test_reassociates_after_the_scp_aborts(scp_factory, senders, ct_files):
    scp = scp_factory(abort_on={3})
    sender = senders(settings_for(scp))
    files = ct_files(5)
    results = [sender.send_file(f) for f in files]
    assert all(r.status is SendStatus.SUCCESS for r in results), [r.detail for r in results]
    assert len(scp.associations) == 2
    uids = [r.sop_instance_uid for r in scp.received]
    assert uids == [dcmread(f).SOPInstanceUID for f in files]


def test_reassociates_after_the_peer_closed_an_idle_association(scp_factory, senders, ct_files):
    scp = scp_factory()
    sender = senders(settings_for(scp))
    files = ct_files(2)
    assert sender.send_file(files[0]).delivered
    # The SCP drops every association (e.g. restarted); the pooled one is dead now.
    for assoc in scp.server.active_associations:
        assoc.abort()
    time.sleep(0.2)
    assert sender.send_file(files[1]).status is SendStatus.SUCCESS
    assert len(scp.associations) == 2


def test_idle_association_is_released(scp_factory, senders, ct_files):
    scp = scp_factory()
    sender = senders(settings_for(scp, idle_timeout_ms=300))
    assert sender.send_file(ct_files(1)[0]).delivered
    assert scp.active == 1 and sender.open_associations == 1
    deadline = time.monotonic() + 3
    while (scp.active or sender.open_associations) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scp.active == 0 and sender.open_associations == 0
    # ...and the next send opens a new one.
    assert sender.send_file(ct_files(1)[0]).delivered
    assert len(scp.associations) == 2


def test_association_rejected_names_both_ae_titles_and_the_reason(scp_factory, senders, ct_files):
    scp = scp_factory(ae_title="REAL_PACS")
    sender = senders(replace(settings_for(scp), called_ae_title="WRONG_PACS", ae_title="MY_SCU"))
    result = sender.send_file(ct_files(1)[0])
    assert result.status is SendStatus.PERMANENT
    assert "'MY_SCU'" in result.detail and "'WRONG_PACS'" in result.detail
    assert "Called AE title not recognised" in result.detail
    assert f"127.0.0.1:{scp.port}" in result.detail
    echo = sender.echo()
    assert not echo.ok and "Called AE title not recognised" in echo.detail


def test_connection_refused_is_retryable(senders, ct_files):
    port = free_port()
    sender = senders(DestinationSettings(host="127.0.0.1", port=port, called_ae_title="X", timeout_ms=2000))
    result = sender.send_file(ct_files(1)[0])
    assert result.status is SendStatus.RETRYABLE
    assert f"127.0.0.1:{port}" in result.detail and "refused" in result.detail.lower()


def test_dimse_timeout_is_retryable_and_aborts(scp_factory, senders, ct_files):
    scp = scp_factory(delay=1.5)
    sender = senders(settings_for(scp, timeout_ms=500))
    result = sender.send_file(ct_files(1)[0])
    assert result.status is SendStatus.RETRYABLE
    assert "no C-STORE response" in result.detail
    assert sender.open_associations == 0


def _rle_file(tmp_path: Path, ct_files, syntax: str = RLELossless) -> Path:
    ds = dcmread(ct_files(1)[0])
    ds.compress(syntax)  # RLE: pydicom's own encoder; JPEG 2000: pylibjpeg-openjpeg
    path = tmp_path / "compressed.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000-lossless"])
def test_compressed_instance_is_decompressed_for_an_uncompressed_only_scp(
    scp_factory, senders, ct_files, tmp_path, syntax
):
    path = _rle_file(tmp_path, ct_files, syntax)
    original = dcmread(path)
    assert original.file_meta.TransferSyntaxUID == syntax
    scp = scp_factory(transfer_syntaxes=UNCOMPRESSED_ONLY)
    sender = senders(settings_for(scp), work_dir=tmp_path / "work")
    result = sender.send_file(path)
    assert result.status is SendStatus.SUCCESS, result.detail
    assert result.data["transcoded_from"] == syntax
    got = scp.dataset(0)
    assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(got.pixel_array, original.pixel_array)
    assert not list((tmp_path / "work").iterdir())  # the temporary file is gone


def test_compressed_bytes_go_unchanged_to_an_scp_that_accepts_them(scp_factory, senders, ct_files, tmp_path):
    path = _rle_file(tmp_path, ct_files)
    scp = scp_factory(transfer_syntaxes=[RLELossless, ExplicitVRLittleEndian])
    sender = senders(settings_for(scp))
    result = sender.send_file(path)
    assert result.status is SendStatus.SUCCESS
    assert "transcoded_from" not in result.data
    got = scp.dataset(0)
    assert got.file_meta.TransferSyntaxUID == RLELossless
    assert got.PixelData == dcmread(path).PixelData


def test_more_than_128_sop_classes_over_time(scp_factory, senders, ct_files, tmp_path):
    from pynetdicom.service_class import StorageServiceClass
    from pynetdicom.sop_class import register_uid

    uids = [f"1.2.826.0.1.3680043.8.498.77.{i}" for i in range(135)]
    for i, uid in enumerate(uids):
        register_uid(uid, f"IntuTestStorage{i}", StorageServiceClass)
    scp = scp_factory(extra_sop_classes=uids)
    sender = senders(settings_for(scp))
    base = dcmread(ct_files(1)[0])
    results = []
    for i, uid in enumerate(uids):
        base.SOPClassUID = base.file_meta.MediaStorageSOPClassUID = uid
        base.SOPInstanceUID = base.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = tmp_path / f"x{i}.dcm"
        base.save_as(path, enforce_file_format=True)
        results.append(sender.send_file(path))
    assert all(r.status is SendStatus.SUCCESS for r in results), {r.detail for r in results}
    assert all(a["contexts"] <= 128 for a in scp.associations)
    assert len(scp.received) == 135


def test_echo_reports_the_peer(scp_factory, senders):
    scp = scp_factory()
    echo = senders(settings_for(scp)).echo()
    assert echo.ok and echo.status == 0
    assert echo.their_ae_title == "TEST_SCP" and echo.our_ae_title == "INTU_SCU"
    assert echo.round_trip_ms is not None and echo.round_trip_ms < 1000
    assert echo.peer_max_pdu is not None and echo.implementation_class_uid


# -- TLS ---------------------------------------------------------------------------------------------
def _tls_scp(scp_factory, pki, cert="server", require_client=True):
    from intu_dicom_destination.shared.tls import TlsServerSettings, server_context

    ctx = server_context(TlsServerSettings(True, pki[cert], pki[f"{cert}_key"], pki["ca"], require_client))
    return scp_factory(ssl_context=ctx)


def _tls(pki, ca="ca", client=True) -> TlsClientSettings:
    return TlsClientSettings(
        enabled=True,
        ca_cert=pki[ca],
        client_cert=pki["client"] if client else None,
        client_key=pki["client_key"] if client else None,
    )


def test_mutual_tls(scp_factory, senders, ct_files, pki):
    scp = _tls_scp(scp_factory, pki)
    sender = senders(settings_for(scp, tls=_tls(pki)))
    results = [sender.send_file(f) for f in ct_files(3)]
    assert all(r.status is SendStatus.SUCCESS for r in results), [r.detail for r in results]
    assert sender.echo().tls


@pytest.mark.parametrize(
    ("server_cert", "ca", "host", "words"),
    [
        ("server", "other_ca", "127.0.0.1", "unknown CA"),
        ("expired", "ca", "127.0.0.1", "expired"),
        ("wrong_host", "ca", "127.0.0.1", "does not name the configured"),
        ("server", "ca", "localhost", None),  # DNS SAN works too
    ],
)
def test_tls_certificate_problems(scp_factory, senders, ct_files, pki, server_cert, ca, host, words):
    scp = _tls_scp(scp_factory, pki, cert=server_cert)
    sender = senders(settings_for(scp, host=host, tls=_tls(pki, ca=ca)))
    result = sender.send_file(ct_files(1)[0])
    if words is None:
        assert result.status is SendStatus.SUCCESS, result.detail
        return
    assert result.status is SendStatus.PERMANENT
    assert "TLS certificate verification" in result.detail and words in result.detail, result.detail
    assert f"{host}:{scp.port}" in result.detail


def test_tls_against_a_plain_tcp_peer(scp_factory, senders, ct_files, pki):
    scp = scp_factory()
    sender = senders(settings_for(scp, tls=_tls(pki), timeout_ms=3000))
    result = sender.send_file(ct_files(1)[0])
    assert not result.delivered
    assert "TLS handshake" in result.detail and f"127.0.0.1:{scp.port}" in result.detail, result.detail


@pytest.mark.parametrize(
    ("which", "words"),
    [
        ("bad_key", "not a PEM certificate and unencrypted PEM private key"),
        ("other_key", "does not match the certificate"),
        ("bad_ca", "not a PEM CA certificate"),
    ],
)
def test_unusable_tls_files_refuse_creation(senders, pki, tmp_path, which, words):
    # Not a permanent result per message (that dead-lettered the whole queue): the sender
    # cannot be created, so `intu serve` refuses to start with the reason.
    from intu_dicom_destination.shared.tls import TlsConfigError

    bad = tmp_path / "bad.pem"
    bad.write_text("not PEM")
    tls = {
        "bad_key": replace(_tls(pki), client_key=bad),
        "other_key": replace(_tls(pki), client_key=pki["server_key"]),
        "bad_ca": replace(_tls(pki), ca_cert=bad),
    }[which]
    culprit = {"bad_key": bad, "other_key": pki["server_key"], "bad_ca": bad}[which]
    with pytest.raises(TlsConfigError) as raised:
        senders(DestinationSettings(host="127.0.0.1", port=1, called_ae_title="X", tls=tls))
    text = str(raised.value)
    assert str(culprit) in text and words in text and "127.0.0.1:1" in text, text


def test_concurrent_senders_do_not_leak_associations(scp_factory, senders, ct_files):
    scp = scp_factory()
    sender = senders(settings_for(scp, max_associations=2))
    files = ct_files(8)
    threads = [threading.Thread(target=sender.send_file, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sender.open_associations <= 2
    sender.close()
    assert sender.open_associations == 0
    time.sleep(0.2)
    assert scp.active == 0


def test_tcp_nodelay_is_set(scp_factory, senders, ct_files):
    scp = scp_factory()
    sender = senders(settings_for(scp))
    assert sender.send_file(ct_files(1)[0]).delivered
    pooled = sender.pool.idle()[0]
    sock = pooled.assoc.dul.socket.socket
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


# -- the pool survives what it did not expect ---------------------------------------------------------
def _in_thread(call, timeout: float = 20.0):
    """``call()`` in a thread; fails the test if it has not returned within ``timeout``."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = call()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"hung for {timeout} s"
    if "error" in box:
        raise box["error"]
    return box["result"]


class _Surprise(Exception):
    pass


@pytest.fixture(params=["direct", "pynetdicom"])
def send_call(request, monkeypatch):
    """The call that sends one C-STORE, on each of the two ways: ``scu.direct`` (the usual one) and
    pynetdicom's (used when the direct way declines; here it always declines)."""
    from intu_dicom_destination.scu.direct import DirectStore, NotDirect
    from pynetdicom.association import Association

    if request.param == "pynetdicom":

        def decline(self, *args, **kwargs):
            raise NotDirect("declined by the test")

        monkeypatch.setattr(DirectStore, "store", decline)
        return Association, "send_c_store"
    return DirectStore, "store"


def test_an_unexpected_error_while_sending_gives_the_association_back(
    scp_factory, senders, ct_files, monkeypatch, send_call
):
    cls, name = send_call
    scp = scp_factory()
    sender = senders(settings_for(scp, max_associations=2, timeout_ms=3000))
    original = getattr(cls, name)
    failures = {"left": 3}  # max_associations + 1: each used to leak a pool slot, then a hang

    def flaky(self, *args, **kwargs):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise _Surprise("the unexpected")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, flaky)
    files = ct_files(6)
    for path in files[:3]:
        result = _in_thread(lambda path=path: sender.send_file(path))
        assert result.status is SendStatus.RETRYABLE, result.detail
        assert "unexpected error" in result.detail and "_Surprise: the unexpected" in result.detail
        assert result.data["sop_instance_uid"] == dcmread(path).SOPInstanceUID
        assert sender.open_associations == 0
    results = [_in_thread(lambda path=path: sender.send_file(path)) for path in files[3:]]
    assert all(r.status is SendStatus.SUCCESS for r in results), [r.detail for r in results]
    assert [r.sop_instance_uid for r in scp.received] == [dcmread(f).SOPInstanceUID for f in files[3:]]
    assert sender.open_associations == 1
    # The associations of the failed sends were aborted, not left open at the peer.
    deadline = time.monotonic() + 3
    while scp.active > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scp.active == 1


def test_an_interrupt_while_sending_is_raised_and_gives_the_association_back(
    scp_factory, senders, ct_files, monkeypatch, send_call
):
    cls, name = send_call
    scp = scp_factory()
    sender = senders(settings_for(scp, max_associations=1, timeout_ms=3000))
    original = getattr(cls, name)

    def interrupted(self, *args, **kwargs):
        monkeypatch.setattr(cls, name, original)
        raise KeyboardInterrupt

    monkeypatch.setattr(cls, name, interrupted)
    files = ct_files(2)
    with pytest.raises(KeyboardInterrupt):
        _in_thread(lambda: sender.send_file(files[0]))
    assert sender.open_associations == 0
    assert _in_thread(lambda: sender.send_file(files[1])).status is SendStatus.SUCCESS


def test_waiting_for_a_free_association_gives_up_after_timeout_ms(scp_factory, senders, ct_files):
    scp = scp_factory()
    sender = senders(settings_for(scp, max_associations=1, timeout_ms=500))
    path = ct_files(1)[0]
    meta = dcmread(path)
    held = sender.pool.checkout((str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID)))
    started = time.monotonic()
    result = _in_thread(lambda: sender.send_file(path), timeout=10)
    waited = time.monotonic() - started
    assert result.status is SendStatus.RETRYABLE
    assert "no association" in result.detail and "within 500 ms" in result.detail, result.detail
    assert 0.4 < waited < 5
    sender.pool.checkin(held)
    assert _in_thread(lambda: sender.send_file(path)).status is SendStatus.SUCCESS
    assert len(scp.associations) == 1


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (OSError(28, "No space left on device"), SendStatus.RETRYABLE),
        (ValueError("cannot encode"), SendStatus.PERMANENT),
    ],
)
def test_a_failed_transcode_write_leaves_no_temporary_file(
    scp_factory, senders, ct_files, tmp_path, monkeypatch, error, status
):
    from pydicom.dataset import Dataset

    path = _rle_file(tmp_path, ct_files)
    scp = scp_factory(transfer_syntaxes=UNCOMPRESSED_ONLY)
    work = tmp_path / "work"
    sender = senders(settings_for(scp), work_dir=work)

    def half_written(self, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 1000)
        raise error

    monkeypatch.setattr(Dataset, "save_as", half_written)
    result = sender.send_file(path)
    assert result.status is status, result.detail
    assert str(error.args[-1]) in result.detail
    assert list(work.iterdir()) == []
    assert scp.received == []


# -- lossless transfer-syntax changes keep the instance (issue 10, items 1 and 4) ---------------------
LOSSLESS_SAMPLES = {
    "rle": "MR_small_RLE.dcm",
    "jpeg-lossless": "SC_rgb_jpeg_gdcm.dcm",  # process 14, selection value 1
    "jpeg-ls-lossless": "MR_small_jpeg_ls_lossless.dcm",
    "jpeg2000-lossless": "MR_small_jp2klossless.dcm",
}
BIG_ENDIAN_SAMPLES = [
    "MR_small_bigendian.dcm",  # 16-bit OW pixels
    "rtdose_expb.dcm",  # 32-bit pixels, multi-frame
    "liver_expb_1frame.dcm",  # 1-bit OB pixels
    "ExplVR_BigEnd.dcm",  # 8-bit RGB in OB
    "SC_rgb_small_odd_big_endian.dcm",  # 8-bit RGB in OW: swapped by 16-bit words
]


def pydicom_sample(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom's bundled test file {name} is missing"
    return Path(path)


def assert_same_elements(sent, got, where: str = "") -> None:
    """Every element of ``sent`` is in ``got`` with the same value (compared as values, not
    bytes: the byte order may differ); sequences item by item. Pixel Data is compared by the
    caller (decoded), retired group lengths are not sent."""
    for elem in sent:
        if elem.tag == 0x7FE00010 or elem.tag.element == 0:
            continue
        assert elem.tag in got, f"{where}{elem.tag} missing"
        other = got[elem.tag]
        if elem.VR == "SQ":
            assert len(elem.value) == len(other.value), f"{where}{elem.tag}"
            for i, (a, b) in enumerate(zip(elem.value, other.value, strict=True)):
                assert_same_elements(a, b, f"{where}{elem.tag}[{i}].")
        else:
            assert elem.value == other.value, f"{where}{elem.tag} {elem.value!r} != {other.value!r}"


@pytest.mark.parametrize("sample", list(LOSSLESS_SAMPLES.values()), ids=list(LOSSLESS_SAMPLES))
def test_decompressing_for_an_uncompressed_only_peer_keeps_the_sop_instance_uid(
    scp_factory, senders, tmp_path, sample
):
    path = pydicom_sample(sample)
    original = dcmread(path)
    assert original.file_meta.TransferSyntaxUID.is_compressed
    scp = scp_factory(transfer_syntaxes=UNCOMPRESSED_ONLY)
    result = senders(settings_for(scp), work_dir=tmp_path / "work").send_file(path)
    assert result.status is SendStatus.SUCCESS, result.detail
    assert result.data["transcoded_from"] == original.file_meta.TransferSyntaxUID
    got = scp.dataset(0)
    assert scp.received[0].sop_instance_uid == original.SOPInstanceUID == got.SOPInstanceUID
    assert not got.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(got.pixel_array, original.pixel_array)  # lossless: the same values
    assert got.StudyInstanceUID == original.StudyInstanceUID and got.PatientID == original.PatientID


@pytest.mark.parametrize("sample", BIG_ENDIAN_SAMPLES)
def test_big_endian_is_converted_for_a_little_endian_only_peer(scp_factory, senders, tmp_path, sample):
    path = pydicom_sample(sample)
    original = dcmread(path)
    assert not original.file_meta.TransferSyntaxUID.is_little_endian
    scp = scp_factory(transfer_syntaxes=UNCOMPRESSED_ONLY)
    result = senders(settings_for(scp), work_dir=tmp_path / "work").send_file(path)
    assert result.status is SendStatus.SUCCESS, result.detail
    assert result.data["transfer_syntax"] in UNCOMPRESSED_ONLY
    got = scp.dataset(0)
    assert got.file_meta.TransferSyntaxUID.is_little_endian
    assert got.SOPInstanceUID == original.SOPInstanceUID
    assert_same_elements(original, got)
    assert np.array_equal(got.pixel_array, original.pixel_array)
    assert not list((tmp_path / "work").iterdir())


def test_binary_values_inside_sequences_are_swapped_by_their_vr(tmp_path):
    from intu_dicom_destination.scu.transcode import transcode_to
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRBigEndian

    ds = dcmread(pydicom_sample("MR_small_bigendian.dcm"))
    item = Dataset()
    item.add_new(0x00091010, "OF", np.array([1.5, -2.25], dtype=">f4").tobytes())
    item.add_new(0x00091011, "OD", np.array([3.125], dtype=">f8").tobytes())
    item.add_new(0x00091012, "OL", np.array([70000], dtype=">u4").tobytes())
    item.add_new(0x00091013, "OW", np.array([513, 2], dtype=">u2").tobytes())
    item.add_new(0x00091014, "OB", b"\x01\x02\x03\x04")
    item.add_new(0x00091015, "FD", [2.5, 7.0])
    item.add_new(0x00091016, "AT", [0x00100020])
    item.add_new(0x00091017, "SS", [-3])
    ds.add_new(0x00091001, "LO", "INTU TEST")
    ds.add_new(0x00091002, "SQ", [item])
    source = tmp_path / "be.dcm"
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.save_as(source, implicit_vr=False, little_endian=False, enforce_file_format=True)
    out = transcode_to(source, ExplicitVRLittleEndian, tmp_path / "work")  # keeps the private VRs
    got = dcmread(out)[0x00091002].value[0]
    assert np.frombuffer(got[0x00091010].value, "<f4").tolist() == [1.5, -2.25]
    assert np.frombuffer(got[0x00091011].value, "<f8").tolist() == [3.125]
    assert np.frombuffer(got[0x00091012].value, "<u4").tolist() == [70000]
    assert np.frombuffer(got[0x00091013].value, "<u2").tolist() == [513, 2]
    assert got[0x00091014].value == b"\x01\x02\x03\x04"  # OB: a byte stream, never swapped
    assert list(got[0x00091015].value) == [2.5, 7.0]
    assert got[0x00091016].value == 0x00100020 and got[0x00091017].value == -3
    assert dcmread(out).SOPInstanceUID == ds.SOPInstanceUID


def test_a_failed_conversion_says_what_was_tried(scp_factory, senders, tmp_path, monkeypatch):
    from intu_dicom_destination.scu import transcode

    def broken(ds, bits_allocated=None):
        raise ValueError("odd OW length")

    monkeypatch.setattr(transcode, "swap_binary_values", broken)
    scp = scp_factory(transfer_syntaxes=UNCOMPRESSED_ONLY)
    result = senders(settings_for(scp), work_dir=tmp_path / "work").send_file(
        pydicom_sample("MR_small_bigendian.dcm")
    )
    assert result.status is SendStatus.PERMANENT
    assert "converting Explicit VR Big Endian to" in result.detail and "odd OW length" in result.detail
    assert "decompressing" not in result.detail


# -- the peer stores none of the contexts (issue 10, item 7) ------------------------------------------
def test_a_peer_that_stores_no_context_for_the_sop_class_is_a_permanent_failure(
    scp_factory, senders, ct_files
):
    from pynetdicom import AE, evt

    # A PACS that stores MR images only: the CT's contexts are all rejected.
    ae = AE(ae_title="MR_ONLY")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.4")
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0)])
    try:
        sender = senders(
            DestinationSettings(host="127.0.0.1", port=port, called_ae_title="MR_ONLY", timeout_ms=5000)
        )
        result = sender.send_file(ct_files(1)[0])
    finally:
        server.shutdown()
    assert result.status is SendStatus.PERMANENT, result.detail
    assert "CT Image Storage" in result.detail and "1.2.840.10008.5.1.4.1.1.2" in result.detail
    assert "accepted none of the" in result.detail and "abstract syntax not supported" in result.detail
    assert "aborted" not in result.detail


def test_a_context_rejected_on_an_established_association_names_what_was_accepted(
    scp_factory, senders, ct_files, tmp_path
):
    scp = scp_factory()
    sender = senders(settings_for(scp))
    ct = ct_files(1)[0]
    assert sender.send_file(ct).status is SendStatus.SUCCESS
    ds = dcmread(ct)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.8.498.99"  # unknown
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    odd = tmp_path / "odd.dcm"
    ds.save_as(odd, enforce_file_format=True)
    result = sender.send_file(odd)
    assert result.status is SendStatus.PERMANENT, result.detail
    assert "1.2.826.0.1.3680043.8.498.99" in result.detail and "CT Image Storage" in result.detail
