"""`intu dicom send` starts with less work (``shared.imports``) and looks at its files in a child
process while it imports pynetdicom (``cli.lookahead``); what it sends and refuses is unchanged."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import pytest
from intu_dicom_destination.body.rawscan import Scanned, scan
from intu_dicom_destination.cli import lookahead
from intu_dicom_destination.cli.lookahead import Lookahead
from intu_dicom_destination.testing import INTEROP_ENV, intu_command, write_router_project
from pydicom import dcmread


def _run(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_the_files_are_listed_and_looked_at_before_pydicom_is_imported() -> None:
    out = _run(
        "import sys\n"
        "import intu_dicom_destination.cli.files, intu_dicom_destination.cli.lookahead\n"
        "print(sorted(m for m in ('pydicom', 'pynetdicom', 'numpy') if m in sys.modules))\n"
    )
    assert out.strip() == "[]"


def test_the_body_package_imports_each_name_from_its_module_when_first_used() -> None:
    """``body/__init__`` is lazy (PEP 562), so that the raw walk comes without pydicom; every name
    it exports is still there, the same object as in its module."""
    out = _run(
        "import sys\n"
        "import intu_dicom_destination.body as body\n"
        "assert 'pydicom' not in sys.modules\n"
        "from intu_dicom_destination.body import model, part10, deflate\n"
        "for name in body.__all__:\n"
        "    home = next(m for m in (model, part10, deflate) if hasattr(m, name))\n"
        "    assert getattr(body, name) is getattr(home, name), name\n"
        "try:\n"
        "    body.no_such_name\n"
        "except AttributeError:\n"
        "    print('ok')\n"
    )
    assert out.strip() == "ok"


def test_send_imports_restores_what_it_changes_and_defers_the_download_helpers() -> None:
    out = _run(
        # requests is optional for pydicom (CI's venv has none): deferred where it is installed.
        # (Looked for before: find_spec reads __spec__, which would load a deferred module.)
        "from importlib.util import find_spec\n"
        "present = [m for m in ('requests', 'tqdm') if find_spec(m) is not None]\n"
        "import gc, os, sys\n"
        "from intu_dicom_destination.shared.imports import send_imports\n"
        "with send_imports():\n"
        "    import pydicom.config\n"
        "    assert not gc.isenabled()\n"
        "    assert pydicom.config.settings.reading_validation_mode == pydicom.config.IGNORE\n"
        "    from intu_dicom_destination.cli.send import run_send\n"
        "assert gc.isenabled() and gc.get_freeze_count() > 0\n"
        "assert pydicom.config.settings.reading_validation_mode == pydicom.config.WARN\n"
        "assert os.environ['OPENBLAS_NUM_THREADS'] == '1'\n"
        # Not executed: deferred (a _LazyModule) if pydicom imported them, else not imported.
        # Without requests, pydicom subclasses tqdm's bar at import (pydicom.data.download).
        "loaded = [m for m in present if type(sys.modules.get(m)).__name__ == 'module']\n"
        "assert loaded == ([] if 'requests' in present else ['tqdm']), loaded\n"
        "from tqdm import tqdm\n"  # still works on first use
        "assert callable(tqdm)\n"
        # pydicom's samples and its legacy pylibjpeg handler: deferred, and there when used.
        "for name in ('pydicom.examples', 'pydicom.pixel_data_handlers.pylibjpeg_handler'):\n"
        "    assert type(sys.modules[name]).__name__ == '_LazyModule', name\n"
        "import pydicom.examples\n"
        "assert pydicom.examples.get_path('ct').name == 'CT_small.dcm'\n"
        "assert 'pylibjpeg' in [h.HANDLER_NAME for h in pydicom.config.pixel_data_handlers]\n"
        "from importlib import metadata\n"
        "assert metadata.entry_points.__module__ == 'importlib.metadata'\n"  # put back
        "print('ok')\n"
    )
    assert out.strip() == "ok"


def test_entry_points_are_read_once_inside_the_block_with_the_same_answers() -> None:
    out = _run(
        "from importlib import metadata\n"
        "from intu_dicom_destination.shared.imports import entry_points_read_once\n"
        "groups = ('intu', 'console_scripts', 'pylibjpeg.pixel_data_decoders', 'no.such.group')\n"
        "before = {g: metadata.entry_points(group=g) for g in groups}\n"
        "read = metadata.distributions\n"
        "calls = []\n"
        "metadata.distributions = lambda **kw: calls.append(1) or read(**kw)\n"
        "with entry_points_read_once():\n"
        "    inside = {g: metadata.entry_points(group=g) for g in groups}\n"
        "    named = metadata.entry_points(group='intu', name='dicom')\n"
        "assert calls == [1], calls\n"
        "assert inside == before, (inside, before)\n"
        "assert list(named) == [ep for ep in before['intu'] if ep.name == 'dicom']\n"
        "metadata.entry_points(group='intu')\n"  # after the block: read again, as before
        "assert calls == [1, 1], calls\n"
        "print('ok')\n"
    )
    assert out.strip() == "ok"


@pytest.fixture
def forking(monkeypatch):
    """Fork even if an earlier test left a thread behind (the child only reads files)."""
    monkeypatch.setattr(lookahead, "can_fork", lambda: True)


def test_the_lookahead_finds_what_the_worker_would_and_leaves_the_rest_to_it(
    ct_files, tmp_path, forking
) -> None:
    files = ct_files(9)
    folder = files[0].parent
    notes = folder / "notes.txt"
    notes.write_text("not DICOM")
    truncated = folder / "truncated.dcm"
    truncated.write_bytes(files[0].read_bytes()[:-1000])
    gone = folder / "gone.dcm"
    paths = [*files, notes, truncated, gone]
    ahead = Lookahead.start(paths)
    assert ahead is not None
    found = ahead.results(wait_s=60)  # the command never waits; here the child must finish
    assert len(found) == len(paths)
    for path, item in zip(files, found, strict=False):
        full = scan(path)
        assert isinstance(item, Scanned) and full is not None
        assert (item.sop_class_uid, item.sop_instance_uid, item.transfer_syntax_uid) == (
            full.sop_class_uid,
            full.sop_instance_uid,
            full.transfer_syntax_uid,
        )
        assert item.sop_instance_uid == str(dcmread(path).SOPInstanceUID)
    assert found[len(files) :] == [None, None, None]  # the workers look again and say why


def test_a_few_files_are_not_worth_a_process(ct_files, forking) -> None:
    assert Lookahead.start(ct_files(2)) is None


def test_the_parent_never_waits_for_the_lookahead(ct_files, monkeypatch, forking) -> None:
    monkeypatch.setattr(lookahead, "scan", lambda path: time.sleep(3600))  # in the child only
    ahead = Lookahead.start(ct_files(8))
    assert ahead is not None
    found: list[object] = []
    taker = threading.Thread(target=lambda: found.extend(ahead.results()))
    taker.start()
    taker.join(60)
    assert not taker.is_alive()
    assert found == [None] * 8


def test_no_lookahead_when_the_system_cannot_fork_and_nothing_leaks(ct_files, monkeypatch, forking) -> None:
    """It only saves time: a failed fork (no memory, no process left) means the workers look at
    every file themselves, as without it, and both ends of its pipe are closed."""
    import os

    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    files = ct_files(8)
    before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(lookahead.os, "fork", no_fork)
    assert Lookahead.start(files) is None
    assert set(os.listdir("/proc/self/fd")) == before


def test_the_lookahead_child_is_reaped_even_when_sigchld_is_ignored(ct_files, forking) -> None:
    """A runner may start us with SIGCHLD ignored: the kernel reaps the child, and waiting for
    it must not fail the command."""
    import signal

    files = ct_files(8)
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        ahead = Lookahead.start(files)
        assert ahead is not None
        found = ahead.results(wait_s=30)
    finally:
        signal.signal(signal.SIGCHLD, previous)
    assert all(isinstance(item, Scanned) for item in found)


def test_intu_dicom_send_to_storescp_sends_checks_and_refuses_as_before(storescp, ct_files, tmp_path) -> None:
    peer = storescp()
    files = ct_files(12)
    folder = files[0].parent
    (folder / "README.txt").write_text("not DICOM")
    truncated = folder / "truncated.dcm"
    truncated.write_bytes(files[0].read_bytes()[:-1000])
    project = write_router_project(
        tmp_path / "project", router_port=None, pacs_port=peer.port, pacs_ae=peer.ae_title, queue=None
    )
    res = subprocess.run(
        intu_command(project, "dicom", "send", "hospital-pacs", str(folder)),
        capture_output=True, text=True, timeout=120, env=INTEROP_ENV,
    )  # fmt: skip
    assert res.returncode == 1, res.stdout + res.stderr
    assert re.search(
        r"sent 12 of 13 .*: 12 ok, 0 with warnings, 1 failed, 1 non-DICOM files skipped", res.stdout
    )
    assert f"FAILED (permanent): {truncated}: not sent: truncated" in res.stdout, res.stdout
    assert f"skipped {folder / 'README.txt'}: not a DICOM Part-10 file" in res.stdout, res.stdout
    # Verified on the peer's side: every instance with its UIDs and pixel data as sent.
    deadline = time.monotonic() + 15
    while len(list(peer.folder.glob("*"))) < len(files) and time.monotonic() < deadline:
        time.sleep(0.05)
    arrived = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, peer.folder.glob("*"))}
    originals = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, files)}
    assert set(arrived) == set(originals)
    for uid, ds in arrived.items():
        assert ds.SOPClassUID == originals[uid].SOPClassUID
        assert ds.PixelData == originals[uid].PixelData


# `intu dicom send` as the console script runs it, with two probes: what was imported and executed
# (written by an atexit handler, which still runs) and whether the interpreter's teardown ran.
SEND_PROBE = """
import atexit, os, sys
from intu_core.cli import main

class Teardown:
    def __del__(self):
        os.write(2, b"teardown\\n")

def dump(path=sys.argv[1]):
    with open(path, "w") as out:
        # (type(), not an attribute: that would execute a deferred module)
        out.write("\\n".join(n for n, m in sys.modules.items() if type(m).__name__ != "_LazyModule"))

keep = Teardown()
atexit.register(dump)
sys.argv = ["intu", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize("count", [1, 3])  # one file: threads in this process; three: workers
def test_intu_dicom_send_imports_no_queue_or_history_commands_and_ends_at_once(
    storescp, ct_files, tmp_path, count
) -> None:
    peer = storescp()
    files = ct_files(count)
    project = write_router_project(
        tmp_path / "project", router_port=None, pacs_port=peer.port, pacs_ae=peer.ae_title, queue=None
    )
    modules = tmp_path / "modules.txt"
    args = ["--dir", str(project), "dicom", "send", "hospital-pacs", *map(str, files)]
    res = subprocess.run(
        [sys.executable, "-c", SEND_PROBE, str(modules), *args],
        capture_output=True, text=True, timeout=120, env=INTEROP_ENV,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.fullmatch(rf"sent {count} of {count} .*: {count} ok, 0 with warnings, 0 failed\n", res.stdout)
    assert "teardown" not in res.stderr, res.stderr  # ended with os._exit, output complete
    loaded = set(modules.read_text().split())
    assert {"pydicom", "pynetdicom", "intu_core.cli"} <= loaded
    assert not loaded & {"intu_core.queue.commands", "intu_core.history_commands", "pydicom.examples"}
    deadline = time.monotonic() + 15
    while len(list(peer.folder.glob("*"))) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    arrived = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, peer.folder.glob("*"))}
    originals = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, files)}
    assert set(arrived) == set(originals)
    for uid, ds in arrived.items():
        assert ds.PixelData == originals[uid].PixelData


def test_intu_dicom_send_refusals_keep_their_message_and_status(tmp_path) -> None:
    project = write_router_project(tmp_path / "project", router_port=None, pacs_port=1, queue=None)
    res = subprocess.run(
        intu_command(project, "dicom", "send", "no-such-destination", str(tmp_path)),
        capture_output=True, text=True, timeout=120, env=INTEROP_ENV,
    )  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stdout == ""
    assert (
        res.stderr.startswith("Usage: ") and "Error: " in res.stderr and "no-such-destination" in res.stderr
    )
