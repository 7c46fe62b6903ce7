"""admit.lua / settle.lua against a pure-Python model of one organization, with an injected clock.

Hypothesis drives random sequences of admissions and settlements through the real scripts on
a real Redis. The organization holds the credit; two or three keys draw on it, each with its
own buckets and concurrency (its own limits or the operator's defaults) and, maybe, a spend
cap that resets daily, weekly (Monday), monthly or never. The clock starts seconds before a
UTC day, week, month or year boundary and moves by steps of up to 20 s, with occasional jumps
of hours or days; settlements are dated by the same clock. Leases are short, so admissions
also free the slots and holds of requests whose ingress "died".

After every call the scripts must agree with the model on the verdict, the retry-after, every
remaining/reset figure, the settlement's charge and balance, the organization's balance, hold
and spend, the holds and in-flight sets, and each key's hold, spend, period id and spend this
period. At the end, the usage counters and every ledger event must be the model's, and
reconciliation must report nothing but the model's `hold_exceeded` requests. Throughout:
balance + hold + spent == credited, the balance never goes below zero, and a key's spend in a
period never passes its cap, except for charges that found no hold to take them from: a
settlement whose lease had lapsed (admission gave its hold back), or one admitted with a zero
hold. Those charge what the balance has (docs/accounts.md, "Caps count holds").
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tokenmart.deployments.billing import LEASE_MS
from tokenmart.deployments.keystore import KeyStore, connect
from tokenmart.deployments.reconcile import reconcile
from tokenmart.deployments.schemas import CreateKeyRequest, CreateOrgRequest
from tokenmart.deployments.scripts import SCALE, Verdict, account_key, key_keys, lua_source

pytestmark = pytest.mark.integration

MODEL_ID = "m"
MARKER_TTL_S = 60
GEN_TTL_S = 60
MICROS = Decimal(1_000_000)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def at_ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


# Seconds before a boundary: a day and a month (and a Saturday), a Sunday night, a year, a leap
# day on a Monday, and a Sunday night a day before a month's end.
STARTS = [
    at_ms("2026-02-28T23:59:50+00:00"),
    at_ms("2026-11-29T23:59:55+00:00"),
    at_ms("2026-12-31T23:59:58+00:00"),
    at_ms("2028-02-28T23:59:50+00:00"),
    at_ms("2027-05-30T23:59:59.990+00:00"),
]
HOUR, DAY = 3_600_000, 86_400_000
# Mostly no jump; sometimes hours, a day, days, a week or a month.
JUMPS = [0] * 12 + [HOUR, 5 * HOUR + 7, DAY, 3 * DAY + 1_000, 7 * DAY, 30 * DAY + 1]


# -- the calendar, independently of periods.py and calendar.lua --------------------------------
def utc_day(now_ms: int) -> str:
    return datetime.fromtimestamp(now_ms // 1000, tz=timezone.utc).date().isoformat()


def period_id(period: str | None, now_ms: int) -> str:
    day = datetime.fromtimestamp(now_ms // 1000, tz=timezone.utc).date()
    if period == "daily":
        return f"daily:{day.isoformat()}"
    if period == "weekly":
        return f"weekly:{(day - timedelta(days=day.weekday())).isoformat()}"
    if period == "monthly":
        return f"monthly:{day:%Y-%m}"
    return ""


# -- the model -----------------------------------------------------------------------------------
@dataclass
class KeyModel:
    key_id: str
    key_hash: str
    rpm: int
    tpm: int
    max_concurrency: int
    max_per_request: int
    cap: int | None
    period: str | None
    levels: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (level, ts)
    inflight: dict[str, int] = field(default_factory=dict)  # billing id -> lease expiry
    hold: int = 0
    spent: int = 0
    period_id: str = ""
    period_spent: int = 0
    # period id -> what settlements charged there without a hold (the one way past a cap)
    unheld: Counter[str] = field(default_factory=Counter)

    def level(self, name: str, limit: int, now: int) -> int:
        if name not in self.levels:
            return limit * SCALE
        stored, ts = self.levels[name]
        return min(limit * SCALE, stored + max(0, now - ts) * limit)


@dataclass
class Admitted:
    billing_id: str
    key: KeyModel
    tokens: int
    hold: int
    started_at_ms: int


@dataclass
class OrgModel:
    org_id: str
    credited: int
    keys: list[KeyModel]
    balance: int = 0
    hold: int = 0
    spent: int = 0
    holds: dict[str, int] = field(default_factory=dict)  # billing id -> hold
    usage: dict[str, int] = field(default_factory=dict)
    ledger: list[dict[str, str]] = field(default_factory=list)
    generations: dict[str, dict[str, str]] = field(default_factory=dict)
    settled: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.balance = self.credited

    def admit(self, key: KeyModel, billing_id: str, tokens: int, output: int, hold: int, now: int, lease: int):
        if output > key.max_per_request:
            return [Verdict.OVER_REQUEST_BOUND, key.max_per_request, 0, 0, 0, 0, 0, 0, 0]
        req, tok = key.level("req", key.rpm, now), key.level("tok", key.tpm, now)

        def report(verdict: int, retry: int, r: int, t: int) -> list[int]:
            return [
                verdict, retry,
                key.rpm, r // SCALE, ceil_div(key.rpm * SCALE - r, key.rpm),
                key.tpm, t // SCALE, ceil_div(key.tpm * SCALE - t, key.tpm),
                key.max_concurrency,
                1,  # the one model asked for is allowed (the script's per-model flags)
            ]  # fmt: skip

        for owner in self.keys:
            # A lapsed lease (its ingress died) gives its hold back, to the balance and to its
            # own key's cap, whichever key of the organization is admitting now.
            for lapsed in [b for b, expiry in owner.inflight.items() if expiry <= now]:
                del owner.inflight[lapsed]
                refund = self.holds.pop(lapsed, 0)
                self.balance += refund
                self.hold -= refund
                owner.hold -= refund
        if len(key.inflight) >= key.max_concurrency:
            return report(Verdict.CONCURRENCY, 1000, req, tok)
        if req < SCALE:
            return report(Verdict.REQUESTS_PER_MINUTE, ceil_div(SCALE - req, key.rpm), req, tok)
        if tokens > key.tpm:
            return report(Verdict.LARGER_THAN_TPM, 0, req, tok)
        if tok < tokens * SCALE:
            return report(Verdict.TOKENS_PER_MINUTE, ceil_div(tokens * SCALE - tok, key.tpm), req, tok)
        if self.balance < hold or self.balance <= 0:
            return report(Verdict.INSUFFICIENT_CREDIT, 0, req, tok)
        if key.cap is not None:
            spent = key.period_spent if key.period_id == period_id(key.period, now) else 0
            if spent + key.hold + hold > key.cap or spent + key.hold >= key.cap:
                return report(Verdict.SPEND_CAP, 0, req, tok)
        req, tok = req - SCALE, tok - tokens * SCALE
        key.levels = {"req": (req, now), "tok": (tok, now)}
        key.inflight[billing_id] = now + lease
        if hold:
            self.holds[billing_id] = hold
        self.balance -= hold
        self.hold += hold
        key.hold += hold
        return report(Verdict.ADMITTED, 0, req, tok)

    def settle(
        self, admitted: Admitted, prompt: int, completion: int, cost: int, status: str, gen: dict[str, Any], now: int
    ) -> list[int]:
        """[settled, balance, charged]: the cost capped at the hold, or (no hold left) at the balance."""
        if admitted.billing_id in self.settled:
            return [0, self.balance, 0]
        self.settled.add(admitted.billing_id)
        key, billing_id = admitted.key, admitted.billing_id
        held = self.holds.pop(billing_id, 0)  # 0 when the lease lapsed and the hold went back already
        charged = min(cost, held) if held else min(cost, max(self.balance, 0))
        self.balance += held - charged
        self.hold -= held
        key.hold -= held
        self.spent += charged
        key.spent += charged
        period = period_id(key.period, now)
        if key.period_id != period:  # a settlement after a boundary starts the new period
            key.period_id, key.period_spent = period, 0
        key.period_spent += charged
        if not held:
            key.unheld[period] += charged
        key.inflight.pop(billing_id, None)
        unused = max(admitted.tokens - prompt - completion, 0)
        if unused > 0 and "tok" in key.levels:
            level, ts = key.levels["tok"]
            key.levels["tok"] = (level + unused * SCALE, ts)
        if status == "rejected" and charged == 0:
            return [1, self.balance, 0]

        day = utc_day(now)
        for metric, value in (("requests", 1), ("prompt_tokens", prompt), ("completion_tokens", completion)):
            name = f"{day}|{key.key_id}|{MODEL_ID}|{metric}"
            self.usage[name] = self.usage.get(name, 0) + value
        name = f"{day}|{key.key_id}|{MODEL_ID}|cost_micros"
        self.usage[name] = self.usage.get(name, 0) + charged
        if gen["cached_tokens"]:  # prompt tokens from the prefix cache, counted once there are any
            name = f"{day}|{key.key_id}|{MODEL_ID}|cached_tokens"
            self.usage[name] = self.usage.get(name, 0) + gen["cached_tokens"]
        common = {"request_id": billing_id, "org_id": self.org_id, "key_id": key.key_id, "model": MODEL_ID}
        self.ledger.append(
            {
                **common,
                "response_id": gen["response_id"],
                "served_by": gen["served_by"],
                "prompt_tokens": str(prompt),
                "completion_tokens": str(completion),
                "cached_tokens": str(gen["cached_tokens"]),
                "cost_micros": str(charged),
                "status": status,
                "hold_micros": str(admitted.hold),
                "reserved_tokens": str(admitted.tokens),
                "started_at_ms": str(admitted.started_at_ms),
                "settled_at_ms": str(now),
                "day": day,
            }
        )
        if charged < cost:
            self.ledger.append(
                {
                    **common,
                    "event": "hold_exceeded",
                    "cost_micros": str(cost),
                    "charged_micros": str(charged),
                    "hold_micros": str(held),
                    "uncharged_micros": str(cost - charged),
                    "settled_at_ms": str(now),
                    "day": day,
                }
            )
        self.generations[gen["response_id"]] = {
            "id": gen["response_id"],
            **common,
            "served_by": gen["served_by"],
            "status": status,
            "prompt_tokens": str(prompt),
            "completion_tokens": str(completion),
            "cached_tokens": str(gen["cached_tokens"]),
            "cost_micros": str(charged),
            "created": str(admitted.started_at_ms // 1000),
            "ttft_ms": str(gen["ttft_ms"]),
            "latency_ms": str(gen["latency_ms"]),
            "stream": str(gen["stream"]),
            "user": gen["user"],
        }
        return [1, self.balance, charged]

    def check_invariants(self) -> None:
        assert self.balance >= 0
        assert self.balance + self.hold + self.spent == self.credited
        assert self.hold == sum(self.holds.values()) == sum(key.hold for key in self.keys)
        assert self.spent == sum(key.spent for key in self.keys)
        for key in self.keys:
            if key.cap is not None:
                assert key.period_spent - key.unheld[key.period_id] <= key.cap, (key.key_id, key.period_id)


# -- the accounts, made by the key store ---------------------------------------------------------
@dataclass(frozen=True)
class KeySpec:
    rpm: int | None
    tpm: int | None
    max_concurrency: int | None
    max_per_request: int | None
    cap: int | None
    period: str | None


async def _create_accounts(url: str, credit: int, specs: list[KeySpec]) -> tuple[str, list[tuple[str, str]]]:
    client = connect(url)
    try:
        store = KeyStore(client)
        org = await store.create_org(CreateOrgRequest(name="model", credit_usd=Decimal(credit) / MICROS))
        made = []
        for index, spec in enumerate(specs):
            record, _ = await store.create(
                CreateKeyRequest(
                    name=f"model-{index}",
                    org_id=org.id,
                    rpm=spec.rpm,
                    tpm=spec.tpm,
                    max_concurrency=spec.max_concurrency,
                    max_tokens_per_request=spec.max_per_request,
                    spend_cap_usd=None if spec.cap is None else Decimal(spec.cap) / MICROS,
                    spend_cap_period=spec.period if spec.cap is not None else None,
                )
            )
            made.append((record.id, record.key_hash))
        return org.id, made
    finally:
        await client.aclose()


async def _reconcile(url: str, org_id: str, key_ids: list[str]):
    client = connect(url)
    try:
        return await reconcile(client, {org_id: key_ids})
    finally:
        await client.aclose()


def observed(client: redis.Redis, org: OrgModel) -> tuple[Any, ...]:
    """What Redis holds of the organization now, read in one round trip."""
    pipe = client.pipeline(transaction=True)
    pipe.hmget(account_key(org.org_id, "org"), "balance_micros", "hold_micros", "spent_micros", "credited_micros")
    pipe.hgetall(account_key(org.org_id, "holds"))
    for key in org.keys:
        names = key_keys(org.org_id, key.key_id)
        pipe.hmget(names["key"], "hold_micros", "spent_micros", "period_id", "period_spent_micros")
        pipe.zrange(names["inflight"], 0, -1, withscores=True)
    pipe.zrange(account_key(org.org_id, "leases"), 0, -1, withscores=True)
    org_fields, holds, *per_key, leases = pipe.execute()
    keys = [
        (
            (int(fields[0]), int(fields[1]), fields[2], int(fields[3])),
            {billing_id: int(expiry) for billing_id, expiry in inflight},
        )
        for fields, inflight in zip(per_key[::2], per_key[1::2], strict=True)
    ]
    leased = {member: int(expiry) for member, expiry in leases}
    return tuple(int(v) for v in org_fields), {k: int(v) for k, v in holds.items()}, keys, leased


def expected(org: OrgModel) -> tuple[Any, ...]:
    keys = [((k.hold, k.spent, k.period_id, k.period_spent), dict(k.inflight)) for k in org.keys]
    # The organization's lease set: every key's requests in flight.
    leased = {f"{k.key_id}|{billing_id}": expiry for k in org.keys for billing_id, expiry in k.inflight.items()}
    return (org.balance, org.hold, org.spent, org.credited), dict(org.holds), keys, leased


class Harness:
    """One organization in Redis and in the model; every call goes to both and must agree."""

    def __init__(self, server_url: str, client: redis.Redis, defaults, specs: list[KeySpec], credit: int, lease: int):
        client.flushall()
        self.url, self.client, self.lease = server_url, client, lease
        self._admit = client.register_script(lua_source("admit"))
        self._settle = client.register_script(lua_source("settle"))
        self.org_id, made = asyncio.run(_create_accounts(server_url, credit, specs))
        rpm_d, tpm_d, conc_d, self.per_request_default = defaults
        self.defaults = [rpm_d, tpm_d, conc_d]
        # Each limit is the key's own, or (where it sets none) the operator's default.
        self.keys = [
            KeyModel(
                key_id,
                key_hash,
                spec.rpm or rpm_d,
                spec.tpm or tpm_d,
                spec.max_concurrency or conc_d,
                spec.max_per_request or self.per_request_default,
                spec.cap,
                spec.period if spec.cap is not None else None,
            )
            for (key_id, key_hash), spec in zip(made, specs, strict=True)
        ]
        self.org = OrgModel(self.org_id, credit, self.keys)
        self.verdict = Verdict.ADMITTED
        self.check()

    def admit(self, key: KeyModel, billing_id: str, tokens: int, output: int, hold: int, now: int) -> Admitted | None:
        """The admission, or None when refused (`self.verdict` says why)."""
        names = key_keys(self.org_id, key.key_id)
        args = [billing_id, key.key_hash, MODEL_ID, *self.defaults, tokens, hold, self.lease, now]
        args += [self.per_request_default, output]
        got = self._admit(keys=[names[n] for n in ("org", "key", "buckets", "inflight", "holds", "leases")], args=args)
        want = self.org.admit(key, billing_id, tokens, output, hold, now, self.lease)
        assert [int(v) for v in got[:10]] == want, (billing_id, now)  # (then the tiers)
        self.verdict = Verdict(want[0])
        self.check()
        return Admitted(billing_id, key, tokens, hold, now) if want[0] == Verdict.ADMITTED else None

    def settle(self, target: Admitted, cost: int, used: int, status: str, now: int, seed: int = 0) -> list[int]:
        """[settled, balance, charged]; `used` tokens of the reservation (half prompt, half output)."""
        used = min(used, target.tokens)
        prompt, completion = used // 2, used - used // 2
        gen = {
            "response_id": f"chatcmpl-{target.billing_id}",
            "served_by": "model-replica",
            "cached_tokens": prompt // 3,
            "ttft_ms": seed,
            "latency_ms": 10 * seed,
            "stream": seed % 2,
            "user": "" if seed % 3 else f"user-{seed}",
        }
        names = key_keys(self.org_id, target.key.key_id)
        keys = [
            names["org"],
            names["key"],
            account_key(self.org_id, "usage"),
            account_key(self.org_id, "ledger"),
            account_key(self.org_id, f"settled:{target.billing_id}"),
            names["buckets"],
            names["inflight"],
            names["holds"],
            account_key(self.org_id, f"gen:{gen['response_id']}"),
            account_key(self.org_id, "alerts"),
            account_key(self.org_id, "outbox"),
            names["leases"],
        ]
        args = [
            target.billing_id,
            target.key.key_id,
            MODEL_ID,
            prompt,
            completion,
            cost,
            target.hold,
            status,
            target.started_at_ms,
            MARKER_TTL_S,
            max(target.tokens - used, 0),
            target.tokens,
            self.org_id,
            json.dumps(gen),
            GEN_TTL_S,
            now,
        ]
        got = self._settle(keys=keys, args=args)
        want = self.org.settle(target, prompt, completion, cost, status, gen, now)
        assert [int(v) for v in got] == want, (target.billing_id, now)
        self.check()
        return want

    def check(self) -> None:
        self.org.check_invariants()
        assert observed(self.client, self.org) == expected(self.org)

    def check_books(self) -> None:
        """The usage counters, ledger events and generation records settlement wrote, and
        reconciliation, which must report exactly the model's `hold_exceeded` requests."""
        org_id, client = self.org_id, self.client
        assert {k: int(v) for k, v in client.hgetall(account_key(org_id, "usage")).items()} == self.org.usage
        assert [entry for _, entry in client.xrange(account_key(org_id, "ledger"))] == self.org.ledger
        for response_id, record in self.org.generations.items():
            assert client.hgetall(account_key(org_id, f"gen:{response_id}")) == record
        assert client.xlen(account_key(org_id, "outbox")) == 0  # no alert settings, no alerts
        report = asyncio.run(_reconcile(self.url, org_id, [key.key_id for key in self.keys]))
        exceeded = [
            ("hold_exceeded", entry["request_id"], int(entry["cost_micros"]), int(entry["charged_micros"]))
            for entry in self.org.ledger
            if entry.get("event") == "hold_exceeded"
        ]
        assert [(d.check, d.field.split()[1], d.expected, d.actual) for d in report.differences] == exceeded


# -- strategies ----------------------------------------------------------------------------------
key_specs = st.builds(
    KeySpec,
    rpm=st.none() | st.integers(1, 20),
    tpm=st.none() | st.integers(100, 2000),
    max_concurrency=st.none() | st.integers(1, 4),
    max_per_request=st.none() | st.integers(60, 400),
    cap=st.none() | st.integers(1, 1500),
    period=st.sampled_from([None, "daily", "weekly", "monthly"]),
)
steps = st.tuples(st.integers(0, 20_000), st.sampled_from(JUMPS))
operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("admit"),
            st.integers(0, 2),  # which key
            st.integers(0, 250),  # tokens (prompt + output)
            st.integers(0, 150),  # output tokens (at most the tokens)
            st.integers(0, 300),  # hold (micro-USD)
            steps,
        ),
        st.tuples(
            st.just("settle"),
            st.integers(0, 50),  # which admission
            st.integers(0, 300),  # cost: may exceed the hold (the charge is capped)
            st.integers(0, 250),  # tokens used (at most the reserved tokens)
            st.sampled_from(["completed", "completed", "aborted", "error", "rejected"]),
            st.integers(0, 9),  # 0: settle an already-settled admission again
            steps,
        ),
    ),
    min_size=10,
    max_size=60,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    defaults=st.tuples(st.integers(1, 20), st.integers(100, 2000), st.integers(1, 4), st.sampled_from([10**6, 120])),
    specs=st.lists(key_specs, min_size=2, max_size=3),
    credit=st.integers(0, 3000) | st.integers(3000, 20_000),
    start=st.sampled_from(STARTS),
    lease=st.sampled_from([30_000, LEASE_MS]),
    ops=operations,
)
def test_lua_money_path_matches_the_model(redis_server, redis_client, defaults, specs, credit, start, lease, ops):
    harness = Harness(redis_server.url, redis_client, defaults, specs, credit, lease)
    keys, now = harness.keys, start
    admitted: list[Admitted] = []
    settled: list[Admitted] = []
    for index, op in enumerate(ops):
        step, jump = op[-1]
        now += step + jump
        if op[0] == "admit":
            _, pick, tokens, output, hold, _ = op
            got = harness.admit(keys[pick % len(keys)], f"b{index}", tokens, min(output, tokens), hold, now)
            event(f"admit: {harness.verdict.name}")
            if got is not None:
                admitted.append(got)
            continue
        _, pick, cost, used, status, again, _ = op
        if again == 0 and settled:
            target = settled[pick % len(settled)]
        elif admitted:
            target = admitted.pop(pick % len(admitted))
            settled.append(target)
        else:
            continue
        period_before = target.key.period_id
        done, _, charged = harness.settle(target, cost, used, status, now, index)
        if not done:
            event("settle: again, changes nothing")
        elif target.hold and charged and target.key.unheld[target.key.period_id]:
            event("settle: charged without a hold")
        if done and target.key.period and period_before and period_before != target.key.period_id:
            event(f"settle: starts a new {target.key.period} period")
        if done and period_id(target.key.period, target.started_at_ms) != period_id(target.key.period, now):
            event("settle: admitted in an earlier period")
    harness.check_books()


def key_state(harness: Harness, key: KeyModel) -> tuple[int, int, str, int]:
    names = key_keys(harness.org_id, key.key_id)
    hold, spent, period, period_spent = harness.client.hmget(
        names["key"], "hold_micros", "spent_micros", "period_id", "period_spent_micros"
    )
    return int(hold), int(spent), period, int(period_spent)


def test_a_weekly_cap_counts_holds_and_a_settlement_after_monday_counts_in_the_new_week(redis_server, redis_client):
    capped, free = KeySpec(None, None, None, None, 300, "weekly"), KeySpec(None, None, None, None, None, None)
    harness = Harness(redis_server.url, redis_client, (20, 2000, 4, 10**6), [capped, free], 5_000, LEASE_MS)
    key, other = harness.keys
    sunday = at_ms("2026-11-29T23:59:56+00:00")
    held = harness.admit(key, "b1", 100, 50, 200, sunday)
    assert held is not None
    assert harness.admit(key, "b2", 100, 50, 200, sunday + 1_000) is None  # 200 held + 200 > 300
    assert harness.verdict is Verdict.SPEND_CAP

    monday = at_ms("2026-11-30T00:00:02+00:00")
    assert harness.settle(held, 150, 80, "completed", monday) == [1, 4_850, 150]
    assert key_state(harness, key) == (0, 150, "weekly:2026-11-30", 150)
    assert harness.admit(key, "b3", 100, 50, 200, monday + 1_000) is None  # 150 spent + 200 > 300
    exact = harness.admit(key, "b4", 100, 50, 150, monday + 2_000)  # 150 + 150 == 300: fits
    assert exact is not None
    assert harness.admit(key, "b5", 10, 5, 1, monday + 3_000) is None
    assert harness.verdict is Verdict.SPEND_CAP
    assert harness.admit(other, "b6", 100, 50, 300, monday + 4_000) is not None  # no cap of its own

    next_monday = at_ms("2026-12-07T00:00:08+00:00")
    harness.settle(exact, 100, 80, "completed", next_monday)
    assert key_state(harness, key) == (0, 250, "weekly:2026-12-07", 100)
    assert harness.admit(key, "b7", 100, 50, 200, next_monday + 1_000) is not None
    harness.check_books()


def test_a_settlement_whose_lease_lapsed_charges_the_balance_and_may_pass_the_cap(redis_server, redis_client):
    daily = KeySpec(None, None, None, None, 300, "daily")
    harness = Harness(redis_server.url, redis_client, (20, 2000, 4, 10**6), [daily, daily], 1_000, 30_000)
    key = harness.keys[0]
    before = at_ms("2026-02-28T23:59:50+00:00")
    lapsed = harness.admit(key, "b1", 100, 50, 300, before)
    assert lapsed is not None
    # 40 s later, on March 1st, its lease has lapsed: this admission gives the 300 back first.
    after = before + 40_000
    second = harness.admit(key, "b2", 100, 50, 100, after)
    assert second is not None
    assert (harness.org.balance, harness.org.hold, key.hold) == (900, 100, 100)
    # The late settlement finds no hold: it charges what the balance has, past the cap.
    assert harness.settle(lapsed, 250, 80, "completed", after + 1_000) == [1, 650, 250]
    assert harness.admit(key, "b3", 10, 5, 50, after + 2_000) is None  # 250 + 100 held + 50 > 300
    assert harness.verdict is Verdict.SPEND_CAP
    assert harness.settle(second, 100, 80, "completed", after + 3_000) == [1, 650, 100]
    assert key_state(harness, key) == (0, 350, "daily:2026-03-01", 350)  # 50 past the cap of 300
    assert harness.admit(key, "b4", 10, 5, 1, after + 4_000) is None
    # The next day starts from zero.
    assert harness.admit(key, "b5", 10, 5, 300, after + DAY) is not None
    harness.check_books()
