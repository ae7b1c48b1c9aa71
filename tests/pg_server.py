"""A throwaway PostgreSQL server for tests and benchmarks: initdb into a temp dir, pg_ctl start.

Plain module (no pytest) so the suite, the benchmarks and `.ci/run` share one way to start a
real server. initdb and postgres refuse to run as root, so under root the server runs as the
`postgres` OS user (override with $ROCKY_PG_OS_USER) in a directory that user owns.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

SUPERUSER = "rocky"
PASSWORD = "s3cret-Pa55-for-tests"
"""A real password (scram-sha-256 on TCP), so tests can check that it never leaks."""

DEFAULT_SETTINGS: dict[str, str] = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "logging_collector": "off",
}
FAST_SETTINGS: dict[str, str] = {
    **DEFAULT_SETTINGS,
    # a throwaway test cluster: skip the flush to disk; a clean restart still loses nothing
    "fsync": "off",
    "full_page_writes": "off",
}


TEST_DATABASE = "rocky_ledger_tests"
"""The database the shared test cluster creates for ledger tests."""


def find_bindir() -> Path | None:
    """The directory holding initdb/pg_ctl/postgres: $ROCKY_PG_BINDIR, newest Debian layout, PATH."""
    candidates: list[str] = []
    if os.environ.get("ROCKY_PG_BINDIR"):
        candidates.append(os.environ["ROCKY_PG_BINDIR"])
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    for candidate in candidates:
        path = Path(candidate)
        if all((path / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return path
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One cluster on 127.0.0.1:<free port>; `stop()` removes every trace (also at interpreter exit)."""

    def __init__(self, bindir: Path, *, settings: dict[str, str] | None = None) -> None:
        self.bindir = bindir
        self.settings = dict(FAST_SETTINGS if settings is None else settings)
        self.port = free_port()
        self.host = "127.0.0.1"
        self.user = SUPERUSER
        self.password = PASSWORD
        self._os_user = _os_user()
        self.root = Path(tempfile.mkdtemp(prefix="rocky-pg-"))
        self.datadir = self.root / "data"
        self.logfile = self.root / "server.log"
        self._started = False
        if self._os_user is not None:
            pw = pwd.getpwnam(self._os_user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> PostgresServer:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        self._own(pwfile)
        self._run(
            "initdb",
            "-D",
            str(self.datadir),
            "-U",
            self.user,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        pwfile.unlink()
        options = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        options += f" -p {self.port} -k {self.root}"
        atexit.register(self.stop)
        self._started = True
        self._run(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-o",
            options,
        )
        return self

    def restart(self, mode: str = "fast") -> None:
        """`pg_ctl restart -m <mode>`: every session is cut; the cluster comes back on the same port."""
        self._run(
            "pg_ctl",
            "restart",
            "-w",
            "-t",
            "60",
            "-m",
            mode,
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
        )

    def stop(self) -> None:
        """Stop the server (fast, then immediate) and delete its directory; safe to call twice."""
        if self._started:
            self._started = False
            for mode in ("fast", "immediate"):
                try:
                    self._run(
                        "pg_ctl", "stop", "-w", "-t", "30", "-m", mode, "-D", str(self.datadir)
                    )
                    break
                except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                    continue
            with contextlib.suppress(Exception):
                atexit.unregister(self.stop)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- addresses ---------------------------------------------------------------------------------

    def url(self, dbname: str = "postgres", *, scheme: str = "postgresql", **query: str) -> str:
        text = f"{scheme}://{self.user}:{quote(self.password, safe='')}@{self.host}:{self.port}/{dbname}"
        if query:
            text += "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
        return text

    def sql(self, statement: str, dbname: str = "postgres") -> None:
        """Run one statement as the superuser (autocommit, so CREATE/DROP DATABASE work)."""
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]

    def create_database(self, name: str) -> str:
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop it even while forgotten pools still hold connections to it (WITH FORCE ends them)."""
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def postmaster_pid(self) -> int | None:
        pidfile = self.datadir / "postmaster.pid"
        try:
            return int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # --- helpers -----------------------------------------------------------------------------------

    def _own(self, path: Path) -> None:
        if self._os_user is not None:
            pw = pwd.getpwnam(self._os_user)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        kwargs: dict = {}
        if self._os_user is not None:
            pw = pwd.getpwnam(self._os_user)
            kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        # output goes to a file, never a pipe: the postmaster inherits it and outlives pg_ctl
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.run(
                cmd, cwd=self.root, stdout=out, stderr=out, timeout=120, check=False, **kwargs
            )
            if proc.returncode != 0:
                out.seek(0)
                raise subprocess.CalledProcessError(
                    proc.returncode,
                    cmd,
                    None,
                    f"{out.read()}\n--- server log ---\n{self.log_tail()}",
                )


def _os_user() -> str | None:
    """Who runs the server: nobody special unless we are root (initdb refuses root)."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("ROCKY_PG_OS_USER", "postgres")
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(
            f"running as root, and initdb refuses root: create the OS user {name!r} "
            "(the postgresql package does) or set ROCKY_PG_OS_USER to another non-root user"
        ) from None
    return name


def wait_until_accepting(url: str, timeout: float = 30.0) -> None:
    """Poll until the server takes connections again (after a restart)."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
