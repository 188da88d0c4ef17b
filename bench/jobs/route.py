"""route: storescu -> a middle box (intu serve, Orthanc, or nothing) -> storescp, end to end."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from intu import (
    INTU_SCP_AET,
    IntuFailure,
    drop_postgres_schema,
    start_intu_serve,
    stop_intu_serve,
    validate_project,
    write_route_project,
)
from intu_dicom_destination.testing import IntuProcess, Peer, free_port, start_process
from measure import count_files, log, median, proc_status_kib, tail, tree_cpu_seconds, wait_count
from peers import ORTHANC_CLOSE_DELAY, SCP_AET, Peers, orthanc, orthanc_rest_forward, peer_env, storescp
from study import Study


class DashboardPoller(threading.Thread):
    """What an open dashboard and a Prometheus scraper ask of ``intu serve`` (--http): the
    destinations and /metrics every second, a message search every 2 s."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.base = f"http://127.0.0.1:{port}"
        self.halt = threading.Event()
        self.polls = 0

    def run(self) -> None:
        tick = 0
        while not self.halt.wait(1.0):
            paths = ["/api/v1/destinations", "/metrics"] + (["/api/v1/messages?limit=50"] if tick % 2 else [])
            tick += 1
            for path in paths:
                try:
                    with urllib.request.urlopen(self.base + path, timeout=5) as answer:
                        answer.read()
                    self.polls += 1
                except OSError:
                    pass  # not up yet, or stopping

    def stop(self) -> int:
        """Stop polling; how many requests were answered."""
        self.halt.set()
        self.join(10)
        return self.polls


def route_once(
    kind: str, args: argparse.Namespace, base: Path, study: Study, peers: Peers, run_no: int
) -> dict[str, Any]:
    """One end-to-end run: storescu -> [intu | Orthanc | nothing] -> storescp --fork. Seconds
    from storescu's start to storescp's output folder holding N files.

    ``intu_pg1``/``intu_pg2``: one or two intu serve nodes on one PostgreSQL queue (a fresh schema,
    dropped after); with two, two storescu processes send half of the study each, one per node."""
    n = args.count
    tag = f"route-{kind}-{run_no}"
    scp = storescp(base, tag, ignore=False)
    scp_port, out_dir = scp.port, scp.folder
    serve: IntuProcess | None = None
    box: Peer | None = None
    middle: subprocess.Popen[bytes] | None = None  # intu serve or Orthanc
    res: dict[str, Any] = {}
    nodes: list[IntuProcess] = []
    poller: DashboardPoller | None = None
    schema = f"bench_{uuid.uuid4().hex[:12]}" if kind.startswith("intu_pg") else None
    try:
        if kind.startswith("intu_pg"):
            assert schema is not None
            ports = [free_port() for _ in range(int(kind[-1]))]
            for i, port in enumerate(ports):
                project = write_route_project(
                    base / tag / f"node-{i}", port, scp_port, postgres=(args.postgres_dsn, schema)
                )
                if run_no == 0 and i == 0:
                    validate_project(project)
                nodes.append(start_intu_serve(project, port, base / f"{tag}-intu-{i}"))
            serve, middle = nodes[0], nodes[0].proc
            target_port, called = ports[0], INTU_SCP_AET
        elif kind == "direct":
            target_port, called = scp_port, SCP_AET
        elif kind in ("intu", "intu_proc"):
            target_port, called = free_port(), INTU_SCP_AET
            project = write_route_project(base / tag, target_port, scp_port)
            if kind == "intu_proc":  # queued destinations sent to from a process of their own
                with (project / "intu.yaml").open("a") as config:
                    config.write("delivery: {process: true}\n")
            if args.http:
                http_port = free_port()
                with (project / "intu.yaml").open("a") as config:
                    config.write(f"http:\n  listen: 127.0.0.1:{http_port}\n")
            if run_no == 0:
                validate_project(project)
            serve = start_intu_serve(project, target_port, base / f"{tag}-intu")
            middle = serve.proc
            if args.http:
                poller = DashboardPoller(http_port)
                poller.start()
        elif kind in ("orthanc", "orthanc_rest"):
            box = orthanc(base / tag, scp_port, lua=kind == "orthanc")
            middle, http_port, target_port, called = box.proc, box.http_port, box.port, box.ae_title
        else:
            raise ValueError(kind)
        cpu0 = tree_cpu_seconds(middle.pid) if middle else 0.0
        pids = [node.proc.pid for node in nodes if node.proc is not None]
        cpu0_nodes = [tree_cpu_seconds(pid) for pid in pids]
        t0 = time.perf_counter()
        # Senders at the same time, each with its share of the study: one per node with several
        # nodes, else --senders of them to the one target (modalities sending concurrently).
        targets = ports if len(nodes) > 1 else [target_port] * max(1, args.senders)
        if len(targets) > 1:
            files = sorted(study.folder.iterdir())
            extra_scus = [
                start_process(
                    peers.storescu_cmd(port, called, *files[i :: len(targets)]),
                    base / f"{tag}-storescu-{i}.log",
                    peer_env(),
                )
                for i, port in enumerate(targets[1:], start=1)
            ]
            scu_cmd = peers.storescu_cmd(target_port, called, *files[0 :: len(targets)])
        else:
            extra_scus = []
            scu_cmd = peers.storescu_cmd(target_port, called, study.folder)
        scu = start_process(scu_cmd, base / f"{tag}-storescu.log", peer_env())
        # Generous: a stalled association (intu's timeout_ms defaults to 60 s) that recovers
        # shows as a slow run whose instances all arrived, not as a lost instance.
        timeout = max(150.0, n * 0.5)
        if kind == "orthanc_rest":
            # Receive everything first (storescu ends when Orthanc has stored the last instance),
            # then ask Orthanc to forward the study: POST /modalities/target/store.
            for proc in (scu, *extra_scus):
                proc.wait(timeout)
            orthanc_rest_forward(http_port, timeout)
        t_end = wait_count(out_dir, n, timeout, alive=middle, stall=90.0)
        scu_rc = scu.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        for extra in extra_scus:
            scu_rc = scu_rc or extra.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        if t_end is None:
            # Give stragglers a moment, then report what arrived.
            res["arrived"] = count_files(out_dir)
            res["seconds"] = None
        else:
            res["arrived"] = n
            res["seconds"] = t_end - t0
        res["storescu_exit"] = scu_rc
        if t_end is not None:
            time.sleep(0.05)  # let the last file be completed before listing names
            res.update(study.received_uids_check(out_dir))
        if len(nodes) > 1:  # every node's CPU
            res["middle_cpu_seconds"] = sum(
                tree_cpu_seconds(pid) - c for pid, c in zip(pids, cpu0_nodes, strict=True)
            )
            res["middle_peak_rss_mib"] = max(proc_status_kib(pid, "VmHWM") / 1024 for pid in pids)
            res["middle_alive"] = all(node.proc is not None and node.proc.poll() is None for node in nodes)
        elif middle is not None:
            res["middle_cpu_seconds"] = tree_cpu_seconds(middle.pid) - cpu0
            res["middle_peak_rss_mib"] = proc_status_kib(middle.pid, "VmHWM") / 1024
            res["middle_alive"] = middle.poll() is None
        if res["seconds"] is None or scu_rc != 0 or not res.get("uids_match", True):
            res["log_tail"] = tail(base / f"{tag}-storescu.log", 8)
            if serve is not None:
                res["intu_log_tail"] = tail(serve.logs[-1], 20)
        if poller is not None:
            res["http_polls"] = poller.stop()
    finally:
        if poller is not None:
            poller.stop()
        for node in nodes[1:]:
            stop_intu_serve(node)
        stop_intu_serve(serve)
        if schema is not None and res.get("seconds") is not None:
            drop_postgres_schema(args.postgres_dsn, schema)
        elif schema is not None:  # incomplete: keep the queue to see where the missing ones are
            res["postgres_schema_kept"] = schema
            log(f"route {kind}: kept the queue's schema {schema} for inspection (drop it when done)")
        if box is not None:
            box.stop()
        scp.stop()
        shutil.rmtree(out_dir, ignore_errors=True)
        if kind != "direct":
            shutil.rmtree(base / tag, ignore_errors=True)
    return res


def run(args: argparse.Namespace, base: Path, study: Study, peers: Peers, results: dict[str, Any]) -> None:
    """storescu -> [nothing | intu serve | Orthanc with Lua | Orthanc with REST] -> storescp."""
    n = args.count
    out: dict[str, Any] = {
        "runs": {"direct": [], "intu": [], "intu_proc": [], "orthanc": [], "orthanc_rest": []},
        "notes": [],
    }
    postgres = args.queue == "postgres"
    if postgres:
        out["runs"].update({"intu_pg1": [], "intu_pg2": []})
    results["route"] = out
    if not peers.dcmtk:
        out["skipped"] = "DCMTK storescu/storescp not found at /usr/bin: route job skipped"
        log(out["skipped"])
        return
    out["senders"] = args.senders
    if args.http:
        out["notes"].append(
            "--http: intu serve with an http: block, polled like an open dashboard plus a Prometheus"
            " scraper (destinations and /metrics every second, a message search every 2 s)"
        )
    if args.senders > 1:
        out["notes"].append(
            f"{args.senders} storescu processes send at the same time, each a share of the study"
            " (round robin), to the same middle box (intu_pg2 keeps one sender per node)"
        )
    out["notes"].append(
        "storescp runs with --fork (one process per association) so that senders using several "
        "associations (intu: 2 queue threads) are not serialised; seconds = storescu start to the "
        "N-th file in storescp's output folder"
    )
    kinds = ["direct", "intu", "intu_proc", *(["intu_pg1", "intu_pg2"] if postgres else [])]
    out["notes"].append(
        "intu_proc: the same intu serve with delivery: {process: true} (queued destinations sent to"
        " from a process of their own); cpu s is both processes'"
    )
    if postgres:
        out["notes"].append(
            "intu_pg1/intu_pg2: one or two intu serve nodes on one PostgreSQL queue (a fresh schema per"
            " run, on this machine's server); with two nodes two storescu processes send half the study"
            " each, one per node; cpu s is the nodes' total (PostgreSQL's own CPU is not counted)"
        )
    if peers.orthanc:
        kinds += ["orthanc", "orthanc_rest"]
        out["notes"].append(
            "orthanc: default SQLite index + file storage in the temp folder, Lua "
            "OnStoredInstance -> SendToModality (pipelined), "
            f"DicomAssociationCloseDelay {ORTHANC_CLOSE_DELAY}"
        )
        out["notes"].append(
            "orthanc_rest: the same Orthanc without Lua; after storescu ends, "
            "POST /modalities/target/store {Resources: [study], Synchronous: true}"
        )
        out["notes"].append("the route target compares intu with the faster of the two Orthanc ways")
    else:
        why = "--skip-orthanc" if peers.orthanc_skipped else "Orthanc not found"
        out["notes"].append(f"Orthanc comparison skipped ({why})")
        log(f"route: Orthanc skipped ({why})")
    failure: str | None = None
    for r in range(args.runs):
        for kind in kinds:
            try:
                res = route_once(kind, args, base, study, peers, r)
            except IntuFailure:
                raise
            except Exception as exc:  # a peer did not start: record and go on
                if kind.startswith("intu"):
                    raise IntuFailure(f"route {kind}: {exc!r}") from exc
                res = {"error": repr(exc), "seconds": None}
            out["runs"][kind].append(res)
            secs = res.get("seconds")
            extra = ""
            if "middle_cpu_seconds" in res:
                extra = (
                    f", {kind} cpu {res['middle_cpu_seconds']:.1f} s, "
                    f"peak RSS {res['middle_peak_rss_mib']:.0f} MiB"
                )
            log(
                f"route run {r + 1}/{args.runs} {kind}: "
                + (f"{secs:.2f} s ({n / secs:.0f} img/s)" if secs else f"INCOMPLETE {res.get('arrived')}/{n}")
                + extra
            )
            if kind.startswith("intu") and (
                secs is None
                or not res.get("middle_alive", True)
                or not res.get("uids_match")
                or res.get("storescu_exit") != 0
            ):
                failure = (
                    f"route {kind} run {r + 1}: {res.get('arrived')}/{n} instances arrived at storescp, "
                    f"UIDs match={res.get('uids_match')} (missing {res.get('missing')}), storescu exit "
                    f"{res.get('storescu_exit')}, intu alive={res.get('middle_alive')}\n"
                    f"{res.get('log_tail', '')}\n{res.get('intu_log_tail', '')}"
                )
    med = {k: {"seconds": median([x.get("seconds") for x in v])} for k, v in out["runs"].items()}
    for v in med.values():
        v["images_per_s"] = n / v["seconds"] if v["seconds"] else None
    for k in ("intu", "intu_proc"):
        med[k]["cpu_seconds"] = median([x.get("middle_cpu_seconds") for x in out["runs"][k]])
    for k in ("orthanc", "orthanc_rest"):
        if out["runs"][k]:
            med[k]["cpu_seconds"] = median([x.get("middle_cpu_seconds") for x in out["runs"][k]])
    out["median"] = med
    i, d = med["intu"]["seconds"], med["direct"]["seconds"]
    orthancs = [v for v in (med["orthanc"]["seconds"], med["orthanc_rest"]["seconds"]) if v]
    o = min(orthancs) if orthancs else None
    out["ratios"] = {
        "intu_over_orthanc_seconds": i / o if i and o else None,
        "intu_over_orthanc_lua_seconds": i / med["orthanc"]["seconds"]
        if i and med["orthanc"]["seconds"]
        else None,
        "intu_over_orthanc_rest_seconds": (
            i / med["orthanc_rest"]["seconds"] if i and med["orthanc_rest"]["seconds"] else None
        ),
        "intu_over_direct_seconds": i / d if i and d else None,
        "intu_proc_over_orthanc_seconds": (
            med["intu_proc"]["seconds"] / o if med["intu_proc"]["seconds"] and o else None
        ),
        "orthanc_over_direct_seconds": o / d if o and d else None,
    }
    for k in ("intu_pg1", "intu_pg2"):
        pg = med.get(k, {}).get("seconds")
        if k in med:
            med[k]["cpu_seconds"] = median([x.get("middle_cpu_seconds") for x in out["runs"][k]])
            out["ratios"][f"{k}_over_intu_seconds"] = pg / i if pg and i else None
    if failure:
        raise IntuFailure(failure)
