"""Tool calling: the catalog's `engine.tool_parser`, the vLLM flags it turns into, and the 400
a listing without one gives to tool_choice auto, required or a named function."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tokenmart.deployments.app import known_tool_parser, llm_config_for
from tokenmart.deployments.catalog import CatalogError, Listing, load_catalog, parse_catalog
from tokenmart.deployments.errors import BadRequest
from tokenmart.deployments.ray_llm import ChatCompletionRequest, CompletionRequest
from tokenmart.deployments.validation import validate_request

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_CATALOG = REPO_ROOT / "cluster" / "catalog" / "local.yaml"
GPU_CATALOG = REPO_ROOT / "cluster" / "catalog" / "gpu-example.yaml"

NAMED = {"type": "function", "function": {"name": "get_weather"}}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _listing(tool_parser: str | None = None, **engine: Any) -> Listing:
    if tool_parser is not None:
        engine["tool_parser"] = tool_parser
    return Listing.model_validate(
        {
            "id": "smollm2-135m-instruct",
            "owner": "huggingfacetb",
            "source": "builtin:smollm2-135m-instruct",
            "context_length": 2048,
            "pricing": {"prompt_usd_per_1m": "0.02", "completion_usd_per_1m": "0.04"},
            "accelerator": {"kind": "cpu"},
            "engine": {"dtype": "bfloat16", **engine},
        }
    )


def _catalog_error(engine: dict[str, Any]) -> str:
    raw = {"listings": [_listing().model_dump(mode="json") | {"engine": engine}]}
    with pytest.raises(CatalogError) as info:
        parse_catalog(raw)
    return str(info.value)


def chat(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    return ChatCompletionRequest.model_validate(body | fields)


# -- the catalog field ------------------------------------------------------------------------


def test_the_local_smollm2_listing_parses_hermes_tool_calls():
    catalog = load_catalog(LOCAL_CATALOG)
    assert catalog.get("smollm2-135m-instruct").engine.tool_parser == "hermes"
    # Its LoRA adapter runs on the same engine, so it calls tools through the same parser.
    assert catalog.get("smollm2-135m-instruct:ahoy").engine.tool_parser == "hermes"


def test_the_gpu_example_llama_listings_parse_llama3_json_tool_calls():
    catalog = load_catalog(GPU_CATALOG)
    assert {listing.id: listing.engine.tool_parser for listing in catalog.listings} == {
        "llama-3.1-8b-instruct": "llama3_json",
        "llama-3.3-70b-instruct": "llama3_json",
    }


def test_a_listing_has_no_tool_parser_unless_it_sets_one():
    assert _listing().engine.tool_parser is None


@pytest.mark.parametrize("name", ["", "hermes json", "-hermes", "x" * 65])
def test_a_tool_parser_name_of_the_wrong_shape_is_refused_naming_the_field(name: str):
    message = _catalog_error({"tool_parser": name})
    assert "listing 'smollm2-135m-instruct' (listings[0]): field engine.tool_parser" in message


@pytest.mark.parametrize("flag", ["enable_auto_tool_choice", "tool_call_parser"])
def test_vllm_tool_flags_in_engine_extra_are_refused(flag: str):
    message = _catalog_error({"extra": {flag: "hermes" if flag == "tool_call_parser" else True}})
    assert "field engine.extra" in message
    assert f"set tool calling with engine.tool_parser, not {flag} in extra" in message


# -- the vLLM engine flags --------------------------------------------------------------------


def test_a_tool_parser_turns_on_vllms_auto_tool_choice_with_that_parser(tmp_path: Path):
    config = llm_config_for(_listing("hermes"), tmp_path)
    assert config.engine_kwargs["enable_auto_tool_choice"] is True
    assert config.engine_kwargs["tool_call_parser"] == "hermes"
    # Ray Serve LLM hands them to vLLM's OpenAI frontend (FrontendArgs), not to the engine core.
    engine_config = config.get_engine_config()
    assert engine_config.frontend_kwargs == {
        "enable_auto_tool_choice": True,
        "tool_call_parser": "hermes",
        "enable_prompt_tokens_details": True,  # every listing: cached prompt tokens are priced
    }
    assert not {"enable_auto_tool_choice", "tool_call_parser"} & set(engine_config.engine_kwargs)


def test_without_a_tool_parser_the_engine_gets_no_tool_flags(tmp_path: Path):
    config = llm_config_for(_listing(), tmp_path)
    assert not {"enable_auto_tool_choice", "tool_call_parser"} & set(config.engine_kwargs)
    assert config.get_engine_config().frontend_kwargs == {"enable_prompt_tokens_details": True}


def test_a_parser_vllm_does_not_know_fails_the_build_naming_listing_and_field(tmp_path: Path):
    with pytest.raises(CatalogError) as info:
        llm_config_for(_listing("hermes2"), tmp_path)
    message = str(info.value)
    assert message.startswith(
        "listing 'smollm2-135m-instruct': field engine.tool_parser: vLLM has no tool parser 'hermes2' (known: "
    )
    assert "hermes, " in message and "llama3_json, " in message


@pytest.mark.parametrize("path", [LOCAL_CATALOG, GPU_CATALOG], ids=lambda p: p.name)
def test_every_shipped_tool_parser_is_one_vllm_has(path: Path):
    parsing = [listing for listing in load_catalog(path).listings if listing.engine.tool_parser is not None]
    assert parsing  # each shipped catalog has a listing that calls tools
    for listing in parsing:
        assert known_tool_parser(listing) == listing.engine.tool_parser


# -- the ingress's check ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "wanted"),
    [
        ({"tool_choice": "auto"}, "'auto'"),
        ({"tool_choice": "required"}, "'required'"),
        ({"tool_choice": NAMED}, "a named function ('get_weather')"),
        ({}, "'auto'"),  # tools without tool_choice mean auto, as in OpenAI's API
    ],
    ids=["auto", "required", "named", "default"],
)
def test_tool_choice_without_a_tool_parser_is_400_param_tool_choice(fields: dict[str, Any], wanted: str):
    with pytest.raises(BadRequest) as info:
        validate_request(chat(tools=[WEATHER_TOOL], **fields), _listing(), chat=True)
    error = info.value
    assert (error.status_code, error.type, error.code, error.param) == (
        400,
        "invalid_request_error",
        "invalid_value",
        "tool_choice",
    )
    assert error.message == (
        f"Model 'smollm2-135m-instruct' does not support tool calling: tool_choice {wanted} needs a tool "
        "parser, which its listing does not set. Send tool_choice 'none' to pass tools as context only."
    )


@pytest.mark.parametrize("tool_choice", ["auto", "required", NAMED])
def test_tool_choice_with_a_tool_parser_passes(tool_choice: Any):
    body = chat(tools=[WEATHER_TOOL], tool_choice=tool_choice, max_tokens=30)
    validate_request(body, _listing("hermes"), chat=True)
    assert body.max_tokens == 30


def test_tool_choice_none_and_requests_without_tools_pass_without_a_parser():
    validate_request(chat(tools=[WEATHER_TOOL], tool_choice="none"), _listing(), chat=True)
    validate_request(chat(), _listing(), chat=True)
    completion = CompletionRequest.model_validate({"model": "smollm2-135m-instruct", "prompt": "Once upon"})
    validate_request(completion, _listing(), chat=False)
