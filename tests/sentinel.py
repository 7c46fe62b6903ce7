"""A real Redis Sentinel set for tests: a primary, a replica and three Sentinels.

Every member is Debian's `redis-server` on a free loopback port with its own folder (a
Sentinel is `redis-server <conf> --sentinel`, and rewrites its config file as it learns
the set). Sentinels decide quickly here (down-after 1 s), so a killed primary is replaced
within a few seconds. Nothing is persisted: the data lives in the primary and its replica.
"""

from __future__ import annotations

import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from .helpers import free_port

SERVICE = "tokenmart"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 4000
START_TIMEOUT_S = 20.0


def _client(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except redis.RedisError:
            pass  # not up yet
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


class Member:
    """One redis-server process of the set."""

    def __init__(self, folder: Path, port: int, argv: list[str]) -> None:
        self.folder = folder
        self.port = port
        folder.mkdir(parents=True, exist_ok=True)
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail("redis-server is not installed (scripts/install.sh installs it)")
        with open(folder / "redis.log", "ab") as log:
            self.process = subprocess.Popen([executable, *argv], stdout=log, stderr=subprocess.STDOUT, cwd=folder)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def client(self) -> redis.Redis:
        return _client(self.port)

    def signal(self, number: int) -> None:
        if self.running:
            self.process.send_signal(number)

    def stop(self) -> None:
        if self.running:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def data_node(folder: Path, *options: str) -> Member:
    """A redis-server without persistence on a free port, with extra `--name value` options;
    returns once it answers PING."""
    port = free_port()
    argv = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", "."]
    argv += ["--repl-diskless-sync-delay", "0"]  # a replica syncs at once, not after 5 s
    member = Member(folder, port, [*argv, *options])
    _wait(member.client().ping, START_TIMEOUT_S, f"redis-server in {folder}")
    return member


class SentinelSet:
    """Primary, replica and Sentinels; `url` is the app's redis+sentinel:// URL for them."""

    def __init__(self, root: Path, *, data_options: tuple[str, ...] = ()) -> None:
        self.root = root
        self.data_options = data_options
        self.primary: Member | None = None
        self.replica: Member | None = None
        self.sentinels: list[Member] = []

    def _data_node(self, name: str, *extra: str) -> Member:
        return data_node(self.root / name, *self.data_options, *extra)

    def start(self) -> None:
        self.primary = self._data_node("primary")
        self.replica = self._data_node("replica", "--replicaof", "127.0.0.1", str(self.primary.port))
        _wait(
            lambda: self.replica.client().info("replication")["master_link_status"] == "up",
            START_TIMEOUT_S,
            "the replica's link to the primary",
        )

        # After a full sync the primary streams writes to the replica only from its first ACK
        # (sent each second): until a write is confirmed, WAIT would wait for it.
        def streaming() -> bool:
            client = self.primary.client()
            client.incr("tests:replica-check")  # a write the replica must confirm
            return client.wait(1, 100) == 1

        _wait(streaming, START_TIMEOUT_S, "the primary to stream writes to the replica")
        # Each Sentinel is told its peers and the replica up front (ids made here), instead of
        # learning them from the primary's hello channel every 2 s: the set is ready at once.
        ports = [free_port() for _ in range(3)]
        ids = [secrets.token_hex(20) for _ in range(3)]
        for number, (port, own_id) in enumerate(zip(ports, ids, strict=True)):
            folder = self.root / f"sentinel-{number}"
            folder.mkdir(parents=True)
            peers = "".join(
                f"sentinel known-sentinel {SERVICE} 127.0.0.1 {peer} {peer_id}\n"
                for peer, peer_id in zip(ports, ids, strict=True)
                if peer != port
            )
            (folder / "sentinel.conf").write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\nsentinel myid {own_id}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
                f"sentinel known-replica {SERVICE} 127.0.0.1 {self.replica.port}\n{peers}"
            )
            self.sentinels.append(Member(folder, port, [str(folder / "sentinel.conf"), "--sentinel"]))

        def watching() -> bool:
            # Each Sentinel knows the replica and the two other Sentinels (learnt through the
            # primary's hello channel): only then can they agree on a failover.
            for sentinel in self.sentinels:
                state = sentinel.client().sentinel_master(SERVICE)
                if state["num-slaves"] < 1 or state["num-other-sentinels"] < 2:
                    return False
            return True

        _wait(watching, START_TIMEOUT_S, "the Sentinels to see the replica and each other")

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def primary_port(self) -> int:
        """The primary as the Sentinels report it now."""
        _, port = self.sentinels[0].client().sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def kill_primary(self) -> None:
        """SIGKILL: the primary disappears without a goodbye, mid-write."""
        assert self.primary is not None
        self.primary.process.kill()
        self.primary.process.wait(timeout=5)

    def wait_for_promotion(self, old_port: int, timeout_s: float = 20.0) -> int:
        """Wait until every Sentinel names a new primary that answers as one; returns its port."""

        def promoted() -> bool:
            ports = {int(s.client().sentinel_get_master_addr_by_name(SERVICE)[1]) for s in self.sentinels}
            if len(ports) != 1 or old_port in ports:
                return False
            return _client(ports.pop()).info("replication")["role"] == "master"

        _wait(promoted, timeout_s, "Sentinel to promote the replica")
        return self.primary_port()

    def stop(self) -> None:
        for member in [*self.sentinels, self.replica, self.primary]:
            if member is not None:
                member.signal(signal.SIGCONT)  # a paused member must be able to stop
                member.stop()


@contextmanager
def running_sentinel_set() -> Iterator[SentinelSet]:
    """A started set in its own temporary folder, stopped and removed on exit."""
    root = Path(tempfile.mkdtemp(prefix="tokenmart-sentinel-"))
    members = SentinelSet(root)
    try:
        members.start()
        yield members
    finally:
        members.stop()
        shutil.rmtree(root, ignore_errors=True)
