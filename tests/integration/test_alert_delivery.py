"""Alert webhooks against a real redis-server and a real local HTTP receiver (no Ray).

The outbox entries are written by hand, field for field as docs/accounts.md says settlement
writes them; the deliverer then POSTs them to a receiver that answers with the statuses a
test scripts, and each test checks what the receiver got and what Redis holds after.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import pytest
import redis

from tokenmart.deployments import alerts
from tokenmart.deployments.alerts import AlertDeliverer, AlertSettingsRequest
from tokenmart.deployments.errors import BillingUnavailable, NotFound
from tokenmart.deployments.scripts import account_key

from ..helpers import free_port, wait_until
from ..helpers import run_with_redis as run

pytestmark = pytest.mark.integration

T = TypeVar("T")
SECRET = "whsec-" + "s3cr3t" * 4
NO_WAIT = (0, 0, 0)  # three retries, each due at once: four POSTs at most


# -- a receiver ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A local HTTP server that answers each POST with the next scripted status (then `then`)."""

    def __init__(self, statuses: list[int], then: int = 200, delay_s: float = 0.0) -> None:
        self.statuses = list(statuses)
        self.then = then
        self.delay_s = delay_s
        self.received: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver._lock:
                    receiver.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    status = receiver.statuses.pop(0) if receiver.statuses else receiver.then
                if receiver.delay_s:
                    threading.Event().wait(receiver.delay_s)
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/tokenmart"

    def posts(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


# -- a Redis database of these tests' own ---------------------------------------------------------
DB = 9  # the marketplace the other integration tests run keeps its deliverers on database 0


class _OwnDatabase:
    """The session's redis-server seen through database `DB`, which no ingress replica's alert
    deliverer polls (they would otherwise race these tests' deliverers for the outboxes)."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)

    @property
    def url(self) -> str:
        return f"{self._server.url.rsplit('/', 1)[0]}/{DB}"


@pytest.fixture
def redis_server(redis_server: Any) -> _OwnDatabase:
    """The shared `redis_client` fixture (tests/conftest.py) connects through this one too."""
    return _OwnDatabase(redis_server)


@pytest.fixture
def receiver_factory() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(statuses: list[int], then: int = 200, delay_s: float = 0.0) -> Receiver:
        receiver = Receiver(statuses, then, delay_s).__enter__()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.__exit__()


# -- Redis as settlement leaves it ----------------------------------------------------------------


def make_org(client: redis.Redis) -> str:
    org_id = "org_" + secrets.token_hex(10)
    client.hset(
        account_key(org_id, "org"),
        mapping={
            "id": org_id,
            "name": "acme",
            "created_at": "1700000000",
            "balance_micros": "4990000",
            "hold_micros": "0",
            "spent_micros": "5010000",
            "credited_micros": "10000000",
        },
    )
    client.sadd("tm:orgs", org_id)
    return org_id


def raise_balance_alert(client: redis.Redis, org_id: str, *, threshold: int = 5_000_000, value: int = 4_990_000):
    """XADD one balance alert the way lua/settle.lua does; returns its delivery id."""
    billing_id = secrets.token_hex(16)
    delivery_id = f"dlv_{billing_id}_balance_below"
    client.xadd(
        account_key(org_id, "outbox"),
        {
            "delivery_id": delivery_id,
            "kind": "balance_below",
            "org_id": org_id,
            "key_id": "",
            "threshold_micros": str(threshold),
            "value_micros": str(value),
            "request_id": billing_id,
            "raised_at_ms": "1733011200123",
        },
    )
    return delivery_id


def raise_cap_alert(client: redis.Redis, org_id: str, key_id: str, *, percent: int, value: int) -> str:
    billing_id = secrets.token_hex(16)
    delivery_id = f"dlv_{billing_id}_cap_percent"
    client.xadd(
        account_key(org_id, "outbox"),
        {
            "delivery_id": delivery_id,
            "kind": "cap_percent",
            "org_id": org_id,
            "key_id": key_id,
            "threshold_percent": str(percent),
            "value_micros": str(value),
            "request_id": billing_id,
            "raised_at_ms": "1733011299999",
        },
    )
    return delivery_id


def configure(redis_url: str, org_id: str, url: str, **thresholds: Any) -> None:
    thresholds = thresholds or {"balance_below_usd": 5}
    request = AlertSettingsRequest(url=url, secret=SECRET, **thresholds)
    run(redis_url, lambda client: alerts.set_alerts(client, org_id, request))


async def deliver_until_empty(client: Any, org_id: str, deliverer: AlertDeliverer, passes: int = 20) -> int:
    """Run passes until the organization's outbox is empty; returns how many were delivered."""
    delivered = 0
    for _ in range(passes):
        delivered += await deliverer.deliver_once()
        if not await client.xlen(account_key(org_id, "outbox")):
            return delivered
    raise AssertionError(f"the outbox of {org_id} is not empty after {passes} passes")


def deliver(redis_url: str, backoff_s: tuple[float, ...] = NO_WAIT, *, until_empty: str | None = None) -> int:
    """One pass of a new deliverer (a replica's), or passes until `until_empty`'s outbox is empty."""

    async def scenario(client: Any) -> int:
        deliverer = AlertDeliverer(client, backoff_s=backoff_s)
        try:
            if until_empty is None:
                return await deliverer.deliver_once()
            return await deliver_until_empty(client, until_empty, deliverer)
        finally:
            await deliverer.aclose()

    return run(redis_url, scenario)


def verify(secret: str, body: bytes, header: str) -> bool:
    """What a receiver does: HMAC-SHA256 over the exact bytes received, compared in constant time."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, header)


def balance_body(delivery_id: str, org_id: str) -> dict[str, Any]:
    return {
        "id": delivery_id,
        "object": "alert",
        "type": "balance_below",
        "org_id": org_id,
        "key_id": None,
        "threshold_usd": 5.0,
        "value_usd": 4.99,
        "request_id": delivery_id.removeprefix("dlv_").removesuffix("_balance_below"),
        "created": 1733011200,
    }


# -- delivery -------------------------------------------------------------------------------------


def test_an_alert_refused_twice_is_delivered_on_the_third_post_signed_with_one_delivery_id(
    redis_server, redis_client, receiver_factory
):
    receiver = receiver_factory([500, 500], then=200)
    org_id = make_org(redis_client)
    configure(redis_server.url, org_id, receiver.url, balance_below_usd=5)
    delivery_id = raise_balance_alert(redis_client, org_id)

    async def scenario(client: Any) -> tuple[int, list[dict[str, Any]]]:
        deliverer = AlertDeliverer(client, backoff_s=NO_WAIT)
        try:
            delivered = await deliver_until_empty(client, org_id, deliverer)
            # Once delivered, nothing is sent again.
            assert await deliverer.deliver_once() == 0
        finally:
            await deliverer.aclose()
        return delivered, await alerts.deliveries(client, org_id)

    delivered, records = run(redis_server.url, scenario)

    posts = receiver.posts()
    assert len(posts) == 3
    assert delivered == 1
    for post in posts:
        assert post.path == "/hooks/tokenmart"
        assert post.headers["content-type"] == "application/json"
        assert post.headers["user-agent"] == "tokenmart-alerts/1"
        assert post.headers["x-tokenmart-delivery"] == delivery_id
        assert verify(SECRET, post.body, post.headers["x-tokenmart-signature"])
        assert not verify("another-secret-of-16", post.body, post.headers["x-tokenmart-signature"])
        assert json.loads(post.body) == balance_body(delivery_id, org_id)
        assert post.body == posts[0].body  # a retry is the same bytes
    assert b" " not in posts[0].body  # compact JSON

    assert redis_client.xlen(account_key(org_id, "outbox")) == 0
    assert redis_client.hgetall(account_key(org_id, "outbox_attempts")) == {}
    assert len(records) == 1
    at_ms = records[0].pop("at_ms")
    assert records == [
        {
            "object": "alert_delivery",
            "delivery_id": delivery_id,
            "kind": "balance_below",
            "status": "delivered",
            "attempts": 3,
            "http_status": 200,
            "reason": None,
            "error": None,
        }
    ]
    seconds, micros = redis_client.time()
    assert 0 <= seconds * 1000 + micros // 1000 - at_ms < 60_000
    assert redis_client.exists("tm:alert_lock:" + org_id) == 0


def test_a_cap_alert_body_names_the_key_and_the_percent(redis_server, redis_client, receiver_factory):
    receiver = receiver_factory([], then=204)
    org_id = make_org(redis_client)
    configure(redis_server.url, org_id, receiver.url, cap_percent=80)
    key_id = "key_" + secrets.token_hex(10)
    delivery_id = raise_cap_alert(redis_client, org_id, key_id, percent=80, value=8_000_001)

    assert deliver(redis_server.url) == 1
    [post] = receiver.posts()
    assert json.loads(post.body) == {
        "id": delivery_id,
        "object": "alert",
        "type": "cap_percent",
        "org_id": org_id,
        "key_id": key_id,
        "threshold_percent": 80,
        "value_usd": 8.000001,
        "request_id": delivery_id.removeprefix("dlv_").removesuffix("_cap_percent"),
        "created": 1733011299,
    }
    assert verify(SECRET, post.body, post.headers["x-tokenmart-signature"])
    [record] = run(redis_server.url, lambda client: alerts.deliveries(client, org_id))
    assert (record["status"], record["attempts"], record["http_status"]) == ("delivered", 1, 204)


def test_an_alert_never_accepted_fails_after_the_last_backoff_step(redis_server, redis_client, receiver_factory):
    receiver = receiver_factory([], then=503)
    org_id = make_org(redis_client)
    configure(redis_server.url, org_id, receiver.url)
    delivery_id = raise_balance_alert(redis_client, org_id)

    assert deliver(redis_server.url, NO_WAIT, until_empty=org_id) == 0
    posts = receiver.posts()
    assert len(posts) == len(NO_WAIT) + 1
    assert {post.headers["x-tokenmart-delivery"] for post in posts} == {delivery_id}
    [record] = run(redis_server.url, lambda client: alerts.deliveries(client, org_id))
    assert (record["delivery_id"], record["status"], record["attempts"]) == (delivery_id, "failed", 4)
    assert (record["http_status"], record["reason"], record["error"]) == (503, "retries_exhausted", None)
    assert redis_client.xlen(account_key(org_id, "outbox")) == 0
    assert redis_client.hgetall(account_key(org_id, "outbox_attempts")) == {}


def test_an_unreachable_receiver_counts_as_a_failure_and_is_named(redis_server, redis_client):
    org_id = make_org(redis_client)
    configure(redis_server.url, org_id, f"http://127.0.0.1:{free_port()}/nobody-listens")
    raise_balance_alert(redis_client, org_id)

    assert deliver(redis_server.url, (0,), until_empty=org_id) == 0
    [record] = run(redis_server.url, lambda client: alerts.deliveries(client, org_id))
    assert (record["status"], record["attempts"], record["http_status"]) == ("failed", 2, None)
    assert (record["reason"], record["error"]) == ("retries_exhausted", "ConnectError")


def redis_now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def test_a_failed_alert_waits_its_backoff_step_on_redis_clock(redis_server, redis_client, receiver_factory):
    receiver = receiver_factory([], then=500)
    org_id = make_org(redis_client)
    configure(redis_server.url, org_id, receiver.url)
    delivery_id = raise_balance_alert(redis_client, org_id)
    attempts_key = account_key(org_id, "outbox_attempts")

    assert deliver(redis_server.url, (60, 120)) == 0
    assert deliver(redis_server.url, (60, 120)) == 0  # not due for a minute
    assert len(receiver.posts()) == 1
    state = json.loads(redis_client.hget(attempts_key, delivery_id))
    now_ms = redis_now_ms(redis_client)
    assert state["attempts"] == 1
    assert 55_000 < state["next_at_ms"] - now_ms <= 60_000
    assert redis_client.xlen(account_key(org_id, "outbox")) == 1

    # Once due (moved back by hand, as a minute passing would), it is tried again.
    redis_client.hset(attempts_key, delivery_id, json.dumps({"attempts": 1, "next_at_ms": now_ms}))
    assert deliver(redis_server.url, (60, 120)) == 0
    assert len(receiver.posts()) == 2
    state = json.loads(redis_client.hget(attempts_key, delivery_id))
    assert state["attempts"] == 2
    assert 115_000 < state["next_at_ms"] - now_ms <= 125_000


def test_a_new_deliverer_continues_the_attempts_of_one_that_stopped(redis_server, redis_client, receiver_factory):
    receiver = receiver_factory([500, 500], then=200)
    org_id = make_org(redis_client)
    configure(redis_server.url, org_id, receiver.url)
    delivery_id = raise_balance_alert(redis_client, org_id)

    # One failed attempt; then that replica (its event loop, Redis client and deliverer) is gone.
    assert deliver(redis_server.url) == 0
    assert len(receiver.posts()) == 1
    assert json.loads(redis_client.hget(account_key(org_id, "outbox_attempts"), delivery_id))["attempts"] == 1

    assert deliver(redis_server.url, until_empty=org_id) == 1
    posts = receiver.posts()
    assert len(posts) == 3
    assert {post.headers["x-tokenmart-delivery"] for post in posts} == {delivery_id}
    [record] = run(redis_server.url, lambda client: alerts.deliveries(client, org_id))
    assert (record["status"], record["attempts"]) == ("delivered", 3)


def test_a_lease_left_by_a_dead_replica_holds_delivery_only_until_it_runs_out(
    redis_server, redis_client, receiver_factory
):
    receiver = receiver_factory([], then=200)
    org_id = make_org(redis_client)
    configure(redis_server.url, org_id, receiver.url)
    raise_balance_alert(redis_client, org_id)
    lock = "tm:alert_lock:" + org_id
    redis_client.set(lock, "a-replica-that-died", px=300)

    assert deliver(redis_server.url) == 0
    assert receiver.posts() == []
    assert redis_client.get(lock) == "a-replica-that-died"  # neither taken nor released by another
    wait_until(lambda: not redis_client.exists(lock), 5.0, what="the dead replica's lease to run out")
    assert deliver(redis_server.url) == 1
    assert len(receiver.posts()) == 1


def test_two_deliverers_at_once_send_each_alert_once(redis_server, redis_client, receiver_factory):
    # Slow answers, so both replicas' passes overlap.
    receiver = receiver_factory([], then=200, delay_s=0.1)
    orgs = [make_org(redis_client) for _ in range(3)]
    raised = []
    for org_id in orgs:
        configure(redis_server.url, org_id, receiver.url)
        raised += [raise_balance_alert(redis_client, org_id) for _ in range(3)]

    async def scenario(client: Any) -> list[int]:
        replicas = [AlertDeliverer(client, backoff_s=NO_WAIT) for _ in range(2)]
        try:
            totals = [0, 0]
            for _ in range(10):
                results = await asyncio.gather(*(replica.deliver_once() for replica in replicas))
                totals = [total + result for total, result in zip(totals, results, strict=True)]
                if sum(totals) >= len(raised):
                    break
            return totals
        finally:
            for replica in replicas:
                await replica.aclose()

    totals = run(redis_server.url, scenario)
    assert sum(totals) == len(raised)
    sent = [post.headers["x-tokenmart-delivery"] for post in receiver.posts()]
    assert sorted(sent) == sorted(raised)
    for org_id in orgs:
        records = run(redis_server.url, lambda client, org_id=org_id: alerts.deliveries(client, org_id))
        assert [(r["status"], r["attempts"]) for r in records] == [("delivered", 1)] * 3
        assert redis_client.xlen(account_key(org_id, "outbox")) == 0


def test_alerts_of_one_org_go_out_oldest_first(redis_server, redis_client, receiver_factory):
    receiver = receiver_factory([], then=200)
    org_id = make_org(redis_client)
    configure(redis_server.url, org_id, receiver.url)
    raised = [raise_balance_alert(redis_client, org_id, value=4_000_000 - n) for n in range(5)]

    assert deliver(redis_server.url) == 5
    assert [post.headers["x-tokenmart-delivery"] for post in receiver.posts()] == raised
    records = run(redis_server.url, lambda client: alerts.deliveries(client, org_id, limit=2))
    assert [record["delivery_id"] for record in records] == raised[::-1][:2]  # newest first


def test_removing_the_settings_records_pending_alerts_as_failed(redis_server, redis_client, receiver_factory):
    receiver = receiver_factory([], then=500)
    org_id = make_org(redis_client)
    configure(redis_server.url, org_id, receiver.url)
    tried = raise_balance_alert(redis_client, org_id)
    assert deliver(redis_server.url, (60,)) == 0  # one failed attempt, the next due in a minute
    untried = raise_balance_alert(redis_client, org_id)

    assert run(redis_server.url, lambda client: alerts.delete_alerts(client, org_id)) is True
    records = run(redis_server.url, lambda client: alerts.deliveries(client, org_id))
    summary = {r["delivery_id"]: (r["status"], r["attempts"], r["reason"], r["http_status"]) for r in records}
    assert summary == {tried: ("failed", 1, "alerts_removed", None), untried: ("failed", 0, "alerts_removed", None)}
    assert redis_client.xlen(account_key(org_id, "outbox")) == 0
    assert redis_client.hgetall(account_key(org_id, "outbox_attempts")) == {}
    assert redis_client.exists(account_key(org_id, "alerts")) == 0
    assert not redis_client.sismember("tm:alert_orgs", org_id)
    assert redis_client.exists("tm:alert_lock:" + org_id) == 0
    assert run(redis_server.url, lambda client: alerts.get_alerts(client, org_id)) is None

    assert deliver(redis_server.url, (60,)) == 0
    assert len(receiver.posts()) == 1  # nothing more was sent
    assert run(redis_server.url, lambda client: alerts.delete_alerts(client, org_id)) is False


def test_an_org_indexed_without_settings_has_its_outbox_dropped_not_sent(redis_server, redis_client):
    # A removal that stopped between its two writes leaves the organization indexed.
    org_id = make_org(redis_client)
    redis_client.sadd("tm:alert_orgs", org_id)
    delivery_id = raise_balance_alert(redis_client, org_id)

    assert deliver(redis_server.url) == 0
    [record] = run(redis_server.url, lambda client: alerts.deliveries(client, org_id))
    assert (record["delivery_id"], record["status"], record["reason"]) == (delivery_id, "failed", "alerts_removed")
    assert redis_client.xlen(account_key(org_id, "outbox")) == 0


def test_a_malformed_outbox_entry_is_dropped_without_a_post(redis_server, redis_client, receiver_factory):
    receiver = receiver_factory([], then=200)
    org_id = make_org(redis_client)
    configure(redis_server.url, org_id, receiver.url)
    redis_client.xadd(account_key(org_id, "outbox"), {"delivery_id": "dlv_x_unknown", "kind": "unknown"})
    good = raise_balance_alert(redis_client, org_id)

    assert deliver(redis_server.url) == 1
    assert [post.headers["x-tokenmart-delivery"] for post in receiver.posts()] == [good]
    records = run(redis_server.url, lambda client: alerts.deliveries(client, org_id))
    assert [(r["delivery_id"], r["status"], r["reason"]) for r in records] == [
        (good, "delivered", None),
        ("dlv_x_unknown", "failed", "malformed"),
    ]


# -- the settings store -----------------------------------------------------------------------------


def test_settings_are_stored_as_the_layout_says_and_shown_without_the_secret(redis_server, redis_client):
    org_id = make_org(redis_client)
    request = AlertSettingsRequest(url="https://hooks.example.com/tm", secret=SECRET, balance_below_usd=12.5)
    view = run(redis_server.url, lambda client: alerts.set_alerts(client, org_id, request))

    stored = redis_client.hgetall(account_key(org_id, "alerts"))
    seconds, _ = redis_client.time()
    assert 0 <= seconds - int(stored.pop("created_at")) < 60
    assert stored == {
        "url": "https://hooks.example.com/tm",
        "secret": SECRET,
        "balance_below_micros": "12500000",
        "cap_percent": "",
    }
    assert redis_client.sismember("tm:alert_orgs", org_id)
    shown = view.model_dump()
    assert SECRET not in json.dumps(shown)
    assert shown == {
        "object": "alert_settings",
        "org_id": org_id,
        "url": "https://hooks.example.com/tm",
        "secret_set": True,
        "balance_below_usd": 12.5,
        "cap_percent": None,
        "created_at": shown["created_at"],
    }
    assert run(redis_server.url, lambda client: alerts.get_alerts(client, org_id)) == view

    # Setting again replaces every field.
    request = AlertSettingsRequest(url="http://10.0.0.7:8080/a", secret=SECRET[::-1], cap_percent=90)
    view = run(redis_server.url, lambda client: alerts.set_alerts(client, org_id, request))
    assert (view.url, view.balance_below_usd, view.cap_percent) == ("http://10.0.0.7:8080/a", None, 90)
    stored = redis_client.hgetall(account_key(org_id, "alerts"))
    assert (stored["secret"], stored["balance_below_micros"], stored["cap_percent"]) == (SECRET[::-1], "", "90")


@pytest.mark.parametrize("org_id", ["org_" + "0" * 20, "org_{other}", "key_" + "1" * 20])
def test_settings_for_an_unknown_org_are_a_404(redis_server, redis_client, org_id):
    request = AlertSettingsRequest(url="https://hooks.example.com/tm", secret=SECRET, cap_percent=50)
    with pytest.raises(NotFound) as refused:
        run(redis_server.url, lambda client: alerts.set_alerts(client, org_id, request))
    assert (refused.value.status_code, refused.value.code, refused.value.param) == (404, "org_not_found", "id")
    with pytest.raises(NotFound):
        run(redis_server.url, lambda client: alerts.deliveries(client, org_id))
    assert run(redis_server.url, lambda client: alerts.get_alerts(client, org_id)) is None
    assert redis_client.keys("*") == []


def test_an_unreachable_redis_is_a_503_for_the_settings_store():
    url = f"redis://127.0.0.1:{free_port()}/0"
    request = AlertSettingsRequest(url="https://hooks.example.com/tm", secret=SECRET, cap_percent=50)
    org_id = "org_" + "a" * 20
    calls: list[Callable[[Any], Awaitable[Any]]] = [
        lambda client: alerts.set_alerts(client, org_id, request),
        lambda client: alerts.get_alerts(client, org_id),
        lambda client: alerts.delete_alerts(client, org_id),
        lambda client: alerts.deliveries(client, org_id),
    ]
    for call in calls:
        with pytest.raises(BillingUnavailable) as refused:
            run(url, call)
        assert (refused.value.status_code, refused.value.code) == (503, "billing_unavailable")
        assert refused.value.headers["retry-after"] == "2"


def test_run_forever_keeps_delivering_across_a_redis_outage(redis_server, redis_client, receiver_factory, caplog):
    caplog.set_level(logging.WARNING, logger="tokenmart.alerts")
    receiver = receiver_factory([], then=200)

    async def scenario(client: Any) -> None:
        deliverer = AlertDeliverer(client, backoff_s=NO_WAIT, poll_interval_s=0.05)
        task = asyncio.create_task(deliverer.run_forever())
        try:
            await asyncio.sleep(0.2)
            await asyncio.to_thread(redis_server.stop)
            await asyncio.sleep(0.3)  # several passes fail while Redis is gone
            assert not task.done()
            await asyncio.to_thread(redis_server.start)
            # The restarted Redis is empty (not durable): settings and an alert are written anew.
            org_id = await asyncio.to_thread(make_org, redis_client)
            await alerts.set_alerts(
                client, org_id, AlertSettingsRequest(url=receiver.url, secret=SECRET, cap_percent=5)
            )
            delivery_id = await asyncio.to_thread(raise_balance_alert, redis_client, org_id)
            for _ in range(250):
                if receiver.posts():
                    break
                await asyncio.sleep(0.02)
            assert [post.headers["x-tokenmart-delivery"] for post in receiver.posts()] == [delivery_id]
            assert not task.done()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await deliverer.aclose()

    run(redis_server.url, scenario)
    assert any("Redis is unavailable" in record.getMessage() for record in caplog.records)
