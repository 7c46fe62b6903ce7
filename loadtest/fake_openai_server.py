"""The fake engine as a bare OpenAI server: the `vllm serve` of the fake backend.

`loadtest/bench.py` starts it so that the fake backend has the same four targets as the
real one (tokenmart, plain Ray Serve LLM, the bare engine, LiteLLM in front of it). It runs
the same `FakeEngine` code as the Serve deployments, in one uvicorn process, with no Ray.

    python loadtest/fake_openai_server.py --model smollm2-135m-instruct --port 8100
"""

from __future__ import annotations

from typing import Any

import typer
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tokenmart.doubles.fake_engine import FakeEngine


class BareFakeEngine(FakeEngine):
    async def _served_as(self) -> tuple[str, str]:
        return self.model_id, ""  # no Serve multiplexing outside a replica


def create_app(model: str, reply_tokens: int, token_delay_s: float) -> FastAPI:
    engine = BareFakeEngine(model, reply_tokens=reply_tokens, token_delay_s=token_delay_s)
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "fake"}]}

    async def run(request: Request, chat: bool):
        body = await request.json()
        if body.get("model") != model:
            return JSONResponse({"error": {"message": "unknown model", "type": "NotFoundError"}}, status_code=404)
        body.setdefault("request_id", "bare")
        stream = (engine.chat if chat else engine.completions)(body)
        first = await anext(stream)
        if isinstance(first, dict):
            return JSONResponse(first, status_code=500 if "error" in first else 200)

        async def events():
            yield "".join(first)
            async for batch in stream:
                yield "".join(batch)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await run(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, chat=False)

    return app


def main(
    model: str = typer.Option(..., help="The model id it answers as."),
    port: int = typer.Option(8100),
    reply_tokens: int = typer.Option(16),
    token_delay_s: float = typer.Option(0.005),
) -> None:
    uvicorn.run(create_app(model, reply_tokens, token_delay_s), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    typer.run(main)
