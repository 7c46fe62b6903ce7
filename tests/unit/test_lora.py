"""LoRA listings: catalog rules, engine config, the adapter folder check and the replica loader."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tokenmart.deployments.app import AppArgs, adapter_paths, build_app, llm_config_for
from tokenmart.deployments.catalog import Catalog, CatalogError, parse_catalog
from tokenmart.deployments.lora import AdapterError, adapter_rank, check_adapter
from tokenmart.deployments.lora_loader import CatalogAdapterLoader

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_CATALOG = REPO_ROOT / "cluster" / "catalog" / "local.yaml"


def _adapter(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "id": "base-7b:sql",
        "source": "/adapters/sql",
        "pricing": {"prompt_usd_per_1m": "0.3", "completion_usd_per_1m": "0.9"},
    }
    raw.update(overrides)
    return raw


def _raw(lora: dict[str, Any] | None = None, **extra_listing: Any) -> dict[str, Any]:
    listing: dict[str, Any] = {
        "id": "base-7b",
        "owner": "acme",
        "source": "acme/base-7b",
        "description": "the base",
        "context_length": 8192,
        "default_max_tokens": 512,
        "pricing": {"prompt_usd_per_1m": "0.1", "completion_usd_per_1m": "0.2"},
        "accelerator": {"kind": "cpu"},
        **extra_listing,
    }
    if lora is not None:
        listing["lora"] = lora
    return {"listings": [listing, {**listing, "id": "other-7b", "lora": None}]}


def _lora(*adapters: dict[str, Any], **settings: Any) -> dict[str, Any]:
    return {"adapters": list(adapters) or [_adapter()], **settings}


def _error_for(raw: dict[str, Any]) -> str:
    with pytest.raises(CatalogError) as info:
        parse_catalog(raw)
    return str(info.value)


def _write_adapter(folder: Path, rank: int = 8, **config: Any) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, **config}))
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    return folder


# -- catalog -------------------------------------------------------------------------------


def test_an_adapter_is_sold_as_its_own_model_with_the_base_limits():
    catalog = parse_catalog(_raw(_lora(_adapter(), _adapter(id="base-7b:chat", owner="chatco", description="chat"))))

    assert [offer.id for offer in catalog.offers] == ["base-7b", "base-7b:sql", "base-7b:chat", "other-7b"]
    assert [listing.id for listing in catalog.listings] == ["base-7b", "other-7b"]  # what gets deployed
    sql = catalog.get("base-7b:sql")
    assert sql is not None
    assert (sql.owner, sql.description, sql.lora) == ("acme", "", None)  # owner defaults to the base's
    assert (sql.pricing.prompt_usd_per_1m, sql.pricing.completion_usd_per_1m) == (Decimal("0.3"), Decimal("0.9"))
    assert (sql.context_length, sql.default_max_tokens, sql.source) == (8192, 512, "acme/base-7b")
    assert sql.cost_micros(1_000_000, 1_000_000) == 1_200_000
    assert catalog.get("base-7b:chat").owner == "chatco"
    assert catalog.base_of("base-7b:sql").id == "base-7b"
    assert catalog.base_of("base-7b") is None
    assert catalog.base_of("nope") is None and catalog.get("nope") is None


def test_the_catalog_round_trips_through_json_with_its_adapters():
    catalog = parse_catalog(_raw(_lora()))
    again = Catalog.model_validate(catalog.model_dump(mode="json"))
    assert again == catalog
    assert [offer.id for offer in again.offers] == ["base-7b", "base-7b:sql", "other-7b"]


@pytest.mark.parametrize("adapter_id", ["base-7b", "other-7b"])
def test_an_adapter_id_may_not_reuse_a_listing_id(adapter_id: str):
    message = _error_for(_raw(_lora(_adapter(id=adapter_id))))
    assert f"model id {adapter_id!r} appears more than once" in message


def test_two_adapters_may_not_share_an_id():
    assert "'base-7b:sql' appears more than once" in _error_for(_raw(_lora(_adapter(), _adapter())))


def test_a_lora_block_needs_adapters():
    message = _error_for(_raw({"adapters": []}))
    assert "listing 'base-7b' (listings[0]): field lora.adapters" in message


@pytest.mark.parametrize("rank", [0, 4, 15, 1024])
def test_max_rank_must_be_one_vllm_accepts(rank: int):
    message = _error_for(_raw(_lora(max_rank=rank)))
    assert "field lora.max_rank" in message
    assert "1, 8, 16, 32, 64, 128, 256, 320, 512" in message


@pytest.mark.parametrize("key", ["enable_lora", "max_lora_rank", "max_loras", "max_cpu_loras"])
def test_lora_engine_args_are_set_through_the_lora_block(key: str):
    message = _error_for(_raw(engine={"extra": {key: 1}}))
    assert "set LoRA serving in the listing's lora block" in message and key in message


def test_adapter_prices_follow_the_listing_price_rules():
    message = _error_for(_raw(_lora(_adapter(pricing={"prompt_usd_per_1m": "0.0000001", "completion_usd_per_1m": 1}))))
    assert "lora.adapters.0.pricing.prompt_usd_per_1m" in message


def test_the_local_catalog_sells_the_ahoy_adapter_of_smollm2():
    from tokenmart.deployments.catalog import load_catalog

    catalog = load_catalog(LOCAL_CATALOG)
    ahoy = catalog.get("smollm2-135m-instruct:ahoy")
    assert ahoy is not None
    assert catalog.base_of(ahoy.id).id == "smollm2-135m-instruct"
    assert catalog.get("smollm2-135m-instruct").lora.adapters[0].source == "builtin:smollm2-135m-instruct-ahoy-lora"


# -- engine config ---------------------------------------------------------------------------


def test_lora_listing_turns_on_vllm_lora_and_serve_multiplexing(tmp_path: Path):
    listing = parse_catalog(_raw(_lora(max_rank=16, max_adapters_per_replica=3))).get("base-7b")
    config = llm_config_for(listing, tmp_path)

    kwargs = config.engine_kwargs
    assert (kwargs["enable_lora"], kwargs["max_lora_rank"], kwargs["max_loras"]) == (True, 16, 3)
    assert config.lora_config.max_num_adapters_per_replica == 3
    assert config.lora_config.dynamic_lora_loading_path is None  # adapters come from the catalog loader
    assert config.multiplex_config().max_num_models_per_replica == 3


def test_listing_without_lora_leaves_lora_off(tmp_path: Path):
    config = llm_config_for(parse_catalog(_raw()).get("base-7b"), tmp_path)
    assert "enable_lora" not in config.engine_kwargs
    assert config.lora_config is None


def test_builtin_adapter_sources_resolve_into_the_model_dir(tmp_path: Path):
    listing = parse_catalog(_raw(_lora(_adapter(), _adapter(id="base-7b:demo", source="builtin:demo")))).get("base-7b")
    assert adapter_paths(listing, tmp_path) == {"base-7b:sql": "/adapters/sql", "base-7b:demo": str(tmp_path / "demo")}


def test_the_vllm_deployment_gets_the_catalog_adapter_loader(tmp_path: Path):
    catalog = parse_catalog(_raw(_lora(max_rank=32)))
    app = build_app(AppArgs(catalog=catalog, model_dir=str(tmp_path), redis_url="redis://r:1/0"))
    ingress = app._bound_deployment.init_kwargs
    assert set(ingress["llm_deployments"]) == {"base-7b", "other-7b"}  # adapters share their base's replicas
    assert set(ingress["model_cards"]) == {"base-7b", "other-7b"}  # Ray Serve LLM's per-deployment cards

    base = ingress["llm_deployments"]["base-7b"]._bound_deployment
    loader = base.init_kwargs["model_downloader"](download_timeout_s=5.0, max_tries=2)
    assert isinstance(loader, CatalogAdapterLoader)
    assert (loader.adapters, loader.max_rank, loader.max_tries) == ({"base-7b:sql": "/adapters/sql"}, 32, 2)
    other = ingress["llm_deployments"]["other-7b"]._bound_deployment
    assert "model_downloader" not in other.init_kwargs


def test_the_fake_engine_deployment_knows_the_adapters(tmp_path: Path):
    catalog = parse_catalog(_raw(_lora(max_adapters_per_replica=2)))
    app = build_app(AppArgs(catalog=catalog, engine="fake", model_dir=str(tmp_path), redis_url="redis://r:1/0"))
    fake = app._bound_deployment.init_kwargs["llm_deployments"]["base-7b"]._bound_deployment
    assert (fake.init_kwargs["adapters"], fake.init_kwargs["max_adapters"]) == ({"base-7b:sql": "/adapters/sql"}, 2)


# -- adapter folders ---------------------------------------------------------------------------


def test_a_peft_lora_folder_passes_and_reports_its_rank(tmp_path: Path):
    folder = _write_adapter(tmp_path / "a", rank=8)
    assert adapter_rank(folder) == 8
    check_adapter("m:a", folder, max_rank=8)


def test_an_adapter_above_the_max_rank_is_refused_with_the_fix(tmp_path: Path):
    folder = _write_adapter(tmp_path / "a", rank=32)
    expected = r"adapter 'm:a' has rank 32, above .*max_rank \(16\); raise max_rank to at least 32"
    with pytest.raises(AdapterError, match=expected):
        check_adapter("m:a", folder, max_rank=16)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda f: None, "adapter_config.json does not exist"),
        (lambda f: (f.mkdir(), (f / "adapter_config.json").write_text("{")), "cannot be read"),
        (lambda f: _write_adapter(f, peft_type="IA3"), "peft_type must be LORA"),
        (lambda f: (_write_adapter(f), (f / "adapter_model.safetensors").unlink()), "has no adapter weights"),
        (lambda f: _write_adapter(f, rank="eight"), "no valid rank"),
    ],
)
def test_a_folder_that_is_not_a_lora_adapter_is_refused(tmp_path: Path, setup, message: str):
    folder = tmp_path / "a"
    setup(folder)
    with pytest.raises(AdapterError, match=message) as info:
        check_adapter("m:a", folder, max_rank=64)
    assert str(info.value).startswith("adapter 'm:a': ")


class _Config:
    model_id = "base-7b"


def test_the_loader_hands_llmserver_the_local_folder_once(tmp_path: Path):
    folder = _write_adapter(tmp_path / "sql")
    loader = CatalogAdapterLoader({"base-7b:sql": str(folder)}, max_rank=8)

    first = asyncio.run(loader.load_model_from_config("base-7b:sql", _Config()))
    assert (first.model_id, first.local_path, first.max_total_tokens) == ("base-7b:sql", str(folder), None)
    again = asyncio.run(loader.load_model_from_config("base-7b:sql", _Config()))
    assert again is first  # same adapter id, same vLLM LoRA id


def test_the_loader_refuses_an_adapter_the_listing_does_not_sell(tmp_path: Path):
    loader = CatalogAdapterLoader({}, max_rank=8)
    with pytest.raises(AdapterError, match="'base-7b:x' is not an adapter of 'base-7b'"):
        asyncio.run(loader.load_model_from_config("base-7b:x", _Config()))


def test_the_loader_checks_the_folder_before_vllm_sees_it(tmp_path: Path):
    loader = CatalogAdapterLoader({"base-7b:sql": str(_write_adapter(tmp_path / "sql", rank=64))}, max_rank=8)
    with pytest.raises(AdapterError, match="rank 64"):
        asyncio.run(loader.load_model_from_config("base-7b:sql", _Config()))
