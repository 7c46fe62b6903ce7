"""Where a local tokenmart cluster keeps its state between CLI calls."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


def default_state_dir() -> Path:
    # The CLI's own setting (where it records the local cluster); the Serve app never reads it.
    return Path(os.environ.get("TOKENMART_STATE_DIR", Path.home() / ".local" / "state" / "tokenmart"))


@dataclass
class ClusterState:
    api_base: str
    admin_token: str
    redis_url: str
    redis_managed: bool
    ray_address: str
    dashboard_url: str
    catalog_path: str
    engine: str = "vllm"
    redis_pidfile: str | None = None
    demo_key_id: str | None = None
    # Ray's Prometheus export of the local node (tokenmart's, Serve's and vLLM's metrics).
    metrics_url: str | None = None

    @staticmethod
    def path(state_dir: Path) -> Path:
        return state_dir / "cluster.json"

    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        target = self.path(state_dir)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.chmod(0o600)  # it holds the admin token
        tmp.replace(target)

    @classmethod
    def load(cls, state_dir: Path) -> ClusterState | None:
        try:
            raw = json.loads(cls.path(state_dir).read_text())
        except FileNotFoundError:
            return None
        return cls.from_record(raw)

    @classmethod
    def from_record(cls, raw: dict[str, Any]) -> ClusterState:
        """A state record, also one written by an older or newer tokenmart: the old `extra`
        dict is read into the typed fields, and keys this version does not know are ignored,
        so `down` can always find a cluster that `up` recorded."""
        raw = dict(raw)
        legacy = raw.pop("extra", None) or {}
        known = {f.name for f in fields(cls)}
        for name, value in legacy.items():
            if name in known:
                raw.setdefault(name, value)
        return cls(**{name: value for name, value in raw.items() if name in known})

    @classmethod
    def clear(cls, state_dir: Path) -> None:
        cls.path(state_dir).unlink(missing_ok=True)
