"""admit.lua / settle.lua against a pure-Python model of the same limiter, with an injected clock.

Hypothesis drives random sequences of admissions (random token counts, holds, clock steps)
and settlements; the real scripts on a real Redis must agree with the model on every
verdict, every retry-after and every remaining/reset figure, and on the balance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenmart.deployments.keystore import account_key
from tokenmart.deployments.scripts import SCALE, Verdict, lua_source

pytestmark = pytest.mark.integration

KEY_ID = "key_model"
KEY_HASH = "0" * 64


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Model:
    rpm: int
    tpm: int
    max_concurrency: int
    balance: int
    levels: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (level, ts)
    inflight: dict[str, int] = field(default_factory=dict)  # billing id -> lease expiry
    holds: dict[str, int] = field(default_factory=dict)  # billing id -> hold

    def level(self, name: str, limit: int, now: int) -> int:
        if name not in self.levels:
            return limit * SCALE
        stored, ts = self.levels[name]
        return min(limit * SCALE, stored + max(0, now - ts) * limit)

    def admit(self, billing_id: str, tokens: int, hold: int, now: int, lease: int) -> list[int]:
        req, tok = self.level("req", self.rpm, now), self.level("tok", self.tpm, now)

        def report(verdict: int, retry: int, r: int, t: int) -> list[int]:
            return [
                verdict, retry,
                self.rpm, r // SCALE, ceil_div(self.rpm * SCALE - r, self.rpm),
                self.tpm, t // SCALE, ceil_div(self.tpm * SCALE - t, self.tpm),
                self.max_concurrency,
            ]  # fmt: skip

        for expired in [b for b, e in self.inflight.items() if e <= now]:
            del self.inflight[expired]
            self.balance += self.holds.pop(expired, 0)  # a lapsed lease gives its hold back
        if len(self.inflight) >= self.max_concurrency:
            return report(Verdict.CONCURRENCY, 1000, req, tok)
        if req < SCALE:
            return report(Verdict.REQUESTS_PER_MINUTE, ceil_div(SCALE - req, self.rpm), req, tok)
        if tokens > self.tpm:
            return report(Verdict.LARGER_THAN_TPM, 0, req, tok)
        if tok < tokens * SCALE:
            return report(Verdict.TOKENS_PER_MINUTE, ceil_div(tokens * SCALE - tok, self.tpm), req, tok)
        if self.balance < hold or self.balance <= 0:
            return report(Verdict.INSUFFICIENT_CREDIT, 0, req, tok)
        req, tok = req - SCALE, tok - tokens * SCALE
        self.levels = {"req": (req, now), "tok": (tok, now)}
        self.inflight[billing_id] = now + lease
        if hold:
            self.holds[billing_id] = hold
        self.balance -= hold
        return report(Verdict.ADMITTED, 0, req, tok)

    def settle(self, billing_id: str, hold: int, cost: int, unused: int) -> int:
        """Returns what was charged: the cost, capped at the hold (or, with no hold left, the balance)."""
        self.inflight.pop(billing_id, None)
        held = self.holds.pop(billing_id, 0)  # 0 when the lease lapsed and the hold went back already
        charged = min(cost, held) if held else min(cost, max(self.balance, 0))
        self.balance += held - charged
        if unused > 0 and "tok" in self.levels:
            level, ts = self.levels["tok"]
            self.levels["tok"] = (level + unused * SCALE, ts)
        return charged


operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("admit"),
            st.integers(min_value=0, max_value=400),  # tokens
            st.integers(min_value=0, max_value=300),  # hold (micro-USD)
            st.integers(min_value=0, max_value=20_000),  # clock step (ms)
        ),
        st.tuples(st.just("settle"), st.integers(0, 50), st.integers(0, 300), st.integers(0, 400)),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rpm=st.integers(min_value=1, max_value=8),
    tpm=st.integers(min_value=50, max_value=1000),
    max_concurrency=st.integers(min_value=1, max_value=4),
    balance=st.integers(min_value=0, max_value=2000),
    own_limits=st.booleans(),
    ops=operations,
)
def test_lua_limiter_matches_the_model(redis_client, rpm, tpm, max_concurrency, balance, own_limits, ops) -> None:
    redis_client.flushall()
    admit = redis_client.register_script(lua_source("admit"))
    settle = redis_client.register_script(lua_source("settle"))
    record = account_key(KEY_ID, "key")
    limits = {"rpm": rpm, "tpm": tpm, "max_concurrency": max_concurrency}
    # The limits come from the key's own record, or (when it sets none) from the operator defaults.
    stored = limits if own_limits else dict.fromkeys(limits)
    defaults = [10_000, 10_000_000, 1000] if own_limits else [rpm, tpm, max_concurrency]
    redis_client.hset(
        record,
        mapping={
            "key_hash": KEY_HASH,
            "status": "active",
            "models": "null",
            "limits": json.dumps(stored),
            "expires_at": "",
            "balance_micros": balance,
            "hold_micros": 0,
            "spent_micros": 0,
        },
    )
    model = Model(rpm, tpm, max_concurrency, balance)
    lease = 30_000
    now = 1_800_000_000_000
    admitted: list[tuple[str, int, int]] = []  # (billing id, hold, tokens)

    for index, op in enumerate(ops):
        if op[0] == "admit":
            _, tokens, hold, step = op
            now += step
            billing_id = f"b{index}"
            keys = [record, *(account_key(KEY_ID, name) for name in ("buckets", "inflight", "holds"))]
            args = [billing_id, KEY_HASH, "m", *defaults, tokens, hold, lease, now, 10**9, tokens]
            got = admit(keys=keys, args=args)
            want = model.admit(billing_id, tokens, hold, now, lease)
            assert [int(v) for v in got] == want, (index, op)
            if want[0] == Verdict.ADMITTED:
                admitted.append((billing_id, hold, tokens))
        elif admitted:
            _, pick, cost_seed, used_seed = op
            billing_id, hold, tokens = admitted.pop(pick % len(admitted))
            cost = cost_seed  # may exceed the hold: the charge is capped, the balance never negative
            used = min(used_seed, tokens)
            keys = [
                record,
                account_key(KEY_ID, "usage"),
                account_key(KEY_ID, "ledger"),
                account_key(KEY_ID, f"settled:{billing_id}"),
                account_key(KEY_ID, "buckets"),
                account_key(KEY_ID, "inflight"),
                account_key(KEY_ID, "holds"),
            ]
            args = [billing_id, KEY_ID, "m", used, 0, cost, hold, "completed", now, 60, tokens - used]
            settled, _, charged = settle(keys=keys, args=args)
            assert (settled, charged) == (1, model.settle(billing_id, hold, cost, tokens - used)), (index, op)
        assert int(redis_client.hget(record, "balance_micros")) == model.balance
        assert int(redis_client.hget(record, "hold_micros")) == sum(model.holds.values())
        # Spend stays within credit, whatever the settlements report and however late they come.
        assert model.balance >= 0
