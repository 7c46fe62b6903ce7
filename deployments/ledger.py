"""The ledger's export (every organization's settlement events, merged in one total order) and
its retention (old events trimmed into a per-organization checkpoint of totals).

Export order and cursor. Rows are ordered by (stream entry id as (ms, seq), organization id).
A cursor is a position in that order, urlsafe base64 of "<ms>-<seq>|<org id>", and means
"every row at or before this position has been read". Each row carries its own cursor (`id`)
and a page returns `next`, always a cursor (never None), so a consumer polls with it for rows
settled later. `next` is the last row's id, or, once a page has returned everything settled so
far, the settled horizon itself ("<horizon + 1>-0|", before any organization's entry at that
ms), so an idle consumer's cursor keeps up and never falls behind the retention trim. A cursor
belongs to the organization filter it was read with. It holds only stream ids, which persist
with the data, so paging resumes across a Redis restart.

No gaps, no duplicates. A page first reads Redis TIME and returns only entries with
ms <= TIME - settle_lag_ms (the settled horizon). An entry added after that read gets an id
above the horizon (XADD ids are at least the primary's clock), so a later page finds it after
the cursor; the lag also covers a failover to a replica whose clock is a little behind. Each
organization's checkpoint and entries are read in one MULTI/EXEC, so a trim between them
cannot hide a gap.

Rows. Usage rows (one per settled request) are the rows without `event`; operator notices
(`event` = `hold_exceeded`) are exported too, marked by `event`. A notice's `cost_micros` is the
cost the request had, of which only `charged_micros` was charged (the usage row of the same
`request_id` holds the charge): sum money over usage rows only.

Retention. `trim_ledger.lua` removes the oldest entries below a bound and adds each one to
`{acct:O}:ledger_checkpoint` in the same atomic call, so checkpoint + remaining entries always
give the same totals as the untrimmed ledger (`checkpoint_totals` reads them for
reconciliation). A cursor older than a checkpoint's `last_id` cannot be resumed: 409
`ledger_trimmed`, with the oldest cursor that can. An export without a cursor starts there: at
the oldest position every organization still holds in full.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import csv
import functools
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from .errors import BadRequest, Conflict, ServiceUnavailable
from .schemas import micros_to_usd
from .scripts import account_key, lua_source
from .usage import parse_counter

ORGS_SET = "tm:orgs"
MAX_PAGE = 10_000
DEFAULT_SETTLE_LAG_MS = 2_000
DEFAULT_TRIM_BATCH = 1_000
MS_PER_DAY = 86_400_000
MAX_ID_PART = 2**64 - 1  # a stream id's ms and seq are unsigned 64-bit
# The organizations read at once: each read is one MULTI/EXEC on its own connection.
CONCURRENT_READS = 16
# Reads of an export from the start, should trims keep moving its checkpoints meanwhile.
START_ATTEMPTS = 3

# Event fields that hold integers (an empty value, e.g. a missing reservation, becomes None).
INTEGER_FIELDS = frozenset(
    {
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "cost_micros",
        "hold_micros",
        "reserved_tokens",
        "started_at_ms",
        "settled_at_ms",
        "charged_micros",
        "uncharged_micros",
    }
)
CSV_COLUMNS = (
    "id",
    "entry_id",
    "org_id",
    "key_id",
    "request_id",
    "response_id",
    "model",
    "served_by",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cost_micros",
    "cost_usd",
    "hold_micros",
    "reserved_tokens",
    "started_at_ms",
    "settled_at_ms",
    "day",
    "event",
    # what a `hold_exceeded` notice says beyond the usage columns (empty on usage rows)
    "charged_micros",
    "uncharged_micros",
)
CHECKPOINT_EVENTS, CHECKPOINT_COST = "events", "cost_micros"

_ENTRY_ID = re.compile(r"(\d{1,20})-(\d{1,20})")
_CURSOR_TEXT = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_INTEGER = re.compile(r"-?[0-9]+")

Position = tuple[int, int, str]  # (ms, seq, org id); org "" sorts before every organization


@dataclass
class LedgerPage:
    """One page of the export. `next` is always a cursor: pass it as `after` to continue, now
    or later (it is the settled horizon once everything settled so far has been read).
    `has_more` says more settled rows may follow right now; when False, poll later."""

    rows: list[dict[str, Any]]
    next: str
    has_more: bool = False


@dataclass
class _OrgRead:
    org_id: str
    entries: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    trimmed_to: tuple[int, int] | None = None  # the checkpoint's last_id


def parse_entry_id(entry_id: str) -> tuple[int, int]:
    match = _ENTRY_ID.fullmatch(entry_id)
    if match is None:
        raise ValueError(f"not a stream entry id: {entry_id!r}")
    ms, seq = int(match[1]), int(match[2])
    if ms > MAX_ID_PART or seq > MAX_ID_PART:
        raise ValueError(f"stream entry id out of range: {entry_id!r}")
    return ms, seq


def encode_cursor(position: Position) -> str:
    ms, seq, org_id = position
    return base64.urlsafe_b64encode(f"{ms}-{seq}|{org_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position:
    """The position of a cursor; a malformed one is the client's 400 naming `after`."""
    try:
        if not _CURSOR_TEXT.fullmatch(cursor):
            raise ValueError("not urlsafe base64")
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True).decode()
        entry_id, org_id = raw.split("|", 1)
        ms, seq = parse_entry_id(entry_id)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise BadRequest(
            "Invalid value for 'after': not a ledger cursor. Pass a row's `id` or a page's `next` unchanged.",
            param="after",
        ) from exc
    return ms, seq, org_id


def _first_id_after(position: Position, org_id: str) -> str | None:
    """The smallest entry id of `org_id` that sorts after `position` (None: no id can)."""
    ms, seq, cursor_org = position
    if org_id > cursor_org:
        return f"{ms}-{seq}"
    if seq < MAX_ID_PART:
        return f"{ms}-{seq + 1}"
    return f"{ms + 1}-0" if ms < MAX_ID_PART else None


async def _read_org(
    redis: aioredis.Redis, org_id: str, start: str | None, horizon_ms: int, count: int, gate: asyncio.Semaphore
) -> _OrgRead:
    async with gate:
        pipe = redis.pipeline(transaction=True)
        pipe.hget(account_key(org_id, "ledger_checkpoint"), "last_id")
        if start is not None:
            pipe.xrange(account_key(org_id, "ledger"), min=start, max=str(horizon_ms), count=count)
        replies = await pipe.execute()
    last_id = replies[0]
    return _OrgRead(
        org_id=org_id,
        entries=replies[1] if start is not None else [],
        trimmed_to=parse_entry_id(last_id) if last_id else None,
    )


async def _oldest_position(redis: aioredis.Redis, org_ids: list[str]) -> Position | None:
    """The position past every trimmed entry of these organizations (None: none trimmed)."""
    pipe = redis.pipeline(transaction=False)
    for org_id in org_ids:
        pipe.hget(account_key(org_id, "ledger_checkpoint"), "last_id")
    last_ids = await pipe.execute() if org_ids else []
    marks = [(*parse_entry_id(last_id), org_id) for org_id, last_id in zip(org_ids, last_ids, strict=True) if last_id]
    return max(marks, default=None)


def ledger_row(org_id: str, entry_id: str, fields: Mapping[str, str]) -> dict[str, Any]:
    """One exported row: its cursor, the entry id, the organization, every event field
    (integers as ints), and `cost_usd`."""
    ms, seq = parse_entry_id(entry_id)
    row: dict[str, Any] = {"id": encode_cursor((ms, seq, org_id)), "entry_id": entry_id, "org_id": org_id}
    for name, value in fields.items():
        if name in row:
            continue  # the stream's organization and id are the row's
        if name in INTEGER_FIELDS:
            row[name] = int(value) if _INTEGER.fullmatch(value) else None
        else:
            row[name] = value
    cost = row.get("cost_micros")
    row["cost_usd"] = micros_to_usd(cost) if isinstance(cost, int) else None
    return row


async def export_page(
    redis: aioredis.Redis,
    org_ids: list[str],
    after: str | None,
    limit: int,
    *,
    settle_lag_ms: int = DEFAULT_SETTLE_LAG_MS,
) -> LedgerPage:
    """The next `limit` (1..10000) settled ledger rows of `org_ids` after the cursor `after`
    (None or "": from the oldest position every organization still holds in full). Raises
    BadRequest for a malformed cursor or limit, and Conflict `ledger_trimmed` when rows after
    `after` were already trimmed.
    The client must decode responses (`connect` does)."""
    if not 1 <= limit <= MAX_PAGE:
        raise BadRequest(f"Invalid value for 'limit': must be between 1 and {MAX_PAGE}.", param="limit")
    if settle_lag_ms < 1:
        # an entry added in the very ms of the TIME read could land beside the page, unread
        raise ValueError("settle_lag_ms must be >= 1")
    position: Position | None = decode_cursor(after) if after else None
    org_ids = sorted(set(org_ids))
    gate = asyncio.Semaphore(CONCURRENT_READS)
    for _ in range(START_ATTEMPTS):
        # From the start: the oldest position that every organization still holds in full. An
        # organization's retained entries below another's checkpoint are left out (with one
        # retention cutoff for all, as `trim_all` keeps, there are none), so the cursors of
        # this export never fall behind a checkpoint.
        start = position if position is not None else await _oldest_position(redis, org_ids)
        seconds, micros = await redis.time()
        horizon_ms = int(seconds) * 1000 + int(micros) // 1000 - settle_lag_ms
        reads = await asyncio.gather(
            *(
                _read_org(
                    redis,
                    org_id,
                    (_first_id_after(start, org_id) if start is not None else "-") if horizon_ms >= 0 else None,
                    horizon_ms,
                    limit,
                    gate,
                )
                for org_id in org_ids
            )
        )
        trimmed = [(*read.trimmed_to, read.org_id) for read in reads if read.trimmed_to is not None]
        missed = [mark for mark in trimmed if start is None or mark > start]
        if not missed:
            break
        if position is None:
            continue  # a trim ran between reading the checkpoints and the entries: start again
        ms, seq, org_id = max(missed)
        raise Conflict(
            f"The ledger after this cursor was trimmed by retention (organization {org_id} up to entry "
            f"{ms}-{seq}); its totals are in the checkpoint. The oldest cursor past every trimmed entry is "
            f"{encode_cursor(max(trimmed))}; omit 'after' to export from there.",
            param="after",
            code="ledger_trimmed",
        )
    else:
        raise ServiceUnavailable("The ledger is being trimmed right now. Retry shortly.", retry_after_s=1)

    merged = sorted(
        (
            (*parse_entry_id(entry_id), read.org_id, entry_id, fields)
            for read in reads
            for entry_id, fields in read.entries
        ),
        key=lambda item: item[:3],
    )
    page = merged[:limit]
    rows = [ledger_row(org_id, entry_id, fields) for _, _, org_id, entry_id, fields in page]
    has_more = len(merged) > limit or any(len(read.entries) >= limit for read in reads)
    candidates: list[Position] = [start] if start is not None else []
    if page:
        candidates.append(page[-1][:3])
    if not has_more:
        candidates.append((max(horizon_ms + 1, 0), 0, ""))
    return LedgerPage(rows=rows, next=encode_cursor(max(candidates)), has_more=has_more)


def rows_jsonl(rows: Iterable[Mapping[str, Any]]) -> str:
    """One JSON object per line, every field of each row."""
    return "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows)


def _csv_value(row: Mapping[str, Any], column: str) -> Any:
    if column == "cost_usd" and isinstance(row.get("cost_micros"), int):
        units, micros = divmod(row["cost_micros"], 1_000_000)
        return f"{units}.{micros:06d}"  # exact, never in exponent notation
    return row.get(column)


def rows_csv(rows: Iterable[Mapping[str, Any]], *, header: bool = True) -> str:
    """CSV in the fixed `CSV_COLUMNS` order (a field a row lacks is empty); `header=False` for
    the pages after the first when appending to one file."""
    out = io.StringIO()
    writer = csv.writer(out)
    if header:
        writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_csv_value(row, column) for column in CSV_COLUMNS])
    return out.getvalue()


@functools.cache
def _trim_source() -> str:
    return lua_source("trim_ledger")


async def trim_ledger(redis: aioredis.Redis, org_id: str, older_than_ms: int, batch: int = DEFAULT_TRIM_BATCH) -> int:
    """Trim the organization's ledger entries older than `older_than_ms` into its checkpoint,
    `batch` entries per atomic call; returns how many were trimmed."""
    if batch < 1:
        raise ValueError("batch must be >= 1")
    script = redis.register_script(_trim_source())
    keys = [account_key(org_id, "ledger"), account_key(org_id, "ledger_checkpoint")]
    bound = f"{max(older_than_ms, 0)}-0"
    total = 0
    while True:
        trimmed = int(await script(keys=keys, args=[bound, batch]))
        total += trimmed
        if trimmed < batch:
            return total


async def trim_all(redis: aioredis.Redis, retention_days: int, batch: int = DEFAULT_TRIM_BATCH) -> int:
    """Trim every organization's ledger to the last `retention_days` days (by Redis TIME)."""
    if retention_days < 1:
        raise ValueError("retention_days must be >= 1")
    seconds, micros = await redis.time()
    cutoff_ms = int(seconds) * 1000 + int(micros) // 1000 - retention_days * MS_PER_DAY
    total = 0
    for org_id in sorted([org async for org in redis.sscan_iter(ORGS_SET)]):
        total += await trim_ledger(redis, org_id, cutoff_ms, batch)
    return total


def checkpoint_totals(raw: Mapping[str, str]) -> tuple[Counter[str], int, int]:
    """(the usage counters "<day>|<key id>|<model>|<metric>" of the trimmed events, how many
    usage events were trimmed, their cost_micros), from a checkpoint hash, for reconciliation."""
    counters: Counter[str] = Counter()
    for name, value in raw.items():
        if parse_counter(name) is not None:
            counters[name] = int(value)
    return counters, int(raw.get(CHECKPOINT_EVENTS) or 0), int(raw.get(CHECKPOINT_COST) or 0)
