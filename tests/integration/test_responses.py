"""OpenAI's Responses API (`/v1/responses`) through the official SDK: served by the chat
pipeline, billed like chat, streamed as Responses events, and looked up by its own id."""

from __future__ import annotations

import pytest
from openai import BadRequestError, OpenAI

pytestmark = pytest.mark.integration


@pytest.fixture
def account(marketplace):
    created = marketplace.create_key(name="responses", credit_usd=1)
    with OpenAI(base_url=f"{marketplace.base_url}/v1", api_key=created["key"], max_retries=0) as client:
        yield client, created["key"]


def test_a_response_is_billed_like_chat_and_found_by_its_id(marketplace, account):
    client, key = account
    response = client.responses.create(
        model="beta-chat", instructions="Be brief.", input="say hello to the marketplace", max_output_tokens=6
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.model == "beta-chat"
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == " w0 w1 w2 w3 w4 w5"
    usage = response.usage
    # The fake engine counts words + 3 per message: "Be brief." (2 + 3) and the input (5 + 3).
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (13, 6, 19)
    cost = marketplace.cost_micros("beta-chat", 13, 6)
    assert round(usage.model_extra["cost"] * 1_000_000) == cost

    generation = marketplace.http.get(
        "/v1/generation", params={"id": response.id}, headers=marketplace.auth(key)
    ).json()
    assert (generation["prompt_tokens"], generation["completion_tokens"]) == (13, 6)
    assert round(generation["cost_usd"] * 1_000_000) == cost
    assert round(marketplace.key_info(key)["spent_usd"] * 1_000_000) == cost


def test_a_streamed_response_sends_responses_events_and_its_usage(marketplace, account):
    client, key = account
    # (The SDK's `responses.stream` helper wants a response.completed event; a reply cut at
    # max_output_tokens ends with response.incomplete, as OpenAI's own streams do.)
    events = list(client.responses.create(model="alpha-chat", input="stream please", max_output_tokens=4, stream=True))
    types = [event.type for event in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types.count("response.output_text.delta") == 4
    assert types[-1] == "response.incomplete"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    final = events[-1].response
    assert final.output_text == " w0 w1 w2 w3"
    cost = marketplace.cost_micros("alpha-chat", final.usage.input_tokens, 4)
    assert round(final.usage.model_extra["cost"] * 1_000_000) == cost
    assert round(marketplace.key_info(key)["spent_usd"] * 1_000_000) == cost


def test_what_the_responses_api_cannot_serve_is_a_400_that_costs_nothing(marketplace, account):
    client, key = account
    with pytest.raises(BadRequestError) as refused:
        client.responses.create(model="alpha-chat", input="hi", previous_response_id="resp_earlier")
    error = refused.value.body
    assert (error["param"], error["code"]) == ("previous_response_id", "unsupported_parameter")
    malformed = marketplace.http.post(
        "/v1/responses", content=b"{not json", headers={**marketplace.auth(key), "content-type": "application/json"}
    )
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_json"
    assert marketplace.key_info(key)["spent_usd"] == 0
