"""memory: one 1 GiB instance routed storescu -> intu serve -> storescp; intu's peak RSS."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from intu import INTU_SCP_AET, IntuFailure, start_intu_serve, stop_intu_serve, write_route_project
from intu_dicom_destination.testing import IntuProcess, free_port, start_process
from measure import log, proc_status, proc_status_kib, tail
from peers import Peers, peer_env, storescp
from study import MIB, Study, generate_big_instance


def run(args: argparse.Namespace, base: Path, study: Study, peers: Peers, results: dict[str, Any]) -> None:
    """Peak RSS of `intu serve` while one 1 GiB instance goes storescu -> intu -> storescp."""
    out: dict[str, Any] = {"notes": []}
    results["memory"] = out
    if not peers.dcmtk:
        out["skipped"] = "DCMTK not found: memory job skipped"
        log(out["skipped"])
        return
    big_dir = base / "big"
    t0 = time.perf_counter()
    big = generate_big_instance(big_dir)
    out["instance_bytes"] = big.stat().st_size
    log(f"generated a {big.stat().st_size / MIB:.0f} MiB instance in {time.perf_counter() - t0:.1f} s")
    # +B: storescp streams the instance to its file instead of holding 1 GiB in its own memory.
    scp = storescp(base, "memory", ignore=False, extra=("+B",))
    scp_port, out_dir = scp.port, scp.folder
    out["notes"].append(
        "receiver: storescp --fork +B (bit-preserving: written to disk as it arrives); "
        "peak RSS = VmHWM of the intu serve process; rss_samples_mib every ~50 ms"
    )
    listen = free_port()
    project = write_route_project(base / "memory-project", listen, scp_port)
    serve: IntuProcess | None = None
    samples: list[tuple[float, int, int, int]] = []
    try:
        serve = start_intu_serve(project, listen, base / "memory-intu")
        intu = serve.proc
        time.sleep(1.0)
        out["rss_before_mib"] = proc_status_kib(intu.pid, "VmRSS") / 1024
        t0 = time.perf_counter()
        scu_cmd = peers.storescu_cmd(listen, INTU_SCP_AET, big)
        scu = start_process(scu_cmd, base / "memory-storescu.log", peer_env())
        deadline = t0 + 600
        done = None
        while time.perf_counter() < deadline:
            try:
                st = proc_status(intu.pid)
            except OSError:
                break
            samples.append(
                (time.perf_counter() - t0, st.get("VmRSS", 0), st.get("RssAnon", 0), st.get("RssFile", 0))
            )
            if intu.poll() is not None:
                break
            # storescp +B writes the file as it arrives: done when it reaches its final size
            # (input size, give or take the meta header storescp writes).
            files = [e for e in os.scandir(out_dir)] if out_dir.exists() else []
            if files and files[0].stat().st_size >= out["instance_bytes"] - 4096:
                done = time.perf_counter()
                break
            time.sleep(0.05)
        try:
            scu_rc = scu.wait(60)
        except subprocess.TimeoutExpired:
            scu_rc = None
        out["storescu_exit"] = scu_rc
        out["seconds"] = (done - t0) if done else None
        out["peak_rss_mib"] = proc_status_kib(intu.pid, "VmHWM") / 1024 if intu.poll() is None else None
        out["max_sampled_rss_mib"] = max((x[1] for x in samples), default=0) / 1024
        out["max_sampled_rss_anon_mib"] = max((x[2] for x in samples), default=0) / 1024
        out["max_sampled_rss_file_mib"] = max((x[3] for x in samples), default=0) / 1024
        out["rss_samples_columns"] = ["seconds", "VmRSS MiB", "RssAnon MiB", "RssFile MiB"]
        out["rss_samples_mib"] = [
            (round(t, 2), round(a / 1024, 1), round(b / 1024, 1), round(c / 1024, 1))
            for t, a, b, c in samples[:: max(1, len(samples) // 200)]
        ]
        log(
            f"memory: {'delivered' if done else 'NOT delivered'} in "
            f"{out['seconds'] or 0:.1f} s, intu peak RSS (VmHWM) {out['peak_rss_mib']} MiB"
        )
        if not done or out["peak_rss_mib"] is None:
            out["intu_log_tail"] = tail(serve.logs[-1], 20)
            raise IntuFailure(
                f"memory: the 1 GiB instance did not reach storescp through intu "
                f"(intu alive={intu.poll() is None}, storescu exit {scu_rc})\n{out['intu_log_tail']}"
            )
    finally:
        stop_intu_serve(serve)
        scp.stop()
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.rmtree(big_dir, ignore_errors=True)
        shutil.rmtree(base / "memory-project", ignore_errors=True)
