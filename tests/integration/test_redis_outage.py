"""Failure policy: with the billing store down nothing is served unmetered, and it recovers."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

RECOVERY_TIMEOUT_S = 30.0


def assert_billing_unavailable(response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "billing_unavailable"
    assert int(response.headers["retry-after"]) > 0
    assert len(response.headers.get_list("x-request-id")) == 1


def test_requests_get_503_while_redis_is_down_and_are_served_again_once_it_is_back(marketplace, redis_server):
    key = marketplace.create_key(name="before-outage")["key"]
    assert marketplace.chat(key, max_tokens=1).status_code == 200

    redis_server.kill()
    try:
        for _ in range(4):  # a few, so both ingress replicas are asked
            assert_billing_unavailable(marketplace.chat(key, max_tokens=1))
        assert_billing_unavailable(marketplace.http.get("/v1/key", headers=marketplace.auth(key)))
        assert_billing_unavailable(marketplace.http.get("/healthz"))
        admin = marketplace.http.post(
            "/admin/v1/keys", json={"name": "during-outage"}, headers=marketplace.admin_headers
        )
        assert_billing_unavailable(admin)
    finally:
        redis_server.start()

    marketplace.wait_until(
        lambda: marketplace.http.get("/healthz").status_code == 200, RECOVERY_TIMEOUT_S, what="healthz after restart"
    )
    # The test server keeps no data across restarts, so the old key is gone; a new one works.
    fresh = marketplace.create_key(name="after-outage")["key"]
    for _ in range(4):
        response = marketplace.chat(fresh, max_tokens=1)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["cost"] > 0
