"""A local, append-only spool for settlements that Redis could not take.

When Redis is unreachable at settlement, the exact script call (keys and arguments) is
appended here as one JSON line and fsynced; `Meter.replay_spool` sends the lines again once
Redis answers. The settle script is idempotent per billing id, so a line whose first call
did reach Redis (only the reply was lost) changes nothing when replayed: nothing is lost and
nothing is billed twice. One file per ingress process, in the folder `AppArgs.spool_dir`
names; on Kubernetes, put it on a volume that outlives the pod.

A process holds an exclusive `flock` on its spool's `.lock` file from its first append
until it exits, so a spool whose lock can be taken belongs to a dead process: the next
replay by any process on the node adopts it, replays it and removes it.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path
from typing import Any


class SettlementSpool:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._owner_fd: int | None = None

    @classmethod
    def of_this_process(cls, directory: str | Path) -> SettlementSpool:
        """This process's own spool in `directory`."""
        return cls(Path(directory) / f"settlements-{os.getpid()}.jsonl")

    @property
    def lock_path(self) -> Path:
        return self.path.with_suffix(".lock")

    def _try_own(self) -> bool:
        """Take this spool's owner lock (kept until `release` or process exit)."""
        if self._owner_fd is not None:
            return True
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._owner_fd = fd
        return True

    def release(self) -> None:
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None

    def orphans(self) -> list[SettlementSpool]:
        """Other spools in this directory whose owner is gone, now owned by this process."""
        adopted = []
        for path in sorted(self.path.parent.glob("settlements-*.jsonl")):
            if path == self.path:
                continue
            orphan = SettlementSpool(path)
            if orphan._try_own():
                adopted.append(orphan)
        return adopted

    def remove(self) -> None:
        """Delete an emptied spool and its lock."""
        self.path.unlink(missing_ok=True)
        self.lock_path.unlink(missing_ok=True)
        self.release()

    def append(self, keys: list[str], args: list[Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._try_own()
        line = json.dumps({"keys": keys, "args": args}, separators=(",", ":")) + "\n"
        with self._lock, self.path.open("a") as spool:
            spool.write(line)
            spool.flush()
            os.fsync(spool.fileno())

    def pending(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def drop_first(self, count: int) -> None:
        """Drop the first `count` entries (the replayed ones), keeping any appended meanwhile."""
        with self._lock:
            rest = self.pending()[count:]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(entry, separators=(",", ":")) + "\n" for entry in rest))
            tmp.replace(self.path)
