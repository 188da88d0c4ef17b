"""Fixtures of the PostgreSQL backend's tests: the server (``pg_dsn``) and a schema per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NoReturn

import pytest
from intu_postgres_queue.testing import (
    PostgresMissing,
    drop_schema,
    fresh_schema,
    local_cluster,
    postgres_dsn,
)

pytest.register_assert_rewrite("intu_core.testing.queue_contract")


def _missing(exc: PostgresMissing) -> NoReturn:
    if os.environ.get("INTU_REQUIRE_INTEROP") == "1":
        pytest.fail(f"{exc} and INTU_REQUIRE_INTEROP=1")
    pytest.skip(str(exc))


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """The test PostgreSQL; skipped with the reason when missing, failed when INTU_REQUIRE_INTEROP=1."""
    try:
        return postgres_dsn()
    except PostgresMissing as exc:
        _missing(exc)


@pytest.fixture(scope="session")
def pg_cluster(pg_dsn: str) -> tuple[str, str]:
    """The local Debian cluster of the test PostgreSQL, for tests that stop and start it."""
    try:
        return local_cluster(pg_dsn)
    except PostgresMissing as exc:
        _missing(exc)


@pytest.fixture
def pg_schema(pg_dsn: str) -> Iterator[str]:
    """A schema of its own for one test, dropped afterwards."""
    schema = fresh_schema()
    yield schema
    drop_schema(pg_dsn, schema)
