"""Shared fsyncs (``intu_core.fsutil.GroupSync``, ``fsync_dir_shared``): every caller returns only
after a sync that started after its call, concurrent callers share one, failures are each caller's.
And ``start_writeback``, the hint before such an fsync."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from intu_core import fsutil
from intu_core.fsutil import GroupSync, fsync_dir_shared


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class HeldSync:
    """A sync whose first run waits until released; counts runs and what each saw."""

    def __init__(self, fail_run: int = 0) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.runs = 0
        self.fail_run = fail_run
        self.seen: list[set[int]] = []
        self.written: set[int] = set()

    def __call__(self) -> None:
        self.runs += 1
        self.seen.append(set(self.written))
        if self.runs == 1:
            self.entered.set()
            assert self.release.wait(30)
        if self.runs == self.fail_run:
            raise OSError(5, "Input/output error")


def start(target: Callable[[], None], n: int) -> list[threading.Thread]:
    threads = [threading.Thread(target=target) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def test_a_lone_caller_runs_the_sync_at_once_each_time() -> None:
    runs: list[int] = []
    group = GroupSync(lambda: runs.append(1))
    for _ in range(3):
        group()
    assert len(runs) == 3 and group.runs == 3 and group.waiting == 0


def test_callers_arriving_during_a_sync_share_the_next_one_which_covers_their_writes() -> None:
    sync = HeldSync()
    group = GroupSync(sync)
    first = start(group, 1)
    assert sync.entered.wait(30)  # run 1 is in progress: it may have started before their writes
    callers = 6
    done: list[int] = []

    def writer(n: int) -> None:
        sync.written.add(n)
        group()
        done.append(n)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(callers)]
    for t in threads:
        t.start()
    wait_for(lambda: group.waiting == callers + 1)
    assert done == []  # nobody returns on a run that started before it wrote
    sync.release.set()
    for t in [*first, *threads]:
        t.join(30)
    assert sorted(done) == list(range(callers))
    assert sync.runs == 2  # one run for all six
    assert sync.seen[1] == set(range(callers))


def test_a_failed_sync_raises_in_every_caller_it_covered_and_the_next_caller_syncs_anew() -> None:
    sync = HeldSync(fail_run=2)
    group = GroupSync(sync)
    first = start(group, 1)
    assert sync.entered.wait(30)
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            group()
        except OSError as exc:
            errors.append(exc)

    threads = start(caller, 4)
    wait_for(lambda: group.waiting == 5)
    sync.release.set()
    for t in [*first, *threads]:
        t.join(30)
    assert len(errors) == 4 and all(e.errno == 5 for e in errors)
    group()  # run 3 succeeds: a later caller is not handed an old error
    assert sync.runs == 3 and group.waiting == 0


def test_files_renamed_into_a_folder_at_once_share_its_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = fsutil.fsync_dir
    release = threading.Event()
    entered = threading.Event()
    synced: list[set[str]] = []

    def held(directory: Path) -> None:
        synced.append(set(os.listdir(directory)))
        if len(synced) == 1:
            entered.set()
            assert release.wait(30)
        real(directory)

    monkeypatch.setattr(fsutil, "fsync_dir", held)
    folder = tmp_path / "spool"
    folder.mkdir()

    def receive(name: str) -> None:
        temp = tmp_path / f"{name}.tmp"
        temp.write_bytes(b"DICM")
        os.replace(temp, folder / name)
        fsync_dir_shared(folder)

    first = threading.Thread(target=receive, args=("0.dcm",))
    first.start()
    assert entered.wait(30)
    names = [f"{n}.dcm" for n in range(1, 6)]
    threads = [threading.Thread(target=receive, args=(name,)) for name in names]
    for t in threads:
        t.start()
    group = fsutil._folder_syncs[os.path.abspath(folder)]
    wait_for(lambda: group.waiting == 6)
    release.set()
    for t in [first, *threads]:
        t.join(30)
    assert len(synced) == 2  # six renames, two fsyncs of the folder
    assert set(names) <= synced[1]  # the second started after every rename it covers


def test_a_forked_child_does_not_wait_for_a_sync_its_parent_was_running(tmp_path: Path) -> None:
    held = threading.Event()
    release = threading.Event()

    def slow(directory: Path) -> None:
        held.set()
        assert release.wait(30)

    folder = tmp_path / "spool"
    folder.mkdir()
    original = fsutil.fsync_dir
    fsutil.fsync_dir = slow
    try:
        leader = threading.Thread(target=fsync_dir_shared, args=(folder,))
        leader.start()
        assert held.wait(30)
        pid = os.fork()
        if pid == 0:  # the child: its own sync, not the parent's run that will never end here
            fsutil.fsync_dir = original
            try:
                fsync_dir_shared(folder)
            finally:
                os._exit(0)
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the child waited for its parent's sync")
            time.sleep(0.01)
        release.set()
        leader.join(30)
    finally:
        fsutil.fsync_dir = original
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_start_writeback_calls_sync_file_range_and_changes_nothing(tmp_path: Path) -> None:
    """The hint the DICOM source gives while a dataset arrives: on Linux it really reaches
    ``sync_file_range`` (not a silent no-op), the file is unchanged, and a bad descriptor is
    ignored (the fsync that follows reports real errors)."""
    call = fsutil._sync_file_range()
    assert call is not None
    path = tmp_path / "instance.dcm"
    data = os.urandom(300 * 1024)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        assert call(fh.fileno(), 0, 0, fsutil.SYNC_FILE_RANGE_WRITE) == 0  # the kernel took it
        fsutil.start_writeback(fh.fileno())
        os.fsync(fh.fileno())
    assert path.read_bytes() == data
    fsutil.start_writeback(-1)  # EBADF: ignored
