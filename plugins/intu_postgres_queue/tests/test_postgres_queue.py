"""The PostgreSQL queue backend: the queue contract, plus what only it has (its settings, the
schema version, connections lost and made again, node ids)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import intu_postgres_queue
import psycopg
import pytest
from intu_postgres_queue import PostgresQueueStore, PostgresSettings, default_node_id, open_postgres
from intu_postgres_queue.history import find_messages
from intu_postgres_queue.schema import SCHEMA_VERSION, quote_identifier
from psycopg import conninfo
from psycopg.rows import dict_row

from intu_core.config.problems import ConfigError
from intu_core.config.project import load_project
from intu_core.history import PROBLEM_STATUSES, EventKind, MessageQuery
from intu_core.message import SendResult
from intu_core.queue import QueueNotFound, QueueRuntime, QueueStore, QueueUnavailable
from intu_core.testing import registry_with
from intu_core.testing.queue_contract import QueueContract, make_file, msg, study_msg


class TestPostgresQueueStore(QueueContract):
    """The contract every backend passes, on PostgreSQL: one schema per test stands for ``place``."""

    @pytest.fixture(autouse=True)
    def _database(self, pg_dsn: str, pg_schema: str) -> Iterator[None]:
        self.dsn, self.schema = pg_dsn, pg_schema
        yield

    def open_store(self, place: Path, *, node_id: str | None = None) -> QueueStore:
        # The default node id is the same at every opening of a place, as for a restarted engine.
        return PostgresQueueStore(self.dsn, schema=self.schema, node_id=node_id or f"node:{place}")


# -- settings ------------------------------------------------------------------------------------
def _project(folder: Path, queue_block: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "intu.yaml").write_text(f"data_dir: data\nqueue:\n{queue_block}")
    (folder / "channels").mkdir(exist_ok=True)
    return folder


def test_settings_are_read_with_defaults_and_variables(tmp_path: Path) -> None:
    project = load_project(
        _project(tmp_path, '  backend: postgres\n  dsn: "postgresql://intu:${PW}@127.0.0.1/intu"\n'),
        registry_with(intu_postgres_queue),
        env={"PW": "s3cret"},
    )
    settings = project.queue.settings
    assert isinstance(settings, PostgresSettings)
    assert settings.dsn == "postgresql://intu:s3cret@127.0.0.1/intu"
    assert (settings.schema, settings.node_id, settings.lease_s, settings.pool_size) == (
        "intu",
        None,
        300.0,
        8,
    )
    assert settings.where == "postgresql://intu@127.0.0.1:5432/intu"  # never the password


def test_bad_settings_are_reported_with_file_line_and_key(tmp_path: Path) -> None:
    folder = _project(
        tmp_path,
        "  backend: postgres\n"
        "  dsn: 'host=127.0.0.1 port'\n"
        "  schema: Bad-Name\n"
        "  lease_s: 0\n"
        "  pool_size: 0\n"
        "  leese_s: 3\n",
    )
    with pytest.raises(ConfigError) as err:
        load_project(folder, registry_with(intu_postgres_queue))
    found = {(p.key_path, p.line) for p in err.value.problems}
    assert found == {
        ("queue.dsn", 4),
        ("queue.schema", 5),
        ("queue.lease_s", 6),
        ("queue.pool_size", 7),
        ("queue.leese_s", 8),
    }, err.value.report()
    text = err.value.report()
    assert "not a PostgreSQL connection string" in text and "did you mean 'lease_s'" in text
    assert all(p.file == folder / "intu.yaml" for p in err.value.problems)


def test_a_missing_dsn_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing required key 'dsn'"):
        load_project(_project(tmp_path, "  backend: postgres\n"), registry_with(intu_postgres_queue))


def test_the_default_node_id_is_the_host_and_the_data_folder(tmp_path: Path) -> None:
    runtime = QueueRuntime(tmp_path / "data")
    assert default_node_id(runtime) == f"{socket.gethostname()}:{(tmp_path / 'data').resolve()}"


# -- reaching the server -------------------------------------------------------------------------
def test_an_unreachable_server_is_one_clear_queue_unavailable_without_the_password() -> None:
    settings = PostgresSettings(dsn=f"postgresql://intu:s3cret@127.0.0.1:{_closed_port()}/intu")
    with pytest.raises(QueueUnavailable) as err:
        open_postgres(settings, QueueRuntime(Path("/nonexistent")))
    text = str(err.value)
    assert text.startswith("cannot connect to postgresql://intu@127.0.0.1:") and "\n" not in text
    assert "s3cret" not in text


def test_a_wrong_password_is_one_clear_line(pg_dsn: str) -> None:
    params = conninfo.conninfo_to_dict(pg_dsn)
    params["password"] = "wrong-password"
    with pytest.raises(QueueUnavailable, match="password authentication failed") as err:
        PostgresQueueStore(conninfo.make_conninfo(**params), node_id="n")
    assert "wrong-password" not in str(err.value)


def test_a_connection_the_server_dropped_is_made_again(pg_dsn: str, pg_schema: str) -> None:
    store = PostgresQueueStore(pg_dsn, schema=pg_schema, node_id="node-a")
    store.enqueue([("q", msg(1))])
    _terminate_connections(pg_dsn, "intu node-a")  # as a server restart does to every connection
    assert store.size("q") == 1  # the idle connection is seen to be closed and made again
    _terminate_connections(pg_dsn, "intu node-a")
    assert store.enqueue([("q", msg(2))])
    assert store.size("q") == 2
    store.close()


def test_connections_are_kept_across_operations(pg_dsn: str, pg_schema: str) -> None:
    store = PostgresQueueStore(pg_dsn, schema=pg_schema, node_id="node-keep")

    def backends() -> list[tuple[int, object]]:
        with psycopg.connect(pg_dsn) as conn:
            return conn.execute(
                "SELECT pid, backend_start FROM pg_stat_activity WHERE application_name = %s",
                ("intu node-keep",),
            ).fetchall()

    store.enqueue([("q", msg(0))])
    before = backends()
    for i in range(50):
        store.enqueue([("q", msg(i))])
        entry = store.claim("q")
        assert entry is not None and store.complete(entry.id, SendResult.success())
    assert backends() == before and len(before) == 1  # one thread: one connection, never re-made
    store.close()


# -- the schema ----------------------------------------------------------------------------------
def test_the_schema_is_versioned_and_opening_for_a_look_creates_nothing(pg_dsn: str, pg_schema: str) -> None:
    with pytest.raises(QueueNotFound, match=f"no queue yet in schema '{pg_schema}'"):
        PostgresQueueStore(pg_dsn, schema=pg_schema, node_id="n", create=False)
    with psycopg.connect(pg_dsn) as conn:
        found = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (pg_schema,)).fetchone()
    assert found is None
    PostgresQueueStore(pg_dsn, schema=pg_schema, node_id="n").close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        [(version,)] = conn.execute(f'SELECT version FROM "{pg_schema}".schema_version'.encode()).fetchall()
        assert version == SCHEMA_VERSION == 3
        PostgresQueueStore(pg_dsn, schema=pg_schema, node_id="n", create=False).close()
        conn.execute(f'UPDATE "{pg_schema}".schema_version SET version = 99'.encode())
    with pytest.raises(RuntimeError, match="has version 99, newer than this"):
        PostgresQueueStore(pg_dsn, schema=pg_schema, node_id="n")


def test_a_version_1_queue_gets_the_history_tables(pg_dsn: str, pg_schema: str) -> None:
    from intu_postgres_queue.schema import MIGRATIONS

    s = f'"{pg_schema}"'
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {s}".encode())
        for statement in MIGRATIONS[0].format(s=s).split(";"):
            if statement.strip():
                conn.execute(statement.encode())
        conn.execute(f"CREATE TABLE {s}.schema_version (version integer NOT NULL)".encode())
        conn.execute(f"INSERT INTO {s}.schema_version VALUES (1)".encode())
        old = msg(1)
        conn.execute(
            f"INSERT INTO {s}.entries (id, queue, state, next_attempt_at, created_at, updated_at, message)"
            " VALUES ('old', 'q', 'pending', 0, 0, 0, %s)".encode(),
            (json.dumps(old.to_json()),),
        )
    with pytest.raises(QueueUnavailable, match="start intu serve of this version once"):
        PostgresQueueStore(pg_dsn, schema=pg_schema, node_id="n", create=False)
    store = PostgresQueueStore(pg_dsn, schema=pg_schema, node_id="n")
    assert store.journey(old.id) is None  # queued before the history: no record, delivered as before
    entry = store.claim("q")
    assert entry is not None and entry.message.id == old.id and store.complete(entry.id, SendResult.success())
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(f"SELECT count(*) FROM {s}.events".encode()).fetchone() == (0,)
    new = msg(2)
    store.enqueue([("q", new)])
    journey = store.journey(new.id)
    assert journey is not None and journey.message.status == "queued"
    store.close()


def test_nodes_starting_together_create_the_schema_once(pg_dsn: str, pg_schema: str) -> None:
    stores: list[PostgresQueueStore] = []
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            stores.append(PostgresQueueStore(pg_dsn, schema=pg_schema, node_id=f"node-{i}"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(stores) == 4
    stores[0].enqueue([("q", msg())])
    assert [s.size("q") for s in stores] == [1, 1, 1, 1]
    for s in stores:
        s.close()


def test_delivered_counts_add_up_over_nodes(pg_dsn: str, pg_schema: str) -> None:
    a = PostgresQueueStore(pg_dsn, schema=pg_schema, node_id="node-a")
    b = PostgresQueueStore(pg_dsn, schema=pg_schema, node_id="node-b")
    a.enqueue([("q", msg(i)) for i in range(4)])
    for store in (a, b, a, b):
        entry = store.claim("q")
        assert entry is not None and store.complete(entry.id, SendResult.success())
    [stats] = b.stats()
    assert stats.delivered == 4 and stats.depth == 0
    a.close()
    b.close()


class _DeliverBefore:
    """A connection that lets ``deliver`` commit (on another connection) right before the first
    statement naming ``table``: a delivery made between two statements of one read."""

    def __init__(self, conn: Any, table: str, deliver: Any) -> None:
        self._conn, self._table, self._deliver = conn, table, deliver

    def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        if f".{self._table} " in f"{query} " and self._deliver is not None:
            deliver, self._deliver = self._deliver, None
            deliver()
        return self._conn.execute(query, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _deliver_between_statements(
    monkeypatch: pytest.MonkeyPatch, store: PostgresQueueStore, table: str, entry_id: str
) -> list[bool]:
    """The store's next read sees ``entry_id`` delivered right before it reads ``table``."""
    run = store._db.run
    delivered: list[bool] = []
    started: list[bool] = []

    def deliver() -> None:
        started.append(True)
        delivered.append(store.complete(entry_id, SendResult.success()))

    def traced(work: Any, **kwargs: Any) -> Any:
        if started:  # the delivery itself and anything after: as they are
            return run(work, **kwargs)
        return run(lambda conn: work(_DeliverBefore(conn, table, deliver)), **kwargs)

    monkeypatch.setattr(store._db, "run", traced)
    return delivered


def test_the_counts_are_read_from_one_snapshot(
    pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``stats`` reads the entries and the counters in two statements: a delivery committed
    between them must not be seen by the second only (the entry counted twice, in flight and
    delivered), as on SQLite."""
    store = PostgresQueueStore(pg_dsn, schema=pg_schema, node_id="node-a")
    try:
        [entry_id] = store.enqueue([("q", msg())])
        assert store.claim("q") is not None
        delivered = _deliver_between_statements(monkeypatch, store, "counters", entry_id)
        [stats] = store.stats()
        assert delivered == [True]  # the delivery did commit in between
        assert (stats.in_flight, stats.delivered) == (1, 0)  # the state before it, whole
        [stats] = store.stats()
        assert (stats.in_flight, stats.delivered) == (0, 1)
    finally:
        store.close()


def test_a_journey_is_read_from_one_snapshot(
    pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``journey`` reads the record, then its events, then its entries: a delivery committed in
    between must not show a record still queued with a delivered event and no entry left."""
    store = PostgresQueueStore(pg_dsn, schema=pg_schema, node_id="node-a")
    try:
        message = study_msg("ACC-1")
        [entry_id] = store.enqueue([("q", message)])
        assert store.claim("q") is not None
        delivered = _deliver_between_statements(monkeypatch, store, "events", entry_id)
        journey = store.journey(message.id)
        assert delivered == [True] and journey is not None
        assert EventKind.DELIVERED not in [e.kind for e in journey.events]
        assert journey.entries == (entry_id,) and journey.message.status != "delivered"
        after = store.journey(message.id)
        assert after is not None and after.message.status == "delivered"
        assert EventKind.DELIVERED in [e.kind for e in after.events] and after.entries == ()
    finally:
        store.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _terminate_connections(dsn: str, application_name: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        )
    time.sleep(0.2)  # the server closes the sockets asynchronously


# -- the command line ----------------------------------------------------------------------------
def _intu(folder: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "intu_core", "--dir", str(folder), *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_serve_with_an_unreachable_server_says_so_in_one_line(tmp_path: Path) -> None:
    dsn = f"postgresql://intu:${{PW}}@127.0.0.1:{_closed_port()}/intu"
    folder = _project(tmp_path, f'  backend: postgres\n  dsn: "{dsn}"\n  connect_timeout_s: 1\n')
    served = _intu(folder, "serve", env={"PW": "s3cret"})
    assert served.returncode == 1
    [line] = served.stderr.strip().splitlines()
    assert line.startswith("intu serve: cannot connect to postgresql://intu@127.0.0.1:"), line
    assert "s3cret" not in served.stderr
    # validate checks the settings without connecting (the database may be reachable only from the
    # nodes); `intu queue list` is what connects.
    assert _intu(folder, "validate", env={"PW": "s3cret"}).returncode == 0
    listed = _intu(folder, "queue", "list", env={"PW": "s3cret"})
    assert listed.returncode == 1 and "cannot open the queue: cannot connect to" in listed.stderr


def test_validate_reports_a_malformed_dsn(tmp_path: Path) -> None:
    folder = _project(tmp_path, '  backend: postgres\n  dsn: "host=db port"\n')
    checked = _intu(folder, "validate")
    assert checked.returncode == 1
    assert "intu.yaml:4: queue.dsn: not a PostgreSQL connection string" in checked.stdout + checked.stderr


def test_a_nodes_sweep_keeps_files_another_node_is_sending(
    tmp_path: Path, pg_dsn: str, pg_schema: str
) -> None:
    # node-a queued an instance from its spool; node-b (alive) is sending it. When node-a restarts,
    # its start-up sweep asks which of its spooled files no entry needs: not that one.
    a = PostgresQueueStore(pg_dsn, schema=pg_schema, node_id="node-a")
    b = PostgresQueueStore(pg_dsn, schema=pg_schema, node_id="node-b")
    spool = tmp_path / "shared" / "node-a" / "spool" / "ch"
    spool.mkdir(parents=True)
    queued, orphan = make_file(spool, "queued.dcm"), make_file(spool, "orphan.dcm")
    a.enqueue([("q", msg(1, (queued,)))])
    held = b.claim("q")
    assert held is not None and held.message.files == (queued,)
    a.close()
    restarted = PostgresQueueStore(pg_dsn, schema=pg_schema, node_id="node-a")
    assert restarted.recover() == 0  # node-b's live lease is not node-a's to take back
    assert restarted.unreferenced([queued, orphan]) == [orphan]
    assert restarted.release_files([queued, orphan]) == 1
    assert Path(queued).exists() and not Path(orphan).exists()
    # node-b delivers it and deletes the file on the shared folder, by the same path.
    assert b.complete(held.id, SendResult.success())
    assert not Path(queued).exists()
    for s in (restarted, b):
        s.close()


class _Explaining:
    """Stands for a connection: runs EXPLAIN of each statement on ``conn``, keeps the plans."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.plans: list[str] = []

    def execute(self, sql: str, params: Sequence[object] = ()) -> _Explaining:
        rows = self.conn.execute(f"EXPLAIN {sql}".encode(), params).fetchall()
        self.plans.append(" ".join(str(next(iter(row.values()))) for row in rows))
        return self

    def fetchall(self) -> list[Any]:
        return []


def test_a_search_by_problem_status_goes_through_its_index(pg_dsn: str, pg_schema: str) -> None:
    """find_messages's own statement, planned by PostgreSQL (sequential scans off, since the table
    is empty): a search for a rare status reads the partial index messages_by_problem (schema
    version 3); a search for a common one does not."""
    PostgresQueueStore(pg_dsn, schema=pg_schema, node_id="n").close()
    with psycopg.connect(pg_dsn, autocommit=True, row_factory=dict_row) as conn:
        conn.execute("SET enable_seqscan = off")
        for status in (*PROBLEM_STATUSES, "delivered"):
            explaining = _Explaining(conn)
            find_messages(explaining, quote_identifier(pg_schema), MessageQuery(status=status))  # type: ignore[arg-type]
            [plan] = explaining.plans
            assert ("messages_by_problem" in plan) == (status in PROBLEM_STATUSES), (status, plan)


def test_the_problem_clause_is_the_index_condition_and_names_the_problem_statuses() -> None:
    # Stated in the search so that a generic plan uses the index too: it must be the index's
    # condition, and a new problem status needs a new index (and schema version).
    from intu_postgres_queue import history, schema

    clause = history._PROBLEM_CLAUSE
    assert clause == "status IN ({})".format(", ".join(f"'{s}'" for s in PROBLEM_STATUSES))
    index = next(m for m in schema.MIGRATIONS if "messages_by_problem" in m)
    assert index.rstrip().endswith(f"WHERE {clause}")
