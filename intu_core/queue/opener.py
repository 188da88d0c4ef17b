"""Opening a project's queue: the one function the engine and ``intu queue`` get their store from.

The backend is the one named by the top-level ``queue: {backend: NAME}`` block of ``intu.yaml``
(``sqlite`` by default), looked up among the backends that plugins register through the
``intu_queue_backends`` hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from intu_core.config.problems import ConfigError, Problem
from intu_core.queue import QueueRuntime, QueueStore

if TYPE_CHECKING:
    from intu_core.config.project import Project
    from intu_core.plugins import PluginRegistry


def open_queue(
    project: Project, registry: PluginRegistry, *, node_id: str | None = None, create: bool = True
) -> QueueStore:
    """The project's queue store, opened by its backend.

    ``node_id`` None: the backend's default, stable for the project's data folder. ``create``
    False (for looking only): create and write nothing, raise ``QueueNotFound`` when there is no
    queue yet. Raises ``ConfigError`` when the backend is not installed (any more) and
    ``QueueUnavailable`` when the queue cannot be opened right now.
    """
    backend, why = registry.lookup("queue", project.queue.backend)
    if backend is None:
        raise ConfigError([Problem(project.config_file, "queue.backend", why)])
    return backend.open(project.queue.settings, QueueRuntime(project.data_dir, node_id, create))


__all__ = ["open_queue"]
