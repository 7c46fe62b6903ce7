"""Organizations, rotation, per-generation lookup, usage groupings and the ledger export,
through the HTTP API of the running marketplace (2 ingress replicas, fake engine, real Redis)."""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .test_alert_delivery import Receiver

pytestmark = pytest.mark.integration


def admin(marketplace, method: str, path: str, **kwargs) -> httpx.Response:
    return marketplace.http.request(method, path, headers=marketplace.admin_headers, **kwargs)


def create_org(marketplace, name: str, credit_usd: float) -> dict:
    response = admin(marketplace, "POST", "/admin/v1/orgs", json={"name": name, "credit_usd": credit_usd})
    assert response.status_code == 201, response.text
    return response.json()


def test_organizations_hold_the_credit_their_keys_draw_on(marketplace):
    org = create_org(marketplace, "acme", 1)
    assert (org["object"], org["name"], org["credit_usd"], org["keys"]) == ("organization", "acme", 1.0, 0)
    first = marketplace.create_key(name="acme-a", credit_usd=0, org_id=org["id"])
    second = marketplace.create_key(name="acme-b", credit_usd=0, org_id=org["id"], spend_cap_usd=0.5)
    assert first["org_id"] == second["org_id"] == org["id"]

    one = marketplace.chat(first["key"], max_tokens=8)
    two = marketplace.chat(second["key"], max_tokens=8)
    assert one.status_code == two.status_code == 200
    spent = round((one.json()["usage"]["cost"] + two.json()["usage"]["cost"]) * 1e6)

    shown = admin(marketplace, "GET", f"/admin/v1/orgs/{org['id']}").json()
    assert round(shown["credit_usd"] * 1e6) == 1_000_000 - spent
    assert round(shown["spent_usd"] * 1e6) == spent and shown["keys"] == 2
    info = marketplace.key_info(second["key"])
    assert info["org_id"] == org["id"] and info["org_name"] == "acme"
    assert info["org_credit_usd"] == info["credit_usd"] == shown["credit_usd"]
    assert info["spend_cap_usd"] == 0.5 and info["spend_cap_period"] is None and info["period_resets_at"] is None
    assert info["spent_this_period_usd"] == two.json()["usage"]["cost"]

    credited = admin(marketplace, "POST", f"/admin/v1/orgs/{org['id']}/credit", json={"amount_usd": 2})
    assert round(credited.json()["credit_usd"] * 1e6) == 3_000_000 - spent
    renamed = admin(marketplace, "PATCH", f"/admin/v1/orgs/{org['id']}", json={"name": "acme inc"})
    assert renamed.json()["name"] == "acme inc"
    listed = admin(marketplace, "GET", "/admin/v1/keys", params={"org_id": org["id"]}).json()["data"]
    assert sorted(k["id"] for k in listed) == sorted([first["id"], second["id"]])
    assert org["id"] in [o["id"] for o in admin(marketplace, "GET", "/admin/v1/orgs").json()["data"]]


def test_organization_mistakes_get_clear_errors(marketplace):
    org = create_org(marketplace, "strict", 1)
    both = admin(marketplace, "POST", "/admin/v1/keys", json={"name": "x", "org_id": org["id"], "credit_usd": 1})
    assert both.status_code == 400
    assert "organization" in both.json()["error"]["message"]
    missing = admin(marketplace, "POST", "/admin/v1/keys", json={"name": "x", "org_id": "org_nope"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "org_not_found"
    assert admin(marketplace, "GET", "/admin/v1/orgs/org_nope").json()["error"]["code"] == "org_not_found"
    period_only = admin(marketplace, "POST", "/admin/v1/keys", json={"name": "x", "spend_cap_period": "daily"})
    assert period_only.status_code == 400
    bad_period = admin(
        marketplace, "POST", "/admin/v1/keys", json={"name": "x", "spend_cap_usd": 1, "spend_cap_period": "hourly"}
    )
    assert bad_period.status_code == 400 and bad_period.json()["error"]["param"] == "spend_cap_period"


def test_a_spend_cap_refuses_with_402_and_shows_when_it_resets(marketplace):
    created = marketplace.create_key(name="capped", credit_usd=5, spend_cap_usd=0.000050, spend_cap_period="daily")
    refused = None
    for _ in range(40):
        response = marketplace.chat(created["key"], max_tokens=16)
        if response.status_code != 200:
            refused = response
            break
    assert refused is not None and refused.status_code == 402
    assert refused.json()["error"]["code"] == "spend_cap_reached"
    assert refused.json()["error"]["type"] == "insufficient_quota"
    info = marketplace.key_info(created["key"])
    assert info["spent_this_period_usd"] <= 0.000050
    now = time.time()
    assert info["period_resets_at"] == (int(now) // 86400 + 1) * 86400  # the next UTC midnight
    # The organization still has credit: lifting the cap lets the key spend again.
    patched = admin(marketplace, "PATCH", f"/admin/v1/keys/{created['id']}", json={"spend_cap_usd": None})
    assert patched.json()["spend_cap_usd"] is None
    assert marketplace.chat(created["key"], max_tokens=16).status_code == 200


def test_a_rotated_key_keeps_its_id_usage_and_limits_and_the_old_secret_stops_after_its_grace(marketplace):
    created = marketplace.create_key(name="rotating", credit_usd=1, rpm=50)
    old = created["key"]
    assert marketplace.chat(old, max_tokens=4).status_code == 200
    rotated = admin(marketplace, "POST", f"/admin/v1/keys/{created['id']}/rotate", json={"grace_s": 3})
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["key"]
    assert new != old and rotated.json()["id"] == created["id"] and rotated.json()["limits"]["rpm"] == 50
    assert rotated.json()["prefix"] == new[:10] + "..." + new[-4:]
    assert marketplace.chat(old, max_tokens=4).status_code == 200  # within the grace
    assert marketplace.chat(new, max_tokens=4).status_code == 200
    old_key_status = lambda: marketplace.http.get("/v1/key", headers=marketplace.auth(old)).status_code  # noqa: E731
    marketplace.wait_until(lambda: old_key_status() == 401, 10, what="the grace end")
    refused = marketplace.chat(old, max_tokens=4)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "rotated_api_key"
    assert marketplace.http.get("/v1/key", headers=marketplace.auth(old)).json()["error"]["code"] == "rotated_api_key"
    assert marketplace.usage(new)["total"]["requests"] == 3  # one key: its usage before and after
    assert marketplace.key_info(new)["id"] == created["id"]

    revoked = marketplace.create_key(name="gone", credit_usd=1)
    admin(marketplace, "DELETE", f"/admin/v1/keys/{revoked['id']}")
    again = admin(marketplace, "POST", f"/admin/v1/keys/{revoked['id']}/rotate", json={"grace_s": 0})
    assert again.status_code == 409 and again.json()["error"]["code"] == "key_revoked"
    bad = admin(marketplace, "POST", f"/admin/v1/keys/{created['id']}/rotate", json={"grace_s": "10"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "grace_s"


def test_every_response_id_looks_up_to_exactly_its_usage(marketplace):
    created = marketplace.create_key(name="lookup", credit_usd=1)
    key = created["key"]
    answer = marketplace.chat(key, max_tokens=8, user="customer-42")
    assert answer.status_code == 200
    body = answer.json()
    found = marketplace.http.get("/v1/generation", params={"id": body["id"]}, headers=marketplace.auth(key))
    assert found.status_code == 200, found.text
    generation = found.json()
    assert generation["id"] == body["id"] and generation["object"] == "generation"
    assert (generation["model"], generation["served_by"], generation["status"]) == (
        "alpha-chat",
        "alpha-chat",
        "completed",
    )
    assert generation["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert generation["completion_tokens"] == body["usage"]["completion_tokens"]
    assert generation["cost_usd"] == body["usage"]["cost"]
    assert generation["user"] == "customer-42" and generation["stream"] is False
    assert generation["key_id"] == created["id"] and generation["ttft_ms"] is None
    assert generation["latency_ms"] >= 0 and abs(generation["created"] - time.time()) < 120
    alias = marketplace.http.get("/api/v1/generation", params={"id": body["id"]}, headers=marketplace.auth(key))
    assert alias.json() == generation

    # A key of another organization cannot see it; a key of the same organization can.
    other = marketplace.create_key(name="stranger", credit_usd=1)
    hidden = marketplace.http.get("/v1/generation", params={"id": body["id"]}, headers=marketplace.auth(other["key"]))
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "generation_not_found"
    colleague = marketplace.create_key(name="colleague", credit_usd=0, org_id=created["org_id"])
    seen = marketplace.http.get("/v1/generation", params={"id": body["id"]}, headers=marketplace.auth(colleague["key"]))
    assert seen.status_code == 200
    missing = marketplace.http.get("/v1/generation", headers=marketplace.auth(key))
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "id"


def test_a_stream_cut_mid_way_looks_up_as_aborted_with_what_it_was_billed(marketplace, redis_client):
    created = marketplace.create_key(name="cut", credit_usd=1)
    key = created["key"]
    body = {
        "model": "alpha-chat",
        "messages": [{"role": "user", "content": "long [[fake-tokens=200]]"}],
        "max_tokens": 200,
        "stream": True,
    }
    with (
        httpx.Client(base_url=marketplace.base_url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=body, headers=marketplace.auth(key)) as stream,
    ):
        lines = stream.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        for _ in range(5):
            next(lines)
    response_id = first["id"]

    def looked_up():
        found = marketplace.http.get("/v1/generation", params={"id": response_id}, headers=marketplace.auth(key))
        return found.json() if found.status_code == 200 else None

    generation = marketplace.wait_until(looked_up, 20, what="the aborted stream's settlement")
    assert generation["status"] == "aborted" and generation["stream"] is True
    assert 0 < generation["completion_tokens"] < 200
    assert generation["ttft_ms"] is not None and generation["ttft_ms"] <= generation["latency_ms"]
    total = marketplace.usage(key)["total"]
    assert (total["completion_tokens"], total["cost_usd"]) == (generation["completion_tokens"], generation["cost_usd"])


def test_usage_groups_by_key_and_organization_and_the_ledger_exports_every_request_once(marketplace):
    org = create_org(marketplace, "exporter", 1)
    keys = [marketplace.create_key(name=f"exp-{i}", credit_usd=0, org_id=org["id"]) for i in range(2)]
    answers = [marketplace.chat(k["key"], max_tokens=4 + i) for i, k in enumerate(keys * 2)]
    assert all(a.status_code == 200 for a in answers)

    by_key = admin(marketplace, "GET", "/admin/v1/usage", params={"org_id": org["id"], "group_by": "key"}).json()
    assert [(row["key_id"], row["requests"]) for row in by_key["data"]] == sorted((k["id"], 2) for k in keys)
    by_org = admin(marketplace, "GET", "/admin/v1/usage", params={"org_id": org["id"], "group_by": "org"}).json()
    assert [(row["org_id"], row["requests"]) for row in by_org["data"]] == [(org["id"], 4)]
    own = marketplace.usage(keys[0]["key"], group_by="key")
    assert [(row["key_id"], row["requests"]) for row in own["data"]] == [(keys[0]["id"], 2)]

    def exported() -> list[dict]:
        rows, cursor = [], None
        for _ in range(10):
            params = {"org_id": org["id"], "limit": 1} | ({"after": cursor} if cursor else {})
            page = admin(marketplace, "GET", "/admin/v1/ledger", params=params).json()
            rows += page["data"]
            cursor = page["next"]
            if not page["has_more"]:
                break
        return rows

    rows = marketplace.wait_until(lambda: (r := exported()) and len(r) == 4 and r, 15, what="4 settled ledger rows")
    assert sorted(r["response_id"] for r in rows) == sorted(a.json()["id"] for a in answers)
    assert sum(r["cost_micros"] for r in rows) == round(sum(a.json()["usage"]["cost"] for a in answers) * 1e6)
    assert {r["org_id"] for r in rows} == {org["id"]}

    text = admin(marketplace, "GET", "/admin/v1/ledger", params={"org_id": org["id"], "format": "csv"})
    assert text.headers["content-type"].startswith("text/csv") and text.headers["x-tokenmart-next-cursor"]
    parsed = list(csv.DictReader(io.StringIO(text.text)))
    assert sorted(r["response_id"] for r in parsed) == sorted(r["response_id"] for r in rows)
    reconciled = admin(marketplace, "GET", "/admin/v1/reconcile", params={"org_id": org["id"]}).json()
    assert reconciled["ok"] and reconciled["orgs"][0]["events"] == 4


def burst(marketplace, keys: list[str], requests: int, **body) -> list[httpx.Response]:
    """`requests` chat calls released together by a barrier, spread over the keys; both ingress
    replicas take some of them."""
    gate = threading.Barrier(requests)

    def send(index: int) -> httpx.Response:
        with httpx.Client(base_url=marketplace.base_url, timeout=60) as client:
            gate.wait()
            return client.post(
                "/v1/chat/completions",
                json={
                    "model": "alpha-chat",
                    "messages": [{"role": "user", "content": "hi [[fake-tokens=40]]"}],
                    **body,
                },
                headers=marketplace.auth(keys[index % len(keys)]),
            )

    with ThreadPoolExecutor(requests) as pool:
        return list(pool.map(send, range(requests)))


def verify(secret: str, post) -> dict:
    expected = "sha256=" + hmac.new(secret.encode(), post.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(post.headers["x-tokenmart-signature"], expected)
    return json.loads(post.body)


@pytest.fixture
def alert_settings(marketplace):
    """POSTs an organization's alert settings; removes them after the test, so the ingress
    replicas' deliverers stop polling its outbox for the tests that follow."""
    configured: list[str] = []

    def configure(org_id: str, **settings) -> httpx.Response:
        configured.append(org_id)
        return admin(marketplace, "POST", f"/admin/v1/orgs/{org_id}/alerts", json=settings)

    yield configure
    for org_id in configured:
        assert admin(marketplace, "DELETE", f"/admin/v1/orgs/{org_id}/alerts").status_code == 200


def test_a_burst_across_a_balance_threshold_raises_exactly_one_signed_alert_delivered_after_two_failures(
    marketplace, alert_settings
):
    org = create_org(marketplace, "alerted", 0.0006)
    keys = [marketplace.create_key(name=f"alerted-{i}", credit_usd=0, org_id=org["id"])["key"] for i in range(2)]
    secret = "whsec-" + "x" * 24
    with Receiver([500, 500]) as receiver:
        settings = alert_settings(org["id"], url=receiver.url, secret=secret, balance_below_usd=0.0003)
        assert settings.status_code == 200, settings.text
        assert "secret" not in settings.json() and settings.json()["balance_below_usd"] == 0.0003

        answers = burst(marketplace, keys, 24, max_tokens=40)
        assert {a.status_code for a in answers} <= {200, 402}
        spent = sum(round(a.json()["usage"]["cost"] * 1e6) for a in answers if a.status_code == 200)
        assert spent > 300  # the burst crossed the threshold (600 micro-USD of credit, alert below 300)

        marketplace.wait_until(lambda: len(receiver.posts()) >= 3, 30, what="two failed POSTs and a third")
        time.sleep(3)  # room for a second alert, which must not come
        posts = receiver.posts()
        assert len(posts) == 3
        assert len({p.headers["x-tokenmart-delivery"] for p in posts}) == 1
        bodies = [verify(secret, post) for post in posts]
        assert bodies[0] == bodies[1] == bodies[2]
        alert = bodies[0]
        assert (alert["type"], alert["org_id"], alert["key_id"], alert["threshold_usd"]) == (
            "balance_below",
            org["id"],
            None,
            0.0003,
        )
        assert alert["id"] == posts[0].headers["x-tokenmart-delivery"]
        assert alert["value_usd"] < 0.0003
    deliveries = admin(marketplace, "GET", f"/admin/v1/orgs/{org['id']}/alerts/deliveries").json()["data"]
    assert [(d["delivery_id"], d["status"], d["attempts"]) for d in deliveries] == [(alert["id"], "delivered", 3)]
    org_now = admin(marketplace, "GET", f"/admin/v1/orgs/{org['id']}").json()
    assert round(org_now["spent_usd"] * 1e6) == spent and org_now["credit_usd"] >= 0


def test_a_key_crossing_its_cap_percentage_raises_one_alert_naming_the_key(marketplace, alert_settings):
    org = create_org(marketplace, "capwatch", 5)
    capped = marketplace.create_key(
        name="capwatch-key", credit_usd=0, org_id=org["id"], spend_cap_usd=0.0004, spend_cap_period="monthly"
    )
    secret = "whsec-" + "y" * 24
    with Receiver([]) as receiver:
        assert alert_settings(org["id"], url=receiver.url, secret=secret, cap_percent=50).status_code == 200
        answers = burst(marketplace, [capped["key"]], 16, max_tokens=40)
        assert {a.status_code for a in answers} <= {200, 402}
        marketplace.wait_until(lambda: receiver.posts(), 20, what="the cap alert")
        time.sleep(2)
        (post,) = receiver.posts()
        alert = verify(secret, post)
    assert (alert["type"], alert["key_id"], alert["threshold_percent"]) == ("cap_percent", capped["id"], 50)
    assert alert["value_usd"] >= 0.0002
    info = marketplace.key_info(capped["key"])
    assert info["spent_this_period_usd"] <= 0.0004
    assert info["spent_this_period_usd"] == round(
        sum(a.json()["usage"]["cost"] for a in answers if a.status_code == 200), 6
    )


def test_a_keys_recent_generations_and_the_live_holds(marketplace):
    created = marketplace.create_key(name="recent", credit_usd=1)
    key = created["key"]
    ids = [marketplace.chat(key, max_tokens=2).json()["id"] for _ in range(3)]
    recent = marketplace.http.get("/v1/generations", headers=marketplace.auth(key)).json()["data"]
    assert [row["id"] for row in recent] == ids[::-1]  # newest first
    assert all(row["status"] == "completed" and row["key_id"] == created["id"] for row in recent)
    one = marketplace.http.get("/api/v1/generations", params={"limit": 1}, headers=marketplace.auth(key)).json()
    assert [row["id"] for row in one["data"]] == [ids[-1]]
    assert (
        marketplace.http.get("/v1/generations", params={"limit": 0}, headers=marketplace.auth(key)).status_code == 400
    )

    holds = marketplace.http.get(
        "/admin/v1/holds", params={"org_id": created["org_id"]}, headers=marketplace.admin_headers
    ).json()["data"]
    assert holds == [
        {
            "object": "holds",
            "org_id": created["org_id"],
            "credit_usd": marketplace.key_info(key)["credit_usd"],
            "on_hold_usd": 0.0,
            "in_flight": 0,
            "keys": [{"key_id": created["id"], "on_hold_usd": 0.0, "in_flight": 0}],
        }
    ]
    assert marketplace.http.get("/admin/v1/holds", headers=marketplace.auth(key)).status_code == 401
