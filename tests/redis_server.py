"""A throwaway real ``redis-server`` for tests: own port, own temp dir, no persistence."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

REDIS_SERVER = "/usr/bin/redis-server"


def redis_server_binary() -> str | None:
    """The redis-server to run, or None when this machine has none (tests then skip)."""
    if Path(REDIS_SERVER).is_file():
        return REDIS_SERVER
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    port: int
    directory: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2.0)

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed; run scripts/install-system.sh")
        log_path = self.directory / "redis.log"
        args = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(log_path),
            "--daemonize", "no",
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if self.process.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
                    raise RuntimeError(f"redis-server exited with {self.process.returncode} on port {self.port}:\n{tail}")
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {timeout} s")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """Kill the server (abruptly: the tests simulate an outage) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


def start_redis(directory: Path, attempts: int = 3) -> RedisServer:
    """A running server on a free port; retries when another process grabs the port first."""
    error: Exception | None = None
    for _ in range(attempts):
        server = RedisServer(port=free_port(), directory=directory)
        try:
            server.start()
            return server
        except RuntimeError as e:
            error = e
    raise RuntimeError(f"could not start redis-server: {error}")
