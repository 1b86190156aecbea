"""A throwaway PostgreSQL server for tests: Debian's server binaries, 127.0.0.1, a free port.

``running_postgres()`` finds the server binaries (``pg_config --bindir``, else
``/usr/lib/postgresql/<version>/bin``), makes a data directory in a fresh folder under the system
temp dir, runs ``initdb``, starts the server with ``pg_ctl`` listening on 127.0.0.1 (password
login, scram-sha-256) and on a Unix socket in that folder (no password: how the fixture itself
sets up), creates a login role with a password, and yields a :class:`Postgres`. On the way out,
test failed or not, it stops the server and removes the folder.

The server refuses to run as root: as root, every server command runs as the ``postgres`` system
user (``runuser -u postgres --``), which owns the folder. The temp folder is made with
``tempfile.mkdtemp`` directly under the temp dir, not under pytest's ``tmp_path``, whose parent
(``/tmp/pytest-of-root``) only root may enter.

Missing binaries fail the test with what to install: CI (``.ci/run``) installs Debian's
``postgresql`` package when they are absent, so a test never passes without a real server.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg  # a runtime dependency of ser: missing, the tests error rather than skip
import pytest

SERVER_USER = "postgres"  # the system user that runs the server when we are root
ROLE = "ser"  # the login role tests connect as
DRIVER = "psycopg"  # SQLAlchemy dialect postgresql+psycopg (psycopg 3), for MLflow and Optuna
START_TIMEOUT_S = 60
# A test server: fast (no fsync; data is thrown away) and enough connections for an MLflow server
# plus several workers, each with a SQLAlchemy pool.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
}


def find_bindir() -> Path | None:
    """The folder of ``initdb``, ``pg_ctl`` and ``postgres``, or None where they are missing."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 check=True, timeout=30)  # fmt: skip
            candidates.append(Path(out.stdout.strip()))
    newest_first = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                          key=lambda p: _version(Path(p).parent.name), reverse=True)  # fmt: skip
    candidates += [Path(p) for p in newest_first]
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Postgres:
    """A running server: password login over TCP as ``user``; superuser over ``socket_dir``."""

    host: str
    port: int
    user: str
    password: str
    socket_dir: Path
    root: Path  # the temp folder: data/, sock/, server.log

    def url(self, database: str, driver: str = DRIVER, with_password: bool = True) -> str:
        """SQLAlchemy URL of ``database`` (``postgresql+psycopg://user:password@host:port/db``).

        Without the password, libpq takes it from ``PGPASSWORD`` or ``~/.pgpass``."""
        login = f"{self.user}:{self.password}" if with_password else self.user
        return f"postgresql+{driver}://{login}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new database owned by the test role; its URL."""
        self.superuser(f'CREATE DATABASE "{name}" OWNER "{self.user}"')
        return self.url(name)

    def superuser(self, sql: str) -> None:
        """Run one statement as the superuser, over the Unix socket, outside a transaction."""
        with psycopg.connect(host=str(self.socket_dir), port=self.port, user=SERVER_USER,
                             dbname="postgres", autocommit=True) as conn:  # fmt: skip
            conn.execute(sql)

    def query(self, database: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` in ``database``, as the test role over TCP (with its password)."""
        with psycopg.connect(host=self.host, port=self.port, user=self.user,
                             password=self.password, dbname=database) as conn:  # fmt: skip
            return conn.execute(sql, params).fetchall()

    def log_tail(self, chars: int = 3000) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _as_server_user() -> list[str]:
    return ["runuser", "-u", SERVER_USER, "--"] if os.geteuid() == 0 else []


def _run(args: list[str], what: str, log: Path | None = None) -> None:
    result = subprocess.run([*_as_server_user(), *args], capture_output=True, text=True,
                            timeout=START_TIMEOUT_S + 30)  # fmt: skip
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
        raise RuntimeError(f"{what} failed ({result.returncode}): {result.stdout[-2000:]}"
                           f"{result.stderr[-2000:]}\n{tail}")  # fmt: skip


def _stop(bindir: Path, data: Path, log: Path) -> None:
    """Fast shutdown (disconnects clients); if that fails, SIGQUIT to the postmaster."""
    if not (data / "postmaster.pid").exists():
        return
    try:
        _run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop"],
             "pg_ctl stop", log)  # fmt: skip
    except (RuntimeError, subprocess.TimeoutExpired):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((data / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, signal.SIGQUIT)  # immediate shutdown
            time.sleep(2)


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    """Start a fresh server (see the module docstring); stop it and remove its files at the end."""
    bindir = find_bindir()
    if bindir is None:
        pytest.fail(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: neither "
            "`pg_config --bindir` nor /usr/lib/postgresql/*/bin has them. Install Debian's "
            "`postgresql` package (`apt-get install postgresql`; .ci/run does it), or deselect "
            "these tests with `-m 'not slow'`.",
            pytrace=False,
        )
    root = Path(tempfile.mkdtemp(prefix="ser-pg-"))  # /tmp/ser-pg-*, mode 0700
    data, sock, log = root / "data", root / "sock", root / "server.log"
    password = secrets.token_hex(12)
    port = free_port()
    server = Postgres(host="127.0.0.1", port=port, user=ROLE, password=password,
                      socket_dir=sock, root=root)  # fmt: skip
    try:
        sock.mkdir()
        if os.geteuid() == 0:  # the server runs as SERVER_USER, who must own its folders
            user = pwd.getpwnam(SERVER_USER)
            for path in (root, sock):
                os.chown(path, user.pw_uid, user.pw_gid)
        _run([str(bindir / "initdb"), "-D", str(data), "-U", SERVER_USER, "-E", "UTF8",
              "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"],
             "initdb")  # fmt: skip
        settings = {**SETTINGS, "port": str(port), "unix_socket_directories": f"'{sock}'"}
        with open(data / "postgresql.conf", "a") as conf:  # appended: the last value wins
            conf.write("".join(f"{k} = {v}\n" for k, v in settings.items()))
        _run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w",
              "-t", str(START_TIMEOUT_S), "start"], "pg_ctl start", log)  # fmt: skip
        server.superuser(f"CREATE ROLE \"{ROLE}\" LOGIN PASSWORD '{password}'")
        yield server
    finally:
        _stop(bindir, data, log)
        shutil.rmtree(root, ignore_errors=True)
