"""Where a local tokenmart cluster keeps its state between CLI calls."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path


def default_state_dir() -> Path:
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
    extra: dict = field(default_factory=dict)

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
            return cls(**json.loads(cls.path(state_dir).read_text()))
        except FileNotFoundError:
            return None

    @classmethod
    def clear(cls, state_dir: Path) -> None:
        cls.path(state_dir).unlink(missing_ok=True)
