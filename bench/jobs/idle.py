"""idle: CPU of `intu serve` with its listeners open and nothing arriving."""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path
from typing import Any

from intu import INTU_SCP_AET, IntuFailure, start_intu_serve, stop_intu_serve, write_route_project
from intu_dicom_destination.testing import IntuProcess, free_port
from measure import log, proc_cpu_seconds, proc_status_kib, tail
from peers import Peers, peer_env, storescp
from study import Study


def run(args: argparse.Namespace, base: Path, study: Study, peers: Peers, results: dict[str, Any]) -> None:
    """CPU of ``intu serve`` over ``--idle-seconds``: (a) fresh, listeners open, nothing ever
    arrived; (b) right after routing a few instances (pooled associations may still be open)."""
    secs = args.idle_seconds
    out: dict[str, Any] = {"seconds": secs, "notes": []}
    results["idle"] = out
    listen = free_port()
    scp = storescp(base, "idle", ignore=True) if peers.dcmtk else None
    scp_port = scp.port if scp else free_port()  # nothing listens there without DCMTK
    project = write_route_project(base / "idle-project", listen, scp_port)
    serve: IntuProcess | None = None
    try:
        serve = start_intu_serve(project, listen, base / "idle-intu")
        intu = serve.proc
        time.sleep(2.0)  # let start-up settle
        c0, t0 = proc_cpu_seconds(intu.pid), time.perf_counter()
        time.sleep(secs)
        c1, t1 = proc_cpu_seconds(intu.pid), time.perf_counter()
        out["fresh_percent_of_core"] = 100 * (c1 - c0) / (t1 - t0)
        out["threads_fresh"] = proc_status_kib(intu.pid, "Threads")
        log(
            f"idle (fresh): {out['fresh_percent_of_core']:.2f} % of one core over {t1 - t0:.1f} s, "
            f"{out['threads_fresh']} threads"
        )
        if peers.dcmtk:
            files = sorted(study.folder.iterdir())[:5]
            subprocess.run(
                peers.storescu_cmd(listen, INTU_SCP_AET, *files),
                env=peer_env(),
                capture_output=True,
                timeout=60,
            )
            time.sleep(0.5)
            c0, t0 = proc_cpu_seconds(intu.pid), time.perf_counter()
            time.sleep(secs)
            c1, t1 = proc_cpu_seconds(intu.pid), time.perf_counter()
            out["after_traffic_percent_of_core"] = 100 * (c1 - c0) / (t1 - t0)
            out["threads_after_traffic"] = proc_status_kib(intu.pid, "Threads")
            out["notes"].append(
                "after_traffic: measured from 0.5 s after routing 5 instances; pooled "
                "associations are released after the destination's idle_timeout_ms (5 s)"
            )
            log(f"idle (after traffic): {out['after_traffic_percent_of_core']:.2f} % of one core")
        if intu.poll() is not None:
            raise IntuFailure(f"intu serve died while idle:\n{tail(serve.logs[-1])}")
    finally:
        stop_intu_serve(serve)
        if scp is not None:
            scp.stop()
