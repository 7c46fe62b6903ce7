"""The per-listing fair queue: weighted shares, FIFO, deadlines, cancellation, capacity and
the bounded waiting room's push-out.

Most scenarios run on an event loop whose clock only moves when the test moves it, so
deadlines are exact and nothing depends on how fast this machine is; one deadline test runs
on the real clock.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tokenmart.deployments.fair_queue import FairQueue, QueueFull, QueueTimeout, Slot

WEIGHTS = {"free": 1, "pro": 2, "team": 4}
TIERS = {"free": 1, "standard": 2, "premium": 4}


class ManualClockLoop(asyncio.SelectorEventLoop):
    """Timers fire only when the test advances `now`."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def time(self) -> float:
        return self.now


def run_manual(scenario: Callable[[ManualClockLoop], Awaitable[Any]]) -> Any:
    loop = ManualClockLoop()
    try:
        return loop.run_until_complete(scenario(loop))
    finally:
        loop.close()


async def settle(iterations: int = 20) -> None:
    """Let every woken task run (a grant wakes its waiter on the next loop iteration)."""
    for _ in range(iterations):
        await asyncio.sleep(0)


async def advance(loop: ManualClockLoop, seconds: float) -> None:
    loop.now += seconds
    await settle()


class Requests:
    """Requests in flight against one queue; `grants` lists their slots in grant order."""

    def __init__(self, queue: FairQueue) -> None:
        self.queue = queue
        self.grants: list[tuple[str, Slot]] = []
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def send(self, label: str, tenant: str, weight: int, *, cost: int = 1, deadline_s: float = 600.0) -> None:
        async def wait() -> None:
            slot = await self.queue.acquire(tenant, weight, deadline_s, cost)
            self.grants.append((label, slot))

        self.tasks[label] = asyncio.create_task(wait())

    def labels(self) -> list[str]:
        return [label for label, _ in self.grants]

    async def serve(self, count: int) -> list[str]:
        """With capacity 1: release the newest grant `count` times, returning who got the slot
        after each release."""
        served = []
        for _ in range(count):
            before = len(self.grants)
            self.grants[-1][1].release()
            await settle()
            assert len(self.grants) == before + 1
            served.append(self.grants[-1][0])
        return served

    async def close(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        for _, slot in self.grants:
            slot.release()


# -- shares --------------------------------------------------------------------------------


def test_backlogged_tenants_get_slots_in_proportion_to_their_weights() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(2, name="llama")
        blockers = [await queue.acquire("warmup", 1, 1) for _ in range(2)]
        order: list[str] = []

        async def request(tenant: str) -> None:
            async with await queue.acquire(tenant, WEIGHTS[tenant], 600):
                order.append(tenant)
                await asyncio.sleep(0)

        tasks = [asyncio.create_task(request(tenant)) for _ in range(500) for tenant in WEIGHTS]
        await settle()
        assert queue.stats().waiting == {"free": 500, "pro": 500, "team": 500}
        for blocker in blockers:
            blocker.release()
        while len(order) < 700:
            await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

        shares = Counter(order[:700])
        for tenant, weight in WEIGHTS.items():
            assert abs(shares[tenant] / 700 - weight / 7) <= 0.02, shares
        stats = queue.stats()
        assert stats.in_use == 0 and stats.waiting == {}
        assert sum(stats.granted.values()) == len(order) + 2

    run_manual(scenario)


def test_with_unequal_costs_the_shares_of_cost_follow_the_weights() -> None:
    """Requests priced in tokens: the free tier sends short prompts, the team tier long ones;
    each still gets its weight's share of the tokens, not of the requests."""
    rng = random.Random(7)
    token_ranges = {"free": (5, 15), "pro": (20, 40), "team": (40, 60)}

    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(2)
        blockers = [await queue.acquire("warmup", 1, 1) for _ in range(2)]
        grants: list[tuple[str, int]] = []

        async def request(tenant: str, cost: int) -> None:
            async with await queue.acquire(tenant, WEIGHTS[tenant], 600, cost=cost):
                grants.append((tenant, cost))
                await asyncio.sleep(0)

        tasks = [
            asyncio.create_task(request(tenant, rng.randint(*token_ranges[tenant])))
            for _ in range(600)
            for tenant in WEIGHTS
        ]
        await settle()
        for blocker in blockers:
            blocker.release()
        while len(grants) < 700:
            await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

        tokens: Counter[str] = Counter()
        for tenant, cost in grants[:700]:
            tokens[tenant] += cost
        total = sum(tokens.values())
        for tenant, weight in WEIGHTS.items():
            assert abs(tokens[tenant] / total - weight / 7) <= 0.02, tokens
        # Counted in requests the free tier, with the shortest prompts, gets the most.
        assert Counter(tenant for tenant, _ in grants[:700]).most_common(1)[0][0] == "free"
        assert queue.stats().granted_cost["team"] == sum(cost for tenant, cost in grants if tenant == "team")

    run_manual(scenario)


@pytest.mark.timeout(10)  # round by round, these costs would take about 10**12 rounds
def test_costs_far_above_the_weights_are_granted_without_walking_every_round() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(1)
        requests = Requests(queue)
        requests.grants.append(("held", await queue.acquire("held", 1, 1)))
        requests.send("a", "a", 1, cost=10**12)  # needs 10**12 quanta of 1
        requests.send("b", "b", 4, cost=3 * 10**12)  # needs 0.75 * 10**12 quanta of 4
        await settle()
        assert await requests.serve(2) == ["b", "a"]
        await requests.close()

    run_manual(scenario)


# -- order ---------------------------------------------------------------------------------


def test_each_tenants_requests_are_served_first_in_first_out() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(1)
        requests = Requests(queue)
        requests.grants.append(("held", await queue.acquire("held", 1, 1)))
        for i in range(6):
            requests.send(f"a{i}", "a", 1)
            requests.send(f"b{i}", "b", 2)
        await settle()
        served = await requests.serve(12)
        assert [label for label in served if label[0] == "a"] == [f"a{i}" for i in range(6)]
        assert [label for label in served if label[0] == "b"] == [f"b{i}" for i in range(6)]
        # Weight 2 against 1: two of b's for each of a's while both wait.
        assert served[:9] == ["a0", "b0", "b1", "a1", "b2", "b3", "a2", "b4", "b5"]
        await requests.close()

    run_manual(scenario)


def test_a_request_arriving_as_a_slot_is_released_waits_behind_the_queued_ones() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(1)
        requests = Requests(queue)
        held = await queue.acquire("a", 1, 1)
        requests.send("b1", "b", 1)
        await settle()
        held.release()  # granted to b1, whose task has not run yet
        requests.send("late", "c", 4)  # a heavier tenant, at the same moment
        await settle()
        assert requests.labels() == ["b1"]
        assert not requests.tasks["late"].done()
        stats = queue.stats()
        assert (stats.in_use, stats.waiting) == (1, {"c": 1})
        assert await requests.serve(1) == ["late"]
        await requests.close()

    run_manual(scenario)


def test_a_heavy_tenant_arriving_late_is_served_within_one_round() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(1)
        requests = Requests(queue)
        requests.grants.append(("held", await queue.acquire("held", 1, 1)))
        for i in range(8):
            requests.send(f"a{i}", "a", 1)
            requests.send(f"b{i}", "b", 1)
        await settle()
        assert await requests.serve(3) == ["a0", "b0", "a1"]
        for i in range(5):
            requests.send(f"c{i}", "c", 4)
        await settle()
        served = await requests.serve(10)
        # The round in progress ends with b's turn, then c takes its quantum of 4.
        assert served.index("c0") <= 1
        assert served == ["b1", "c0", "c1", "c2", "c3", "a2", "b2", "c4", "a3", "b3"]
        await requests.close()

    run_manual(scenario)


# -- deadlines -----------------------------------------------------------------------------


def test_a_request_gets_queue_timeout_exactly_at_its_deadline() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(1, name="llama")
        requests = Requests(queue)
        held = await queue.acquire("a", 1, 1)
        requests.send("short", "b", 1, deadline_s=0.05)
        requests.send("patient", "c", 1, deadline_s=600)
        await settle()
        await advance(loop, 0.049)
        assert queue.stats().waiting == {"b": 1, "c": 1}
        loop.now = 0.05
        await settle()
        assert requests.tasks["short"].done()
        with pytest.raises(QueueTimeout) as info:
            await requests.tasks["short"]
        assert info.value.waited_s == 0.05
        assert type(info.value.retry_after_s) is int and info.value.retry_after_s >= 1
        assert (info.value.queue, info.value.tenant) == ("llama", "b")
        stats = queue.stats()
        assert stats.waiting == {"c": 1}
        assert stats.timed_out == {"b": 1}
        assert "b" not in stats.granted
        held.release()
        await settle()
        assert requests.labels() == ["patient"]
        assert queue.stats().in_use == 1
        await requests.close()

    run_manual(scenario)


def test_a_short_deadline_times_out_on_the_real_clock() -> None:
    async def scenario() -> None:
        queue = FairQueue(1)
        held = await queue.acquire("a", 1, 1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(QueueTimeout) as info:
            await queue.acquire("b", 1, 0.05)
        assert loop.time() - started >= 0.05
        assert info.value.waited_s >= 0.05
        assert info.value.retry_after_s >= 1
        assert queue.stats().waiting == {}
        held.release()
        assert queue.in_use == 0

    asyncio.run(scenario())


def test_a_non_positive_deadline_never_waits_but_still_takes_a_free_slot() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(1)
        slot = await queue.acquire("a", 1, 0)
        assert slot.waited_s == 0.0
        with pytest.raises(QueueTimeout) as info:
            await queue.acquire("b", 1, 0)
        assert info.value.waited_s == 0.0
        assert queue.stats().timed_out == {"b": 1}
        assert queue.stats().waiting == {}

    run_manual(scenario)


def test_retry_after_grows_with_the_backlog_ahead_and_the_time_slots_are_held() -> None:
    async def timeout_after(queue: FairQueue, tenant: str, weight: int) -> int:
        with pytest.raises(QueueTimeout) as info:
            await queue.acquire(tenant, weight, 0)
        return info.value.retry_after_s

    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(1)
        requests = Requests(queue)
        requests.grants.append(("held", await queue.acquire("held", 1, 1)))
        alone = await timeout_after(queue, "a", 1)
        for i in range(20):
            requests.send(f"a{i}", "a", 1)
        await settle()
        behind_own = await timeout_after(queue, "a", 1)
        heavy_other = await timeout_after(queue, "b", 4)
        assert alone == 1
        assert behind_own > heavy_other >= 1
        # Slots held 10 s each make the same backlog a longer wait.
        for _ in range(10):
            loop.now += 10
            await requests.serve(1)
        assert await timeout_after(queue, "a", 1) > behind_own
        await requests.close()

    run_manual(scenario)


# -- cancellation --------------------------------------------------------------------------


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(1)
        requests = Requests(queue)
        held = await queue.acquire("a", 1, 1)
        requests.send("gone", "b", 1)
        await settle()
        requests.tasks["gone"].cancel()
        await settle()
        assert requests.tasks["gone"].cancelled()
        stats = queue.stats()
        assert (stats.waiting, stats.cancelled) == ({}, {"b": 1})
        held.release()
        await settle()
        assert queue.in_use == 0
        assert requests.grants == []

    run_manual(scenario)


def test_a_slot_granted_to_a_waiter_cancelled_at_that_moment_goes_to_the_next() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(1)
        requests = Requests(queue)
        held = await queue.acquire("a", 1, 1)
        requests.send("first", "b", 1)
        requests.send("second", "c", 1)
        await settle()
        held.release()  # the slot goes to "first" ...
        requests.tasks["first"].cancel()  # ... whose client leaves before its task resumes
        await settle()
        assert requests.tasks["first"].cancelled()
        assert requests.labels() == ["second"]
        stats = queue.stats()
        assert (stats.in_use, stats.waiting) == (1, {})
        assert stats.granted == {"a": 1, "c": 1}
        assert stats.cancelled == {"b": 1}
        requests.grants[0][1].release()
        assert queue.in_use == 0

    run_manual(scenario)


def test_release_is_idempotent_and_async_with_releases_on_error() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(2)
        slot = await queue.acquire("a", 1, 1)
        other = await queue.acquire("a", 1, 1)
        slot.release()
        slot.release()
        assert slot.released and queue.in_use == 1
        with pytest.raises(RuntimeError):
            async with other:
                raise RuntimeError("engine failed")
        assert other.released and queue.in_use == 0
        assert queue.stats().granted == {"a": 2}

    run_manual(scenario)


def test_waited_s_is_the_time_spent_in_the_queue() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(1)
        requests = Requests(queue)
        held = await queue.acquire("a", 1, 1)
        requests.send("b", "b", 1)
        await settle()
        await advance(loop, 2.5)
        held.release()
        await settle()
        assert requests.grants[0][1].waited_s == pytest.approx(2.5)
        assert held.waited_s == 0.0
        await requests.close()

    run_manual(scenario)


# -- capacity ------------------------------------------------------------------------------


def test_growing_capacity_grants_the_new_slots_to_waiters() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(1)
        requests = Requests(queue)
        requests.grants.append(("held", await queue.acquire("held", 1, 1)))
        for i in range(3):
            requests.send(f"a{i}", "a", 1)
        await settle()
        queue.set_capacity(3)
        await settle()
        assert requests.labels() == ["held", "a0", "a1"]
        stats = queue.stats()
        assert (stats.capacity, stats.in_use, stats.waiting) == (3, 3, {"a": 1})
        await requests.close()

    run_manual(scenario)


def test_shrinking_capacity_revokes_nothing_and_admits_nobody_until_below_it() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(3)
        requests = Requests(queue)
        slots = [await queue.acquire("a", 1, 1) for _ in range(3)]
        requests.send("w", "b", 1)
        await settle()
        queue.set_capacity(1)
        assert (queue.in_use, queue.free) == (3, 0)
        for expected_in_use in (2, 1):
            slots.pop().release()
            await settle()
            assert queue.in_use == expected_in_use
            assert requests.grants == []
        slots.pop().release()
        await settle()
        assert requests.labels() == ["w"]
        assert (queue.in_use, queue.free) == (1, 0)
        queue.set_capacity(0)
        requests.grants[0][1].release()
        with pytest.raises(QueueTimeout):
            await queue.acquire("c", 1, 0)
        await requests.close()

    run_manual(scenario)


def test_bad_arguments_are_refused() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(1)
        with pytest.raises(ValueError, match="weight"):
            await queue.acquire("a", 0, 1)
        with pytest.raises(ValueError, match="cost"):
            await queue.acquire("a", 1, 1, cost=0)
        with pytest.raises(ValueError, match="deadline_s"):
            await queue.acquire("a", 1, float("nan"))
        with pytest.raises(ValueError, match="capacity"):
            queue.set_capacity(-1)
        assert queue.in_use == 0

    with pytest.raises(ValueError, match="capacity"):
        FairQueue(-1)
    FairQueue(1).set_capacity(4)  # from configuration code, outside any event loop
    run_manual(scenario)


# -- bounded waiting room ------------------------------------------------------------------


async def flooded(loop: ManualClockLoop, free: int, standard: int, max_waiting: int) -> tuple[FairQueue, Requests]:
    """One slot, held; `free` then `standard` waiters queued behind it, all at t=0."""
    queue = FairQueue(1, name="llama", max_waiting=max_waiting)
    requests = Requests(queue)
    requests.grants.append(("held", await queue.acquire("held", 1, 1)))
    for i in range(free):
        requests.send(f"f{i}", "free", TIERS["free"])
    for i in range(standard):
        requests.send(f"s{i}", "standard", TIERS["standard"])
    await settle()
    assert queue.stats().waiting == {"free": free, "standard": standard}
    return queue, requests


async def refused(queue: FairQueue, tenant: str, weight: int, cost: int = 1) -> QueueFull:
    """The `QueueFull` a patient request gets on arrival (a failure, not a hang, if it queues)."""
    task = asyncio.create_task(queue.acquire(tenant, weight, 600, cost))
    await asyncio.sleep(0)
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        pytest.fail(f"{tenant}'s request was queued, not refused")
    with pytest.raises(QueueFull) as info:
        await task
    return info.value


def test_a_premium_arrival_in_a_full_waiting_room_pushes_out_the_newest_free_waiter() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        # Backlogs per weight: free 3/1, standard 4/2; the premium newcomer's 1/4.
        queue, requests = await flooded(loop, free=3, standard=4, max_waiting=7)
        await advance(loop, 2.0)
        requests.send("p0", "premium", TIERS["premium"])
        await settle()
        assert requests.tasks["f2"].done() and not requests.tasks["p0"].done()
        with pytest.raises(QueueFull) as info:
            await requests.tasks["f2"]
        assert isinstance(info.value, QueueTimeout)  # the gateway answers it 503 + Retry-After
        assert (info.value.queue, info.value.tenant, info.value.pushed_out) == ("llama", "free", True)
        assert info.value.waited_s == 2.0
        assert type(info.value.retry_after_s) is int and info.value.retry_after_s >= 1
        stats = queue.stats()
        assert stats.waiting == {"free": 2, "standard": 4, "premium": 1}
        assert (stats.max_waiting, stats.pushed_out, stats.refused) == (7, {"free": 1}, {})
        assert stats.timed_out == {} and stats.cancelled == {}
        # The others keep their DRR order; the newcomer waited its turn at the end of the round.
        assert await requests.serve(7) == ["f0", "s0", "s1", "p0", "f1", "s2", "s3"]
        assert "f2" not in requests.labels()
        assert queue.stats().granted == {"held": 1, "free": 2, "standard": 4, "premium": 1}
        await requests.close()

    run_manual(scenario)


def test_a_flooder_arriving_at_the_bound_is_refused_at_once() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue, requests = await flooded(loop, free=3, standard=4, max_waiting=7)
        await advance(loop, 5.0)
        with pytest.raises(QueueTimeout) as timeout:  # the estimate a timeout gets in this state
            await queue.acquire("free", 1, 0)
        full = await refused(queue, "free", 1)
        assert (full.tenant, full.pushed_out, full.waited_s) == ("free", False, 0.0)
        assert full.retry_after_s == timeout.value.retry_after_s
        assert full.retry_after_s > 1  # seven waiters ahead of it on one slot held ~1 s
        stats = queue.stats()
        assert stats.waiting == {"free": 3, "standard": 4}
        assert (stats.refused, stats.pushed_out, stats.timed_out) == ({"free": 1}, {}, {"free": 1})
        assert not any(task.done() for task in requests.tasks.values())
        await requests.close()

    run_manual(scenario)


def test_a_newcomer_tied_with_the_most_backlogged_tenant_is_refused() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        # free 2/1 = 2; a standard newcomer makes standard (3 + 1)/2 = 2: a tie, it loses.
        queue, requests = await flooded(loop, free=2, standard=3, max_waiting=5)
        full = await refused(queue, "standard", TIERS["standard"])
        assert (full.tenant, full.pushed_out) == ("standard", False)
        assert queue.stats().waiting == {"free": 2, "standard": 3}
        # A premium newcomer, 1/4, is below both: the newest free waiter (2 against 1.5) goes.
        requests.send("p0", "premium", TIERS["premium"])
        await settle()
        with pytest.raises(QueueFull):
            await requests.tasks["f1"]
        stats = queue.stats()
        assert stats.waiting == {"free": 1, "standard": 3, "premium": 1}
        assert (stats.refused, stats.pushed_out) == ({"standard": 1}, {"free": 1})
        await requests.close()

    run_manual(scenario)


@pytest.mark.parametrize(("standard_first", "pushed"), [(False, "s3"), (True, "f1")])
def test_between_equally_backlogged_tenants_the_newest_waiter_is_pushed_out(standard_first: bool, pushed: str) -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(1, max_waiting=6)
        requests = Requests(queue)
        requests.grants.append(("held", await queue.acquire("held", 1, 1)))
        arrivals = [*(("f", "free") for _ in range(2)), *(("s", "standard") for _ in range(4))]
        if standard_first:
            arrivals.reverse()
        seen: Counter[str] = Counter()
        for prefix, tenant in arrivals:  # free 2/1 and standard 4/2: tied
            requests.send(f"{prefix}{seen[prefix]}", tenant, TIERS[tenant])
            seen[prefix] += 1
        await settle()
        requests.send("p0", "premium", TIERS["premium"])
        await settle()
        assert [label for label, task in requests.tasks.items() if task.done()] == [pushed]
        with pytest.raises(QueueFull):
            await requests.tasks[pushed]
        assert sum(queue.stats().waiting.values()) == 6
        await requests.close()

    run_manual(scenario)


def test_backlogs_are_compared_in_cost_per_weight() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(1, max_waiting=4)
        requests = Requests(queue)
        requests.grants.append(("held", await queue.acquire("held", 1, 1)))
        requests.send("big", "free", 1, cost=10)  # one request, but 10/1
        for i in range(3):
            requests.send(f"s{i}", "standard", 2, cost=4)  # three requests, 12/2 = 6
        await settle()
        requests.send("p0", "premium", 4, cost=20)  # 20/4 = 5: less than free's 10
        await settle()
        with pytest.raises(QueueFull):
            await requests.tasks["big"]
        stats = queue.stats()
        assert stats.waiting == {"standard": 3, "premium": 1}
        assert stats.pushed_out == {"free": 1}
        # Now standard (6) is the most backlogged: a second 20-token premium request (40/4 = 10)
        # is itself the most backlogged and is refused; a 1-token free one (1/1) pushes out s2.
        await refused(queue, "premium", 4, cost=20)
        requests.send("f0", "free", 1)
        await settle()
        with pytest.raises(QueueFull):
            await requests.tasks["s2"]
        assert queue.stats().waiting == {"standard": 2, "premium": 1, "free": 1}
        await requests.close()

    run_manual(scenario)


def test_a_waiter_granted_or_cancelled_at_that_moment_is_not_pushed_out() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(1, max_waiting=2)
        requests = Requests(queue)
        held = await queue.acquire("held", 1, 1)
        for label in ("f0", "f1", "f2"):
            requests.send(label, "free", 1)
        await settle()
        with pytest.raises(QueueFull):  # refused at once: a free flooder at the bound
            await requests.tasks["f2"]
        held.release()  # granted to f0, whose task has not run yet: f0 no longer waits
        requests.send("p0", "premium", 4)
        requests.send("p1", "premium", 4)
        # f1's client leaves at the same moment; f1's task resumes only after p0's and p1's run.
        requests.tasks["f1"].cancel()
        await settle()
        # Neither f0 (granted) nor f1 (cancelled) took a place: both premium requests queued.
        assert requests.labels() == ["f0"]
        assert requests.tasks["f1"].cancelled()
        stats = queue.stats()
        assert stats.waiting == {"premium": 2}
        assert (stats.pushed_out, stats.cancelled, stats.refused) == ({}, {"free": 1}, {"free": 1})
        await requests.close()

    run_manual(scenario)


def test_a_waiter_pushed_out_and_cancelled_at_that_moment_counts_once() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(1, max_waiting=2)
        requests = Requests(queue)
        held = await queue.acquire("held", 1, 1)
        requests.send("f0", "free", 1)
        requests.send("f1", "free", 1)
        await settle()
        requests.send("p0", "premium", 4)
        await asyncio.sleep(0)  # p0 has pushed out f1, whose task has not resumed yet
        assert queue.stats().pushed_out == {"free": 1}
        requests.tasks["f1"].cancel()  # f1's client leaves at that moment
        await settle()
        assert requests.tasks["f1"].cancelled()
        stats = queue.stats()
        assert (stats.pushed_out, stats.cancelled) == ({"free": 1}, {})
        assert stats.waiting == {"free": 1, "premium": 1}
        held.release()
        await settle()
        assert requests.labels() == ["f0"]
        assert await requests.serve(1) == ["p0"]
        await requests.close()

    run_manual(scenario)


def test_changing_max_waiting_pushes_nobody_out_and_applies_to_arrivals() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue, requests = await flooded(loop, free=3, standard=2, max_waiting=5)
        queue.set_max_waiting(2)
        await settle()
        assert queue.max_waiting == 2
        assert queue.stats().waiting == {"free": 3, "standard": 2}
        # Above the new bound, an arrival either bounces or takes another's place: never more.
        await refused(queue, "free", 1)
        requests.send("p0", "premium", 4)
        await settle()
        with pytest.raises(QueueFull):
            await requests.tasks["f2"]
        assert queue.stats().waiting == {"free": 2, "standard": 2, "premium": 1}
        queue.set_max_waiting(None)
        requests.send("f9", "free", 1)
        await settle()
        assert queue.stats().waiting == {"free": 3, "standard": 2, "premium": 1}
        assert queue.stats().max_waiting is None
        with pytest.raises(ValueError, match="max_waiting"):
            queue.set_max_waiting(-1)
        await requests.close()

    with pytest.raises(ValueError, match="max_waiting"):
        FairQueue(1, max_waiting=-1)
    run_manual(scenario)


def test_with_no_room_at_all_every_request_that_would_wait_is_refused() -> None:
    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(1, max_waiting=0)
        slot = await queue.acquire("premium", 4, 600)  # a free slot is taken at once
        await refused(queue, "premium", 4)
        slot.release()
        assert queue.stats().refused == {"premium": 1}

    run_manual(scenario)


class TextbookDRR:
    """Deficit round robin written round by round, one grant per `take`: the order the queue
    must reproduce. A tenant leaves the round, forfeiting its deficit, when its last request is
    served; one that arrives joins at the end of the round."""

    def __init__(self, weights: dict[str, int], max_waiting: int | None = None) -> None:
        self.weights = weights
        self.max_waiting = max_waiting
        self.queues: dict[str, deque[tuple[int, int]]] = {}  # (arrival number, cost)
        self.round: deque[str] = deque()
        self.deficit: dict[str, int] = {}
        self.visiting: str | None = None  # got its quantum and is being served

    def arrive(self, number: int, tenant: str, cost: int) -> int | None:
        """Queue arrival `number`, or not: the arrival refused or pushed out, if any. With the
        waiting room full, the tenant with the most cost queued per weight (the newcomer
        counted in its own) loses its newest request; on a tie the newcomer loses, and between
        other tenants the newest request goes."""
        waiting = sum(len(queue) for queue in self.queues.values())
        if self.max_waiting is not None and waiting >= self.max_waiting:
            own = Fraction(sum(c for _, c in self.queues.get(tenant, ())) + cost, self.weights[tenant])
            others = [
                (Fraction(sum(c for _, c in queue), self.weights[other]), queue[-1][0], other)
                for other, queue in self.queues.items()
                if other != tenant
            ]
            if not others or own >= max(others)[0]:
                return number
            _, newest, victim = max(others)
            self.queues[victim].pop()
            if not self.queues[victim]:
                self.leave(victim)
            self.enqueue(number, tenant, cost)
            return newest
        self.enqueue(number, tenant, cost)
        return None

    def enqueue(self, number: int, tenant: str, cost: int) -> None:
        if tenant not in self.queues:
            self.queues[tenant] = deque()
            self.round.append(tenant)
            self.deficit[tenant] = 0
        self.queues[tenant].append((number, cost))

    def leave(self, tenant: str) -> None:
        del self.queues[tenant], self.deficit[tenant]
        self.round.remove(tenant)
        if self.visiting == tenant:
            self.visiting = None

    def take(self) -> tuple[str, int] | None:
        while self.round:
            tenant = self.round[0]
            if self.visiting != tenant:
                self.visiting = tenant
                self.deficit[tenant] += self.weights[tenant]
            queue = self.queues[tenant]
            if self.deficit[tenant] >= queue[0][1]:
                _, cost = queue.popleft()
                self.deficit[tenant] -= cost
                if not queue:
                    self.leave(tenant)
                return tenant, cost
            self.round.rotate(-1)
            self.visiting = None
        return None


@pytest.mark.parametrize("bounded", [False, True], ids=["unbounded", "bounded"])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    weights=st.fixed_dictionaries({tenant: st.integers(1, 5) for tenant in "abc"}),
    events=st.lists(
        st.one_of(st.tuples(st.sampled_from("abc"), st.integers(1, 12)), st.just(None)), min_size=5, max_size=80
    ),
    bound=st.integers(0, 6),
)
def test_grants_follow_deficit_round_robin_exactly(
    bounded: bool, weights: dict[str, int], events: list[tuple[str, int] | None], bound: int
) -> None:
    """Arrivals (tenant, cost) and releases (None) in any order, on one slot: every grant is
    the one textbook DRR makes, including the rounds skipped when costs exceed the weights.
    With a bounded waiting room, the same arrivals are refused or pushed out as in the model,
    and the rest are still granted in its DRR order."""
    max_waiting = bound if bounded else None

    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(1, max_waiting=max_waiting)
        model = TextbookDRR(weights, max_waiting)
        grants: list[tuple[str, int]] = []
        slots: list[Slot] = []
        tasks = []
        full: set[int] = set()  # arrivals refused or pushed out

        async def request(number: int, tenant: str, cost: int) -> None:
            try:
                slots.append(await queue.acquire(tenant, weights[tenant], 600, cost))
            except QueueFull:
                full.add(number)
                raise
            grants.append((tenant, cost))

        expected: list[tuple[str, int]] = []
        expected_full: set[int] = set()
        slot_free = True
        for event_ in events:
            if event_ is not None:
                number = len(tasks)
                tasks.append(asyncio.create_task(request(number, *event_)))
                if slot_free:  # taken at once: it never queues
                    expected.append(event_)
                    slot_free = False
                else:
                    loser = model.arrive(number, *event_)
                    if loser is not None:
                        event("a full waiting room refused or pushed out an arrival")
                        expected_full.add(loser)
            elif not slot_free:
                slots[-1].release()
                taken = model.take()
                if taken is None:
                    slot_free = True
                else:
                    expected.append(taken)
            await settle()
            assert grants == expected
            assert full == expected_full
            if max_waiting is not None:
                assert sum(queue.stats().waiting.values()) <= max_waiting
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    run_manual(scenario)


# -- random interleavings ------------------------------------------------------------------

INDEX = st.integers(0, 1000)
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(
            st.just("acquire"),
            st.sampled_from(["a", "b", "c"]),
            st.integers(1, 4),
            st.integers(1, 6),
            st.sampled_from([0.0, 1 / 256, 1 / 64, 600.0]),  # binary fractions keep the clock exact
        ),
        st.tuples(st.just("cancel"), INDEX),
        st.tuples(st.just("release"), INDEX),
        st.tuples(st.just("release_and_cancel"), INDEX, INDEX),
        st.tuples(st.just("capacity"), st.integers(0, 4)),
        st.tuples(st.just("max_waiting"), st.one_of(st.none(), st.integers(0, 5))),
        st.tuples(st.just("flood"), st.sampled_from(["a", "b", "c"]), st.integers(1, 4), st.integers(2, 6)),
        st.tuples(  # the arrival runs (pushing a waiter out, maybe), then a waiter is cancelled
            st.just("acquire_and_cancel"),
            st.sampled_from(["a", "b", "c"]),
            st.integers(1, 4),
            st.integers(1, 6),
            INDEX,
        ),
        st.tuples(st.just("step"), st.integers(0, 3)),
        st.tuples(st.just("advance"), st.sampled_from([1 / 512, 1 / 128])),
    ),
    min_size=10,
    max_size=80,
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    initial_capacity=st.integers(0, 3),
    initial_max_waiting=st.one_of(st.none(), st.integers(0, 5)),
    operations=OPERATIONS,
)
def test_random_interleavings_never_lose_or_double_grant_a_slot(
    initial_capacity: int, initial_max_waiting: int | None, operations: list[tuple[Any, ...]]
) -> None:
    """Every request ends exactly one way (granted, timed out, refused, pushed out or
    cancelled), no slot is lost or granted twice, and the waiting room keeps its bound."""

    async def scenario(loop: ManualClockLoop) -> None:
        queue = FairQueue(initial_capacity, max_waiting=initial_max_waiting)
        held: list[Slot] = []  # granted to a caller, not yet released
        granted = 0
        started = 0  # requests that called acquire
        pushed_out = 0  # requests that raised QueueFull for a push-out
        pending: list[asyncio.Task[None]] = []
        over_ceiling = 0  # slots in use above capacity right after a shrink
        last_in_use = 0
        room = initial_max_waiting  # the most that may wait: the bound, or more after a shrink

        async def request(tenant: str, weight: int, cost: int, deadline_s: float) -> None:
            nonlocal granted, started, pushed_out
            started += 1
            try:
                slot = await queue.acquire(tenant, weight, deadline_s, cost)
            except QueueFull as full:
                pushed_out += full.pushed_out
                event("a request was pushed out" if full.pushed_out else "a request was refused")
                raise
            except QueueTimeout:
                event("a request timed out")
                raise
            except asyncio.CancelledError:
                event("a waiter was cancelled")
                raise
            granted += 1
            held.append(slot)

        def release(index: int) -> None:
            if held:
                held.pop(index % len(held)).release()

        def cancel(index: int) -> None:
            live = [task for task in pending if not task.done()]
            if live:
                if queue.in_use > len(held):
                    event("a waiter was cancelled while a grant was on its way")
                live[index % len(live)].cancel()

        def check(settled: bool) -> None:
            nonlocal over_ceiling, last_in_use, room
            stats = queue.stats()
            waiting = sum(stats.waiting.values())
            if stats.max_waiting is not None:
                assert room is not None and waiting <= room
                room = max(stats.max_waiting, waiting)
            assert stats.in_use <= max(stats.capacity, over_ceiling)
            if stats.in_use > stats.capacity:
                assert stats.in_use <= last_in_use  # admits nobody while over
            else:
                over_ceiling = 0
                assert stats.in_use + queue.free == stats.capacity
            assert waiting == 0 or stats.in_use >= stats.capacity  # nobody waits beside a free slot
            if settled:
                assert stats.in_use == len(held)
                assert sum(stats.granted.values()) == granted
                assert waiting == sum(1 for task in pending if not task.done())
            last_in_use = stats.in_use

        for operation in operations:
            kind = operation[0]
            if kind == "acquire":
                pending.append(asyncio.create_task(request(*operation[1:])))
            elif kind == "cancel":
                cancel(operation[1])
            elif kind == "release":
                release(operation[1])
            elif kind == "release_and_cancel":  # the release grants to a waiter being cancelled
                release(operation[1])
                cancel(operation[2])
            elif kind == "max_waiting":
                waiting = sum(queue.stats().waiting.values())
                room = None if operation[1] is None else max(operation[1], waiting)
                queue.set_max_waiting(operation[1])
            elif kind == "flood":  # patient requests of one tenant, enough to fill the room
                for _ in range(operation[3]):
                    pending.append(asyncio.create_task(request(operation[1], operation[2], 1, 600.0)))
            elif kind == "acquire_and_cancel":
                pending.append(asyncio.create_task(request(*operation[1:4], 600.0)))
                await asyncio.sleep(0)  # it has called acquire; the one it pushed out, if any, has not resumed
                cancel(operation[4])
            elif kind == "capacity":
                if queue.in_use > operation[1]:
                    over_ceiling = max(over_ceiling, queue.in_use)
                queue.set_capacity(operation[1])
            elif kind == "step":
                for _ in range(operation[1]):
                    await asyncio.sleep(0)
            else:
                loop.now += operation[1]
            check(settled=False)
            if kind in ("acquire", "flood", "step", "advance"):
                await settle()
                check(settled=True)

        await settle()
        check(settled=True)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await settle()
        check(settled=True)
        for slot in list(held):
            slot.release()
            slot.release()
        held.clear()
        check(settled=True)
        stats = queue.stats()
        assert (stats.in_use, stats.waiting) == (0, {})
        assert not queue._ring
        outcomes = (stats.granted, stats.timed_out, stats.refused, stats.pushed_out, stats.cancelled)
        assert sum(sum(counts.values()) for counts in outcomes) == started
        if sum(stats.pushed_out.values()) > pushed_out:  # counted as pushed out, not cancelled
            event("a waiter was cancelled as it was pushed out")

    run_manual(scenario)
