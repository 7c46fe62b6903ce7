"""The Redis scripts and what they share with Python: key layout, bucket scale, verdicts.

Each operation is one `.lua` file in `lua/`, loaded once with `register_script`. Constants that
both languages use are defined here once and prepended to a script as Lua (`SCALE`,
`VERDICT.<NAME>`), together with the script's shared Lua helpers (`lua/lib/*.lua`, e.g. the
key check that admission and authentication both run), so no rule or number is spelled twice.
`tests/unit/test_lua_constants.py` keeps the scripts to these names.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path

LUA_DIR = Path(__file__).parent / "lua"
SCALE = 60_000  # bucket levels are stored scaled: refill per ms = the per-minute limit itself
REAP_BATCH = 100  # lapsed leases one admission frees at most (admit.lua)

# The helpers each script is given, ahead of its own text.
LIBRARIES: dict[str, tuple[str, ...]] = {
    "admit": ("key_check", "calendar"),
    "authenticate": ("key_check",),
    "settle": ("key_check", "calendar"),
}


class Verdict(IntEnum):
    """What the key check and admission decide; the first check that fails wins."""

    ADMITTED = 0
    REQUESTS_PER_MINUTE = 1
    TOKENS_PER_MINUTE = 2
    LARGER_THAN_TPM = 3  # more tokens than the whole per-minute limit: never retryable
    CONCURRENCY = 4
    INSUFFICIENT_CREDIT = 5
    UNKNOWN_KEY = 6
    REVOKED_KEY = 7
    EXPIRED_KEY = 8
    MODEL_NOT_ALLOWED = 9
    OVER_REQUEST_BOUND = 10  # prompts x n x max output above max_tokens_per_request
    SPEND_CAP = 11  # the key's spend this period plus its holds would pass its cap
    ROTATED_KEY = 12  # a secret of the key that a rotation replaced (and its grace is over)


def account_key(org_id: str, suffix: str) -> str:
    """A Redis key of one organization; the hash tag keeps all of them in one Redis Cluster slot."""
    return f"{{acct:{org_id}}}:{suffix}"


def key_keys(org_id: str, key_id: str) -> dict[str, str]:
    """The Redis keys of one API key inside its organization (docs/accounts.md)."""
    return {
        "org": account_key(org_id, "org"),
        "key": account_key(org_id, f"key:{key_id}"),
        "buckets": account_key(org_id, f"buckets:{key_id}"),
        "inflight": account_key(org_id, f"inflight:{key_id}"),
        "holds": account_key(org_id, "holds"),
        "leases": account_key(org_id, "leases"),
    }


def lua_source(name: str) -> str:
    """A script of `lua/`, with the constants it shares with Python and its helpers prepended."""
    verdicts = ", ".join(f"{verdict.name} = {verdict.value}" for verdict in Verdict)
    parts = [f"local SCALE = {SCALE}\nlocal REAP_BATCH = {REAP_BATCH}\nlocal VERDICT = {{{verdicts}}}\n"]
    parts += [(LUA_DIR / "lib" / f"{library}.lua").read_text() for library in LIBRARIES.get(name, ())]
    parts.append((LUA_DIR / f"{name}.lua").read_text())
    return "".join(parts)
