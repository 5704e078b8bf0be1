"""A throwaway PostgreSQL server for the tests that need one (tests/test_postgres.py, tests/test_registry.py).

The server (Debian package ``postgresql``) starts once per session on a free loopback port, the first time a
test asks for it, and stops at the end of the session; each test gets its own database. As root, initdb and
postgres run as the ``postgres`` user through runuser (initdb refuses root); otherwise as the current user.

The fixtures ``postgres`` and ``pg_url`` live in tests/pg_fixtures.py: ``pytest_plugins = ["tests.pg_fixtures"]``
in a test module defines them once for the session, whichever modules ask for them.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests.conftest import free_port

PASSWORD = "pg-secret-7"


def pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


def unavailable() -> str | None:
    """Why no throwaway server can be started here, or None."""
    if pg_bin() is None:
        return "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin (Debian package: postgresql)"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root without runuser: initdb refuses root"
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user for initdb (Debian package: postgresql)"
    return None


@dataclass
class PgServer:
    base: Path
    bin: Path
    port: int
    as_user: list[str]
    databases: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://tts:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.base / "data"), *args],
                       check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = (f"-h 127.0.0.1 -p {self.port} -k {self.base / 'sock'} -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=300")
        self._pg_ctl("-l", str(self.base / "postgres.log"), "-w", "-t", "30", "-o", options, "start")

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "-w", "-t", "30", "stop")

    def new_database(self) -> str:
        name = f"t{next(self.databases)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


def start_server() -> PgServer:
    """initdb and start a new server (the caller stops it and removes ``server.base``)."""
    binaries = pg_bin()
    assert binaries is not None
    # Not under pytest's tmp dir: that is private to root, and the server runs as postgres.
    base = Path(tempfile.mkdtemp(prefix="tts-pg-"))
    (base / "sock").mkdir()
    (base / "pwfile").write_text(PASSWORD + "\n")
    as_user: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for path in (base, base / "sock", base / "pwfile"):
            os.chown(path, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    server = PgServer(base, binaries, free_port(), as_user)
    try:
        subprocess.run([*as_user, str(binaries / "initdb"), "-D", str(base / "data"), "-U", "tts",
                        f"--pwfile={base / 'pwfile'}", "--auth=scram-sha-256", "-E", "UTF8", "--locale=C",
                        "--no-sync", "--no-instructions"], check=True, capture_output=True, timeout=120)
        server.start()
    except subprocess.CalledProcessError as exc:
        log = base / "postgres.log"
        detail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"{exc.cmd[len(as_user)]} failed: {exc.stderr.decode(errors='replace')}\n{detail}") from exc
    return server
