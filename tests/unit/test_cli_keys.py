"""The bodies `tokenmart orgs|keys|credits|usage|ledger|reconcile` send to the admin API, and
what they print: JSON numbers, never numeric text; exit 1 on any failure.

The admin API refuses money and limits sent as strings, and expiry sent as numeric text, so
the CLI must send what the API takes. The HTTP call is captured instead of made; the API's own
behaviour is tested in tests/integration.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from tokenmart.cluster import cli
from tokenmart.deployments.ledger import encode_cursor, ledger_row, rows_csv

ORG_ID = "org_00112233445566778899"
KEY = {
    "object": "api_key",
    "id": "key_0123456789abcdef0123",
    "key": "sk-tm-secret",
    "name": "alice",
    "prefix": "sk-tm-secr...cret",
    "status": "active",
    "org_id": ORG_ID,
    "org_name": "acme",
    "credit_usd": 0.5,
    "org_credit_usd": 0.5,
    "on_hold_usd": 0.0,
    "spent_usd": 0.25,
    "spend_cap_usd": None,
    "spend_cap_period": None,
    "spent_this_period_usd": 0.0,
    "period_resets_at": None,
    "models": None,
    "limits": {"rpm": 7, "tpm": None, "max_concurrency": None, "max_tokens_per_request": 4096},
    "created_at": 1_800_000_000,
    "expires_at": None,
}
ORG = {
    "object": "organization",
    "id": ORG_ID,
    "name": "acme",
    "keys": 2,
    "credit_usd": 12.5,
    "on_hold_usd": 0.000125,
    "spent_usd": 3.25,
    "credited_usd": 15.750125,
    "created_at": 1_800_000_000,
}


class API:
    """The admin API as the CLI sees it: each call is recorded, and answered with the next
    queued reply for its method and path (KEY when none is queued)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, Any]] = []
        self.params: list[dict[str, Any] | None] = []
        self.replies: dict[tuple[str, str], list[tuple[int, Any]]] = {}

    def reply(self, method: str, path: str, *bodies: Any, status: int = 200) -> None:
        self.replies.setdefault((method, path), []).extend((status, body) for body in bodies)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        path = url.removeprefix("http://api.test")
        self.sent.append((method, path, kwargs.get("json")))
        self.params.append(kwargs.get("params"))
        queued = self.replies.get((method, path))
        status, body = queued.pop(0) if queued else (200, KEY)
        return httpx.Response(status, json=body)


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> API:
    fake = API()
    monkeypatch.setenv("TOKENMART_API_BASE", "http://api.test")
    monkeypatch.setenv("TOKENMART_ADMIN_TOKEN", "adm-test")
    monkeypatch.setattr(cli.httpx, "request", fake.request)
    return fake


@pytest.fixture
def sent(api: API) -> list[tuple[str, str, Any]]:
    return api.sent


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(cli.app, list(args), env={"COLUMNS": "200"})


def _run(*args: str) -> str:
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output


def _fails(*args: str) -> str:
    result = _invoke(*args)
    assert result.exit_code == 1, result.output
    return result.stderr


def _row(output: str, first_cell: str) -> list[str]:
    """The cells of the table row whose first cell is `first_cell`."""
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip("│┃ ").split("│")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{output}")


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


# -- organizations -------------------------------------------------------------------------
def test_orgs_create_sends_the_name_and_credit_and_prints_the_id(api: API):
    api.reply("POST", "/admin/v1/orgs", ORG, status=201)
    output = _run("orgs", "create", "acme", "--credit", "12.5")
    assert api.sent == [("POST", "/admin/v1/orgs", {"name": "acme", "credit_usd": 12.5})]
    assert f"id: {ORG_ID}  credit: $12.500000" in output


def test_orgs_create_without_credit_sends_only_the_name(api: API):
    api.reply("POST", "/admin/v1/orgs", ORG, status=201)
    _run("orgs", "create", "acme")
    assert api.sent == [("POST", "/admin/v1/orgs", {"name": "acme"})]


def test_orgs_list_shows_keys_credit_holds_and_spend(api: API):
    other = {**ORG, "id": "org_ffeeddccbbaa99887766", "name": "beta", "keys": 0, "credit_usd": 0.0, "spent_usd": 0.0}
    api.reply("GET", "/admin/v1/orgs", {"object": "list", "data": [ORG, other]})
    output = _run("orgs", "list")
    assert api.sent == [("GET", "/admin/v1/orgs", None)]
    assert _row(output, ORG_ID) == [ORG_ID, "acme", "2", "$12.500000", "$0.000125", "$3.250000"]
    assert _row(output, other["id"]) == [other["id"], "beta", "0", "$0.000000", "$0.000125", "$0.000000"]


def test_orgs_credit_sends_a_number_to_the_organization(api: API):
    api.reply("POST", f"/admin/v1/orgs/{ORG_ID}/credit", {**ORG, "credit_usd": 13.75})
    output = _run("orgs", "credit", ORG_ID, "1.25")
    assert api.sent == [("POST", f"/admin/v1/orgs/{ORG_ID}/credit", {"amount_usd": 1.25})]
    assert f"{ORG_ID} credit: $13.750000" in output


def test_orgs_rename_patches_the_name(api: API):
    api.reply("PATCH", f"/admin/v1/orgs/{ORG_ID}", {**ORG, "name": "acme labs"})
    output = _run("orgs", "rename", ORG_ID, "acme labs")
    assert api.sent == [("PATCH", f"/admin/v1/orgs/{ORG_ID}", {"name": "acme labs"})]
    assert f"{ORG_ID} name: acme labs" in output


def test_an_api_error_exits_1_with_its_status_and_message(api: API):
    error = {"error": {"message": f"The organization {ORG_ID!r} does not exist.", "code": "org_not_found"}}
    api.reply("POST", f"/admin/v1/orgs/{ORG_ID}/credit", error, status=404)
    stderr = _fails("orgs", "credit", ORG_ID, "1")
    assert f"404: The organization '{ORG_ID}' does not exist." in stderr


# -- keys: organizations, caps, rotation ---------------------------------------------------
def test_keys_create_in_an_organization_with_a_cap_sends_no_credit(api: API):
    capped = {**KEY, "spend_cap_usd": 5.0, "spend_cap_period": "monthly"}
    api.reply("POST", "/admin/v1/keys", capped, status=201)
    output = _run("keys", "create", "alice", "--org", ORG_ID, "--cap", "5", "--period", "monthly")
    assert api.sent == [
        (
            "POST",
            "/admin/v1/keys",
            {"name": "alice", "org_id": ORG_ID, "spend_cap_usd": 5.0, "spend_cap_period": "monthly"},
        )
    ]
    assert "API key: sk-tm-secret" in output
    assert f"id: {KEY['id']}  org: {ORG_ID} (acme)  credit: $0.500000  cap: $5.000000 monthly" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--org", ORG_ID, "--credit", "1"), f"run `tokenmart orgs credit {ORG_ID} AMOUNT`"),
        (("--period", "weekly"), "--period needs --cap"),
        (("--cap", "5", "--period", "yearly"), "--period must be one of daily, weekly, monthly"),
    ],
)
def test_keys_create_refuses_what_the_api_would_refuse_before_calling_it(api: API, args: tuple, message: str):
    assert message in _fails("keys", "create", "alice", *args)
    assert api.sent == []


def test_keys_update_sets_a_cap_and_its_period(api: API):
    api.reply("PATCH", f"/admin/v1/keys/{KEY['id']}", {**KEY, "spend_cap_usd": 2.5, "spend_cap_period": "daily"})
    output = _run("keys", "update", KEY["id"], "--cap", "2.5", "--period", "daily")
    assert api.sent == [("PATCH", f"/admin/v1/keys/{KEY['id']}", {"spend_cap_usd": 2.5, "spend_cap_period": "daily"})]
    assert "cap: $2.500000 daily" in output


def test_keys_update_no_cap_sends_null(api: API):
    output = _run("keys", "update", KEY["id"], "--no-cap")
    method, path, body = api.sent[-1]
    assert (method, path, body) == ("PATCH", f"/admin/v1/keys/{KEY['id']}", {"spend_cap_usd": None})
    assert json.dumps(body) == '{"spend_cap_usd": null}'
    assert "cap: none" in output


def test_keys_update_refuses_cap_with_no_cap(api: API):
    assert "not both" in _fails("keys", "update", KEY["id"], "--cap", "1", "--no-cap")
    assert api.sent == []


def test_keys_list_of_one_organization_shows_org_cap_and_spend_this_period(api: API):
    capped = {
        **KEY,
        "spend_cap_usd": 5.0,
        "spend_cap_period": "weekly",
        "spent_this_period_usd": 1.5,
        "models": ["alpha-chat"],
    }
    other = {**KEY, "id": "key_ffffffffffffffffffff", "name": "bob"}
    api.reply("GET", "/admin/v1/keys", {"object": "list", "data": [capped, other]})
    output = _run("keys", "list", "--org", ORG_ID)
    assert api.sent == [("GET", "/admin/v1/keys", None)] and api.params == [{"org_id": ORG_ID}]
    assert _row(output, KEY["id"]) == [
        KEY["id"], "alice", ORG_ID, KEY["prefix"], "active", "$0.500000", "$5.000000 weekly", "$1.500000",
        "$0.250000", "alpha-chat",
    ]  # fmt: skip
    assert _row(output, other["id"])[5:] == ["$0.500000", "none", "", "$0.250000", "all"]


def test_keys_list_without_org_asks_for_every_key(api: API):
    api.reply("GET", "/admin/v1/keys", {"object": "list", "data": []})
    _run("keys", "list")
    assert api.params == [None]


def test_keys_rotate_sends_the_grace_and_prints_the_new_key_and_the_old_ones_end(api: API):
    api.reply("POST", f"/admin/v1/keys/{KEY['id']}/rotate", {**KEY, "key": "sk-tm-new"})
    output = _run("keys", "rotate", KEY["id"], "--grace", "3600")
    assert api.sent == [("POST", f"/admin/v1/keys/{KEY['id']}/rotate", {"grace_s": 3600})]
    assert "API key: sk-tm-new" in output
    assert f"{KEY['id']}: the previous key works until " in output and "UTC (3,600 s)" in output


def test_keys_rotate_without_grace_ends_the_old_key_now(api: API):
    api.reply("POST", f"/admin/v1/keys/{KEY['id']}/rotate", {**KEY, "key": "sk-tm-new"})
    output = _run("keys", "rotate", KEY["id"])
    assert api.sent == [("POST", f"/admin/v1/keys/{KEY['id']}/rotate", {"grace_s": 0})]
    assert "API key: sk-tm-new" in output and "the previous key no longer works" in output


def test_keys_rotate_refuses_a_negative_grace(api: API):
    result = _invoke("keys", "rotate", KEY["id"], "--grace", "-1")
    assert result.exit_code != 0 and api.sent == []


# -- usage and reconciliation --------------------------------------------------------------
def _usage(group_by: str, field: str, labels: list[str]) -> dict[str, Any]:
    rows = [
        {field: label, "requests": 3 + i, "prompt_tokens": 1200, "completion_tokens": 40, "cost_usd": 0.000512}
        for i, label in enumerate(labels)
    ]
    total = {"requests": 7, "prompt_tokens": 2400, "completion_tokens": 80, "cost_usd": 0.001024}
    return {"start": "2030-01-01", "end": "2030-01-30", "group_by": group_by, "data": rows, "total": total}


@pytest.mark.parametrize(
    ("group_by", "field", "labels"),
    [
        ("org", "org_id", [ORG_ID, "org_ffeeddccbbaa99887766"]),
        ("key", "key_id", [KEY["id"], "key_ffffffffffffffffffff"]),
        ("day", "date", ["2030-01-02", "2030-01-03"]),
        ("model", "model", ["alpha-chat", "beta-chat"]),
    ],
)
def test_usage_of_an_organization_grouped_by_each_grouping(api: API, group_by: str, field: str, labels: list[str]):
    api.reply("GET", "/admin/v1/usage", _usage(group_by, field, labels))
    output = _run("usage", "--org", ORG_ID, "--group-by", group_by, "--start", "2030-01-01")
    assert api.params == [{"org_id": ORG_ID, "start": "2030-01-01", "group_by": group_by}]
    assert _row(output, labels[0]) == [labels[0], "3", "1,200", "40", "$0.000512"]
    assert _row(output, labels[1]) == [labels[1], "4", "1,200", "40", "$0.000512"]
    assert _row(output, "total") == ["total", "7", "2,400", "80", "$0.001024"]


def test_usage_refuses_an_unknown_grouping(api: API):
    assert "--group-by must be one of model, day, key, org" in _fails("usage", "--group-by", "week")
    assert api.sent == []


def _org_reconciliation(org_id: str, ok: bool) -> dict[str, Any]:
    return {
        "org_id": org_id, "name": "acme", "keys": 2, "events": 1234, "ledger_cost_usd": 3.25,
        "counters_cost_usd": 3.25, "spent_usd": 3.25 if ok else 3.5, "credited_usd": 15.750125, "balance_usd": 12.5,
        "on_hold_usd": 0.000125, "in_flight": 1, "ok": ok,
    }  # fmt: skip


def test_reconcile_shows_every_organization_and_exits_0_when_they_agree(api: API):
    report = {"object": "reconciliation", "ok": True, "orgs": [_org_reconciliation(ORG_ID, True)], "differences": []}
    api.reply("GET", "/admin/v1/reconcile", report)
    output = _run("reconcile", "--org", ORG_ID)
    assert api.params == [{"org_id": ORG_ID}]
    assert _row(output, ORG_ID) == [
        ORG_ID, "acme", "2", "1,234", "$3.250000", "$3.250000", "$3.250000", "$15.750125", "$12.500000",
        "$0.000125", "1", "ok",
    ]  # fmt: skip
    assert "ok: 1 organization(s) reconcile exactly" in output


def test_reconcile_shows_the_differences_and_exits_1(api: API):
    difference = {
        "org_id": ORG_ID,
        "key_id": KEY["id"],
        "check": "key_spent",
        "field": "spent_micros",
        "expected": 3_250_000,
        "actual": 3_500_000,
    }
    org_level = {**difference, "key_id": None, "check": "ledger_vs_spent"}
    report = {
        "object": "reconciliation",
        "ok": False,
        "orgs": [_org_reconciliation(ORG_ID, False)],
        "differences": [difference, org_level],
    }
    api.reply("GET", "/admin/v1/reconcile", report)
    result = _invoke("reconcile", "--key-id", KEY["id"])
    assert result.exit_code == 1, result.output
    assert api.params == [{"key_id": KEY["id"]}]
    assert _row(result.stdout, ORG_ID)[-1] == "MISMATCH"
    differences = result.stdout.split("differences", 1)[1]
    assert _row(differences, ORG_ID) == [ORG_ID, KEY["id"], "key_spent", "spent_micros", "3250000", "3500000"]
    assert "ledger_vs_spent" in _row(differences.split("key_spent", 1)[1], ORG_ID)


# -- ledger export -------------------------------------------------------------------------
def _ledger_rows(first_ms: int, count: int) -> list[dict[str, Any]]:
    return [
        ledger_row(
            ORG_ID,
            f"{first_ms + i}-0",
            {
                "request_id": f"bill{first_ms + i}",
                "key_id": KEY["id"],
                "model": "alpha-chat",
                "prompt_tokens": "12",
                "completion_tokens": "20",
                "cost_micros": str(14 + i),
                "status": "completed",
                "day": "2030-01-02",
            },
        )
        for i in range(count)
    ]


def _page(rows: list[dict[str, Any]], next_cursor: str, **extra: Any) -> dict[str, Any]:
    return {"object": "list", "data": rows, "next": next_cursor, **extra}


HORIZON = encode_cursor((1_900_000_000_000, 0, ""))


def test_ledger_export_pages_until_an_empty_page_into_one_csv_with_one_header(api: API, tmp_path: Path):
    first, second = _ledger_rows(1_800_000_000_000, 2), _ledger_rows(1_800_000_000_100, 1)
    api.reply(
        "GET",
        "/admin/v1/ledger",
        _page(first, first[-1]["id"]),
        _page(second, second[-1]["id"]),
        _page([], HORIZON),
    )
    target = tmp_path / "ledger.csv"
    result = _invoke("ledger", "export", "--org", ORG_ID, "--page-size", "2", "--out", str(target))
    assert result.exit_code == 0, result.output
    assert api.params == [
        {"limit": 2, "org_id": ORG_ID},
        {"after": first[-1]["id"], "limit": 2, "org_id": ORG_ID},
        {"after": second[-1]["id"], "limit": 2, "org_id": ORG_ID},
    ]
    assert target.read_bytes() == rows_csv(first + second).encode()
    assert target.read_text().count("entry_id") == 1
    assert f"next cursor: {HORIZON}" in result.stderr
    assert "rows written: 3" in result.stderr and "3 row(s) written" in result.stderr
    assert result.stdout == ""


def test_ledger_export_resumes_after_a_cursor_and_writes_csv_to_stdout(api: API):
    rows = _ledger_rows(1_800_000_000_200, 2)
    api.reply("GET", "/admin/v1/ledger", _page(rows, rows[-1]["id"]), _page([], HORIZON))
    result = _invoke("ledger", "export", "--after", "c0ffee")
    assert result.exit_code == 0, result.output
    assert api.params == [{"after": "c0ffee", "limit": 1000}, {"after": rows[-1]["id"], "limit": 1000}]
    assert result.stdout_bytes == rows_csv(rows).encode()
    assert result.stderr.splitlines()[-2:] == [f"next cursor: {HORIZON}", "2 row(s) written"]


def test_ledger_export_stops_when_the_api_says_nothing_more_has_settled(api: API):
    rows = _ledger_rows(1_800_000_000_300, 1)
    api.reply("GET", "/admin/v1/ledger", _page(rows, HORIZON, has_more=False))
    result = _invoke("ledger", "export")
    assert result.exit_code == 0, result.output
    assert len(api.sent) == 1 and result.stdout_bytes == rows_csv(rows).encode()
    assert f"next cursor: {HORIZON}" in result.stderr


def test_ledger_export_of_nothing_writes_the_header(api: API):
    api.reply("GET", "/admin/v1/ledger", _page([], HORIZON))
    result = _invoke("ledger", "export")
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == rows_csv([]).encode() and f"next cursor: {HORIZON}" in result.stderr


def test_ledger_export_failing_part_way_exits_1_and_prints_where_to_resume(api: API, tmp_path: Path):
    rows = _ledger_rows(1_800_000_000_400, 2)
    trimmed = {"error": {"message": "The ledger after this cursor was trimmed by retention", "code": "ledger_trimmed"}}
    api.reply("GET", "/admin/v1/ledger", _page(rows, rows[-1]["id"]))
    api.reply("GET", "/admin/v1/ledger", trimmed, status=409)
    target = tmp_path / "ledger.csv"
    result = _invoke("ledger", "export", "--out", str(target))
    assert result.exit_code == 1, result.output
    assert "409: The ledger after this cursor was trimmed by retention" in result.stderr
    assert f"next cursor: {rows[-1]['id']}" in result.stderr  # the rows written are not read again
    assert target.read_bytes() == rows_csv(rows).encode()
