"""Locust users that speak the OpenAI API to tokenmart, streaming and not.

Besides Locust's own request timings, every streamed request reports three measurements as
their own Locust entries (request type `metric`), so they land in the same CSVs and charts:
  ttft              time to first token (ms)
  itl               mean inter-token latency of the request (ms)
  tokens_per_s      completion tokens per second of the request (reported in the
                    response-time column, as a number)

Configuration (environment):
  TOKENMART_API_KEY        the key to call with (required)
  LOADTEST_MODELS          comma-separated listing ids; users are spread over them
  LOADTEST_MAX_TOKENS      max_tokens per request (default 32)
  LOADTEST_STREAM_SHARE    share of requests that stream, 0..1 (default 0.5)
  LOADTEST_PROMPT          extra prompt text (e.g. "[[fake-tokens=64]]" for the fake engine)
  LOADTEST_STEPS           "users:seconds,users:seconds,..." runs the stepped shape below;
                           unset, Locust's own -u/-t options apply
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time

from load_steps import parse_steps, users_at  # Locust puts this file's folder on sys.path
from locust import HttpUser, LoadTestShape, between, events, task

MODELS = [m for m in os.environ.get("LOADTEST_MODELS", "").split(",") if m]
MAX_TOKENS = int(os.environ.get("LOADTEST_MAX_TOKENS", "32"))
STREAM_SHARE = float(os.environ.get("LOADTEST_STREAM_SHARE", "0.5"))
PROMPT = "Write a short sentence about load testing. " + os.environ.get("LOADTEST_PROMPT", "")
_model_cycle = itertools.cycle(MODELS or ["smollm2-135m-instruct"])


def report(name: str, value: float) -> None:
    events.request.fire(
        request_type="metric", name=name, response_time=value, response_length=0, exception=None, context={}
    )


class OpenAIUser(HttpUser):
    wait_time = between(0.05, 0.15)

    def on_start(self) -> None:
        self.model = next(_model_cycle)
        self.headers = {"authorization": f"Bearer {os.environ['TOKENMART_API_KEY']}"}

    def _body(self, stream: bool) -> dict:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0.7,
        }
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body

    @task
    def chat(self) -> None:
        if random.random() < STREAM_SHARE:
            self._stream()
        else:
            with self.client.post(
                "/v1/chat/completions", json=self._body(False), headers=self.headers, name=f"chat {self.model}",
                catch_response=True,
            ) as response:  # fmt: skip
                if response.status_code != 200:
                    response.failure(f"{response.status_code}: {response.text[:200]}")

    def _stream(self) -> None:
        started = time.perf_counter()
        token_times: list[float] = []
        completion_tokens = 0
        with self.client.post(
            "/v1/chat/completions", json=self._body(True), headers=self.headers, name=f"stream {self.model}",
            stream=True, catch_response=True,
        ) as response:  # fmt: skip
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            for line in response.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[len(b"data: ") :])
                if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                    token_times.append(time.perf_counter())
                if chunk.get("usage"):
                    completion_tokens = chunk["usage"]["completion_tokens"]
            response.success()
        if not token_times:
            return
        report("ttft", (token_times[0] - started) * 1000)
        if len(token_times) > 1:
            report("itl", (token_times[-1] - token_times[0]) * 1000 / (len(token_times) - 1))
        elapsed = token_times[-1] - started
        if completion_tokens and elapsed > 0:
            report("tokens_per_s", completion_tokens / elapsed)


if os.environ.get("LOADTEST_STEPS"):

    class SteppedLoad(LoadTestShape):
        """Hold each user count for its duration, then stop."""

        steps = parse_steps(os.environ["LOADTEST_STEPS"])

        def tick(self):
            users = users_at(self.steps, self.get_run_time())
            return None if users is None else (users, max(users, 1))  # spawn the whole step at once
