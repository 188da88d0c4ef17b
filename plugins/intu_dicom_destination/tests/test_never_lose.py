"""Never lose an image (SPEC section 8, issue 5), end to end with real processes and real peers.

`intu serve` runs as a child process (``intu_dicom_destination.testing.serve``) with the seed's dicom-router
channel; the modality is a pynetdicom SCU in this process (it records exactly which SOP Instance
UIDs were answered 0x0000) or DCMTK ``storescu``; the PACS is the recording pynetdicom ``Scp`` in this
process, whose ``delay`` and ``status`` are changed while the engine runs. The invariant checked
everywhere: every instance a sender was told was stored ends up at the PACS (or, for a permanent
failure, as a dead letter with its reason), whatever happens to the engine in between.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from intu_dicom_destination.testing import (
    INTEROP_ENV,
    IntuProcess,
    Scp,
    free_port,
    require_tool,
    wait_until,
    write_ct_series,
    write_router_project,
)
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from intu_core.queue.sqlite import SqliteQueueStore

REPO = Path(__file__).resolve().parents[3]
SEED_TRANSFORMER = REPO / "examples" / "channels" / "dicom-router" / "transformer.py"
DESTINATION = "hospital-pacs"
FAST_RETRY = "{max_attempts: 0, backoff: exponential, initial_delay_ms: 100, max_delay_ms: 1000, jitter: 0.2}"
SERVE_ENV = {"TCP_NODELAY": "1"}


# -- helpers ---------------------------------------------------------------------------------------
def series(folder: Path, count: int, size_kib: int = 16) -> tuple[list[Path], list[Dataset]]:
    paths = write_ct_series(folder, count, size_kib=size_kib)
    return paths, [pydicom.dcmread(p) for p in paths]


class StoreScu:
    """A modality: sends datasets over one association and records each C-STORE's status.

    ``acked`` holds the SOP Instance UIDs answered 0x0000, in order, and grows while ``send`` runs
    (in a thread), so a test can kill the engine after a given number of acknowledgements. An
    association aborted by a dying engine ends the run: what was not answered is not acknowledged.
    """

    def __init__(self, port: int, called_ae: str = "INTU_SCP") -> None:
        self.port = port
        self.called_ae = called_ae
        self.acked: list[str] = []
        self.statuses: dict[str, int | None] = {}
        self.comments: dict[str, str] = {}

    def send(self, datasets: list[Dataset]) -> StoreScu:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.called_ae)
        assert assoc.is_established, "the router did not accept the association"
        # As DCMTK with TCP_NODELAY=1: without it each C-STORE waits ~40 ms on a delayed ACK.
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for ds in datasets:
                uid = str(ds.SOPInstanceUID)
                try:
                    status = assoc.send_c_store(ds)
                except (RuntimeError, OSError):  # association gone under us
                    self.statuses[uid] = None
                    break
                code = int(status.Status) if "Status" in status else None
                self.statuses[uid] = code
                if code == 0x0000:
                    self.acked.append(uid)
                if "ErrorComment" in status:
                    self.comments[uid] = str(status.ErrorComment)
                if code is None or not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        return self

    def send_in_thread(self, datasets: list[Dataset]) -> threading.Thread:
        thread = threading.Thread(target=self.send, args=(datasets,), daemon=True)
        thread.start()
        return thread


def storescu(port: int, files: list[Path]) -> list[str]:
    """DCMTK storescu over one association; the SOP Instance UIDs it was told were stored.

    Parsed from ``-v`` output ("Sending file: PATH" ... "Received Store Response (Success)"), and
    checked against the exit code."""
    exe = require_tool("storescu")
    uid_of = {str(p): str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    proc = subprocess.run(
        [exe, "-v", "-aet", "MODALITY", "-aec", "INTU_SCP", "127.0.0.1", str(port), *map(str, files)],
        env=INTEROP_ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    acked, current = [], None
    for line in output.splitlines():
        sent = re.search(r"Sending file: (.+)$", line)
        if sent:
            current = sent.group(1).strip()
        elif "Received Store Response" in line and current is not None:
            if "(Success)" in line:
                acked.append(uid_of[current])
            current = None
    assert proc.returncode == 0, output[-3000:]
    return acked


def start_scp_on(port: int, **kwargs: Any) -> Scp:
    """The recording Scp on a given port (a PACS coming up where intu already sends)."""
    return Scp(port=port, **kwargs).start()


@contextmanager
def queue_store(project: Path) -> Iterator[SqliteQueueStore]:
    """A second connection to the engine's queue, as `intu queue` opens it (safe while serve runs)."""
    store = SqliteQueueStore(project / "data")
    try:
        yield store
    finally:
        store.close()


def queue_stats(project: Path) -> dict[str, int]:
    with queue_store(project) as store:
        for s in store.stats():
            if s.queue == DESTINATION:
                return {
                    "pending": s.pending, "in_flight": s.in_flight, "dead": s.dead, "errored": s.errored,
                    "delivered": s.delivered, "recovered": s.recovered, "depth": s.depth,
                }  # fmt: skip
    return dict.fromkeys(("pending", "in_flight", "dead", "errored", "delivered", "recovered", "depth"), 0)


def intu(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "intu_core", "--dir", str(project), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def received_uids(scp: Scp) -> list[str]:
    return [r.sop_instance_uid for r in list(scp.received)]


def received_files(project: Path) -> list[Path]:
    folder = project / "data" / "spool" / "dicom-router"
    return sorted(folder.glob("*.dcm")) if folder.exists() else []


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    assert wait_until(predicate, timeout=timeout), f"timed out after {timeout} s waiting for {what}"


@pytest.fixture
def cleanup() -> Iterator[list[Any]]:
    """Things to stop at the end whatever happens (IntuProcess, Scp)."""
    items: list[Any] = []
    yield items
    for item in reversed(items):
        try:
            if isinstance(item, IntuProcess):
                if item.proc is not None and item.proc.poll() is None:
                    item.kill()
            else:
                item.stop()
        except Exception:
            pass


def serve(project: Path, port: int, cleanup: list[Any]) -> IntuProcess:
    proc = IntuProcess(project, env=SERVE_ENV).start(port)
    cleanup.append(proc)
    return proc


# -- 1. crash test ---------------------------------------------------------------------------------
@pytest.mark.interop
@pytest.mark.parametrize("delivery_process", [False, True], ids=["one-process", "delivery-process"])
def test_sigkill_during_receive_and_forward_loses_nothing_acknowledged(
    tmp_path: Path, cleanup, delivery_process: bool
) -> None:
    paths, datasets = series(tmp_path / "series", 300, size_kib=16)
    pacs = Scp(ae_title="PACS").start()
    cleanup.append(pacs)
    router_port = free_port()
    project = write_router_project(
        tmp_path / "router", router_port=router_port, pacs_port=pacs.port, retry=FAST_RETRY,
        transformer=SEED_TRANSFORMER,
        queue="{enabled: true, threads: 2}",
    )  # fmt: skip
    if delivery_process:  # SIGKILL of the engine takes its delivery process with it
        with (project / "intu.yaml").open("a") as config:
            config.write("delivery: {process: true}\n")
    acked: set[str] = set()
    recovered_expected = 0  # in-flight entries found after each kill

    # Kill 1: during receive (pynetdicom SCU, exact acknowledgements), with a slow PACS.
    pacs.delay = 0.05  # 2 threads: ~40/s forwarded, slower than the modality sends
    engine = IntuProcess(project, env=SERVE_ENV)
    cleanup.append(engine)
    engine.start(router_port)
    scu = StoreScu(router_port)
    thread = scu.send_in_thread(datasets)
    wait_for(lambda: len(scu.acked) >= 100, 60, "100 acknowledged instances")
    engine.kill()
    thread.join(30)
    assert not thread.is_alive()
    acked |= set(scu.acked)
    assert 100 <= len(acked) < 300, "the kill should land in the middle of the series"
    stats = queue_stats(project)
    recovered_expected += stats["in_flight"]
    kills = [("receive", len(acked), dict(stats))]

    # Kill 2: during forward. The modality sends the rest again (DCMTK storescu), the PACS is slow,
    # the engine dies with a deep queue.
    engine.start(router_port)
    rest = [p for p, ds in zip(paths, datasets, strict=True) if str(ds.SOPInstanceUID) not in acked]
    acked_by_storescu = storescu(router_port, rest)
    assert len(acked_by_storescu) == len(rest), "storescu: every instance should have been stored"
    acked |= set(acked_by_storescu)
    assert len(acked) == 300
    before = len(pacs.received)
    wait_for(lambda: len(pacs.received) >= before + 30, 60, "forwarding to make progress")
    engine.kill()
    stats = queue_stats(project)
    assert stats["depth"] > 0, f"the kill should land while the queue is deep: {stats}"
    recovered_expected += stats["in_flight"]
    kills.append(("forward", len(pacs.received), dict(stats)))

    # Kill 3: right after a restart, while recovered entries are being re-sent.
    engine.start(router_port)
    before = len(pacs.received)
    wait_for(lambda: len(pacs.received) >= before + 5, 60, "delivery to resume after the restart")
    engine.kill()
    stats = queue_stats(project)
    recovered_expected += stats["in_flight"]
    kills.append(("resume", len(pacs.received), dict(stats)))

    # Final run, fast PACS: everything acknowledged arrives, with no operator action.
    pacs.delay = 0.0
    engine.start(router_port)
    wait_for(lambda: acked <= set(received_uids(pacs)), 90, "every acknowledged instance at the PACS")
    wait_for(lambda: queue_stats(project)["depth"] == 0, 30, "the queue to drain")
    assert engine.stop() == 0

    got = received_uids(pacs)
    missing = acked - set(got)
    assert not missing, f"{len(missing)} acknowledged instance(s) lost"
    duplicates = len(got) - len(set(got))
    final = queue_stats(project)
    assert final["dead"] == 0 and final["errored"] == 0, final
    assert final["recovered"] == recovered_expected, (final, kills)
    # A duplicate comes from an entry re-sent after recovery, or from an instance the engine
    # received but died before acknowledging (the modality sent it again): nothing else.
    assert duplicates <= recovered_expected + 1, (duplicates, recovered_expected, kills)
    log = engine.log_text()
    if recovered_expected:
        counts = [int(n) for n in re.findall(r"recovered (\d+) message\(s\)", log)]
        assert sum(counts) == recovered_expected, (counts, kills)
    print(f"\ncrash test: kills={kills} duplicates={duplicates} recovered={recovered_expected}"
          f" orphan files={len(received_files(project))}")  # fmt: skip


# -- 2. outage -------------------------------------------------------------------------------------
def test_pacs_outage_then_everything_arrives_when_it_is_back(tmp_path: Path, cleanup) -> None:
    _, datasets = series(tmp_path / "series", 20)
    pacs_port, router_port = free_port(), free_port()  # nothing listens on pacs_port yet
    project = write_router_project(
        tmp_path / "router", router_port=router_port, pacs_port=pacs_port, retry=FAST_RETRY,
        transformer=SEED_TRANSFORMER,
        queue="{enabled: true, threads: 2}",
    )  # fmt: skip
    engine = serve(project, router_port, cleanup)
    scu = StoreScu(router_port).send(datasets)
    assert len(scu.acked) == 20, f"queued instances must be acknowledged: {scu.statuses}"

    def entries() -> list[Any]:
        with queue_store(project) as store:
            return store.list_entries(DESTINATION, None, 1000)

    # Nothing listens: the first refused sends mark the destination down, and from then on the
    # entries wait for its C-ECHO probe (1 s, 2 s, 4 s...) instead of each backing off on its own
    # (issue 13; the back-off itself is tested with a PACS answering 0xA700, below).
    wait_for(lambda: f"destination {DESTINATION} is down" in engine.log_text(), 30, "the destination down")
    time.sleep(4)  # a few probes
    snapshot = entries()
    assert len(snapshot) == 20
    tries = [h for entry in snapshot for h in entry.history if h["status"] != "note"]
    # The sends that found it down: those in flight and those just claimed, at most two per worker.
    assert 1 <= len(tries) <= 4 and sum(e.attempts for e in snapshot) == len(tries), tries
    assert all(h["status"] == "retryable" for h in tries), tries
    # "Connection refused" (rarely misreported as an abort, see the report).
    assert any("Connection refused" in h["detail"] for h in tries), tries

    pacs = start_scp_on(pacs_port, ae_title="PACS")
    cleanup.append(pacs)
    wanted = set(scu.acked)
    wait_for(lambda: wanted <= set(received_uids(pacs)), 20, "all 20 at the PACS after it came up")
    wait_for(lambda: queue_stats(project)["depth"] == 0, 10, "the queue to drain")
    assert engine.stop() == 0
    assert "delivered after" in engine.log_text()
    assert received_files(project) == [], "delivered instances' files should be released"


# -- 3. a PACS out of resources for a while; a PACS refusing one instance --------------------------
def test_pacs_out_of_resources_for_a_while_then_delivers(tmp_path: Path, cleanup) -> None:
    _, datasets = series(tmp_path / "series", 3)
    pacs = Scp(ae_title="PACS", status=lambda n, event: 0xA700 if n <= 6 else 0x0000).start()
    cleanup.append(pacs)
    router_port = free_port()
    project = write_router_project(
        tmp_path / "router", router_port=router_port, pacs_port=pacs.port, retry=FAST_RETRY,
        transformer=SEED_TRANSFORMER,
        queue="{enabled: true, threads: 1}",
    )  # fmt: skip
    engine = serve(project, router_port, cleanup)
    scu = StoreScu(router_port).send(datasets)
    assert len(scu.acked) == 3
    wait_for(lambda: set(scu.acked) <= set(received_uids(pacs)), 30, "delivery after 0xA700s")
    wait_for(lambda: queue_stats(project)["depth"] == 0, 10, "the queue to drain")
    assert engine.stop() == 0
    log = engine.log_text()
    refusals = re.findall(r"not delivered \(attempt \d+\): refused for now: 0xA700", log)
    assert len(refusals) == 6, log[-4000:]
    assert re.search(r"delivered after [2-9] attempts", log), log[-4000:]
    assert queue_stats(project)["dead"] == 0


def test_pacs_refuses_one_instance_dead_letter_then_operator_retry(tmp_path: Path, cleanup) -> None:
    _, datasets = series(tmp_path / "series", 6)
    bad = str(datasets[2].SOPInstanceUID)
    fixed = threading.Event()

    def status(n: int, event: Any) -> int:
        refused = str(event.request.AffectedSOPInstanceUID) == bad and not fixed.is_set()
        return 0xC000 if refused else 0x0000

    pacs = Scp(ae_title="PACS", status=status).start()
    cleanup.append(pacs)
    router_port = free_port()
    project = write_router_project(
        tmp_path / "router",
        router_port=router_port,
        pacs_port=pacs.port,
        retry=FAST_RETRY,
        transformer=SEED_TRANSFORMER,
    )
    engine = serve(project, router_port, cleanup)
    scu = StoreScu(router_port).send(datasets)
    assert len(scu.acked) == 6
    others = set(scu.acked) - {bad}
    wait_for(lambda: others <= set(received_uids(pacs)), 30, "the other five at the PACS")
    wait_for(lambda: queue_stats(project)["dead"] == 1, 30, "one dead letter")

    listed = intu(project, "queue", "list", "--state", "dead", "--json")
    assert listed.returncode == 0, listed.stderr
    dead = json.loads(listed.stdout)
    assert len(dead) == 1 and dead[0]["state"] == "dead", dead
    assert "0xC000 Cannot Understand" in dead[0]["last_error"], dead
    entry_id = dead[0]["id"]
    table = intu(project, "queue", "list", "--state", "dead")
    assert entry_id in table.stdout and "0xC000" in table.stdout, table.stdout
    shown = intu(project, "queue", "show", entry_id)
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert detail["attempts"] == 1, "a permanent failure is not retried"
    last = detail["history"][-1]
    assert last["status"] == "permanent" and last["code"] == 0xC000, detail["history"]
    assert "0xC000 Cannot Understand" in last["detail"]
    assert detail["message"]["metadata"]["dicom"]["sop_instance_uid"] == bad
    assert bad not in received_uids(pacs)
    assert len(received_files(project)) == 1, "a dead letter keeps its file for a retry"

    fixed.set()
    retried = intu(project, "queue", "retry", entry_id)
    assert retried.returncode == 0 and "1 entry put back" in retried.stdout, retried.stdout + retried.stderr
    wait_for(lambda: bad in received_uids(pacs), 20, "the retried instance at the PACS")
    wait_for(lambda: queue_stats(project)["depth"] + queue_stats(project)["dead"] == 0, 10, "an empty queue")
    assert engine.stop() == 0
    assert received_files(project) == []
    assert Counter(received_uids(pacs))[bad] == 1


# -- 4. back-pressure ------------------------------------------------------------------------------
def test_queue_over_max_size_answers_out_of_resources_and_keeps_what_it_accepted(
    tmp_path: Path, cleanup
) -> None:
    _, datasets = series(tmp_path / "series", 8)
    pacs_port, router_port = free_port(), free_port()  # the PACS is down
    project = write_router_project(
        tmp_path / "router", router_port=router_port, pacs_port=pacs_port, retry=FAST_RETRY,
        transformer=SEED_TRANSFORMER,
        queue="{enabled: true, threads: 1, max_size: 5}",
    )  # fmt: skip
    engine = serve(project, router_port, cleanup)
    scu = StoreScu(router_port).send(datasets)
    codes = [scu.statuses[str(ds.SOPInstanceUID)] for ds in datasets]
    assert codes == [0x0000] * 5 + [0xA700] * 3, [hex(c) if c is not None else c for c in codes]
    refused = [str(ds.SOPInstanceUID) for ds in datasets[5:]]
    assert all("full" in scu.comments.get(uid, "") for uid in refused), scu.comments
    assert len(received_files(project)) == 5, "refused instances must not be left in the data dir"
    assert queue_stats(project)["depth"] == 5

    pacs = start_scp_on(pacs_port, ae_title="PACS")
    cleanup.append(pacs)
    wait_for(lambda: set(scu.acked) <= set(received_uids(pacs)), 20, "the five accepted at the PACS")
    assert not set(refused) & set(received_uids(pacs))
    # With the queue drained, the refused ones are accepted when the modality tries again.
    wait_for(lambda: queue_stats(project)["depth"] == 0, 10, "the queue to drain")
    again = StoreScu(router_port).send(datasets[5:])
    assert len(again.acked) == 3
    wait_for(lambda: set(refused) <= set(received_uids(pacs)), 20, "the retried three at the PACS")
    assert engine.stop() == 0


def test_min_free_disk_answers_out_of_resources_and_keeps_no_file(tmp_path: Path, cleanup) -> None:
    _, datasets = series(tmp_path / "series", 3)
    pacs = Scp(ae_title="PACS").start()
    cleanup.append(pacs)
    router_port = free_port()
    project = write_router_project(
        tmp_path / "router", router_port=router_port, pacs_port=pacs.port, retry=FAST_RETRY,
        transformer=SEED_TRANSFORMER,
        min_free_disk_mb=100000000,
    )  # fmt: skip
    engine = serve(project, router_port, cleanup)
    scu = StoreScu(router_port).send(datasets)
    assert list(scu.statuses.values()) == [0xA700] * 3, scu.statuses
    assert all("disk" in scu.comments.get(str(ds.SOPInstanceUID), "") for ds in datasets), scu.comments
    assert received_files(project) == []
    assert queue_stats(project)["depth"] == 0
    assert engine.proc is not None and engine.proc.poll() is None, "the engine keeps serving"
    assert engine.stop() == 0
    assert pacs.received == []


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


@pytest.mark.parametrize("delivery_process", [False, True], ids=["one-process", "delivery-process"])
def test_real_full_disk_answers_out_of_resources_then_recovers(
    tmp_path: Path, cleanup, small_filesystem: Path, delivery_process: bool
) -> None:
    _, datasets = series(tmp_path / "series", 9, size_kib=64)
    pacs = Scp(ae_title="PACS").start()
    cleanup.append(pacs)
    router_port = free_port()
    project = write_router_project(
        tmp_path / "router",
        router_port=router_port,
        pacs_port=pacs.port,
        retry=FAST_RETRY,
        transformer=SEED_TRANSFORMER,
    )
    if delivery_process:  # the delivery process gives the reserve back, the engine sees it gone
        with (project / "intu.yaml").open("a") as config:
            config.write("delivery: {process: true}\n")
    engine = serve(project, router_port, cleanup)
    first = StoreScu(router_port).send(datasets[:3])
    assert len(first.acked) == 3
    wait_for(lambda: set(first.acked) <= set(received_uids(pacs)), 20, "the first three at the PACS")
    wait_for(lambda: queue_stats(project)["depth"] == 0, 10, "the queue to drain")

    filler = fill(small_filesystem)
    full = StoreScu(router_port).send(datasets[3:6])
    assert list(full.statuses.values()) == [0xA700] * 3, (full.statuses, full.comments)
    assert all(full.comments.values()) and len(full.comments) == 3, full.comments
    assert received_files(project) == [], "nothing half-written left behind"
    assert engine.proc is not None and engine.proc.poll() is None, "the engine keeps serving"

    filler.unlink()
    after = StoreScu(router_port).send(datasets[6:])
    assert len(after.acked) == 3, (after.statuses, after.comments)
    wait_for(lambda: set(after.acked) <= set(received_uids(pacs)), 20, "the last three at the PACS")
    wait_for(lambda: queue_stats(project)["depth"] == 0, 10, "the queue to drain")
    assert engine.stop() == 0
    assert not {str(ds.SOPInstanceUID) for ds in datasets[3:6]} & set(received_uids(pacs))


# -- 5. graceful stop ------------------------------------------------------------------------------
def test_sigterm_with_a_deep_queue_exits_cleanly_and_resumes(tmp_path: Path, cleanup) -> None:
    _, datasets = series(tmp_path / "series", 60)
    pacs = Scp(ae_title="PACS", delay=0.2).start()
    cleanup.append(pacs)
    router_port = free_port()
    project = write_router_project(
        tmp_path / "router", router_port=router_port, pacs_port=pacs.port, retry=FAST_RETRY,
        transformer=SEED_TRANSFORMER,
        queue="{enabled: true, threads: 2}",
    )  # fmt: skip
    engine = serve(project, router_port, cleanup)
    scu = StoreScu(router_port).send(datasets)
    assert len(scu.acked) == 60
    wait_for(lambda: len(pacs.received) >= 4, 30, "forwarding to start")
    started = time.monotonic()
    assert engine.stop(signal.SIGTERM, timeout=30) == 0
    took = time.monotonic() - started
    assert took < 15, f"graceful stop took {took:.1f} s"
    stats = queue_stats(project)
    assert stats["depth"] > 0, "the queue should still be deep when the engine stopped"
    assert stats["in_flight"] == 0, f"in-flight sends should have finished and been recorded: {stats}"
    at_stop = len(pacs.received)

    pacs.delay = 0.0
    engine.start(router_port)
    wait_for(lambda: set(scu.acked) <= set(received_uids(pacs)), 30, "everything at the PACS")
    assert engine.stop() == 0
    got = received_uids(pacs)
    assert len(got) - len(set(got)) == 0, "no duplicates after a graceful stop"
    assert "recovered" not in engine.log_text()
    print(f"\ngraceful stop: {took:.2f} s, {at_stop}/60 delivered before the stop")


def fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last byte; the file to delete to free it."""
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


@pytest.mark.parametrize("delivery_process", [False, True], ids=["one-process", "delivery-process"])
def test_full_disk_while_delivering_resumes_without_a_restart(
    tmp_path: Path, cleanup, small_filesystem: Path, delivery_process: bool
) -> None:
    """The disk fills up while queued instances wait for a PACS that is down: sending them or
    recording their results fails for a while. Once space is freed, everything is delivered by
    the running engine (no entry stuck "in flight" until a restart), and `intu queue list` works
    while the disk is full."""
    _, datasets = series(tmp_path / "series", 5)
    pacs_port, router_port = free_port(), free_port()
    project = write_router_project(
        tmp_path / "router",
        router_port=router_port,
        pacs_port=pacs_port,
        retry=FAST_RETRY,
        transformer=SEED_TRANSFORMER,
    )
    if delivery_process:  # the delivery process gives the reserve back, the engine sees it gone
        with (project / "intu.yaml").open("a") as config:
            config.write("delivery: {process: true}\n")
    engine = serve(project, router_port, cleanup)
    scu = StoreScu(router_port).send(datasets)
    assert len(scu.acked) == 5
    filler = fill(small_filesystem)
    listed = intu(project, "queue", "list", "--json")
    assert listed.returncode == 0, f"intu queue list fails on a full disk: {listed.stderr[-2000:]}"
    assert json.loads(listed.stdout)[0]["depth"] == 5
    pacs = start_scp_on(pacs_port, ae_title="PACS")
    cleanup.append(pacs)
    time.sleep(2.0)  # attempts fail (no space for the outgoing copy, or for recording the result)
    filler.unlink()
    wait_for(lambda: set(scu.acked) <= set(received_uids(pacs)), 20, "all five at the PACS")
    wait_for(lambda: queue_stats(project)["depth"] == 0, 10, "no entry left pending or in flight")
    assert engine.stop() == 0
    assert received_files(project) == []
