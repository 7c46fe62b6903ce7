"""Fair share between tenants under overload: `fair-chat` has a weighted fair queue (catalog
`fair_share`) that lets one request at a time per ingress replica reach its engine. Keys and
organizations name a tier (the catalog's `tiers`: free 1, standard 2, premium 4); while the
listing is saturated, organizations get turns in proportion to their tier's weight, a request
that cannot get a turn within 4 s gets a 503 with Retry-After, a full waiting room (20 per
ingress replica) refuses the organization most over its share, and waiting costs nothing."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.integration


def test_tiers_are_set_on_keys_and_organizations_and_checked(marketplace):
    headers = marketplace.admin_headers
    org = marketplace.http.post("/admin/v1/orgs", json={"name": "gold", "tier": "premium"}, headers=headers).json()
    assert org["tier"] == "premium"
    inherits = marketplace.create_key(name="inherits", credit_usd=0, org_id=org["id"])
    assert inherits["tier"] == "premium"  # the organization's
    own = marketplace.create_key(name="own", credit_usd=0, org_id=org["id"], tier="free")
    assert own["tier"] == "free"
    assert marketplace.key_info(own["key"])["tier"] == "free"
    patched = marketplace.http.patch(f"/admin/v1/keys/{own['id']}", json={"tier": None}, headers=headers).json()
    assert patched["tier"] == "premium"
    standard = marketplace.create_key(name="default tier")
    assert standard["tier"] is None  # the catalog's default tier, standard
    org = marketplace.http.patch(f"/admin/v1/orgs/{org['id']}", json={"tier": "free"}, headers=headers).json()
    assert (org["tier"], org["name"]) == ("free", "gold")

    unknown = marketplace.http.post("/admin/v1/keys", json={"name": "x", "tier": "platinum"}, headers=headers)
    assert unknown.status_code == 400
    assert unknown.json()["error"]["param"] == "tier"
    assert "platinum" in unknown.json()["error"]["message"]


def test_a_saturated_listing_serves_tenants_in_proportion_to_their_tier(marketplace):
    keys = {tier: marketplace.create_key(name=f"flood-{tier}", credit_usd=1, tier=tier)["key"] for tier in
            ("free", "standard", "premium")}  # fmt: skip
    finished: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(24)

    def one(tier: str) -> int:
        start.wait()
        answer = marketplace.chat(
            keys[tier], model="fair-chat", messages=[{"role": "user", "content": "turn [[fake-tokens=4]]"}],
            max_tokens=4,
        )  # fmt: skip
        with lock:
            finished.append(tier)
        return answer.status_code

    with ThreadPoolExecutor(24) as pool:
        statuses = list(pool.map(one, ["free", "standard", "premium"] * 8))
    assert statuses == [200] * 24
    rank = {tier: statistics.mean(i for i, done in enumerate(finished) if done == tier) for tier in keys}
    # Premium (4) is served ahead of standard (2), which is served ahead of free (1).
    assert rank["premium"] < rank["standard"] < rank["free"], (rank, finished)
    first_half = finished[:12]
    assert first_half.count("premium") > first_half.count("free"), finished


def test_a_request_that_gets_no_turn_in_time_is_a_503_with_retry_after_and_costs_nothing(marketplace):
    created = marketplace.create_key(name="too-long-a-wait", credit_usd=1)
    key = created["key"]

    def long_one(turn: int):
        # 1 s each, one at a time per ingress replica: past the 3 s deadline for some of them
        return marketplace.chat(
            key, model="fair-chat", messages=[{"role": "user", "content": f"slow {turn} [[fake-tokens=50]]"}],
            max_tokens=50,
        )  # fmt: skip

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(long_one, range(12)))
    served = [answer for answer in answers if answer.status_code == 200]
    busy = [answer for answer in answers if answer.status_code == 503]
    assert len(served) + len(busy) == 12 and busy and served, [a.status_code for a in answers]
    for answer in busy:
        error = answer.json()["error"]
        assert (error["code"], error["type"]) == ("model_overloaded", "service_unavailable")
        assert int(answer.headers["retry-after"]) >= 1
    spent = round(marketplace.key_info(key)["spent_usd"] * 1_000_000)
    assert spent == sum(round(answer.json()["usage"]["cost"] * 1_000_000) for answer in served)
    assert marketplace.usage(key)["total"]["requests"] == len(served)  # the 503s are not requests of the bill
    assert marketplace.key_info(key)["on_hold_usd"] == 0


def test_a_full_waiting_room_pushes_out_the_flooder_and_lets_the_premium_tenant_in(marketplace):
    free = marketplace.create_key(name="room-flooder", credit_usd=1, tier="free")["key"]
    premium = marketplace.create_key(name="room-premium", credit_usd=1, tier="premium")["key"]

    def ask(key: str, turn: int):
        messages = [{"role": "user", "content": f"room {turn} [[fake-tokens=40]]"}]  # 0.8 s each
        return marketplace.chat(key, model="fair-chat", messages=messages, max_tokens=40)

    with ThreadPoolExecutor(51) as pool:
        flood = [pool.submit(ask, free, turn) for turn in range(50)]  # 1 running + 20 waiting per replica
        time.sleep(0.5)
        premium_answers = [pool.submit(ask, premium, turn) for turn in range(1)]
        answers = [future.result() for future in flood]
        served_premium = [future.result() for future in premium_answers]

    assert [answer.status_code for answer in served_premium] == [200], served_premium[0].text
    refused = [answer for answer in answers if answer.status_code == 503]
    assert refused, [answer.status_code for answer in answers]
    assert {answer.json()["error"]["code"] for answer in refused} == {"model_overloaded"}
    assert marketplace.key_info(free)["on_hold_usd"] == marketplace.key_info(premium)["on_hold_usd"] == 0
