"""Schemathesis against the ingress's own OpenAPI document: no input makes it fail.

Every operation (inference, account, admin; every alias) gets generated requests, valid and
invalid, with a real key (or the admin token on admin paths), so bodies get past
authentication and into validation, admission and the engine. Whatever comes in, the answer
is never a 5xx, and every 4xx is the OpenAI error envelope.
"""

from __future__ import annotations

import functools

import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

pytestmark = pytest.mark.integration

EXAMPLES_PER_OPERATION = 12
ENVELOPE = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def fuzz_key(marketplace) -> str:
    # Plenty of credit and limits, so generated requests are refused for what they are, not
    # because an earlier one used the key up.
    return marketplace.create_key(name="fuzz", credit_usd=1000, rpm=100_000, tpm=100_000_000)["key"]


def check(case, response) -> int:
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    assert response.status_code < 500, where
    assert "x-request-id" in response.headers, where
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, where
        assert set(body["error"]) == ENVELOPE, where
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], where
    return response.status_code


def _with_valid_example(test, operation, auth: dict[str, str]):
    """An inference route's test, with a body it serves with 200 run besides the generated ones."""
    if not operation.path.endswith("/completions"):
        return test
    content = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in operation.path else {"prompt": "hi"}
    case = operation.Case(
        body={"model": "alpha-chat", "max_tokens": 4, **content}, headers=auth, media_type="application/json"
    )
    return example(case=case)(test)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_request_gets_a_5xx_and_every_4xx_is_the_error_envelope(marketplace, fuzz_key, mode):
    # The schema is the one the running ingress serves, so every route and alias is covered.
    schema = schemathesis.openapi.from_url(f"{marketplace.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20

    fuzzed = 0
    inference: dict[int, int] = {}  # status -> count, over the generated inference requests
    for operation in operations:
        token = marketplace.admin_token if operation.path.startswith("/admin/") else fuzz_key

        auth = {"authorization": f"Bearer {token}"}

        @given(case=operation.as_strategy(generation_mode=mode, headers=auth))
        @functools.partial(_with_valid_example, operation=operation, auth=auth)
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case) -> None:
            if case.path.endswith("/completions") and isinstance(case.body, dict) and case.body.get("model") is None:
                case.body["model"] = "alpha-chat"  # a listing, so bodies get past model resolution
            status = check(case, case.call(base_url=marketplace.base_url, timeout=30))
            if case.path.endswith("/completions"):
                inference[status] = inference.get(status, 0) + 1

        try:
            fuzz()
        except Unsatisfiable:
            # Negative mode has nothing to break in an operation without inputs (GET /healthz).
            assert mode is GenerationMode.NEGATIVE, operation.path
            continue
        fuzzed += 1
    # Every operation in positive mode; in negative mode, every one that takes input.
    assert fuzzed == len(operations) if mode is GenerationMode.POSITIVE else fuzzed >= 10, fuzzed
    # The key is accepted, so generated bodies reach validation (4xx), and a valid body (each
    # inference route's explicit example: 12 generated ones may all be invalid) the engine.
    assert 401 not in inference, inference
    if mode is GenerationMode.POSITIVE:
        assert inference.get(200, 0) > 0, inference
