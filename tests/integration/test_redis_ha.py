"""Redis high availability: Sentinel failover under load, replica-confirmed key and credit
writes, and a Redis that is out of memory, each with real `redis-server` processes.

The paid path is the ingress's own (Gateway + Meter + KeyStore with `keystore.connect`'s
client settings); only the engine is a stand-in that answers at once, so Redis is the
only thing that fails. See docs/redis.md for what these guarantees do and do not cover.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
import redis
from starlette.requests import Request

from tokenmart.cluster.launcher import redis_ping
from tokenmart.deployments.billing import Meter
from tokenmart.deployments.errors import APIError, BillingUnavailable
from tokenmart.deployments.gateway import Gateway
from tokenmart.deployments.keystore import KeyStore, connect, key_key, org_key
from tokenmart.deployments.ray_llm import ChatCompletionRequest
from tokenmart.deployments.reconcile import reconcile
from tokenmart.deployments.redis_connection import (
    RedisURLError,
    ReplicaAck,
    SentinelTarget,
    check_eviction_policy,
    parse_sentinel_url,
    redacted,
    replica_ack,
)
from tokenmart.deployments.schemas import CreateKeyRequest, CreateOrgRequest, KeyRecord
from tokenmart.deployments.scripts import account_key
from tokenmart.deployments.spool import SettlementSpool

from ..sentinel import SentinelSet, data_node, running_sentinel_set
from .conftest import TEST_CATALOG

pytestmark = pytest.mark.integration

TIMEOUT_S = 1.0  # the ingress's default redis_timeout_s
WORKERS = 4
PROMPT_TOKENS, COMPLETION_TOKENS = 5, 7
BILLING_UNAVAILABLE = "The billing store is unavailable; the request was not served. Retry shortly."


@pytest.fixture
def sentinel_set() -> Iterator[SentinelSet]:
    with running_sentinel_set() as members:
        yield members


# -- URLs ----------------------------------------------------------------------------------
def test_a_sentinel_url_names_the_sentinels_the_service_the_database_and_both_passwords():
    url = (
        "redis+sentinel://:data%40pw@10.0.0.1:26379,sentinel-b,[::1]:26380/billing/2"
        "?sentinel_password=s3cret&socket_timeout=0.5&wait_timeout_ms=200"
    )

    target = parse_sentinel_url(url)

    assert target == SentinelTarget(
        sentinels=(("10.0.0.1", 26379), ("sentinel-b", 26379), ("::1", 26380)),
        service_name="billing",
        db=2,
        password="data@pw",
        sentinel_password="s3cret",
        socket_timeout=0.5,
        wait_timeout_ms=200,
    )
    assert target.replica_ack(TIMEOUT_S) == ReplicaAck(replicas=1, timeout_ms=200)
    assert replica_ack("redis+sentinel://h:26379/billing?wait_replicas=0") is None
    assert replica_ack("redis+sentinel://h:26379/billing") == ReplicaAck(replicas=1, timeout_ms=500)
    assert replica_ack("redis://h:6379/0") is None  # a plain server may have no replica to wait for


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel:///billing", "redis+sentinel:// URL names no Sentinel (host:port[,host:port...])"),
        ("redis+sentinel://h:26379", "redis+sentinel:// URL path must be /<service_name>[/<db>], not ''"),
        ("redis+sentinel://h:26379/a/0/x", "redis+sentinel:// URL path must be /<service_name>[/<db>], not '/a/0/x'"),
        ("redis+sentinel://h:26379/billing/zero", "db='zero' is not a number"),
        ("redis+sentinel://h:x/billing", "Sentinel address 'h:x' has a port that is not a number"),
        (
            "redis+sentinel://h/billing?password=x",
            "unknown option 'password' in the Sentinel URL; known: sentinel_password, sentinel_username, "
            "socket_timeout, socket_connect_timeout, wait_replicas, wait_timeout_ms",
        ),
        ("redis+sentinel://h/billing?wait_replicas=-1", "wait_replicas='-1' must not be negative"),
    ],
)
def test_a_bad_sentinel_url_is_refused_naming_the_part_that_is_wrong(url: str, message: str):
    with pytest.raises(RedisURLError) as refused:
        parse_sentinel_url(url)
    assert str(refused.value) == message


def test_a_wait_longer_than_the_socket_timeout_is_refused():
    with pytest.raises(RedisURLError) as refused:
        replica_ack("redis+sentinel://h/billing?wait_timeout_ms=1000", timeout_s=1.0)
    assert str(refused.value) == (
        "wait_timeout_ms=1000 must be shorter than the socket timeout (1 s): a WAIT that outlasts it would fail "
        "as a timeout"
    )


def test_passwords_are_hidden_where_urls_are_shown():
    assert redacted("redis+sentinel://:pw@a:26379,b:26379/billing/0?sentinel_password=spw&socket_timeout=1") == (
        "redis+sentinel://:***@a:26379,b:26379/billing/0?sentinel_password=***&socket_timeout=1"
    )
    assert redacted("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert redacted("redis://host:6379/0") == "redis://host:6379/0"


# -- the paid path, with an engine that answers at once ---------------------------------------
class _Reply:
    def __init__(self, request: dict) -> None:
        self.request = request
        self.sent = False

    def __aiter__(self) -> _Reply:
        return self

    async def __anext__(self) -> dict:
        if self.sent:
            raise StopAsyncIteration
        self.sent = True
        return {
            "id": self.request["request_id"],
            "object": "chat.completion",
            "model": self.request["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": COMPLETION_TOKENS,
                "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
            },
        }

    def cancel(self) -> None:
        pass


class _InstantHandle:
    def __init__(self) -> None:
        self.chat = self

    def options(self, **_: object) -> _InstantHandle:
        return self

    def remote(self, request: dict, raw: object) -> _Reply:
        return _Reply(request)


def _gateway(meter: Meter) -> Gateway:
    handles = {listing.id: _InstantHandle() for listing in TEST_CATALOG.listings}
    return Gateway(TEST_CATALOG, handles, meter, plain_requests=True)


def _request(key: str) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions",
                    "headers": [(b"authorization", f"Bearer {key}".encode())]})  # fmt: skip


def _body() -> ChatCompletionRequest:
    return ChatCompletionRequest(model="beta-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=16)


def _busy_key(name: str) -> CreateKeyRequest:
    """A key whose limits never refuse the load of these tests."""
    return CreateKeyRequest(name=name, credit_usd=Decimal(5), rpm=1_000_000, tpm=1_000_000_000, max_concurrency=100)


@dataclass(frozen=True)
class Answer:
    key_id: str
    started: float
    ended: float
    status: int
    code: str | None = None
    message: str | None = None
    response_id: str | None = None
    cost_micros: int = 0


async def _call(gateway: Gateway, key_id: str, key: str) -> Answer:
    started = time.monotonic()
    try:
        response = await gateway.handle(_body(), _request(key), method="chat")
    except APIError as exc:
        error = exc.body()["error"]
        return Answer(key_id, started, time.monotonic(), exc.status_code, exc.code, error["message"])
    payload = json.loads(response.body)
    cost = round(Decimal(str(payload["usage"]["cost"])) * 1_000_000)
    return Answer(key_id, started, time.monotonic(), response.status_code, response_id=payload["id"], cost_micros=cost)


async def _ledger_ids(redis, records: list[KeyRecord]) -> Counter[str]:
    ids: Counter[str] = Counter()
    for org_id in sorted({record.org_id for record in records}):
        for _, event in await redis.xrange(account_key(org_id, "ledger")):
            ids[event["request_id"]] += 1
    return ids


async def _books(keys: KeyStore, record: KeyRecord) -> tuple[int, int, int, int, int]:
    """(organization balance, hold, spent; the key's own hold, spent), in micro-USD."""
    key, org = await keys.with_org(await keys.require(record.id))
    return org.balance_micros, org.hold_micros, org.spent_micros, key.hold_micros, key.spent_micros


def test_the_primary_killed_under_load_gives_fast_503s_then_service_and_nothing_is_lost_or_billed_twice(
    sentinel_set: SentinelSet, tmp_path: Path
):
    """Four callers send paid requests through the gateway while the primary is SIGKILLed.
    Until Sentinel promotes the replica every request is refused fast with 503
    billing_unavailable; once it has, every request succeeds again. Settlements that could
    not reach Redis went to the spool and are replayed into the new primary. Then the ledger,
    the counters and the balances reconcile, nothing is on hold, and each 200 is in the
    ledger exactly once, at the cost its response showed."""

    async def scenario() -> None:
        redis = connect(sentinel_set.url, timeout_s=TIMEOUT_S)
        keys = KeyStore(redis, replica_ack=replica_ack(sentinel_set.url, timeout_s=TIMEOUT_S))
        created = [await keys.create(_busy_key(f"caller-{n}")) for n in range(WORKERS)]
        spool = SettlementSpool(tmp_path / "settlements.jsonl")
        gateway = _gateway(Meter(redis, spool=spool))
        answers: list[Answer] = []
        stop = asyncio.Event()

        async def caller(key_id: str, key: str) -> None:
            while not stop.is_set():
                answers.append(await _call(gateway, key_id, key))
                await asyncio.sleep(0.01)

        def served_since(moment: float) -> int:
            return sum(1 for a in answers if a.status == 200 and a.started >= moment)

        async def until(condition, timeout_s: float, what: str) -> None:
            deadline = time.monotonic() + timeout_s
            while not condition():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                await asyncio.sleep(0.05)

        callers = [asyncio.create_task(caller(record.id, key)) for record, key in created]
        try:
            await until(lambda: served_since(0) >= 40, 20, "requests before the kill")
            old_port = sentinel_set.primary_port()
            killed_at = time.monotonic()
            sentinel_set.kill_primary()
            new_port = await asyncio.to_thread(sentinel_set.wait_for_promotion, old_port)
            promoted_at = time.monotonic()
            await until(lambda: served_since(promoted_at) >= 40, 20, "requests after the promotion")
        finally:
            stop.set()
            await asyncio.gather(*callers)
        # Settlements spooled during the switch reach the new primary through the replay loop.
        await until(lambda: not spool.pending(), 15, "the spool to drain")
        if gateway._replayer is not None:
            gateway._replayer.cancel()

        assert new_port != old_port
        refused = [a for a in answers if a.status != 200]
        assert refused, "no request was refused while there was no primary"
        assert {(a.status, a.code, a.message) for a in refused} == {(503, "billing_unavailable", BILLING_UNAVAILABLE)}
        # Fast: one try and one retry on a fresh connection, each bounded by the Redis timeout.
        assert max(a.ended - a.started for a in refused) < 2 * TIMEOUT_S
        assert min(a.ended for a in refused) >= killed_at
        # Once one request got through the new primary, every later one did.
        back = min(a.started for a in answers if a.status == 200 and a.started > killed_at)
        assert all(a.status == 200 for a in answers if a.started > back)

        served = [a for a in answers if a.status == 200]
        records = [record for record, _ in created]
        ledger = await _ledger_ids(redis, records)
        assert set(ledger) == {a.response_id for a in served}
        assert set(ledger.values()) == {1}
        report = await reconcile(redis, {record.org_id: [record.id] for record in records})
        assert report.differences == []
        assert report.ok
        assert [(o.keys, o.in_flight, o.on_hold_usd) for o in report.orgs] == [(1, 0, 0.0)] * WORKERS
        for record in records:
            charged = sum(a.cost_micros for a in served if a.key_id == record.id)
            # Each caller's key has an organization of its own: its spend is the organization's.
            assert await _books(keys, record) == (5_000_000 - charged, 0, charged, 0, charged)
        await redis.aclose()

    asyncio.run(scenario())


def test_key_and_credit_writes_are_answered_once_a_replica_has_them(
    sentinel_set: SentinelSet, caplog: pytest.LogCaptureFixture
):
    """Behind Sentinel the admin writes wait (WAIT) for the replica: when they return, the
    replica holds the key and its credit, so a failover now cannot take them back. A stalled
    replica makes the write wait out its timeout and log it; the write itself stands."""

    async def scenario() -> None:
        redis = connect(sentinel_set.url, timeout_s=TIMEOUT_S)
        ack = replica_ack(sentinel_set.url, timeout_s=TIMEOUT_S)
        keys = KeyStore(redis, replica_ack=ack)
        replica = sentinel_set.replica.client()

        record, _ = await keys.create(_busy_key("confirmed"))
        # The organization, its credit, the key record and the secrets index entry all reached it.
        assert replica.hget(org_key(record.org_id), "credited_micros") == "5000000"
        assert replica.hget(key_key(record.org_id, record.id), "key_hash") == record.key_hash
        assert replica.get(f"tm:auth:{record.key_hash}") == f"{record.org_id} {record.id}"
        assert replica.hget("tm:key_orgs", record.id) == record.org_id
        await keys.add_credit(record.id, 250_000)
        assert replica.hget(org_key(record.org_id), "balance_micros") == "5250000"
        org = await keys.create_org(CreateOrgRequest(name="confirmed-org", credit_usd=Decimal(1)))
        assert replica.hget(org_key(org.id), "credited_micros") == "1000000"
        await keys.add_org_credit(org.id, 500_000)
        assert replica.hget(org_key(org.id), "balance_micros") == "1500000"
        rotated, _ = await keys.rotate(record.id, grace_s=60)
        assert replica.hget(key_key(record.org_id, record.id), "key_hash") == rotated.key_hash
        assert replica.get(f"tm:auth:{rotated.key_hash}") == f"{record.org_id} {record.id}"
        assert "replica(s) confirmed" not in caplog.text

        sentinel_set.replica.signal(signal.SIGSTOP)  # the replica takes nothing until SIGCONT
        try:
            started = time.monotonic()
            await keys.add_credit(record.id, 250_000)
            waited = time.monotonic() - started
        finally:
            sentinel_set.replica.signal(signal.SIGCONT)
        assert (await keys.require_org(record.org_id)).balance_micros == 5_500_000  # on the primary, answered
        assert waited >= ack.timeout_ms / 1000
        assert (
            f"250000 micro-USD credit to {record.id} is on the Redis primary but only 0 of 1 replica(s) confirmed "
            f"it within {ack.timeout_ms} ms; a failover before they catch up would lose it"
        ) in caplog.text
        await redis.aclose()

    with caplog.at_level(logging.WARNING, logger="tokenmart.keystore"):
        asyncio.run(scenario())
    # The CLI's own check (`tokenmart up` with REDIS_URL, `tokenmart status`) takes the same URL.
    assert redis_ping(sentinel_set.url)
    assert not redis_ping(sentinel_set.url.replace("/tokenmart/", "/no-such-service/"))


# -- maxmemory with noeviction --------------------------------------------------------------
@pytest.fixture
def tiny_redis() -> Iterator:
    """A redis-server with 4 MB of maxmemory that refuses writes rather than evict."""
    folder = Path(tempfile.mkdtemp(prefix="tokenmart-oom-"))
    server = data_node(folder, "--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _fill(direct: redis.Redis) -> None:
    """Write ballast until Redis refuses a write, then hold it there: a client's own buffers
    move used memory around the limit by kilobytes, so the limit is set 256 KB under what
    is used (still with noeviction) and every write is refused until the ballast goes."""
    for n in range(20_000):
        try:
            direct.set(f"ballast:{n}", "x" * 1024)
        except redis.exceptions.OutOfMemoryError as exc:
            assert str(exc) == "command not allowed when used memory > 'maxmemory'."
            direct.config_set("maxmemory", direct.info("memory")["used_memory"] - 256 * 1024)
            return
    pytest.fail("Redis never refused a write at its maxmemory")


def test_a_full_redis_refuses_with_503_and_bills_nothing_twice(tiny_redis, tmp_path: Path, caplog):
    """At maxmemory with noeviction, Redis refuses the admission script's writes: the request
    gets the fast 503 billing_unavailable and holds nothing; a settlement it refuses is
    spooled and charged exactly once when memory is freed; nothing was evicted."""
    url = f"redis://127.0.0.1:{tiny_redis.port}/0"
    direct = tiny_redis.client()

    async def scenario() -> None:
        redis = connect(url, timeout_s=TIMEOUT_S)
        assert await check_eviction_policy(redis) == "noeviction"
        keys = KeyStore(redis)
        record, key = await keys.create(_busy_key("full"))
        spool = SettlementSpool(tmp_path / "settlements.jsonl")
        meter = Meter(redis, spool=spool)
        listing = TEST_CATALOG.get("beta-chat")
        admitted = await meter.admit(record.key_hash, listing, PROMPT_TOKENS, 16)

        _fill(direct)

        answer = await _call(_gateway(meter), record.id, key)
        assert (answer.status, answer.code, answer.message) == (503, "billing_unavailable", BILLING_UNAVAILABLE)
        assert answer.ended - answer.started < TIMEOUT_S
        settlement = await meter.settle(admitted, PROMPT_TOKENS, COMPLETION_TOKENS, "completed")
        assert settlement.spooled
        with pytest.raises(BillingUnavailable):
            await keys.create(_busy_key("refused"))
        assert await keys.org_ids() == {record.org_id}  # nothing of the refused key was written
        hold = admitted.hold_micros
        # Only the first admission holds, at both levels.
        assert await _books(keys, record) == (5_000_000 - hold, hold, 0, hold, 0)

        assert await meter.replay_spool() == 0  # still full: the settlement stays spooled
        direct.delete(*direct.keys("ballast:*"))
        assert await meter.replay_spool() == 1
        assert await meter.replay_spool() == 0
        cost = listing.cost_micros(PROMPT_TOKENS, COMPLETION_TOKENS)
        assert await _books(keys, record) == (5_000_000 - cost, 0, cost, 0, cost)
        report = await reconcile(redis, {org_id: [key_id] for key_id, org_id in (await keys.ids()).items()})
        assert report.ok and [o.events for o in report.orgs] == [1]
        assert (await redis.info("stats"))["evicted_keys"] == 0
        await redis.aclose()

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert "Redis is out of memory and refuses writes (maxmemory reached, noeviction)" in caplog.text


def test_an_evicting_redis_is_reported_loudly_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    evicting = data_node(tmp_path / "lru", "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    locked = data_node(tmp_path / "managed", "--rename-command", "CONFIG", '""')
    try:

        async def scenario() -> tuple[str | None, str | None]:
            clients = [connect(f"redis://127.0.0.1:{server.port}/0") for server in (evicting, locked)]
            try:
                return tuple([await check_eviction_policy(client) for client in clients])
            finally:
                for client in clients:
                    await client.aclose()

        with caplog.at_level(logging.INFO, logger="tokenmart.redis"):
            policies = asyncio.run(scenario())
    finally:
        evicting.stop()
        locked.stop()
    assert policies == ("allkeys-lru", None)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        "Redis maxmemory-policy is 'allkeys-lru': under memory pressure Redis will EVICT API keys, balances and "
        "ledger entries. Set maxmemory-policy noeviction (writes are then refused with 503 instead)."
    ]
    assert "cannot read Redis's maxmemory-policy" in caplog.text  # a managed Redis without CONFIG: start anyway
