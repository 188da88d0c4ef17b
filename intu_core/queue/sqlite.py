"""The embedded queue backend (``queue: {backend: sqlite}``, the default): one SQLite database,
``<data_dir>/queue.db``, in WAL mode.

Schema (``PRAGMA user_version = 5``)::

    entries(seq INTEGER PRIMARY KEY,        -- enqueue order; ties on next_attempt_at go by seq
            id TEXT UNIQUE, queue TEXT, state TEXT, attempts INTEGER,
            next_attempt_at REAL, created_at REAL, updated_at REAL,   -- epoch seconds
            last_error TEXT, history TEXT,   -- JSON list of the last 50 attempts
            files TEXT,                      -- JSON list of the message's files (distinct; v3: relative)
            message TEXT,                    -- Message.to_json() as JSON (v3: data folder marked)
            lease_owner TEXT, lease_expires_at REAL,   -- v2: who holds an in-flight entry, until when
            message_id TEXT)                 -- v4: the history record it belongs to
    index entries_by_queue(queue, state, next_attempt_at, seq)
    files(path TEXT PRIMARY KEY, refs INTEGER)       -- entries that still need the file (v3: relative)
    counters(queue, name, value)                     -- "delivered", "recovered" per queue
    meta(key, value)                                 -- v2: "node_id"
    messages(id, channel, received_at, source, patient_id, accession_number, study_uid,
             sop_instance_uid, identifiers, tags, status, destinations,
             entries, events, updated_at)    -- v4: history; entries: ids still queued, events: count
    index messages_by_received, _by_accession, _by_patient, _by_study, _by_sop
    index messages_by_problem(status, received_at)   -- v5: errored, dead, partial records only
    events(message_id, seq, at, kind, destination, attempt, status, code, detail)  -- v4, WITHOUT ROWID

The history (``intu_core.history``) is written in the transaction of the queue change it
describes: an enqueue adds its record and its ``received`` and ``queued`` events in the same
commit, so history costs no fsync of its own. What it costs is pages: measured (WAL frames of
4 KiB, a message with 40 tags enqueued, claimed and completed), 9.0 per message without the
history and 21.3 with it. Hence no index that a commit would also touch beyond the searches: the
record keeps the ids of its queued entries and its event count itself, events are keyed by
``(message_id, seq)`` without a rowid, and expiry looks through the index on reception time.

Opening a database of an older version upgrades it in place, in one transaction (``_MIGRATIONS``).

Paths under the data folder are stored relative to it (v3), so that a project moved to another
path keeps working: ``files`` holds ``spool/<channel>/<name>``, and in a message's JSON text the
data folder's absolute path (as text, and URL-quoted after ``file://``, as in a DICOM body's
``BulkDataURI``) is replaced by a marker that reading puts the current data folder back in for.
Paths outside the data folder are kept absolute.

The engine opens the store with ``check=True``: ``PRAGMA quick_check`` first, and a database that
fails it, or that is not a database at all, raises ``QueueDamaged`` instead of being used (a queue
read wrong would make the start-up sweep take acknowledged instances for orphans). Measured on this
project's machine, file in the page cache: 45 ms for 10,000 entries with 10 KB messages (a 104 MB
database; opening without the check takes 1.6 ms); it reads the whole file, so from a cold disk
it costs what reading 104 MB costs.
Delivered entries are deleted (keeping them would grow the database forever); the ``delivered``
counter remembers how many there were.

One engine uses a data folder at a time (its lock), so the node id is a random one kept in ``meta``
when the database is created: stable across restarts and moves of the folder, so that ``recover()``
at start takes back everything the previous run held. Leases have no index of their own: a
claim looks for an expired one among the in-flight entries of its queue, found through
``entries_by_queue``, and there are never more of those than delivery threads (an index on the
lease would cost every claim and every delivery one more b-tree update, to search a handful of rows).

Durability and group commit: a durable write (an enqueue, a delivery recorded, ...) returns once
its commit is on disk, which is what a source answers "success" on. ``synchronous=FULL`` would do
that inside COMMIT: in WAL mode it is exactly NORMAL plus one fdatasync of the WAL after each
commit (SQLite's documentation; strace shows the one ``fdatasync`` per commit). The store commits
with NORMAL under its lock and runs that fdatasync itself after releasing it (``_sync_wal``,
``intu_core.fsutil.GroupSync``): one fdatasync covers every commit made before it started, so
writers that commit while another's fsync runs share the next one (group commit), and claims and
reads are not held up behind a disk flush. A lone writer syncs at once: no timer, no added wait.
Each transaction is still its own (a failing one rolls back alone, its caller gets its error). A
claim (``durable=False``) and a transaction that changed nothing are not synced. The WAL is
append-only between checkpoints and its frames are checksummed in a chain, so after a power cut
SQLite keeps every commit up to the last synced one, then later ones in order as far as they
reached the disk whole, never part of a transaction.
If the fdatasync fails, the commits it was to cover are reported failed (they may survive: the
sender sends again, at-least-once) and every later durable write is refused (``QueueUnavailable``)
until the store is reopened: pages a failed fsync dropped would break the chain, and commits after
them would not survive a power cut either (PostgreSQL stops for the same reason).
Measured 2026-12-03 on this project's 2-core machine (ext4 on a virtual disk, the other
engineers' tests and benchmarks running: load 3-8), 800 enqueues of a DICOM-like message with its
history, 3 runs per figure, wall ms per enqueue, FULL inside COMMIT -> shared fdatasync: 1 thread
1.00-2.54 -> 0.92-2.28 (the same one fdatasync per commit: noise); 4 threads 0.92-2.70 ->
0.64-1.24 (801 fdatasyncs -> 364-489); 8 threads 2.13-2.78 -> 0.81-0.91 (-> 227-251). CPU per
enqueue 0.42-0.64 ms either way; on 2 cores the writers are CPU-bound, which caps how many commits
one fdatasync gathers, and the slower the disk the more it gathers. In the route benchmark the
same day (4 storescu -> intu serve -> storescp, 1000 instances, 2 runs): 2001 durable commits
(enqueues and deliveries) took 1645-1673 fdatasyncs and the 1000 spool-folder fsyncs became
912-921; that route was CPU-bound (16-23 ms CPU per instance), so its wall time did not change
beyond the noise (head 21.4-25.6 s, with this 18.1-26.5 s over 6 runs each).

Threads share one connection for writing, behind a lock. Measured on this project's 2-core machine (ext4,
synchronous=FULL; 4 threads enqueueing 1600 messages while 2 threads claim and complete them): one
shared connection enqueued ~2,800/s against ~2,000/s with one connection per thread, and delivered
all in about the same time (~1,700/s). SQLite allows one writer at a time anyway, and a connection
waiting on another's write lock sleeps in its busy handler, whereas a Python lock hands over at
once. A claim is committed without an fsync (see ``claim``): that alone took end-to-end throughput
from ~1,300/s to ~1,450/s. A second process (``intu queue ...`` while ``intu serve`` runs) is a
second connection, and so is the delivery process: intu's processes take turns to write through a
lock of their own (``_WriteTurns``), which a waiter takes within 50 us to 1 ms of a transaction's
end, where SQLite's busy handler would sleep 1 ms, 2 ms, 5 ms and on; ``busy_timeout`` bounds each
wait (the turn, then SQLite's own lock if a writer outside intu, the ``sqlite3`` shell, holds it).
Reads have connections and locks of their own, opened on first use: in WAL mode readers and the
writer work at once, so a long read does not hold up a write. A history search that finds few
matches walks the index on reception time through the whole table: 0.3 s for a million records
in the page cache, 2.2 s from a cold disk (measured 2026-12-03), and behind the writers' lock
every C-STORE's answer, which waits for its enqueue, would have waited for the dashboard's
search. For the same reason the engine's own reads (the queue depth its admission checks, when
the next entry is due, the start-up sweep) have one connection, an operator's (searches,
journeys, listings, one entry) another, and the counts (``stats``: the dashboard every 2 s, each
`/metrics` scrape, `/readyz`) a third: a search never delays the engine's reads or the health
checks, and the counts, a scan of every entry (22 ms for 100,000 pending, measured 2026-12-04),
never delay admission.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar
from urllib.parse import quote

from intu_core.fsutil import GroupSync, fdatasync_path
from intu_core.history import (
    PROBLEM_STATUSES,
    Event,
    EventKind,
    Journey,
    MessageQuery,
    MessageRecord,
    NewRecord,
    capped,
    history_of,
    next_state,
)
from intu_core.message import Message, SendResult
from intu_core.queue import (
    CHANNEL_QUEUE_PREFIX,
    DEFAULT_LEASE_S,
    Entry,
    EntryState,
    QueueBackend,
    QueueDamaged,
    QueueNotFound,
    QueueRuntime,
    QueueStats,
    QueueUnavailable,
    attempt_record,
    retryable_states,
)
from intu_core.queue.reserve import RESERVE_NAME, DiskReserve

if TYPE_CHECKING:
    from intu_core.config.section import Section

log = logging.getLogger("intu.queue")
P = ParamSpec("P")
R = TypeVar("R")

DB_NAME = "queue.db"
#: The file whose lock says which process writes (``_WriteTurns``).
WRITE_LOCK_NAME = "queue.db-write-lock"
HISTORY_LIMIT = 50

_PENDING = EntryState.PENDING.value
_IN_FLIGHT = EntryState.IN_FLIGHT.value
_DEAD = EntryState.DEAD.value
_ERRORED = EntryState.ERRORED.value

# Each item takes the schema from the version before it (its index) to the next; statements are
# separated by ";". Never edit a released step: add one.
_MIGRATIONS = (
    """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    queue TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    history TEXT NOT NULL DEFAULT '[]',
    files TEXT NOT NULL DEFAULT '[]',
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_queue ON entries (queue, state, next_attempt_at, seq);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    refs INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (
    queue TEXT NOT NULL,
    name TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (queue, name)
) WITHOUT ROWID;
""",
    """
ALTER TABLE entries ADD COLUMN lease_owner TEXT;
ALTER TABLE entries ADD COLUMN lease_expires_at REAL;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
""",
    "v3: paths relative to the data folder",  # done by _relative_paths: it depends on where the folder is
    "v4: message history",  # done by _history_tables: entries.message_id is filled from each message
    # v5: a search by a problem status (history.PROBLEM_STATUSES); see _PROBLEM_CLAUSE.
    """
CREATE INDEX IF NOT EXISTS messages_by_problem ON messages (status, received_at)
    WHERE status IN ('errored', 'dead', 'partial');
""",
)
#: SQLite uses a partial index only for a query whose WHERE has its condition word for word.
_PROBLEM_CLAUSE = "status IN ('errored', 'dead', 'partial')"
SCHEMA_VERSION = len(_MIGRATIONS)

#: What stands for the data folder's absolute path (with a trailing "/") in a stored message's
#: JSON text; the NUL characters keep it from meaning anything else. ``_URL_MARK`` stands for the
#: URL-quoted path after ``file://``.
_DIR_MARK = "\x00intu:data_dir\x00"
_URL_MARK = "\x00intu:data_dir_url\x00"

_COLUMNS = (
    "id, queue, state, attempts, next_attempt_at, created_at, updated_at, last_error, history, message,"
    " lease_owner, lease_expires_at"
)


def _may_use_reserve(method: Callable[P, R]) -> Callable[P, R]:
    """A write that lets delivery go on: on a full disk, release the reserve and try once more."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except QueueUnavailable as exc:
            reserve = getattr(args[0], "_reserve", None)
            full = getattr(exc.__cause__, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            if not (full and reserve is not None and reserve.release()):
                raise
            return method(*args, **kwargs)

    return wrapper


class _Reader:
    """A reading connection behind a lock, opened on first use; ``None`` once closed."""

    def __init__(self, path: Path, busy_timeout_ms: int) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    @contextmanager
    def connection(self) -> Iterator[sqlite3.Connection | None]:
        with self._lock:
            if self._conn is None and not self._closed:
                self._conn = self._open()
            yield self._conn

    def _open(self) -> sqlite3.Connection:
        timeout_s = self._busy_timeout_ms / 1000
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=timeout_s)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            conn.execute("PRAGMA query_only = ON")  # a read that writes would be a bug
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class _WriteTurns:
    """Whose turn it is to write, between processes: an advisory lock (``flock``) on a file of its
    own, held for each write transaction.

    SQLite lets one connection write at a time; one that finds the write lock taken sleeps in its
    busy handler, 1 ms, then 2, 5, 10 ms and on, however soon the lock is free. With a delivery
    process (which claims and completes entries while the engine enqueues), the route benchmark's
    enqueue found the delivery process's ~0.1 ms transaction in 136 of 1000 C-STOREs and waited
    ~1.3 ms each time (measured 2026-12-04). Here a waiter tries again after 50 us, doubling to
    1 ms, for at most the busy timeout, as SQLite would. SQLite's own locks (POSIX locks on
    ``queue.db``) are not touched: another writer (the ``sqlite3`` shell) is waited for as before.
    Created by root (an ``intu queue`` command run with sudo), the file is given to the owner of
    ``queue.db``, as SQLite does with its ``-wal`` and ``-shm`` files, so that the service user can
    open it. Where it cannot be opened (a full disk, a read-only data folder) SQLite's wait is all
    there is, as before, and a warning says so once."""

    _FIRST_PAUSE_S = 50e-6
    _LONGEST_PAUSE_S = 1e-3

    def __init__(self, path: Path, timeout_s: float, *, owner_of: Path) -> None:
        self.path = path
        self._timeout_s = timeout_s
        self._owner_of = owner_of
        self._fd = -1  # opened at the first write (and at each next one while it cannot be)
        self._closed = False
        self._warned = False

    def acquire(self) -> None:
        """Wait for the turn (``QueueUnavailable`` after the busy timeout)."""
        fd = self._open()
        if fd < 0:
            return
        pause, deadline = self._FIRST_PAUSE_S, 0.0
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                now = time.monotonic()
                deadline = deadline or now + self._timeout_s
                if now >= deadline:
                    raise QueueUnavailable(
                        f"another process has been writing to the queue database for"
                        f" {self._timeout_s:g} s (busy_timeout_ms) ({self.path})"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, self._LONGEST_PAUSE_S)

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _open(self) -> int:
        if self._fd >= 0 or self._closed:
            return self._fd
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "cannot open the queue's write lock %s (%s): writes wait for other processes'"
                    " as SQLite does (1 ms or more each time)", self.path, exc.strerror or exc,
                )  # fmt: skip
            return -1
        if os.geteuid() == 0:
            with suppress(OSError):
                owner = os.stat(self._owner_of)
                os.fchown(fd, owner.st_uid, owner.st_gid)
        self._fd = fd
        return fd

    def close(self) -> None:
        self._closed = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SqliteQueueStore:
    """The ``QueueStore`` kept in ``data_dir/queue.db`` (see the module docstring for the schema).

    Safe for use from many threads of one process and from other processes at the same time.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        busy_timeout_ms: int = 30_000,
        node_id: str | None = None,
        check: bool = False,
        reserve_bytes: int = 0,
    ) -> None:
        """Open (or create) the queue in ``data_dir``. ``check``: run ``PRAGMA quick_check`` first
        (the engine at start) and raise ``QueueDamaged`` when the database fails it.
        ``reserve_bytes``: keep a disk reserve of that size (``intu_core.queue.reserve``)."""
        self.data_dir = Path(data_dir)
        # Private to the service user: the database and the spooled files hold patient data.
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = self.data_dir / DB_NAME
        self.paths = DataPaths(self.data_dir)
        self._lock = threading.Lock()  # the writing connection's
        self._turns = _WriteTurns(self.data_dir / WRITE_LOCK_NAME, busy_timeout_ms / 1000, owner_of=self.path)
        # The engine's reads and an operator's, each on a connection of its own (module docstring).
        self._engine_reads = _Reader(self.path, busy_timeout_ms)
        self._operator_reads = _Reader(self.path, busy_timeout_ms)
        self._count_reads = _Reader(self.path, busy_timeout_ms)
        self._busy_timeout_ms = busy_timeout_ms
        self.wal_path = self.path.with_name(DB_NAME + "-wal")
        # Opened by path at each run: SQLite keeps the same file while any connection is open.
        self._wal_sync = GroupSync(functools.partial(fdatasync_path, self.wal_path))
        self._wal_failed = ""
        self._closed = False
        if not self.path.exists():
            # SQLite creates the -wal and -shm files with the database's permissions.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        with _unavailable(self.path):
            self._connect(busy_timeout_ms)
            try:
                if check:
                    self.check()
                self._migrate()
                self.node_id = node_id or self._stored_node_id()
            except BaseException:
                self._conn.close()
                self._turns.close()
                raise
        self._reserve: DiskReserve | None = None
        if reserve_bytes:
            self._reserve = DiskReserve(self.data_dir / RESERVE_NAME, reserve_bytes)
            if not self._reserve.ensure():
                log.warning(
                    "cannot allocate the queue's disk reserve of %d MiB in %s (%s): running without;"
                    " a full disk may then stop delivery until space is freed",
                    reserve_bytes // (1024 * 1024), self.data_dir, self._reserve.why,
                )  # fmt: skip
                self._reserve = None

    def check(self) -> None:
        """``PRAGMA quick_check``; raises ``QueueDamaged`` saying what is wrong and what to do."""
        with self._lock:
            rows = [str(row[0]) for row in self._conn.execute("PRAGMA quick_check").fetchall()]
        if rows != ["ok"]:
            raise QueueDamaged(_damaged(self.path, "; ".join(rows[:3])))

    # -- connection handling ---------------------------------------------------------------
    def _connect(self, busy_timeout_ms: int) -> None:
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves, so that a write
        # transaction takes the write lock up front (a deferred one that upgrades later can fail with
        # SQLITE_BUSY without waiting, when another process wrote in between).
        self._conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        try:
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except BaseException:
            self._conn.close()
            raise
        if str(mode).lower() != "wal":
            raise RuntimeError(f"cannot put the queue database {self.path} in WAL mode (got {mode!r})")
        # A committed enqueue is what a source answers "success" on (the sender may then delete its
        # copy), so the WAL must be fsynced after every durable commit, not only at checkpoints.
        # synchronous=FULL is exactly NORMAL plus that fsync, done inside COMMIT under our lock;
        # we commit with NORMAL and do the fsync ourselves after the lock is released, shared by
        # the writers that committed meanwhile (``_wal_sync``: group commit, see the docstring).
        self._conn.execute("PRAGMA synchronous = NORMAL")

    def _migrate(self) -> None:
        with self._lock:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the queue database {self.path} has schema version {version}, newer than this "
                    f"intu understands ({SCHEMA_VERSION}); upgrade intu"
                )
            if version == SCHEMA_VERSION:
                # Nothing to write: opening an existing queue must work on a full disk (that is
                # when an operator runs `intu queue list`) and not wait for the engine's write lock.
                return
            try:
                self._turns.acquire()  # (in the try: released even if interrupted right after)
                self._conn.execute("BEGIN IMMEDIATE")
                # Another process may have upgraded it while we waited for the write lock.
                version = self._conn.execute("PRAGMA user_version").fetchone()[0]
                for number, step in enumerate(_MIGRATIONS[version:], start=version + 1):
                    if number == 3:
                        _relative_paths(self._conn, self.paths)
                        continue
                    if number == 4:
                        _history_tables(self._conn)
                        continue
                    for statement in step.split(";"):
                        if statement.strip():
                            self._conn.execute(statement)
                self._conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('node_id', ?)", (uuid.uuid4().hex,)
                )
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # a failed COMMIT may have rolled back already
                    self._conn.execute("ROLLBACK")
                raise
            finally:
                self._turns.release()
        self._sync_wal()

    def _stored_node_id(self) -> str:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'node_id'").fetchone()
        return f"sqlite-{row[0]}"

    @contextmanager
    def _write(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction, durable when the block is left (its WAL frames fsynced, shared
        with concurrent writers); ``durable=False`` skips the fsync (see ``claim``)."""
        if durable and self._wal_failed:
            raise QueueUnavailable(self._wal_failed)  # refused before anything is committed
        with self._lock, _unavailable(self.path):
            conn = self._conn
            before = conn.total_changes
            try:
                self._turns.acquire()  # (in the try: released even if interrupted right after)
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLITE_FULL may have rolled it back already
                    conn.execute("ROLLBACK")
                raise
            finally:
                self._turns.release()
            # A transaction that changed no row wrote no WAL frame: nothing to make durable.
            changed = conn.total_changes != before
        if durable and changed:
            self._sync_wal()

    def _sync_wal(self) -> None:
        """fsync the WAL (what synchronous=FULL does at each commit), one fsync for every commit
        made before it started; raises ``QueueUnavailable`` when it fails (then and ever after:
        frames a failed fsync dropped would break the WAL's checksum chain, so later commits
        could not be trusted to survive a power cut either)."""
        if self._wal_failed:
            raise QueueUnavailable(self._wal_failed)
        try:
            self._wal_sync()
        except OSError as exc:
            if isinstance(exc, FileNotFoundError) and self._closed:
                # Closed meanwhile (the engine stopping): closing the last connection checkpointed
                # the WAL into the database, synced it, and only then deleted the WAL.
                return
            self._wal_failed = (
                f"an fsync of the queue's write-ahead log {self.wal_path} failed ({exc}): what was"
                " committed since may not survive a power cut, so nothing more is accepted as"
                " durable; check the disk, then restart intu"
            )
            raise QueueUnavailable(self._wal_failed) from exc

    @contextmanager
    def _read(self, reads: _Reader | None = None) -> Iterator[sqlite3.Connection]:
        """A reading connection: the engine's (by default), the operator's or the counts'. The
        statements run inside the block see one snapshot of the database."""
        with _unavailable(self.path), (reads or self._engine_reads).connection() as conn:
            if conn is None:  # the store is closed, or closing: as any use of a closed one
                raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
            if conn.in_transaction:  # left open by a block that failed to end it
                conn.execute("ROLLBACK")
            conn.execute("BEGIN")  # (deferred: a read transaction from the first statement on)
            try:
                yield conn
            except BaseException:
                with suppress(sqlite3.Error):  # the block's error is the one to see
                    conn.execute("ROLLBACK")
                raise
            # (Each method reads its rows to the end: a cursor left unfinished would keep its
            # snapshot past the COMMIT, and the next block on this connection would see it.)
            conn.execute("COMMIT")

    # -- writing ---------------------------------------------------------------------------
    def enqueue(
        self,
        items: Sequence[tuple[str, Message]],
        *,
        origin: Message | None = None,
        events: Sequence[Event] = (),
    ) -> list[str]:
        """Add each ``(queue, message)`` as a pending entry in one transaction; durable on return.
        Its history (``queued`` events, ``events``) goes in the same transaction.

        Raises ``TypeError`` when a message is not JSON-serialisable (nothing is stored then).
        """
        now = time.time()
        rows: list[tuple[Any, ...]] = []
        refs: list[tuple[str]] = []
        encoded: dict[int, tuple[str, str, list[str]]] = {}
        history = _History(events)
        if origin is not None:
            history.new(origin)
        for queue, message in items:
            key = id(message)
            if key not in encoded:
                files = [self.paths.relative(p) for p in _distinct(message.files)]
                encoded[key] = (self.paths.mark(_encode_message(message)), json.dumps(files), files)
            text, files_json, files = encoded[key]
            entry_id = uuid.uuid4().hex
            message_id = origin.id if origin is not None else history.new(message)
            rows.append((entry_id, queue, _PENDING, now, now, now, files_json, text, message_id))
            refs.extend((path,) for path in files)
            history.add(Event(message_id, now, EventKind.QUEUED, queue))
            history.opens(message_id, entry_id)
        if not rows:
            return []
        self._check_reserve()
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO entries (id, queue, state, next_attempt_at, created_at, updated_at, files,"
                " message, message_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            _add_refs(conn, refs)
            history.write(conn, now)
        return [row[0] for row in rows]

    def record(self, message: Message, events: Sequence[Event]) -> None:
        """Create or update ``message``'s history record and add ``events``, in one transaction."""
        history = _History(events)
        history.new(message)
        now = time.time()
        with self._write() as conn:
            history.write(conn, now)

    def record_error(self, message: Message, queue: str, reason: str) -> str:
        """Keep a message the pipeline failed on as ``errored`` with ``reason``; it holds its files."""
        now = time.time()
        files = [self.paths.relative(p) for p in _distinct(message.files)]
        entry_id = uuid.uuid4().hex
        history = json.dumps([attempt_record(now, reason)])
        text = self.paths.mark(_encode_message(message))
        events = _History([Event(message.id, now, EventKind.ERRORED, queue, detail=capped(reason))])
        events.new(message)
        events.opens(message.id, entry_id)
        self._check_reserve()
        with self._write() as conn:
            conn.execute(
                "INSERT INTO entries (id, queue, state, next_attempt_at, created_at, updated_at,"
                " last_error, history, files, message, message_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry_id,
                    queue,
                    _ERRORED,
                    now,
                    now,
                    now,
                    reason,
                    history,
                    json.dumps(files),
                    text,
                    message.id,
                ),
            )
            _add_refs(conn, [(path,) for path in files])
            events.write(conn, now)
        return entry_id

    @_may_use_reserve
    def claim(
        self, queue: str, now: float | None = None, *, lease_s: float = DEFAULT_LEASE_S
    ) -> Entry | None:
        """An entry of ``queue`` whose lease expired, else the oldest due pending one, leased to
        this node until ``now + lease_s``; each found and marked in one statement.

        Not fsynced: losing a claim on a power cut only leaves the entry pending, which is what
        ``recover()`` would make of it anyway. The next durable commit syncs it along. Looking for
        an expired lease first reads the few in-flight entries of the queue: measured at ~10 µs of
        a claim's ~120 µs, against ~700 µs per message end to end.
        """
        now = time.time() if now is None else now
        lease = (self.node_id, now + lease_s, now)
        with self._write(durable=False) as conn:
            row = conn.execute(
                "UPDATE entries SET lease_owner = ?, lease_expires_at = ?, updated_at = ?,"
                " history = json_insert(history, '$[#]', json_object('at', ?, 'status', 'note',"
                "  'code', NULL, 'detail', 'the lease of ' || coalesce(lease_owner, 'an older intu')"
                "  || ' expired; sending again'))"
                " WHERE seq = ("
                f" SELECT seq FROM entries WHERE queue = ? AND state = '{_IN_FLIGHT}'"
                "  AND lease_expires_at < ? ORDER BY lease_expires_at LIMIT 1)"
                f" RETURNING {_COLUMNS}",
                (*lease, now, queue, now),
            ).fetchone()
            if row is not None:
                _count(conn, queue, "recovered", 1)
            else:
                row = conn.execute(
                    f"UPDATE entries SET state = '{_IN_FLIGHT}', lease_owner = ?, lease_expires_at = ?,"
                    " updated_at = ? WHERE seq = ("
                    f" SELECT seq FROM entries WHERE queue = ? AND state = '{_PENDING}'"
                    "  AND next_attempt_at <= ? ORDER BY next_attempt_at, seq LIMIT 1)"
                    f" RETURNING {_COLUMNS}",
                    (*lease, queue, now),
                ).fetchone()
        return self._entry(row) if row is not None else None

    @_may_use_reserve
    def renew(self, entry_ids: Sequence[str], lease_s: float = DEFAULT_LEASE_S) -> int:
        """Extend this node's leases on ``entry_ids`` to ``lease_s`` from now; how many it holds.

        Not fsynced, like ``claim``: after a power cut ``recover()`` takes them back anyway.
        """
        if not entry_ids:
            return 0
        with self._write(durable=False) as conn:
            cursor = conn.execute(
                "UPDATE entries SET lease_expires_at = ? WHERE id IN (SELECT value FROM json_each(?))"
                f" AND state = '{_IN_FLIGHT}' AND lease_owner = ?",
                (time.time() + lease_s, json.dumps(list(entry_ids)), self.node_id),
            )
            return cursor.rowcount

    @_may_use_reserve
    def complete(self, entry_id: str, result: SendResult | None = None) -> bool:
        """Delivered: delete the entry, count it, and delete files no other entry needs."""
        now = time.time()
        with self._write() as conn:
            row = conn.execute(
                f"DELETE FROM entries WHERE id = ? AND state = '{_IN_FLIGHT}' AND lease_owner = ?"
                " RETURNING queue, files, message_id, attempts",
                (entry_id, self.node_id),
            ).fetchone()
            if row is None:
                return False
            _count(conn, row["queue"], "delivered", 1)
            unused = _release(conn, [json.loads(row["files"])])
            if row["message_id"]:
                history = _History()
                history.closes(row["message_id"], entry_id)
                if not row["queue"].startswith(CHANNEL_QUEUE_PREFIX):
                    # A channel's replayed entry is not a delivery: its run through the channel
                    # is recorded by what the channel did with it (queued, filtered).
                    history.add(
                        Event.of_send(
                            row["message_id"], now, EventKind.DELIVERED, row["queue"],
                            result or SendResult.success(), row["attempts"] + 1,
                        )
                    )  # fmt: skip
                history.write(conn, now)
        self._unlink(unused)
        if self._reserve is not None and self._reserve.released:
            self._reserve.ensure()  # only once twice its size is free again
        return True

    @_may_use_reserve
    def retry_later(self, entry_id: str, result: SendResult | str, at: float) -> bool:
        """Back to pending from ``at`` with one more attempt recorded in the history."""
        return self._settle(entry_id, result, _PENDING, at, (_IN_FLIGHT,))

    @_may_use_reserve
    def dead_letter(self, entry_id: str, result_or_reason: SendResult | str) -> bool:
        """State dead with the reason. A ``SendResult`` counts as an attempt; text is a note."""
        return self._settle(entry_id, result_or_reason, _DEAD, None, (_IN_FLIGHT, _PENDING))

    def _settle(
        self,
        entry_id: str,
        result: SendResult | str,
        state: str,
        at: float | None,
        from_states: tuple[str, ...],
    ) -> bool:
        now = time.time()
        record = attempt_record(now, result)
        tried = 1 if isinstance(result, SendResult) else 0
        marks = ", ".join("?" * len(from_states))
        with self._write() as conn:
            # An in-flight entry is settled by the node holding it: after its lease expired and
            # another node took it, a late result of the first send must not undo the second.
            row = conn.execute(
                "SELECT history, next_attempt_at, queue, message_id, attempts FROM entries"
                f" WHERE id = ? AND state IN ({marks}) AND (state != '{_IN_FLIGHT}' OR lease_owner = ?)",
                (entry_id, *from_states, self.node_id),
            ).fetchone()
            if row is None:
                return False
            if row["message_id"]:
                kind = EventKind.ATTEMPT if state == _PENDING else EventKind.DEAD
                attempt = row["attempts"] + 1 if tried else None
                event = Event.of_send(row["message_id"], now, kind, row["queue"], result, attempt)
                _History([event]).write(conn, now)
            history = json.loads(row["history"])
            history.append(record)
            conn.execute(
                "UPDATE entries SET state = ?, attempts = attempts + ?, next_attempt_at = ?,"
                " updated_at = ?, last_error = ?, history = ?, lease_owner = NULL,"
                " lease_expires_at = NULL WHERE id = ?",
                (
                    state,
                    tried,
                    row["next_attempt_at"] if at is None else at,
                    now,
                    record["detail"] or record["status"],
                    json.dumps(history[-HISTORY_LIMIT:]),
                    entry_id,
                ),
            )
        return True

    def release_files(self, paths: Sequence[str]) -> int:
        """Delete those of ``paths`` that no entry refers to; returns how many were deleted.

        For the engine after a hand-over: files of a message that was filtered out or sent without a
        queue are not needed any more, while files of queued or errored entries are kept.
        """
        wanted = _distinct(paths)
        if not wanted:
            return 0
        # Under the write lock, so no enqueue can add a reference between the check and the delete.
        with self._write() as conn:
            unused = self._unreferenced(conn, wanted)
            return _unlink(unused)

    def unreferenced(self, paths: Sequence[str]) -> list[str]:
        """Those of ``paths`` that no entry refers to (the start-up sweep quarantines them)."""
        wanted = _distinct(paths)
        if not wanted:
            return []
        with self._read() as conn:
            return self._unreferenced(conn, wanted)

    def _unreferenced(self, conn: sqlite3.Connection, wanted: list[str]) -> list[str]:
        stored = {path: self.paths.relative(path) for path in wanted}
        rows = conn.execute(
            "SELECT path FROM files WHERE path IN (SELECT value FROM json_each(?))",
            (json.dumps(list(stored.values())),),
        ).fetchall()
        referenced = {row[0] for row in rows}
        return [p for p in wanted if stored[p] not in referenced]

    @_may_use_reserve
    def recover(self) -> int:
        """At startup: in-flight entries of this node (a crash between send and record), or whose
        lease has expired, back to pending.

        They may have been delivered already and will be sent again (at-least-once); each is counted
        in its queue's ``recovered`` counter. Entries in flight before the upgrade to leases have
        no owner and are taken back too.
        """
        now = time.time()
        note = json.dumps(attempt_record(now, "in flight when the engine stopped; sending again"))
        with self._write() as conn:
            rows = conn.execute(
                f"UPDATE entries SET state = '{_PENDING}', updated_at = ?, lease_owner = NULL,"
                " lease_expires_at = NULL, history = json_insert(history, '$[#]', json(?))"
                f" WHERE state = '{_IN_FLIGHT}'"
                "  AND (lease_owner = ? OR lease_owner IS NULL OR lease_expires_at < ?) RETURNING queue",
                (now, note, self.node_id, now),
            ).fetchall()
            per_queue: dict[str, int] = {}
            for row in rows:
                per_queue[row["queue"]] = per_queue.get(row["queue"], 0) + 1
            for queue, n in per_queue.items():
                _count(conn, queue, "recovered", n)
        return len(rows)

    @_may_use_reserve
    def retry(
        self,
        queue: str | None = None,
        entry_ids: Sequence[str] | None = None,
        state: EntryState | None = EntryState.DEAD,
    ) -> int:
        """Dead or errored entries back to pending now, attempts reset; returns how many.

        ``state`` narrows to dead or to errored entries (None: both). Entries of a channel's error
        queue (``channel:<name>``) go back to pending too: the running engine runs them through
        the channel again (its replay worker), so a fixed transformer gets a second chance.
        """
        states = retryable_states(state)
        where, params = _filters(queue, entry_ids, states)
        now = time.time()
        note = json.dumps(attempt_record(now, "retried by an operator"))
        with self._write() as conn:
            rows = conn.execute(
                f"SELECT id, queue, state, message_id FROM entries WHERE {where}", params
            ).fetchall()
            ids = [r["id"] for r in rows]
            if ids:
                conn.execute(
                    f"UPDATE entries SET state = '{_PENDING}', attempts = 0, next_attempt_at = ?,"
                    " updated_at = ?, history = json_insert(history, '$[#]', json(?))"
                    " WHERE id IN (SELECT value FROM json_each(?))",
                    (now, now, note, json.dumps(ids)),
                )
                _operator_events(conn, rows, EventKind.RETRIED, "retried by an operator", now)
        return len(ids)

    @_may_use_reserve
    def purge(
        self,
        queue: str | None = None,
        state: EntryState | None = None,
        entry_ids: Sequence[str] | None = None,
    ) -> int:
        """Delete matching entries and release their files; returns how many.

        In-flight entries are never purged (a worker is sending them; purge them once they settle).
        """
        if state is EntryState.IN_FLIGHT:
            raise ValueError("in-flight entries cannot be purged; wait until they are settled")
        states = (state.value,) if state is not None else (_PENDING, _DEAD, _ERRORED)
        where, params = _filters(queue, entry_ids, states)
        now = time.time()
        with self._write() as conn:
            rows = conn.execute(
                f"DELETE FROM entries WHERE {where} RETURNING id, files, queue, message_id", params
            ).fetchall()
            unused = _release(conn, [json.loads(r["files"]) for r in rows])
            _operator_events(conn, rows, EventKind.PURGED, "purged by an operator", now)
        self._unlink(unused)
        return len(rows)

    # -- reading ---------------------------------------------------------------------------
    def next_due(self, queue: str) -> float | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT min(next_attempt_at) FROM entries WHERE queue = ? AND state = '{_PENDING}'",
                (queue,),
            ).fetchone()
        return row[0]

    def size(self, queue: str) -> int:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT count(*) FROM entries WHERE queue = ? AND state IN ('{_PENDING}', '{_IN_FLIGHT}')",
                (queue,),
            ).fetchone()
        return int(row[0])

    def stats(self) -> list[QueueStats]:
        now = time.time()
        with self._read(self._count_reads) as conn:
            groups = conn.execute(
                "SELECT queue, state, count(*) AS n, min(created_at) AS oldest FROM entries"
                " GROUP BY queue, state"
            ).fetchall()
            counters = conn.execute("SELECT queue, name, value FROM counters").fetchall()
        acc: dict[str, dict[str, Any]] = {}
        for row in groups:
            item = acc.setdefault(row["queue"], {})
            item[row["state"]] = row["n"]
            if row["state"] in (_PENDING, _IN_FLIGHT):
                oldest = item.get("oldest")
                item["oldest"] = row["oldest"] if oldest is None else min(oldest, row["oldest"])
        for row in counters:
            acc.setdefault(row["queue"], {})[row["name"]] = row["value"]
        return [
            QueueStats(
                queue=queue,
                pending=item.get(_PENDING, 0),
                in_flight=item.get(_IN_FLIGHT, 0),
                dead=item.get(_DEAD, 0),
                errored=item.get(_ERRORED, 0),
                oldest_age_s=None if item.get("oldest") is None else max(0.0, now - item["oldest"]),
                delivered=item.get("delivered", 0),
                recovered=item.get("recovered", 0),
            )
            for queue, item in sorted(acc.items())
        ]

    def get(self, entry_id: str) -> Entry | None:
        with self._read(self._operator_reads) as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM entries WHERE id = ?", (entry_id,)).fetchone()
        return self._entry(row) if row is not None else None

    def list_entries(
        self, queue: str | None = None, state: EntryState | None = None, limit: int = 100
    ) -> list[Entry]:
        """Entries in enqueue order, optionally of one queue and one state."""
        where, params = _filters(queue, None, (state.value,) if state is not None else None)
        with self._read(self._operator_reads) as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE {where} ORDER BY seq LIMIT ?", (*params, limit)
            ).fetchall()
        return [self._entry(row) for row in rows]

    # -- history -----------------------------------------------------------------------------
    def find_messages(self, query: MessageQuery) -> list[MessageRecord]:
        """The records matching ``query``, newest received first (through an index per
        identifier, or the one on reception time)."""
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("accession_number", query.accession_number),
            ("patient_id", query.patient_id),
            ("study_uid", query.study_uid),
            ("sop_instance_uid", query.sop_instance_uid),
            ("channel", query.channel),
            ("status", query.status),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if query.status in PROBLEM_STATUSES:
            clauses.append(_PROBLEM_CLAUSE)  # through messages_by_problem
        if query.since is not None:
            clauses.append("received_at >= ?")
            params.append(query.since)
        if query.until is not None:
            clauses.append("received_at < ?")
            params.append(query.until)
        where = " AND ".join(clauses) or "1"
        with self._read(self._operator_reads) as conn:
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE {where}"
                " ORDER BY received_at DESC, id LIMIT ?",
                (*params, query.limit),
            ).fetchall()
        return [_message_record(row) for row in rows]

    def journey(self, message_id: str) -> Journey | None:
        """The record of ``message_id``, its events oldest first, and its entries still queued."""
        with self._read(self._operator_reads) as conn:
            row = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,)
            ).fetchone()
            if row is None:
                return None
            events = conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE message_id = ? ORDER BY seq", (message_id,)
            ).fetchall()
        return Journey(
            _message_record(row), tuple(_event(e) for e in events), tuple(json.loads(row["entries"]))
        )

    @_may_use_reserve
    def expire_history(self, older_than: float) -> int:
        """Delete records last updated before ``older_than`` whose message has no entry left, with
        their events; how many. In batches, so that the engine's writes wait little."""
        total = 0
        while True:
            with self._write() as conn:
                ids = [
                    row[0]
                    for row in conn.execute(
                        # Received before means updated before too: the index on reception.
                        "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE received_at < ?"
                        " AND updated_at < ? AND entries = '[]' LIMIT ?) RETURNING id",
                        (older_than, older_than, _EXPIRE_BATCH),
                    ).fetchall()
                ]
                if ids:
                    conn.execute(
                        "DELETE FROM events WHERE message_id IN (SELECT value FROM json_each(?))",
                        (json.dumps(ids),),
                    )
            total += len(ids)
            if len(ids) < _EXPIRE_BATCH:
                return total

    def _check_reserve(self) -> None:
        # After the reserve was given to delivery, new messages wait until it is back. Given by
        # this process, or by another on the same queue (a delivery process): then it is gone.
        reserve = self._reserve
        if reserve is not None and (reserve.released or not reserve.path.exists()) and not reserve.ensure():
            raise QueueUnavailable(
                "the disk is full: the queue's reserve is in use so that queued messages can be"
                " delivered; new messages are refused until there is room for it again"
            )

    def _entry(self, row: sqlite3.Row) -> Entry:
        return _entry(row, self.paths.unmark(row["message"]))

    def _unlink(self, stored: Iterable[str]) -> int:
        return _unlink(self.paths.absolute(p) for p in stored)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._engine_reads.close()  # (before the writer: the last to close checkpoints)
                self._operator_reads.close()
                self._count_reads.close()
                self._conn.close()
                self._turns.close()

    def __enter__(self) -> SqliteQueueStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the backend registration --------------------------------------------------------------
@dataclass(frozen=True)
class SqliteSettings:
    """The ``queue:`` block of ``intu.yaml`` for ``backend: sqlite``."""

    # How long a write waits for another process's (``intu queue`` while the engine runs, the
    # delivery process, or the other way round) before the queue counts as unavailable.
    busy_timeout_ms: int = 30_000
    # The disk reserve the engine keeps in the data folder (intu_core.queue.reserve); 0: none.
    reserve_mb: int = 16


def parse_sqlite_settings(section: Section) -> SqliteSettings:
    """The rest of the ``queue:`` block for ``backend: sqlite``; problems go to ``section``."""
    settings = SqliteSettings(
        busy_timeout_ms=section.int("busy_timeout_ms", SqliteSettings.busy_timeout_ms, min=0),
        reserve_mb=section.int("reserve_mb", SqliteSettings.reserve_mb, min=0),
    )
    section.done()
    return settings


def open_sqlite(settings: SqliteSettings, runtime: QueueRuntime) -> SqliteQueueStore:
    """The store in ``runtime.data_dir``; with ``create`` False only if the database exists."""
    path = runtime.data_dir / DB_NAME
    if not runtime.create and not path.exists():
        raise QueueNotFound(f"no queue database yet at {path}")
    # The engine (create) checks the database before trusting it; looking (intu queue) does not.
    return SqliteQueueStore(
        runtime.data_dir,
        busy_timeout_ms=settings.busy_timeout_ms,
        node_id=runtime.node_id,
        check=runtime.create,
        reserve_bytes=settings.reserve_mb * 1024 * 1024 if runtime.create else 0,
    )


SQLITE_BACKEND = QueueBackend(
    "sqlite",
    parse_sqlite_settings,
    open_sqlite,
    "one SQLite database in WAL mode in the data folder (for one engine)",
)


# -- helpers -------------------------------------------------------------------------------
def _json_text(value: str) -> str:
    """``value`` as it appears inside a JSON string literal written by ``_encode_message``."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


class DataPaths:
    """Paths under the data folder stored relative to it (schema v3), so a moved project keeps
    working; anything else is kept as given. A path is recognised under the folder as given and
    under its resolved form (sources write the first, DICOM bodies name the second)."""

    def __init__(self, data_dir: Path) -> None:
        current = str(data_dir.absolute()).rstrip("/") + "/"
        resolved = str(data_dir.resolve()).rstrip("/") + "/"
        self.current = current
        # A data folder at "/" would make every path "relative": keep them as they are then.
        self.prefixes = [p for p in dict.fromkeys([current, resolved]) if p != "/"]
        # The replacements, worked out once: they run on every message enqueued and read.
        self._marks = [
            pair
            for prefix in self.prefixes
            for pair in (
                ("file://" + _json_text(quote(prefix)), "file://" + _json_text(_URL_MARK)),
                (_json_text(prefix), _json_text(_DIR_MARK)),
            )
        ]
        self._unmarks = [
            (_json_text(_URL_MARK), _json_text(quote(self.current))),
            (_json_text(_DIR_MARK), _json_text(self.current)),
        ]

    def relative(self, path: str) -> str:
        for prefix in self.prefixes:
            if path.startswith(prefix):
                return path[len(prefix) :]
        return path

    def absolute(self, stored: str) -> str:
        return stored if os.path.isabs(stored) else self.current + stored

    def mark(self, text: str) -> str:
        """A message's JSON text with the data folder's path replaced by the markers."""
        for found, mark in self._marks:
            text = text.replace(found, mark)
        return text

    def unmark(self, text: str) -> str:
        """The stored JSON text with the current data folder put back in for the markers."""
        if "\\u0000intu:" not in text:
            return text
        for mark, path in self._unmarks:
            text = text.replace(mark, path)
        return text


# -- history ---------------------------------------------------------------------------------
_EXPIRE_BATCH = 500

_HISTORY_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    received_at REAL NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    patient_id TEXT,
    accession_number TEXT,
    study_uid TEXT,
    sop_instance_uid TEXT,
    identifiers TEXT NOT NULL DEFAULT '{}',
    tags TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL,
    destinations TEXT NOT NULL DEFAULT '{}',
    entries TEXT NOT NULL DEFAULT '[]',
    events INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_received ON messages (received_at);
CREATE INDEX IF NOT EXISTS messages_by_accession ON messages (accession_number, received_at)
    WHERE accession_number IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_by_patient ON messages (patient_id, received_at)
    WHERE patient_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_by_study ON messages (study_uid, received_at)
    WHERE study_uid IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_by_sop ON messages (sop_instance_uid)
    WHERE sop_instance_uid IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    message_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    destination TEXT NOT NULL DEFAULT '',
    attempt INTEGER,
    status TEXT NOT NULL DEFAULT '',
    code INTEGER,
    detail TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (message_id, seq)
) WITHOUT ROWID;
"""

_MESSAGE_COLUMNS = (
    "id, channel, received_at, source, identifiers, tags, status, destinations, updated_at, entries"
)
_EVENT_COLUMNS = "message_id, at, kind, destination, attempt, status, code, detail"


def _history_tables(conn: sqlite3.Connection) -> None:
    """Migration to v4: the history tables, and each entry's message id (from its message)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(entries)")}
    if "message_id" not in columns:
        conn.execute("ALTER TABLE entries ADD COLUMN message_id TEXT")
    conn.execute("UPDATE entries SET message_id = json_extract(message, '$.id') WHERE message_id IS NULL")
    for statement in _HISTORY_SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


class _History:
    """Events to write in one transaction, grouped by message, with the records to create for
    messages seen for the first time (``new``) and the entries each message gains or loses.

    Written for the fewest b-trees per commit, since every page a commit touches is written to
    the WAL and fsynced: the record keeps the ids of its entries still queued (``entries``: what
    ``journey`` lists and ``expire_history`` checks, without an index on ``entries``) and the
    number of its events (their key is ``(message_id, seq)``: one b-tree, no rowid index).
    """

    def __init__(self, events: Iterable[Event] = ()) -> None:
        self.events: dict[str, list[Event]] = {}
        self.records: dict[str, NewRecord] = {}
        self.opened: dict[str, list[str]] = {}
        self.closed: dict[str, set[str]] = {}
        for event in events:
            self.add(event)

    def new(self, message: Message) -> str:
        if message.id not in self.records:
            self.records[message.id] = history_of(message)
        return message.id

    def add(self, event: Event) -> None:
        self.events.setdefault(event.message_id, []).append(event)

    def opens(self, message_id: str, entry_id: str) -> None:
        self.opened.setdefault(message_id, []).append(entry_id)

    def closes(self, message_id: str, entry_id: str) -> None:
        self.closed.setdefault(message_id, set()).add(entry_id)

    def write(self, conn: sqlite3.Connection, now: float) -> None:
        rows: list[tuple[Any, ...]] = []
        for message_id in dict.fromkeys([*self.records, *self.events, *self.opened, *self.closed]):
            events = self.events.get(message_id, [])
            new = self.records.get(message_id)
            inserted = 0
            if new is not None:
                # A message seen for the first time (an enqueue from a source): its record is
                # inserted without looking for it first, one statement fewer per message; when it
                # exists already (a replay, an unqueued send recorded before), nothing is
                # inserted and it is updated below.
                received = Event(message_id, new.received_at, EventKind.RECEIVED, detail=_from(new))
                created = [received, *events]
                status, states = next_state(
                    "received", {}, created, channel_queue_prefix=CHANNEL_QUEUE_PREFIX
                )
                ids = new.identifiers
                entries = [
                    e for e in self.opened.get(message_id, []) if e not in self.closed.get(message_id, ())
                ]
                inserted = conn.execute(
                    "INSERT INTO messages (id, channel, received_at, source, patient_id,"
                    " accession_number, study_uid, sop_instance_uid, identifiers, tags, status,"
                    " destinations, entries, events, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                    (
                        message_id, new.channel, new.received_at, new.source, ids.get("patient_id"),
                        ids.get("accession_number"), ids.get("study_uid"), ids.get("sop_instance_uid"),
                        json.dumps(ids), json.dumps(new.tags), status, json.dumps(states),
                        json.dumps(entries), len(created), now,
                    ),
                ).rowcount  # fmt: skip
                if inserted:
                    events, first = created, 1
            if new is None or not inserted:
                found = conn.execute(
                    "SELECT status, destinations, entries, events FROM messages WHERE id = ?", (message_id,)
                ).fetchone()
                if found is None:
                    continue  # an entry queued before the history existed: it has no record
                status, states = next_state(
                    found["status"],
                    json.loads(found["destinations"]),
                    events,
                    channel_queue_prefix=CHANNEL_QUEUE_PREFIX,
                )
                closed = self.closed.get(message_id, set())
                entries = [e for e in json.loads(found["entries"]) if e not in closed]
                entries += [e for e in self.opened.get(message_id, []) if e not in closed]
                conn.execute(
                    "UPDATE messages SET status = ?, destinations = ?, entries = ?, events = ?,"
                    " updated_at = ? WHERE id = ?",
                    (
                        status,
                        json.dumps(states),
                        json.dumps(entries),
                        found["events"] + len(events),
                        now,
                        message_id,
                    ),
                )
                first = found["events"] + 1
            rows.extend(
                (
                    e.message_id,
                    first + n,
                    e.at,
                    e.kind.value,
                    e.destination,
                    e.attempt,
                    e.status,
                    e.code,
                    capped(e.detail),
                )
                for n, e in enumerate(events)
            )
        if rows:
            conn.executemany(
                "INSERT INTO events (message_id, seq, at, kind, destination, attempt, status, code, detail)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )


def _from(new: NewRecord) -> str:
    return f"from {new.source}" if new.source else ""


def _operator_events(
    conn: sqlite3.Connection, rows: Sequence[sqlite3.Row], kind: EventKind, detail: str, now: float
) -> None:
    history = _History()
    for row in rows:
        if row["message_id"]:
            history.add(Event(row["message_id"], now, kind, row["queue"], detail=detail))
            if kind is EventKind.PURGED:
                history.closes(row["message_id"], row["id"])
    history.write(conn, now)


def _message_record(row: sqlite3.Row) -> MessageRecord:
    return MessageRecord(
        id=row["id"],
        channel=row["channel"],
        received_at=row["received_at"],
        source=row["source"],
        identifiers=json.loads(row["identifiers"]),
        tags=json.loads(row["tags"]),
        status=row["status"],
        destinations=json.loads(row["destinations"]),
        updated_at=row["updated_at"],
    )


def _event(row: sqlite3.Row) -> Event:
    return Event(
        message_id=row["message_id"],
        at=row["at"],
        kind=EventKind(row["kind"]),
        destination=row["destination"],
        attempt=row["attempt"],
        status=row["status"],
        code=row["code"],
        detail=row["detail"],
    )


def _relative_paths(conn: sqlite3.Connection, paths: DataPaths) -> None:
    """Migration to v3: store paths under the data folder relative to it. A folder moved before
    the upgrade is found from where its spooled files were (``<folder>/spool/...``)."""
    moved = {
        row[0].rsplit("/spool/", 1)[0] + "/"
        for row in conn.execute("SELECT path FROM files WHERE path LIKE '/%/spool/%'")
    }
    for prefix in [*paths.prefixes, *sorted(moved - set(paths.prefixes))]:
        conn.execute(
            "UPDATE OR IGNORE files SET path = substr(path, ?) WHERE substr(path, 1, ?) = ?",
            (len(prefix) + 1, len(prefix), prefix),
        )
        conn.execute(
            "UPDATE entries SET files = replace(files, ?, '\"'),"
            " message = replace(replace(message, ?, ?), ?, ?)",
            (
                '"' + _json_text(prefix),
                "file://" + _json_text(quote(prefix)),
                "file://" + _json_text(_URL_MARK),
                _json_text(prefix),
                _json_text(_DIR_MARK),
            ),
        )


@contextmanager
def _unavailable(path: Path) -> Iterator[None]:
    # SQLITE_FULL, SQLITE_BUSY after the busy timeout, SQLITE_IOERR, SQLITE_CANTOPEN: the queue
    # cannot be used for now (sqlite3 reports them all as OperationalError, none as OSError).
    try:
        yield
    except sqlite3.OperationalError as exc:
        raise QueueUnavailable(f"{exc} (queue database {path})") from exc
    except sqlite3.DatabaseError as exc:
        if type(exc) is not sqlite3.DatabaseError:  # IntegrityError and the like are bugs
            raise
        # SQLITE_CORRUPT ("database disk image is malformed"), SQLITE_NOTADB ("file is not a
        # database"): retrying will not help, and what it reads cannot be trusted.
        raise QueueDamaged(_damaged(path, str(exc))) from exc


def _damaged(path: Path, what: str) -> str:
    return (
        f"the queue database {path} is damaged ({what}). Nothing was changed. Stop intu, then either"
        f" restore queue.db from a backup, or move it aside (mv {path} {path}.damaged; also its -wal"
        " and -shm files) and run `intu queue recover`: it re-enqueues the received instances kept"
        " under the data folder from the files themselves"
    )


# Built once: json.dumps with options builds a new encoder per call (measured 2026-12-03 at ~3 µs
# of a DICOM message's ~30 µs encoding).
_MESSAGE_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _encode_message(message: Message) -> str:
    try:
        return _MESSAGE_ENCODER.encode(message.to_json())
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"message {message.id} cannot be queued: its body or metadata is not JSON-serialisable ({exc})"
        ) from exc


def _distinct(paths: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(str(p) for p in paths))


def _add_refs(conn: sqlite3.Connection, refs: list[tuple[str]]) -> None:
    if refs:
        conn.executemany(
            "INSERT INTO files (path, refs) VALUES (?, 1) ON CONFLICT (path) DO UPDATE SET refs = refs + 1",
            refs,
        )


def _release(conn: sqlite3.Connection, file_lists: Iterable[list[str]]) -> list[str]:
    """Drop one reference per listed file; the files no entry needs any more (to delete after commit)."""
    paths = [path for files in file_lists for path in files]
    if not paths:
        return []
    if len(paths) == 1:
        # A delivered entry's one file (a DICOM instance), usually its last reference: one
        # statement instead of two, and no JSON list to build.
        gone = conn.execute("DELETE FROM files WHERE path = ? AND refs <= 1 RETURNING path", paths).fetchall()
        if not gone:
            conn.execute("UPDATE files SET refs = refs - 1 WHERE path = ?", paths)
        return [row[0] for row in gone]
    conn.executemany("UPDATE files SET refs = refs - 1 WHERE path = ?", [(p,) for p in paths])
    rows = conn.execute(
        "DELETE FROM files WHERE refs <= 0 AND path IN (SELECT value FROM json_each(?)) RETURNING path",
        (json.dumps(paths),),
    ).fetchall()
    return [row[0] for row in rows]


def _unlink(paths: Iterable[str]) -> int:
    # After the commit: a crash here leaves an orphan file, never an entry without its file.
    deleted = 0
    for path in paths:
        try:
            os.unlink(path)
            deleted += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not delete %s, which no queued message needs any more: %s", path, exc)
    return deleted


def _count(conn: sqlite3.Connection, queue: str, name: str, n: int) -> None:
    conn.execute(
        "INSERT INTO counters (queue, name, value) VALUES (?, ?, ?)"
        " ON CONFLICT (queue, name) DO UPDATE SET value = value + excluded.value",
        (queue, name, n),
    )


def _filters(
    queue: str | None, entry_ids: Sequence[str] | None, states: Sequence[str] | None
) -> tuple[str, tuple[Any, ...]]:
    clauses: list[str] = []
    params: list[Any] = []
    if queue is not None:
        clauses.append("queue = ?")
        params.append(queue)
    if entry_ids is not None:
        clauses.append("id IN (SELECT value FROM json_each(?))")
        params.append(json.dumps(list(entry_ids)))
    if states is not None:
        clauses.append(f"state IN ({', '.join('?' * len(states))})")
        params.extend(states)
    return (" AND ".join(clauses) or "1"), tuple(params)


def _entry(row: sqlite3.Row, message: str) -> Entry:
    return Entry(
        id=row["id"],
        queue=row["queue"],
        message=Message.from_json(json.loads(message)),
        state=EntryState(row["state"]),
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_error=row["last_error"],
        history=tuple(json.loads(row["history"])),
        lease_owner=row["lease_owner"],
        lease_expires_at=row["lease_expires_at"],
    )
