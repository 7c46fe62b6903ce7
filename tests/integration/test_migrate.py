"""`tokenmart migrate` on data the version before organizations wrote (tests/fixtures/layout1.json:
three keys created, billed, one revoked and one request still in flight, by that version's own
KeyStore and Meter), in a Redis database of its own on the real redis-server."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import redis

from tokenmart.deployments.billing import Admission, Meter
from tokenmart.deployments.errors import AuthenticationFailed
from tokenmart.deployments.keystore import SCHEMA_KEY, KeyStore, connect
from tokenmart.deployments.migrate import LEGACY_KEY_INDEX, legacy_org_id, migrate, schema_version
from tokenmart.deployments.reconcile import reconcile
from tokenmart.deployments.scripts import account_key
from tokenmart.deployments.usage import usage_report

from .conftest import TEST_CATALOG

pytestmark = pytest.mark.integration

FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "layout1.json").read_text())
DB = 7  # a database of its own: the other tests' data on this server is not layout 1


def load(client: redis.Redis) -> None:
    client.flushdb()
    for item in FIXTURE["redis"]:
        name, kind, value = item["name"], item["type"], item["value"]
        if kind == "hash":
            client.hset(name, mapping=value)
        elif kind == "set":
            client.sadd(name, *value)
        elif kind == "zset":
            client.zadd(name, dict(value))
        elif kind == "string":
            client.set(name, value)
        elif kind == "stream":
            for entry_id, fields in value:
                client.xadd(name, fields, id=entry_id)
        if item["pttl"] > 0:
            client.pexpire(name, item["pttl"])


def old(name: str) -> Any:
    return next(item["value"] for item in FIXTURE["redis"] if item["name"] == name)


@contextmanager
def layout1_database(redis_server, db: int) -> Iterator[redis.Redis]:
    """A database of the real server holding the fixture's data, emptied after."""
    client = redis.Redis(host="127.0.0.1", port=redis_server.port, db=db, decode_responses=True)
    load(client)
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def legacy(redis_server) -> Iterator[redis.Redis]:
    with layout1_database(redis_server, DB) as client:
        yield client


def url(redis_server) -> str:
    return f"redis://127.0.0.1:{redis_server.port}/{DB}"


def run(redis_server, scenario):
    async def main():
        client = connect(url(redis_server))
        try:
            return await scenario(KeyStore(client), Meter(client), client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def everything(client: redis.Redis) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in client.scan_iter("*"):
        kind = client.type(name)
        out[name] = {
            "hash": client.hgetall,
            "set": client.smembers,
            "string": client.get,
            "zset": lambda n: client.zrange(n, 0, -1, withscores=True),
            "stream": client.xrange,
        }[kind](name)
    return out


def test_migrated_keys_keep_their_secrets_credit_usage_and_ledger(redis_server, legacy):
    assert schema_version(legacy) == 1
    report = migrate(legacy)
    assert sorted(report.keys_migrated) == sorted(FIXTURE["secrets"])
    assert report.ledger_events == sum(len(old(account_key(k, "ledger"))) for k in FIXTURE["secrets"])
    assert schema_version(legacy) == 2 and legacy.get(SCHEMA_KEY) == "2"
    assert not legacy.exists(LEGACY_KEY_INDEX)
    assert not list(legacy.scan_iter(match="{acct:key_*"))  # nothing left in the old layout

    async def scenario(keys: KeyStore, _meter: Meter, client):
        seen = {}
        for key_id, secret in FIXTURE["secrets"].items():
            try:
                record, org = await keys.authenticate(f"Bearer {secret}")
            except AuthenticationFailed as exc:
                seen[key_id] = exc.code
                continue
            seen[key_id] = (record.id, org.id, org.balance_micros, org.hold_micros, org.spent_micros, record.name)
        usage = {
            key_id: (await usage_report(client, [legacy_org_id(key_id)], date(2000, 1, 1), date(2100, 1, 1), "model"))
            for key_id in FIXTURE["secrets"]
        }
        return seen, usage

    seen, usage = run(redis_server, scenario)
    for key_id in FIXTURE["secrets"]:
        record = old(account_key(key_id, "key"))
        if record["status"] == "revoked":
            assert seen[key_id] == "revoked_api_key"  # revoked stays revoked
            continue
        assert seen[key_id] == (
            key_id,
            legacy_org_id(key_id),
            int(record["balance_micros"]),
            int(record["hold_micros"]),
            int(record["spent_micros"]),
            record["name"],
        )
        # The same totals per model as the old counters.
        expected: Counter[str] = Counter()
        for name, value in old(account_key(key_id, "usage")).items():
            _, model, metric = name.split("|")
            expected[f"{model}|{metric}"] += int(value)
        got = {f"{row.model}|requests": row.requests for row in usage[key_id].data}
        got |= {f"{row.model}|prompt_tokens": row.prompt_tokens for row in usage[key_id].data}
        assert got == {k: v for k, v in expected.items() if k.endswith(("|requests", "|prompt_tokens"))}
        ledger = legacy.xrange(account_key(legacy_org_id(key_id), "ledger"))
        assert [entry_id for entry_id, _ in ledger] == [e for e, _ in old(account_key(key_id, "ledger"))]
        assert all(event["org_id"] == legacy_org_id(key_id) for _, event in ledger)


def test_the_request_in_flight_settles_after_the_migration_and_everything_reconciles(redis_server, legacy):
    migrate(legacy)
    flight = FIXTURE["in_flight"]
    listing = TEST_CATALOG.get(flight["model"])
    admission = Admission(
        billing_id=flight["billing_id"],
        org_id=legacy_org_id(flight["key_id"]),
        key_id=flight["key_id"],
        listing=listing,
        hold_micros=flight["hold_micros"],
        reserved_tokens=flight["reserved_tokens"],
        started_at_ms=flight["started_at_ms"],
    )

    async def scenario(keys: KeyStore, meter: Meter, client):
        settled = await meter.settle(admission, 12, 20, "completed")
        again = await meter.settle(admission, 12, 20, "completed")  # already settled: charged once
        scope = {org: [k] for k, org in (await keys.ids()).items()}
        return settled, again, await reconcile(client, scope), await keys.require_org(admission.org_id)

    settled, again, report, org = run(redis_server, scenario)
    assert settled.cost_micros == listing.cost_micros(12, 20) and again.duplicate
    assert report.ok, report.differences
    assert [o.org_id for o in report.orgs] == sorted(legacy_org_id(k) for k in FIXTURE["secrets"])
    assert org.hold_micros == 0
    before = old(account_key(flight["key_id"], "key"))
    assert org.spent_micros == int(before["spent_micros"]) + settled.cost_micros
    assert org.balance_micros + org.spent_micros == int(before["credited_micros"])


def test_a_migration_cut_off_part_way_finishes_when_run_again_and_a_finished_one_changes_nothing(
    redis_server, legacy, monkeypatch
):
    calls = {"n": 0}
    real_delete = legacy.delete

    def failing_delete(*names):
        calls["n"] += 1
        if calls["n"] == 2:  # the second key's old data, after its copy
            raise redis.ConnectionError("cut off")
        return real_delete(*names)

    monkeypatch.setattr(legacy, "delete", failing_delete)
    with pytest.raises(redis.ConnectionError):
        migrate(legacy)
    monkeypatch.setattr(legacy, "delete", real_delete)
    assert schema_version(legacy) == 1  # not marked done

    migrate(legacy)
    finished = everything(legacy)
    second = migrate(legacy)
    assert not second.keys_migrated and not second.changed
    assert everything(legacy) == finished

    # The same result as a migration that was never cut off.
    load(legacy)
    migrate(legacy)
    assert everything(legacy) == finished
