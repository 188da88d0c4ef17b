"""The ``queue:`` block of ``intu.yaml`` for ``backend: postgres``::

    queue:
      backend: postgres
      dsn: "postgresql://intu:${INTU_PG_PASSWORD}@db.example.org/intu"   # libpq URI or key=value
      schema: intu              # the PostgreSQL schema holding the queue's tables (created)
      node_id: ${INTU_NODE_ID}  # default: this host's name and the data folder
      lease_s: 300              # how long a claim holds an entry unless its node renews it
      pool_size: 8              # connections per engine process at most
      connect_timeout_s: 5
      statement_timeout_ms: 30000

Parsing checks the syntax only (``intu validate`` does not connect: the database may be reachable
from the nodes and not from where the project is checked); ``intu queue list`` shows whether it
connects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from intu_core.queue import DEFAULT_LEASE_S

if TYPE_CHECKING:
    from intu_core.config.section import Section

_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class PostgresSettings:
    """The parsed ``queue:`` block (see the module docstring)."""

    dsn: str
    schema: str = "intu"
    node_id: str | None = None
    lease_s: float = DEFAULT_LEASE_S
    pool_size: int = 8
    connect_timeout_s: float = 5.0
    statement_timeout_ms: int = 30_000

    @property
    def where(self) -> str:
        """The database for messages: ``postgresql://user@host:port/dbname``, without the password."""
        return describe_dsn(self.dsn)


def parse_postgres_settings(section: Section) -> PostgresSettings | None:
    """The rest of the ``queue:`` block for ``backend: postgres``; problems go to ``section``."""
    dsn = section.str("dsn")
    if dsn is not None:
        # Imported here: psycopg costs ~0.25 s of CPU, and every `intu` command loads this plugin.
        from psycopg import conninfo

        try:
            conninfo.conninfo_to_dict(dsn)
        except Exception as exc:  # psycopg.ProgrammingError: libpq's own words
            section.error("dsn", f"not a PostgreSQL connection string: {_first_line(exc)}")
            dsn = None
    schema = section.str("schema", PostgresSettings.schema)
    if schema is not None and not _SCHEMA.match(schema):
        section.error(
            "schema",
            f"expected a schema name (lowercase letters, digits, '_'; at most 63), found {schema!r}",
        )
        schema = None
    node_id = section.str("node_id", None, max_length=200)
    if node_id is not None and not node_id.strip():
        section.error("node_id", "expected a node id, found an empty string (leave it out for the default)")
        node_id = None
    settings = PostgresSettings(
        dsn=dsn or "",
        schema=schema or PostgresSettings.schema,
        node_id=node_id,
        lease_s=section.float("lease_s", PostgresSettings.lease_s, min=0.1),
        pool_size=section.int("pool_size", PostgresSettings.pool_size, min=1, max=100),
        connect_timeout_s=section.float("connect_timeout_s", PostgresSettings.connect_timeout_s, min=1),
        statement_timeout_ms=section.int(
            "statement_timeout_ms", PostgresSettings.statement_timeout_ms, min=100
        ),
    )
    section.done()
    return settings if dsn else None


def describe_dsn(dsn: str) -> str:
    """``postgresql://user@host:port/dbname`` of a connection string, never its password."""
    from psycopg import conninfo

    try:
        params = conninfo.conninfo_to_dict(dsn)
    except Exception:
        return "PostgreSQL (an invalid connection string)"
    user = str(params.get("user") or "")
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or 5432
    dbname = params.get("dbname") or user
    return f"postgresql://{user + '@' if user else ''}{host}:{port}/{dbname}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


__all__ = ["PostgresSettings", "describe_dsn", "parse_postgres_settings"]
