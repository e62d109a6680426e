"""A private PostgreSQL 15 cluster for tests and benchmarks.

``initdb`` a cluster in a work directory, run ``postgres`` on a free loopback port with its
unix socket in that directory, create one database. PostgreSQL refuses to run as root, so when
we are root the server runs as the ``postgres`` OS user (the work directory is handed to it);
the process we start *is* the postmaster, so stopping it never touches anyone else's server.

Durability is traded for speed (``fsync=off``): this cluster holds test data only.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from benchmarks.services import free_port, wait_for
from benchmarks.services.process import ServiceProcess

__all__ = ["POSTGRES_BINDIR", "Postgres"]

POSTGRES_BINDIR: Final = Path("/usr/lib/postgresql/15/bin")
_OS_USER: Final = "postgres"
_START_TIMEOUT: Final = 60.0
_SETTINGS: Final = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "64MB",
    "logging_collector": "off",
    "log_min_messages": "warning",
}


class Postgres(ServiceProcess):
    """Launch a private PostgreSQL; ``url`` names its database for ``psycopg``/``open_store``.

    Without ``workdir`` a fresh directory in the system temp dir is used and removed by
    ``stop()``. A given ``workdir`` is kept (``start()`` again brings the same data back);
    when running as root, every parent of it must be traversable by the ``postgres`` user
    (pytest's ``tmp_path`` is not: its parents are private to root).
    """

    name = "postgres"

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        port: int | None = None,
        database: str = "starlight",
        bindir: Path = POSTGRES_BINDIR,
    ) -> None:
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else None
        self.port = port if port is not None else free_port()
        self.database = database
        self.bindir = Path(bindir)
        super().__init__(None)  # the log lives in the work directory, known at start

    # --- addresses ------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        return self.url_for()

    def url_for(self, database: str | None = None, *, schema: str | None = None) -> str:
        """The URL of ``database`` (default: ours); with ``schema``, new connections put it
        first on their ``search_path``, so tables are created and found there."""
        url = f"postgresql://{_OS_USER}@{self.host}:{self.port}/{database or self.database}"
        if schema is not None:
            url += "?options=" + quote(f"-c search_path={schema}", safe="")
        return url

    @property
    def _data(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "data"

    @property
    def _sockets(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "sockets"

    # --- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        if self.running:
            return
        for tool in ("initdb", "postgres"):
            if not os.access(self.bindir / tool, os.X_OK):
                raise FileNotFoundError(
                    f"{self.bindir / tool} not found: apt-get install postgresql-15"
                )
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="starlight-pg-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._sockets.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            user = pwd.getpwnam(_OS_USER)
            for path in (self.workdir, self._sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
        self.log_path = self.workdir / "postgres.log"
        try:
            if not (self._data / "PG_VERSION").exists():
                self._initdb()
            command = [
                str(self.bindir / "postgres"),
                "-D",
                str(self._data),
                "-p",
                str(self.port),
                "-c",
                f"listen_addresses={self.host}",
                "-c",
                f"unix_socket_directories={self._sockets}",
            ]
            for key, value in _SETTINGS.items():
                command += ["-c", f"{key}={value}"]
            self._spawn(command, cwd=self.workdir, **self._as_postgres())
            wait_for(self._answers, timeout=_START_TIMEOUT, what=f"postgres on port {self.port}")
            self.create_database(self.database, exist_ok=True)
        except BaseException:
            self.stop()
            raise

    def _as_postgres(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        return {"user": _OS_USER, "group": _OS_USER, "extra_groups": []}

    def _initdb(self) -> None:
        result = subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self._data),
                "-U",
                _OS_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            cwd=self.workdir,
            check=False,
            **self._as_postgres(),
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise RuntimeError(f"initdb failed ({result.returncode}):\n{output[-4000:]}")

    def stop(self) -> None:
        # SIGINT is PostgreSQL's "fast shutdown": abort sessions, checkpoint, exit. Data we are
        # about to delete needs no checkpoint: SIGQUIT ("immediate") skips it.
        self._terminate(signal.SIGQUIT if self._owns_workdir else signal.SIGINT)
        if self._owns_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
            self.log_path = None

    # --- administration -------------------------------------------------------------------

    def execute(self, statement: str, *, database: str = "postgres") -> None:
        """Run one administrative statement (outside any transaction)."""
        import psycopg

        with psycopg.connect(self.url_for(database), autocommit=True, connect_timeout=10) as conn:
            conn.execute(statement)

    def create_database(self, name: str, *, exist_ok: bool = False) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url_for("postgres"), autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if exists and exist_ok:
                return
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def create_schema(self, name: str, *, database: str | None = None) -> str:
        """Create an empty schema and return the URL whose connections work inside it."""
        import psycopg
        from psycopg import sql

        database = database or self.database
        with psycopg.connect(self.url_for(database), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
        return self.url_for(database, schema=name)

    def _answers(self) -> bool:
        self._check_alive()
        import psycopg

        try:
            with psycopg.connect(self.url_for("postgres"), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True
