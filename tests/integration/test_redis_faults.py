"""A slow or connection-resetting Redis: admission answers 503 in bounded time, nothing leaks.

A small TCP proxy sits between the meter and a real `redis-server` and injects latency or
cuts connections. The meter is the one the ingress uses, with the ingress's client settings
(`keystore.connect`: 1 s timeouts, one retry on a fresh connection).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path

import pytest

from tokenmart.deployments.billing import Meter
from tokenmart.deployments.errors import BillingUnavailable
from tokenmart.deployments.keystore import KeyStore, connect
from tokenmart.deployments.schemas import CreateKeyRequest, KeyRecord
from tokenmart.deployments.spool import SettlementSpool

from .conftest import TEST_CATALOG

pytestmark = pytest.mark.integration

TIMEOUT_S = 1.0
LISTING = TEST_CATALOG.get("alpha-chat")


class FaultyProxy:
    """Forwards TCP to Redis; `delay_s` holds every reply back, `reset` cuts every connection.

    `connections` counts the connections the client opened; `peak_held` is the most replies
    held back at the same time, i.e. how many commands were in flight together.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay_s = 0.0
        self.reset = False
        self.connections = 0
        self.held = self.peak_held = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> FaultyProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in list(self._writers):
            writer.close()
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    def cut_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.reset:
            client_writer.transport.abort()
            return
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {client_writer, redis_writer}

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: bool) -> None:
            try:
                while data := await reader.read(65536):
                    if self.reset:
                        break
                    if delay and self.delay_s:
                        self.held += 1
                        self.peak_held = max(self.peak_held, self.held)
                        try:
                            await asyncio.sleep(self.delay_s)
                        finally:
                            self.held -= 1
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.transport.abort()

        await asyncio.gather(pipe(client_reader, redis_writer, False), pipe(redis_reader, client_writer, True))
        self._writers -= {client_writer, redis_writer}


def run(scenario: Callable[[FaultyProxy, Meter, KeyStore, KeyRecord], Awaitable[None]], redis_server, tmp_path):
    async def main() -> None:
        async with FaultyProxy(redis_server.port) as proxy:
            redis = connect(proxy.url, timeout_s=TIMEOUT_S)
            try:
                keys = KeyStore(redis)
                record, _ = await keys.create(CreateKeyRequest(name="faults", credit_usd=Decimal(10)))
                meter = Meter(redis, spool=SettlementSpool(tmp_path / "settlements.jsonl"))
                await scenario(proxy, meter, keys, record)
            finally:
                await redis.aclose()

    asyncio.run(main())


def in_use(meter: Meter) -> int:
    return len(meter.redis.connection_pool._in_use_connections)


def test_added_latency_under_the_timeout_slows_requests_but_they_succeed(redis_server, redis_client, tmp_path: Path):
    delay_s = 0.3

    async def burst(meter: Meter, key: KeyRecord) -> float:
        started = time.monotonic()
        admissions = await asyncio.gather(*(meter.admit(key.key_hash, LISTING, 10, 10) for _ in range(20)))
        await asyncio.gather(*(meter.settle(admission, 10, 5, "completed") for admission in admissions))
        return time.monotonic() - started

    async def scenario(proxy, meter, keys, key):
        await burst(meter, key)  # 20 pooled connections, scripts loaded, the secret located (cached)
        opened = proxy.connections
        proxy.delay_s = delay_s
        elapsed = await burst(meter, key)
        # Every reply was held back (two round trips each: admit, then settle)...
        assert elapsed >= 2 * delay_s, elapsed
        # ...and the 20 requests waited side by side on the 20 pooled connections, never in a
        # queue behind one connection (which would have made it 20 x 0.3 s, past the timeout).
        assert (proxy.peak_held, proxy.connections - opened) == (20, 0)
        record, org = await keys.with_org(await keys.require(key.id))
        assert record.hold_micros == org.hold_micros == 0
        assert record.spent_micros == org.spent_micros == 40 * LISTING.cost_micros(10, 5)
        assert org.balance_micros == 10_000_000 - org.spent_micros
        assert in_use(meter) == 0

    run(scenario, redis_server, tmp_path)


def test_a_redis_slower_than_the_timeout_answers_503_within_the_timeout(redis_server, redis_client, tmp_path: Path):
    async def timed_admit(meter: Meter, key: KeyRecord) -> tuple[float, BaseException | None]:
        started = time.monotonic()
        try:
            await meter.admit(key.key_hash, LISTING, 10, 10)
        except BillingUnavailable as exc:
            return time.monotonic() - started, exc
        return time.monotonic() - started, None

    async def scenario(proxy, meter, keys, key):
        await meter.admit(key.key_hash, LISTING, 10, 10)  # one pooled connection exists
        opened = proxy.connections
        proxy.delay_s = 5.0
        results = await asyncio.gather(*(timed_admit(meter, key) for _ in range(10)))
        for seconds, refusal in results:
            assert isinstance(refusal, BillingUnavailable), results
            assert refusal.headers["retry-after"] == "2"
            # Each refusal comes when its own socket timeout fires: not before (it did wait for
            # Redis), and not after a second one (timeouts are not retried), far from the 5 s stall.
            assert TIMEOUT_S <= seconds < 2 * TIMEOUT_S, results
        # The one pooled connection plus 9 new ones, none opened again for a retry.
        assert proxy.connections - opened == 9
        assert in_use(meter) == 0

        proxy.delay_s = 0.0
        proxy.cut_all()  # the stalled connections are useless now; the pool must recover
        admission = await meter.admit(key.key_hash, LISTING, 10, 10)
        await meter.settle(admission, 10, 5, "completed")
        assert in_use(meter) == 0

    run(scenario, redis_server, tmp_path)


def test_reset_connections_answer_503_and_the_pool_recovers_without_leaking(redis_server, redis_client, tmp_path):
    async def scenario(proxy, meter, keys, key):
        before_resets = await meter.admit(key.key_hash, LISTING, 10, 10)
        proxy.reset = True
        proxy.cut_all()
        for _ in range(30):
            with pytest.raises(BillingUnavailable):
                await meter.admit(key.key_hash, LISTING, 10, 10)
        assert in_use(meter) == 0

        proxy.reset = False
        before = proxy.connections
        admissions = [await meter.admit(key.key_hash, LISTING, 10, 10) for _ in range(30)]
        for admission in admissions:
            await meter.settle(admission, 10, 5, "completed")
        assert in_use(meter) == 0
        # One fresh connection replaces the dead one, and the 60 sequential calls all reuse it.
        assert proxy.connections - before == 1
        record, org = await keys.with_org(await keys.require(key.id))
        assert record.spent_micros == org.spent_micros == 30 * LISTING.cost_micros(10, 5)
        # The admission from before the resets still holds its slot and credit; nothing else does.
        assert record.hold_micros == org.hold_micros == before_resets.hold_micros
        assert org.balance_micros + org.hold_micros + org.spent_micros == org.credited_micros == 10_000_000

    run(scenario, redis_server, tmp_path)
