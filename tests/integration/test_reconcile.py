"""Reconciliation on a real Redis: clean books reconcile; each kind of tampering is reported."""

from __future__ import annotations

import pytest

from tokenmart.deployments.keystore import account_key
from tokenmart.deployments.reconcile import reconcile
from tokenmart.deployments.schemas import CreateKeyRequest

from .test_keystore import ALPHA, BETA, run

pytestmark = pytest.mark.integration


def books(redis_url: str, *, in_flight: bool = False):
    """A key with credit added twice, three settled requests (one aborted) and maybe one in flight."""

    async def scenario(keys, meter):
        record, _ = await keys.create(CreateKeyRequest(name="books", credit_usd=0.5))
        await keys.add_credit(record.id, 250_000)
        for listing, prompt, completion, outcome in [
            (ALPHA, 12, 30, "completed"),
            (BETA, 40, 7, "aborted"),
            (BETA, 5, 64, "completed"),
        ]:
            admission = await meter.admit(record.id, record.key_hash, listing, prompt + 10, 100)
            await meter.settle(admission, prompt, completion, outcome)
        if in_flight:
            await meter.admit(record.id, record.key_hash, ALPHA, 10, 100)
        return record.id, await reconcile(meter.redis, [record.id])

    return run(redis_url, scenario)


def test_settled_books_reconcile_exactly(redis_server, redis_client):
    key_id, report = books(redis_server.url, in_flight=True)
    assert report.ok and report.differences == []
    (summary,) = report.keys
    expected_cost = ALPHA.cost_micros(12, 30) + BETA.cost_micros(40, 7) + BETA.cost_micros(5, 64)
    assert (summary.key_id, summary.events, summary.in_flight) == (key_id, 3, 1)
    assert summary.ledger_cost_usd == summary.counters_cost_usd == summary.spent_usd == expected_cost / 1e6
    assert summary.credited_usd == 0.75
    assert summary.balance_usd + summary.on_hold_usd + summary.spent_usd == pytest.approx(0.75, abs=1e-9)


def move(field_from: str, field_to: str, micros: int):
    """Move micro-USD between two fields of the key record: the credit identity still holds."""

    def tamper(client, key_id: str, day: str) -> None:
        client.hincrby(account_key(key_id, "key"), field_from, -micros)
        client.hincrby(account_key(key_id, "key"), field_to, micros)

    return tamper


@pytest.mark.parametrize(
    ("tamper", "check", "field"),
    [
        (lambda r, k, day: r.hincrby(account_key(k, "usage"), f"{day}|beta-chat|completion_tokens", 5),
         "ledger_vs_counters", "|beta-chat|completion_tokens"),
        (move("spent_micros", "balance_micros", 1), "ledger_vs_spent", "spent_micros"),
        (lambda r, k, day: r.hincrby(account_key(k, "key"), "balance_micros", 1_000), "credit_balance",
         "balance_micros + hold_micros + spent_micros"),
        (move("balance_micros", "hold_micros", 7), "holds", "hold_micros"),
    ],
    ids=["counter", "spent", "balance", "hold"],
)  # fmt: skip
def test_each_kind_of_difference_is_reported(redis_server, redis_client, tamper, check, field):
    key_id, _ = books(redis_server.url)
    day = next(iter(redis_client.hkeys(account_key(key_id, "usage")))).split("|")[0]
    tamper(redis_client, key_id, day)

    async def scenario(keys, meter):
        return await reconcile(meter.redis, [key_id])

    report = run(redis_server.url, scenario)
    assert not report.ok and not report.keys[0].ok
    assert [(d.check, d.field.removeprefix(day)) for d in report.differences] == [(check, field)]


def test_a_ledger_event_without_counters_is_reported(redis_server, redis_client):
    key_id, _ = books(redis_server.url)
    event = {"request_id": "forged", "key_id": key_id, "model": "alpha-chat", "day": "2026-01-01"}
    event |= {"prompt_tokens": 3, "completion_tokens": 4, "cost_micros": 9, "status": "completed"}
    redis_client.xadd(account_key(key_id, "ledger"), event)

    async def scenario(keys, meter):
        return await reconcile(meter.redis, [key_id])

    report = run(redis_server.url, scenario)
    found = {(d.check, d.field, d.expected, d.actual) for d in report.differences}
    assert found == {
        ("ledger_vs_counters", "2026-01-01|alpha-chat|requests", 1, 0),
        ("ledger_vs_counters", "2026-01-01|alpha-chat|prompt_tokens", 3, 0),
        ("ledger_vs_counters", "2026-01-01|alpha-chat|completion_tokens", 4, 0),
        ("ledger_vs_counters", "2026-01-01|alpha-chat|cost_micros", 9, 0),
        ("ledger_vs_spent", "spent_micros", report.keys[0].spent_usd * 1e6 + 9, report.keys[0].spent_usd * 1e6),
    }
