"""Shared fixtures: a real `redis-server` on a free loopback port.

Integration and e2e tests both bill against a real Redis, so the server helper lives
here. It can be stopped and restarted on the same port, which the failure-policy tests
use to take the billing store away from a running cluster and bring it back.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from .helpers import free_port

REDIS_START_TIMEOUT_S = 10.0


class RedisServer:
    """One `redis-server` process that owns a port and a data dir until `close()`."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.durable = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        executable = shutil.which("redis-server")
        if executable is None:
            # A failure, not a skip: a missing Redis must not pass as green.
            pytest.fail("redis-server is not installed (scripts/install.sh installs it)")
        log = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 - the process owns it
        options = {"port": self.port, "bind": "127.0.0.1", "save": "", "dir": self.data_dir}
        # Durable: every write is fsynced to the AOF before it is acknowledged, so even a
        # SIGKILL loses nothing and a restart loads it all back.
        options |= {"appendonly": "yes", "appendfsync": "always"} if self.durable else {"appendonly": "no"}
        argv = [executable]
        for name, value in options.items():
            argv += [f"--{name}", str(value)]
        self.process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        process = self.process

        def up() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode}; see {self.data_dir}/redis.log")
            return self.ping()

        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while not up():
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.02)

    def stop(self) -> None:
        """Terminate (then kill) the server and wait until it is gone."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL: the billing store disappears without a clean shutdown."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait(timeout=5)

    def restart(self) -> None:
        """Stop if running, then start again on the same port (the data survives only if durable)."""
        self.stop()
        self.start()

    def make_durable(self, durable: bool = True) -> None:
        """Switch the running server's AOF (fsync always) on or off; restarts keep the setting."""
        client = redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)
        try:
            client.config_set("appendonly", "yes" if durable else "no")
            if durable:
                client.config_set("appendfsync", "always")
                deadline = time.monotonic() + REDIS_START_TIMEOUT_S

                def writing() -> bool:
                    info = client.info("persistence")
                    return bool(
                        info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"] or not info["aof_enabled"]
                    )

                while writing():
                    if time.monotonic() > deadline:
                        raise TimeoutError("redis-server did not finish writing its AOF")
                    time.sleep(0.05)
        finally:
            client.close()
        self.durable = durable

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    data_dir = Path(tempfile.mkdtemp(prefix="tokenmart-redis-"))
    server = RedisServer(data_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A clean database for each test (the server itself is shared by the session)."""
    if not redis_server.running:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.flushall()
    try:
        yield client
    finally:
        client.close()
