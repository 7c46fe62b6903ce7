"""KeyStore and Meter against a real redis-server (no Ray): what Redis holds and how it changes.

Credit lives on organizations (docs/accounts.md): every key draws on its organization's
balance, and keeps its own limits, holds, spend and optional spend cap.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from collections.abc import Awaitable, Callable
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, TypeVar

import httpx
import pytest
import redis
from fastapi import FastAPI
from pydantic import ValidationError

from tokenmart.deployments import auth
from tokenmart.deployments.billing import LEASE_MS, Meter
from tokenmart.deployments.errors import APIError, AuthenticationFailed, InsufficientCredit, install_error_handlers
from tokenmart.deployments.keystore import KeyStore, account_key, connect, key_key, org_key
from tokenmart.deployments.periods import cap_period_id
from tokenmart.deployments.schemas import CreateKeyRequest, CreateOrgRequest, KeyRecord, UpdateKeyRequest
from tokenmart.deployments.scripts import LUA_DIR
from tokenmart.deployments.usage import usage_report

from .conftest import TEST_CATALOG, free_port

pytestmark = pytest.mark.integration

T = TypeVar("T")

# The same listings the Ray-backed tests serve.
ALPHA = TEST_CATALOG.get("alpha-chat")
BETA = TEST_CATALOG.get("beta-chat")


def run(redis_url: str, scenario: Callable[[KeyStore, Meter], Awaitable[T]]) -> T:
    """Run one async scenario with a fresh asyncio Redis client on its own event loop."""

    async def main() -> T:
        client = connect(redis_url)
        try:
            return await scenario(KeyStore(client), Meter(client))
        finally:
            await client.aclose()

    return asyncio.run(main())


def redis_today(client: redis.Redis) -> date:
    """The settle script dates usage by Redis TIME (UTC), not by this process's clock."""
    seconds, _ = client.time()
    return datetime.fromtimestamp(seconds, tz=timezone.utc).date()


def org_of(client: redis.Redis, record: KeyRecord) -> dict[str, int]:
    """The money fields of a key's organization, as integers."""
    stored = client.hgetall(org_key(record.org_id))
    return {name: int(stored[name]) for name in ("balance_micros", "hold_micros", "spent_micros", "credited_micros")}


def key_of(client: redis.Redis, record: KeyRecord) -> dict[str, str]:
    return client.hgetall(key_key(record.org_id, record.id))


def dump_everything(client: redis.Redis) -> list[str]:
    """Every key name and every stored value, as text."""
    out: list[str] = []
    for name in client.scan_iter("*"):
        out.append(name)
        kind = client.type(name)
        if kind == "string":
            out.append(client.get(name) or "")
        elif kind == "hash":
            for field, value in client.hgetall(name).items():
                out += [field, value]
        elif kind == "set":
            out += list(client.smembers(name))
        elif kind == "zset":
            out += list(client.zrange(name, 0, -1))
        elif kind == "stream":
            for _, fields in client.xrange(name):
                for field, value in fields.items():
                    out += [field, value]
        else:
            pytest.fail(f"unexpected Redis type {kind} for {name}")
    return out


def test_created_key_is_stored_only_as_its_hash_and_display_prefix(redis_server, redis_client):
    record, key = run(redis_server.url, lambda keys, _: keys.create(CreateKeyRequest(name="alice", credit_usd=2)))

    assert auth.is_well_formed(key)
    key_hash = hashlib.sha256(key.encode()).hexdigest()
    stored = key_of(redis_client, record)
    assert stored["key_hash"] == key_hash
    assert stored["prefix"] == auth.display_prefix(key)
    assert (stored["id"], stored["org_id"], stored["status"]) == (record.id, record.org_id, "active")
    assert (stored["hold_micros"], stored["spent_micros"], stored["cap_micros"]) == ("0", "0", "")
    # Random ids: the key's id says nothing of its secret (and survives a rotation of it).
    assert re.fullmatch(r"key_[0-9a-f]{20}", record.id) and record.id != auth.legacy_key_id(key_hash)
    assert re.fullmatch(r"org_[0-9a-f]{20}", record.org_id)
    # Without org_id the key gets an organization of its own, named after it, holding the credit.
    org = redis_client.hgetall(org_key(record.org_id))
    assert (org["id"], org["name"]) == (record.org_id, "alice")
    assert (org["balance_micros"], org["hold_micros"], org["spent_micros"], org["credited_micros"]) == (
        "2000000",
        "0",
        "0",
        "2000000",
    )
    assert "balance_micros" not in stored
    assert redis_client.smembers("tm:orgs") == {record.org_id}
    assert redis_client.hgetall("tm:key_orgs") == {record.id: record.org_id}
    assert redis_client.get(f"tm:auth:{key_hash}") == f"{record.org_id} {record.id}"
    secret = key[len(auth.KEY_PREFIX) :]
    everything = dump_everything(redis_client)
    assert everything, "nothing was written"
    assert not [text for text in everything if key in text or secret in text]


def test_authenticate_accepts_the_live_key_and_rejects_other_keys(redis_server, redis_client):
    async def scenario(keys: KeyStore, _: Meter) -> None:
        record, key = await keys.create(CreateKeyRequest(name="bob", credit_usd=Decimal("0.5")))
        found, org = await keys.authenticate(f"Bearer {key}")
        assert (found.id, found.name, found.org_id) == (record.id, "bob", record.org_id)
        assert (org.id, org.name, org.balance_micros, org.credited_micros) == (record.org_id, "bob", 500_000, 500_000)

        with pytest.raises(AuthenticationFailed) as unknown:
            await keys.authenticate(f"Bearer {auth.generate_key()}")
        assert (unknown.value.status_code, unknown.value.code) == (401, "invalid_api_key")

        with pytest.raises(AuthenticationFailed) as missing:
            await keys.authenticate(None)
        assert missing.value.code == "missing_api_key"

    run(redis_server.url, scenario)


def test_revoked_key_is_refused_with_revoked_api_key(redis_server, redis_client):
    async def scenario(keys: KeyStore, _: Meter) -> None:
        record, key = await keys.create(CreateKeyRequest(name="carol", credit_usd=1))
        revoked = await keys.revoke(record.id)
        assert revoked.status == "revoked"
        with pytest.raises(AuthenticationFailed) as refused:
            await keys.authenticate(f"Bearer {key}")
        assert (refused.value.status_code, refused.value.code) == (401, "revoked_api_key")

    run(redis_server.url, scenario)


def test_expired_key_is_refused_and_unexpired_key_works(redis_server, redis_client):
    now = datetime.now(timezone.utc)

    async def scenario(keys: KeyStore, _: Meter) -> None:
        # Created already expired is refused; moving the expiry into the past expires a key now.
        old, expired = await keys.create(CreateKeyRequest(name="old", expires_at=now + timedelta(hours=1)))
        await keys.update(old.id, UpdateKeyRequest(expires_at=now - timedelta(minutes=1)))
        _, fresh = await keys.create(CreateKeyRequest(name="new", expires_at=now + timedelta(hours=1)))
        with pytest.raises(AuthenticationFailed) as refused:
            await keys.authenticate(f"Bearer {expired}")
        assert (refused.value.status_code, refused.value.code) == (401, "expired_api_key")
        assert (await keys.authenticate(f"Bearer {fresh}"))[0].name == "new"

    run(redis_server.url, scenario)


def test_add_credit_increases_the_organizations_balance_exactly(redis_server, redis_client):
    async def scenario(keys: KeyStore, _: Meter) -> tuple[Any, Any]:
        record, _ = await keys.create(CreateKeyRequest(name="dave", credit_usd=Decimal("0.000001")))
        through_key = await keys.add_credit(record.id, 2_500_000)
        assert through_key.id == record.id
        direct = await keys.add_org_credit(record.org_id, 1)
        return record, direct

    record, org = run(redis_server.url, scenario)
    assert (org.balance_micros, org.credited_micros) == (2_500_002, 2_500_002)
    assert org_of(redis_client, record) == {
        "balance_micros": 2_500_002,
        "hold_micros": 0,
        "spent_micros": 0,
        "credited_micros": 2_500_002,
    }


def test_update_changes_limits_and_models_but_never_the_spend_counters(redis_server, redis_client):
    async def scenario(keys: KeyStore, meter: Meter) -> tuple[Any, Any, Any]:
        record, _ = await keys.create(CreateKeyRequest(name="erin", credit_usd=1, spend_cap_usd=5))
        await meter.settle(await meter.admit(record.key_hash, ALPHA, 100, 50), 100, 50, "completed")
        before = await keys.require(record.id)
        # A settlement landing while the admin edits the key must not be overwritten.
        redis_client.hincrby(key_key(record.org_id, record.id), "spent_micros", 7)
        redis_client.hincrby(key_key(record.org_id, record.id), "period_spent_micros", 7)
        after = await keys.update(record.id, UpdateKeyRequest(name="erin2", rpm=60, models=["alpha-chat"]))
        return record, before, after

    record, before, after = run(redis_server.url, scenario)
    cost = ALPHA.cost_micros(100, 50)
    assert (after.name, after.limits.rpm, after.models) == ("erin2", 60, ["alpha-chat"])
    assert after.limits.tpm is None
    assert (before.spent_micros, before.period_spent_micros) == (cost, cost)
    assert (after.spent_micros, after.period_spent_micros) == (cost + 7, cost + 7)
    assert after.hold_micros == before.hold_micros == 0
    assert (after.cap_micros, after.period_id) == (5_000_000, before.period_id)
    assert org_of(redis_client, record)["balance_micros"] == 1_000_000 - cost


def test_admit_refuses_a_key_without_credit(redis_server, redis_client):
    async def scenario(keys: KeyStore, meter: Meter) -> None:
        record, _ = await keys.create(CreateKeyRequest(name="broke", credit_usd=0))
        with pytest.raises(InsufficientCredit) as refused:
            await meter.admit(record.key_hash, ALPHA, 20, 40)
        assert (refused.value.status_code, refused.value.code) == (402, "insufficient_quota")

    run(redis_server.url, scenario)


def test_admission_authenticates_the_key_in_the_same_call(redis_server, redis_client):
    async def scenario(keys: KeyStore, meter: Meter) -> dict[str, tuple[int, str]]:
        live, _ = await keys.create(CreateKeyRequest(name="gina", credit_usd=1))
        revoked, _ = await keys.create(CreateKeyRequest(name="gina-revoked", credit_usd=1))
        await keys.revoke(revoked.id)
        expired, _ = await keys.create(CreateKeyRequest(name="gina-expired", credit_usd=1))
        expired = await keys.update(expired.id, UpdateKeyRequest(expires_at=datetime(2020, 1, 1, tzinfo=timezone.utc)))
        narrow, _ = await keys.create(CreateKeyRequest(name="gina-narrow", credit_usd=1, models=["beta-chat"]))
        # A secret the index maps to the live key that is not (or no longer) its secret.
        redis_client.set(f"tm:auth:{'0' * 64}", f"{live.org_id} {live.id}")
        attempts = {
            "unknown": "f" * 64,
            "not its secret": "0" * 64,
            "revoked": revoked.key_hash,
            "expired": expired.key_hash,
            "model": narrow.key_hash,
        }
        outcomes = {}
        for name, key_hash in attempts.items():
            with pytest.raises(APIError) as refused:
                await meter.admit(key_hash, ALPHA, 20, 40)
            outcomes[name] = (refused.value.status_code, refused.value.code)
        await meter.admit(narrow.key_hash, BETA, 20, 40)  # its allowed model is admitted
        return outcomes

    assert run(redis_server.url, scenario) == {
        "unknown": (401, "invalid_api_key"),
        "not its secret": (401, "rotated_api_key"),
        "revoked": (401, "revoked_api_key"),
        "expired": (401, "expired_api_key"),
        "model": (403, "model_not_allowed"),
    }


def test_a_keys_own_limits_override_the_operator_defaults(redis_server, redis_client):
    async def scenario(keys: KeyStore, meter: Meter) -> tuple[Any, Any, Any]:
        own, _ = await keys.create(CreateKeyRequest(name="hana", credit_usd=1, rpm=7, tpm=900, max_concurrency=3))
        default, _ = await keys.create(CreateKeyRequest(name="hana-default", credit_usd=1))
        first = await meter.admit(own.key_hash, ALPHA, 20, 40)
        second = await meter.admit(default.key_hash, ALPHA, 20, 40)
        return first.limits, second.limits, await meter.current_state(own.key_hash)

    own, default, peeked = run(redis_server.url, scenario)
    assert (own.rpm, own.tpm, own.max_concurrency) == (7, 900, 3)
    assert (own.rpm_remaining, own.tpm_remaining) == (6, 900 - 60)
    assert (default.rpm, default.tpm, default.max_concurrency) == (600, 1_000_000, 64)
    # Reading the state consumes nothing: the same figures (give or take the refill since).
    assert (peeked.rpm, peeked.tpm) == (7, 900)
    assert peeked.rpm_remaining == 6 and 840 <= peeked.tpm_remaining <= 900


def test_settle_is_idempotent_per_billing_id(redis_server, redis_client):
    async def scenario(keys: KeyStore, meter: Meter) -> tuple[Any, Any, KeyRecord]:
        record, _ = await keys.create(CreateKeyRequest(name="frank", credit_usd=1))
        admission = await meter.admit(record.key_hash, BETA, 20, 40)
        assert (admission.org_id, admission.key_id) == (record.org_id, record.id)
        first = await meter.settle(admission, 10, 20, "completed")
        second = await meter.settle(admission, 10, 20, "completed")
        return first, second, record

    first, second, record = run(redis_server.url, scenario)
    cost = BETA.cost_micros(10, 20)
    assert cost == 225
    assert (first.duplicate, first.cost_micros, first.balance_micros) == (False, cost, 1_000_000 - cost)
    assert second.duplicate is True
    assert second.balance_micros == 1_000_000 - cost
    assert org_of(redis_client, record) == {
        "balance_micros": 1_000_000 - cost,
        "hold_micros": 0,
        "spent_micros": cost,
        "credited_micros": 1_000_000,
    }
    stored = key_of(redis_client, record)
    assert (stored["spent_micros"], stored["hold_micros"]) == (str(cost), "0")
    assert redis_client.xlen(account_key(record.org_id, "ledger")) == 1
    today = redis_today(redis_client).isoformat()
    assert redis_client.hget(account_key(record.org_id, "usage"), f"{today}|{record.id}|beta-chat|requests") == "1"


def test_settle_writes_daily_model_counters_and_a_ledger_event(redis_server, redis_client):
    async def scenario(keys: KeyStore, meter: Meter) -> tuple[KeyRecord, str]:
        record, _ = await keys.create(CreateKeyRequest(name="grace", credit_usd=1))
        completed = await meter.admit(record.key_hash, ALPHA, 20, 40)
        await meter.settle(completed, 7, 3, "completed")
        aborted = await meter.admit(record.key_hash, ALPHA, 20, 40)
        await meter.settle(aborted, 5, 2, "aborted")
        return record, completed.billing_id

    record, billing_id = run(redis_server.url, scenario)
    key_id = record.id
    today = redis_today(redis_client).isoformat()
    cost = ALPHA.cost_micros(7, 3) + ALPHA.cost_micros(5, 2)
    assert redis_client.hgetall(account_key(record.org_id, "usage")) == {
        f"{today}|{key_id}|alpha-chat|requests": "2",
        f"{today}|{key_id}|alpha-chat|prompt_tokens": "12",
        f"{today}|{key_id}|alpha-chat|completion_tokens": "5",
        f"{today}|{key_id}|alpha-chat|cost_micros": str(cost),
    }
    events = [fields for _, fields in redis_client.xrange(account_key(record.org_id, "ledger"))]
    assert [e["status"] for e in events] == ["completed", "aborted"]
    first = events[0]
    assert first["request_id"] == billing_id
    assert (first["org_id"], first["key_id"], first["model"], first["day"]) == (
        record.org_id,
        key_id,
        "alpha-chat",
        today,
    )
    assert (first["prompt_tokens"], first["completion_tokens"]) == ("7", "3")
    assert first["cost_micros"] == str(ALPHA.cost_micros(7, 3))
    assert int(first["settled_at_ms"]) >= int(first["started_at_ms"]) - 5_000


def test_usage_report_groups_by_model_day_and_key_within_the_date_range(redis_server, redis_client):
    async def settle_today(keys: KeyStore, meter: Meter) -> tuple[KeyRecord, KeyRecord]:
        record, _ = await keys.create(CreateKeyRequest(name="heidi", credit_usd=1))
        other, _ = await keys.create(CreateKeyRequest(name="heidi-batch", org_id=record.org_id))
        await meter.settle(await meter.admit(record.key_hash, ALPHA, 20, 40), 10, 4, "completed")
        await meter.settle(await meter.admit(record.key_hash, BETA, 20, 40), 6, 2, "completed")
        await meter.settle(await meter.admit(other.key_hash, BETA, 20, 40), 4, 2, "completed")
        return record, other

    record, other = run(redis_server.url, settle_today)
    org_id, key_id = record.org_id, record.id
    today = redis_today(redis_client)
    # An older day, written in the documented counter layout, to test the range filter.
    old_day = today - timedelta(days=40)
    redis_client.hset(
        account_key(org_id, "usage"),
        mapping={
            f"{old_day.isoformat()}|{key_id}|alpha-chat|requests": 3,
            f"{old_day.isoformat()}|{key_id}|alpha-chat|prompt_tokens": 30,
            f"{old_day.isoformat()}|{key_id}|alpha-chat|completion_tokens": 9,
            f"{old_day.isoformat()}|{key_id}|alpha-chat|cost_micros": 11,
        },
    )

    def report(start: date, end: date, group_by: str, only: str | None = None):
        return run(
            redis_server.url,
            lambda _, meter: usage_report(meter.redis, [org_id], start, end, group_by, key_id=only),  # type: ignore[arg-type]
        )

    alpha_cost = ALPHA.cost_micros(10, 4)
    own_beta, other_beta = BETA.cost_micros(6, 2), BETA.cost_micros(4, 2)
    beta_cost = own_beta + other_beta

    by_model = report(today, today, "model")
    assert (by_model.org_id, by_model.key_id) == (org_id, None)
    assert [(r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in by_model.data] == [
        ("alpha-chat", 1, 10, 4),
        ("beta-chat", 2, 10, 4),
    ]
    assert [round(r.cost_usd * 1_000_000) for r in by_model.data] == [alpha_cost, beta_cost]
    assert (by_model.total.requests, by_model.total.total_tokens) == (3, 28)
    assert round(by_model.total.cost_usd * 1_000_000) == alpha_cost + beta_cost

    by_key = report(today, today, "key")
    assert [(r.key_id, r.requests, r.prompt_tokens) for r in by_key.data] == sorted([(key_id, 2, 16), (other.id, 1, 4)])
    assert {r.key_id: round(r.cost_usd * 1_000_000) for r in by_key.data} == {
        key_id: alpha_cost + own_beta,
        other.id: other_beta,
    }

    by_org = report(old_day, today, "org")
    assert [(r.org_id, r.requests) for r in by_org.data] == [(org_id, 6)]
    assert round(by_org.total.cost_usd * 1_000_000) == 11 + alpha_cost + beta_cost

    one_key = report(today, today, "model", only=other.id)
    assert one_key.key_id == other.id
    assert [(r.model, r.requests, r.prompt_tokens) for r in one_key.data] == [("beta-chat", 1, 4)]

    by_day = report(old_day, today, "day")
    assert [(r.date, r.requests, r.prompt_tokens) for r in by_day.data] == [
        (old_day.isoformat(), 3, 30),
        (today.isoformat(), 3, 20),
    ]
    assert round(by_day.total.cost_usd * 1_000_000) == 11 + alpha_cost + beta_cost

    only_old = report(old_day, old_day, "model")
    assert [(r.model, r.requests) for r in only_old.data] == [("alpha-chat", 3)]

    nothing = report(today - timedelta(days=10), today - timedelta(days=1), "day")
    assert nothing.data == []
    assert (nothing.total.requests, nothing.total.cost_usd) == (0, 0.0)


def test_admission_holds_the_worst_case_and_settlement_refunds_the_rest(redis_server, redis_client):
    async def scenario(keys: KeyStore, meter: Meter) -> tuple[Any, ...]:
        record, _ = await keys.create(CreateKeyRequest(name="hana", credit_usd=1))
        admission = await meter.admit(record.key_hash, BETA, 100, 400)
        during = org_of(redis_client, record), key_of(redis_client, record)
        holds = redis_client.hgetall(account_key(record.org_id, "holds"))
        settlement = await meter.settle(admission, 60, 30, "completed")
        after = org_of(redis_client, record), key_of(redis_client, record)
        return admission, during, holds, after, settlement

    admission, (org_during, key_during), holds, (org_after, key_after), settlement = run(redis_server.url, scenario)
    hold = BETA.cost_micros(100, 400)
    assert admission.hold_micros == hold and admission.reserved_tokens == 500
    assert (org_during["balance_micros"], org_during["hold_micros"]) == (1_000_000 - hold, hold)
    assert int(key_during["hold_micros"]) == hold  # the key's share of its organization's holds
    assert holds == {admission.billing_id: str(hold)}
    cost = BETA.cost_micros(60, 30)
    assert settlement.cost_micros == cost
    assert (org_after["balance_micros"], org_after["hold_micros"], org_after["spent_micros"]) == (
        1_000_000 - cost,
        0,
        cost,
    )
    assert (key_after["hold_micros"], key_after["spent_micros"]) == ("0", str(cost))


def test_a_lapsed_lease_gives_its_hold_back_and_a_late_settlement_charges_only_the_cost(redis_server, redis_client):
    async def scenario(keys: KeyStore, meter: Meter) -> tuple[Any, ...]:
        record, _ = await keys.create(CreateKeyRequest(name="ines", credit_usd=1, max_concurrency=1))
        seconds, _ = await meter.redis.time()
        now = seconds * 1000
        lost = await meter.admit(record.key_hash, BETA, 100, 400, now_ms=now)  # its ingress "dies"
        with pytest.raises(APIError) as busy:
            await meter.admit(record.key_hash, BETA, 10, 10, now_ms=now + 1000)
        later = await meter.admit(record.key_hash, BETA, 10, 10, now_ms=now + LEASE_MS + 1)
        during = org_of(redis_client, record), await keys.require(record.id)
        late = await meter.settle(lost, 100, 5, "completed")
        await meter.settle(later, 10, 10, "completed")
        return later, busy.value, during, late, (org_of(redis_client, record), await keys.require(record.id))

    later, busy, (org_during, key_during), late, (org_after, key_after) = run(redis_server.url, scenario)
    assert (busy.status_code, busy.code) == (429, "concurrency_limit_exceeded")
    # Only the live admission holds credit once the lost one's lease lapsed, at both levels.
    assert (org_during["balance_micros"], org_during["hold_micros"]) == (
        1_000_000 - later.hold_micros,
        later.hold_micros,
    )
    assert key_during.hold_micros == later.hold_micros
    assert late.cost_micros == BETA.cost_micros(100, 5)
    spent = BETA.cost_micros(100, 5) + BETA.cost_micros(10, 10)
    assert (org_after["balance_micros"], org_after["hold_micros"], org_after["spent_micros"]) == (
        1_000_000 - spent,
        0,
        spent,
    )
    assert (key_after.hold_micros, key_after.spent_micros) == (0, spent)


def test_a_hold_larger_than_the_balance_is_refused_with_402(redis_server, redis_client):
    async def scenario(keys: KeyStore, meter: Meter) -> None:
        record, _ = await keys.create(CreateKeyRequest(name="ivan", credit_usd=0.000100))
        with pytest.raises(InsufficientCredit) as refused:
            await meter.admit(record.key_hash, BETA, 10, 100)  # up to 1025 micro-USD
        assert refused.value.status_code == 402
        assert refused.value.headers["x-ratelimit-limit-requests"]

    run(redis_server.url, scenario)


def test_settlement_during_a_redis_outage_is_spooled_and_replayed_once(redis_server, redis_client, tmp_path):
    from tokenmart.deployments.spool import SettlementSpool

    spool = SettlementSpool(tmp_path / "spool.jsonl")

    async def scenario() -> tuple[Any, Any, int, int, str]:
        client = connect(redis_server.url, timeout_s=0.3)
        keys, meter = KeyStore(client), Meter(client, spool=spool)
        record, _ = await keys.create(CreateKeyRequest(name="outage", credit_usd=1))
        admission = await meter.admit(record.key_hash, BETA, 20, 40)
        # Redis stops answering for 1.5 s: the settlement times out (its command may still run
        # later, which is the "reply lost" case) and goes to the spool.
        redis_client.execute_command("CLIENT", "PAUSE", 1500, "ALL")
        during = await meter.settle(admission, 12, 8, "completed")
        assert during.spooled and len(spool.pending()) == 1
        await asyncio.sleep(1.7)
        first = await meter.replay_spool()
        again = await meter.replay_spool()
        await client.aclose()
        return during, record, first, again, admission.billing_id

    during, record, first, again, billing_id = asyncio.run(scenario())
    cost = BETA.cost_micros(12, 8)
    assert during.cost_micros == cost
    assert (first, again, spool.pending()) == (1, 0, [])
    assert org_of(redis_client, record) == {
        "balance_micros": 1_000_000 - cost,
        "hold_micros": 0,
        "spent_micros": cost,
        "credited_micros": 1_000_000,
    }
    assert (key_of(redis_client, record)["hold_micros"], key_of(redis_client, record)["spent_micros"]) == (
        "0",
        str(cost),
    )
    ledger = redis_client.xrange(account_key(record.org_id, "ledger"))
    assert [fields["request_id"] for _, fields in ledger] == [billing_id]


def test_the_spool_of_a_stopped_ingress_is_adopted_but_a_live_ones_is_not(redis_server, redis_client, tmp_path):
    from tokenmart.deployments.spool import SettlementSpool

    dead_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: every settlement spools

    async def scenario() -> tuple[list[str], list[str], int, list[str], list[str]]:
        client = connect(redis_server.url)
        keys, meter = KeyStore(client), Meter(client, spool=SettlementSpool(tmp_path / "settlements-333.jsonl"))
        record, _ = await keys.create(CreateKeyRequest(name="orphans", credit_usd=1))
        stopped, running = (
            SettlementSpool(tmp_path / "settlements-111.jsonl"),
            SettlementSpool(tmp_path / "settlements-222.jsonl"),
        )
        ids = []
        for spool in (stopped, running):
            admission = await meter.admit(record.key_hash, ALPHA, 20, 40)
            offline = connect(dead_url, timeout_s=0.3)
            assert (await Meter(offline, spool=spool).settle(admission, 10, 5, "completed")).spooled
            await offline.aclose()
            ids.append(admission.billing_id)
        stopped.release()  # its process exits; `running` keeps its owner lock

        first = await meter.replay_spool()
        ledger_after_first = [f["request_id"] for _, f in await client.xrange(account_key(record.org_id, "ledger"))]
        files_after_first = sorted(p.name for p in tmp_path.iterdir())
        running.release()
        second = await meter.replay_spool()
        ledger = [f["request_id"] for _, f in await client.xrange(account_key(record.org_id, "ledger"))]
        await client.aclose()
        assert (first, second) == (1, 1)
        return ids, ledger_after_first, files_after_first, ledger, sorted(p.name for p in tmp_path.iterdir())

    ids, ledger_after_first, files_after_first, ledger, files = asyncio.run(scenario())
    assert ledger_after_first == ids[:1]
    assert files_after_first == ["settlements-222.jsonl", "settlements-222.lock"]
    assert ledger == ids and files == []


# -- revocation is final, and key changes are atomic -------------------------------------------------


def test_a_revoked_key_cannot_be_reactivated_and_the_refused_patch_writes_nothing(redis_server, redis_client):
    async def scenario(keys: KeyStore, _: Meter) -> tuple[APIError, dict[str, str], dict[str, str]]:
        record, _ = await keys.create(CreateKeyRequest(name="frozen", credit_usd=1, rpm=10))
        await keys.revoke(record.id)
        before = key_of(redis_client, record)
        with pytest.raises(APIError) as refused:
            await keys.update(record.id, UpdateKeyRequest(status="active", name="thawed", rpm=99))
        return refused.value, before, key_of(redis_client, record)

    refused, before, after = run(redis_server.url, scenario)
    assert (refused.status_code, refused.code, refused.param) == (409, "key_revoked", "status")
    assert after == before  # neither the status nor the name and limits sent with it
    assert after["status"] == "revoked" and after["name"] == "frozen"


def test_a_revoked_key_may_still_be_renamed_and_revoked_again(redis_server, redis_client):
    async def scenario(keys: KeyStore, _: Meter) -> tuple[Any, Any]:
        record, _ = await keys.create(CreateKeyRequest(name="old-name", credit_usd=1))
        await keys.revoke(record.id)
        renamed = await keys.update(record.id, UpdateKeyRequest(name="archived", status="revoked"))
        return renamed, await keys.revoke(record.id)

    renamed, again = run(redis_server.url, scenario)
    assert (renamed.name, renamed.status) == ("archived", "revoked")
    assert (again.name, again.status) == ("archived", "revoked")


def test_credit_through_a_revoked_key_is_refused_and_changes_no_balance(redis_server, redis_client):
    async def scenario(keys: KeyStore, _: Meter) -> tuple[APIError, KeyRecord, Any]:
        record, _ = await keys.create(CreateKeyRequest(name="gone", credit_usd=Decimal("0.25")))
        await keys.revoke(record.id)
        with pytest.raises(APIError) as refused:
            await keys.add_credit(record.id, 5_000_000)
        before_direct = await keys.require_org(record.org_id)
        # The organization itself may still be credited.
        after_direct = await keys.add_org_credit(record.org_id, 1_000_000)
        return refused.value, record, (before_direct, after_direct)

    refused, record, (before, after) = run(redis_server.url, scenario)
    assert (refused.status_code, refused.code, refused.param) == (409, "key_revoked", "id")
    assert record.org_id in refused.message  # it says where credit can go instead
    assert (before.balance_micros, before.credited_micros) == (250_000, 250_000)
    assert (after.balance_micros, after.credited_micros) == (1_250_000, 1_250_000)


def test_changes_to_an_unknown_key_are_404_and_write_nothing(redis_server, redis_client):
    missing = "key_" + "e" * 20

    async def scenario(keys: KeyStore, _: Meter) -> list[tuple[int, str | None]]:
        outcomes = []
        for change in (
            keys.update(missing, UpdateKeyRequest(name="ghost")),
            keys.revoke(missing),
            keys.add_credit(missing, 1),
            keys.rotate(missing, 60),
        ):
            with pytest.raises(APIError) as refused:
                await change
            outcomes.append((refused.value.status_code, refused.value.code))
        return outcomes

    assert run(redis_server.url, scenario) == [(404, "key_not_found")] * 4
    assert redis_client.keys("*") == []


def test_a_reactivation_racing_a_revocation_never_revives_the_key(redis_server, redis_client):
    """Each round starts a revocation and a reactivation together; the key always ends revoked.

    Interleaved, a check-then-write update reads 'active' before the revocation lands and then
    writes 'active' over it; the script checks and writes in one step.
    """

    async def scenario(keys: KeyStore, _: Meter) -> list[tuple[str, str]]:
        rounds = []
        for _round in range(20):
            record, _ = await keys.create(CreateKeyRequest(name="contested", credit_usd=1))
            revoked, reactivated = await asyncio.gather(
                keys.revoke(record.id),
                keys.update(record.id, UpdateKeyRequest(status="active")),
                return_exceptions=True,
            )
            assert not isinstance(revoked, BaseException), revoked
            if isinstance(reactivated, BaseException):
                assert isinstance(reactivated, APIError) and reactivated.code == "key_revoked", reactivated
            rounds.append(((await keys.require(record.id)).status, type(reactivated).__name__))
        return rounds

    rounds = run(redis_server.url, scenario)
    assert {status for status, _ in rounds} == {"revoked"}, rounds


def test_concurrent_patches_of_different_limits_both_take_effect(redis_server, redis_client):
    async def scenario(keys: KeyStore, _: Meter) -> list[Any]:
        results = []
        for _round in range(10):
            record, _ = await keys.create(CreateKeyRequest(name="tuned", credit_usd=1, max_concurrency=3))
            await asyncio.gather(
                keys.update(record.id, UpdateKeyRequest(rpm=5)),
                keys.update(record.id, UpdateKeyRequest(tpm=500)),
                keys.update(record.id, UpdateKeyRequest(max_tokens_per_request=64)),
            )
            results.append((await keys.require(record.id)).limits)
        return results

    for limits in run(redis_server.url, scenario):
        assert limits.model_dump() == {"rpm": 5, "tpm": 500, "max_concurrency": 3, "max_tokens_per_request": 64}


def test_patch_null_puts_a_limit_back_to_the_default_and_keeps_the_others(redis_server, redis_client):
    async def scenario(keys: KeyStore, _: Meter) -> Any:
        record, _ = await keys.create(CreateKeyRequest(name="reset", credit_usd=1, rpm=7, tpm=700))
        return await keys.update(record.id, UpdateKeyRequest.model_validate({"rpm": None}))

    updated = run(redis_server.url, scenario)
    assert (updated.limits.rpm, updated.limits.tpm) == (None, 700)


# -- rotation ------------------------------------------------------------------------------------


def test_a_rotated_key_answers_to_its_new_secret_and_to_the_old_one_only_within_the_grace(redis_server, redis_client):
    async def scenario(keys: KeyStore, meter: Meter) -> dict[str, Any]:
        record, old = await keys.create(CreateKeyRequest(name="rolling", credit_usd=1, rpm=4))
        # Usage and rate-limit state from before the rotation.
        await meter.settle(await meter.admit(record.key_hash, ALPHA, 20, 40), 10, 5, "completed")
        await meter.admit(record.key_hash, ALPHA, 20, 40)
        seconds, _ = await meter.redis.time()
        rotated, new = await keys.rotate(record.id, grace_s=3600)
        outcomes: dict[str, Any] = {"record": record, "rotated": rotated, "new": new, "old": old}
        outcomes["auth new"] = (await keys.authenticate(f"Bearer {new}"))[0].id
        outcomes["auth old"] = (await keys.authenticate(f"Bearer {old}"))[0].id
        # The key's requests-per-minute bucket is the key's, whichever secret is sent: 4 a minute.
        third = await meter.admit(auth.hash_key(new), ALPHA, 20, 40)
        fourth = await meter.admit(auth.hash_key(old), ALPHA, 20, 40)
        with pytest.raises(APIError) as limited:
            await meter.admit(auth.hash_key(new), ALPHA, 20, 40)
        outcomes["limited"] = (limited.value.status_code, limited.value.code)
        outcomes["ids"] = {(third.org_id, third.key_id), (fourth.org_id, fourth.key_id)}
        # Past the grace (an admission at a later instant): the old secret is refused, the new works.
        past_grace = rotated.prev_valid_until_ms
        with pytest.raises(AuthenticationFailed) as refused:
            await meter.admit(auth.hash_key(old), ALPHA, 20, 40, now_ms=past_grace)
        outcomes["old past grace"] = (refused.value.status_code, refused.value.code, refused.value.message)
        outcomes["new past grace"] = (await meter.admit(auth.hash_key(new), ALPHA, 20, 40, now_ms=past_grace)).key_id
        outcomes["grace from"] = seconds * 1000
        outcomes["after"] = await keys.require(record.id)
        return outcomes

    out = run(redis_server.url, scenario)
    record, rotated, new, old = out["record"], out["rotated"], out["new"], out["old"]
    assert auth.is_well_formed(new) and new != old
    # Same key: id, organization, limits; a new secret and display prefix.
    assert (rotated.id, rotated.org_id, rotated.limits.rpm) == (record.id, record.org_id, 4)
    assert (rotated.key_hash, rotated.prefix) == (auth.hash_key(new), auth.display_prefix(new))
    assert rotated.prev_key_hash == auth.hash_key(old)
    assert 0 <= rotated.prev_valid_until_ms - out["grace from"] - 3_600_000 < 5_000
    assert redis_client.get(f"tm:auth:{auth.hash_key(new)}") == f"{record.org_id} {record.id}"
    assert out["auth new"] == out["auth old"] == record.id
    assert out["limited"] == (429, "rate_limit_exceeded")
    assert out["ids"] == {(record.org_id, record.id)}
    assert out["old past grace"] == (401, "rotated_api_key", "This API key's secret was rotated; use its new secret.")
    assert out["new past grace"] == record.id
    # The spend and usage from before the rotation stay the key's.
    cost = ALPHA.cost_micros(10, 5)
    assert out["after"].spent_micros == cost
    today = redis_today(redis_client).isoformat()
    assert redis_client.hget(account_key(record.org_id, "usage"), f"{today}|{record.id}|alpha-chat|cost_micros") == str(
        cost
    )
    # Neither secret is stored anywhere, only their hashes.
    secrets = (old, new, old[len(auth.KEY_PREFIX) :], new[len(auth.KEY_PREFIX) :])
    assert not [text for text in dump_everything(redis_client) for secret in secrets if secret in text]


def test_without_grace_the_old_secret_stops_at_once_and_only_the_latest_two_secrets_work(redis_server, redis_client):
    async def scenario(keys: KeyStore, meter: Meter) -> dict[str, tuple[int, str] | str]:
        record, first = await keys.create(CreateKeyRequest(name="rolled", credit_usd=1))
        _, second = await keys.rotate(record.id, grace_s=0)
        outcomes: dict[str, tuple[int, str] | str] = {}
        with pytest.raises(AuthenticationFailed) as stopped:
            await keys.authenticate(f"Bearer {first}")  # Redis's own clock: the grace was 0
        outcomes["first after no grace"] = (stopped.value.status_code, stopped.value.code)
        _, third = await keys.rotate(record.id, grace_s=3600)
        outcomes["second within grace"] = (await keys.authenticate(f"Bearer {second}"))[0].id
        outcomes["third"] = (await meter.admit(auth.hash_key(third), ALPHA, 20, 40)).key_id
        # The first secret is older than the previous one: refused even within the grace.
        with pytest.raises(AuthenticationFailed) as refused:
            await meter.admit(auth.hash_key(first), ALPHA, 20, 40)
        outcomes["first after two rotations"] = (refused.value.status_code, refused.value.code)
        return outcomes

    outcomes = run(redis_server.url, scenario)
    key_id = outcomes.pop("third")
    assert outcomes == {
        "first after no grace": (401, "rotated_api_key"),
        "second within grace": key_id,
        "first after two rotations": (401, "rotated_api_key"),
    }


def test_a_revoked_key_cannot_be_rotated_and_its_record_is_unchanged(redis_server, redis_client):
    async def scenario(keys: KeyStore, _: Meter) -> tuple[APIError, dict[str, str], dict[str, str], str]:
        record, key = await keys.create(CreateKeyRequest(name="retired", credit_usd=1))
        await keys.revoke(record.id)
        before = key_of(redis_client, record)
        with pytest.raises(APIError) as refused:
            await keys.rotate(record.id, grace_s=60)
        with pytest.raises(AuthenticationFailed) as still_revoked:
            await keys.authenticate(f"Bearer {key}")
        return refused.value, before, key_of(redis_client, record), still_revoked.value.code

    refused, before, after, code = run(redis_server.url, scenario)
    assert (refused.status_code, refused.code) == (409, "key_revoked")
    assert after == before and after["status"] == "revoked" and after["prev_key_hash"] == ""
    assert code == "revoked_api_key"


# -- organizations -------------------------------------------------------------------------------


def test_two_keys_of_one_organization_draw_on_one_balance(redis_server, redis_client):
    async def scenario(keys: KeyStore, meter: Meter) -> dict[str, Any]:
        org = await keys.create_org(CreateOrgRequest(name="acme", credit_usd=Decimal("0.001")))  # 1000 micro-USD
        web, web_key = await keys.create(CreateKeyRequest(name="web", org_id=org.id))
        batch, batch_key = await keys.create(CreateKeyRequest(name="batch", org_id=org.id, rpm=9))
        out: dict[str, Any] = {"org": org, "web": web, "batch": batch}
        held = await meter.admit(web.key_hash, BETA, 20, 40)  # holds 450 of the organization's 1000
        out["batch sees"] = (await keys.authenticate(f"Bearer {batch_key}"))[1].balance_micros
        second = await meter.admit(batch.key_hash, BETA, 20, 40)  # 450 more: 100 left
        with pytest.raises(InsufficientCredit) as refused:
            await meter.admit(web.key_hash, BETA, 20, 40)
        out["refused"] = (refused.value.status_code, refused.value.code)
        await meter.settle(held, 20, 10, "completed")
        await meter.settle(second, 20, 30, "completed")
        out["listed"] = [(r.id, o.id, o.balance_micros) for r, o in await keys.list(org.id)]
        out["ids"] = await keys.ids()
        out["web view"] = (await keys.authenticate(f"Bearer {web_key}"))[0].view(await keys.require_org(org.id))
        out["orgs"] = [o.id for o in await keys.list_orgs()]
        return out

    out = run(redis_server.url, scenario)
    org, web, batch = out["org"], out["web"], out["batch"]
    assert web.org_id == batch.org_id == org.id
    assert out["batch sees"] == 1000 - 450
    assert out["refused"] == (402, "insufficient_quota")
    web_cost, batch_cost = BETA.cost_micros(20, 10), BETA.cost_micros(20, 30)
    assert org_of(redis_client, web) == {
        "balance_micros": 1000 - web_cost - batch_cost,
        "hold_micros": 0,
        "spent_micros": web_cost + batch_cost,
        "credited_micros": 1000,
    }
    # Each key keeps its own spend; the organization has the sum.
    assert key_of(redis_client, web)["spent_micros"] == str(web_cost)
    assert key_of(redis_client, batch)["spent_micros"] == str(batch_cost)
    assert sorted(out["listed"]) == sorted(
        [(web.id, org.id, 1000 - web_cost - batch_cost), (batch.id, org.id, 1000 - web_cost - batch_cost)]
    )
    assert out["ids"] == {web.id: org.id, batch.id: org.id}
    assert out["orgs"] == [org.id]  # no organization of their own for keys made in one
    view = out["web view"]
    assert (view.org_id, view.org_name) == (org.id, "acme")
    assert view.credit_usd == view.org_credit_usd == (1000 - web_cost - batch_cost) / 1_000_000
    assert view.spent_usd == web_cost / 1_000_000
    assert view.on_hold_usd == 0.0


def test_a_key_for_an_unknown_organization_is_404_and_writes_nothing(redis_server, redis_client):
    async def scenario(keys: KeyStore, _: Meter) -> APIError:
        with pytest.raises(APIError) as refused:
            await keys.create(CreateKeyRequest(name="stray", org_id="org_" + "0" * 20))
        return refused.value

    refused = run(redis_server.url, scenario)
    assert (refused.status_code, refused.code, refused.param) == (404, "org_not_found", "org_id")
    assert redis_client.keys("*") == []


def test_a_key_with_an_organization_and_credit_of_its_own_is_a_400(redis_server, redis_client):
    """Credit belongs to the organization; the admin body is refused before anything is written."""
    with pytest.raises(ValidationError) as invalid:
        CreateKeyRequest(name="k", org_id="org_1", credit_usd=Decimal(5))
    assert invalid.value.errors()[0]["type"] == "org_credit"

    app = FastAPI()
    install_error_handlers(app)  # the ingress's one error mapper
    created: list[CreateKeyRequest] = []

    @app.post("/admin/v1/keys")
    async def create(body: CreateKeyRequest) -> dict:  # the body model the admin route takes
        created.append(body)
        return {}

    async def post() -> Any:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post("/admin/v1/keys", json={"name": "k", "org_id": "org_1", "credit_usd": 5})

    response = asyncio.run(post())
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "Invalid value for the request body: credit belongs to the organization: leave credit_usd "
        "out with org_id and use POST /admin/v1/orgs/{id}/credit.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_value",
    }
    assert created == [] and redis_client.keys("*") == []


# -- spend caps -------------------------------------------------------------------------------------


def _utc_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, second, tzinfo=timezone.utc).timestamp()) * 1000


def test_a_daily_cap_counts_spend_and_holds_and_is_available_again_the_next_utc_day(redis_server, redis_client):
    noon = _utc_ms(2031, 3, 14, 12)
    next_day = _utc_ms(2031, 3, 15, 0, 0, 1)

    async def scenario(keys: KeyStore, meter: Meter) -> dict[str, Any]:
        # 2000 micro-USD a day; a beta request of 20 + 40 tokens holds 450.
        record, _ = await keys.create(
            CreateKeyRequest(name="capped", credit_usd=1, spend_cap_usd=Decimal("0.002"), spend_cap_period="daily")
        )
        out: dict[str, Any] = {"record": record}
        held = [await meter.admit(record.key_hash, BETA, 20, 40, now_ms=noon + i) for i in range(4)]  # 1800 held
        with pytest.raises(InsufficientCredit) as over:
            await meter.admit(record.key_hash, BETA, 20, 40, now_ms=noon + 10)  # 1800 + 450 > 2000
        out["over with holds"] = over.value
        out["key during"] = await keys.require(record.id)
        for i, admission in enumerate(held):
            await meter.settle(admission, 20, 40, "completed", now_ms=noon + 100 + i)  # charged 450 each
        with pytest.raises(InsufficientCredit) as still:
            await meter.admit(record.key_hash, BETA, 20, 40, now_ms=noon + 200)  # 1800 spent + 450 > 2000
        out["over with spend"] = (still.value.status_code, still.value.code)
        small = await meter.admit(record.key_hash, BETA, 20, 10, now_ms=noon + 300)  # 1800 + 150 fits
        await meter.settle(small, 20, 10, "completed", now_ms=noon + 400)
        out["today"] = await keys.require(record.id)
        org = await keys.require_org(record.org_id)
        out["view today"] = out["today"].view(org, now_s=noon / 1000 + 1)
        out["view tomorrow before any request"] = out["today"].view(org, now_s=next_day / 1000)
        tomorrow = await meter.admit(record.key_hash, BETA, 20, 40, now_ms=next_day)
        await meter.settle(tomorrow, 20, 40, "completed", now_ms=next_day + 1)
        out["tomorrow"] = await keys.require(record.id)
        out["view tomorrow"] = out["tomorrow"].view(await keys.require_org(record.org_id), now_s=next_day / 1000)
        return out

    out = run(redis_server.url, scenario)
    record = out["record"]
    over = out["over with holds"]
    assert (over.status_code, over.code) == (402, "spend_cap_reached")
    assert over.body()["error"]["message"] == (
        "This API key has reached its spend cap (this request may cost up to $0.000450). Wait for the cap's "
        "period to reset (GET /v1/key shows when), or ask for a higher cap."
    )
    assert over.headers["x-ratelimit-limit-requests"]
    assert out["key during"].hold_micros == 1800
    assert out["over with spend"] == (402, "spend_cap_reached")
    today = out["today"]
    assert (today.period_id, today.period_spent_micros, today.spent_micros, today.hold_micros) == (
        "daily:2031-03-14",
        1950,
        1950,
        0,
    )
    view = out["view today"]
    assert (view.spend_cap_usd, view.spend_cap_period) == (0.002, "daily")
    assert view.spent_this_period_usd == 0.00195
    assert view.period_resets_at == _utc_ms(2031, 3, 15) // 1000  # the next UTC midnight
    # A new day starts from nothing, before any request of it was settled.
    assert out["view tomorrow before any request"].spent_this_period_usd == 0.0
    tomorrow = out["tomorrow"]
    assert (tomorrow.period_id, tomorrow.period_spent_micros, tomorrow.spent_micros) == (
        "daily:2031-03-15",
        450,
        1950 + 450,
    )
    assert out["view tomorrow"].spent_this_period_usd == 0.00045
    assert out["view tomorrow"].period_resets_at == _utc_ms(2031, 3, 16) // 1000
    # The cap is the key's; the organization's credit paid for all of it.
    assert org_of(redis_client, record)["spent_micros"] == 2400
    assert redis_client.hget(account_key(record.org_id, "usage"), f"2031-03-15|{record.id}|beta-chat|requests") == "1"


def test_a_weekly_cap_resets_on_monday_utc_and_not_before(redis_server, redis_client):
    sunday_night = _utc_ms(2032, 2, 29, 23, 59, 59)  # a Sunday, and a leap day
    monday = _utc_ms(2032, 3, 1)

    async def scenario(keys: KeyStore, meter: Meter) -> list[Any]:
        record, _ = await keys.create(
            CreateKeyRequest(name="weekly", credit_usd=1, spend_cap_usd=Decimal("0.0005"), spend_cap_period="weekly")
        )
        saturday = _utc_ms(2032, 2, 28, 9)
        await meter.settle(
            await meter.admit(record.key_hash, BETA, 20, 40, now_ms=saturday), 20, 40, "completed", now_ms=saturday
        )
        outcomes = []
        for instant in (sunday_night, monday):
            try:
                outcomes.append((await meter.admit(record.key_hash, BETA, 20, 40, now_ms=instant)).key_id == record.id)
            except APIError as refused:
                outcomes.append((refused.status_code, refused.code))
        outcomes.append((await keys.require(record.id)).hold_micros)
        return outcomes

    assert run(redis_server.url, scenario) == [(402, "spend_cap_reached"), True, 450]


# -- the spend-cap calendar: one rule in Python and Lua -----------------------------------------------


def _instants() -> list[int]:
    """Epoch seconds around the boundaries the calendar must get right, and many others."""
    boundaries = [
        datetime(1970, 1, 1, tzinfo=timezone.utc),  # a Thursday: the weekly arithmetic's anchor
        datetime(1970, 1, 5, tzinfo=timezone.utc),  # the first Monday
        datetime(2000, 2, 29, tzinfo=timezone.utc),  # leap day of a year divisible by 400
        datetime(2000, 3, 1, tzinfo=timezone.utc),
        datetime(2023, 1, 1, tzinfo=timezone.utc),  # a Sunday New Year
        datetime(2024, 1, 1, tzinfo=timezone.utc),  # a Monday New Year
        datetime(2024, 2, 29, tzinfo=timezone.utc),
        datetime(2024, 3, 1, tzinfo=timezone.utc),
        datetime(2025, 12, 29, tzinfo=timezone.utc),  # a Monday whose week spans two years
        datetime(2100, 2, 28, tzinfo=timezone.utc),  # 2100 is not a leap year
        datetime(2100, 3, 1, tzinfo=timezone.utc),
    ]
    # Every month's first day and every Monday of some years, a leap year among them.
    day = datetime(2023, 12, 1, tzinfo=timezone.utc)
    while day < datetime(2025, 3, 1, tzinfo=timezone.utc):
        if day.day == 1 or day.weekday() == 0:
            boundaries.append(day)
        day += timedelta(days=1)
    instants = []
    for moment in boundaries:
        start = int(moment.timestamp())
        instants += [start - 1, start, start + 1, start + 86_399, start + 86_400]
    rng = random.Random(20260301)
    instants += [rng.randrange(0, 7_258_118_400) for _ in range(1500)]  # up to 2200
    return sorted({instant for instant in instants if instant >= 0})


def test_the_lua_calendar_gives_the_same_period_ids_as_python(redis_server, redis_client):
    source = (LUA_DIR / "lib" / "calendar.lua").read_text()
    script = redis_client.register_script(
        source + "\nreturn {cap_period_id(ARGV[1], tonumber(ARGV[2])), utc_day(tonumber(ARGV[2]))}"
    )
    instants = _instants()
    assert len(instants) > 1800
    pipe = redis_client.pipeline(transaction=False)
    cases = [(period, instant) for period in ("daily", "weekly", "monthly", "") for instant in instants]
    for period, instant in cases:
        script(args=[period, instant], client=pipe)
    answers = pipe.execute()
    mismatches = []
    for (period, instant), (lua_period, lua_day) in zip(cases, answers, strict=True):
        python_day = datetime.fromtimestamp(instant, tz=timezone.utc).date().isoformat()
        python_period = cap_period_id(period or None, instant)
        if (lua_period, lua_day) != (python_period, python_day):
            mismatches.append((period, instant, lua_period, python_period, lua_day, python_day))
    assert mismatches == []
    # Spot checks against the calendar itself, so both cannot be wrong the same way.
    assert cap_period_id("weekly", _utc_ms(2024, 3, 3, 23, 59, 59) // 1000) == "weekly:2024-02-26"
    assert cap_period_id("weekly", _utc_ms(2024, 3, 4) // 1000) == "weekly:2024-03-04"
    assert cap_period_id("monthly", _utc_ms(2024, 2, 29, 23, 59, 59) // 1000) == "monthly:2024-02"
    assert cap_period_id("daily", _utc_ms(2100, 3, 1) // 1000 - 1) == "daily:2100-02-28"
    assert cap_period_id("weekly", 0) == "weekly:1969-12-29"


def test_one_keys_lapsed_holds_are_freed_by_any_key_of_its_organization_even_once_it_is_revoked(
    redis_server, redis_client
):
    """Credit is shared: a key whose ingress died holding the organization's credit, and which
    is never used again (here: revoked), must not block the other keys past its lease."""

    async def scenario(keys: KeyStore, meter: Meter):
        # Credit for exactly one such request.
        credit = Decimal(BETA.cost_micros(2, 40)) / 1_000_000
        org = await keys.create_org(CreateOrgRequest(name="shared", credit_usd=credit))
        first, first_secret = await keys.create(CreateKeyRequest(name="dies", org_id=org.id))
        second, second_secret = await keys.create(CreateKeyRequest(name="lives", org_id=org.id))
        first_hash, second_hash = auth.hash_key(first_secret), auth.hash_key(second_secret)
        now = int((await meter.redis.time())[0]) * 1000
        stranded = await meter.admit(first_hash, BETA, 2, 40, now_ms=now)  # its ingress dies: never settled
        await keys.revoke(first.id)
        refused = None
        try:
            await meter.admit(second_hash, BETA, 2, 40, now_ms=now + 1000)
        except InsufficientCredit as exc:
            refused = exc.code
        held = await keys.require_org(org.id)
        admitted = await meter.admit(second_hash, BETA, 2, 40, now_ms=now + LEASE_MS + 1)
        after = await keys.require_org(org.id)
        records = {k: await keys.require(k) for k in (first.id, second.id)}
        return stranded, refused, held, admitted, after, records

    stranded, refused, held, admitted, after, records = run(redis_server.url, scenario)
    assert refused == "insufficient_quota"  # while the lease runs, the hold is real
    assert (held.hold_micros, held.balance_micros) == (stranded.hold_micros, 0)
    # After it, the other key's admission gave the stranded hold back and took its own.
    assert (after.hold_micros, after.balance_micros) == (admitted.hold_micros, 0)
    assert (records[stranded.key_id].hold_micros, records[admitted.key_id].hold_micros) == (0, admitted.hold_micros)
    org_id = stranded.org_id
    assert redis_client.zrange(account_key(org_id, f"inflight:{stranded.key_id}"), 0, -1) == []
    assert redis_client.zrange(account_key(org_id, "leases"), 0, -1) == [f"{admitted.key_id}|{admitted.billing_id}"]
