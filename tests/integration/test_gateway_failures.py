"""The gateway against a real Redis when the engine fails before its first token.

No Ray here: the model handle is a stand-in whose stream raises the error a dead replica
raises, so the path is exercised every time (with a real cluster, Serve may already have
routed around the dead replica).
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import pytest
from ray.exceptions import ActorDiedError
from ray.llm._internal.serve.core.configs.openai_api_models import ChatCompletionRequest
from redis import asyncio as aioredis
from starlette.requests import Request

from tokenmart.deployments.errors import ServiceUnavailable
from tokenmart.deployments.gateway import Gateway
from tokenmart.deployments.keystore import KeyStore
from tokenmart.deployments.metering import Meter
from tokenmart.deployments.schemas import CreateKeyRequest
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
            after = await keys.require(record.id)
            assert (after.balance_micros, after.hold_micros, after.spent_micros) == (1_000_000, 0, 0)
            (event,) = await redis.xrange(f"{{acct:{record.id}}}:ledger")
            assert (event[1]["status"], event[1]["cost_micros"]) == ("error", "0")
        finally:
            await redis.aclose()

    asyncio.run(scenario())
