#!/usr/bin/env python3
"""intu benchmark: send, route, memory and idle, side by side with DCMTK and Orthanc (SPEC §9).

    python3 bench/run.py                      # N = 1000 instances of 512 KiB, 3 runs each
    python3 bench/run.py --count 20 --runs 1 --skip-memory --idle-seconds 3   # CI smoke run

Everything runs on loopback in a temporary folder that is removed at the end. Peers (DCMTK
``storescu``/``storescp``, Orthanc) are started with ``TCP_NODELAY=1`` in their environment.
Missing peers are reported and their jobs skipped. Exit status: 0 when every job that ran worked;
1 when intu itself failed (an instance did not arrive, a command failed, ``intu serve`` died);
2 for a usage error. See bench/README.md for what each number means.

Standard library only, plus what intu already depends on (pydicom, pynetdicom, numpy) and its
test support (``intu_dicom_destination.testing``). The jobs are in ``jobs/``, the peers in
``peers.py``, intu's side in ``intu.py``, the table and the targets in ``report.py``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# This checkout's intu and test support, even when they are not installed (a fresh clone).
_CHECKOUT = Path(__file__).resolve().parent.parent
sys.path[1:1] = [str(_CHECKOUT), str(_CHECKOUT / "plugins" / "intu_dicom_destination")]

from intu import REPO, IntuFailure, compile_checkout  # noqa: E402
from jobs import JOBS  # noqa: E402
from jobs.send import SENDERS as SEND_SENDERS  # noqa: E402
from measure import log  # noqa: E402
from peers import Peers  # noqa: E402
from report import evaluate_targets, git_commit, machine_info, render  # noqa: E402
from study import INSTANCE_KIB, generate_study  # noqa: E402


# -- main ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="bench/run.py")
    p.add_argument("--count", type=int, default=1000, help="instances of 512 KiB in the study (default 1000)")
    p.add_argument(
        "--runs", type=int, default=3, help="runs per measurement; the median is reported (default 3)"
    )
    p.add_argument(
        "--senders",
        type=int,
        default=1,
        help="route: concurrent storescu processes, each sending a share of the study (default 1)",
    )
    p.add_argument(
        "--http",
        action="store_true",
        help="route: intu serve with an http: block, polled as an open dashboard would be",
    )
    p.add_argument(
        "--send-senders",
        type=lambda text: [name for name in text.split(",") if name],
        default=list(SEND_SENDERS),
        metavar="NAMES",
        help="send: the senders to run, comma-separated, from " + ",".join(SEND_SENDERS) + " (default"
        " all; the plain pynetdicom ones take ~50 s a run at N = 1000)",
    )
    p.add_argument("--skip-memory", action="store_true", help="skip the 1 GiB instance job")
    p.add_argument("--skip-orthanc", action="store_true", help="do not compare with Orthanc")
    p.add_argument("--idle-seconds", type=float, default=30.0, help="idle measurement window (default 30)")
    p.add_argument(
        "--only",
        action="append",
        choices=["send", "route", "memory", "idle"],
        help="run only this job (repeatable; for investigations)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp folder (logs) for inspection")
    p.add_argument(
        "--queue",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="postgres: the route job also runs one and two intu serve nodes sharing a PostgreSQL queue"
        " (the intu-postgres-queue plugin installed; --postgres-dsn), against the SQLite figure",
    )
    p.add_argument(
        "--postgres-dsn",
        default=os.environ.get("INTU_BENCH_POSTGRES_DSN", ""),
        metavar="DSN",
        help="the PostgreSQL database for --queue postgres (default: $INTU_BENCH_POSTGRES_DSN); each run"
        " uses a schema of its own and drops it",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "results" / "latest.json",
        help="JSON results file (default bench/results/latest.json)",
    )
    a = p.parse_args(argv)
    if a.count < 1 or a.runs < 1 or a.idle_seconds <= 0:
        p.error("--count and --runs must be >= 1, --idle-seconds > 0")
    unknown = sorted(set(a.send_senders) - set(SEND_SENDERS))
    if unknown or not a.send_senders:
        p.error(f"--send-senders: choose from {','.join(SEND_SENDERS)} (got {','.join(unknown) or 'none'})")
    if a.queue == "postgres" and not a.postgres_dsn:
        p.error("--queue postgres needs --postgres-dsn DSN (or INTU_BENCH_POSTGRES_DSN)")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    peers = Peers(args.skip_orthanc)
    if not peers.dcmtk:
        log("DCMTK (storescu/storescp at /usr/bin) not found: send, route and memory jobs are skipped")
    if not peers.orthanc:
        log(
            "Orthanc "
            + ("skipped (--skip-orthanc)" if args.skip_orthanc else "not found: Orthanc comparison skipped")
        )
    jobs = set(args.only or ["send", "route", "memory", "idle"])
    if args.skip_memory:
        jobs.discard("memory")
    results: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(),
        "config": {
            "count": args.count,
            "runs": args.runs,
            "instance_kib": INSTANCE_KIB,
            "idle_seconds": args.idle_seconds,
            "jobs": sorted(jobs),
            "queue": args.queue,
        },
        "machine": machine_info(peers),
        "errors": [],
    }
    base = Path(tempfile.mkdtemp(prefix="intu-bench-"))
    intu_failed = False
    try:
        compile_checkout()
        study = generate_study(base / "study", args.count)
        results["config"]["study_bytes"] = study.total_bytes
        for name, job in JOBS.items():
            if name not in jobs:
                continue
            log(f"--- {name} ---")
            try:
                job(args, base, study, peers, results)
            except IntuFailure as exc:
                intu_failed = True
                results["errors"].append(f"{name}: intu failed: {exc}")
                log(f"{name}: INTU FAILED: {exc}")
            except Exception as exc:  # a peer or the harness; reported, not an intu failure
                results["errors"].append(f"{name}: harness/peer error: {exc!r}")
                log(f"{name}: error (not counted as an intu failure): {exc!r}")
    except KeyboardInterrupt:
        results["errors"].append("interrupted")
        intu_failed = True
    finally:
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["targets"] = evaluate_targets(results)
    results["total_seconds"] = time.perf_counter() - started
    text = render(results)
    print(text)
    print(f"\n(total {results['total_seconds']:.0f} s; JSON: {args.out})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 1 if intu_failed else 0


if __name__ == "__main__":
    sys.exit(main())
