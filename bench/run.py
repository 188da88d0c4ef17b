#!/usr/bin/env python3
"""intu benchmark: send, route, memory and idle, side by side with DCMTK and Orthanc (SPEC §9).

    python3 bench/run.py                      # N = 1000 instances of 512 KiB, 3 runs each
    python3 bench/run.py --count 20 --runs 1 --skip-memory --idle-seconds 3   # CI smoke run

Everything runs on loopback in a temporary folder that is removed at the end. Peers (DCMTK
``storescu``/``storescp``, Orthanc) are started with ``TCP_NODELAY=1`` in their environment.
Missing peers are reported and their jobs skipped. Exit status: 0 when every job that ran worked;
1 when intu itself failed (an instance did not arrive, a command failed, ``intu serve`` died);
2 for a usage error. See bench/README.md for what each number means.

Standard library only, plus what intu already depends on (pydicom, pynetdicom, numpy).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
STORESCU = "/usr/bin/storescu"  # absolute: pyenv shims on PATH shadow DCMTK with pynetdicom's apps
STORESCP = "/usr/bin/storescp"
ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
SCP_AET = "STORESCP"
INTU_SCP_AET = "INTU_SCP"
INTU_SCU_AET = "INTU_SCU"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024

TARGETS = {
    "send": "intu dicom send >= 0.5 x DCMTK storescu throughput",
    "route": "storescu -> intu serve -> storescp end-to-end no slower than Orthanc",
    "memory": "1 GiB instance routed end to end with intu serve peak RSS <= 256 MiB",
    "idle": "intu serve idle with listeners open <= 2 % of one core",
}


# -- small helpers ------------------------------------------------------------------------------
class IntuFailure(Exception):
    """intu itself did not do its job (the only reason for a non-zero exit)."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"  # Debian's DCMTK: otherwise ~40 ms per image (delayed ACKs)
    return env


def intu_env() -> dict[str, str]:
    env = peer_env()
    # Run the intu of this checkout even when it is not installed (fresh clone).
    paths = [str(REPO), str(REPO / "plugins" / "intu_dicom_destination")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def intu_cmd(project: Path, *args: str) -> list[str]:
    # intu's default log level (info): what an operator runs; per-instance lines are at debug.
    return [sys.executable, "-m", "intu_core.cli", "--dir", str(project), *args]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening_ports() -> set[int] | None:
    ports: set[int] = set()
    found = False
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as fh:
                found = True
                next(fh, None)
                for line in fh:
                    parts = line.split()
                    if len(parts) > 3 and parts[3] == "0A":  # TCP_LISTEN
                        ports.add(int(parts[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports if found else None


def wait_listening(port: int, proc: subprocess.Popen | None, timeout: float, what: str) -> None:
    """Wait until something listens on ``port`` (read from /proc/net/tcp so that we do not open
    a stray connection that a one-association-at-a-time peer would have to deal with)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening on {port}")
        ports = _listening_ports()
        if ports is None:  # no /proc: fall back to a connect
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                pass
        elif port in ports:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def start(cmd: list[str], log_path: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    fh = open(log_path, "ab")
    try:
        # Own session: the whole group (storescp --fork children included) is ended by its id.
        return subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    finally:
        fh.close()


def stop(proc: subprocess.Popen | None, grace: float = 15.0) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            log(f"pid {proc.pid} ignored SIGTERM for {grace:.0f} s: SIGKILL")
    try:  # leftovers of the group (forked children), then the leader if still there
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def run_timed(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float) -> dict[str, Any]:
    """Run a command to its end; wall seconds plus the child's CPU seconds and max RSS (wait4)."""
    with open(log_path, "ab") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = t0 + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.002)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "seconds": wall,
        "exit": proc.returncode,
        "timed_out": time.perf_counter() > deadline,
        "cpu_seconds": ru.ru_utime + ru.ru_stime,
        "max_rss_mib": ru.ru_maxrss / 1024,
    }


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def proc_status(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/status (VmRSS, VmHWM, RssAnon, RssFile, ...) and Threads."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit() and (len(parts) == 1 or parts[1] == "kB"):
                out[key] = int(parts[0])
    return out


def proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def count_files(folder: Path) -> int:
    try:
        return sum(1 for e in os.scandir(folder) if not e.name.startswith("."))
    except FileNotFoundError:
        return 0


def wait_count(
    folder: Path,
    n: int,
    timeout: float,
    alive: subprocess.Popen | None = None,
    poll: float = 0.005,
    stall: float = 30.0,
) -> float | None:
    """perf_counter() when ``folder`` first holds ``n`` files, or None on timeout, when nothing new
    arrived for ``stall`` seconds, or when ``alive`` died and nothing more arrives."""
    deadline = time.perf_counter() + timeout
    last, last_change = -1, time.perf_counter()
    while True:
        now = time.perf_counter()
        c = count_files(folder)
        if c >= n:
            return now
        if c != last:
            last, last_change = c, now
        if now > deadline or now - last_change > stall:
            return None
        if alive is not None and alive.poll() is not None and now - last_change > 2.0:
            return None
        time.sleep(poll)


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def cmd_output(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"


# -- study generation ------------------------------------------------------------------------------
STUDY_UIDS: set[str] = set()


def received_uids_check(out_dir: Path) -> dict[str, Any]:
    """Compare storescp's file names (``<modality>.<SOP Instance UID>``) with the study."""
    got = set()
    for name in os.listdir(out_dir):
        prefix, _, uid = name.partition(".")
        got.add(uid or prefix)
    return {
        "uids_match": got == STUDY_UIDS,
        "missing": len(STUDY_UIDS - got),
        "unexpected": len(got - STUDY_UIDS),
    }


def generate_study(folder: Path, count: int) -> tuple[list[Path], int]:
    from intu_dicom_destination.samples import write_ct_series

    t0 = time.perf_counter()
    paths = write_ct_series(folder, count, size_kib=512)
    total = sum(p.stat().st_size for p in paths)
    global STUDY_UIDS
    STUDY_UIDS = set()
    from pydicom import dcmread

    for p in paths:
        STUDY_UIDS.add(
            str(dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        )
    log(f"generated {count} instances ({total / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return paths, total


def generate_big_instance(folder: Path, size_bytes: int = 1024 * MIB) -> Path:
    """One CT instance with ``size_bytes`` of pixel data, written without holding it in memory:
    the Part-10 header through pydicom (no PixelData), then the PixelData element header and
    the bytes in 8 MiB chunks."""
    import struct

    from intu_dicom_destination.samples import ct_instance
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    ds = ct_instance(study_uid=generate_uid(), series_uid=generate_uid(), number=1, size_kib=1)
    del ds.PixelData
    pixels = size_bytes // 2
    cols = 32768
    rows = pixels // cols
    assert rows <= 0xFFFF and rows * cols * 2 == size_bytes, "size must be a multiple of 64 KiB, <= 4 GiB"
    ds.Rows, ds.Columns = rows, cols
    path = folder / "CT-1GiB.dcm"
    ds.save_as(path, enforce_file_format=True)
    chunk = bytes(range(256)) * (8 * MIB // 256)
    with open(path, "ab") as fh:
        # (7FE0,0010) OW, explicit VR little endian: tag, VR, 2 reserved bytes, 4-byte length.
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, size_bytes))
        left = size_bytes
        while left:
            n = min(left, len(chunk))
            fh.write(chunk[:n])
            left -= n
    return path


# -- peers -----------------------------------------------------------------------------------------
class Peers:
    def __init__(self, skip_orthanc: bool) -> None:
        self.dcmtk = all(os.access(p, os.X_OK) for p in (STORESCU, STORESCP))
        self.dcmtk_version = cmd_output([STORESCU, "--version"]).splitlines()[0] if self.dcmtk else None
        if self.dcmtk and "dcmtk" not in (self.dcmtk_version or "").lower():
            self.dcmtk = False  # not DCMTK (e.g. a pynetdicom app of the same name)
        self.orthanc: str | None = None
        self.orthanc_version: str | None = None
        self.orthanc_skipped = skip_orthanc
        if not skip_orthanc:
            found = shutil.which("Orthanc")
            for cand in ([found] if found else []) + list(ORTHANC_CANDIDATES):
                if cand and os.access(cand, os.X_OK):
                    self.orthanc = cand
                    break
            if self.orthanc:
                self.orthanc_version = cmd_output([self.orthanc, "--version"]).splitlines()[0]


def start_storescp(
    base: Path, tag: str, *, ignore: bool, fork: bool = True, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, int, Path]:
    port = free_port()
    out = base / f"scp-{tag}"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [STORESCP, "-aet", SCP_AET, "-od", str(out)]
    if fork:
        cmd.append("--fork")
    if ignore:
        cmd.append("--ignore")
    cmd.extend(extra)
    cmd.append(str(port))
    proc = start(cmd, base / f"storescp-{tag}.log", peer_env())
    wait_listening(port, proc, 10, "storescp")
    return proc, port, out


def storescu_cmd(port: int, called: str, source: Path) -> list[str]:
    src = ["+sd", str(source)] if source.is_dir() else [str(source)]
    return [STORESCU, "-aec", called, "127.0.0.1", str(port), *src]


# -- intu projects -------------------------------------------------------------------------------
def write_send_project(folder: Path, scp_port: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "channels").mkdir(exist_ok=True)
    (folder / "intu.yaml").write_text(
        f"""# generated by bench/run.py: the destination of `intu dicom send storescp`
channels_dir: channels
data_dir: {folder / "data"}
destinations:
  storescp:
    type: dicom
    dicom:
      host: 127.0.0.1
      port: {scp_port}
      called_ae_title: {SCP_AET}
      ae_title: {INTU_SCU_AET}
      max_pdu_length: 131072
"""
    )
    return folder


def write_route_project(folder: Path, listen_port: int, scp_port: int) -> Path:
    (folder / "channels" / "route").mkdir(parents=True, exist_ok=True)
    (folder / "intu.yaml").write_text(
        f"""# generated by bench/run.py: storescu -> intu serve (durable queue) -> storescp
channels_dir: channels
data_dir: {folder / "data"}
destinations:
  storescp:
    type: dicom
    dicom:
      host: 127.0.0.1
      port: {scp_port}
      called_ae_title: {SCP_AET}
      ae_title: {INTU_SCU_AET}
      max_pdu_length: 131072
    queue: {{enabled: true, threads: 2}}
"""
    )
    (folder / "channels" / "route" / "channel.yaml").write_text(
        f"""name: route
description: benchmark route, storescu -> intu -> storescp
source:
  type: dicom
  dicom:
    host: 127.0.0.1
    port: {listen_port}
    ae_title: {INTU_SCP_AET}
destinations:
  - storescp
"""
    )
    return folder


def validate_project(project: Path, base: Path) -> None:
    res = subprocess.run(
        intu_cmd(project, "validate"), capture_output=True, text=True, env=intu_env(), timeout=120
    )
    if res.returncode != 0:
        raise IntuFailure(f"intu validate failed for {project}:\n{res.stdout}\n{res.stderr}")


def start_intu_serve(project: Path, port: int, log_path: Path) -> subprocess.Popen:
    proc = start(intu_cmd(project, "serve"), log_path, intu_env())
    try:
        wait_listening(port, proc, 60, "intu serve")
    except RuntimeError as exc:
        stop(proc)
        raise IntuFailure(f"{exc}\n--- intu serve log ---\n{tail(log_path)}") from exc
    return proc


# -- jobs: send -------------------------------------------------------------------------------------
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


def job_send(
    args: argparse.Namespace, base: Path, study: Path, total_bytes: int, peers: Peers, results: dict[str, Any]
) -> None:
    n = args.count
    out: dict[str, Any] = {
        "runs": {"storescu": [], "pynetdicom": [], "pynetdicom_nodelay": [], "intu": []},
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
    validate_project(project, base)
    for r in range(args.runs):
        for name in ("storescu", "pynetdicom", "pynetdicom_nodelay", "intu"):
            scp, port, _ = start_storescp(base, f"send-{name}-{r}", ignore=True, fork=True)
            try:
                if name == "storescu":
                    cmd, env = storescu_cmd(port, SCP_AET, study), peer_env()
                elif name.startswith("pynetdicom"):
                    cmd = [sys.executable, "-c", PYNETDICOM_SEND, "127.0.0.1", str(port), SCP_AET, str(study)]
                    cmd += ["nodelay"] if name.endswith("nodelay") else []
                    env = peer_env()
                else:
                    write_send_project(base / "send-project", port)
                    cmd, env = intu_cmd(project, "dicom", "send", "storescp", str(study)), intu_env()
                log_path = base / f"send-{name}-{r}.log"
                res = run_timed(cmd, env, log_path, timeout)
            finally:
                stop(scp)
            res["images_per_s"] = n / res["seconds"]
            res["mb_per_s"] = total_bytes / 1e6 / res["seconds"]
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


# -- jobs: route --------------------------------------------------------------------------------------
ORTHANC_CLOSE_DELAY = int(os.environ.get("INTU_BENCH_ORTHANC_CLOSE_DELAY", "1"))
ORTHANC_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  SendToModality(instanceId, 'target')
end
"""


def start_orthanc(
    peers: Peers, folder: Path, scp_port: int, lua: bool = True
) -> tuple[subprocess.Popen, int, int]:
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    (folder / "forward.lua").write_text(ORTHANC_LUA)
    config = {
        "Name": "intu-bench",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "StorageCompression": False,
        "HttpPort": http_port,
        "HttpServerEnabled": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "DicomModalities": {"target": [SCP_AET, "127.0.0.1", scp_port]},
        "DicomAssociationCloseDelay": ORTHANC_CLOSE_DELAY,
        "LuaScripts": [str(folder / "forward.lua")] if lua else [],
        "Plugins": [],
        "SaveJobs": False,
        "JobsHistorySize": 10,
    }
    cfg = folder / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    proc = start([peers.orthanc or "Orthanc", str(cfg)], folder / "orthanc.log", peer_env(), cwd=folder)
    deadline = time.monotonic() + 60
    import urllib.request

    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited ({proc.returncode}):\n{tail(folder / 'orthanc.log')}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/system", timeout=1) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"Orthanc did not answer on HTTP {http_port}:\n{tail(folder / 'orthanc.log')}")
        time.sleep(0.1)
    wait_listening(dicom_port, proc, 20, "Orthanc DICOM")
    return proc, http_port, dicom_port


def orthanc_rest_forward(http_port: int, timeout: float) -> None:
    import urllib.request

    base_url = f"http://127.0.0.1:{http_port}"
    with urllib.request.urlopen(f"{base_url}/studies", timeout=30) as resp:
        studies = json.load(resp)
    body = json.dumps({"Resources": studies, "Synchronous": True}).encode()
    req = urllib.request.Request(
        f"{base_url}/modalities/target/store",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        resp.read()


def route_once(
    kind: str, args: argparse.Namespace, base: Path, study: Path, peers: Peers, run_no: int
) -> dict[str, Any]:
    """One end-to-end run: storescu -> [intu | Orthanc | nothing] -> storescp --fork. Seconds
    from storescu's start to storescp's output folder holding N files."""
    n = args.count
    tag = f"route-{kind}-{run_no}"
    scp, scp_port, out_dir = start_storescp(base, tag, ignore=False, fork=True)
    middle: subprocess.Popen | None = None
    res: dict[str, Any] = {}
    try:
        if kind == "direct":
            target_port, called = scp_port, SCP_AET
        elif kind == "intu":
            target_port, called = free_port(), INTU_SCP_AET
            project = write_route_project(base / tag, target_port, scp_port)
            if run_no == 0:
                validate_project(project, base)
            middle = start_intu_serve(project, target_port, base / f"{tag}-intu.log")
        elif kind in ("orthanc", "orthanc_rest"):
            middle, http_port, target_port = start_orthanc(peers, base / tag, scp_port, lua=kind == "orthanc")
            called = "ORTHANC"
        else:
            raise ValueError(kind)
        cpu0 = proc_cpu_seconds(middle.pid) if middle else 0.0
        t0 = time.perf_counter()
        scu = start(storescu_cmd(target_port, called, study), base / f"{tag}-storescu.log", peer_env())
        # Generous: a stalled association (intu's timeout_ms defaults to 60 s) that recovers
        # shows as a slow run whose instances all arrived, not as a lost instance.
        timeout = max(150.0, n * 0.5)
        if kind == "orthanc_rest":
            # Receive everything first (storescu ends when Orthanc has stored the last instance),
            # then ask Orthanc to forward the study: POST /modalities/target/store.
            scu.wait(timeout)
            orthanc_rest_forward(http_port, timeout)
        t_end = wait_count(out_dir, n, timeout, alive=middle, stall=90.0)
        scu_rc = scu.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
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
            res.update(received_uids_check(out_dir))
        if middle is not None:
            res["middle_cpu_seconds"] = proc_cpu_seconds(middle.pid) - cpu0
            res["middle_peak_rss_mib"] = proc_status_kib(middle.pid, "VmHWM") / 1024
            res["middle_alive"] = middle.poll() is None
        if res["seconds"] is None or scu_rc != 0 or not res.get("uids_match", True):
            res["log_tail"] = tail(base / f"{tag}-storescu.log", 8)
            if kind == "intu":
                res["intu_log_tail"] = tail(base / f"{tag}-intu.log", 20)
    finally:
        stop(middle)
        stop(scp)
        shutil.rmtree(out_dir, ignore_errors=True)
        if kind != "direct":
            shutil.rmtree(base / tag, ignore_errors=True)
    return res


def job_route(
    args: argparse.Namespace, base: Path, study: Path, peers: Peers, results: dict[str, Any]
) -> None:
    n = args.count
    out: dict[str, Any] = {"runs": {"direct": [], "intu": [], "orthanc": [], "orthanc_rest": []}, "notes": []}
    results["route"] = out
    if not peers.dcmtk:
        out["skipped"] = "DCMTK storescu/storescp not found at /usr/bin: route job skipped"
        log(out["skipped"])
        return
    out["notes"].append(
        "storescp runs with --fork (one process per association) so that senders using several "
        "associations (intu: 2 queue threads) are not serialised; seconds = storescu start to the "
        "N-th file in storescp's output folder"
    )
    kinds = ["direct", "intu"]
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
                if kind == "intu":
                    raise IntuFailure(f"route intu: {exc!r}") from exc
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
            if kind == "intu" and (
                secs is None
                or not res.get("middle_alive", True)
                or not res.get("uids_match")
                or res.get("storescu_exit") != 0
            ):
                failure = (
                    f"route intu run {r + 1}: {res.get('arrived')}/{n} instances arrived at storescp, "
                    f"UIDs match={res.get('uids_match')} (missing {res.get('missing')}), storescu exit "
                    f"{res.get('storescu_exit')}, intu alive={res.get('middle_alive')}\n"
                    f"{res.get('log_tail', '')}\n{res.get('intu_log_tail', '')}"
                )
    med = {k: {"seconds": median([x.get("seconds") for x in v])} for k, v in out["runs"].items()}
    for v in med.values():
        v["images_per_s"] = n / v["seconds"] if v["seconds"] else None
    med["intu"]["cpu_seconds"] = median([x.get("middle_cpu_seconds") for x in out["runs"]["intu"]])
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
        "orthanc_over_direct_seconds": o / d if o and d else None,
    }
    if failure:
        raise IntuFailure(failure)


# -- jobs: memory --------------------------------------------------------------------------------------
def job_memory(args: argparse.Namespace, base: Path, peers: Peers, results: dict[str, Any]) -> None:
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
    scp, scp_port, out_dir = start_storescp(base, "memory", ignore=False, fork=True, extra=("+B",))
    out["notes"].append(
        "receiver: storescp --fork +B (bit-preserving: written to disk as it arrives); "
        "peak RSS = VmHWM of the intu serve process; rss_samples_mib every ~50 ms"
    )
    listen = free_port()
    project = write_route_project(base / "memory-project", listen, scp_port)
    intu: subprocess.Popen | None = None
    samples: list[tuple[float, int, int, int]] = []
    try:
        intu = start_intu_serve(project, listen, base / "memory-intu.log")
        time.sleep(1.0)
        out["rss_before_mib"] = proc_status_kib(intu.pid, "VmRSS") / 1024
        t0 = time.perf_counter()
        scu = start(storescu_cmd(listen, INTU_SCP_AET, big), base / "memory-storescu.log", peer_env())
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
            out["intu_log_tail"] = tail(base / "memory-intu.log", 20)
            raise IntuFailure(
                f"memory: the 1 GiB instance did not reach storescp through intu "
                f"(intu alive={intu.poll() is None}, storescu exit {scu_rc})\n{out['intu_log_tail']}"
            )
    finally:
        stop(intu)
        stop(scp)
        shutil.rmtree(out_dir, ignore_errors=True)
        shutil.rmtree(big_dir, ignore_errors=True)
        shutil.rmtree(base / "memory-project", ignore_errors=True)


# -- jobs: idle ---------------------------------------------------------------------------------------
def job_idle(
    args: argparse.Namespace, base: Path, study: Path, peers: Peers, results: dict[str, Any]
) -> None:
    """CPU of ``intu serve`` over ``--idle-seconds``: (a) fresh, listeners open, nothing ever
    arrived; (b) right after routing a few instances (pooled associations may still be open)."""
    secs = args.idle_seconds
    out: dict[str, Any] = {"seconds": secs, "notes": []}
    results["idle"] = out
    listen = free_port()
    scp = None
    scp_port = free_port()  # nothing listens there unless DCMTK is present
    if peers.dcmtk:
        scp, scp_port, out_dir = start_storescp(base, "idle", ignore=True, fork=True)
    project = write_route_project(base / "idle-project", listen, scp_port)
    intu: subprocess.Popen | None = None
    try:
        intu = start_intu_serve(project, listen, base / "idle-intu.log")
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
            files = sorted(study.iterdir())[:5]
            subprocess.run(
                [STORESCU, "-aec", INTU_SCP_AET, "127.0.0.1", str(listen), *map(str, files)],
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
            raise IntuFailure(f"intu serve died while idle:\n{tail(base / 'idle-intu.log')}")
    finally:
        stop(intu)
        stop(scp)


# -- report -------------------------------------------------------------------------------------------
def fmt(v: Any, spec: str = ".2f", unit: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:{spec}}{unit}"


def evaluate_targets(results: dict[str, Any]) -> dict[str, Any]:
    t: dict[str, Any] = {}
    send = results.get("send", {})
    r = (send.get("ratio_vs_storescu") or {}).get("intu")
    t["send"] = {"target": TARGETS["send"], "value": r, "met": (r >= 0.5) if r is not None else None}
    route = results.get("route", {})
    r = (route.get("ratios") or {}).get("intu_over_orthanc_seconds")
    t["route"] = {"target": TARGETS["route"], "value": r, "met": (r <= 1.0) if r is not None else None}
    mem = results.get("memory", {})
    v = mem.get("peak_rss_mib")
    t["memory"] = {"target": TARGETS["memory"], "value": v, "met": (v <= 256) if v is not None else None}
    idle = results.get("idle", {})
    v = idle.get("fresh_percent_of_core")
    t["idle"] = {"target": TARGETS["idle"], "value": v, "met": (v <= 2.0) if v is not None else None}
    return t


def render(results: dict[str, Any]) -> str:
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
    lines.append("ROUTE (storescu -> X -> storescp --fork; seconds from storescu start to N-th file; median)")
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
            "orthanc": "Orthanc (store + Lua forward)",
            "orthanc_rest": "Orthanc (store, then REST store)",
        }
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
            f"REST {fmt(rt.get('intu_over_orthanc_rest_seconds'), '.3f')})"
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
    out = cmd_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    if not out or " " in out:
        return "unknown"
    dirty = cmd_output(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return out + ("-dirty" if dirty and "unavailable" not in dirty else "")


# -- main ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="bench/run.py")
    p.add_argument("--count", type=int, default=1000, help="instances of 512 KiB in the study (default 1000)")
    p.add_argument(
        "--runs", type=int, default=3, help="runs per measurement; the median is reported (default 3)"
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
        "--out",
        type=Path,
        default=REPO / "bench" / "results" / "latest.json",
        help="JSON results file (default bench/results/latest.json)",
    )
    a = p.parse_args(argv)
    if a.count < 1 or a.runs < 1 or a.idle_seconds <= 0:
        p.error("--count and --runs must be >= 1, --idle-seconds > 0")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Import intu's sample generator from this checkout even if intu is not installed.
    for extra in (REPO / "plugins" / "intu_dicom_destination", REPO):
        if str(extra) not in sys.path:
            sys.path.insert(0, str(extra))
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
            "instance_kib": 512,
            "idle_seconds": args.idle_seconds,
            "jobs": sorted(jobs),
        },
        "machine": machine_info(peers),
        "errors": [],
    }
    base = Path(tempfile.mkdtemp(prefix="intu-bench-"))
    intu_failed = False
    try:
        study = base / "study"
        _, total = generate_study(study, args.count)
        results["config"]["study_bytes"] = total
        # Warm the page cache so that the first sender does not pay for it alone.
        for p in study.iterdir():
            with open(p, "rb") as fh:
                while fh.read(4 * MIB):
                    pass
        job_list = [
            ("send", lambda: job_send(args, base, study, total, peers, results)),
            ("route", lambda: job_route(args, base, study, peers, results)),
            ("memory", lambda: job_memory(args, base, peers, results)),
            ("idle", lambda: job_idle(args, base, study, peers, results)),
        ]
        for name, fn in job_list:
            if name not in jobs:
                continue
            log(f"--- {name} ---")
            try:
                fn()
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
