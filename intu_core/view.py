"""A read-only view of a running engine, for plugins: what the lifecycle hooks are given.

Plugins that watch the engine (a ``/metrics`` endpoint, a health check, a dashboard) need its
channels, destinations, queues and metrics, and nothing that could change them; the ``Engine``
object itself stays private to the core. Every call returns a fresh snapshot of plain values.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from intu_core.history import Journey, MessageQuery, MessageRecord
from intu_core.operator import Operator
from intu_core.queue import Entry, EntryState, QueueStore, QueueUnavailable
from intu_core.reachability import DestinationState

if TYPE_CHECKING:
    from intu_core.engine import Engine
    from intu_core.metrics import MetricsSnapshot
    from intu_core.queue import QueueStats


#: Reads of the queue store a plugin (the HTTP API, a dashboard) may run at once. Each holds one
#: of the store's connections while it runs (with PostgreSQL one of ``queue.pool_size``, which the
#: data path uses too): a burst of long history searches would otherwise take them all, and the
#: enqueues C-STOREs wait for would be refused as busy. Other reads wait their turn, up to
#: ``READ_WAIT_S``, then get ``QueueUnavailable``.
CONCURRENT_READS = 2
READ_WAIT_S = 30.0


class ChannelState(enum.Enum):
    """Where a channel's source is in its life: built (stopped), starting, running, stopping."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ChannelView:
    """One enabled channel: its name, its source's type, its state and the destinations it feeds;
    ``listening``: whether a source that listens on a port has its listener bound and accepting
    (None for a source that does not listen, or does not say)."""

    name: str
    source_type: str
    state: ChannelState
    destinations: tuple[str, ...]
    listening: bool | None = None


@dataclass(frozen=True)
class DestinationView:
    """One destination in use: its name (``channel.name`` when inline), type, and whether it is
    queued (``queue.enabled``) or sent from the pipeline."""

    name: str
    type: str
    queued: bool


class EngineView:
    """What a plugin may see of the engine; it cannot change anything through it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._created = time.time()  # "up since" of a destination that was never down
        self._reads = threading.BoundedSemaphore(CONCURRENT_READS)

    @property
    def data_dir(self) -> Path:
        """The project's data folder (``data_dir`` in ``intu.yaml``)."""
        return self._engine.project.data_dir

    def channels(self) -> tuple[ChannelView, ...]:
        """The enabled channels, in the order they start."""
        return tuple(
            ChannelView(
                name=channel.config.name,
                source_type=channel.config.source.type,
                state=channel.state,
                destinations=tuple(used.destination.name for used in channel.config.destinations),
                listening=_listening(channel.source),
            )
            for channel in self._engine.channels
        )

    def destinations(self) -> tuple[DestinationView, ...]:
        """The destinations the enabled channels use, by name."""
        configs = self._engine.destination_configs
        return tuple(
            DestinationView(name, config.type, config.queue.enabled)
            for name, config in sorted(configs.items())
        )

    def queue_stats(self) -> list[QueueStats]:
        """One ``QueueStats`` per queue, while the engine runs (empty before it is built).

        Reads the queue store, so it may raise ``intu_core.queue.QueueUnavailable``."""
        if self._engine.store is None:
            return []
        with self._reading() as store:
            return store.stats()

    def metrics(self) -> MetricsSnapshot:
        """Every metric's current value (``MetricsRegistry.collect()``)."""
        return self._engine.metrics.collect()

    def entries(
        self, queue: str | None = None, state: EntryState | None = None, limit: int = 100
    ) -> list[Entry]:
        """Queue entries (of ``queue``, in ``state``; oldest first, at most ``limit``), e.g. the
        dead letters an operator may retry. Raises ``QueueUnavailable`` when the queue cannot be read."""
        with self._reading() as store:
            return store.list_entries(queue, state, limit)

    def entry(self, entry_id: str) -> Entry | None:
        """The queue entry ``entry_id``, or None when there is none (delivered, purged, unknown)."""
        with self._reading() as store:
            return store.get(entry_id)

    def find_messages(self, query: MessageQuery) -> list[MessageRecord]:
        """The message history's records matching ``query``, newest first
        (``intu_core.history``). Raises ``QueueUnavailable`` when the queue cannot be read."""
        with self._reading() as store:
            return store.find_messages(query)

    def journey(self, message_id: str) -> Journey | None:
        """One message's record, its events and its entries still queued; None when unknown (or
        forgotten after ``history.retention_days``)."""
        with self._reading() as store:
            return store.journey(message_id)

    @contextmanager
    def _reading(self) -> Iterator[QueueStore]:
        """The queue store, for one read among at most ``CONCURRENT_READS``."""
        store = self._open_store()
        if not self._reads.acquire(timeout=READ_WAIT_S):
            raise QueueUnavailable(
                f"{CONCURRENT_READS} reads of the queue have been running for {READ_WAIT_S:g} s;"
                " try again later"
            )
        try:
            yield store
        finally:
            self._reads.release()

    def _open_store(self) -> QueueStore:
        store = self._engine.store
        if store is None:
            raise QueueUnavailable("the engine is not running: no queue is open")
        return store

    def ready(self) -> list[str]:
        """Why the engine cannot take messages now (empty when it can): a channel whose source is
        not running or not listening, the queue unreadable or its folder not writable, the disk
        below ``min_free_disk_mb``. See ``intu_core.readiness``."""
        from intu_core.readiness import readiness_problems  # it imports this module

        return readiness_problems(self._engine)

    def operator(self) -> Operator:
        """Retry or purge queue entries (``intu_core.operator.Operator``): the one thing a plugin
        may change, for an operator who asked (e.g. through an HTTP API behind a token). Raises
        ``intu_core.queue.QueueUnavailable`` when the engine has no open queue."""
        engine = self._engine
        store = self._open_store()

        def wake(queue: str) -> None:
            workers = engine.workers.get(queue)
            if workers is not None:
                workers.notify()

        return Operator(store, wake)

    def destination_states(self) -> dict[str, DestinationState]:
        """Whether each destination in use is up (``intu_core.reachability.DestinationState``), by
        name. A queued destination's state is what its delivery workers last found (down from the
        first unreachable send until a probe or send reaches it again); an unqueued one is always
        shown up with nothing waiting (its sender is told of each failure). ``waiting`` reads the
        queue store (-1 when it cannot be read)."""
        engine = self._engine
        states: dict[str, DestinationState] = {}
        for name in sorted(engine.destination_configs):
            workers = engine.workers.get(name)
            states[name] = workers.state() if workers is not None else DestinationState(True, self._created)
        return states

    def settings(self, key: str, default: Any = None) -> Any:
        """The parsed top-level block ``key`` of ``intu.yaml`` that a plugin contributes
        (``intu_settings_blocks``), or ``default`` when the project does not have it."""
        return self._engine.project.plugin_settings.get(key, default)


def _listening(source: object) -> bool | None:
    # Optional for a source (``intu_core.types.Source``): one that listens says whether it does.
    listening = getattr(source, "listening", None)
    return bool(listening()) if callable(listening) else None


__all__ = ["ChannelState", "ChannelView", "DestinationState", "DestinationView", "EngineView"]
