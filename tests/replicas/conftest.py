"""Fixtures for the replica tests (their harness is ``tests.support.replicas``): a
fresh PostgreSQL database per test, and no SYNCD_* variable from outside."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from tests.support.postgres import (
    create_database,
    drop_database,
    postgres_url,
    url_for_database,
)


@pytest.fixture(autouse=True)
def _no_outer_syncd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """SYNCD_* variables of the shell running the tests must not reach the replicas."""
    for name in list(os.environ):
        if name.upper().startswith("SYNCD_") and name != "SYNCD_TEST_POSTGRES_URL":
            monkeypatch.delenv(name)


@pytest.fixture
def fresh_database() -> Iterator[str]:
    """The URL of a new, empty database on the test server; dropped afterwards."""
    database = asyncio.run(create_database(prefix="syncd_replicas_"))
    try:
        yield url_for_database(postgres_url(), database)
    finally:
        asyncio.run(drop_database(database))
