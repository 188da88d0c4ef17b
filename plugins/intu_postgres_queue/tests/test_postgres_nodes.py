"""Several `intu serve` nodes on one PostgreSQL queue, end to end with real processes: DCMTK
storescu as the modalities, DCMTK storescp (or the recording pynetdicom ``Scp``, when the PACS must
be slow) as the PACS, and every check made on the PACS's side (SOP Instance UIDs, pixel data).

Each node runs the same project (``channels/dicom-router`` on its own port, ``${INTU_PORT}``) with its
own data folder under one shared folder (``${INTU_DATA_DIR}``), as a deployment on NFS would.
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pydicom
import pytest
from intu_dicom_destination.testing import (
    INTEROP_ENV,
    IntuProcess,
    Scp,
    free_port,
    require_tool,
    start_storescp,
    wait_until,
    write_ct_series,
    write_router_project,
)
from intu_dicom_destination.testing.peers import stop_process
from intu_postgres_queue import PostgresQueueStore, default_node_id
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from intu_core.queue import EntryState, QueueRuntime

pytestmark = pytest.mark.interop

FAST_RETRY = "{max_attempts: 0, backoff: exponential, initial_delay_ms: 100, max_delay_ms: 1000, jitter: 0.2}"


# -- helpers ---------------------------------------------------------------------------------------
def write_node_project(folder: Path, *, pacs_port: int, pacs_ae: str, lease_s: float = 300) -> Path:
    """The router project every node runs: port, data folder and DSN come from the environment."""
    write_router_project(folder, router_port=1, pacs_port=pacs_port, pacs_ae=pacs_ae, retry=FAST_RETRY)
    config = folder / "intu.yaml"
    text = config.read_text().replace("data_dir: data", "data_dir: ${INTU_DATA_DIR}")
    config.write_text(
        text
        + "queue:\n"
        + "  backend: postgres\n"
        + '  dsn: "${INTU_PG_DSN}"\n'
        + "  schema: ${INTU_PG_SCHEMA}\n"
        + f"  lease_s: {lease_s}\n"
        + "  connect_timeout_s: 2\n"
    )
    channel = folder / "channels" / "dicom-router" / "channel.yaml"
    channel.write_text(channel.read_text().replace("port: 1,", 'port: "${INTU_PORT}",'))
    return folder


class Node:
    """One `intu serve` of the shared project: its port, data folder and process."""

    def __init__(self, name: str, project: Path, shared: Path, dsn: str, schema: str) -> None:
        self.name = name
        self.port = free_port()
        self.data_dir = shared / name
        env = {
            "INTU_PORT": str(self.port),
            "INTU_DATA_DIR": str(self.data_dir),
            "INTU_PG_DSN": dsn,
            "INTU_PG_SCHEMA": schema,
            "TCP_NODELAY": "1",
        }
        self.process = IntuProcess(project, shared / f"logs-{name}", env=env)

    def start(self) -> Node:
        self.process.start(self.port)
        return self

    @property
    def node_id(self) -> str:
        """The default node id intu gives this node (host name and data folder)."""
        return default_node_id(QueueRuntime(self.data_dir))


@pytest.fixture
def nodes(tmp_path: Path, pg_dsn: str, pg_schema: str) -> Iterator[Callable[[Path, str], Node]]:
    """Makes nodes with ``make(project, name)``; every one stopped at the end."""
    made: list[Node] = []
    shared = tmp_path / "shared"

    def make(project: Path, name: str) -> Node:
        node = Node(name, project, shared, pg_dsn, pg_schema)
        made.append(node)
        return node

    yield make
    for node in made:
        proc = node.process.proc
        if proc is not None and proc.poll() is None:
            node.process.stop()


def storescu(port: int, files: list[Path]) -> tuple[list[str], str]:
    """DCMTK storescu over one association: the SOP Instance UIDs it was told were stored, and its
    output. Parsed from ``-v`` ("Sending file: PATH" ... "Received Store Response (Success)")."""
    exe = require_tool("storescu")
    uid_of = {str(p): str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    proc = subprocess.run(
        [exe, "-v", "-aet", "MODALITY", "-aec", "INTU_SCP", "127.0.0.1", str(port), *map(str, files)],
        env=INTEROP_ENV, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    acked: list[str] = []
    current = None
    for line in output.splitlines():
        sent = re.search(r"Sending file: (.+)$", line)
        if sent:
            current = sent.group(1).strip()
        elif "Received Store Response" in line and current is not None:
            if "(Success)" in line:
                acked.append(uid_of[current])
            current = None
    return acked, output


def arrived_at_storescp(folder: Path) -> dict[str, Dataset]:
    """What DCMTK storescp stored: SOP Instance UID → dataset (the file as written)."""
    found = {}
    for path in folder.iterdir():
        if path.is_file():
            try:
                ds = pydicom.dcmread(path)
            except Exception:  # still being written
                continue
            found[str(ds.SOPInstanceUID)] = ds
    return found


def sent_datasets(files: list[Path]) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in files)}


def queue_store(dsn: str, schema: str) -> PostgresQueueStore:
    """A look at the shared queue, as `intu queue` on any node has."""
    return PostgresQueueStore(dsn, schema=schema, node_id="test-observer", create=False)


# -- two nodes, one queue --------------------------------------------------------------------------
def test_two_nodes_deliver_every_acknowledged_instance(
    tmp_path: Path, nodes, pg_dsn: str, pg_schema: str
) -> None:
    pacs = start_storescp(tmp_path / "pacs", ae_title="PACS", log=tmp_path / "storescp.log")
    try:
        project = write_node_project(tmp_path / "project", pacs_port=pacs.port, pacs_ae="PACS")
        a, b = nodes(project, "node-a").start(), nodes(project, "node-b").start()
        files = write_ct_series(tmp_path / "ct", 40, size_kib=16)
        results: dict[str, tuple[list[str], str]] = {}
        senders = [
            threading.Thread(target=lambda n=n, f=f: results.__setitem__(n.name, storescu(n.port, f)))
            for n, f in ((a, files[:20]), (b, files[20:]))
        ]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        acked = [uid for name in ("node-a", "node-b") for uid in results[name][0]]
        assert len(acked) == 40, results["node-a"][1][-2000:] + results["node-b"][1][-2000:]

        assert wait_until(lambda: set(acked) <= set(arrived_at_storescp(pacs.folder)), 120), (
            a.process.log_text()[-3000:] + b.process.log_text()[-3000:]
        )
        arrived = arrived_at_storescp(pacs.folder)
        sent = sent_datasets(files)
        for uid in acked:  # the PACS has each image as sent: every element, pixel data included
            assert arrived[uid] == sent[uid]
            assert arrived[uid].PixelData == sent[uid].PixelData
        # `intu queue list` works from either node and sees the one shared queue.
        assert wait_until(lambda: "hospital-pacs" in b.process.intu("queue", "list").stdout, 30)
        with queue_store(pg_dsn, pg_schema) as store:
            assert wait_until(lambda: store.size("hospital-pacs") == 0, 60)
            [stats] = store.stats()
            assert stats.delivered >= 40 and stats.dead == 0
        listing = a.process.intu("queue", "list")
        assert listing.returncode == 0 and "hospital-pacs" in listing.stdout, listing.stderr
        # Both nodes delivered (their counters), and each delivered file was deleted by whichever
        # node sent it, on the shared folder: no instance is left behind.
        with psycopg.connect(pg_dsn) as conn:
            rows = conn.execute(
                f'SELECT node, value FROM "{pg_schema}".counters WHERE name = %s'.encode(), ("delivered",)
            ).fetchall()
        per_node = dict(rows)
        assert set(per_node) == {a.node_id, b.node_id} and sum(per_node.values()) == 40, per_node
        spool = tmp_path / "shared"
        assert wait_until(lambda: not [f for f in spool.glob("node-*/spool/**/*") if f.is_file()], 30)
    finally:
        stop_process(pacs.proc)


# -- a node killed with entries leased -------------------------------------------------------------
def test_a_killed_nodes_leased_entries_are_delivered_by_the_other_after_the_lease(
    tmp_path: Path, nodes, pg_dsn: str, pg_schema: str, record_property
) -> None:
    pacs = Scp(ae_title="PACS", delay=0.3).start()  # slow: node-a is killed with sends in flight
    try:
        project = write_node_project(tmp_path / "project", pacs_port=pacs.port, pacs_ae="PACS", lease_s=3)
        a = nodes(project, "node-a").start()
        files = write_ct_series(tmp_path / "ct", 30, size_kib=16)
        acked, output = storescu(a.port, files)
        assert len(acked) == 30, output[-3000:]

        # node-b starts only now, so node-a holds leases when it dies (else b might hold them all).
        with queue_store(pg_dsn, pg_schema) as store:

            def node_a_holds_leases() -> bool:
                return any(e.lease_owner == a.node_id for e in store.list_entries(state=EntryState.IN_FLIGHT))

            assert wait_until(node_a_holds_leases, 60)
            a.process.kill()
            held = [
                e.id for e in store.list_entries(state=EntryState.IN_FLIGHT) if e.lease_owner == a.node_id
            ]
            assert held, "node-a should have died holding leases"
            b = nodes(project, "node-b").start()
            assert wait_until(lambda: store.size("hospital-pacs") == 0, 120), b.process.log_text()[-3000:]
            [stats] = store.stats()

        received = Counter(r.sop_instance_uid for r in pacs.received)
        assert set(acked) <= set(received), "an acknowledged instance never reached the PACS"
        duplicates = sum(n - 1 for n in received.values())
        # Only what node-a was sending when it died can arrive twice (its answer may have come back
        # before the kill, the commit never), and the PACS sees the same SOP Instance UID again.
        assert duplicates <= len(held)
        assert stats.recovered >= len(held) and stats.delivered >= 30
        record_property("acknowledged", len(acked))
        record_property("arrived_distinct", len(received))
        record_property("duplicates", duplicates)
        print(
            f"acknowledged {len(acked)}, arrived {len(received)} distinct, {duplicates} duplicate(s),"
            f" {len(held)} leased by the killed node"
        )
        sent = sent_datasets(files)
        for r in pacs.received:
            assert r.dataset.PixelData == sent[r.sop_instance_uid].PixelData
    finally:
        pacs.stop()


# -- PostgreSQL restarted while a node runs --------------------------------------------------------
def _pg_ctl(cluster: tuple[str, str], action: str) -> None:
    fast = ["-m", "fast"] if action == "stop" else []
    subprocess.run(["pg_ctlcluster", *cluster, action, *fast], check=True, capture_output=True, timeout=120)


class Modality:
    """A pynetdicom SCU that keeps one association open (opening another if it was aborted) and
    records each C-STORE's status."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.statuses: dict[str, list[int]] = {}
        self.assoc: Any = None

    def send(self, ds: Dataset) -> int:
        if self.assoc is None or not self.assoc.is_established:
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
            self.assoc = ae.associate("127.0.0.1", self.port, ae_title="INTU_SCP")
            assert self.assoc.is_established
        status = self.assoc.send_c_store(ds)
        code = int(status.Status) if status else -1
        self.statuses.setdefault(str(ds.SOPInstanceUID), []).append(code)
        return code

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


def test_postgresql_restarting_loses_nothing_acknowledged(
    tmp_path: Path,
    nodes,
    pg_dsn: str,
    pg_schema: str,
    pg_cluster: tuple[str, str],
    request: pytest.FixtureRequest,
) -> None:
    pacs = Scp(ae_title="PACS", delay=0.3).start()  # slow: entries are queued and in flight at the stop
    store = None
    try:
        project = write_node_project(tmp_path / "project", pacs_port=pacs.port, pacs_ae="PACS", lease_s=5)
        node = nodes(project, "node-a").start()
        other = nodes(project, "node-b").start()  # delivers too, and lives through the restart
        datasets = [pydicom.dcmread(p) for p in write_ct_series(tmp_path / "ct", 24, size_kib=16)]
        modality = Modality(node.port)
        request.addfinalizer(modality.close)
        acked: set[str] = set()
        for ds in datasets[:8]:
            assert modality.send(ds) == 0x0000
            acked.add(str(ds.SOPInstanceUID))
        store = queue_store(pg_dsn, pg_schema)  # kept open over the restart: it connects again
        assert store.size("hospital-pacs") > 0
        _pg_ctl(pg_cluster, "stop")
        try:
            refused = [ds for ds in datasets[8:16] if modality.send(ds) != 0x0000]
        finally:
            _pg_ctl(pg_cluster, "start")
        # While the queue cannot be written the router answers "out of resources", never success.
        assert refused == datasets[8:16]
        assert {c for ds in refused for c in modality.statuses[str(ds.SOPInstanceUID)]} == {0xA700}
        # Back by itself: the modality sends again what was refused, then the rest.
        for ds in [*refused, *datasets[16:]]:
            assert wait_until(lambda ds=ds: modality.send(ds) == 0x0000, 60, interval=1.0)
            acked.add(str(ds.SOPInstanceUID))
        assert len(acked) == 24
        assert wait_until(lambda: acked <= {r.sop_instance_uid for r in pacs.received}, 120), (
            node.process.log_text()[-3000:] + other.process.log_text()[-3000:]
        )
        assert wait_until(lambda: store.size("hospital-pacs") == 0, 60)
        [stats] = store.stats()
        assert stats.dead == 0 and stats.errored == 0
        assert node.process.proc is not None and node.process.proc.poll() is None  # no restart needed
        assert other.process.proc is not None and other.process.proc.poll() is None
        sent = {str(ds.SOPInstanceUID): ds for ds in datasets}
        for r in pacs.received:
            assert r.dataset.PixelData == sent[r.sop_instance_uid].PixelData
    finally:
        pacs.stop()
        if store is not None:
            store.close()
