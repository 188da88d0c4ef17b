"""Connections to the queue's PostgreSQL database: kept for reuse across threads, made again when
the server went away, and every failure to reach it reported as ``QueueUnavailable``.

Why not ``psycopg_pool``: its ``check`` callback costs a round trip on every checkout (each queue
operation would pay two), and its background reconnection gives up after ``reconnect_timeout``,
after which the pool waits for connections that nobody makes. Here a connection is made on demand
when none is idle, so the first operation after PostgreSQL comes back works, however long it was
down; an idle connection whose socket has become readable (the server sent its "terminating
connection" notice, or closed it) is dropped before use, a local ``select`` and no round trip, so
a server restart does not fail one operation per stale connection.

A transaction the server rolled back because of a deadlock or a serialization failure is run
again (the work function must therefore only touch the database); any other connection-level
error closes the connection and raises ``QueueUnavailable``: the engine answers "busy" and the
next operation connects again.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import errors
from psycopg.rows import dict_row

from intu_core.queue import QueueUnavailable

T = TypeVar("T")
Connection = psycopg.Connection[dict[str, Any]]

#: How many times a transaction rolled back by a deadlock or serialization failure is tried.
ATTEMPTS = 5


class Connections:
    """Up to ``size`` connections to ``dsn``, shared by the threads of one process.

    ``where`` names the database in messages (never the password). ``statement_timeout_ms`` bounds
    every statement, lock waits included, so a stuck server makes the queue unavailable instead of
    hanging a C-STORE.
    """

    def __init__(
        self,
        dsn: str,
        *,
        where: str,
        size: int = 8,
        connect_timeout_s: float = 5.0,
        statement_timeout_ms: int = 30_000,
        application_name: str = "intu",
    ) -> None:
        self.dsn = dsn
        self.where = where
        self.connect_timeout_s = connect_timeout_s
        self._options: dict[str, Any] = {
            "connect_timeout": max(1, round(connect_timeout_s)),
            "application_name": application_name[:63],
            # Forced on whatever the server's default: an enqueue is acknowledged to a modality only
            # after its commit reached the WAL on disk (claims turn it off for themselves).
            "options": f"-c statement_timeout={int(statement_timeout_ms)} -c synchronous_commit=on",
        }
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self._size = size
        self._closed = False

    def run(self, work: Callable[[Connection], T], *, durable: bool = True, snapshot: bool = False) -> T:
        """``work(conn)`` in one transaction, committed on return; run again after a deadlock.

        ``durable=False`` commits without waiting for the WAL flush (a claim or a lease renewal:
        losing one on a crash leaves the entry to ``recover``, as the SQLite backend does).
        ``snapshot=True``: a read whose statements must agree (counts over two tables, a record
        with its events); under READ COMMITTED each statement would see the commits made since
        the one before it. REPEATABLE READ READ ONLY gives them one snapshot; a read-only
        transaction is never rolled back for a serialization failure.
        """
        if not self._slots.acquire(timeout=self.connect_timeout_s):
            raise QueueUnavailable(
                f"all {self._size} connections to {self.where} are busy (queue.pool_size in intu.yaml)"
            )
        try:
            for attempt in range(1, ATTEMPTS + 1):
                conn = self._take()
                try:
                    with conn.transaction():
                        if snapshot:
                            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                        if not durable:
                            conn.execute("SET LOCAL synchronous_commit = off")
                        result = work(conn)
                except errors.TransactionRollback:
                    self._give_back(conn)
                    if attempt == ATTEMPTS:
                        raise QueueUnavailable(f"{self.where}: transaction kept deadlocking") from None
                    continue
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    # Connection lost, server shutting down, statement timeout: the queue cannot be
                    # used right now. A lost COMMIT may still have been committed: callers that
                    # report this as a refusal make the sender send again (a duplicate at worst).
                    conn.close()
                    raise QueueUnavailable(f"{self.where}: {_first_line(exc)}") from exc
                except BaseException:
                    self._give_back(conn)
                    raise
                self._give_back(conn)
                return result
            raise AssertionError("unreachable")
        finally:
            self._slots.release()

    def _take(self) -> Connection:
        with self._lock:
            if self._closed:
                raise QueueUnavailable(f"the queue at {self.where} is closed")
            while self._idle:
                conn = self._idle.pop()
                if _usable(conn):
                    return conn
                conn.close()
        try:
            return psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row, **self._options)
        except psycopg.Error as exc:
            raise QueueUnavailable(f"cannot connect to {self.where}: {_first_line(exc)}") from exc

    def _give_back(self, conn: Connection) -> None:
        with self._lock:
            if self._closed or conn.closed or conn.broken:
                conn.close()
            else:
                self._idle.append(conn)

    def close(self) -> None:
        """Close every idle connection; connections in use are closed when given back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _usable(conn: Connection) -> bool:
    """False when the server closed an idle connection (it is readable: a notice or end of file)."""
    if conn.closed or conn.broken:
        return False
    # poll, not select: an engine with many associations and files open has descriptors past
    # select's limit of 1024, and every connection would then look unusable.
    poller = select.poll()
    try:
        poller.register(conn.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        return not poller.poll(0)
    except (OSError, ValueError, psycopg.Error):
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


__all__ = ["ATTEMPTS", "Connection", "Connections"]
