"""Pytest plugin: the session's throwaway PostgreSQL server (tests/pg.py) as fixtures.

Load it with ``pytest_plugins = ["tests.pg_fixtures"]`` in a test module.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.pg import PgServer, start_server, unavailable


@pytest.fixture(scope="session")
def postgres() -> Iterator[PgServer]:
    """The session's throwaway PostgreSQL server (the test is skipped, with the reason, where there is none)."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    server = start_server()
    try:
        yield server
    finally:
        try:
            server.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(server.base, ignore_errors=True)


@pytest.fixture
def pg_url(postgres: PgServer) -> str:
    """A fresh, empty database for one test."""
    return postgres.new_database()
