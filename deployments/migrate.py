"""`tokenmart migrate`: move data written before organizations into the organization layout.

Before organizations (layout 1), each key was its own account: `tm:keys` listed key ids and
`{acct:<key id>}:...` held the key record with its credit, buckets, in-flight set, holds,
usage counters ("<day>|<model>|<metric>"), ledger stream and settlement markers. Layout 2
(docs/accounts.md) gives each such key an organization of its own, `org_` + the same 20 hex
digits, holding the key's credit, and keeps the key's id and secret.

Every step is idempotent and the old key record is deleted last, so a migration cut off at
any point finishes when it is run again; a finished one finds nothing to do. Ledger entries
keep their stream ids (export cursors stay valid) and gain `org_id`. Run it with the ingress
stopped (or before upgrading it): an ingress of the old version still serving would write to
the old layout after its data was moved. `tokenmart up` runs it before the app starts.
Settlements spooled by an old-version ingress (a Redis outage during the upgrade) must have
been replayed before the upgrade; the new version does not read old spool entries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import redis as redis_sync

from .keystore import KEY_ORGS, ORG_INDEX, SCHEMA_KEY, SCHEMA_VERSION, auth_index, key_key, org_key
from .scripts import account_key
from .usage import counter_field

logger = logging.getLogger("tokenmart.migrate")

LEGACY_KEY_INDEX = "tm:keys"
ORG_FIELDS = ("name", "created_at", "balance_micros", "hold_micros", "spent_micros", "credited_micros")
KEY_FIELDS = ("id", "name", "prefix", "key_hash", "status", "models", "limits", "created_at", "expires_at")


@dataclass
class MigrationReport:
    schema_before: int
    keys_migrated: list[str] = field(default_factory=list)
    ledger_events: int = 0
    settled_markers: int = 0
    schema_after: int = SCHEMA_VERSION

    @property
    def changed(self) -> bool:
        return bool(self.keys_migrated) or self.schema_before != self.schema_after


def legacy_org_id(key_id: str) -> str:
    """The organization a migrated key gets: `org_` + the key id's hex digits."""
    return "org_" + key_id.removeprefix("key_")


def schema_version(client: redis_sync.Redis) -> int:
    """The layout the data is in: 2 once migrated, 1 for data written before organizations,
    and 2 for an empty Redis (nothing to migrate)."""
    stored = client.get(SCHEMA_KEY)
    if stored:
        return int(stored)
    return 1 if client.exists(LEGACY_KEY_INDEX) else SCHEMA_VERSION


def migrate(client: redis_sync.Redis, progress: Callable[[str], None] | None = None) -> MigrationReport:
    """Move every layout-1 key into layout 2, then mark the data as layout 2.

    `client` must decode responses (decode_responses=True).
    """
    report = MigrationReport(schema_before=schema_version(client))
    for key_id in sorted(client.smembers(LEGACY_KEY_INDEX)):
        old = account_key(key_id, "key")
        record = client.hgetall(old)
        if record:
            _migrate_key(client, key_id, record, report)
            report.keys_migrated.append(key_id)
            if progress is not None:
                progress(key_id)
        client.srem(LEGACY_KEY_INDEX, key_id)
    client.set(SCHEMA_KEY, SCHEMA_VERSION)
    return report


def _migrate_key(client: redis_sync.Redis, key_id: str, record: dict[str, str], report: MigrationReport) -> None:
    org_id = legacy_org_id(key_id)

    def old(suffix: str) -> str:
        return account_key(key_id, suffix)

    def new(suffix: str) -> str:
        return account_key(org_id, suffix)

    # The organization and the key record: overwritten from the old record on every run, which
    # stays the source of truth until it is deleted at the end.
    client.sadd(ORG_INDEX, org_id)
    org = {name: record.get(name) or "0" for name in ORG_FIELDS}
    client.hset(org_key(org_id), mapping={"id": org_id, **org})
    fields = {name: record.get(name, "") for name in KEY_FIELDS}
    fields.update(
        org_id=org_id,
        hold_micros=record.get("hold_micros") or "0",
        spent_micros=record.get("spent_micros") or "0",
        prev_key_hash="",
        prev_valid_until_ms="0",
        cap_micros="",
        cap_period="",
        period_id="",
        period_spent_micros="0",
    )
    client.hset(key_key(org_id, key_id), mapping=fields)
    client.hset(KEY_ORGS, key_id, org_id)
    client.set(auth_index(record["key_hash"]), f"{org_id} {key_id}")

    usage = {}
    for name, value in client.hgetall(old("usage")).items():
        day, model, metric = name.split("|", 2)
        usage[counter_field(day, key_id, model, metric)] = value
    if usage:
        client.hset(new("usage"), mapping=usage)

    buckets = client.hgetall(old("buckets"))
    if buckets:
        client.hset(new(f"buckets:{key_id}"), mapping=buckets)
        ttl = client.pttl(old("buckets"))
        if ttl > 0:
            client.pexpire(new(f"buckets:{key_id}"), ttl)
    inflight = client.zrange(old("inflight"), 0, -1, withscores=True)
    if inflight:
        client.zadd(new(f"inflight:{key_id}"), {member: score for member, score in inflight})
        client.zadd(new("leases"), {f"{key_id}|{member}": score for member, score in inflight})
    holds = client.hgetall(old("holds"))
    if holds:
        client.hset(new("holds"), mapping=holds)

    # The ledger keeps its entry ids; a run cut off part way resumes after the last copied one.
    copied = client.xrevrange(new("ledger"), count=1)
    last = copied[0][0] if copied else "0-0"
    for entry_id, event in client.xrange(old("ledger"), min=f"({last}" if copied else "-"):
        client.xadd(new("ledger"), {**event, "org_id": org_id}, id=entry_id)
        report.ledger_events += 1

    markers = list(client.scan_iter(match=old("settled:*"), count=1000))
    for marker in markers:
        ttl = client.pttl(marker)
        if ttl > 0:
            client.set(new(marker.split(":", 2)[2]), "1", px=ttl, nx=True)
            report.settled_markers += 1

    client.delete(old("usage"), old("buckets"), old("inflight"), old("holds"), old("ledger"), *markers)
    client.delete(old("key"))  # last: while it exists, the key is not migrated yet
