"""The ledger export and its retention trim, on a real redis-server (no Ray).

Events are written by hand with XADD in the documented layout (docs/accounts.md, "Ledger event
fields"), with explicit ids, so the order, the settled horizon and the trim bound are exact.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from typing import Any, TypeVar

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenmart.deployments.errors import BadRequest, Conflict
from tokenmart.deployments.ledger import (
    CSV_COLUMNS,
    checkpoint_totals,
    encode_cursor,
    export_page,
    rows_csv,
    rows_jsonl,
    trim_all,
    trim_ledger,
)
from tokenmart.deployments.scripts import account_key

from ..helpers import run_with_redis as run
from ..helpers import wait_until

pytestmark = pytest.mark.integration

T = TypeVar("T")

ORG_A, ORG_B, ORG_C = ("org_" + letter * 20 for letter in "abc")
KEY_A, KEY_B, KEY_C = ("key_" + letter * 20 for letter in "abc")
BASE = 1_700_000_000_000  # 2023-11-14: long settled
DAY = "2023-11-14"
LAG = 1


def usage(org: str, key: str, n: int, *, model: str = "alpha-chat", day: str = DAY, cost: int = 0) -> dict[str, str]:
    """A settlement event of request `n`, every documented field (as Redis returns them: text)."""
    return {
        "request_id": f"req_{n:04d}",
        "response_id": f"chatcmpl-{n:04d}",
        "org_id": org,
        "key_id": key,
        "model": model,
        "served_by": "alpha-chat-replica-1",
        "prompt_tokens": str(10 + n),
        "completion_tokens": str(20 + n),
        "cached_tokens": str(n % 3),
        "cost_micros": str(cost or 7 + n),
        "status": "completed" if n % 4 else "aborted",
        "hold_micros": str(1_000 + n),
        "reserved_tokens": str(100 + n),
        "started_at_ms": str(BASE - 500 + n),
        "settled_at_ms": str(BASE + n),
        "day": day,
    }


def hold_exceeded(org: str, key: str, n: int, *, cost: int, charged: int, day: str = DAY) -> dict[str, str]:
    """The operator notice settlement writes when a request cost more than it held."""
    return {
        "event": "hold_exceeded",
        "request_id": f"req_{n:04d}",
        "org_id": org,
        "key_id": key,
        "model": "alpha-chat",
        "cost_micros": str(cost),
        "charged_micros": str(charged),
        "hold_micros": str(charged),
        "uncharged_micros": str(cost - charged),
        "settled_at_ms": str(BASE + n),
        "day": day,
    }


# (organization, entry id, fields). Several organizations share an ms, and org A and org C
# share the id 1000-1: the order is (ms, seq, org id).
EVENTS: list[tuple[str, str, dict[str, str]]] = [
    (ORG_A, f"{BASE + 1000}-0", usage(ORG_A, KEY_A, 1)),
    (ORG_A, f"{BASE + 1000}-1", usage(ORG_A, KEY_A, 2)),
    (ORG_A, f"{BASE + 1002}-0", hold_exceeded(ORG_A, KEY_A, 2, cost=90, charged=60)),
    (ORG_A, f"{BASE + 1005}-0", usage(ORG_A, KEY_A, 3, model="beta-chat")),
    (ORG_B, f"{BASE + 1000}-0", usage(ORG_B, KEY_B, 4)),
    (ORG_B, f"{BASE + 1001}-0", usage(ORG_B, KEY_B, 5)),
    (ORG_B, f"{BASE + 1005}-0", usage(ORG_B, KEY_B, 6)),
    (ORG_C, f"{BASE + 999}-0", usage(ORG_C, KEY_C, 7)),
    (ORG_C, f"{BASE + 1000}-1", usage(ORG_C, KEY_C, 8)),
    (ORG_C, f"{BASE + 1003}-0", usage(ORG_C, KEY_C, 9)),
    (ORG_C, f"{BASE + 1003}-1", usage(ORG_C, KEY_C, 10)),
]
ORDER = [
    (f"{BASE + 999}-0", ORG_C),
    (f"{BASE + 1000}-0", ORG_A),
    (f"{BASE + 1000}-0", ORG_B),
    (f"{BASE + 1000}-1", ORG_A),
    (f"{BASE + 1000}-1", ORG_C),
    (f"{BASE + 1001}-0", ORG_B),
    (f"{BASE + 1002}-0", ORG_A),
    (f"{BASE + 1003}-0", ORG_C),
    (f"{BASE + 1003}-1", ORG_C),
    (f"{BASE + 1005}-0", ORG_A),
    (f"{BASE + 1005}-0", ORG_B),
]
ORGS = [ORG_A, ORG_B, ORG_C]


def write(client: redis.Redis, events: list[tuple[str, str, dict[str, str]]]) -> None:
    for org, entry_id, fields in events:
        client.xadd(account_key(org, "ledger"), fields, id=entry_id)


async def page_through(
    client: Any, orgs: list[str], limit: int, after: str | None = None, *, pages: int | None = None
) -> tuple[list[dict[str, Any]], str]:
    """Every row after `after` (or the first `pages` pages), page by page; and the last `next`."""
    rows: list[dict[str, Any]] = []
    done = 0
    while pages is None or done < pages:
        page = await export_page(client, orgs, after, limit, settle_lag_ms=LAG)
        assert len(page.rows) <= limit
        rows += page.rows
        after, done = page.next, done + 1
        if not page.has_more:
            break
    assert after is not None
    return rows, after


def redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


# -- export ----------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 2, 3, 4, 7])
def test_pages_of_any_size_concatenate_to_the_one_total_order(redis_server, redis_client, limit):
    write(redis_client, EVENTS)
    full = run(redis_server.url, lambda c: export_page(c, ORGS, None, 10_000, settle_lag_ms=LAG))
    assert [(row["entry_id"], row["org_id"]) for row in full.rows] == ORDER
    assert not full.has_more

    paged, last = run(redis_server.url, lambda c: page_through(c, ORGS, limit))
    assert paged == full.rows
    assert len({row["id"] for row in paged}) == len(ORDER)
    # Caught up: the last cursor gives nothing more, and is still a cursor to poll with.
    again = run(redis_server.url, lambda c: export_page(c, ORGS, last, limit, settle_lag_ms=LAG))
    assert (again.rows, again.has_more) == ([], False)
    # Each row's id resumes right after that row.
    for index, row in enumerate(full.rows):
        rest = run(redis_server.url, lambda c, after=row["id"]: page_through(c, ORGS, 10_000, after))[0]
        assert rest == full.rows[index + 1 :]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    specs=st.lists(st.tuples(st.sampled_from(ORGS), st.integers(0, 2)), max_size=30),
    limit=st.integers(1, 6),
)
def test_any_interleaving_pages_into_the_one_total_order(redis_server, redis_client, specs, limit):
    redis_client.flushall()
    clock, newest, events = BASE, {}, []
    for n, (org, step) in enumerate(specs):
        clock += step  # 0: the same ms as the entry before, in this organization or another
        ms, seq = newest.get(org, (0, -1))
        newest[org] = (clock, seq + 1) if ms == clock else (clock, 0)
        events.append((org, "{}-{}".format(*newest[org]), usage(org, KEY_A, n)))
    write(redis_client, events)

    rows, _ = run(redis_server.url, lambda c: page_through(c, ORGS, limit))
    expected = sorted(events, key=lambda event: (*map(int, event[1].split("-")), event[0]))
    assert [(row["org_id"], row["entry_id"], row["request_id"]) for row in rows] == [
        (org, entry_id, fields["request_id"]) for org, entry_id, fields in expected
    ]


def test_a_row_carries_every_field_with_numbers_as_ints_and_its_cost_in_usd(redis_server, redis_client):
    write(redis_client, EVENTS)
    rows = run(redis_server.url, lambda c: export_page(c, [ORG_A], None, 10, settle_lag_ms=LAG)).rows
    first_id = f"{BASE + 1000}-0"
    assert rows[0] == {
        "id": encode_cursor((BASE + 1000, 0, ORG_A)),
        "entry_id": first_id,
        "org_id": ORG_A,
        "request_id": "req_0001",
        "response_id": "chatcmpl-0001",
        "key_id": KEY_A,
        "model": "alpha-chat",
        "served_by": "alpha-chat-replica-1",
        "prompt_tokens": 11,
        "completion_tokens": 21,
        "cached_tokens": 1,
        "cost_micros": 8,
        "status": "completed",
        "hold_micros": 1_001,
        "reserved_tokens": 101,
        "started_at_ms": BASE - 499,
        "settled_at_ms": BASE + 1,
        "day": DAY,
        "cost_usd": 0.000008,
    }
    notice = rows[2]
    assert notice["event"] == "hold_exceeded"
    assert (notice["cost_micros"], notice["charged_micros"], notice["uncharged_micros"]) == (90, 60, 30)
    assert notice["cost_usd"] == 0.00009
    assert [row.get("event") for row in rows] == [None, None, "hold_exceeded", None]


def test_paging_resumes_with_the_same_cursor_after_redis_restarts(redis_server, redis_client):
    redis_server.make_durable()
    try:
        write(redis_client, EVENTS)
        first, cursor = run(redis_server.url, lambda c: page_through(c, ORGS, 3, pages=2))
        assert [(row["entry_id"], row["org_id"]) for row in first] == ORDER[:6]

        redis_server.restart()
        rest, _ = run(redis_server.url, lambda c: page_through(c, ORGS, 3, cursor))
        assert [(row["entry_id"], row["org_id"]) for row in first + rest] == ORDER
    finally:
        redis_server.make_durable(False)


def test_entries_inside_the_settle_lag_wait_and_are_not_passed_over(redis_server, redis_client):
    now = redis_ms(redis_client)
    settled = (ORG_B, f"{now - 60_000}-0", usage(ORG_B, KEY_B, 1))
    recent = (ORG_A, f"{now + 300}-0", usage(ORG_A, KEY_A, 2))  # settles 300 ms from now
    write(redis_client, [settled, recent])

    page = run(redis_server.url, lambda c: export_page(c, ORGS, None, 10, settle_lag_ms=2_000))
    assert [(row["entry_id"], row["org_id"]) for row in page.rows] == [(settled[1], ORG_B)]
    assert not page.has_more
    cursor = page.next

    # Past its ms, but still inside the 2 s lag: held back, while the cursor moves on.
    wait_until(lambda: redis_ms(redis_client) > now + 400, 10, what="Redis TIME past the recent entry")
    held = run(redis_server.url, lambda c: export_page(c, ORGS, cursor, 10, settle_lag_ms=2_000))
    assert held.rows == []
    # An entry added now (ids come from the server's clock) also lands after the cursor.
    added = redis_client.xadd(account_key(ORG_C, "ledger"), usage(ORG_C, KEY_C, 3))

    wait_until(lambda: redis_ms(redis_client) > int(added.split("-")[0]) + 2_000, 10, what="the lag to pass")
    later = run(redis_server.url, lambda c: export_page(c, ORGS, held.next, 10, settle_lag_ms=2_000))
    assert [(row["entry_id"], row["org_id"]) for row in later.rows] == [(recent[1], ORG_A), (added, ORG_C)]


def test_only_the_given_organizations_are_exported(redis_server, redis_client):
    write(redis_client, EVENTS)
    rows, _ = run(redis_server.url, lambda c: page_through(c, [ORG_C, ORG_A, ORG_C], 2))
    assert [(row["entry_id"], row["org_id"]) for row in rows] == [item for item in ORDER if item[1] != ORG_B]
    nothing = run(redis_server.url, lambda c: export_page(c, ["org_" + "d" * 20], None, 5, settle_lag_ms=LAG))
    assert (nothing.rows, nothing.has_more) == ([], False)


def test_csv_and_jsonl_parse_back_to_the_same_values(redis_server, redis_client):
    write(redis_client, EVENTS)
    rows = run(redis_server.url, lambda c: export_page(c, ORGS, None, 100, settle_lag_ms=LAG)).rows

    assert [json.loads(line) for line in rows_jsonl(rows).splitlines()] == rows

    text = rows_csv(rows)
    lines = text.splitlines()
    assert lines[0] == ",".join(CSV_COLUMNS)
    row_a = rows[1]  # org A's first usage row
    assert lines[2] == (
        f"{row_a['id']},{BASE + 1000}-0,{ORG_A},{KEY_A},req_0001,chatcmpl-0001,alpha-chat,alpha-chat-replica-1,"
        f"completed,11,21,1,8,0.000008,1001,101,{BASE - 499},{BASE + 1},{DAY},,,"
    )
    notice = rows[6]
    assert lines[7] == (
        f"{notice['id']},{BASE + 1002}-0,{ORG_A},{KEY_A},req_0002,,alpha-chat,,,,,,90,0.000090,60,,,"
        f"{BASE + 2},{DAY},hold_exceeded,60,30"
    )
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert len(parsed) == len(rows)
    for row, back in zip(rows, parsed, strict=True):
        for column in CSV_COLUMNS:
            value = row.get(column)
            if value is None:
                assert back[column] == ""
            elif isinstance(value, int):
                assert int(back[column]) == value
            elif isinstance(value, float):
                assert float(back[column]) == value
            else:
                assert back[column] == value
    assert rows_csv(rows[:2], header=False).splitlines() == lines[1:3]


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor!",
        "abc",
        encode_cursor((1, 2, ORG_A)) + "*",
        "MTAwMC0w",  # "1000-0": no organization part
        "eC0wfG9yZw",  # "x-0|org"
        encode_cursor((2**64, 0, ORG_A)),
        "__79",  # not UTF-8
    ],
)
def test_a_malformed_cursor_is_a_400_naming_after(redis_server, redis_client, cursor):
    with pytest.raises(BadRequest) as caught:
        run(redis_server.url, lambda c: export_page(c, ORGS, cursor, 10))
    assert caught.value.status_code == 400
    assert caught.value.body()["error"]["param"] == "after"
    assert caught.value.body()["error"]["code"] == "invalid_value"


@pytest.mark.parametrize("limit", [0, -1, 10_001])
def test_a_limit_outside_1_to_10000_is_a_400_naming_limit(redis_server, redis_client, limit):
    with pytest.raises(BadRequest) as caught:
        run(redis_server.url, lambda c: export_page(c, ORGS, None, limit))
    assert (caught.value.status_code, caught.value.param) == (400, "limit")


# -- trimming --------------------------------------------------------------------------


def implied_totals(events: list[dict[str, str]]) -> Counter[str]:
    """What settlement counts for these events (usage counters in the organization layout),
    and the checkpoint's own totals, computed here independently of the script."""
    totals: Counter[str] = Counter()
    for event in events:
        if "event" in event:
            totals[f"{event['event']}_events"] += 1
            totals["uncharged_micros"] += int(event.get("uncharged_micros", 0))
            continue
        group = f"{event['day']}|{event['key_id']}|{event['model']}|"
        totals[group + "requests"] += 1
        for metric in ("prompt_tokens", "completion_tokens", "cost_micros"):
            totals[group + metric] += int(event[metric])
        if int(event.get("cached_tokens") or 0):  # counted once there are any, as settlement does
            totals[group + "cached_tokens"] += int(event["cached_tokens"])
        totals["events"] += 1
        totals["cost_micros"] += int(event["cost_micros"])
    return totals


def stored_totals(client: redis.Redis, org: str) -> Counter[str]:
    """Checkpoint + the ledger entries still there, through `checkpoint_totals`."""
    raw = client.hgetall(account_key(org, "ledger_checkpoint"))
    counters, events, cost = checkpoint_totals(raw)
    assert set(raw) - set(counters) <= {"last_id", "events", "cost_micros", "hold_exceeded_events", "uncharged_micros"}
    totals = counters + Counter({"events": events, "cost_micros": cost})
    totals += Counter({name: int(raw[name]) for name in ("hold_exceeded_events", "uncharged_micros") if name in raw})
    return totals + implied_totals([fields for _, fields in client.xrange(account_key(org, "ledger"))])


event_strategy = st.tuples(
    st.integers(0, 3),  # ms step from the previous entry (0: the same ms, next seq)
    st.sampled_from(["usage", "usage", "usage", "notice"]),
    st.sampled_from([KEY_A, KEY_B]),
    st.sampled_from(["alpha-chat", "beta-chat"]),
    st.sampled_from(["2023-11-14", "2023-11-15"]),
    st.integers(0, 10**6),
    st.integers(0, 10**12),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    specs=st.lists(event_strategy, min_size=0, max_size=40),
    cuts=st.lists(st.integers(0, 130), min_size=1, max_size=3),
    batch=st.integers(1, 7),
)
def test_checkpoint_and_remaining_events_keep_every_total(redis_server, redis_client, specs, cuts, batch):
    redis_client.flushall()
    events, ms, seq = [], BASE, 0
    for n, (step, kind, key, model, day, tokens, cost) in enumerate(specs):
        ms, seq = (ms + step, 0) if step else (ms, seq + 1)
        if kind == "usage":
            fields = usage(ORG_A, key, n, model=model, day=day, cost=cost)
            fields["prompt_tokens"] = str(tokens)
        else:
            fields = hold_exceeded(ORG_A, key, n, cost=cost + 5, charged=cost, day=day)
            fields["model"] = model
        events.append((ORG_A, f"{ms}-{seq}", fields))
    write(redis_client, events)
    before = implied_totals([fields for _, _, fields in events])
    checkpoint = account_key(ORG_A, "ledger_checkpoint")

    for cut in sorted(cuts):
        older_than = BASE + cut
        older = [entry_id for _, entry_id, _ in events if int(entry_id.split("-")[0]) < older_than]
        run(redis_server.url, lambda c, bound=older_than: trim_ledger(c, ORG_A, bound, batch))
        assert stored_totals(redis_client, ORG_A) == before
        remaining = [entry_id for entry_id, _ in redis_client.xrange(account_key(ORG_A, "ledger"))]
        assert remaining == [entry_id for _, entry_id, _ in events if entry_id not in older]
        if older:
            assert redis_client.hget(checkpoint, "last_id") == older[-1]

        # Trimming again to the same bound changes nothing.
        snapshot = redis_client.hgetall(checkpoint)
        again = run(redis_server.url, lambda c, bound=older_than: trim_ledger(c, ORG_A, bound, batch))
        assert again == 0
        assert redis_client.hgetall(checkpoint) == snapshot


def test_trim_counts_what_it_trimmed_and_stops_at_the_bound(redis_server, redis_client):
    write(redis_client, EVENTS)
    trimmed = run(redis_server.url, lambda c: trim_ledger(c, ORG_A, BASE + 1005, batch=2))
    assert trimmed == 3
    assert [entry_id for entry_id, _ in redis_client.xrange(account_key(ORG_A, "ledger"))] == [f"{BASE + 1005}-0"]
    raw = redis_client.hgetall(account_key(ORG_A, "ledger_checkpoint"))
    group = f"{DAY}|{KEY_A}|alpha-chat|"
    assert raw == {
        "last_id": f"{BASE + 1002}-0",
        "events": "2",
        "cost_micros": "17",
        group + "requests": "2",
        group + "prompt_tokens": "23",
        group + "completion_tokens": "43",
        group + "cost_micros": "17",
        group + "cached_tokens": "3",  # requests 1 and 2: 1 + 2 prompt tokens from the prefix cache
        "hold_exceeded_events": "1",
        "uncharged_micros": "30",
    }
    counters, events, cost = checkpoint_totals(raw)
    assert (counters, events, cost) == (
        Counter(
            {
                group + "requests": 2,
                group + "prompt_tokens": 23,
                group + "completion_tokens": 43,
                group + "cost_micros": 17,
                group + "cached_tokens": 3,
            }
        ),
        2,
        17,
    )
    # The other organizations' ledgers are their own.
    assert redis_client.xlen(account_key(ORG_B, "ledger")) == 3


def test_a_malformed_entry_stops_the_trim_and_changes_nothing(redis_server, redis_client):
    broken = usage(ORG_A, KEY_A, 1)
    del broken["cost_micros"]
    write(redis_client, [(ORG_A, f"{BASE}-0", usage(ORG_A, KEY_A, 0)), (ORG_A, f"{BASE + 1}-0", broken)])
    with pytest.raises(redis.exceptions.ResponseError, match=f"ledger entry {BASE + 1}-0 has no integer cost_micros"):
        run(redis_server.url, lambda c: trim_ledger(c, ORG_A, BASE + 10))
    assert redis_client.xlen(account_key(ORG_A, "ledger")) == 2
    assert redis_client.exists(account_key(ORG_A, "ledger_checkpoint")) == 0


def test_trim_all_keeps_each_listed_organizations_retention_days(redis_server, redis_client):
    now = redis_ms(redis_client)
    old, recent = now - 3 * 86_400_000, now - 3_600_000
    write(
        redis_client,
        [(org, f"{ms}-0", usage(org, KEY_A, n)) for org in ORGS for n, ms in enumerate([old, old + 1, recent])],
    )
    redis_client.sadd("tm:orgs", ORG_A, ORG_B)  # org C is not listed: left alone
    assert run(redis_server.url, lambda c: trim_all(c, retention_days=2)) == 4
    for org, left in [(ORG_A, 1), (ORG_B, 1), (ORG_C, 3)]:
        assert redis_client.xlen(account_key(org, "ledger")) == left
    assert run(redis_server.url, lambda c: trim_all(c, retention_days=2)) == 0
    # One cutoff for every organization: an export from the start holds everything retained.
    rows, _ = run(redis_server.url, lambda c: page_through(c, [ORG_A, ORG_B], 1))
    assert [(row["entry_id"], row["org_id"]) for row in rows] == [(f"{recent}-0", ORG_A), (f"{recent}-0", ORG_B)]


def test_a_cursor_older_than_the_checkpoint_is_a_ledger_trimmed_conflict(redis_server, redis_client):
    write(redis_client, EVENTS)
    early, cursor = run(redis_server.url, lambda c: page_through(c, ORGS, 2, pages=1))
    assert [(row["entry_id"], row["org_id"]) for row in early] == ORDER[:2]
    # Org B's entries before ms 1005 go (its last trimmed entry is 1001-0).
    assert run(redis_server.url, lambda c: trim_ledger(c, ORG_B, BASE + 1005)) == 2

    oldest = encode_cursor((BASE + 1001, 0, ORG_B))
    with pytest.raises(Conflict) as caught:
        run(redis_server.url, lambda c: export_page(c, ORGS, cursor, 10, settle_lag_ms=LAG))
    error = caught.value.body()["error"]
    assert caught.value.status_code == 409
    assert (error["code"], error["param"], error["type"]) == ("ledger_trimmed", "after", "invalid_request_error")
    assert oldest in error["message"] and f"{BASE + 1001}-0" in error["message"]

    # The cursor it names resumes, and an export without a cursor starts there, past every
    # trimmed entry (org C's and org A's entries before it are left out, not a conflict later).
    resumed, _ = run(redis_server.url, lambda c: page_through(c, ORGS, 3, oldest))
    assert [(row["entry_id"], row["org_id"]) for row in resumed] == ORDER[6:]
    fresh, _ = run(redis_server.url, lambda c: page_through(c, ORGS, 1))
    assert fresh == resumed
    # Without org B, the same cursor still works: orgs A and C were never trimmed.
    rows_ac, _ = run(redis_server.url, lambda c: page_through(c, [ORG_A, ORG_C], 10, cursor))
    assert [(row["entry_id"], row["org_id"]) for row in rows_ac] == [item for item in ORDER[2:] if item[1] != ORG_B]
