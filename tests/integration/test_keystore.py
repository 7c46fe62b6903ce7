"""KeyStore and Meter against a real redis-server (no Ray): what Redis holds and how it changes."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, TypeVar

import pytest
import redis

from tokenmart.deployments import auth
from tokenmart.deployments.billing import LEASE_MS, Meter
from tokenmart.deployments.errors import APIError, AuthenticationFailed, InsufficientCredit
from tokenmart.deployments.keystore import KeyStore, account_key, connect
from tokenmart.deployments.schemas import CreateKeyRequest, UpdateKeyRequest
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
    stored = redis_client.hgetall(account_key(record.id, "key"))
    assert stored["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert stored["prefix"] == auth.display_prefix(key)
    assert stored["balance_micros"] == "2000000"
    assert redis_client.smembers("tm:keys") == {record.id}
    secret = key[len(auth.KEY_PREFIX) :]
    everything = dump_everything(redis_client)
    assert everything, "nothing was written"
    assert not [text for text in everything if key in text or secret in text]


def test_authenticate_accepts_the_live_key_and_rejects_other_keys(redis_server, redis_client):
    async def scenario(keys: KeyStore, _: Meter) -> None:
        record, key = await keys.create(CreateKeyRequest(name="bob", credit_usd=Decimal("0.5")))
        found = await keys.authenticate(f"Bearer {key}")
        assert (found.id, found.name, found.balance_micros) == (record.id, "bob", 500_000)

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
        assert (await keys.authenticate(f"Bearer {fresh}")).name == "new"

    run(redis_server.url, scenario)


def test_add_credit_increases_the_balance_exactly(redis_server, redis_client):
    async def scenario(keys: KeyStore, _: Meter) -> int:
        record, _ = await keys.create(CreateKeyRequest(name="dave", credit_usd=Decimal("0.000001")))
        return (await keys.add_credit(record.id, 2_500_000)).balance_micros

    assert run(redis_server.url, scenario) == 2_500_001


def test_update_changes_limits_and_models_but_never_the_balance_counters(redis_server, redis_client):
    async def scenario(keys: KeyStore, meter: Meter) -> tuple[Any, Any]:
        record, _ = await keys.create(CreateKeyRequest(name="erin", credit_usd=1))
        await meter.settle(await meter.admit(record.id, record.key_hash, ALPHA, 100, 50), 100, 50, "completed")
        before = await keys.require(record.id)
        # A settlement landing while the admin edits the key must not be overwritten.
        redis_client.hincrby(account_key(record.id, "key"), "balance_micros", -7)
        after = await keys.update(record.id, UpdateKeyRequest(name="erin2", rpm=60, models=["alpha-chat"]))
        return before, after

    before, after = run(redis_server.url, scenario)
    assert (after.name, after.limits.rpm, after.models) == ("erin2", 60, ["alpha-chat"])
    assert after.limits.tpm is None
    assert before.balance_micros == 1_000_000 - ALPHA.cost_micros(100, 50)
    assert after.balance_micros == before.balance_micros - 7
    assert (after.spent_micros, after.hold_micros) == (before.spent_micros, before.hold_micros)


def test_admit_refuses_a_key_without_credit(redis_server, redis_client):
    async def scenario(keys: KeyStore, meter: Meter) -> None:
        record, _ = await keys.create(CreateKeyRequest(name="broke", credit_usd=0))
        with pytest.raises(InsufficientCredit) as refused:
            await meter.admit(record.id, record.key_hash, ALPHA, 20, 40)
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
        attempts = {
            "unknown": (auth.key_id_for_hash("f" * 64), "f" * 64),
            "wrong hash": (live.id, "0" * 64),
            "revoked": (revoked.id, revoked.key_hash),
            "expired": (expired.id, expired.key_hash),
            "model": (narrow.id, narrow.key_hash),
        }
        outcomes = {}
        for name, (key_id, key_hash) in attempts.items():
            with pytest.raises(APIError) as refused:
                await meter.admit(key_id, key_hash, ALPHA, 20, 40)
            outcomes[name] = (refused.value.status_code, refused.value.code)
        await meter.admit(narrow.id, narrow.key_hash, BETA, 20, 40)  # its allowed model is admitted
        return outcomes

    assert run(redis_server.url, scenario) == {
        "unknown": (401, "invalid_api_key"),
        "wrong hash": (401, "invalid_api_key"),
        "revoked": (401, "revoked_api_key"),
        "expired": (401, "expired_api_key"),
        "model": (403, "model_not_allowed"),
    }


def test_a_keys_own_limits_override_the_operator_defaults(redis_server, redis_client):
    async def scenario(keys: KeyStore, meter: Meter) -> tuple[Any, Any, Any]:
        own, _ = await keys.create(CreateKeyRequest(name="hana", credit_usd=1, rpm=7, tpm=900, max_concurrency=3))
        default, _ = await keys.create(CreateKeyRequest(name="hana-default", credit_usd=1))
        first = await meter.admit(own.id, own.key_hash, ALPHA, 20, 40)
        second = await meter.admit(default.id, default.key_hash, ALPHA, 20, 40)
        return first.limits, second.limits, await meter.current_state(own.id)

    own, default, peeked = run(redis_server.url, scenario)
    assert (own.rpm, own.tpm, own.max_concurrency) == (7, 900, 3)
    assert (own.rpm_remaining, own.tpm_remaining) == (6, 900 - 60)
    assert (default.rpm, default.tpm, default.max_concurrency) == (600, 1_000_000, 64)
    # Reading the state consumes nothing: the same figures (give or take the refill since).
    assert (peeked.rpm, peeked.tpm) == (7, 900)
    assert peeked.rpm_remaining == 6 and 840 <= peeked.tpm_remaining <= 900


def test_settle_is_idempotent_per_billing_id(redis_server, redis_client):
    async def scenario(keys: KeyStore, meter: Meter) -> tuple[Any, Any, str]:
        record, _ = await keys.create(CreateKeyRequest(name="frank", credit_usd=1))
        admission = await meter.admit(record.id, record.key_hash, BETA, 20, 40)
        first = await meter.settle(admission, 10, 20, "completed")
        second = await meter.settle(admission, 10, 20, "completed")
        return first, second, record.id

    first, second, key_id = run(redis_server.url, scenario)
    cost = BETA.cost_micros(10, 20)
    assert cost == 225
    assert (first.duplicate, first.cost_micros, first.balance_micros) == (False, cost, 1_000_000 - cost)
    assert second.duplicate is True
    assert second.balance_micros == 1_000_000 - cost
    stored = redis_client.hgetall(account_key(key_id, "key"))
    assert (stored["balance_micros"], stored["spent_micros"]) == (str(1_000_000 - cost), str(cost))
    assert redis_client.xlen(account_key(key_id, "ledger")) == 1
    today = redis_today(redis_client).isoformat()
    assert redis_client.hget(account_key(key_id, "usage"), f"{today}|beta-chat|requests") == "1"


def test_settle_writes_daily_model_counters_and_a_ledger_event(redis_server, redis_client):
    async def scenario(keys: KeyStore, meter: Meter) -> tuple[str, str]:
        record, _ = await keys.create(CreateKeyRequest(name="grace", credit_usd=1))
        completed = await meter.admit(record.id, record.key_hash, ALPHA, 20, 40)
        await meter.settle(completed, 7, 3, "completed")
        aborted = await meter.admit(record.id, record.key_hash, ALPHA, 20, 40)
        await meter.settle(aborted, 5, 2, "aborted")
        return record.id, completed.billing_id

    key_id, billing_id = run(redis_server.url, scenario)
    today = redis_today(redis_client).isoformat()
    cost = ALPHA.cost_micros(7, 3) + ALPHA.cost_micros(5, 2)
    assert redis_client.hgetall(account_key(key_id, "usage")) == {
        f"{today}|alpha-chat|requests": "2",
        f"{today}|alpha-chat|prompt_tokens": "12",
        f"{today}|alpha-chat|completion_tokens": "5",
        f"{today}|alpha-chat|cost_micros": str(cost),
    }
    events = [fields for _, fields in redis_client.xrange(account_key(key_id, "ledger"))]
    assert [e["status"] for e in events] == ["completed", "aborted"]
    first = events[0]
    assert first["request_id"] == billing_id
    assert (first["key_id"], first["model"], first["day"]) == (key_id, "alpha-chat", today)
    assert (first["prompt_tokens"], first["completion_tokens"]) == ("7", "3")
    assert first["cost_micros"] == str(ALPHA.cost_micros(7, 3))
    assert int(first["settled_at_ms"]) >= int(first["started_at_ms"]) - 5_000


def test_usage_report_groups_by_model_and_day_within_the_date_range(redis_server, redis_client):
    async def settle_today(keys: KeyStore, meter: Meter) -> str:
        record, _ = await keys.create(CreateKeyRequest(name="heidi", credit_usd=1))
        await meter.settle(await meter.admit(record.id, record.key_hash, ALPHA, 20, 40), 10, 4, "completed")
        await meter.settle(await meter.admit(record.id, record.key_hash, BETA, 20, 40), 6, 2, "completed")
        await meter.settle(await meter.admit(record.id, record.key_hash, BETA, 20, 40), 4, 2, "completed")
        return record.id

    key_id = run(redis_server.url, settle_today)
    today = redis_today(redis_client)
    # An older day, written in the documented counter layout, to test the range filter.
    old_day = today - timedelta(days=40)
    redis_client.hset(
        account_key(key_id, "usage"),
        mapping={
            f"{old_day.isoformat()}|alpha-chat|requests": 3,
            f"{old_day.isoformat()}|alpha-chat|prompt_tokens": 30,
            f"{old_day.isoformat()}|alpha-chat|completion_tokens": 9,
            f"{old_day.isoformat()}|alpha-chat|cost_micros": 11,
        },
    )

    def report(start: date, end: date, group_by: str):
        return run(redis_server.url, lambda _, meter: usage_report(meter.redis, [key_id], start, end, group_by))  # type: ignore[arg-type]

    alpha_cost = ALPHA.cost_micros(10, 4)
    beta_cost = BETA.cost_micros(6, 2) + BETA.cost_micros(4, 2)

    by_model = report(today, today, "model")
    assert by_model.key_id == key_id
    assert [(r.model, r.requests, r.prompt_tokens, r.completion_tokens) for r in by_model.data] == [
        ("alpha-chat", 1, 10, 4),
        ("beta-chat", 2, 10, 4),
    ]
    assert [round(r.cost_usd * 1_000_000) for r in by_model.data] == [alpha_cost, beta_cost]
    assert (by_model.total.requests, by_model.total.total_tokens) == (3, 28)
    assert round(by_model.total.cost_usd * 1_000_000) == alpha_cost + beta_cost

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
    async def scenario(keys: KeyStore, meter: Meter) -> tuple[Any, dict, dict, str]:
        record, _ = await keys.create(CreateKeyRequest(name="hana", credit_usd=1))
        admission = await meter.admit(record.id, record.key_hash, BETA, 100, 400)
        during = redis_client.hgetall(account_key(record.id, "key"))
        settlement = await meter.settle(admission, 60, 30, "completed")
        after = redis_client.hgetall(account_key(record.id, "key"))
        return admission, during, after, settlement

    admission, during, after, settlement = run(redis_server.url, scenario)
    hold = BETA.cost_micros(100, 400)
    assert admission.hold_micros == hold and admission.reserved_tokens == 500
    assert (int(during["balance_micros"]), int(during["hold_micros"])) == (1_000_000 - hold, hold)
    cost = BETA.cost_micros(60, 30)
    assert settlement.cost_micros == cost
    assert (int(after["balance_micros"]), int(after["hold_micros"])) == (1_000_000 - cost, 0)


def test_a_lapsed_lease_gives_its_hold_back_and_a_late_settlement_charges_only_the_cost(redis_server, redis_client):
    async def scenario(keys: KeyStore, meter: Meter) -> tuple[Any, ...]:
        record, _ = await keys.create(CreateKeyRequest(name="ines", credit_usd=1, max_concurrency=1))
        seconds, _ = await meter.redis.time()
        now = seconds * 1000
        lost = await meter.admit(record.id, record.key_hash, BETA, 100, 400, now_ms=now)  # its ingress "dies"
        with pytest.raises(APIError) as busy:
            await meter.admit(record.id, record.key_hash, BETA, 10, 10, now_ms=now + 1000)
        later = await meter.admit(record.id, record.key_hash, BETA, 10, 10, now_ms=now + LEASE_MS + 1)
        during = await keys.require(record.id)
        late = await meter.settle(lost, 100, 5, "completed")
        await meter.settle(later, 10, 10, "completed")
        return later, busy.value, during, late, await keys.require(record.id)

    later, busy, during, late, after = run(redis_server.url, scenario)
    assert (busy.status_code, busy.code) == (429, "concurrency_limit_exceeded")
    # Only the live admission holds credit once the lost one's lease lapsed.
    assert (during.balance_micros, during.hold_micros) == (1_000_000 - later.hold_micros, later.hold_micros)
    assert late.cost_micros == BETA.cost_micros(100, 5)
    spent = BETA.cost_micros(100, 5) + BETA.cost_micros(10, 10)
    assert (after.balance_micros, after.hold_micros, after.spent_micros) == (1_000_000 - spent, 0, spent)


def test_a_hold_larger_than_the_balance_is_refused_with_402(redis_server, redis_client):
    async def scenario(keys: KeyStore, meter: Meter) -> None:
        record, _ = await keys.create(CreateKeyRequest(name="ivan", credit_usd=0.000100))
        with pytest.raises(InsufficientCredit) as refused:
            await meter.admit(record.id, record.key_hash, BETA, 10, 100)  # up to 1025 micro-USD
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
        admission = await meter.admit(record.id, record.key_hash, BETA, 20, 40)
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
    stored = redis_client.hgetall(account_key(record.id, "key"))
    assert (int(stored["balance_micros"]), int(stored["hold_micros"])) == (1_000_000 - cost, 0)
    ledger = redis_client.xrange(account_key(record.id, "ledger"))
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
            admission = await meter.admit(record.id, record.key_hash, ALPHA, 20, 40)
            offline = connect(dead_url, timeout_s=0.3)
            assert (await Meter(offline, spool=spool).settle(admission, 10, 5, "completed")).spooled
            await offline.aclose()
            ids.append(admission.billing_id)
        stopped.release()  # its process exits; `running` keeps its owner lock

        first = await meter.replay_spool()
        ledger_after_first = [f["request_id"] for _, f in await client.xrange(account_key(record.id, "ledger"))]
        files_after_first = sorted(p.name for p in tmp_path.iterdir())
        running.release()
        second = await meter.replay_spool()
        ledger = [f["request_id"] for _, f in await client.xrange(account_key(record.id, "ledger"))]
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
        before = redis_client.hgetall(account_key(record.id, "key"))
        with pytest.raises(APIError) as refused:
            await keys.update(record.id, UpdateKeyRequest(status="active", name="thawed", rpm=99))
        return refused.value, before, redis_client.hgetall(account_key(record.id, "key"))

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


def test_credit_to_a_revoked_key_is_refused_and_changes_no_balance(redis_server, redis_client):
    async def scenario(keys: KeyStore, _: Meter) -> tuple[APIError, Any]:
        record, _ = await keys.create(CreateKeyRequest(name="gone", credit_usd=Decimal("0.25")))
        await keys.revoke(record.id)
        with pytest.raises(APIError) as refused:
            await keys.add_credit(record.id, 5_000_000)
        return refused.value, await keys.require(record.id)

    refused, record = run(redis_server.url, scenario)
    assert (refused.status_code, refused.code) == (409, "key_revoked")
    assert (record.balance_micros, record.credited_micros) == (250_000, 250_000)


def test_changes_to_an_unknown_key_are_404_and_write_nothing(redis_server, redis_client):
    missing = auth.key_id_for_hash("e" * 64)

    async def scenario(keys: KeyStore, _: Meter) -> list[tuple[int, str | None]]:
        outcomes = []
        for change in (
            keys.update(missing, UpdateKeyRequest(name="ghost")),
            keys.revoke(missing),
            keys.add_credit(missing, 1),
        ):
            with pytest.raises(APIError) as refused:
                await change
            outcomes.append((refused.value.status_code, refused.value.code))
        return outcomes

    assert run(redis_server.url, scenario) == [(404, "key_not_found")] * 3
    assert not redis_client.exists(account_key(missing, "key"))


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
