"""Queued destinations sent to from a process of their own (``delivery: {process: true}``).

In one process, receiving (a source's thread: the file, its checks, the enqueue) and delivering
(claim, send, settle) take turns on one interpreter lock, so a router uses one core however many
it has. With ``process: true``, ``intu serve`` starts one more process, ``intu delivery-process``,
that runs the delivery workers of every queued destination; the engine keeps the sources, the
channels, unqueued destinations and the channels' replay queues. The two share the queue store
(SQLite in WAL mode, or PostgreSQL), which holds every entry and lease, so all that crosses
between them is small:

- engine → delivery process (a pipe): a queue's name and a newline after each enqueue or
  operator retry, to wake its workers. A full pipe drops the wake-up rather than block a source
  (the workers look at the queue every few seconds anyway). An empty line: stop.
- delivery process → engine (a pipe): a JSON line twice a second and a last one at exit, with its
  metrics (added to the engine's ``/metrics``) and each destination's up/down state (for
  ``/readyz`` and the dashboard; ``waiting`` is counted by the engine when asked).

Lifecycle: the engine starts it after recovering the queue and before any source listens, and
waits for its first line, which must name the queues the engine expects. To stop, the engine
writes an empty line: the delivery process lets its sends in flight finish (up to 30 s) and
exits. If it exits on its own (a crash), the engine logs why and stops with exit status 1, as it
does for a damaged queue: what it was sending is recovered at the next start. If the engine
dies, even by kill -9, the delivery process dies with it (Linux's parent-death signal; else at
once when the wake-up pipe ends without an empty line), as the delivery threads of a one-process
engine would. It also holds the engine's lock on the data folder (``engine.lock``, inherited), so
that a new engine cannot start while it lives, whatever signals do. It runs in a session of its
own and ignores SIGINT and SIGTERM (a terminal's Ctrl-C, a service manager signalling the whole
group): the engine says when. A report older than ``STALE_AFTER_S`` shows its destinations down.

Plugins are loaded in the delivery process from their entry points, as ``intu serve`` loads
them; a destination's hooks run there.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import IO, Any

from intu_core.config.project import DestinationConfig, Project
from intu_core.delivery import DeliveryWorkers
from intu_core.logfmt import JsonFormatter
from intu_core.metrics import (
    EngineMetrics,
    MetricsRegistry,
    MetricsSnapshot,
    snapshot_from_json,
    snapshot_to_json,
)
from intu_core.plugins import PluginRegistry
from intu_core.queue import DEFAULT_LEASE_S, QueueStore
from intu_core.reachability import DestinationState
from intu_core.types import Destination, Runtime

log = logging.getLogger("intu.delivery")

#: How often the delivery process reports its metrics and states.
REPORT_EVERY_S = 0.5
#: How long the engine waits for the delivery process to start (imports, plugins, the queue).
READY_TIMEOUT_S = 60.0
#: After the stop timeout, how long the engine still waits before it kills the delivery process.
KILL_AFTER_S = 5.0
#: What the engine writes to stop the delivery process (a queue's name is never empty).
STOP_LINE = b"\n"
#: The engine's pid, for the delivery process to tell whether it is still its parent (set only
#: when the engine's main thread starts it: Linux's parent-death signal follows that thread).
ENGINE_PID_VARIABLE = "INTU_ENGINE_PID"
#: A delivery process silent for this long is stuck: its destinations are shown down.
STALE_AFTER_S = 10.0


# -- what the engine and the delivery process both build ---------------------------------------
def destinations_in_use(project: Project) -> dict[str, DestinationConfig]:
    """The destinations that the project's enabled channels feed, by name."""
    used: dict[str, DestinationConfig] = {}
    for channel in project.channels:
        if channel.enabled:
            for feed in channel.destinations:
                used.setdefault(feed.destination.name, feed.destination)
    return used


def create_destination(
    registry: PluginRegistry, project: Project, name: str, config: DestinationConfig, metrics: MetricsRegistry
) -> Destination:
    """The destination ``name`` made by its plugin (raises what the plugin raises)."""
    registered, why = registry.lookup("destination", config.type)
    assert registered is not None, why  # load_project checked every type
    logger = logging.getLogger(f"intu.destination.{name}")
    return registered.create(config.settings, Runtime(name, project.data_dir, logger, registry.hook, metrics))


def queued_workers(
    store: QueueStore, name: str, destination: Destination, config: DestinationConfig, metrics: EngineMetrics
) -> DeliveryWorkers:
    """The delivery workers of a queued destination, as its settings say (not started)."""
    return DeliveryWorkers(
        store,
        name,
        destination,
        config.retry,
        config.queue.threads,
        logging.getLogger(f"intu.destination.{name}"),
        metrics=metrics,
        # A shared queue's backend sets how long a claim lasts (how soon another node takes over
        # a dead node's entries); the embedded one keeps the default.
        lease_s=getattr(store, "lease_s", DEFAULT_LEASE_S),
    )


# -- the engine's side ---------------------------------------------------------------------------
class DeliveryProcess:
    """The engine's handle on its delivery process: start it, wake its queues, read its reports,
    stop it. ``on_exit(reason)`` is called (from a thread of this class) if it ends on its own."""

    def __init__(
        self,
        project: Project,
        queues: Collection[str],
        waiting: Callable[[str], int],
        on_exit: Callable[[str], None],
        lock_fd: int = -1,
    ) -> None:
        self._project = project
        self._queues = frozenset(queues)
        self._waiting = waiting
        self._on_exit = on_exit
        self._lock_fd = lock_fd  # engine.lock: held by the delivery process too
        self._proc: subprocess.Popen[bytes] | None = None
        self._wake_fd = -1
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._stopping = False
        self._metrics = MetricsSnapshot(())
        self._states: dict[str, DestinationState] = {}
        self._reported_at = 0.0  # time.monotonic() of the last report

    def start(self, ready_timeout: float = READY_TIMEOUT_S) -> None:
        """Start it and wait for its first report; ``RuntimeError`` if it ends or is silent first."""
        wake_r, wake_w = os.pipe()
        status_r, status_w = os.pipe()
        command = [
            sys.executable, "-m", "intu_core", *_log_options(), "--dir", str(self._project.config_file),
            "delivery-process", "--wake-fd", str(wake_r), "--status-fd", str(status_w),
        ]  # fmt: skip
        env = dict(os.environ)
        env.pop(ENGINE_PID_VARIABLE, None)
        if threading.current_thread() is threading.main_thread():
            env[ENGINE_PID_VARIABLE] = str(os.getpid())
        try:
            self._proc = subprocess.Popen(
                command,
                pass_fds=(wake_r, status_w, *((self._lock_fd,) if self._lock_fd >= 0 else ())),
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # a Ctrl-C or group signal is for the engine, which says when
            )
        finally:
            os.close(wake_r)
            os.close(status_w)
        os.set_blocking(wake_w, False)  # a source never waits for a wake-up to be read
        self._wake_fd = wake_w
        self._reader = threading.Thread(
            target=self._read, args=(os.fdopen(status_r, "rb"),), name="intu-delivery-reports", daemon=True
        )
        self._reader.start()
        if not self._ready.wait(ready_timeout) or self._proc.poll() is not None:
            self.stop(0)
            code = self._proc.returncode
            why = (
                f"exited with status {code}"
                if code is not None
                else f"did not start in {ready_timeout:.0f} s"
            )
            raise RuntimeError(f"the delivery process {why} (its log lines above say why)")
        with self._lock:
            served = set(self._states)
        if served != self._queues:  # it read the configuration again: changed meanwhile?
            self.stop(0)
            raise RuntimeError(
                f"the delivery process serves the queues {sorted(served)}, not {sorted(self._queues)}:"
                " was the configuration changed while intu started?"
            )
        log.info("queued destinations are sent to from a process of their own (pid %d)", self._proc.pid)

    def wake(self, queue: str) -> None:
        """Wake the workers of ``queue`` (dropped if the pipe is full or the process gone)."""
        # Under the lock: request_stop closes the descriptor, whose number the next file opened
        # (a received instance) could get.
        with self._lock:
            if self._wake_fd < 0:
                return
            try:
                os.write(self._wake_fd, queue.encode() + b"\n")
            except OSError:  # full (EAGAIN): they look at the queue anyway; gone: _read says so
                pass

    def metrics(self) -> MetricsSnapshot:
        """Its metrics as last reported."""
        with self._lock:
            return self._metrics

    def state(self, queue: str) -> DestinationState:
        """The destination's up/down state as last reported, with its entries waiting now."""
        with self._lock:
            reported = self._states.get(queue)
            silent = time.monotonic() - self._reported_at
        if reported is None or silent > STALE_AFTER_S:
            why = f"the delivery process has not reported for {silent:.0f} s"
            reported = DestinationState(False, time.time() - silent, why if reported else "not reported")
        try:
            waiting = self._waiting(queue)
        except Exception:  # noqa: BLE001 - the queue unreadable for now, as Reachability says
            waiting = -1
        return DestinationState(reported.up, reported.since, reported.last_error, waiting)

    def request_stop(self) -> None:
        """Tell it to stop (returns at once; ``stop`` waits)."""
        with self._lock:
            self._stopping = True
            fd, self._wake_fd = self._wake_fd, -1
            if fd >= 0:
                try:
                    os.write(fd, STOP_LINE)  # finish the sends in flight, then exit
                except OSError:  # full (stuck) or gone: the end of the pipe alone stops it at once
                    pass
                os.close(fd)

    def stop(self, timeout: float) -> bool:
        """Stop it: wait up to ``timeout`` s for its sends in flight, then kill it; True if it
        ended by itself."""
        self.request_stop()
        proc = self._proc
        if proc is None:
            return True
        try:
            proc.wait(timeout + KILL_AFTER_S)
            clean = True
        except subprocess.TimeoutExpired:
            log.warning(
                "the delivery process did not stop in %.0f s: killed (what it was sending is recovered)",
                timeout,
            )
            proc.kill()
            proc.wait()
            clean = False
        if self._reader is not None:
            self._reader.join(5.0)
        return clean

    def _read(self, reports: IO[bytes]) -> None:
        with reports:
            for line in reports:
                try:
                    report = json.loads(line)
                    snapshot = snapshot_from_json(report["metrics"])
                    states = {name: DestinationState(**fields) for name, fields in report["states"].items()}
                except (ValueError, KeyError, TypeError) as exc:  # a bug, not a reason to stop
                    log.warning("the delivery process sent a report that cannot be read: %s", exc)
                    continue
                with self._lock:
                    self._metrics, self._states = snapshot, states
                    self._reported_at = time.monotonic()
                self._ready.set()
        assert self._proc is not None
        code = self._proc.wait()
        with self._lock:
            expected = self._stopping or not self._ready.is_set()  # start() reports an early end
        self._ready.set()
        if not expected:
            self._on_exit(f"the delivery process exited with status {code} while the engine was running")


class RemoteWorkers:
    """Stands in, in the engine, for the delivery workers of a queue that its delivery process
    runs: what the engine and its view ask of ``DeliveryWorkers``."""

    def __init__(self, process: DeliveryProcess, queue: str) -> None:
        self._process = process
        self.queue = queue

    def notify(self) -> None:
        self._process.wake(self.queue)

    def state(self) -> DestinationState:
        return self._process.state(self.queue)

    def request_stop(self) -> None:
        self._process.request_stop()

    def stop(self, timeout: float | None = None) -> bool:
        return self._process.stop(30.0 if timeout is None else timeout)


def _log_options() -> list[str]:
    """The engine's log level and format, for the delivery process to log alike."""
    root = logging.getLogger()
    level = logging.getLevelName(root.getEffectiveLevel()).lower()
    level = level if level in ("debug", "info", "warning", "error") else "info"
    json_lines = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    return ["--log-level", level, "--log-format", "json" if json_lines else "text"]


# -- the delivery process ------------------------------------------------------------------------
def run_delivery_process(
    project: Project, registry: PluginRegistry, wake_fd: int, status_fd: int, stop_timeout: float = 30.0
) -> int:
    """The body of ``intu delivery-process``: run the delivery workers of the project's queued
    destinations until ``wake_fd`` ends, reporting on ``status_fd``. Returns the exit status."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)  # the engine says when to stop
    for fd in (wake_fd, status_fd):
        os.set_inheritable(fd, False)  # a program a plugin starts must not keep the pipes open
    _die_with_parent()
    from intu_core.queue.opener import open_queue

    metrics = MetricsRegistry()
    engine_metrics = EngineMetrics.register(metrics)
    store = open_queue(project, registry)
    workers: dict[str, DeliveryWorkers] = {}
    destinations: dict[str, Destination] = {}
    try:
        for name, config in destinations_in_use(project).items():
            if config.queue.enabled:
                destinations[name] = create_destination(registry, project, name, config, metrics)
                workers[name] = queued_workers(store, name, destinations[name], config, engine_metrics)
    except Exception as exc:  # the engine created them a moment ago: this is unexpected
        log.error("delivery process: cannot create the destinations: %s", exc)
        store.close()
        return 2
    for each in workers.values():
        each.start()
    status = os.fdopen(status_fd, "w", encoding="utf-8")
    stopped = threading.Event()
    reporter = threading.Thread(
        target=_report_until,
        args=(status, metrics, workers, stopped),
        name="intu-delivery-report",
        daemon=True,
    )
    _report(status, metrics, workers)  # the first line: ready
    reporter.start()
    told_to_stop = False
    with os.fdopen(wake_fd, "rb") as wakes:
        for line in wakes:
            if line == STOP_LINE:
                told_to_stop = True
                break
            woken = workers.get(line.strip().decode(errors="replace"))
            if woken is not None:
                woken.notify()
    if not told_to_stop:
        # The engine died without a word: so do we, at once, as its own delivery threads would
        # have. What is in flight is recovered by the next engine; it must not find us sending.
        log.error("delivery process: the engine is gone: stopping now")
        os._exit(1)
    for each in workers.values():
        each.request_stop()
    deadline = time.monotonic() + stop_timeout
    for each in workers.values():
        each.stop(max(0.0, deadline - time.monotonic()))
    for name, destination in destinations.items():
        try:
            destination.close()
        except Exception:
            log.exception("destination %s did not close cleanly", name)
    stopped.set()
    reporter.join()
    try:
        _report(status, metrics, workers)  # the counts of the last sends
        status.close()
    except OSError:  # the engine is gone
        pass
    store.close()
    return 0


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the engine that started it dies (prctl
    PR_SET_PDEATHSIG: it fires when the engine's thread that started us ends, and the engine
    starts us from its main thread); elsewhere the end of the wake-up pipe says so, a moment
    later."""
    if not sys.platform.startswith("linux") or ENGINE_PID_VARIABLE not in os.environ:
        return  # elsewhere, or started from another thread of the engine than its main one
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the pipe's end will do
        return
    if os.environ.get(ENGINE_PID_VARIABLE) != str(os.getppid()):  # the engine died before we asked
        os._exit(1)


def _report_until(
    status: IO[str],
    metrics: MetricsRegistry,
    workers: Mapping[str, DeliveryWorkers],
    stopped: threading.Event,
) -> None:
    while not stopped.wait(REPORT_EVERY_S):
        try:
            _report(status, metrics, workers)
        except OSError:  # the engine is gone: the wake-up pipe ends too, and the process stops
            return
        except Exception:  # a metric that cannot be read: say so, report again next time
            log.exception("delivery process: a report failed")


def _report(status: IO[str], metrics: MetricsRegistry, workers: Mapping[str, DeliveryWorkers]) -> None:
    states: dict[str, Any] = {}
    for name, each in workers.items():
        up, since, last_error = each.reachability.snapshot()
        states[name] = {"up": up, "since": since, "last_error": last_error}
    status.write(json.dumps({"metrics": snapshot_to_json(metrics.collect()), "states": states}) + "\n")
    status.flush()


__all__ = [
    "DeliveryProcess",
    "RemoteWorkers",
    "create_destination",
    "destinations_in_use",
    "queued_workers",
    "run_delivery_process",
]
