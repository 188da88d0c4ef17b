"""A read-only view of a running engine, for plugins: what the lifecycle hooks are given.

Plugins that watch the engine (a ``/metrics`` endpoint, a health check, a dashboard) need its
channels, destinations, queues and metrics, and nothing that could change them; the ``Engine``
object itself stays private to the core. Every call returns a fresh snapshot of plain values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from intu_core.engine import Engine
    from intu_core.metrics import MetricsSnapshot
    from intu_core.queue import QueueStats


class ChannelState(enum.Enum):
    """Where a channel's source is in its life: built (stopped), starting, running, stopping."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ChannelView:
    """One enabled channel: its name, its source's type, its state and the destinations it feeds."""

    name: str
    source_type: str
    state: ChannelState
    destinations: tuple[str, ...]


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
        store = self._engine.store
        return store.stats() if store is not None else []

    def metrics(self) -> MetricsSnapshot:
        """Every metric's current value (``MetricsRegistry.collect()``)."""
        return self._engine.metrics.collect()

    def settings(self, key: str, default: Any = None) -> Any:
        """The parsed top-level block ``key`` of ``intu.yaml`` that a plugin contributes
        (``intu_settings_blocks``), or ``default`` when the project does not have it."""
        return self._engine.project.plugin_settings.get(key, default)


__all__ = ["ChannelState", "ChannelView", "DestinationView", "EngineView"]
