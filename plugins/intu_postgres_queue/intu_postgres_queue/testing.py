"""Test support: the PostgreSQL server the tests use, and a fresh schema per test.

The server is named by ``INTU_TEST_POSTGRES_DSN`` (``.ci/run`` starts Debian's PostgreSQL and sets
it). Without it, or when it cannot be reached, ``postgres_dsn`` raises ``PostgresMissing``, which the
tests' ``conftest.py`` turns into a skip with the reason, or a failure when
``INTU_REQUIRE_INTEROP=1`` (as in CI), the policy of the DICOM plugin's peers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import psycopg
from psycopg import conninfo

DSN_VARIABLE = "INTU_TEST_POSTGRES_DSN"


class PostgresMissing(Exception):
    """No PostgreSQL to test against; the message says why and what to do."""


def postgres_dsn() -> str:
    """The test server's connection string, checked by connecting once."""
    dsn = os.environ.get(DSN_VARIABLE, "")
    if not dsn:
        raise PostgresMissing(
            f"{DSN_VARIABLE} is not set (apt-get install postgresql; .ci/run shows how to start it"
            " and create the role and database)"
        )
    try:
        psycopg.connect(dsn, connect_timeout=5).close()
    except psycopg.Error as exc:
        raise PostgresMissing(f"cannot connect to the PostgreSQL of {DSN_VARIABLE}: {exc}") from exc
    return dsn


def local_cluster(dsn: str) -> tuple[str, str]:
    """The Debian cluster (version, name) serving ``dsn`` on this machine, for tests that stop and
    start PostgreSQL; ``PostgresMissing`` when ``dsn`` is not local or the tools are missing."""
    host = str(conninfo.conninfo_to_dict(dsn).get("host") or "localhost")
    if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("/"):
        raise PostgresMissing(f"the test PostgreSQL at {host} is not on this machine: cannot restart it")
    if shutil.which("pg_ctlcluster") is None or shutil.which("pg_lsclusters") is None:
        raise PostgresMissing("pg_ctlcluster not installed (Debian's postgresql-common): cannot restart it")
    if os.geteuid() != 0:
        raise PostgresMissing("restarting PostgreSQL with pg_ctlcluster needs root")
    listed = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True, timeout=30)
    fields = listed.stdout.split()
    if len(fields) < 2:
        raise PostgresMissing("pg_lsclusters lists no PostgreSQL cluster")
    return fields[0], fields[1]


def fresh_schema(prefix: str = "t") -> str:
    """A schema name no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def drop_schema(dsn: str, schema: str) -> None:
    """Drop a test's schema and everything in it."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'.encode())


__all__ = ["DSN_VARIABLE", "PostgresMissing", "drop_schema", "fresh_schema", "local_cluster", "postgres_dsn"]
