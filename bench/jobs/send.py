"""send: files -> storescp, by DCMTK storescu, plain pynetdicom and `intu dicom send`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from intu import IntuFailure, intu_env, validate_project, write_send_project
from intu_dicom_destination.testing import free_port, intu_command
from measure import log, median, run_timed, tail
from peers import SCP_AET, Peers, peer_env, storescp
from study import Study

# Every sender the job can run (bench/run.py --send-senders chooses), storescu the reference.
SENDERS = ("storescu", "pynetdicom", "pynetdicom_nodelay", "intu")

# Plain pynetdicom as its documentation shows it: one association, send_c_store(path) per file.
PYNETDICOM_SEND = r"""
import sys, time
from pathlib import Path
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
host, port, called, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
paths = sorted(p for p in folder.iterdir() if p.is_file())
ae = AE(ae_title="PYNETDICOM")
ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
assoc = ae.associate(host, port, ae_title=called)
if not assoc.is_established:
    sys.exit("association failed")
if len(sys.argv) > 5 and sys.argv[5] == "nodelay":
    import socket
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
bad = 0
for p in paths:
    st = assoc.send_c_store(str(p))
    if not st or st.Status != 0:
        bad += 1
assoc.release()
sys.exit(1 if bad else 0)
"""


def run(args: argparse.Namespace, base: Path, study: Study, peers: Peers, results: dict[str, Any]) -> None:
    """The same study sent by storescu, plain pynetdicom (with and without TCP_NODELAY) and `intu
    dicom send`, each to a fresh ``storescp --ignore --fork``."""
    n = args.count
    out: dict[str, Any] = {
        "runs": {name: [] for name in SENDERS},
        "notes": [],
    }
    results["send"] = out
    if not peers.dcmtk:
        out["skipped"] = "DCMTK storescu/storescp not found at /usr/bin: send job skipped"
        log(out["skipped"])
        return
    out["notes"].append(
        "receiver: storescp --ignore --fork (receives, discards; one process per association), "
        "a fresh storescp for every command"
    )
    out["notes"].append("times are wall seconds of the whole command, process start-up included")
    out["notes"].append(
        "pynetdicom: plain defaults (decode + re-encode, no chunked send, Nagle on), one "
        "association; pynetdicom_nodelay: the same with TCP_NODELAY set on its socket"
    )
    out["notes"].append("intu dicom send: the destination's defaults (max_associations 2)")
    timeout = max(120.0, n * 0.5)
    failure: str | None = None
    project = write_send_project(base / "send-project", free_port())
    validate_project(project)
    for r in range(args.runs):
        for name in getattr(args, "send_senders", SENDERS):
            scp = storescp(base, f"send-{name}-{r}", ignore=True)
            port = scp.port
            try:
                if name == "storescu":
                    cmd, env = peers.storescu_cmd(port, SCP_AET, study.folder), peer_env()
                elif name.startswith("pynetdicom"):
                    folder = str(study.folder)
                    cmd = [sys.executable, "-c", PYNETDICOM_SEND, "127.0.0.1", str(port), SCP_AET, folder]
                    cmd += ["nodelay"] if name.endswith("nodelay") else []
                    env = peer_env()
                else:
                    write_send_project(base / "send-project", port)
                    cmd = intu_command(project, "dicom", "send", "storescp", str(study.folder))
                    env = intu_env()
                log_path = base / f"send-{name}-{r}.log"
                res = run_timed(cmd, env, log_path, timeout)
            finally:
                scp.stop()
            res["images_per_s"] = n / res["seconds"]
            res["mb_per_s"] = study.total_bytes / 1e6 / res["seconds"]
            out["runs"][name].append(res)
            log(
                f"send run {r + 1}/{args.runs} {name}: {res['seconds']:.2f} s, "
                f"{res['images_per_s']:.0f} img/s, exit {res['exit']}, cpu {res['cpu_seconds']:.2f} s"
            )
            if name == "intu" and res["exit"] == 0 and f"sent {n} of {n} " not in tail(log_path, 3):
                res["exit"] = -1
                res["error"] = f"did not report {n} of {n} sent: {tail(log_path, 3)}"
            if res["exit"] != 0:
                res.setdefault("error", tail(log_path, 8))
                msg = f"send {name} run {r + 1} exited {res['exit']}: {res['error']}"
                out["notes"].append(msg)
                if name == "intu":
                    failure = failure or msg
    med: dict[str, dict[str, Any]] = {}
    for name, runs in out["runs"].items():
        ok = [x for x in runs if x["exit"] == 0]
        med[name] = {
            "seconds": median([x["seconds"] for x in ok]),
            "images_per_s": median([x["images_per_s"] for x in ok]),
            "mb_per_s": median([x["mb_per_s"] for x in ok]),
            "cpu_seconds": median([x["cpu_seconds"] for x in ok]),
        }
    out["median"] = med
    s = med["storescu"]["images_per_s"]
    out["ratio_vs_storescu"] = {
        k: (med[k]["images_per_s"] / s if s and med[k]["images_per_s"] else None) for k in med
    }
    out["failed_runs"] = {k: sum(1 for x in v if x["exit"] != 0) for k, v in out["runs"].items()}
    if failure:
        raise IntuFailure(failure)
