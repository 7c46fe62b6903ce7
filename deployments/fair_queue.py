"""A weighted fair queue in front of one listing's engine, per ingress replica.

When a listing is saturated, a request waits here for a slot instead of being refused at once
or piling into the engine's own queue, where a flood from one tenant would delay everyone.
Slots are handed out across tenants (API keys or organizations) by deficit round robin: each
backlogged tenant earns its `weight` (from its tier) per round and spends a request's `cost`
(1, or its tokens) per grant, so over time every backlogged tenant gets slots in proportion to
its weight, measured in cost. Within one tenant requests are served first in, first out.

The queue only decides *when* a request may go to the engine; it holds no money and no
connection. Time spent waiting is never billed: billing starts when the slot is granted, and
`Slot.waited_s` says how long the request waited. A request whose wait budget runs out gets
`QueueTimeout` (the caller answers 503 with its `retry_after_s`) and leaves the queue.

The waiting room may be bounded (`max_waiting`). When it is full, a newcomer does not simply
bounce: tenants are compared by their backlog relative to their weight (queued cost / weight,
the newcomer counted in its own tenant's). If the newcomer's tenant is the most backlogged
(ties included), the newcomer gets `QueueFull` at once; otherwise the newest waiter of the most
backlogged tenant is pushed out with `QueueFull` and the newcomer queues in its place. So a
flood fills the room with the flooder's own requests, which are the ones to go, and a lightly
queued tenant (a premium tier, say) still gets a place.

Everything runs on one event loop and is mutated only synchronously between awaits, so no
lock is needed. Two races are handled explicitly:

- A waiter cancelled (client gone) while queued leaves the queue. If its slot was granted in
  the same loop iteration, before its task could resume, the slot is handed to the next
  waiter: a slot is never lost and never granted twice.
- A waiter whose deadline timer fires in the same iteration as its grant keeps the grant: a
  waiter's future is settled exactly once, by whichever comes first. The same holds for a
  push-out: only a waiter still undecided (neither granted, timed out nor cancelled) can be
  pushed out, and a pushed-out waiter is out of the queue, so it is never granted afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from types import TracebackType

# A timed-out request's Retry-After is an estimate of the wait ahead; it is kept within these
# bounds so a client neither hammers (under 1 s) nor gives up on a stale estimate.
RETRY_AFTER_MIN_S = 1
RETRY_AFTER_MAX_S = 60
# Until a slot has been released once, a slot is assumed to be held this long.
DEFAULT_HOLD_S = 1.0
# Weight of the newest hold time in the moving average used for the estimate.
HOLD_SMOOTHING = 0.2


class QueueTimeout(Exception):
    """The request's wait budget ran out before a slot was granted; answer 503 + Retry-After."""

    def __init__(self, queue: str, tenant: str, *, waited_s: float, retry_after_s: int) -> None:
        super().__init__(f"no slot on {queue or 'the queue'} for {tenant!r} within {waited_s:.3f}s")
        self.queue = queue
        self.tenant = tenant
        self.waited_s = waited_s
        self.retry_after_s = retry_after_s


class QueueFull(QueueTimeout):
    """The waiting room was full: the request was refused on arrival (`pushed_out` False,
    `waited_s` 0) or pushed out by a less backlogged tenant's request (`pushed_out` True).
    A `QueueTimeout`, so callers answer it the same way: 503 + Retry-After."""

    def __init__(self, queue: str, tenant: str, *, waited_s: float, retry_after_s: int, pushed_out: bool) -> None:
        super().__init__(queue, tenant, waited_s=waited_s, retry_after_s=retry_after_s)
        self.pushed_out = pushed_out
        how = "pushed out of" if pushed_out else "refused by"
        self.args = (f"{tenant!r} {how} the full waiting room of {queue or 'the queue'} after {waited_s:.3f}s",)


@dataclass(frozen=True)
class QueueStats:
    """One snapshot; the per-tenant counters only grow, for metrics."""

    name: str
    capacity: int
    in_use: int  # above capacity only after a shrink, until enough slots are released
    waiting: dict[str, int] = field(default_factory=dict)  # live waiters now, tenants with none are absent
    granted: dict[str, int] = field(default_factory=dict)  # slots handed to callers
    granted_cost: dict[str, int] = field(default_factory=dict)  # their summed cost
    timed_out: dict[str, int] = field(default_factory=dict)
    cancelled: dict[str, int] = field(default_factory=dict)  # waiters cancelled while queued
    max_waiting: int | None = None  # the waiting room's bound; None: unbounded
    pushed_out: dict[str, int] = field(default_factory=dict)  # waiters pushed out by a newcomer
    refused: dict[str, int] = field(default_factory=dict)  # arrivals refused by a full waiting room


class Slot:
    """One granted slot: release it exactly once (further releases do nothing)."""

    __slots__ = ("_queue", "_released", "cost", "granted_at", "tenant", "waited_s")

    def __init__(self, queue: FairQueue, tenant: str, cost: int, waited_s: float, granted_at: float) -> None:
        self._queue = queue
        self._released = False
        self.tenant = tenant
        self.cost = cost
        self.waited_s = waited_s  # queue time: never billed; a hint for the engine's priority
        self.granted_at = granted_at  # the loop's clock

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._queue._give_back(self)

    async def __aenter__(self) -> Slot:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class _Waiter:
    __slots__ = ("cost", "deadline_at", "enqueued_at", "future", "queued", "seq", "tenant", "timer")

    def __init__(
        self, seq: int, tenant: str, cost: int, future: asyncio.Future[float], enqueued_at: float, deadline_at: float
    ) -> None:
        self.seq = seq  # arrival order across tenants: the larger, the newer
        self.tenant = tenant
        self.cost = cost
        self.future = future  # result: the loop time of the grant
        self.enqueued_at = enqueued_at
        self.deadline_at = deadline_at
        self.queued = True
        self.timer: asyncio.TimerHandle | None = None


class _Backlog:
    """A backlogged tenant: its FIFO, its latest weight and its DRR deficit."""

    __slots__ = ("deficit", "waiters", "weight")

    def __init__(self, weight: int) -> None:
        self.weight = weight
        self.deficit = 0
        self.waiters: deque[_Waiter] = deque()


def _positive_int(value: int, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _bound(value: int | None) -> int | None:
    return None if value is None else _positive_int(value, "max_waiting", 0)


class FairQueue:
    """Slots for one listing's engine on this replica, granted across tenants by weight.

    `capacity` is how many requests this replica may have in flight on the engine;
    `max_waiting` how many requests may wait for a slot at once (None: no bound). The queue
    must be used from one event loop.
    """

    def __init__(self, capacity: int, *, name: str = "", max_waiting: int | None = None) -> None:
        self.name = name
        self._capacity = _positive_int(capacity, "capacity", 0)
        self._max_waiting = _bound(max_waiting)
        self._arrivals = itertools.count()
        self._in_use = 0
        # Backlogged tenants in round order; the first is the one being served. A tenant is
        # here exactly while it has queued waiters, so an idle tenant keeps no deficit.
        self._ring: OrderedDict[str, _Backlog] = OrderedDict()
        self._head_topped = False  # whether the first tenant got its quantum on this visit
        self._mean_hold_s = DEFAULT_HOLD_S
        self._loop: asyncio.AbstractEventLoop | None = None  # the one its waiters run on
        self._granted: dict[str, int] = {}
        self._granted_cost: dict[str, int] = {}
        self._timed_out: dict[str, int] = {}
        self._cancelled: dict[str, int] = {}
        self._pushed_out: dict[str, int] = {}
        self._refused: dict[str, int] = {}

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def free(self) -> int:
        """Slots a request could take now; 0 while a shrink leaves more in use than capacity."""
        return max(self._capacity - self._in_use, 0)

    @property
    def max_waiting(self) -> int | None:
        return self._max_waiting

    def set_max_waiting(self, max_waiting: int | None) -> None:
        """A new bound on the waiting room (None: unbounded). Shrinking pushes nobody out: it
        only applies to arrivals, each of which then leaves the number waiting as it was."""
        self._max_waiting = _bound(max_waiting)

    def set_capacity(self, capacity: int) -> None:
        """Growing grants the new slots to waiters now; shrinking revokes nothing, it only
        admits nobody until releases bring the slots in use below the new capacity."""
        self._capacity = _positive_int(capacity, "capacity", 0)
        self._dispatch()

    async def acquire(self, tenant: str, weight: int, deadline_s: float, cost: int = 1) -> Slot:
        """A slot for one request of `tenant`, waiting at most `deadline_s` seconds for it.

        Returns at once only when a slot is free and nobody waits (no queue jumping). `weight`
        is the tenant's quantum per round (its latest value counts); `cost` what this request
        spends of it (1, or its tokens). Raises `QueueTimeout` when `deadline_s` passes first;
        a non-positive `deadline_s` never waits. Raises `QueueFull` (a `QueueTimeout`) when the
        waiting room is full and this tenant is the most backlogged one, at once, or later
        when a less backlogged tenant's request pushes this one out.
        """
        _positive_int(weight, "weight", 1)
        _positive_int(cost, "cost", 1)
        if math.isnan(deadline_s):
            raise ValueError("deadline_s must be a number of seconds, got nan")
        loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        self._dispatch()  # drops waiters cancelled since the last grant
        if self._in_use < self._capacity and not self._ring:
            self._in_use += 1
            return self._hand_out(tenant, cost, 0.0, now)
        if deadline_s <= 0:
            raise self._timeout(tenant, weight, 0.0)

        if not self._make_room(tenant, weight, cost):
            self._refused[tenant] = self._refused.get(tenant, 0) + 1
            raise QueueFull(
                self.name, tenant, waited_s=0.0, retry_after_s=self._retry_after(tenant, weight), pushed_out=False
            )

        waiter = _Waiter(next(self._arrivals), tenant, cost, loop.create_future(), now, now + deadline_s)
        backlog = self._ring.get(tenant)
        if backlog is None:
            backlog = self._ring[tenant] = _Backlog(weight)  # joins at the end of the round
        backlog.weight = weight
        backlog.waiters.append(waiter)
        waiter.timer = loop.call_at(waiter.deadline_at, self._expire, waiter)
        try:
            granted_at = await waiter.future
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        return self._hand_out(tenant, cost, granted_at - waiter.enqueued_at, granted_at)

    def stats(self) -> QueueStats:
        waiting: dict[str, int] = {}
        for tenant, backlog in self._ring.items():
            live = sum(1 for w in backlog.waiters if not w.future.done())
            if live:
                waiting[tenant] = live
        return QueueStats(
            name=self.name,
            capacity=self._capacity,
            in_use=self._in_use,
            waiting=waiting,
            granted=dict(self._granted),
            granted_cost=dict(self._granted_cost),
            timed_out=dict(self._timed_out),
            cancelled=dict(self._cancelled),
            max_waiting=self._max_waiting,
            pushed_out=dict(self._pushed_out),
            refused=dict(self._refused),
        )

    # -- internals ---------------------------------------------------------------------------

    def _now(self) -> float:
        # Only called once a waiter or a slot exists, so an acquire has set the loop.
        assert self._loop is not None
        return self._loop.time()

    def _hand_out(self, tenant: str, cost: int, waited_s: float, granted_at: float) -> Slot:
        self._granted[tenant] = self._granted.get(tenant, 0) + 1
        self._granted_cost[tenant] = self._granted_cost.get(tenant, 0) + cost
        return Slot(self, tenant, cost, waited_s, granted_at)

    def _give_back(self, slot: Slot) -> None:
        self._in_use -= 1
        held = self._now() - slot.granted_at
        self._mean_hold_s += HOLD_SMOOTHING * (held - self._mean_hold_s)
        self._dispatch()

    def _dispatch(self) -> None:
        """Grant free slots to waiters, in DRR order, until either runs out."""
        while self._in_use < self._capacity:
            waiter = self._next_waiter()
            if waiter is None:
                return
            if waiter.timer is not None:
                waiter.timer.cancel()
            self._in_use += 1
            waiter.future.set_result(self._now())

    def _next_waiter(self) -> _Waiter | None:
        """Take the next live waiter by deficit round robin, or None when nobody waits."""
        visits = 0
        while self._ring:
            tenant, backlog = next(iter(self._ring.items()))
            self._drop_dead(backlog)
            if not backlog.waiters:
                self._retire(tenant)
                continue
            if not self._head_topped:
                backlog.deficit += backlog.weight
                self._head_topped = True
            head = backlog.waiters[0]
            if backlog.deficit >= head.cost:
                backlog.deficit -= head.cost
                backlog.waiters.popleft()
                head.queued = False
                if not backlog.waiters:
                    self._retire(tenant)
                return head
            self._ring.move_to_end(tenant)
            self._head_topped = False
            visits += 1
            if visits >= len(self._ring):
                self._skip_empty_rounds()
                visits = 0
        return None

    def _skip_empty_rounds(self) -> None:
        """Costs far above the weights (tokens against tier weights) would take many rounds in
        which nobody can be served; add those rounds' quanta at once. Stops one round short of
        the first tenant that can be served, so the order is exactly the round-by-round one."""
        for tenant in list(self._ring):
            self._drop_dead(self._ring[tenant])
            if not self._ring[tenant].waiters:
                self._retire(tenant)
        if not self._ring:
            return
        rounds = min(-(-(b.waiters[0].cost - b.deficit) // b.weight) for b in self._ring.values()) - 1
        if rounds > 0:
            for backlog in self._ring.values():
                backlog.deficit += rounds * backlog.weight

    def _retire(self, tenant: str) -> None:
        """A tenant with nothing waiting leaves the round and forfeits its deficit."""
        first = next(iter(self._ring))
        del self._ring[tenant]
        if tenant == first:
            self._head_topped = False

    @staticmethod
    def _drop_dead(backlog: _Backlog) -> None:
        while backlog.waiters and backlog.waiters[0].future.done():
            backlog.waiters.popleft().queued = False

    def _unqueue(self, waiter: _Waiter) -> None:
        if not waiter.queued:
            return
        waiter.queued = False
        backlog = self._ring.get(waiter.tenant)
        if backlog is None:
            return
        backlog.waiters.remove(waiter)
        if not backlog.waiters:
            self._retire(waiter.tenant)

    def _make_room(self, tenant: str, weight: int, cost: int) -> bool:
        """Whether a newcomer may queue: yes while the waiting room has room; when full, yes
        only if another tenant is more backlogged for its weight, whose newest waiter is then
        pushed out. Backlogs count live waiters' cost, the newcomer's in its own tenant's."""
        if self._max_waiting is None:
            return True
        live = 0
        own = cost  # the newcomer's tenant's backlog, at the newcomer's weight
        worst: _Waiter | None = None  # the newest waiter of the most backlogged other tenant
        worst_cost = worst_weight = 0
        for name, backlog in self._ring.items():
            queued = 0
            newest: _Waiter | None = None
            for waiter in backlog.waiters:
                if not waiter.future.done():
                    live += 1
                    queued += waiter.cost
                    newest = waiter
            if name == tenant:
                own += queued
            elif newest is not None:
                # queued / weight against worst_cost / worst_weight, exactly; ties: the newer
                ahead = queued * worst_weight - worst_cost * backlog.weight
                if worst is None or ahead > 0 or (ahead == 0 and newest.seq > worst.seq):
                    worst, worst_cost, worst_weight = newest, queued, backlog.weight
        if live < self._max_waiting:
            return True
        if worst is None or own * worst_weight >= worst_cost * weight:
            return False  # the newcomer's tenant is the most backlogged (or tied): it loses
        self._push_out(worst, worst_weight)
        return True

    def _push_out(self, waiter: _Waiter, weight: int) -> None:
        if waiter.timer is not None:
            waiter.timer.cancel()
        self._unqueue(waiter)
        self._pushed_out[waiter.tenant] = self._pushed_out.get(waiter.tenant, 0) + 1
        waiter.future.set_exception(
            QueueFull(
                self.name,
                waiter.tenant,
                waited_s=self._now() - waiter.enqueued_at,
                retry_after_s=self._retry_after(waiter.tenant, weight),
                pushed_out=True,
            )
        )

    def _abandon(self, waiter: _Waiter) -> None:
        """The waiting task was cancelled. A slot granted to it in the same iteration goes on
        to the next waiter; a timeout or push-out that raced the cancellation is already
        counted."""
        if waiter.timer is not None:
            waiter.timer.cancel()
        future = waiter.future
        if future.done() and not future.cancelled():
            if future.exception() is not None:
                return
            self._in_use -= 1
            self._dispatch()
        self._unqueue(waiter)
        self._cancelled[waiter.tenant] = self._cancelled.get(waiter.tenant, 0) + 1

    def _expire(self, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        loop = self._loop
        assert loop is not None
        now = loop.time()
        if now < waiter.deadline_at:  # the loop may run a timer a clock tick early
            waiter.timer = loop.call_at(waiter.deadline_at, self._expire, waiter)
            return
        backlog = self._ring.get(waiter.tenant)
        weight = backlog.weight if backlog is not None else 1
        self._unqueue(waiter)
        waiter.future.set_exception(self._timeout(waiter.tenant, weight, now - waiter.enqueued_at))

    def _timeout(self, tenant: str, weight: int, waited_s: float) -> QueueTimeout:
        self._timed_out[tenant] = self._timed_out.get(tenant, 0) + 1
        return QueueTimeout(self.name, tenant, waited_s=waited_s, retry_after_s=self._retry_after(tenant, weight))

    def _retry_after(self, tenant: str, weight: int) -> int:
        """Seconds until a request of `tenant` sent again would likely get a slot: the grants
        ahead of it (its own backlog at its weight's share, at most everyone's backlog) times
        the time one grant takes (mean hold time over the capacity)."""
        waiting = sum(len(b.waiters) for b in self._ring.values())
        backlog = self._ring.get(tenant)
        own = len(backlog.waiters) if backlog is not None else 0
        own_weight = backlog.weight if backlog is not None else weight
        total_weight = sum(b.weight for b in self._ring.values()) + (0 if backlog is not None else weight)
        ahead = min(waiting + 1, (own + 1) * total_weight / own_weight)
        estimate = math.ceil(ahead * self._mean_hold_s / max(self._capacity, 1))
        return max(RETRY_AFTER_MIN_S, min(RETRY_AFTER_MAX_S, estimate))
