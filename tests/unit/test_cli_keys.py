"""The bodies `tokenmart keys|credits` send to the admin API: JSON numbers, never numeric text.

The admin API refuses money and limits sent as strings, and expiry sent as numeric text, so
the CLI must send what the API takes. The HTTP call is captured instead of made; the API's own
behaviour is tested in tests/integration.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tokenmart.cluster import cli

KEY = {
    "id": "key_0123456789abcdef0123",
    "key": "sk-tm-secret",
    "status": "active",
    "credit_usd": 0.5,
    "models": None,
    "limits": {"rpm": 7, "tpm": None, "max_concurrency": None, "max_tokens_per_request": 4096},
}


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, Any]]:
    calls: list[tuple[str, str, Any]] = []

    def request(method: str, url: str, **kwargs: Any) -> httpx.Response:
        calls.append((method, url.removeprefix("http://api.test"), kwargs.get("json")))
        return httpx.Response(200, json=KEY)

    monkeypatch.setenv("TOKENMART_API_BASE", "http://api.test")
    monkeypatch.setenv("TOKENMART_ADMIN_TOKEN", "adm-test")
    monkeypatch.setattr(cli.httpx, "request", request)
    return calls


def _run(*args: str) -> str:
    result = CliRunner().invoke(cli.app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_keys_create_sends_numbers_and_max_tokens_per_request(sent: list):
    _run(
        "keys", "create", "alice", "--credit", "0.5", "--rpm", "7",
        "--max-tokens-per-request", "4096", "--expires-at", "1893456000",
    )  # fmt: skip
    method, path, body = sent[-1]
    assert (method, path) == ("POST", "/admin/v1/keys")
    assert body == {
        "name": "alice",
        "credit_usd": 0.5,
        "rpm": 7,
        "max_tokens_per_request": 4096,
        "expires_at": 1_893_456_000,
    }
    # Numbers on the wire, as the API requires.
    assert json.dumps(body) == (
        '{"name": "alice", "credit_usd": 0.5, "rpm": 7, "max_tokens_per_request": 4096, "expires_at": 1893456000}'
    )


def test_keys_create_keeps_iso_expiry_as_text(sent: list):
    _run("keys", "create", "bob", "--expires-at", "2030-01-01T00:00:00Z")
    assert sent[-1][2]["expires_at"] == "2030-01-01T00:00:00Z"


def test_keys_update_sends_max_tokens_per_request_and_prints_it(sent: list):
    output = _run("keys", "update", KEY["id"], "--max-tokens-per-request", "4096", "--rpm", "7")
    method, path, body = sent[-1]
    assert (method, path, body) == ("PATCH", f"/admin/v1/keys/{KEY['id']}", {"rpm": 7, "max_tokens_per_request": 4096})
    assert "max tokens/request: 4096" in output


def test_credits_add_sends_a_number(sent: list):
    _run("credits", "add", KEY["id"], "1.25")
    assert sent[-1] == ("POST", f"/admin/v1/keys/{KEY['id']}/credit", {"amount_usd": 1.25})
