"""Reconciliation on a real Redis: clean books reconcile; each kind of tampering is reported."""

from __future__ import annotations

import pytest

from tokenmart.deployments.keystore import account_key, key_key, org_key
from tokenmart.deployments.reconcile import reconcile
from tokenmart.deployments.schemas import CreateKeyRequest

from .test_keystore import ALPHA, BETA, run

pytestmark = pytest.mark.integration


def books(redis_url: str, *, in_flight: bool = False):
    """An organization with two keys, credit added twice, three settled requests (one aborted)
    and maybe one in flight. Returns (org id, {key name: key id}, report)."""

    async def scenario(keys, meter):
        record, _ = await keys.create(CreateKeyRequest(name="books", credit_usd=0.5))
        other, _ = await keys.create(CreateKeyRequest(name="books-2", org_id=record.org_id))
        await keys.add_credit(record.id, 250_000)
        for who, listing, prompt, completion, outcome in [
            (record, ALPHA, 12, 30, "completed"),
            (other, BETA, 40, 7, "aborted"),
            (record, BETA, 5, 64, "completed"),
        ]:
            admission = await meter.admit(who.key_hash, listing, prompt + 10, 100)
            await meter.settle(admission, prompt, completion, outcome)
        if in_flight:
            await meter.admit(other.key_hash, ALPHA, 10, 100)
        key_ids = {"books": record.id, "books-2": other.id}
        return record.org_id, key_ids, await reconcile(meter.redis, {record.org_id: list(key_ids.values())})

    return run(redis_url, scenario)


def test_settled_books_reconcile_exactly(redis_server, redis_client):
    org_id, key_ids, report = books(redis_server.url, in_flight=True)
    assert report.ok and report.differences == []
    (summary,) = report.orgs
    expected_cost = ALPHA.cost_micros(12, 30) + BETA.cost_micros(40, 7) + BETA.cost_micros(5, 64)
    assert (summary.org_id, summary.name, summary.keys, summary.events, summary.in_flight) == (
        org_id,
        "books",
        2,
        3,
        1,
    )
    assert summary.ok
    assert summary.ledger_cost_usd == summary.counters_cost_usd == summary.spent_usd == expected_cost / 1e6
    assert summary.credited_usd == 0.75
    assert summary.on_hold_usd == ALPHA.cost_micros(10, 100) / 1e6
    assert summary.balance_usd + summary.on_hold_usd + summary.spent_usd == pytest.approx(0.75, abs=1e-9)
    # Each key's own spend and holds add up to the organization's.
    first = redis_client.hgetall(key_key(org_id, key_ids["books"]))
    second = redis_client.hgetall(key_key(org_id, key_ids["books-2"]))
    assert int(first["spent_micros"]) == ALPHA.cost_micros(12, 30) + BETA.cost_micros(5, 64)
    assert int(second["spent_micros"]) == BETA.cost_micros(40, 7)
    assert (first["hold_micros"], second["hold_micros"]) == ("0", str(ALPHA.cost_micros(10, 100)))


def move(name: str, field_from: str, field_to: str, micros: int):
    """Move micro-USD between two fields of the organization's record ("org") or a key's record:
    the credit identity still holds."""

    def tamper(client, org_id: str, key_id: str, day: str) -> None:
        record = org_key(org_id) if name == "org" else key_key(org_id, key_id)
        client.hincrby(record, field_from, -micros)
        client.hincrby(record, field_to, micros)

    return tamper


def add(name: str, field: str, micros: int):
    def tamper(client, org_id: str, key_id: str, day: str) -> None:
        client.hincrby(org_key(org_id) if name == "org" else key_key(org_id, key_id), field, micros)

    return tamper


@pytest.mark.parametrize(
    ("tamper", "check", "field", "on_key"),
    [
        (lambda r, o, k, day: r.hincrby(account_key(o, "usage"), f"{day}|{k}|beta-chat|completion_tokens", 5),
         "ledger_vs_counters", "|{key}|beta-chat|completion_tokens", False),
        (move("org", "spent_micros", "balance_micros", 1), "ledger_vs_spent", "spent_micros", False),
        (add("org", "balance_micros", 1_000), "credit_balance", "balance_micros + hold_micros + spent_micros", False),
        (move("org", "balance_micros", "hold_micros", 7), "holds", "hold_micros", False),
        (add("key", "spent_micros", 3), "key_spent", "spent_micros", True),
        (add("key", "hold_micros", 11), "key_holds", "hold_micros", True),
    ],
    ids=["counter", "spent", "balance", "hold", "key-spent", "key-hold"],
)  # fmt: skip
def test_each_kind_of_difference_is_reported(redis_server, redis_client, tamper, check, field, on_key):
    org_id, key_ids, _ = books(redis_server.url)
    key_id = key_ids["books"]
    day = next(iter(redis_client.hkeys(account_key(org_id, "usage")))).split("|")[0]
    tamper(redis_client, org_id, key_id, day)

    async def scenario(keys, meter):
        return await reconcile(meter.redis, {org_id: list(key_ids.values())})

    report = run(redis_server.url, scenario)
    assert not report.ok and not report.orgs[0].ok
    found = [(d.org_id, d.key_id, d.check, d.field.removeprefix(day)) for d in report.differences]
    assert found == [(org_id, key_id if on_key else None, check, field.format(key=key_id))]


def test_a_ledger_event_without_counters_is_reported(redis_server, redis_client):
    org_id, key_ids, _ = books(redis_server.url)
    key_id = key_ids["books-2"]
    event = {"request_id": "forged", "org_id": org_id, "key_id": key_id, "model": "alpha-chat", "day": "2026-01-01"}
    event |= {"prompt_tokens": 3, "completion_tokens": 4, "cost_micros": 9, "status": "completed"}
    redis_client.xadd(account_key(org_id, "ledger"), event)

    async def scenario(keys, meter):
        return await reconcile(meter.redis, {org_id: list(key_ids.values())})

    report = run(redis_server.url, scenario)
    found = {(d.check, d.key_id, d.field, d.expected, d.actual) for d in report.differences}
    spent = round(report.orgs[0].spent_usd * 1e6)
    key_spent = int(redis_client.hget(key_key(org_id, key_id), "spent_micros"))
    assert found == {
        ("ledger_vs_counters", None, f"2026-01-01|{key_id}|alpha-chat|requests", 1, 0),
        ("ledger_vs_counters", None, f"2026-01-01|{key_id}|alpha-chat|prompt_tokens", 3, 0),
        ("ledger_vs_counters", None, f"2026-01-01|{key_id}|alpha-chat|completion_tokens", 4, 0),
        ("ledger_vs_counters", None, f"2026-01-01|{key_id}|alpha-chat|cost_micros", 9, 0),
        ("ledger_vs_spent", None, "spent_micros", spent + 9, spent),
        ("key_spent", key_id, "spent_micros", key_spent + 9, key_spent),
    }


def test_books_trimmed_into_the_checkpoint_still_reconcile_and_a_trimmed_overcharge_is_still_reported(
    redis_server, redis_client
):
    """Retention moves old events into the checkpoint; reconcile counts them from there."""
    from tokenmart.deployments.ledger import trim_ledger

    async def scenario(keys, meter):
        record, _ = await keys.create(CreateKeyRequest(name="trimmed", credit_usd=0.01))
        for prompt in (10, 20, 30):
            await meter.settle(await meter.admit(record.key_hash, ALPHA, prompt, 50), prompt, 40, "completed")
        under_held = await meter.admit(record.key_hash, BETA, 10, 10)
        await meter.settle(under_held, 500, 10, "completed")  # cost above its hold: hold_exceeded
        scope = {record.org_id: [record.id]}
        before = await reconcile(meter.redis, scope)
        seconds, micros = await meter.redis.time()
        trimmed = await trim_ledger(meter.redis, record.org_id, seconds * 1000 + micros // 1000 + 1, batch=2)
        return record.org_id, under_held, before, trimmed, await reconcile(meter.redis, scope)

    org_id, under_held, before, trimmed, after = run(redis_server.url, scenario)
    assert trimmed == 5 and redis_client.xlen(account_key(org_id, "ledger")) == 0
    uncharged = BETA.cost_micros(500, 10) - under_held.hold_micros
    assert [(d.check, d.actual) for d in before.differences] == [("hold_exceeded", under_held.hold_micros)]
    assert [(d.check, d.field, d.expected, d.actual) for d in after.differences] == [
        ("hold_exceeded", "1 request(s) in the ledger's checkpoint: uncharged_micros", 0, uncharged)
    ]
    (was,), (now,) = before.orgs, after.orgs
    assert (
        (now.events, now.ledger_cost_usd, now.spent_usd)
        == (was.events, was.ledger_cost_usd, was.spent_usd)
        == (
            4,
            now.counters_cost_usd,
            now.spent_usd,
        )
    )
