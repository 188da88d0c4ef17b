"""`intu serve` as a real child process, and the router projects it runs, for end-to-end tests and
the benchmark."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from intu_dicom_destination.testing.peers import start_process, wait_for_port


def intu_command(project: Path, *args: str) -> list[str]:
    """The command line of `intu --dir PROJECT ARGS...` with this Python (no installed script needed)."""
    return [sys.executable, "-m", "intu_core", "--dir", str(project), *args]


def write_router_project(
    folder: Path,
    *,
    router_port: int | None,
    pacs_port: int,
    pacs_ae: str = "PACS",
    pacs_host: str = "127.0.0.1",
    destination: str = "hospital-pacs",
    channel: str = "dicom-router",
    router_ae: str = "INTU_SCP",
    sender_ae: str = "INTU_ROUTER",
    dicom: Mapping[str, object] | None = None,
    retry: str | None = "{max_attempts: 0, backoff: exponential, initial_delay_ms: 200, max_delay_ms: 2000}",
    queue: str | None = "{enabled: true, threads: 2}",
    min_free_disk_mb: int | None = 0,
    transformer: Path | None = None,
) -> Path:
    """A project whose channel ``channel`` (a DICOM source on ``router_port``) forwards to one DICOM
    destination ``destination`` (the PACS at ``pacs_host:pacs_port``); returns ``folder``.

    ``router_port=None`` writes no channel (a project for `intu dicom send`); ``dicom`` adds settings
    to the destination's ``dicom`` block (default ``timeout_ms: 30000``); ``retry``, ``queue`` and
    ``min_free_disk_mb`` set to None are left to intu's defaults; ``transformer`` is copied next to
    the channel."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"timeout_ms": 30000} if dicom is None else dicom
    lines = ["data_dir: data"]
    if min_free_disk_mb is not None:
        lines.append(f"min_free_disk_mb: {min_free_disk_mb}")
    lines += [
        "destinations:",
        f"  {destination}:",
        "    type: dicom",
        "    dicom:",
        f"      host: {pacs_host}",
        f"      port: {pacs_port}",
        f"      ae_title: {sender_ae}",
        f"      called_ae_title: {pacs_ae}",
        *(f"      {key}: {value}" for key, value in settings.items()),
    ]
    lines += [f"    retry: {retry}"] if retry is not None else []
    lines += [f"    queue: {queue}"] if queue is not None else []
    (folder / "intu.yaml").write_text("\n".join(lines) + "\n")
    folder.joinpath("channels").mkdir(exist_ok=True)
    if router_port is None:
        return folder
    channel_dir = folder / "channels" / channel
    channel_dir.mkdir(parents=True, exist_ok=True)
    (channel_dir / "channel.yaml").write_text(
        textwrap.dedent(
            f"""\
            name: {channel}
            source:
              type: dicom
              dicom: {{host: 127.0.0.1, port: {router_port}, ae_title: {router_ae}}}
            destinations:
              - {destination}
            """
        )
    )
    if transformer is not None:
        shutil.copy(transformer, channel_dir / "transformer.py")
    return folder


class IntuProcess:
    """`intu serve --dir PROJECT` in a child process, its log in LOG_DIR/serve-N.log (LOG_DIR: the
    project unless given)."""

    def __init__(
        self, project: Path, log_dir: Path | None = None, *, env: dict[str, str] | None = None
    ) -> None:
        self.project = project
        self.log_dir = log_dir or project
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    def start(self, *ports: int, timeout: float = 30.0) -> IntuProcess:
        """Start it and wait until it listens on each of ``ports``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"serve-{len(self.logs)}.log"
        self.logs.append(log)
        self.proc = start_process(intu_command(self.project, "serve"), log, self.env)
        for port in ports:
            wait_for_port(port, timeout=timeout, proc=self.proc, what="intu serve")
        return self

    def intu(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Another `intu` command on the same project and environment (while serve runs)."""
        return subprocess.run(
            intu_command(self.project, *args), env=self.env, capture_output=True, text=True, timeout=timeout
        )

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
        """Everything it logged, over all its starts."""
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def __enter__(self) -> IntuProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def wait_until(predicate: Callable[[], object], timeout: float = 60.0, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds have passed; its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
