"""The public route table and the /v1/models card of a listing."""

from __future__ import annotations

from fastapi import FastAPI

from tokenmart.deployments.catalog import Listing
from tokenmart.deployments.ingress import ENDPOINTS, listing_card


def _routes() -> set[tuple[str, str]]:
    app = FastAPI()
    for name, factory in ENDPOINTS.items():

        async def endpoint() -> dict:
            return {}

        endpoint.__name__ = name
        factory(app)(endpoint)
    return {(method, route.path) for route in app.routes for method in getattr(route, "methods", ()) or ()}


def test_public_paths_and_aliases_are_routed():
    routes = _routes()
    expected = {
        ("POST", "/v1/chat/completions"),
        ("POST", "/api/v1/chat/completions"),
        ("POST", "/v1/inference/chat/completions"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
        ("GET", "/api/v1/models"),
        ("GET", "/v1/key"),
        ("GET", "/api/v1/key"),
        ("GET", "/v1/usage"),
        ("GET", "/api/v1/usage"),
        ("GET", "/healthz"),
        ("POST", "/admin/v1/keys"),
        ("GET", "/admin/v1/keys"),
        ("GET", "/admin/v1/keys/{key_id}"),
        ("PATCH", "/admin/v1/keys/{key_id}"),
        ("DELETE", "/admin/v1/keys/{key_id}"),
        ("POST", "/admin/v1/keys/{key_id}/credit"),
        ("GET", "/admin/v1/usage"),
    }
    missing = expected - routes
    assert not missing, missing


def test_admin_create_key_route_answers_201():
    app = FastAPI()

    async def endpoint() -> dict:
        return {}

    ENDPOINTS["admin_create_key"](app)(endpoint)
    (route,) = [r for r in app.routes if getattr(r, "path", None) == "/admin/v1/keys"]
    assert route.status_code == 201


def test_listing_card_shows_id_owner_context_and_prices_per_million():
    listing = Listing.model_validate(
        {
            "id": "llama-3.1-8b-instruct",
            "owner": "meta",
            "source": "meta-llama/Llama-3.1-8B-Instruct",
            "description": "Llama 3.1 8B",
            "context_length": 131072,
            "pricing": {"prompt_usd_per_1m": "0.015", "completion_usd_per_1m": "0.06"},
        }
    )
    card = listing_card(listing)
    assert card["id"] == "llama-3.1-8b-instruct"
    assert card["object"] == "model"
    assert card["owned_by"] == "meta"
    assert card["context_length"] == 131072
    assert card["description"] == "Llama 3.1 8B"
    # No cached price of its own: prompt tokens from the prefix cache cost the prompt price.
    assert card["pricing"] == {
        "prompt_usd_per_1m": 0.015,
        "completion_usd_per_1m": 0.06,
        "cached_prompt_usd_per_1m": 0.015,
    }
    # JSON numbers, not strings (Decimal would serialise as a string)
    assert isinstance(card["pricing"]["prompt_usd_per_1m"], float)


def test_listing_card_does_not_leak_serving_details():
    listing = Listing.model_validate(
        {
            "id": "m",
            "owner": "o",
            "source": "/private/models/secret-path",
            "context_length": 1024,
            "pricing": {"prompt_usd_per_1m": 1, "completion_usd_per_1m": 2},
        }
    )
    card = listing_card(listing)
    assert "/private/models/secret-path" not in str(card)
    assert "engine" not in card and "source" not in card
