"""The queue's tables in one PostgreSQL schema, created and upgraded by the backend.

Version 1::

    schema_version(version integer)                  -- one row: the version below
    entries(seq bigserial PRIMARY KEY,               -- enqueue order; ties on next_attempt_at go by seq
            id text UNIQUE, queue text, state text, attempts integer,
            next_attempt_at, created_at, updated_at double precision,   -- epoch seconds
            last_error text, history jsonb,          -- the last 50 attempts
            files text[],                            -- the message's files (distinct)
            message text,                            -- Message.to_json() as JSON text, as written
            lease_owner text, lease_expires_at double precision)
    index entries_by_queue(queue, state, next_attempt_at, seq)
    files(path text PRIMARY KEY, refs integer)       -- entries that still need the file
    counters(queue, name, node, value)               -- "delivered", "recovered" per queue and node

Version 2 adds the message history (``intu_core.history``), as in the SQLite backend::

    entries.message_id text                          -- the history record an entry belongs to
    index entries_by_message(message_id)
    messages(id, channel, received_at, source, patient_id, accession_number, study_uid,
             sop_instance_uid, identifiers jsonb, tags jsonb, status, destinations jsonb, updated_at)
    index messages_by_received, _by_accession, _by_patient, _by_study, _by_sop, _by_updated
    events(seq bigserial, message_id, at, kind, destination, attempt, status, code, detail)
    index events_by_message(message_id, seq)

Version 3 adds ``index messages_by_problem(status, received_at)`` over the records whose status is
errored, dead or partial only (``intu_core.history.PROBLEM_STATUSES``). Built inside the upgrade's
transaction (``CREATE INDEX CONCURRENTLY`` cannot be), it holds the table's SHARE lock meanwhile:
other nodes' enqueues wait, about 0.1 s per million records with the table in memory (measured
2026-12-04, PostgreSQL 15, this project's 2-core machine).

Counters are kept per node and summed when read: one row per queue updated by every delivery
would serialise the deliveries of all nodes on its row lock until each commit's WAL flush.

Nodes starting together migrate one at a time (a transaction-scoped advisory lock on the schema
name); DDL is transactional in PostgreSQL, so a failed step leaves the previous version whole.
"""

from __future__ import annotations

from intu_core.queue import QueueNotFound, QueueUnavailable
from intu_postgres_queue.connections import Connection, Connections

# Each item takes the schema from the version before it (its index) to the next; statements are
# separated by ";" and "{s}" is the schema. Never edit a released step: add one.
MIGRATIONS = (
    """
CREATE TABLE {s}.entries (
    seq bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    queue text NOT NULL,
    state text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL,
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL,
    last_error text NOT NULL DEFAULT '',
    history jsonb NOT NULL DEFAULT '[]',
    files text[] NOT NULL DEFAULT '{{}}',
    message text NOT NULL,
    lease_owner text,
    lease_expires_at double precision
);
CREATE INDEX entries_by_queue ON {s}.entries (queue, state, next_attempt_at, seq);
CREATE TABLE {s}.files (path text PRIMARY KEY, refs integer NOT NULL);
CREATE TABLE {s}.counters (
    queue text NOT NULL,
    name text NOT NULL,
    node text NOT NULL,
    value bigint NOT NULL,
    PRIMARY KEY (queue, name, node)
)
""",
    """
ALTER TABLE {s}.entries ADD COLUMN message_id text;
UPDATE {s}.entries SET message_id = (message::jsonb)->>'id';
CREATE INDEX entries_by_message ON {s}.entries (message_id);
CREATE TABLE {s}.messages (
    id text PRIMARY KEY,
    channel text NOT NULL,
    received_at double precision NOT NULL,
    source text NOT NULL DEFAULT '',
    patient_id text,
    accession_number text,
    study_uid text,
    sop_instance_uid text,
    identifiers jsonb NOT NULL DEFAULT '{{}}',
    tags jsonb NOT NULL DEFAULT '{{}}',
    status text NOT NULL,
    destinations jsonb NOT NULL DEFAULT '{{}}',
    updated_at double precision NOT NULL
);
CREATE INDEX messages_by_received ON {s}.messages (received_at);
CREATE INDEX messages_by_accession ON {s}.messages (accession_number, received_at)
    WHERE accession_number IS NOT NULL;
CREATE INDEX messages_by_patient ON {s}.messages (patient_id, received_at) WHERE patient_id IS NOT NULL;
CREATE INDEX messages_by_study ON {s}.messages (study_uid, received_at) WHERE study_uid IS NOT NULL;
CREATE INDEX messages_by_sop ON {s}.messages (sop_instance_uid) WHERE sop_instance_uid IS NOT NULL;
CREATE INDEX messages_by_updated ON {s}.messages (updated_at);
CREATE TABLE {s}.events (
    seq bigserial PRIMARY KEY,
    message_id text NOT NULL,
    at double precision NOT NULL,
    kind text NOT NULL,
    destination text NOT NULL DEFAULT '',
    attempt integer,
    status text NOT NULL DEFAULT '',
    code integer,
    detail text NOT NULL DEFAULT ''
);
CREATE INDEX events_by_message ON {s}.events (message_id, seq)
""",
    # 3: a search by a problem status (intu_core.history.PROBLEM_STATUSES), as in SQLite's v5.
    """
CREATE INDEX messages_by_problem ON {s}.messages (status, received_at)
    WHERE status IN ('errored', 'dead', 'partial')
""",
)
SCHEMA_VERSION = len(MIGRATIONS)


def prepare(db: Connections, schema: str, *, create: bool) -> int:
    """Make ``schema`` hold the current version of the tables; the version found before.

    With ``create`` False nothing is written: ``QueueNotFound`` when there is no queue there yet,
    ``QueueUnavailable`` when it is of an older version (a started engine of this version upgrades
    it). A schema newer than this code raises ``RuntimeError``.
    """
    s = quote_identifier(schema)

    def current(conn: Connection) -> int | None:
        exists = conn.execute("SELECT to_regclass(%s) AS t", (f"{s}.schema_version",)).fetchone()
        if exists is None or exists["t"] is None:
            return None
        row = conn.execute(f"SELECT max(version) AS v FROM {s}.schema_version").fetchone()
        return int(row["v"]) if row is not None and row["v"] is not None else 0

    found = db.run(current)
    if found is not None and found > SCHEMA_VERSION:
        raise RuntimeError(
            f"the queue in schema {schema!r} of {db.where} has version {found}, newer than this "
            f"intu-postgres-queue understands ({SCHEMA_VERSION}); upgrade it"
        )
    if found == SCHEMA_VERSION:
        return found  # nothing to write (the usual case)
    if not create:
        if found is None:
            raise QueueNotFound(f"no queue yet in schema {schema!r} of {db.where}")
        raise QueueUnavailable(
            f"the queue in schema {schema!r} of {db.where} has version {found}; start intu serve of"
            f" this version once to upgrade it to {SCHEMA_VERSION}"
        )

    def migrate(conn: Connection) -> int:
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"intu-queue-schema:{schema}",))
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
        conn.execute(f"CREATE TABLE IF NOT EXISTS {s}.schema_version (version integer NOT NULL)")
        version = current(conn) or 0  # another node may have upgraded it while we waited
        for step in MIGRATIONS[version:]:
            for statement in step.format(s=s).split(";"):
                if statement.strip():
                    conn.execute(statement.encode())  # DDL: no parameters
        conn.execute(f"DELETE FROM {s}.schema_version")
        conn.execute(f"INSERT INTO {s}.schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
        return version

    return db.run(migrate)


def quote_identifier(schema: str) -> str:
    # The settings allow only [a-z0-9_] names; quoting keeps a reserved word usable.
    return '"' + schema.replace('"', '""') + '"'


__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "prepare", "quote_identifier"]
