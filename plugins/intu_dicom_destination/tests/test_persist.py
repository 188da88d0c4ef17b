"""``persist``: instances received by several associations at once are each made durable (file
fsynced, folder fsynced after its rename), the folder's fsync shared among them."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from intu_dicom_destination.scp.persist import persist
from pydicom.uid import ExplicitVRLittleEndian

from intu_core import fsutil


def test_concurrent_receptions_share_the_folder_fsync_that_covers_their_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, incoming = tmp_path / "spool", tmp_path / "incoming"
    spool.mkdir()
    incoming.mkdir()
    real_dir, real_file = fsutil.fsync_dir, fsutil.fsync_path
    release, entered = threading.Event(), threading.Event()
    folder_syncs: list[set[str]] = []
    file_syncs: list[str] = []

    def held_dir(directory: Path) -> None:
        folder_syncs.append(set(os.listdir(directory)))  # what this fsync covers
        if len(folder_syncs) == 1:
            entered.set()
            assert release.wait(30)
        real_dir(directory)

    def counted_file(path: Path) -> None:
        file_syncs.append(Path(path).name)
        real_file(path)

    monkeypatch.setattr(fsutil, "fsync_dir", held_dir)
    monkeypatch.setattr("intu_dicom_destination.scp.persist.fsync_path", counted_file)

    def receive(n: int) -> None:
        temp = incoming / f"{n}.tmp"
        temp.write_bytes(b"instance %d" % n)
        persist(temp, spool / f"{n}.dcm", ExplicitVRLittleEndian)

    first = threading.Thread(target=receive, args=(0,))
    first.start()
    assert entered.wait(30)  # association 0 is in its folder fsync
    others = [threading.Thread(target=receive, args=(n,)) for n in range(1, 5)]
    for t in others:
        t.start()
    group = fsutil._folder_syncs[os.path.abspath(spool)]
    deadline = time.monotonic() + 30
    while group.waiting < 5:  # all four renamed and wait for a folder fsync
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)
    release.set()
    for t in [first, *others]:
        t.join(30)
    names = {f"{n}.dcm" for n in range(5)}
    assert set(os.listdir(spool)) == names and not os.listdir(incoming)
    assert all((spool / f"{n}.dcm").read_bytes() == b"instance %d" % n for n in range(5))
    assert sorted(file_syncs) == sorted(names)  # every file fsynced on its own
    assert len(folder_syncs) == 2 and folder_syncs[1] == names  # the folder: twice for five


def test_begin_persist_moves_at_once_and_its_wait_reports_a_failed_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is in place on return (the source checks it meanwhile); the wait raises the
    fsync's error, which the source answers as it answers any failure to store."""
    import errno

    from intu_dicom_destination.scp import persist as module

    temp, final = tmp_path / "t.dcm", tmp_path / "spool" / "f.dcm"
    final.parent.mkdir()
    temp.write_bytes(b"instance")
    started = threading.Event()
    release = threading.Event()

    def slow_failing_fsync(path: Path) -> None:
        started.set()
        assert release.wait(30)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(module, "fsync_path", slow_failing_fsync)
    wait = module.begin_persist(temp, final, ExplicitVRLittleEndian)
    assert final.read_bytes() == b"instance" and not temp.exists()  # moved before the sync ended
    assert started.wait(30)
    release.set()
    with pytest.raises(OSError, match="Input/output error"):
        wait()


def test_a_forked_child_persists_with_syncer_threads_of_its_own(tmp_path: Path) -> None:
    """The fsyncs run in threads started on first use; a child forked after that (it has none of
    them) starts its own instead of waiting forever on the parent's queue."""
    persist(_temp(tmp_path, "parent"), tmp_path / "parent.dcm", ExplicitVRLittleEndian)
    temp = _temp(tmp_path, "child")
    pid = os.fork()
    if pid == 0:  # the child: exit 0 once persisted; the alarm ends a hang
        signal.alarm(30)
        try:
            persist(temp, tmp_path / "child.dcm", ExplicitVRLittleEndian)
        finally:
            os._exit(0 if (tmp_path / "child.dcm").exists() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (tmp_path / "child.dcm").read_bytes() == b"child"


def _temp(folder: Path, name: str) -> Path:
    temp = folder / f"{name}.tmp"
    temp.write_bytes(name.encode())
    return temp


def test_a_copy_across_filesystems_leaves_nothing_at_the_temporary_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver deletes the temporary file only when the source did not move it (it tells it
    with ``StoreRequest.moved``): so ``persist`` must leave nothing behind, copy or not."""
    import errno

    from intu_dicom_destination.scp import persist as module

    temp = _temp(tmp_path, "instance")
    replace = os.replace

    def cross_device(src: object, dst: object) -> None:  # (os is shared: others' moves go on)
        if src != temp:
            return replace(src, dst)  # type: ignore[arg-type]
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(module.os, "replace", cross_device)
    persist(temp, tmp_path / "f.dcm", ExplicitVRLittleEndian)
    assert (tmp_path / "f.dcm").read_bytes() == b"instance" and not temp.exists()
