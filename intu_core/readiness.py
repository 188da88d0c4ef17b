"""Whether a running engine can take messages now: what ``EngineView.ready()`` answers (and an
HTTP ``/readyz`` reports to a load balancer or a Kubernetes/systemd probe).

Ready means a sender would be answered "success" now: every enabled channel's source runs and,
when it listens on a port, its listener is bound and accepting; the queue can be reached and its
folder written; the data folder's disk has more than ``min_free_disk_mb`` free (below it the
engine refuses messages as busy). Each problem is one sentence naming what and where.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import TYPE_CHECKING

from intu_core.queue import QueueUnavailable
from intu_core.view import ChannelState

if TYPE_CHECKING:
    from intu_core.engine import Engine


def readiness_problems(engine: Engine) -> list[str]:
    """Why ``engine`` cannot take messages now; empty when it can."""
    if engine.stopping:
        return ["the engine is stopping"]
    problems = _channel_problems(engine)
    problems += _queue_problems(engine)
    problems += _disk_problems(engine)
    return problems


def _channel_problems(engine: Engine) -> list[str]:
    problems = []
    for channel in engine.channels:
        name = channel.config.name
        if channel.state is not ChannelState.RUNNING:
            problems.append(
                f"channel {name}: its {channel.config.source.type} source is {channel.state.value}"
            )
            continue
        # Optional for a source (Source's docstring): one that listens says whether it still does.
        listening = getattr(channel.source, "listening", None)
        if callable(listening) and not listening():
            problems.append(f"channel {name}: its {channel.config.source.type} source is not listening")
    return problems


def _queue_problems(engine: Engine) -> list[str]:
    store = engine.store
    if store is None:
        return ["the queue is not open (the engine is not running)"]
    try:
        store.stats()
    except QueueUnavailable as exc:
        return [f"the queue cannot be read: {exc}"]
    # The embedded queue and every message file live in the data folder: a read-only remount or
    # lost permissions refuse each message, so try a write (a file created and removed).
    try:
        with tempfile.NamedTemporaryFile(dir=engine.project.data_dir, prefix=".ready-"):
            pass
    except OSError as exc:
        return [f"the data folder {engine.project.data_dir} cannot be written: {exc.strerror or exc}"]
    return []


def _disk_problems(engine: Engine) -> list[str]:
    data_dir = engine.project.data_dir
    try:
        free_mb = shutil.disk_usage(data_dir).free // (1024 * 1024)
    except OSError as exc:
        return [f"cannot read the free space of {data_dir}: {exc.strerror or exc}"]
    minimum = engine.project.min_free_disk_mb
    if free_mb < minimum:
        return [
            f"disk nearly full: {free_mb} MiB free in {data_dir}, below min_free_disk_mb={minimum}"
            " (messages are refused as busy)"
        ]
    return []


__all__ = ["readiness_problems"]
