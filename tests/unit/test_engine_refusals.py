"""Engine exceptions: the ones that describe the request are 400s without internals; the rest are outages."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError

from tokenmart.deployments.errors import client_message, engine_error, request_refusal


def through_ray(cause: Exception) -> BaseException:
    """What the ingress catches when an engine replica's call raised `cause`."""
    traceback = 'Traceback (most recent call last):\n  File "/x/vllm/renderers/hf.py", line 3, in f\n'
    return RayTaskError("chat", traceback + repr(cause), cause).as_instanceof_cause()


@pytest.mark.parametrize(
    "cause",
    [
        TypeError(
            "PreTrainedTokenizerBase.apply_chat_template() got multiple values for keyword argument 'conversation'"
        ),
        ValueError("Found unexpected chat template kwargs from request: {'tokenize'}"),
        UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"),
    ],
    ids=["type_error", "value_error", "unicode"],
)
def test_engine_errors_that_describe_the_request_are_400s(cause: Exception) -> None:
    refusal = request_refusal(through_ray(cause))
    assert refusal is not None
    assert (refusal.status_code, refusal.code, refusal.type) == (400, "invalid_value", "invalid_request_error")
    assert refusal.message.startswith("The model could not process the request: ")
    for internal in ("Traceback", "File ", ".py", "TypeError", "ValueError", "ray::"):
        assert internal not in refusal.message


@pytest.mark.parametrize(
    "error",
    [ActorDiedError(), BackPressureError(num_queued_requests=3, max_queued_requests=2), RuntimeError("engine dead")],
    ids=["dead_actor", "backpressure", "runtime"],
)
def test_outages_are_not_client_mistakes(error: BaseException) -> None:
    assert request_refusal(error) is None


def test_client_messages_keep_the_first_line_without_exception_names_or_paths() -> None:
    text = 'ValueError: max_tokens is too large\nTraceback (most recent call last):\n  File "/a/b.py", line 1'
    assert client_message(text) == "max_tokens is too large"
    assert client_message("see /opt/venv/lib/vllm/x.py for details") == "see for details"
    assert len(client_message("x" * 1000)) == 300
    assert client_message("") == ""


def test_engine_error_messages_reach_clients_without_internals_in_json_and_in_streams() -> None:
    """The JSON error and a stream's error event both come from `engine_error`."""
    text = 'TypeError: bad value for top_k\n  File "/x/vllm/sampling_params.py", line 9'
    for status in (400, 500):
        body = engine_error({"error": {"message": text, "code": status}}).body()["error"]
        assert body["message"] == "bad value for top_k"
    assert engine_error({"error": {"message": "/only/a/path.py", "code": 500}}).message == (
        "The model failed to process the request."
    )


def test_a_settlement_over_its_hold_moves_the_hold_exceeded_metric() -> None:
    """The gateway's wiring from a capped settlement to `ray_tokenmart_hold_exceeded_total`
    (the cap itself is tested on Redis in tests/integration/test_money_path.py)."""
    import asyncio

    from tokenmart.deployments.billing import Admission, Settlement
    from tokenmart.deployments.catalog import Catalog
    from tokenmart.deployments.gateway import Gateway, Usage

    catalog = Catalog.model_validate(
        {
            "listings": [
                {
                    "id": "m",
                    "owner": "o",
                    "source": "s",
                    "context_length": 64,
                    "default_max_tokens": 8,
                    "pricing": {"prompt_usd_per_1m": 1, "completion_usd_per_1m": 1},
                    "accelerator": {"kind": "cpu"},
                }
            ]
        }
    )

    class Handle:
        def options(self, **_: object) -> Handle:
            return self

    class Meter:
        async def settle(self, admission, prompt, completion, outcome, generation=None):  # type: ignore[no-untyped-def]
            return Settlement(prompt, completion, 8, 0, uncharged_micros=3 if prompt > 5 else 0)

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, tuple]] = []

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return lambda *args, **kwargs: self.calls.append((name, args))

    metrics = Recorder()
    gateway = Gateway(catalog, {"m": Handle()}, Meter(), metrics=metrics)  # type: ignore[arg-type]
    admission = Admission("b1", "org_1", "key_1", catalog.get("m"), hold_micros=8)
    asyncio.run(gateway._settle(admission, Usage(9, 1), "completed"))  # cost above the hold
    asyncio.run(gateway._settle(admission, Usage(1, 1), "completed"))  # within it
    assert [args for name, args in metrics.calls if name == "hold_exceeded"] == [("m",)]
