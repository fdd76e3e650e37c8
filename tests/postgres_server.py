"""A throwaway real PostgreSQL for tests: Debian's binaries, own temp dir, loopback port, trust auth.

PostgreSQL refuses to run as root, so under root (CI containers) the cluster is initialised and
run as an unprivileged user (``postgres`` when the package created it, else ``nobody``) through
``runuser``; as a normal user it runs as that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SUPERUSER = "foleyserve"


def postgres_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/N/bin with initdb and postgres, or None (tests then skip)."""
    found = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        if os.path.isfile(os.path.join(d, "initdb")) and os.path.isfile(os.path.join(d, "postgres")):
            try:
                found.append((int(Path(d).parent.name), Path(d)))
            except ValueError:
                continue
    if found:
        return max(found)[1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("postgres") else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> str | None:
    """The user to run PostgreSQL as when we are root; None: ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")


def _runuser() -> str:
    """runuser lives in /usr/sbin (util-linux), which a CI's PATH (e.g. /usr/bin:/bin) may lack."""
    import shutil

    found = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
    if found is None:
        raise RuntimeError("runuser (util-linux) is needed to run PostgreSQL as root; it is not installed")
    return found


@dataclass
class PostgresServer:
    bin_dir: Path
    directory: Path
    port: int = 0
    process: subprocess.Popen | None = None
    user: str | None = field(default_factory=_run_as)

    @property
    def admin_url(self) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _cmd(self, args: list[str]) -> list[str]:
        return [_runuser(), "-u", self.user, "--", *args] if self.user else args

    def init(self) -> None:
        data = self.directory / "data"
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            self._cmd([str(self.bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust",
                       "--encoding=UTF8", "--no-sync", "--locale=C"]),
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120,
        )

    def start(self, timeout: float = 30.0) -> None:
        """Start (or restart on the same port) and wait until it accepts connections."""
        import psycopg

        if not self.port:
            self.port = free_port()
        log_path = self.directory / "postgres.log"
        log = open(log_path, "ab")
        self.process = subprocess.Popen(
            self._cmd([str(self.bin_dir / "postgres"), "-D", str(self.directory / "data"), "-p", str(self.port),
                       "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.directory}",
                       # A test database: durability traded for speed.
                       "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                       "-c", "max_connections=200", "-c", "shared_buffers=32MB"]),
            stdout=log, stderr=log,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.process.returncode}:\n{log_path.read_text(errors='replace')[-2000:]}")
            try:
                psycopg.connect(self.admin_url, connect_timeout=1).close()
                return
            except psycopg.OperationalError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postgres on port {self.port} did not accept connections within {timeout} s")
            time.sleep(0.1)

    def create_database(self, name: str | None = None) -> str:
        """A fresh empty database; returns its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: smart shutdown
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


def start_postgres(attempts: int = 3) -> PostgresServer:
    """A running server in a new temp dir (not under pytest's tmp_path: its 0700 parents would
    keep the unprivileged user out). Call :func:`remove` when done."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    directory = Path(tempfile.mkdtemp(prefix="foleyserve-pg-"))
    server = PostgresServer(bin_dir=bin_dir, directory=directory)
    server.init()
    error: Exception | None = None
    for _ in range(attempts):
        server.port = free_port()
        try:
            server.start()
            return server
        except RuntimeError as e:
            error = e
    remove(server)
    raise RuntimeError(f"could not start postgres: {error}")


def remove(server: PostgresServer) -> None:
    server.stop()
    shutil.rmtree(server.directory, ignore_errors=True)
