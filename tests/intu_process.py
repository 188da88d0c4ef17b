"""Run `intu serve` as a real process for end-to-end tests, and write router projects for it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from intu_dicom_destination.testing import wait_for_port

REPO = Path(__file__).resolve().parents[1]
SEED_TRANSFORMER = REPO / "examples" / "channels" / "dicom-router" / "transformer.py"


def write_router_project(
    folder: Path,
    *,
    router_port: int,
    pacs_port: int,
    pacs_ae: str = "PACS",
    pacs_host: str = "127.0.0.1",
    retry: str = "{max_attempts: 0, backoff: exponential, initial_delay_ms: 200, max_delay_ms: 2000}",
    queue: str = "{enabled: true, threads: 2}",
    extra_root: str = "",
    transformer: Path | None = SEED_TRANSFORMER,
) -> Path:
    """A project with the seed's dicom-router channel forwarding to one DICOM destination."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "intu.yaml").write_text(
        textwrap.dedent(
            f"""\
            data_dir: data
            min_free_disk_mb: 0
            {extra_root}
            destinations:
              hospital-pacs:
                type: dicom
                dicom:
                  host: {pacs_host}
                  port: {pacs_port}
                  ae_title: INTU_ROUTER
                  called_ae_title: {pacs_ae}
                  timeout_ms: 30000
                retry: {retry}
                queue: {queue}
            """
        )
    )
    channel = folder / "channels" / "dicom-router"
    channel.mkdir(parents=True, exist_ok=True)
    (channel / "channel.yaml").write_text(
        textwrap.dedent(
            f"""\
            name: dicom-router
            source:
              type: dicom
              dicom: {{host: 127.0.0.1, port: {router_port}, ae_title: INTU_SCP}}
            destinations:
              - hospital-pacs
            """
        )
    )
    if transformer is not None:
        shutil.copy(transformer, channel / "transformer.py")
    return folder


class IntuProcess:
    """`intu serve --dir PROJECT` in a child process, its log in PROJECT/serve-N.log."""

    def __init__(self, project: Path, *, env: dict[str, str] | None = None) -> None:
        self.project = project
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self, *ports: int, timeout: float = 30.0) -> IntuProcess:
        log = self.project / f"serve-{len(self.logs)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "intu_core", "--dir", str(self.project), "serve"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        for port in ports:
            wait_for_port(port, timeout=timeout, proc=self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait; returns the exit code (negative for a signal)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as a power cut or the OOM killer would do."""
        self.stop(signal.SIGKILL)

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def __enter__(self) -> IntuProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
