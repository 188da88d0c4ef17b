"""The report: the targets met or not, the table, and what the JSON says about the machine."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

from intu import REPO
from measure import cmd_output
from peers import Peers

# Issue 12's (the first wave's were send >= 0.5x and route no slower than Orthanc). The route's
# ratio is the better of intu's two ways (one process, delivery process) over the faster of
# Orthanc's, for the senders of the run (`--senders`).
TARGETS = {
    "send": "intu dicom send >= 1.0 x DCMTK storescu throughput",
    "route": "storescu -> intu serve -> storescp 1.5x faster than Orthanc (seconds ratio <= 0.67)",
    "memory": "1 GiB instance routed end to end with intu serve peak RSS <= 256 MiB",
    "idle": "intu serve idle with listeners open <= 2 % of one core",
}


def fmt(v: Any, spec: str = ".2f", unit: str = "") -> str:
    """A number for the table; ``-`` when it was not measured."""
    if v is None:
        return "-"
    return f"{v:{spec}}{unit}"


def evaluate_targets(results: dict[str, Any]) -> dict[str, Any]:
    """Each target of TARGETS with its measured value and whether it is met (None: not measured)."""
    t: dict[str, Any] = {}
    send = results.get("send", {})
    r = (send.get("ratio_vs_storescu") or {}).get("intu")
    t["send"] = {"target": TARGETS["send"], "value": r, "met": (r >= 1.0) if r is not None else None}
    ratios = results.get("route", {}).get("ratios") or {}
    ways = ("intu_over_orthanc_seconds", "intu_proc_over_orthanc_seconds")
    measured = [ratios[way] for way in ways if ratios.get(way)]
    r = min(measured) if measured else None
    t["route"] = {"target": TARGETS["route"], "value": r, "met": (r <= 1 / 1.5) if r is not None else None}
    mem = results.get("memory", {})
    v = mem.get("peak_rss_mib")
    t["memory"] = {"target": TARGETS["memory"], "value": v, "met": (v <= 256) if v is not None else None}
    idle = results.get("idle", {})
    v = idle.get("fresh_percent_of_core")
    t["idle"] = {"target": TARGETS["idle"], "value": v, "met": (v <= 2.0) if v is not None else None}
    return t


def render(results: dict[str, Any]) -> str:
    """The table printed at the end of a run."""
    n = results["config"]["count"]
    lines = []
    m = results["machine"]
    lines.append(
        f"intu benchmark  {results['date']}  commit {results['git_commit']}  "
        f"N={n} x 512 KiB  runs={results['config']['runs']}  cores={m['cores']}  Python {m['python']}"
    )
    lines.append(
        f"peers: {m.get('dcmtk') or 'DCMTK missing'}; {m.get('orthanc') or 'Orthanc missing/skipped'}"
    )
    la0, la1 = m.get("loadavg_start"), m.get("loadavg_end")
    if la0 and la1:
        lines.append(
            f"load average (1 min) at start {la0[0]:.2f}, at end {la1[0]:.2f}"
            + ("  <- other work on this machine: figures are noisy" if la0[0] > 0.5 else "")
        )
    lines.append("")
    send = results.get("send", {"skipped": "not run (--only)"})
    lines.append("SEND  (files -> storescp --ignore --fork; median of runs; wall time incl. process start)")
    if send.get("skipped"):
        lines.append(f"  skipped: {send['skipped']}")
    elif send.get("median"):
        lines.append(f"  {'sender':<36}{'seconds':>9}{'img/s':>9}{'MB/s':>9}{'cpu s':>8}{'x storescu':>12}")
        labels = {
            "storescu": "DCMTK storescu",
            "pynetdicom": "plain pynetdicom send_c_store(path)",
            "pynetdicom_nodelay": "  same + TCP_NODELAY (reference)",
            "intu": "intu dicom send",
        }
        for k, label in labels.items():
            md = send["median"][k]
            lines.append(
                f"  {label:<36}{fmt(md['seconds']):>9}{fmt(md['images_per_s'], '.0f'):>9}"
                f"{fmt(md['mb_per_s'], '.0f'):>9}{fmt(md['cpu_seconds']):>8}"
                f"{fmt(send['ratio_vs_storescu'].get(k), '.3f'):>12}"
            )
    lines.append("")
    route = results.get("route", {"skipped": "not run (--only)"})
    senders = route.get("senders", 1)
    by = f"{senders} storescu at once" if senders > 1 else "storescu"
    lines.append(f"ROUTE ({by} -> X -> storescp --fork; seconds from the start to the N-th file; median)")
    if route.get("skipped"):
        lines.append(f"  skipped: {route['skipped']}")
    elif route.get("median"):
        d = route["median"]["direct"]["seconds"]
        lines.append(
            f"  {'path':<34}{'seconds':>9}{'img/s':>9}{'cpu s':>8}{'x direct':>10}  all UIDs arrived"
        )
        labels = {
            "direct": "storescu -> storescp (direct)",
            "intu": "intu serve (durable queue)",
            "intu_proc": "intu serve, delivery process",
            "orthanc": "Orthanc (store + Lua forward)",
            "orthanc_rest": "Orthanc (store, then REST store)",
        }
        if "intu_pg1" in route["runs"]:  # --queue postgres
            labels["intu_pg1"] = "intu, PostgreSQL queue, 1 node"
            labels["intu_pg2"] = "intu, PostgreSQL queue, 2 nodes"
        for k, label in labels.items():
            md = route["median"].get(k, {})
            if not route["runs"].get(k):
                lines.append(f"  {label:<34}{'skipped':>9}")
                continue
            s = md.get("seconds")
            lines.append(
                f"  {label:<34}{fmt(s):>9}{fmt(md.get('images_per_s'), '.0f'):>9}"
                f"{fmt(md.get('cpu_seconds')):>8}{fmt(s / d if s and d else None):>10}  "
                + ("yes" if all(x.get("uids_match") for x in route["runs"][k]) else "NO")
            )
        rt = route["ratios"]
        lines.append(
            f"  intu / Orthanc seconds: {fmt(rt.get('intu_over_orthanc_seconds'), '.3f')} (vs the faster "
            f"Orthanc way; Lua {fmt(rt.get('intu_over_orthanc_lua_seconds'), '.3f')}, "
            f"REST {fmt(rt.get('intu_over_orthanc_rest_seconds'), '.3f')}); with its delivery process: "
            f"{fmt(rt.get('intu_proc_over_orthanc_seconds'), '.3f')}"
        )
    lines.append("")
    mem = results.get("memory", {"skipped": "not run (--skip-memory / --only)"})
    lines.append("MEMORY (one 1 GiB instance: storescu -> intu serve -> storescp)")
    if mem.get("skipped"):
        lines.append(f"  skipped: {mem['skipped']}")
    else:
        lines.append(
            f"  intu serve peak RSS (VmHWM): {fmt(mem.get('peak_rss_mib'), '.0f', ' MiB')}   "
            f"before: {fmt(mem.get('rss_before_mib'), '.0f', ' MiB')}   "
            f"end to end: {fmt(mem.get('seconds'), '.1f', ' s')}"
        )
    lines.append("")
    idle = results.get("idle", {"skipped": "not run (--only)"})
    lines.append(
        f"IDLE (intu serve, listeners open, nothing arriving, {results['config']['idle_seconds']:g} s)"
    )
    if idle.get("skipped"):
        lines.append(f"  skipped: {idle['skipped']}")
    else:
        lines.append(
            f"  fresh: {fmt(idle.get('fresh_percent_of_core'), '.2f', ' %')} of one core   "
            f"after traffic: {fmt(idle.get('after_traffic_percent_of_core'), '.2f', ' %')}"
        )
    lines.append("")
    lines.append("TARGETS")
    for k, t in results["targets"].items():
        met = {True: "MET", False: "NOT MET", None: "not measured"}[t["met"]]
        val = "-" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"  {k:<7}{met:<13} value {val:<10} ({t['target']})")
    if results.get("errors"):
        lines.append("")
        lines.append("ERRORS")
        for e in results["errors"]:
            lines.append("  " + e.replace("\n", "\n    "))
    return "\n".join(lines)


def machine_info(peers: Peers) -> dict[str, Any]:
    """The machine, the libraries and the peers, for the header and the JSON."""
    import pydicom
    import pynetdicom

    cpu_model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "pydicom": pydicom.__version__,
        "pynetdicom": pynetdicom.__version__,
        "dcmtk": peers.dcmtk_version if peers.dcmtk else None,
        "orthanc": peers.orthanc_version,
        # Other processes compete for the 2 cores: a load average well above 0 at the start means
        # the figures of this run are noisy.
        "loadavg_start": os.getloadavg(),
    }


def git_commit() -> str:
    """The checkout's short commit, ``-dirty`` when tracked files are changed."""
    out = cmd_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    if not out or " " in out:
        return "unknown"
    dirty = cmd_output(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return out + ("-dirty" if dirty and "unavailable" not in dirty else "")
