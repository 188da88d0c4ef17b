"""A queue that knows what it holds (issue 11), with real processes: `intu serve` as a child
process, a pynetdicom modality, DCMTK storescp as the PACS.

Thirty instances are acknowledged while the PACS is down, so they wait in the queue; then the queue
database is lost or damaged, or the project is moved. Whatever happened, no instance file is
deleted: a damaged database stops the start with what to do, a lost one has its files moved to
quarantine, and `intu queue recover` brings them back. The proof is on the PACS's side: the 30 SOP
Instance UIDs that were acknowledged arrive, with the pixel data that was sent.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pydicom
import pytest
from intu_dicom_destination.testing import (
    IntuProcess,
    Peer,
    Scp,
    free_port,
    intu_command,
    wait_until,
    write_ct_series,
    write_router_project,
)
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

COUNT = 30
CHANNEL = "dicom-router"
SERVE_ENV = {"TCP_NODELAY": "1"}


def send(port: int, files: list[Path]) -> list[str]:
    """A modality sends ``files`` over one association; the SOP Instance UIDs answered 0x0000."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="INTU_SCP")
    assert assoc.is_established
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    acked = []
    try:
        for path in files:
            ds = pydicom.dcmread(path)
            status = assoc.send_c_store(ds)
            if "Status" in status and int(status.Status) == 0:
                acked.append(str(ds.SOPInstanceUID))
    finally:
        assoc.release()
    return acked


def spooled(project: Path) -> list[Path]:
    folder = project / "data" / "spool" / CHANNEL
    return sorted(folder.glob("*.dcm")) if folder.is_dir() else []


def quarantined(project: Path) -> list[Path]:
    folder = project / "data" / "quarantine"
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def arrived(peer: Peer) -> dict[str, bytes]:
    """SOP Instance UID -> pixel data of what the PACS stored."""
    got = {}
    for path in peer.folder.iterdir():
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # a file storescp is still writing
            continue
        got[str(ds.SOPInstanceUID)] = ds.PixelData
    return got


class Router(NamedTuple):
    """A router project, the port its DICOM source listens on, and what was acknowledged to the
    modality: the pixel data sent for each SOP Instance UID."""

    project: Path
    port: int
    sent: dict[str, bytes]


@pytest.fixture
def acknowledged(tmp_path: Path) -> Iterator[Router]:
    """A router project whose queue holds 30 acknowledged instances for a PACS that is down
    (`intu serve` stopped again)."""
    files = write_ct_series(tmp_path / "series", COUNT, size_kib=16)
    router_port = free_port()
    project = write_router_project(
        tmp_path / "router",
        router_port=router_port,
        pacs_port=free_port(),  # nothing listens there: everything waits in the queue
        retry="{max_attempts: 0, backoff: constant, initial_delay_ms: 500, max_delay_ms: 500}",
    )
    with IntuProcess(project, env=SERVE_ENV) as engine:
        engine.start(router_port)
        acked = send(router_port, files)
        assert engine.stop() == 0
    assert len(acked) == COUNT
    assert len(spooled(project)) == COUNT
    sent = {str(ds.SOPInstanceUID): ds.PixelData for ds in map(pydicom.dcmread, files)}
    assert set(sent) == set(acked)
    yield Router(project, router_port, sent)


def point_at(project: Path, peer: Peer) -> None:
    """The PACS is back, at ``peer``'s port (the queue keeps no address: only intu.yaml changes)."""
    config = project / "intu.yaml"
    lines = config.read_text().splitlines()
    config.write_text(
        "\n".join(f"      port: {peer.port}" if "port:" in line else line for line in lines) + "\n"
    )
    config.write_text(
        config.read_text().replace("called_ae_title: PACS", f"called_ae_title: {peer.ae_title}")
    )


def serve_and_deliver(
    router: Router, project: Path, peer: Peer, then: Callable[[IntuProcess], None] = lambda _: None
) -> None:
    """`intu serve` on ``project`` (``then`` runs once it listens) until everything acknowledged
    is at ``peer``, checked by SOP Instance UID and pixel data."""
    sent = router.sent
    with IntuProcess(project, env=SERVE_ENV) as engine:
        engine.start(router.port)
        then(engine)
        delivered = wait_until(lambda: set(arrived(peer)) >= set(sent), timeout=90)
        got = arrived(peer)
        assert delivered, f"{len(set(got) & set(sent))} of {COUNT} arrived; log:\n{engine.log_text()[-3000:]}"
        assert engine.stop() == 0
    assert {uid: got[uid] for uid in sent} == sent  # each acknowledged instance, its pixels untouched
    assert "Traceback" not in engine.log_text()


@pytest.mark.interop
@pytest.mark.parametrize("loss", ["missing", "zero-length"])
def test_a_lost_queue_database_quarantines_then_recover_delivers_all(
    acknowledged: Router, storescp: Callable[..., Peer], loss: str
) -> None:
    project = acknowledged.project
    for suffix in ("-wal", "-shm"):
        (project / "data" / f"queue.db{suffix}").unlink(missing_ok=True)
    db = project / "data" / "queue.db"
    if loss == "missing":
        db.unlink()
    else:
        db.write_bytes(b"")
    peer = storescp(ae_title="PACS")
    point_at(project, peer)

    def recover(engine: IntuProcess) -> None:
        # The engine started, found 30 files it knows nothing about, and kept every one of them.
        assert spooled(project) == [] and len(quarantined(project)) == COUNT
        assert f"moved {COUNT} file(s) that no queued message refers to" in engine.log_text()
        result = engine.intu("queue", "recover")
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"{COUNT} file(s) queued" in result.stdout

    serve_and_deliver(acknowledged, project, peer, recover)
    assert quarantined(project) == [] and spooled(project) == []  # delivered, then released


@pytest.mark.interop
@pytest.mark.parametrize("damage", ["header", "page"])
def test_a_damaged_queue_database_refuses_to_start_then_recover_delivers_all(
    acknowledged: Router, storescp: Callable[..., Peer], damage: str
) -> None:
    project = acknowledged.project
    db = project / "data" / "queue.db"
    assert not (project / "data" / "queue.db-wal").exists()  # checkpointed at the graceful stop
    size = db.stat().st_size
    with open(db, "r+b") as f:
        f.seek(0 if damage == "header" else (size // 4096 // 2) * 4096)
        f.write(b"damaged by bad luck " * 205)  # about one page

    refused = subprocess.run(intu_command(project, "serve"), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "is damaged" in refused.stderr and "intu queue recover" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert refused.stderr.count("could not read the queue") == 0
    assert len(spooled(project)) == COUNT and quarantined(project) == []

    # What the message says to do: move it aside, recover, serve.
    for suffix in ("", "-wal", "-shm"):
        if (project / "data" / f"queue.db{suffix}").exists():
            shutil.move(
                project / "data" / f"queue.db{suffix}", project / "data" / f"queue.db{suffix}.damaged"
            )
    result = subprocess.run(
        intu_command(project, "queue", "recover"), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{COUNT} file(s) queued" in result.stdout
    peer = storescp(ae_title="PACS")
    point_at(project, peer)
    serve_and_deliver(acknowledged, project, peer)


@pytest.mark.interop
def test_a_moved_project_delivers_everything_it_had_queued(
    acknowledged: Router, storescp: Callable[..., Peer], tmp_path: Path
) -> None:
    project = acknowledged.project
    moved = tmp_path / "elsewhere" / "router"
    moved.parent.mkdir()
    project.rename(moved)
    peer = storescp(ae_title="PACS")
    point_at(moved, peer)
    serve_and_deliver(acknowledged, moved, peer)
    assert quarantined(moved) == []


# -- a full disk with no reserve ---------------------------------------------------------------
@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs mounted where the router's data_dir will be (needs root and mount rights)."""
    folder = tmp_path / "router" / "data"
    folder.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs a small filesystem: not root, cannot mount tmpfs")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"a real full disk needs a small filesystem: mount not permitted: {mounted.stderr.strip()}"
        )
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last byte; the file holding the space."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (65536, 512, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_with_no_reserve_still_delivers_what_is_queued(
    tmp_path: Path, small_filesystem: Path
) -> None:
    """With ``min_free_disk_mb: 0`` the disk fills to the last byte while the PACS is down; when
    it comes back, delivering needs no free space (the queue's reserve), and delivering frees it."""
    files = write_ct_series(tmp_path / "series", 5, size_kib=64)
    pacs_port, router_port = free_port(), free_port()
    project = write_router_project(
        tmp_path / "router",
        router_port=router_port,
        pacs_port=pacs_port,
        min_free_disk_mb=0,
        retry="{max_attempts: 0, backoff: constant, initial_delay_ms: 200, max_delay_ms: 200}",
    )
    with open(project / "intu.yaml", "a") as config:
        config.write("queue: {backend: sqlite, reserve_mb: 1}\n")  # 16 MiB would not fit in 8
    with IntuProcess(project, env=SERVE_ENV) as engine:
        engine.start(router_port)
        acked = send(router_port, files)
        assert len(acked) == 5
        assert (small_filesystem / "queue.reserve").stat().st_size == 1024 * 1024
        filler = fill(small_filesystem)
        # An attempt fails against the missing PACS, and recording it needs space: the reserve goes.
        assert wait_until(lambda: "released the queue's reserve" in engine.log_text(), 30), engine.log_text()
        late = write_ct_series(tmp_path / "late", 1, size_kib=16)
        assert send(router_port, late) == [], "the space freed is for delivery, not new instances"
        pacs = Scp(port=pacs_port, ae_title="PACS").start()
        try:
            delivered = wait_until(
                lambda: {r.sop_instance_uid for r in list(pacs.received)} >= set(acked), 60
            )
            assert delivered, (
                f"{len(pacs.received)} of 5 delivered on a full disk:\n{engine.log_text()[-3000:]}"
            )
            assert engine.stop() == 0
        finally:
            pacs.stop()
    assert spooled(project) == []
    assert filler.exists(), "nothing but delivery freed space"
    assert not (small_filesystem / "queue.reserve").exists()  # 5 x 64 KiB freed: not room for it yet
    assert "released the queue's reserve of 1 MiB" in engine.log_text()
