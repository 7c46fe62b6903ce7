"""Every client mistake is a 4xx in the envelope, naming the field, and costs nothing.

Each bad body goes over HTTP to the real app (Ray Serve's proxy, the ingress, a real Redis).
Before these rules, each of these cases was a 5xx, which SDKs retry, or reached an engine. The
fake engine accepts almost anything, so "never reached an engine" is shown by the books of the
key and its organization: no credit held or spent, no request counted, no ledger event.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from .conftest import Marketplace

pytestmark = pytest.mark.integration

CREDIT_USD = 1


def send(marketplace: Marketplace, method: str, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    """Send `body` as JSON text the way any client library would: json.dumps escapes a lone
    surrogate as "\\ud800", which httpx's own json= encoder cannot send."""
    content = json.dumps(body).encode()
    return marketplace.http.request(
        method, path, content=content, headers={**headers, "content-type": "application/json"}
    )


def assert_refused(response: httpx.Response, status: int, code: str, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert (body["error"]["code"], body["error"]["param"]) == (code, param), body
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"]
    assert len(response.headers.get_list("x-request-id")) == 1
    return body["error"]


def books(marketplace: Marketplace, created: dict[str, Any]) -> dict[str, Any]:
    """What a request would have changed: the organization's balance, the key's hold, spend and
    spend this period, usage and the organization's ledger."""
    account = marketplace.key_info(created["key"])
    usage = marketplace.usage(created["key"])["total"]
    reconciled = marketplace.http.get(
        "/admin/v1/reconcile", params={"key_id": created["id"]}, headers=marketplace.admin_headers
    ).json()
    (row,) = reconciled["orgs"]
    assert (row["org_id"], account["org_id"]) == (created["org_id"], created["org_id"])
    return {
        "credit_usd": account["credit_usd"],
        "org_credit_usd": account["org_credit_usd"],
        "org_on_hold_usd": row["on_hold_usd"],
        "on_hold_usd": account["on_hold_usd"],
        "spent_usd": account["spent_usd"],
        "spent_this_period_usd": account["spent_this_period_usd"],
        "requests": usage["requests"],
        "prompt_tokens": usage["prompt_tokens"],
        "ledger_events": row["events"],
        "in_flight": row["in_flight"],
        "books_ok": reconciled["ok"],
    }


UNTOUCHED = {
    "credit_usd": float(CREDIT_USD),
    "org_credit_usd": float(CREDIT_USD),
    "org_on_hold_usd": 0.0,
    "on_hold_usd": 0.0,
    "spent_usd": 0.0,
    "spent_this_period_usd": 0.0,
    "requests": 0,
    "prompt_tokens": 0,
    "ledger_events": 0,
    "in_flight": 0,
    "books_ok": True,
}


# -- inference bodies ------------------------------------------------------------------------------


def chat_with(content: Any, **fields: Any) -> dict[str, Any]:
    return {"model": "alpha-chat", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
INFERENCE_MISTAKES = [
    # content shapes
    pytest.param(chat_with({"a": 1}), "messages.0.content", "invalid_value", id="content-object"),
    pytest.param(chat_with(None), "messages.0.content", "invalid_value", id="null-user-content"),
    pytest.param(chat_with(["hi"]), "messages.0.content.0", "invalid_value", id="bare-string-part"),
    pytest.param(
        chat_with([{"type": "bogus", "text": "hi"}]), "messages.0.content.0.type", "invalid_value", id="unknown-type"
    ),
    pytest.param(
        chat_with([{"text": "hi"}]), "messages.0.content.0.type", "missing_required_parameter", id="part-without-type"
    ),
    pytest.param(chat_with([{"type": "text"}]), "messages.0.content.0.text", "invalid_value", id="text-part-no-text"),
    pytest.param(
        chat_with([{"type": "image_url", "image_url": {}}]),
        "messages.0.content.0.image_url",
        "invalid_value",
        id="image-without-url",
    ),
    pytest.param(
        chat_with([{"type": "bogus"}], stream=True), "messages.0.content.0.type", "invalid_value", id="stream"
    ),
    # what a text-only listing cannot take
    pytest.param(
        chat_with([{"type": "text", "text": "what is it?"}, IMAGE]),
        "messages.0.content.1",
        "invalid_value",
        id="image-on-text-only-listing",
    ),
    pytest.param(
        chat_with([{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]),
        "messages.0.content.0",
        "invalid_value",
        id="audio",
    ),
    pytest.param(
        chat_with([{"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}]),
        "messages.0.content.0",
        "invalid_value",
        id="video",
    ),
    # lone surrogates
    pytest.param(chat_with("\ud800"), "messages.0.content", "invalid_value", id="surrogate-in-message"),
    pytest.param(
        chat_with([{"type": "text", "text": "ok \udfff"}]),
        "messages.0.content.0.text",
        "invalid_value",
        id="surrogate-in-text-part",
    ),
    # the template is the listing's own, called with the engine's own arguments
    pytest.param(
        chat_with("hi", chat_template="{{ messages }}"), "chat_template", "invalid_value", id="request-chat-template"
    ),
    *[
        pytest.param(
            chat_with("hi", chat_template_kwargs={name: value}),
            "chat_template_kwargs",
            "invalid_value",
            id=f"template-kwarg-{name}",
        )
        for name, value in [
            ("conversation", []),
            ("return_assistant_tokens_mask", True),
            ("tools", []),
            ("documents", []),
            ("chat_template", "{{ 1 }}"),
            ("add_generation_prompt", False),
            ("continue_final_message", True),
            ("tokenize", True),
            ("return_dict", True),
            ("messages", []),
            ("tokenizer", None),
            ("padding", True),
            ("truncation", True),
            ("max_length", 8),
            ("return_tensors", "np"),
        ]
    ],
]


@pytest.mark.parametrize(("body", "param", "code"), INFERENCE_MISTAKES)
def test_a_bad_chat_body_is_400_naming_the_field_and_costs_nothing(
    marketplace: Marketplace, body: dict[str, Any], param: str, code: str
):
    created = marketplace.create_key(name="chat-mistakes", credit_usd=CREDIT_USD)
    response = send(marketplace, "POST", "/v1/chat/completions", body, marketplace.auth(created["key"]))
    assert_refused(response, 400, code, param)
    assert books(marketplace, created) == UNTOUCHED


@pytest.mark.parametrize(
    ("prompt", "param"),
    [("\ud800", "prompt"), (["fine", "bad \udbff"], "prompt.1")],
    ids=["prompt", "second-prompt"],
)
def test_a_lone_surrogate_in_a_completions_prompt_is_400_and_costs_nothing(
    marketplace: Marketplace, prompt: Any, param: str
):
    created = marketplace.create_key(name="prompt-mistakes", credit_usd=CREDIT_USD)
    body = {"model": "alpha-chat", "prompt": prompt, "max_tokens": 4}
    response = send(marketplace, "POST", "/v1/completions", body, marketplace.auth(created["key"]))
    assert_refused(response, 400, "invalid_value", param)
    assert books(marketplace, created) == UNTOUCHED


def test_well_formed_parts_and_template_variables_are_served(marketplace: Marketplace):
    """The rules refuse mistakes only: text parts and a template variable are served and billed."""
    created = marketplace.create_key(name="fine", credit_usd=CREDIT_USD)
    content = [{"type": "text", "text": "héllo 😀"}, {"type": "text", "text": "again"}]
    body = chat_with(content, chat_template_kwargs={"enable_thinking": False})
    response = send(marketplace, "POST", "/v1/chat/completions", body, marketplace.auth(created["key"]))
    assert response.status_code == 200, response.text
    after = books(marketplace, created)
    assert (after["requests"], after["ledger_events"], after["books_ok"]) == (1, 1, True)
    assert after["spent_usd"] == response.json()["usage"]["cost"] > 0
    # The key's spend came out of its organization's credit.
    assert after["credit_usd"] == after["org_credit_usd"] == round(CREDIT_USD - after["spent_usd"], 6)


# -- a request id that is not UTF-8 ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/healthz", 200),
        ("GET", "/v1/models", 200),
        ("GET", "/v1/key", 401),  # no key: the error envelope
        ("POST", "/v1/chat/completions", 200),
    ],
)
def test_a_request_id_that_is_not_utf8_is_replaced_on_every_route(
    marketplace: Marketplace, method: str, path: str, status: int
):
    headers: list[tuple[bytes, bytes]] = [(b"x-request-id", b"trace-\xff\xfe")]
    content = None
    if path == "/v1/chat/completions":
        key = marketplace.create_key(name="odd-request-id", credit_usd=CREDIT_USD)["key"]
        headers += [(b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json")]
        content = json.dumps(chat_with("hello", max_tokens=2)).encode()
    response = marketplace.http.request(method, path, headers=headers, content=content)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    (request_id,) = response.headers.get_list("x-request-id")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}", request_id)
    if status == 401:
        assert response.json()["error"]["code"] == "missing_api_key"


def test_a_utf8_request_id_is_echoed_unchanged(marketplace: Marketplace):
    response = marketplace.http.get("/healthz", headers={"x-request-id": "client-trace-42"})
    assert response.status_code == 200
    assert response.headers.get_list("x-request-id") == ["client-trace-42"]


# -- the admin API ----------------------------------------------------------------------------------

FUTURE = int((datetime.now(timezone.utc) + timedelta(days=30)).timestamp())
PAST_ISO = "2020-01-01T00:00:00Z"

CREATE_MISTAKES = [
    ({"credit_usd": "1"}, "credit_usd"),
    ({"credit_usd": "1_000"}, "credit_usd"),
    ({"credit_usd": True}, "credit_usd"),
    ({"credit_usd": 0.0000001}, "credit_usd"),
    ({"rpm": "5"}, "rpm"),
    ({"tpm": True}, "tpm"),
    ({"max_concurrency": True}, "max_concurrency"),
    ({"max_concurrency": 2.5}, "max_concurrency"),
    ({"rpm": 10**30}, "rpm"),
    ({"tpm": 10**400}, "tpm"),
    ({"rpm": 1_000_001}, "rpm"),
    ({"tpm": 1_000_000_001}, "tpm"),
    ({"max_concurrency": 10_001}, "max_concurrency"),
    ({"max_tokens_per_request": 100_000_001}, "max_tokens_per_request"),
    ({"max_tokens_per_request": "64"}, "max_tokens_per_request"),
    ({"expires_at": PAST_ISO}, "expires_at"),
    ({"expires_at": 1_000}, "expires_at"),
    ({"expires_at": FUTURE * 1000}, "expires_at"),  # milliseconds
    ({"expires_at": float(FUTURE)}, "expires_at"),
    ({"expires_at": str(FUTURE)}, "expires_at"),
    ({"expires_at": True}, "expires_at"),
    ({"spend_cap_usd": 0}, "spend_cap_usd"),
    ({"spend_cap_usd": "5"}, "spend_cap_usd"),
    ({"spend_cap_usd": 5, "spend_cap_period": "hourly"}, "spend_cap_period"),
    ({"spend_cap_period": "daily"}, None),  # a period without a cap
    ({"org_id": "org_0123456789abcdef0123", "credit_usd": 5}, None),  # credit belongs to the organization
]


@pytest.mark.parametrize(("fields", "param"), CREATE_MISTAKES, ids=[repr(f) for f, _ in CREATE_MISTAKES])
def test_admin_create_refuses_non_numbers_out_of_bounds_and_ambiguous_expiry(
    marketplace: Marketplace, fields: dict[str, Any], param: str
):
    before = marketplace.http.get("/admin/v1/keys", headers=marketplace.admin_headers).json()["data"]
    orgs_before = marketplace.http.get("/admin/v1/orgs", headers=marketplace.admin_headers).json()["data"]
    response = send(marketplace, "POST", "/admin/v1/keys", {"name": "strict", **fields}, marketplace.admin_headers)
    assert_refused(response, 400, "invalid_value", param)
    after = marketplace.http.get("/admin/v1/keys", headers=marketplace.admin_headers).json()["data"]
    assert after == before  # no key was created
    # ...and no organization for it either
    assert marketplace.http.get("/admin/v1/orgs", headers=marketplace.admin_headers).json()["data"] == orgs_before


def test_a_key_in_an_unknown_organization_is_404_and_nothing_is_created(marketplace: Marketplace):
    before = marketplace.http.get("/admin/v1/keys", headers=marketplace.admin_headers).json()["data"]
    response = send(
        marketplace, "POST", "/admin/v1/keys", {"name": "stray", "org_id": "org_" + "0" * 20}, marketplace.admin_headers
    )
    error = assert_refused(response, 404, "org_not_found", "org_id")
    assert error["message"] == "No organization with id 'org_00000000000000000000'."
    assert marketplace.http.get("/admin/v1/keys", headers=marketplace.admin_headers).json()["data"] == before


def test_limits_at_their_bounds_are_accepted_and_headers_stay_plain_integers(marketplace: Marketplace):
    limits = {"rpm": 1_000_000, "tpm": 1_000_000_000, "max_concurrency": 10_000, "max_tokens_per_request": 100_000_000}
    created = marketplace.create_key(name="biggest", credit_usd=CREDIT_USD, expires_at=FUTURE, **limits)
    assert created["limits"] == limits and created["expires_at"] == FUTURE
    response = marketplace.chat(created["key"], max_tokens=2)
    assert response.status_code == 200, response.text
    assert response.headers["x-ratelimit-limit-requests"] == "1000000"
    assert response.headers["x-ratelimit-limit-tokens"] == "1000000000"
    assert response.headers["x-ratelimit-remaining-requests"] == "999999"


PATCH_MISTAKES = [
    ({"name": None}, "name"),
    ({"status": None}, "status"),
    ({"rpm": "5"}, "rpm"),
    ({"max_concurrency": True}, "max_concurrency"),
    ({"rpm": 10**30}, "rpm"),
    ({"tpm": 10**400}, "tpm"),
    ({"max_tokens_per_request": 10**9}, "max_tokens_per_request"),
    ({"expires_at": FUTURE * 1000}, "expires_at"),
    ({"expires_at": 1.5e9}, "expires_at"),
    ({"expires_at": False}, "expires_at"),
    ({"spend_cap_usd": -1}, "spend_cap_usd"),
    ({"spend_cap_period": "yearly"}, "spend_cap_period"),
    ({"org_id": "org_0123456789abcdef0123"}, "org_id"),  # a key never moves to another organization
]


@pytest.mark.parametrize(("fields", "param"), PATCH_MISTAKES, ids=[repr(f) for f, _ in PATCH_MISTAKES])
def test_admin_patch_refuses_null_names_non_numbers_and_out_of_bounds_limits(
    marketplace: Marketplace, fields: dict[str, Any], param: str
):
    created = marketplace.create_key(name="patched", credit_usd=CREDIT_USD, rpm=10)
    url = f"/admin/v1/keys/{created['id']}"
    before = marketplace.http.get(url, headers=marketplace.admin_headers).json()
    response = send(marketplace, "PATCH", url, fields, marketplace.admin_headers)
    assert_refused(response, 400, "invalid_value", param)
    assert marketplace.http.get(url, headers=marketplace.admin_headers).json() == before


def test_admin_patch_null_clears_a_limit_the_model_list_and_the_expiry(marketplace: Marketplace):
    created = marketplace.create_key(
        name="cleared", credit_usd=CREDIT_USD, rpm=10, tpm=1000, models=["alpha-chat"], expires_at=FUTURE
    )
    response = marketplace.http.patch(
        f"/admin/v1/keys/{created['id']}",
        json={"rpm": None, "models": None, "expires_at": None},
        headers=marketplace.admin_headers,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["limits"] == {"rpm": None, "tpm": 1000, "max_concurrency": None, "max_tokens_per_request": None}
    assert (body["models"], body["expires_at"], body["name"], body["status"]) == (None, None, "cleared", "active")


CREDIT_MISTAKES = [{"amount_usd": "1_000"}, {"amount_usd": "1"}, {"amount_usd": True}, {"amount_usd": 1e-7}]


ROTATE_MISTAKES = [({"grace_s": "60"}, "grace_s"), ({"grace_s": -1}, "grace_s"), ({"grace_s": 2_592_001}, "grace_s")]


@pytest.mark.parametrize(("body", "param"), ROTATE_MISTAKES, ids=[repr(b) for b, _ in ROTATE_MISTAKES])
def test_admin_rotate_refuses_a_grace_that_is_not_whole_seconds_up_to_thirty_days(
    marketplace: Marketplace, body: dict[str, Any], param: str
):
    created = marketplace.create_key(name="rotated", credit_usd=CREDIT_USD)
    url = f"/admin/v1/keys/{created['id']}"
    before = marketplace.http.get(url, headers=marketplace.admin_headers).json()
    response = send(marketplace, "POST", f"{url}/rotate", body, marketplace.admin_headers)
    assert_refused(response, 400, "invalid_value", param)
    assert marketplace.http.get(url, headers=marketplace.admin_headers).json() == before
    assert marketplace.chat(created["key"], max_tokens=1).status_code == 200  # the secret is unchanged


@pytest.mark.parametrize("body", CREDIT_MISTAKES, ids=[repr(b) for b in CREDIT_MISTAKES])
def test_admin_credit_must_be_a_json_number_with_at_most_six_decimals(marketplace: Marketplace, body: dict[str, Any]):
    created = marketplace.create_key(name="topped", credit_usd=CREDIT_USD)
    response = send(marketplace, "POST", f"/admin/v1/keys/{created['id']}/credit", body, marketplace.admin_headers)
    assert_refused(response, 400, "invalid_value", "amount_usd")
    assert books(marketplace, created) == UNTOUCHED


def test_revocation_is_final(marketplace: Marketplace):
    created = marketplace.create_key(name="revoked-for-good", credit_usd=CREDIT_USD)
    url, headers = f"/admin/v1/keys/{created['id']}", marketplace.admin_headers
    revoked = marketplace.http.delete(url, headers=headers)
    assert (revoked.status_code, revoked.json()["status"]) == (200, "revoked")
    record = marketplace.http.get(url, headers=headers).json()

    assert_refused(
        marketplace.http.patch(url, json={"status": "active"}, headers=headers), 409, "key_revoked", "status"
    )
    credit = marketplace.http.post(f"{url}/credit", json={"amount_usd": 5}, headers=headers)
    assert_refused(credit, 409, "key_revoked", "id")
    rotation = marketplace.http.post(f"{url}/rotate", json={"grace_s": 60}, headers=headers)
    assert_refused(rotation, 409, "key_revoked", "id")
    assert marketplace.http.get(url, headers=headers).json() == record  # nothing changed
    org = marketplace.http.get(f"/admin/v1/orgs/{created['org_id']}", headers=headers).json()
    assert (org["credit_usd"], org["credited_usd"]) == (float(CREDIT_USD), float(CREDIT_USD))

    again = marketplace.http.delete(url, headers=headers)  # idempotent
    assert again.status_code == 200 and again.json() == record
    refused = marketplace.chat(created["key"], max_tokens=1)
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "revoked_api_key")
