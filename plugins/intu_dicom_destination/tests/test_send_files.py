"""`intu dicom send` looks at each file in the worker that sends it (cli/files.py, cli/workers.py):
non-DICOM files are skipped there, the others arrive with their own UIDs and bytes."""

from __future__ import annotations

import io
import time
from pathlib import Path

from intu_dicom_destination.cli import workers
from intu_dicom_destination.cli.files import look, walk
from intu_dicom_destination.cli.send import run_send
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
