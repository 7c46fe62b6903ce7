"""The gateway against a real Redis when the engine fails before its first token.

No Ray here: the model handle is a stand-in whose stream raises the error a dead replica
raises, so the path is exercised every time (with a real cluster, Serve may already have
routed around the dead replica).
"""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path

import pytest
from ray.exceptions import ActorDiedError
from redis import asyncio as aioredis
from starlette.requests import ClientDisconnect, Request

from tokenmart.deployments.billing import Meter
from tokenmart.deployments.catalog import Catalog
from tokenmart.deployments.errors import ServiceUnavailable
from tokenmart.deployments.gateway import Gateway
from tokenmart.deployments.keystore import KeyStore, account_key
from tokenmart.deployments.ray_llm import ChatCompletionRequest
from tokenmart.deployments.schemas import CreateKeyRequest, KeyRecord
from tokenmart.deployments.spool import SettlementSpool

from .conftest import TEST_CATALOG

pytestmark = pytest.mark.integration


class _DeadStream:
    def __aiter__(self):
        return self

    async def __anext__(self):
        raise ActorDiedError()

    def cancel(self) -> None:
        self.cancelled = True


class _DeadHandle:
    def __init__(self) -> None:
        self.streams: list[_DeadStream] = []
        self.chat = self

    def options(self, **_: object) -> _DeadHandle:
        return self

    def remote(self, request: object, raw: object) -> _DeadStream:
        self.streams.append(_DeadStream())
        return self.streams[-1]


async def _books(keys: KeyStore, record: KeyRecord) -> tuple[int, int, int, int, int]:
    """(organization balance, hold, spent; the key's own hold, spent), in micro-USD."""
    key, org = await keys.with_org(await keys.require(record.id))
    return org.balance_micros, org.hold_micros, org.spent_micros, key.hold_micros, key.spent_micros


def _request(key: str) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions",
                    "headers": [(b"authorization", f"Bearer {key}".encode())]})  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
def test_a_dead_engine_answers_503_with_retry_after_and_refunds_the_whole_hold(
    redis_server, redis_client, tmp_path: Path, stream: bool
):
    async def scenario() -> None:
        redis = aioredis.from_url(redis_server.url, decode_responses=True)
        try:
            keys = KeyStore(redis)
            record, key = await keys.create(CreateKeyRequest(name="dead-engine", credit_usd=Decimal(1)))
            handles = {listing.id: _DeadHandle() for listing in TEST_CATALOG.listings}
            meter = Meter(redis, spool=SettlementSpool(tmp_path / "settlements.jsonl"))
            gateway = Gateway(TEST_CATALOG, handles, meter, plain_requests=True)
            body = ChatCompletionRequest(
                model="beta-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=50, stream=stream
            )

            with pytest.raises(ServiceUnavailable) as failure:
                await gateway.handle(body, _request(key), method="chat")

            assert failure.value.status_code == 503
            assert int(failure.value.headers["retry-after"]) >= 1
            assert set(failure.value.body()["error"]) == {"message", "type", "param", "code"}
            assert handles["beta-chat"].streams  # it did reach the engine
            assert await _books(keys, record) == (1_000_000, 0, 0, 0, 0)
            (event,) = await redis.xrange(account_key(record.org_id, "ledger"))
            assert (event[1]["status"], event[1]["cost_micros"]) == ("error", "0")
        finally:
            await redis.aclose()

    asyncio.run(scenario())


class _LiveStream:
    """A fake engine stream that would go on for a long time: one token per packet."""

    def __init__(self) -> None:
        self.cancelled = False
        self.sent = 0

    def __aiter__(self):
        return self

    async def __anext__(self) -> list[str]:
        await asyncio.sleep(0.01)
        self.sent += 1
        chunk = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "model": "beta-chat",
                 "choices": [{"index": 0, "delta": {"content": " w"}, "finish_reason": None}]}  # fmt: skip
        return [f"data: {json.dumps(chunk)}\n\n"]

    def cancel(self) -> None:
        self.cancelled = True


class _LiveHandle(_DeadHandle):
    def remote(self, request: object, raw: object) -> _LiveStream:
        self.streams.append(_LiveStream())
        return self.streams[-1]


def test_a_client_gone_before_the_stream_starts_stops_the_engine_and_is_settled_at_no_cost(
    redis_server, redis_client, tmp_path: Path
):
    """The response is made, but the client is gone before its first byte: Starlette never
    starts the body, so the gateway settles the admission itself instead of leaving its hold
    and concurrency slot to the 15-minute lease."""

    async def scenario() -> None:
        redis = aioredis.from_url(redis_server.url, decode_responses=True)
        try:
            keys = KeyStore(redis)
            record, key = await keys.create(CreateKeyRequest(name="gone-early", credit_usd=Decimal(1)))
            handles = {listing.id: _LiveHandle() for listing in TEST_CATALOG.listings}
            gateway = Gateway(TEST_CATALOG, handles, Meter(redis), plain_requests=True)
            body = ChatCompletionRequest(
                model="beta-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=50, stream=True
            )
            response = await gateway.handle(body, _request(key), method="chat")
            balance, org_hold, _, key_hold, _ = await _books(keys, record)
            assert org_hold == key_hold > 0 and balance == 1_000_000 - org_hold  # admitted, not settled yet

            async def receive() -> dict:
                await asyncio.sleep(3600)
                return {"type": "http.disconnect"}

            async def send(message: dict) -> None:
                raise OSError("connection reset by peer")  # the socket is gone before the headers

            scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
            with pytest.raises(ClientDisconnect):
                await response(scope, receive, send)

            (stream,) = handles["beta-chat"].streams
            assert stream.cancelled
            assert await _books(keys, record) == (1_000_000, 0, 0, 0, 0)
            (event,) = await redis.xrange(account_key(record.org_id, "ledger"))
            assert (event[1]["status"], event[1]["completion_tokens"], event[1]["cost_micros"]) == ("aborted", "0", "0")
            assert (
                await redis.zcard(account_key(record.org_id, f"inflight:{record.id}")) == 0
            )  # the concurrency slot is free
        finally:
            await redis.aclose()

    asyncio.run(scenario())


def _narrow_catalog() -> Catalog:
    """TEST_CATALOG with beta-chat taking one request at a time and queueing one: capacity 2."""
    listings = [listing.model_dump(mode="json") for listing in TEST_CATALOG.listings]
    for listing in listings:
        if listing["id"] == "beta-chat":
            listing["autoscaling"] |= {"max_ongoing_requests": 1, "max_queued_requests": 1}
    return Catalog.model_validate({"listings": listings})


async def _narrow_gateway(redis, name: str, credit_usd: int = 1):
    """A key with `credit_usd` and a gateway over `_narrow_catalog` whose engines stream until cancelled."""
    keys = KeyStore(redis)
    record, key = await keys.create(CreateKeyRequest(name=name, credit_usd=Decimal(credit_usd)))
    handles = {listing.id: _LiveHandle() for listing in TEST_CATALOG.listings}
    return keys, record, key, handles, Gateway(_narrow_catalog(), handles, Meter(redis), plain_requests=True)


def _beta_stream() -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model="beta-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=50, stream=True
    )


async def _hang_up(response) -> None:
    """A client that is gone before the stream's first byte: the gateway settles the admission."""

    async def receive() -> dict:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        raise OSError("connection reset by peer")

    with pytest.raises(ClientDisconnect):
        await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)


def test_a_full_listing_is_refused_before_redis_and_the_engine_and_takes_requests_again_once_settled(
    redis_server, redis_client, tmp_path: Path
):
    """beta-chat's whole capacity (1 running + 1 queued) is taken by this gateway's own streams,
    so Serve would refuse a third with back-pressure: the gateway refuses it first, with the
    same 503, without holding credit (no Redis call) or calling the engine. Settling one stream
    frees its place."""

    async def scenario() -> None:
        redis = aioredis.from_url(redis_server.url, decode_responses=True)
        try:
            keys, record, key, handles, gateway = await _narrow_gateway(redis, "full-listing")
            body = _beta_stream

            running = [await gateway.handle(body(), _request(key), method="chat") for _ in range(2)]
            _, held, _, key_held, _ = await _books(keys, record)
            assert held == key_held > 0
            commands_before = (await redis.info("stats"))["total_commands_processed"]

            with pytest.raises(ServiceUnavailable) as refusal:
                await gateway.handle(body(), _request(key), method="chat")

            assert refusal.value.status_code == 503
            assert refusal.value.body()["error"]["code"] == "model_overloaded"
            assert refusal.value.headers["retry-after"] == "1"
            # No Redis command between the two INFO calls but the second INFO itself.
            assert (await redis.info("stats"))["total_commands_processed"] == commands_before + 1
            assert len(handles["beta-chat"].streams) == 2  # never dispatched
            assert gateway.load.admitted_to("beta-chat") == 2

            await _hang_up(running[0])
            assert gateway.load.admitted_to("beta-chat") == 1
            third = await gateway.handle(body(), _request(key), method="chat")
            assert len(handles["beta-chat"].streams) == 3
            for response in (running[1], third):
                await _hang_up(response)
            assert await _books(keys, record) == (1_000_000, 0, 0, 0, 0)
            assert gateway.load.admitted_to("beta-chat") == 0
        finally:
            await redis.aclose()

    asyncio.run(scenario())


def test_requests_arriving_together_at_a_full_listing_take_its_free_places_and_no_more(
    redis_server, redis_client, tmp_path: Path
):
    """Five requests reach beta-chat (capacity 2) in the same instant: each waits on prompt
    counting and Redis before it is admitted, so a check that counted a request only once
    admitted would let all five through to Serve's back-pressure (held, counted as requests,
    then bounced). Exactly two are dispatched; three get 503 model_overloaded and never reach
    Redis's request counter."""

    async def scenario() -> None:
        redis = aioredis.from_url(redis_server.url, decode_responses=True)
        try:
            keys, record, key, handles, gateway = await _narrow_gateway(redis, "together")
            body = _beta_stream

            outcomes = await asyncio.gather(
                *(gateway.handle(body(), _request(key), method="chat") for _ in range(5)), return_exceptions=True
            )
            served = [o for o in outcomes if not isinstance(o, BaseException)]
            refused = [o for o in outcomes if isinstance(o, BaseException)]
            assert len(served) == 2
            assert [(r.status_code, r.body()["error"]["code"]) for r in refused] == [(503, "model_overloaded")] * 3
            assert len(handles["beta-chat"].streams) == 2
            assert gateway.load.admitted_to("beta-chat") == 2
            assert (
                await redis.zcard(account_key(record.org_id, f"inflight:{record.id}")) == 2
            )  # only the two hold anything
            for response in served:
                await _hang_up(response)
            assert gateway.load.admitted_to("beta-chat") == 0
            assert await _books(keys, record) == (1_000_000, 0, 0, 0, 0)
        finally:
            await redis.aclose()

    asyncio.run(scenario())


def test_a_request_redis_refuses_gives_its_place_at_the_listing_back(redis_server, redis_client, tmp_path: Path):
    """A key without credit is refused by the admission script (402) after its place at the
    listing was taken; the place is given back, so refusals never fill a listing."""

    async def scenario() -> None:
        redis = aioredis.from_url(redis_server.url, decode_responses=True)
        try:
            _, _, key, handles, gateway = await _narrow_gateway(redis, "broke", credit_usd=0)
            body = ChatCompletionRequest(model="beta-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=50)
            for _ in range(3):  # more than the listing's capacity of 2
                with pytest.raises(Exception) as refusal:
                    await gateway.handle(body, _request(key), method="chat")
                assert refusal.value.status_code == 402
                assert refusal.value.body()["error"]["code"] == "insufficient_quota"
            assert gateway.load.admitted_to("beta-chat") == 0
            assert handles["beta-chat"].streams == []
        finally:
            await redis.aclose()

    asyncio.run(scenario())
