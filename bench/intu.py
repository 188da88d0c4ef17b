"""intu as the benchmark runs it: this checkout's code, its projects, `intu serve` as a process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from intu_dicom_destination.testing import IntuProcess, intu_command, stop_process, write_router_project
from measure import tail
from peers import SCP_AET, peer_env

REPO = Path(__file__).resolve().parent.parent
INTU_SCP_AET = "INTU_SCP"
INTU_SCU_AET = "INTU_SCU"


class IntuFailure(Exception):
    """intu itself did not do its job (the only reason for a non-zero exit)."""


def intu_env() -> dict[str, str]:
    """The peers' environment, with this checkout first on PYTHONPATH: the code measured is this
    checkout's even when intu is not installed (a fresh clone)."""
    env = peer_env()
    paths = [str(REPO), str(REPO / "plugins" / "intu_dicom_destination")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def compile_checkout() -> None:
    """Byte-compile this checkout's Python files, as pip does when it installs intu: where
    PYTHONDONTWRITEBYTECODE is set (this machine sets it), every `intu` command would otherwise
    compile intu's sources again at start-up, ~0.3 s of CPU per command (measured 2026-12-03),
    which an installed intu never pays. The ``__pycache__`` folders are git-ignored."""
    import compileall

    for folder in (REPO / "intu_core", REPO / "plugins"):
        compileall.compile_dir(folder, quiet=1)


def write_send_project(folder: Path, scp_port: int) -> Path:
    """The destination ``storescp`` of `intu dicom send storescp` (no channel, no queue)."""
    return _write_project(folder, None, scp_port, queue=None)


def write_route_project(
    folder: Path, listen_port: int, scp_port: int, *, postgres: tuple[str, str] | None = None
) -> Path:
    """storescu -> channel ``route`` (a DICOM source on ``listen_port``) -> durable queue (2
    threads) -> destination ``storescp``. The queue is SQLite in the project's data folder, or with
    ``postgres=(dsn, schema)`` that PostgreSQL schema, shared by every node written with it."""
    project = _write_project(folder, listen_port, scp_port, queue="{enabled: true, threads: 2}")
    if postgres is not None:
        dsn, schema = postgres
        with (project / "intu.yaml").open("a") as config:
            config.write(f"queue:\n  backend: postgres\n  dsn: {json.dumps(dsn)}\n  schema: {schema}\n")
    return project


def drop_postgres_schema(dsn: str, schema: str) -> None:
    """Remove a benchmark run's queue tables (psycopg comes with the intu-postgres-queue plugin)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'.encode())


def _write_project(folder: Path, listen_port: int | None, scp_port: int, queue: str | None) -> Path:
    # Only what the benchmark sets; intu's defaults otherwise (retry, timeouts, min_free_disk_mb).
    return write_router_project(
        folder,
        router_port=listen_port,
        pacs_port=scp_port,
        destination="storescp",
        channel="route",
        router_ae=INTU_SCP_AET,
        pacs_ae=SCP_AET,
        sender_ae=INTU_SCU_AET,
        dicom={"max_pdu_length": 131072},
        retry=None,
        queue=queue,
        min_free_disk_mb=None,
    )


def validate_project(project: Path) -> None:
    """`intu validate`; IntuFailure when intu finds the benchmark's project wrong."""
    res = subprocess.run(
        intu_command(project, "validate"), capture_output=True, text=True, env=intu_env(), timeout=120
    )
    if res.returncode != 0:
        raise IntuFailure(f"intu validate failed for {project}:\n{res.stdout}\n{res.stderr}")


def start_intu_serve(project: Path, port: int, log_dir: Path) -> IntuProcess:
    """`intu serve` (at intu's default log level: what an operator runs), listening on ``port``."""
    serve = IntuProcess(project, log_dir, env=intu_env())
    try:
        return serve.start(port, timeout=60)
    except (RuntimeError, TimeoutError) as exc:
        stop_intu_serve(serve)
        raise IntuFailure(f"{exc}\n--- intu serve log ---\n{tail(serve.logs[-1])}") from exc


def stop_intu_serve(serve: IntuProcess | None) -> None:
    """SIGTERM, SIGKILL after 15 s."""
    if serve is not None:
        stop_process(serve.proc, grace=15.0)
