"""The admission verdicts and the bucket scale are one table in Python, read by the Lua scripts.

`limits.lua_source` prepends `SCALE` and `VERDICT` to each script; these tests keep the scripts
from spelling a verdict or the scale as a bare number, and every verdict from going unhandled.
"""

from __future__ import annotations

import re

import pytest

from tokenmart.deployments.billing import Meter  # noqa: F401 - the scripts' loader is importable
from tokenmart.deployments.limits import LUA_DIR, SCALE, Verdict, lua_source, refusal


def script(name: str) -> str:
    return (LUA_DIR / f"{name}.lua").read_text()


def code(name: str) -> str:
    """A script without its comments."""
    return "\n".join(line.split("--", 1)[0] for line in script(name).splitlines())


def test_the_prelude_defines_the_scale_and_every_verdict_from_the_python_table() -> None:
    prelude = lua_source("admit").removesuffix(script("admit"))
    assert prelude.splitlines()[0] == f"local SCALE = {SCALE}"
    defined = dict(re.findall(r"(\w+) = (\d+)", prelude.splitlines()[1]))
    assert {name: int(value) for name, value in defined.items()} == {v.name: v.value for v in Verdict}


def test_admit_returns_only_named_verdicts_and_every_verdict_is_returned() -> None:
    body = code("admit")
    assert not re.search(r"return \{\s*\d", body), "a verdict spelled as a number"
    assert not re.search(r"report\(\s*\d", body), "a verdict spelled as a number"
    used = set(re.findall(r"VERDICT\.(\w+)", body))
    assert used == {verdict.name for verdict in Verdict}


@pytest.mark.parametrize("name", ["admit", "settle"])
def test_no_script_spells_the_bucket_scale(name: str) -> None:
    assert str(SCALE) not in code(name)
    assert "SCALE" in code(name)


@pytest.mark.parametrize("verdict", [v for v in Verdict if v is not Verdict.ADMITTED])
def test_every_refusal_verdict_has_its_own_api_error(verdict: Verdict) -> None:
    from tokenmart.deployments.limits import RateLimitState

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
    }
    assert (error.status_code, error.code) == expected[verdict]
