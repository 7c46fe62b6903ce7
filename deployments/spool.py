"""A local, append-only spool for settlements that Redis could not take.

When Redis is unreachable at settlement, the exact script call (keys and arguments) is
appended here as one JSON line and fsynced; `Meter.replay_spool` sends the lines again once
Redis answers. The settle script is idempotent per billing id, so a line whose first call
did reach Redis (only the reply was lost) changes nothing when replayed: nothing is lost and
nothing is billed twice. One file per ingress process; on Kubernetes, put the spool
directory on a volume that outlives the pod.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

DEFAULT_SPOOL_DIR = Path(os.environ.get("TOKENMART_SPOOL_DIR", "/tmp/tokenmart-spool"))


class SettlementSpool:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or DEFAULT_SPOOL_DIR / f"settlements-{os.getpid()}.jsonl"
        self._lock = threading.Lock()

    def append(self, keys: list[str], args: list[Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
