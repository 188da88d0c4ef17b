"""`intu dicom send` looks at each file in the worker that sends it (cli/files.py, cli/workers.py):
non-DICOM files are skipped there, the others arrive with their own UIDs and bytes; a worker done
with its own files takes the last ones of a slower worker, and each file is sent once."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

from intu_dicom_destination.cli import workers
from intu_dicom_destination.cli.files import look, walk
from intu_dicom_destination.cli.send import run_send
from intu_dicom_destination.scu.sender import DicomSender
from intu_dicom_destination.scu.settings import DestinationSettings
from pydicom import dcmread

from intu_core.message import SendStatus


def _settings(peer, **kw) -> DestinationSettings:
    return DestinationSettings(
        host="127.0.0.1", port=peer.port, called_ae_title=peer.ae_title, timeout_ms=10000, **kw
    )


def _received(folder: Path, count: int) -> dict[str, bytes]:
    """SOP Instance UID -> pixel data of what the peer stored, once ``count`` files are there."""
    deadline = time.monotonic() + 15
    while len(list(folder.glob("*"))) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    got = {}
    for path in folder.glob("*"):
        ds = dcmread(path)
        got[str(ds.SOPInstanceUID)] = ds.PixelData
    return got


def test_forked_workers_look_at_their_own_files_and_skip_what_is_not_dicom(storescp, ct_files):
    peer = storescp()
    files = ct_files(6)
    notes = files[0].parent / "notes.txt"
    notes.write_text("not DICOM")
    paths = list(walk([files[0].parent]))
    assert notes in paths and len(paths) == 7
    reported: dict[int, tuple[SendStatus | None, str]] = {}
    workers.send_all(
        _settings(peer, max_associations=2),
        [(path, None) for path in paths],
        lambda i, status, detail: reported.__setitem__(i, (status, detail)),
        processes=True,
        cpus=2,
    )
    assert sorted(reported) == list(range(7))
    status, detail = reported[paths.index(notes)]
    assert status is None and "not a DICOM Part-10 file" in detail
    assert {reported[i][0] for i, path in enumerate(paths) if path != notes} == {SendStatus.SUCCESS}
    # Verified on the peer's side: every instance, its UID and its pixel data as sent.
    sent = {str(ds.SOPInstanceUID): ds.PixelData for ds in (dcmread(f) for f in files)}
    assert _received(peer.folder, len(files)) == sent


def test_a_folder_with_nothing_to_send_sends_nothing_and_exits_2(storescp, tmp_path):
    peer = storescp()
    (tmp_path / "a.txt").write_text("no")
    (tmp_path / "b.bin").write_bytes(b"\0" * 200)
    out = io.StringIO()
    assert run_send(_settings(peer), [tmp_path], out, progress=False, associations=2) == 2
    text = out.getvalue()
    assert "skipped" in text and "a.txt" in text and "b.bin" in text
    assert "nothing to send" in text
    assert list(peer.folder.glob("*")) == []


def test_look_says_what_a_file_is(ct_files, tmp_path):
    (path,) = ct_files(1)
    looked = look(path)
    assert not isinstance(looked, str) and looked.sop_instance_uid == str(dcmread(path).SOPInstanceUID)
    missing = look(tmp_path / "gone.dcm")
    assert isinstance(missing, str) and missing.startswith("cannot read it")


def _sent_by(log: Path) -> dict[int, list[int]]:
    """Worker number -> the file indexes it sent, from the lines the patched sender appended."""
    by: dict[int, list[int]] = {}
    for line in log.read_text().split():
        worker, index = map(int, line.split(":"))
        by.setdefault(worker, []).append(index)
    return by


def _worker_number(started: Path) -> int:
    """In a forked worker: its number; worker 1 waits (bounded) until worker 2 has claimed a file
    (``started`` exists), so that what it may take does not depend on who the scheduler ran first."""
    worker = workers._claims.worker if workers._claims is not None else 0
    if worker == 2:
        started.touch()
    deadline = time.monotonic() + 30
    while worker == 1 and not started.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return worker


def _send_in_two_workers(peer, files) -> dict[int, tuple[SendStatus | None, str]]:
    """``files`` sent by two forked worker processes; what each file's report said."""
    reported: dict[int, tuple[SendStatus | None, str]] = {}
    workers.send_all(
        _settings(peer, max_associations=2),
        [(path, None) for path in files],
        lambda i, status, detail: reported.__setitem__(i, (status, detail)),
        processes=True,
        cpus=2,
    )
    return reported


def test_a_worker_done_with_its_files_takes_the_last_ones_of_a_slower_worker(
    storescp, ct_files, tmp_path, monkeypatch
):
    peer = storescp()
    files = ct_files(10)
    log = tmp_path / "sent-by.txt"
    real = DicomSender.send_file
    index_of = {path: i for i, path in enumerate(files)}

    def send_file(self, path, *args):
        worker = _worker_number(tmp_path / "started")
        if worker == 2:
            time.sleep(0.3)  # a slow association: worker 1 ends its own files long before
        with log.open("a") as out:
            out.write(f"{worker}:{index_of[path]}\n")
        return real(self, path, *args)

    monkeypatch.setattr(DicomSender, "send_file", send_file)
    reported = _send_in_two_workers(peer, files)
    assert reported == {i: (SendStatus.SUCCESS, reported[i][1]) for i in range(10)}
    by = _sent_by(log)
    assert sorted(by[1] + by[2]) == list(range(10))  # each file sent once, by one worker
    assert len(by[1]) > 5 and set(by[1]) & {1, 3, 5, 7, 9}  # worker 1 took some of worker 2's files
    sent = {str(ds.SOPInstanceUID): ds.PixelData for ds in (dcmread(f) for f in files)}
    assert _received(peer.folder, len(files)) == sent


def test_a_worker_that_dies_after_it_started_fails_only_the_file_it_had(
    storescp, ct_files, tmp_path, monkeypatch
):
    peer = storescp()
    files = ct_files(6)
    real = DicomSender.send_file

    def send_file(self, path, *args):
        if _worker_number(tmp_path / "started") == 2:
            os._exit(3)  # killed while it sends its first file (file 1)
        return real(self, path, *args)

    monkeypatch.setattr(DicomSender, "send_file", send_file)
    reported = _send_in_two_workers(peer, files)
    assert sorted(reported) == list(range(6))
    status, detail = reported[1]
    assert status is SendStatus.RETRYABLE and "worker process 2 ended unexpectedly (exit code 3)" in detail
    # Its other files were taken by worker 1 and delivered: failed, never lost, never sent twice.
    assert {i for i, (s, _) in reported.items() if s is SendStatus.SUCCESS} == {0, 2, 3, 4, 5}
    sent = {str(ds.SOPInstanceUID): ds.PixelData for i, ds in enumerate(map(dcmread, files)) if i != 1}
    assert _received(peer.folder, 5) == sent


def test_claims_never_send_a_file_twice_even_when_the_lock_times_out(monkeypatch):
    """A claim that cannot be recorded (the lock held by a worker killed or stopped meanwhile)
    sends nothing: the file is reported not sent rather than risk a second worker sending it."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    entries = [(i, (Path(f"f{i}.dcm"), None)) for i in range(4)]
    parts = [entries[0::2], entries[1::2]]
    claims = workers._Claims(ctx, parts, 4)
    claims.worker = 2
    assert claims.claim(1)  # worker 2 claimed file 1 (of its own), then held the lock (stopped)
    claims._lock.acquire()
    monkeypatch.setattr(workers, "_LOCK_TIMEOUT_S", 0.01)
    claims.worker = 1
    assert claims.spare() == [entries[3], entries[1]]  # worker 2 had started
    assert not claims.claim(0) and not claims.claim(3)  # not recorded: not sent, even its own
    claims._lock.release()  # worker 2 goes on: what no one recorded is claimed once
    claims.worker = 2
    assert claims.claim(3) and not claims.claim(1)
    claims.worker = 1
    assert claims.claim(0) and not claims.claim(3)
    assert [claims.claimer(i) for i in range(4)] == [1, 2, 0, 2]


def test_the_send_commands_sender_polls_its_idle_association_at_pynetdicoms_default(scp_factory, ct_files):
    # So that the release at the end waits ~1 ms per DUL step instead of 20 ms; the release is
    # still a release, seen by the peer.
    from intu_dicom_destination.internals import poll_delay
    from intu_dicom_destination.scu import pool

    scp = scp_factory()
    sender = DicomSender(_settings(scp), idle_poll_s=pool.SENDING_DUL_DELAY)
    try:
        for path in ct_files(2):
            assert sender.send_file(path).status is SendStatus.SUCCESS
        (pooled,) = sender.pool._idle
        assoc = pooled.assoc
        assert poll_delay(assoc) == pool.SENDING_DUL_DELAY
    finally:
        sender.close()
    assoc.join(5)
    assert assoc.is_released and not assoc.dul.is_alive()
    assert len(scp.received) == 2
