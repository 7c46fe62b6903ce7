"""API keys: never stored or logged in plaintext, and bad keys cost Redis nothing or the same.

Redis's own INFO commandstats counts every command the server ran, whoever sent it, so
"no Redis call" is measured at the server, not inferred from the code.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
import redis

from tokenmart.deployments import auth

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "hello"}]
HANDSHAKE = {"hello", "ping", "client|setinfo", "select"}  # what a new Redis connection sends first
# What runs whatever the requests: each ingress replica's alert deliverer reads the set of
# organizations with alert settings, and the length of their outboxes, once a second (alerts.py).
BACKGROUND = {"smembers", "xlen"}


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per command since the server started, without the INFO calls that read them."""
    stats = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items() if name != "cmdstat_info"
    }


def ran_since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}


def with_checksum(body: str) -> str:
    return auth.KEY_PREFIX + body + auth._checksum(body)


def broken_checksum(key: str) -> str:
    last = key[-1]
    return key[:-1] + ("A" if last != "A" else "B")


def test_keys_failing_the_format_or_checksum_never_reach_redis(marketplace, redis_client):
    key = marketplace.create_key(name="typo", credit_usd=1)["key"]
    bad = [
        broken_checksum(key),
        key[:-1],
        key + "x",
        "sk-tm-" + "!" * 38,
        "sk-live-" + key[8:],
        "not-a-key",
        key.upper(),
    ]
    assert all(not auth.is_well_formed(candidate) for candidate in bad)

    before = command_calls(redis_client)
    for candidate in bad * 5:
        for path in ("/v1/chat/completions", "/v1/key", "/v1/usage"):
            method = marketplace.http.post if path.endswith("completions") else marketplace.http.get
            kwargs = {"json": {"model": "alpha-chat", "messages": MESSAGES}} if path.endswith("completions") else {}
            response = method(path, headers=marketplace.auth(candidate), **kwargs)
            assert response.status_code == 401, response.text
            assert response.json()["error"]["code"] == "invalid_api_key"
    ran = ran_since(before, command_calls(redis_client))
    assert {name: n for name, n in ran.items() if name not in BACKGROUND} == {}


def test_a_key_right_up_to_any_point_is_refused_the_same_way_at_the_same_cost(marketplace, redis_client):
    """Partly right keys take one path: the secrets index is keyed by the whole key's SHA-256,
    so a key that shares a prefix with a real one looks up an unrelated entry (there is none),
    with one GET and no script."""
    key = marketplace.create_key(name="real", credit_usd=1)["key"]
    body = key[len(auth.KEY_PREFIX) : len(auth.KEY_PREFIX) + auth._BODY_LEN]
    flip = {c: ("a" if c != "a" else "b") for c in set(body)}
    variants = [with_checksum(body[:right] + "".join(flip[c] for c in body[right:])) for right in range(0, 32, 4)]
    variants.append(with_checksum(body[:-1] + flip[body[-1]]))  # all but the last character right

    assert marketplace.chat(key, max_tokens=1).status_code == 200  # the real key is found and admitted
    marketplace.chat(variants[0], max_tokens=1)  # the ingress's connection pool is warm
    bodies, costs = set(), set()
    for variant in variants:
        before = command_calls(redis_client)
        response = marketplace.chat(variant, max_tokens=1)
        # A settlement still on one pooled connection may make the next lookup open another;
        # its handshake is the pool's, not the key's.
        ran = {
            name: n
            for name, n in ran_since(before, command_calls(redis_client)).items()
            if name not in HANDSHAKE | BACKGROUND
        }
        assert response.status_code == 401, response.text
        bodies.add(response.text)
        costs.add(tuple(sorted(ran.items())))
    assert len(bodies) == 1, bodies  # the same answer, word for word
    assert '"code":"invalid_api_key"' in bodies.pop().replace(" ", "")
    # One secrets-index lookup each (a miss is not cached, so every replica asks every time),
    # and the same for every variant: no record is read, no script runs.
    assert costs == {(("get", 1),)}, costs


def _all_redis_text(client: redis.Redis) -> str:
    parts: list[str] = []
    for name in client.scan_iter(count=1000):
        parts.append(name)
        kind = client.type(name)
        if kind == "string":
            parts.append(client.get(name) or "")
        elif kind == "hash":
            parts.extend(f"{k}={v}" for k, v in client.hgetall(name).items())
        elif kind == "stream":
            parts.extend(f"{k}={v}" for _, fields in client.xrange(name) for k, v in fields.items())
        elif kind == "zset":
            parts.extend(member for member, _ in client.zrange(name, 0, -1, withscores=True))
        elif kind == "set":
            parts.extend(client.smembers(name))
        elif kind == "list":
            parts.extend(client.lrange(name, 0, -1))
    return "\n".join(parts)


def test_no_plaintext_key_in_redis_the_ledger_or_the_logs(marketplace, redis_client):
    created = marketplace.create_key(name="secret", credit_usd=1)
    key = created["key"]
    secret = key[len(auth.KEY_PREFIX) :]
    # A rotation shows the new secret once and keeps the old one for its grace: neither is stored.
    rotated = marketplace.http.post(
        f"/admin/v1/keys/{created['id']}/rotate", json={"grace_s": 600}, headers=marketplace.admin_headers
    )
    assert rotated.status_code == 200, rotated.text
    new_key = rotated.json()["key"]
    new_secret = new_key[len(auth.KEY_PREFIX) :]
    assert rotated.json()["id"] == created["id"] and new_key != key
    assert marketplace.chat(new_key, max_tokens=2).status_code == 200
    assert marketplace.chat(key, max_tokens=2).status_code == 200
    with marketplace.http.stream(
        "POST", "/v1/chat/completions", headers=marketplace.auth(key),
        json={"model": "beta-chat", "messages": MESSAGES, "stream": True, "max_tokens": 2},
    ) as response:  # fmt: skip
        assert response.status_code == 200
        response.read()
    assert marketplace.chat(broken_checksum(key), max_tokens=2).status_code == 401
    assert marketplace.http.get("/v1/key", headers=marketplace.auth(key)).status_code == 200

    everything = _all_redis_text(redis_client)
    # The hashes are what is stored (the record and the secrets index)...
    assert f"tm:auth:{auth.hash_key(key)}" in everything and f"tm:auth:{auth.hash_key(new_key)}" in everything
    assert f"prev_key_hash={auth.hash_key(key)}" in everything
    assert f"{{acct:{created['org_id']}}}:ledger" in everything  # ...and the ledger was written
    for plain in (secret, new_secret):
        assert plain not in everything and plain[:16] not in everything

    logs = [path for path in glob.glob("/tmp/ray/session_latest/logs/**/*", recursive=True) if os.path.isfile(path)]
    assert logs
    for path in logs:
        text = Path(path).read_bytes()
        for plain in (secret, new_secret):
            assert plain.encode() not in text, f"a key appears in {path}"
            assert plain[:16].encode() not in text, f"part of a key appears in {path}"
