"""intu-postgres-queue: the ``postgres`` queue backend, so that several ``intu serve`` nodes share
one durable queue in PostgreSQL (``queue: {backend: postgres, dsn: ...}`` in ``intu.yaml``).

Each node is one engine process with its own data folder; the data folders are on a folder shared
by every node (NFS, SMB), mounted at the same path everywhere, so that any node can send (and
delete, once delivered) any instance file the queue refers to. Each node claims under its node id:
the ``node_id`` setting, else ``<hostname>:<data folder>``, stable across restarts so that a
restarted node takes back at once what it held (``recover``); the entries of a node that died
wait for their leases (``lease_s``) to expire, then any node takes them.

Modules: ``settings`` (the ``queue:`` block), ``connections`` (connections kept, re-made and
their failures reported as ``QueueUnavailable``), ``schema`` (tables, created and upgraded with
a version table), ``store`` (``PostgresQueueStore``, the ``QueueStore`` contract).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

from intu_core.hookspecs import hookimpl
from intu_core.queue import QueueBackend, QueueRuntime
from intu_postgres_queue.settings import PostgresSettings, describe_dsn, parse_postgres_settings

if TYPE_CHECKING:  # psycopg is imported when a store is opened: every `intu` command loads this
    # plugin, and importing psycopg costs ~0.25 s of CPU
    from intu_postgres_queue.store import PostgresQueueStore

__version__ = "0.1.0"


def default_node_id(runtime: QueueRuntime) -> str:
    """``<hostname>:<absolute data folder>``: one per engine (the engine locks its data folder) and
    the same after a restart."""
    return f"{socket.gethostname()}:{runtime.data_dir.resolve()}"


def open_postgres(settings: PostgresSettings, runtime: QueueRuntime) -> PostgresQueueStore:
    """The store ``settings`` name, for the node ``runtime.node_id``, else ``settings.node_id``,
    else ``default_node_id``. Raises ``QueueUnavailable`` when PostgreSQL cannot be reached and
    ``QueueNotFound`` (``runtime.create`` False) when there is no queue in the schema yet."""
    from intu_postgres_queue.store import PostgresQueueStore

    return PostgresQueueStore(
        settings.dsn,
        node_id=runtime.node_id or settings.node_id or default_node_id(runtime),
        schema=settings.schema,
        lease_s=settings.lease_s,
        create=runtime.create,
        pool_size=settings.pool_size,
        connect_timeout_s=settings.connect_timeout_s,
        statement_timeout_ms=settings.statement_timeout_ms,
    )


POSTGRES_BACKEND = QueueBackend(
    "postgres",
    parse_postgres_settings,
    open_postgres,
    "PostgreSQL (psycopg 3), shared by several intu serve nodes; leases with SKIP LOCKED",
)


@hookimpl
def intu_queue_backends() -> list[QueueBackend]:
    """The ``postgres`` queue backend."""
    return [POSTGRES_BACKEND]


def __getattr__(name: str) -> Any:
    if name == "PostgresQueueStore":
        from intu_postgres_queue.store import PostgresQueueStore

        return PostgresQueueStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "POSTGRES_BACKEND",
    "PostgresQueueStore",
    "PostgresSettings",
    "default_node_id",
    "describe_dsn",
    "open_postgres",
    "parse_postgres_settings",
]
