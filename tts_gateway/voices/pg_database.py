"""The PostgreSQL registry's connections while it runs: the pool, transactions and their retries, health.

Connections come from a `psycopg_pool.ConnectionPool` (autocommit; multi-statement work runs in
``conn.transaction()``). A connection idle for a while is checked before use, so a database restart costs
no request; while the database is away, calls fail fast with `DatabaseUnavailable` (HTTP 503).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool

from tts_gateway.voices.registry import RegistryUnavailable

log = logging.getLogger(__name__)

APPLICATION_NAME = "tts-gateway"
CONNECT_TIMEOUT_S = 5  # how long a call waits for a connection before answering 503
_IDLE_PING_S = 5.0  # a connection idle longer than this is checked before use (the server may have restarted)
_HEALTH_TIMEOUT_S = 2.0  # how long `health` waits for a connection
_ROLLBACK = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)  # retried

Connection = psycopg.Connection[Any]
T = TypeVar("T")


class DatabaseUnavailable(RegistryUnavailable):
    """The registry database cannot be reached right now (HTTP 503 with Retry-After)."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"the voice registry database is unavailable: {detail}")


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages and logs)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
    except ValueError:
        return "postgresql://…"


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (psycopg's run over several), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Database:
    """A pool of connections to the registry database, and the ways the registry uses them.

    Args:
        url: ``postgresql://user:password@host:port/database``.
        pool_size: The most connections open at once.
    """

    def __init__(self, url: str, *, pool_size: int) -> None:
        self._used: weakref.WeakKeyDictionary[Connection, float] = weakref.WeakKeyDictionary()
        self._used_lock = threading.Lock()
        self._pool: ConnectionPool[Connection] = ConnectionPool(
            url,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S, "application_name": APPLICATION_NAME},
            min_size=1,
            max_size=max(1, pool_size),
            timeout=CONNECT_TIMEOUT_S,
            # Give up a reconnection chain quickly: the next call starts a fresh one at once, so a database
            # that came back is used without waiting out a long back-off.
            reconnect_timeout=CONNECT_TIMEOUT_S,
            check=self._check_connection,
            name="tts-voice-registry",
            open=True,
        )

    def close(self) -> None:
        self._pool.close()

    def health(self) -> str | None:
        """None while the database answers, else why not (waits at most a couple of seconds; never raises)."""
        try:
            with self._pool.connection(timeout=_HEALTH_TIMEOUT_S) as conn:
                conn.execute("SELECT 1").fetchone()
        except Exception as exc:  # PoolTimeout, PoolClosed, OperationalError, …: all mean "not now"
            return f"the voice registry database is unavailable: {first_line(exc)}"
        return None

    def _check_connection(self, conn: Connection) -> None:
        """The pool's check on hand-out: ping a connection that sat idle (the server may have restarted)."""
        with self._used_lock:
            used = self._used.get(conn)
        if used is None or time.monotonic() - used > _IDLE_PING_S:
            ConnectionPool.check_connection(conn)

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        with self._pool.connection() as conn:
            try:
                yield conn
            finally:
                with self._used_lock:
                    self._used[conn] = time.monotonic()

    @contextmanager
    def session(self) -> Iterator[Connection]:
        """A pooled connection; connection-level failures become `DatabaseUnavailable` (503)."""
        try:
            with self._connection() as conn:
                yield conn
        except _ROLLBACK:  # deadlock, serialization: `write` retries
            raise
        except psycopg.OperationalError as exc:  # includes the pool's PoolTimeout and PoolClosed
            log.warning("registry database error: %s", first_line(exc))
            raise DatabaseUnavailable(first_line(exc)) from None

    def write(self, work: Callable[[Connection], T], retry: tuple[type[Exception], ...] = ()) -> T:
        """Run ``work`` in one transaction; again (a few times) after a deadlock or ``retry`` errors."""
        attempts = 4
        retried: tuple[type[Exception], ...] = (*_ROLLBACK, *retry)
        for attempt in range(attempts):
            try:
                with self.session() as conn, conn.transaction():
                    return work(conn)
            except retried as exc:
                if attempt == attempts - 1:
                    if isinstance(exc, _ROLLBACK):
                        raise DatabaseUnavailable(first_line(exc)) from None
                    raise
                log.info("registry transaction retried: %s", first_line(exc))
                time.sleep(0.02 * 2**attempt)
        raise AssertionError("unreachable")

    def read(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only query, once more on a fresh connection if the first one failed."""
        try:
            with self._connection() as conn:
                return conn.execute(query, params).fetchall()
        except psycopg.OperationalError:
            with self.session() as conn:
                return conn.execute(query, params).fetchall()
