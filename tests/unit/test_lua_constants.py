"""The admission verdicts, the bucket scale and the key check are defined once, for Python and Lua.

`scripts.lua_source` prepends `SCALE`, `VERDICT` and a script's shared helpers (the key check
of lib/key_check.lua, the UTC calendar of lib/calendar.lua) to it; these tests keep the scripts
from spelling a verdict or the scale as a bare number, checking a key or reckoning a spend-cap
period their own way, and every verdict from going unhandled.
"""

from __future__ import annotations

import re

import pytest

from tokenmart.deployments.limits import RateLimitState, refusal
from tokenmart.deployments.scripts import LIBRARIES, LUA_DIR, REAP_BATCH, SCALE, Verdict, lua_source


def script(name: str) -> str:
    return (LUA_DIR / f"{name}.lua").read_text()


def code(name: str) -> str:
    """A script without its comments."""
    return "\n".join(line.split("--", 1)[0] for line in script(name).splitlines())


def test_the_prelude_defines_the_scale_and_every_verdict_from_the_python_table() -> None:
    prelude = lua_source("settle").removesuffix(script("settle"))
    assert prelude.splitlines()[:2] == [f"local SCALE = {SCALE}", f"local REAP_BATCH = {REAP_BATCH}"]
    defined = dict(re.findall(r"(\w+) = (\d+)", prelude.splitlines()[2]))
    assert {name: int(value) for name, value in defined.items()} == {v.name: v.value for v in Verdict}


def test_verdicts_are_only_named_and_every_verdict_is_returned_by_admission() -> None:
    body = code("admit") + "\n" + "\n".join(code(f"lib/{library}") for library in LIBRARIES["admit"])
    assert not re.search(r"return \{\s*\d", body), "a verdict spelled as a number"
    assert not re.search(r"report\(\s*\d", body), "a verdict spelled as a number"
    used = set(re.findall(r"VERDICT\.(\w+)", body))
    assert used == {verdict.name for verdict in Verdict}


@pytest.mark.parametrize("name", ["admit", "authenticate"])
def test_admission_and_authentication_run_the_one_key_check(name: str) -> None:
    assert LIBRARIES[name][0] == "key_check"
    assert "key_refusal(" in code(name)
    assert "key_hash" in code("lib/key_check")
    # Neither script compares the status or the expiry itself.
    for own_check in ("'active'", "expires_at'] * 1000", "record[3]"):
        assert own_check not in code(name), (name, own_check)
    assert lua_source(name).index("local function key_refusal") < lua_source(name).index(script(name))


@pytest.mark.parametrize("name", ["admit", "settle"])
def test_admission_and_settlement_reckon_cap_periods_with_the_one_calendar(name: str) -> None:
    """The cap check (admit) and the period's spend (settle) must agree on the period id."""
    assert "calendar" in LIBRARIES[name]
    assert "cap_period_id(" in code(name)
    assert "local function cap_period_id" in code("lib/calendar")
    # Neither script does calendar arithmetic of its own.
    for own_reckoning in ("86400", "os.date", "os.time", "civil_from_days"):
        assert own_reckoning not in code(name), (name, own_reckoning)
    assert lua_source(name).index("local function cap_period_id") < lua_source(name).index(script(name))


def test_authentication_needs_no_calendar() -> None:
    # It checks the key alone; the cap is admission's business.
    assert LIBRARIES["authenticate"] == ("key_check",)
    assert "cap_period_id" not in lua_source("authenticate")


@pytest.mark.parametrize("name", ["admit", "settle"])
def test_no_script_spells_the_bucket_scale(name: str) -> None:
    assert str(SCALE) not in code(name)
    assert "SCALE" in code(name)


@pytest.mark.parametrize("verdict", [v for v in Verdict if v is not Verdict.ADMITTED])
def test_every_refusal_verdict_has_its_own_api_error(verdict: Verdict) -> None:
    error = refusal(verdict, 1500, RateLimitState(60, 0, 1000, 1000, 0, 1000, 4, 100), 10, 5, "m", 200)
    expected = {
        Verdict.REQUESTS_PER_MINUTE: (429, "rate_limit_exceeded"),
        Verdict.TOKENS_PER_MINUTE: (429, "rate_limit_exceeded"),
        Verdict.LARGER_THAN_TPM: (429, "rate_limit_exceeded"),
        Verdict.CONCURRENCY: (429, "concurrency_limit_exceeded"),
        Verdict.INSUFFICIENT_CREDIT: (402, "insufficient_quota"),
        Verdict.UNKNOWN_KEY: (401, "invalid_api_key"),
        Verdict.REVOKED_KEY: (401, "revoked_api_key"),
        Verdict.EXPIRED_KEY: (401, "expired_api_key"),
        Verdict.MODEL_NOT_ALLOWED: (403, "model_not_allowed"),
        Verdict.OVER_REQUEST_BOUND: (400, "invalid_value"),
        Verdict.SPEND_CAP: (402, "spend_cap_reached"),
        Verdict.ROTATED_KEY: (401, "rotated_api_key"),
    }
    assert (error.status_code, error.code) == expected[verdict]


def test_a_spend_cap_refusal_is_not_the_out_of_credit_refusal() -> None:
    """Both are 402; the client tells them apart by code and message, and both carry the limits."""
    state = RateLimitState(60, 59, 1000, 1000, 990, 600, 4, 100)
    cap = refusal(Verdict.SPEND_CAP, 0, state, 10, 1_500, "m", 200)
    credit = refusal(Verdict.INSUFFICIENT_CREDIT, 0, state, 10, 1_500, "m", 200)
    assert (cap.code, credit.code) == ("spend_cap_reached", "insufficient_quota")
    assert "spend cap" in cap.message and "$0.001500" in cap.message and "GET /v1/key" in cap.message
    assert "credit balance" in credit.message
    assert cap.headers == credit.headers == state.headers()
    assert "retry-after" not in cap.headers
