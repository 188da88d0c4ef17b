"""Queued destinations sent to from a process of their own (``delivery: {process: true}``), with
real ``intu serve`` processes: who sends, what a crash of either process costs, how they stop."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from project_files import fake_distribution, wait_for, write

from intu_core.config.problems import ConfigError
from intu_core.config.project import load_project
from intu_core.delivery_process import STALE_AFTER_S, STOP_LINE, DeliveryProcess
from intu_core.metrics import MetricsRegistry, merge_snapshots, snapshot_from_json, snapshot_to_json
from intu_core.reachability import DestinationState
from intu_core.testing import registry_with

# A source that hands over ``count`` messages once (a marker file remembers it did), and a
# destination that writes each message with the pid of the process that sent it.
PLUGIN = """
import json, os, threading, time, uuid
from pathlib import Path
from intu_core import hookimpl
from intu_core.message import Message, SendResult
from intu_core.types import DestinationType, SourceType

class Burst:
    def __init__(self, settings, runtime):
        self.count, self.marker = settings

    def start(self, deliver):
        if os.path.exists(self.marker):
            return
        def run():
            for n in range(self.count):
                deliver(Message(body={"n": n}))
            Path(self.marker).touch()
        threading.Thread(target=run, daemon=True).start()

    def stop(self):
        pass

class PidFile:
    def __init__(self, settings, runtime):
        self.directory, self.delay = settings

    def send(self, message):
        time.sleep(self.delay)
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"{message.body['n']}-{uuid.uuid4().hex}.json")
        with open(path + ".tmp", "w") as out:
            json.dump({"n": message.body["n"], "pid": os.getpid()}, out)
        os.replace(path + ".tmp", path)  # the test reads *.json while more are written
        return SendResult.success("written")

    def close(self):
        pass

def parse_burst(section):
    settings = (section.int("count", 10), section.str("marker"))
    section.done()
    return settings

def parse_pidfile(section):
    settings = (section.str("directory"), section.float("delay_s", 0.0))
    section.done()
    return settings

@hookimpl
def intu_source_types():
    return [SourceType("burst", parse_burst, Burst)]

@hookimpl
def intu_destination_types():
    return [DestinationType("pidfile", parse_pidfile, PidFile)]
"""


def project(tmp_path: Path, count: int, delay_s: float = 0.0, process: bool = True) -> Path:
    folder = tmp_path / "project"
    write(
        folder / "intu.yaml",
        f"""
        delivery: {{process: {str(process).lower()}}}
        destinations:
          archive:
            type: pidfile
            pidfile: {{directory: {tmp_path / "out"}, delay_s: {delay_s}}}
            queue: {{enabled: true, threads: 2}}
            retry: {{backoff: constant, initial_delay_ms: 50, max_delay_ms: 50}}
        """,
    )
    write(
        folder / "channels" / "inbound" / "channel.yaml",
        f"source: {{type: burst, burst: {{count: {count}, marker: {tmp_path / 'sent'}}}}}\n"
        "destinations: [archive]\n",
    )
    return folder


class Serve:
    """``intu serve`` on a project (in a process group of its own), its log read line by line."""

    def __init__(self, tmp_path: Path, folder: Path) -> None:
        site = tmp_path / "site"
        fake_distribution(
            site, "intu-burst", "0.0", {"burst": "fakeplugin_burst"}, {"fakeplugin_burst": PLUGIN}
        )
        env = {**os.environ, "PYTHONPATH": str(site)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "intu_core", "--dir", str(folder), "serve"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # so that a test can signal its whole group
        )
        self.lines: list[str] = []
        assert self.stderr_until("intu is serving"), "".join(self.lines)
        # Read the rest as it comes: a full pipe would block both processes' logging.
        self._rest = threading.Thread(target=self.stderr_until, args=("\0never\0",), daemon=True)
        self._rest.start()

    def stderr_until(self, text: str) -> bool:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if text in line:
                return True
        return False

    def delivery_pid(self) -> int:
        found = [re.search(r"process of their own \(pid (\d+)\)", line) for line in self.lines]
        (pid,) = [int(m.group(1)) for m in found if m]
        return pid

    def finish(self, timeout: float = 60) -> str:
        self.proc.wait(timeout)
        self._rest.join(timeout)
        return "".join(self.lines)


def delivered(tmp_path: Path) -> list[dict[str, int]]:
    out = tmp_path / "out"
    return [json.loads(p.read_text()) for p in out.glob("*.json")] if out.is_dir() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        # A zombie (exited, not yet reaped by its parent) is not running.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def test_queued_messages_are_sent_from_the_delivery_process_and_both_stop_on_sigterm(tmp_path):
    serve = Serve(tmp_path, project(tmp_path, count=30))
    pid = serve.delivery_pid()
    assert pid != serve.proc.pid and alive(pid)
    assert wait_for(lambda: len(delivered(tmp_path)) == 30)
    assert {d["n"] for d in delivered(tmp_path)} == set(range(30))
    # Every send ran in the delivery process, none in the engine.
    assert {d["pid"] for d in delivered(tmp_path)} == {pid}
    serve.proc.send_signal(signal.SIGTERM)
    log = serve.finish()
    assert serve.proc.returncode == 0, log
    assert "engine stopped" in log
    assert wait_for(lambda: not alive(pid), timeout=5), "the delivery process outlived the engine"


def test_without_the_setting_the_engine_sends_itself(tmp_path):
    serve = Serve(tmp_path, project(tmp_path, count=5, process=False))
    assert wait_for(lambda: len(delivered(tmp_path)) == 5)
    assert {d["pid"] for d in delivered(tmp_path)} == {serve.proc.pid}
    serve.proc.send_signal(signal.SIGTERM)
    assert serve.finish() and serve.proc.returncode == 0
    assert not any("process of their own" in line for line in serve.lines)


def test_a_delivery_process_that_dies_stops_the_engine_and_a_restart_sends_the_rest(tmp_path):
    folder = project(tmp_path, count=40, delay_s=0.1)
    serve = Serve(tmp_path, folder)
    pid = serve.delivery_pid()
    assert wait_for(lambda: len(delivered(tmp_path)) >= 3 and (tmp_path / "sent").exists())
    os.kill(pid, signal.SIGKILL)
    log = serve.finish()
    assert serve.proc.returncode == 1, log
    assert "the delivery process exited with status -9 while the engine was running" in log
    assert len({d["n"] for d in delivered(tmp_path)}) < 40
    # What was queued (and what was in flight) is sent after the restart: nothing is lost.
    again = Serve(tmp_path, folder)
    assert wait_for(lambda: {d["n"] for d in delivered(tmp_path)} == set(range(40)))
    again.proc.send_signal(signal.SIGTERM)
    assert again.finish() and again.proc.returncode == 0


def test_a_killed_engine_takes_its_delivery_process_with_it(tmp_path):
    serve = Serve(tmp_path, project(tmp_path, count=1))
    pid = serve.delivery_pid()
    serve.proc.kill()
    serve.finish()
    # Its wake-up pipe ends: it stops on its own, not orphaned.
    assert wait_for(lambda: not alive(pid), timeout=15), "the delivery process outlived a killed engine"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_whole_group_is_for_the_engine_which_stops_both_gracefully(tmp_path, signum):
    serve = Serve(tmp_path, project(tmp_path, count=20, delay_s=0.05))
    pid = serve.delivery_pid()
    assert wait_for(lambda: len(delivered(tmp_path)) >= 2)
    os.killpg(serve.proc.pid, signum)  # a terminal's Ctrl-C, or a service manager's stop
    log = serve.finish()
    assert serve.proc.returncode == 0, log
    assert "engine stopped" in log and "exited with status" not in log, log
    assert wait_for(lambda: not alive(pid), timeout=10)
    # What was not sent before the stop is sent after a restart (the source sends only once).
    again = Serve(tmp_path, project(tmp_path, count=20, delay_s=0.0))
    assert wait_for(lambda: {d["n"] for d in delivered(tmp_path)} == set(range(20)))
    again.proc.send_signal(signal.SIGTERM)
    assert again.finish() and again.proc.returncode == 0


def test_a_silent_delivery_process_shows_its_destinations_down(tmp_path):
    process = unstarted(tmp_path, waiting=3)
    never = process.state("archive")  # before its first report
    assert (never.up, never.last_error, never.waiting) == (False, "not reported", 3)
    process._states = {"archive": DestinationState(True, time.time())}  # a report long ago
    process._reported_at = time.monotonic() - STALE_AFTER_S - 1
    stale = process.state("archive")
    assert not stale.up and "has not reported for" in stale.last_error


def test_a_wake_up_after_the_stop_writes_nothing(tmp_path):
    process = unstarted(tmp_path, waiting=0)
    read_end, process._wake_fd = os.pipe()
    process.wake("archive")
    process.request_stop()
    process.wake("archive")  # a source still handing over while the engine stops
    with os.fdopen(read_end, "rb") as pipe:
        assert pipe.read() == b"archive\n" + STOP_LINE  # and the descriptor closed: end of file


def unstarted(tmp_path: Path, waiting: int) -> DeliveryProcess:
    """The engine's handle on a delivery process of the test project, not started."""
    loaded = load_project(project(tmp_path, count=1), registry_with(burst_plugin(tmp_path)))
    return DeliveryProcess(loaded, ["archive"], waiting=lambda queue: waiting, on_exit=lambda reason: None)


def burst_plugin(tmp_path: Path) -> object:
    """The test plugin, imported in this process (for load_project)."""
    import importlib.util

    path = tmp_path / "fakeplugin_burst_local.py"
    path.write_text(PLUGIN)
    spec = importlib.util.spec_from_file_location("fakeplugin_burst_local", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_setting_is_checked_with_file_line_and_key(tmp_path):
    folder = project(tmp_path, count=1)
    text = (folder / "intu.yaml").read_text().replace("process: true", "process: sometimes")
    (folder / "intu.yaml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_project(folder, registry_with())
    report = err.value.report()
    assert "intu.yaml:1" in report and "delivery.process" in report


def test_metrics_of_two_processes_are_added_up():
    engine, delivery = MetricsRegistry(), MetricsRegistry()
    for registry in (engine, delivery):
        registry.counter("intu_bytes_sent_total", "Bytes.", ["destination"]).labels("pacs").inc(10)
    delivery.counter("intu_messages_delivered_total", "Sent.", ["destination"]).labels("pacs").inc(3)
    delivery.histogram("intu_delivery_seconds", "Time.", ["destination"]).labels("pacs").observe(0.02)
    # The delivery process's snapshot crosses a pipe as JSON.
    engine.include(lambda: snapshot_from_json(json.loads(json.dumps(snapshot_to_json(delivery.collect())))))
    snapshot = engine.collect()
    assert snapshot.value("intu_bytes_sent_total", destination="pacs") == 20
    assert snapshot.value("intu_messages_delivered_total", destination="pacs") == 3
    assert snapshot.value("intu_delivery_seconds_count", destination="pacs") == 1
    assert snapshot.value("intu_delivery_seconds_bucket", destination="pacs", le="0.025") == 1
    assert [f.name for f in snapshot] == sorted(f.name for f in snapshot)
    assert merge_snapshots([snapshot]) == snapshot
