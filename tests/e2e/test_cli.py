"""The operator CLI against the running stack that `tokenmart up` recorded."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx
import pytest

from .conftest import MODEL, Stack

pytestmark = pytest.mark.e2e


def tokenmart(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENMART_API_BASE", "TOKENMART_ADMIN_TOKEN")}
    env["TOKENMART_STATE_DIR"] = str(stack.state_dir)
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "tokenmart.cluster.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def say_hi(stack: Stack, headers: dict[str, str], max_tokens: int) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": max_tokens}
    return httpx.post(f"{stack.base_url}/chat/completions", headers=headers, json=body, timeout=120)


def test_keys_credits_usage_and_revoke_through_the_cli(stack: Stack) -> None:
    created = tokenmart(stack, "keys", "create", "cli-user", "--credit", "0.5", "--models", MODEL)
    assert created.returncode == 0, created.stderr
    key = re.search(r"API key: (sk-tm-\S+)", created.stdout)[1]
    key_id = re.search(r"id: (key_\w+)", created.stdout)[1]
    headers = {"authorization": f"Bearer {key}"}

    record = httpx.get(f"{stack.api_base}/v1/key", headers=headers).json()
    assert record["id"] == key_id and record["credit_usd"] == 0.5 and record["models"] == [MODEL]

    listed = tokenmart(stack, "keys", "list")
    assert listed.returncode == 0 and key_id in listed.stdout and key not in listed.stdout

    added = tokenmart(stack, "credits", "add", key_id, "1.25")
    assert added.returncode == 0, added.stderr
    assert httpx.get(f"{stack.api_base}/v1/key", headers=headers).json()["credit_usd"] == 1.75

    chat = say_hi(stack, headers, max_tokens=4)
    assert chat.status_code == 200
    completion_tokens = chat.json()["usage"]["completion_tokens"]

    usage = tokenmart(stack, "usage", "--key-id", key_id)
    assert usage.returncode == 0, usage.stderr
    row = next(line for line in usage.stdout.splitlines() if MODEL in line)
    cells = [cell.strip() for cell in re.split(r"[│|]", row) if cell.strip()]
    assert cells[0] == MODEL and cells[1] == "1" and cells[3] == f"{completion_tokens:,}", usage.stdout

    updated = tokenmart(stack, "keys", "update", key_id, "--rpm", "7", "--tpm", "9000")
    assert updated.returncode == 0, updated.stderr
    assert "rpm: 7" in updated.stdout and "tpm: 9000" in updated.stdout
    limited = say_hi(stack, headers, max_tokens=2)
    assert limited.status_code == 200
    assert (limited.headers["x-ratelimit-limit-requests"], limited.headers["x-ratelimit-limit-tokens"]) == ("7", "9000")
    assert tokenmart(stack, "keys", "update", key_id).returncode == 1  # nothing to change

    revoked = tokenmart(stack, "keys", "revoke", key_id)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    after = httpx.get(f"{stack.api_base}/v1/key", headers=headers)
    assert after.status_code == 401 and after.json()["error"]["code"] == "revoked_api_key"


def test_models_and_status(stack: Stack) -> None:
    models = tokenmart(stack, "models")
    assert models.returncode == 0 and MODEL in models.stdout and "0.02" in models.stdout
    adapter_row = next(line for line in models.stdout.splitlines() if f"{MODEL}:ahoy" in line)
    assert MODEL in adapter_row.replace(f"{MODEL}:ahoy", "") and "0.06" in adapter_row, models.stdout

    status = tokenmart(stack, "status")
    assert status.returncode == 0, status.stderr
    assert "RUNNING" in status.stdout
    row = next(line for line in status.stdout.splitlines() if "LLMServer:smollm2-135m-instruct" in line)
    assert "HEALTHY" in row, status.stdout


def test_errors_from_the_api_are_shown_plainly(stack: Stack) -> None:
    result = tokenmart(stack, "credits", "add", "key_doesnotexist", "1")
    assert result.returncode == 1
    assert "404" in result.stderr and "key_doesnotexist" in result.stderr


def test_reconcile_finds_the_books_in_order_after_real_traffic(stack: Stack) -> None:
    key = stack.new_key(credit_usd=0.25)
    headers = {"authorization": f"Bearer {key['key']}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to three"}], "max_tokens": 6}
    for stream in (False, True):
        response = httpx.post(
            f"{stack.base_url}/chat/completions", headers=headers, json=body | {"stream": stream}, timeout=120
        )
        assert response.status_code == 200

    result = tokenmart(stack, "reconcile")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reconcile exactly" in result.stdout
    row = next(line for line in result.stdout.splitlines() if key["org_id"] in line)
    assert "ok" in row and "MISMATCH" not in result.stdout


def test_up_serves_the_api_through_haproxy_by_default(stack: Stack) -> None:
    """The default serve mode: HAProxy owns the API port and the ingress replicas serve HTTP
    themselves behind it, so a request crosses no Python proxy (cluster/serve_mode.py)."""
    import psutil

    port = int(stack.api_base.rsplit(":", 1)[1])
    (listener,) = {c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
    assert psutil.Process(listener).name() == "haproxy"
    models = httpx.get(f"{stack.base_url}/models", headers={"authorization": f"Bearer {stack.api_key}"})
    assert models.status_code == 200 and models.headers["server"] == "uvicorn"  # an ingress replica answered
