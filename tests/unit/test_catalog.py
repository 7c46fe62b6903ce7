"""The catalog file: shipped catalogs load, bad ones fail naming listing and field, prices are exact."""

from __future__ import annotations

import copy
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tokenmart.deployments.catalog import (
    Catalog,
    CatalogError,
    Listing,
    load_catalog,
    parse_catalog,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CATALOG_DIR = REPO_ROOT / "cluster" / "catalog"
SHIPPED_CATALOGS = sorted(CATALOG_DIR.glob("*.yaml"))


def _listing(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "id": "x",
        "owner": "acme",
        "source": "acme/model-7b",
        "context_length": 4096,
        "pricing": {"prompt_usd_per_1m": "0.02", "completion_usd_per_1m": "0.04"},
    }
    raw.update(overrides)
    return raw


def _catalog(*listings: dict[str, Any]) -> dict[str, Any]:
    return {"listings": list(listings) or [_listing()]}


def _error_for(raw: Any) -> str:
    with pytest.raises(CatalogError) as info:
        parse_catalog(raw)
    return str(info.value)


def _priced(prompt: str, completion: str) -> Listing:
    return Listing.model_validate(_listing(pricing={"prompt_usd_per_1m": prompt, "completion_usd_per_1m": completion}))


# -- shipped catalogs ------------------------------------------------------------------


def test_local_catalog_is_shipped():
    assert (CATALOG_DIR / "local.yaml") in SHIPPED_CATALOGS


@pytest.mark.parametrize("path", SHIPPED_CATALOGS, ids=lambda p: p.name)
def test_every_shipped_catalog_loads_and_validates(path: Path):
    catalog = load_catalog(path)
    assert isinstance(catalog, Catalog)
    assert catalog.listings
    ids = [listing.id for listing in catalog.listings]
    assert len(ids) == len(set(ids))
    for listing in catalog.listings:
        assert listing.default_max_tokens < listing.context_length
        assert listing.autoscaling.min_replicas <= listing.autoscaling.max_replicas
        assert catalog.get(listing.id) is listing


def test_local_catalog_lists_smollm2_on_cpu_with_exact_prices():
    catalog = load_catalog(CATALOG_DIR / "local.yaml")
    listing = catalog.get("smollm2-135m-instruct")
    assert listing is not None
    assert listing.source == "builtin:smollm2-135m-instruct"
    assert listing.accelerator.kind == "cpu"
    assert listing.accelerator.type is None
    assert listing.context_length == 2048
    assert listing.default_max_tokens == 256
    assert listing.engine.dtype == "bfloat16"
    # YAML floats 0.02 / 0.04 must become exact decimals, not binary floats.
    assert listing.pricing.prompt_usd_per_1m == Decimal("0.02")
    assert listing.pricing.completion_usd_per_1m == Decimal("0.04")
    assert listing.pricing.prompt_micros_per_1m == 20_000
    assert listing.pricing.completion_micros_per_1m == 40_000


def test_catalog_get_returns_none_for_unknown_id():
    catalog = parse_catalog(_catalog())
    assert catalog.get("x") is not None
    assert catalog.get("nope") is None


# -- invalid catalogs name the listing, its index and the dotted field ---------------------


def test_bad_engine_field_names_listing_index_and_dotted_field():
    message = _error_for(_catalog(_listing(engine={"tensor_parallel_size": 0})))
    assert "listing 'x' (listings[0])" in message
    assert "engine.tensor_parallel_size" in message


def test_error_in_second_listing_names_that_listing_and_index():
    message = _error_for(_catalog(_listing(id="good"), _listing(id="bad", context_length=8)))
    assert "listing 'bad' (listings[1])" in message
    assert "context_length" in message
    assert "'good'" not in message


def test_every_problem_is_reported_at_once():
    message = _error_for(_catalog(_listing(engine={"tensor_parallel_size": 0, "pipeline_parallel_size": 0})))
    assert "engine.tensor_parallel_size" in message
    assert "engine.pipeline_parallel_size" in message


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"contxt_length": 4096}, "contxt_length"),
        ({"engine": {"tensor_paralel_size": 2}}, "engine.tensor_paralel_size"),
        ({"pricing": {"prompt_usd_per_1m": 1, "completion_usd_per_1m": 1, "currency": "EUR"}}, "pricing.currency"),
    ],
)
def test_unknown_field_typo_is_rejected(overrides: dict[str, Any], field: str):
    message = _error_for(_catalog(_listing(**overrides)))
    assert "listing 'x' (listings[0])" in message
    assert field in message
    assert "Extra inputs are not permitted" in message


def test_unknown_top_level_field_is_rejected():
    raw = _catalog()
    raw["listing"] = []
    message = _error_for(raw)
    assert "field listing" in message


def test_duplicate_listing_ids_are_rejected():
    message = _error_for(_catalog(_listing(id="dup"), _listing(id="dup")))
    assert "'dup'" in message
    assert "more than once" in message


def test_empty_catalog_is_rejected():
    message = _error_for({"listings": []})
    assert "field listings" in message


def test_min_replicas_above_max_replicas_is_rejected():
    message = _error_for(_catalog(_listing(autoscaling={"min_replicas": 3, "max_replicas": 2})))
    assert (
        "  - listing 'x' (listings[0]): autoscaling.min_replicas 3 is larger than autoscaling.max_replicas 2" in message
    )


def test_price_with_seven_decimals_is_rejected():
    message = _error_for(_catalog(_listing(pricing={"prompt_usd_per_1m": "0.0000001", "completion_usd_per_1m": "1"})))
    assert "pricing.prompt_usd_per_1m" in message
    assert "6 decimal places" in message


def test_price_with_six_decimals_is_accepted():
    listing = _priced("0.000001", "12.345678")
    assert listing.pricing.prompt_micros_per_1m == 1
    assert listing.pricing.completion_micros_per_1m == 12_345_678


def test_negative_price_is_rejected():
    message = _error_for(_catalog(_listing(pricing={"prompt_usd_per_1m": "-1", "completion_usd_per_1m": "1"})))
    assert "pricing.prompt_usd_per_1m" in message


@pytest.mark.parametrize("default_max_tokens", [4096, 5000])
def test_default_max_tokens_must_be_below_context_length(default_max_tokens: int):
    message = _error_for(_catalog(_listing(context_length=4096, default_max_tokens=default_max_tokens)))
    assert (
        f"  - listing 'x' (listings[0]): default_max_tokens {default_max_tokens} must be smaller than "
        "context_length 4096"
    ) in message


def test_default_max_tokens_just_below_context_length_is_accepted():
    listing = Listing.model_validate(_listing(context_length=4096, default_max_tokens=4095))
    assert listing.default_max_tokens == 4095


def test_cpu_accelerator_with_a_type_is_rejected():
    message = _error_for(_catalog(_listing(accelerator={"kind": "cpu", "type": "A100"})))
    assert "listing 'x' (listings[0])" in message
    assert "accelerator" in message
    assert "kind: gpu" in message


@pytest.mark.parametrize(
    "shadowed", ["tensor_parallel_size", "pipeline_parallel_size", "dtype", "max_num_seqs", "max_model_len"]
)
def test_engine_extra_cannot_shadow_typed_engine_args(shadowed: str):
    message = _error_for(_catalog(_listing(engine={"extra": {shadowed: 2, "enforce_eager": True}})))
    assert "engine.extra" in message
    assert shadowed in message


def test_engine_extra_passes_other_args_through():
    listing = Listing.model_validate(_listing(engine={"extra": {"enforce_eager": True, "swap_space": 4}}))
    assert listing.engine.extra == {"enforce_eager": True, "swap_space": 4}


def test_missing_listing_id_reports_index():
    raw = _listing()
    del raw["id"]
    message = _error_for(_catalog(raw))
    assert "(listings[0])" in message
    assert "field id" in message


def test_invalid_listing_id_is_rejected():
    message = _error_for(_catalog(_listing(id="has space")))
    assert "listing 'has space' (listings[0])" in message
    assert "field id" in message


def test_missing_file_raises_catalog_error(tmp_path: Path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(CatalogError, match="does not exist") as info:
        load_catalog(missing)
    assert str(missing) in str(info.value)


def test_invalid_yaml_raises_catalog_error(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("listings:\n  - id: x\n    owner: [unclosed\n")
    with pytest.raises(CatalogError, match="not valid YAML") as info:
        load_catalog(path)
    assert str(path) in str(info.value)


def test_empty_yaml_file_raises_catalog_error(tmp_path: Path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(path) in str(info.value)


def test_invalid_file_error_names_file_listing_and_field(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "listings:\n"
        "  - id: big-model\n"
        "    owner: acme\n"
        "    source: acme/big\n"
        "    context_length: 8192\n"
        "    pricing: {prompt_usd_per_1m: 1, completion_usd_per_1m: 2}\n"
        "    engine: {tensor_parallel_size: 0}\n"
    )
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    message = str(info.value)
    assert str(path) in message
    assert "listing 'big-model' (listings[0])" in message
    assert "engine.tensor_parallel_size" in message


def test_listing_is_frozen():
    listing = Listing.model_validate(_listing())
    with pytest.raises(Exception, match="frozen"):
        listing.context_length = 1  # type: ignore[misc]


def test_parse_catalog_does_not_mutate_input():
    raw = _catalog(_listing(engine={"extra": {"enforce_eager": True}}))
    before = copy.deepcopy(raw)
    parse_catalog(raw)
    assert raw == before


# -- cost: integer micro-USD, rounded up ------------------------------------------------------


def test_cost_rounds_up_to_next_micro_usd():
    listing = _priced("0.02", "0.04")
    # (100 * 20_000 + 50 * 40_000) / 1e6 = 4.0 exactly
    assert listing.cost_micros(100, 50) == 4
    # (101 * 20_000 + 50 * 40_000) / 1e6 = 4.02 -> 5
    assert listing.cost_micros(101, 50) == 5
    # a single prompt token at 0.02 USD/1M is 0.02 micro-USD -> charged 1
    assert listing.cost_micros(1, 0) == 1


def test_cost_of_exact_multiple_is_not_rounded_up():
    listing = _priced("1", "2")
    assert listing.cost_micros(1, 1) == 3
    assert listing.cost_micros(1_000_000, 0) == 1_000_000
    assert listing.cost_micros(0, 1_000_000) == 2_000_000


def test_cost_of_zero_tokens_is_zero():
    assert _priced("0.02", "0.04").cost_micros(0, 0) == 0
    assert _priced("3", "15").cost_micros(0, 0) == 0


def test_free_listing_costs_nothing():
    assert _priced("0", "0").cost_micros(123_456, 789) == 0


def test_cost_is_an_int():
    assert type(_priced("0.015", "0.06").cost_micros(7, 3)) is int


def test_cost_of_large_counts_is_exact():
    listing = _priced("0.015", "0.075")
    prompt, completion = 123_456_789_012, 987_654_321_098
    # 123456789012 * 15000 + 987654321098 * 75000 = 75_925_925_917_530_000 (> 2**53: floats would lose it)
    assert prompt * 15_000 + completion * 75_000 > 2**53
    assert listing.cost_micros(prompt, completion) == 75_925_925_918
    assert listing.cost_micros(prompt, 0) == 1_851_851_836  # 1_851_851_835.18 -> rounded up


def test_cost_with_sub_cent_prices_uses_exact_decimals():
    # 0.1 + 0.2 style prices: float math would give 0.30000000000000004 USD
    listing = _priced("0.1", "0.2")
    assert listing.cost_micros(1_000_000, 1_000_000) == 300_000


# -- model sources --------------------------------------------------------------------------


def test_builtin_source_resolves_into_model_dir(tmp_path: Path):
    listing = Listing.model_validate(_listing(source="builtin:smollm2-135m-instruct"))
    assert listing.resolved_source(tmp_path) == str(tmp_path / "smollm2-135m-instruct")


def test_builtin_source_defaults_to_cache_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TOKENMART_CACHE_DIR", str(tmp_path))
    listing = Listing.model_validate(_listing(source="builtin:tiny"))
    assert listing.resolved_source() == str(tmp_path / "models" / "tiny")


@pytest.mark.parametrize("source", ["meta-llama/Llama-3.1-8B-Instruct", "/models/llama-3.1-8b", "s3://bucket/model"])
def test_hub_id_or_path_source_passes_through(source: str, tmp_path: Path):
    listing = Listing.model_validate(_listing(source=source))
    assert listing.resolved_source(tmp_path) == source
    assert listing.resolved_source() == source


# -- rules across fields (deployments/catalog_rules.py) and prices in quotes ------------------------


@pytest.mark.parametrize("price", ["$0.50", "0.5 USD", "1e-3", "+0.5", " 0.5", "0.0000001", "20000", "-1"])
def test_a_price_in_quotes_must_be_a_plain_decimal_within_the_bounds(price: str):
    message = _error_for(_catalog(_listing(pricing={"prompt_usd_per_1m": price, "completion_usd_per_1m": "1"})))
    assert (
        "listing 'x' (listings[0]): field pricing.prompt_usd_per_1m: Value error, a price written as text must be a "
        'plain decimal from 0 to 10000 with at most 6 decimal places, like "0.15"'
    ) in message


@pytest.mark.parametrize(("price", "micros"), [("0.5", 500_000), ("10000", 10_000_000_000), ("007.000001", 7_000_001)])
def test_a_price_in_quotes_is_exact(price: str, micros: int):
    assert _priced(price, "0").pricing.prompt_micros_per_1m == micros


def _grouped(*groups: dict[str, Any]) -> dict[str, Any]:
    listing = _listing(accelerator={"kind": "gpu", "group": "a100x4"})
    return {"listings": [listing], "worker_groups": list(groups)}


def test_a_worker_group_whose_min_replicas_exceed_its_max_is_refused():
    message = _error_for(_grouped({"name": "a100x4", "gpus_per_worker": 4, "min_replicas": 3, "max_replicas": 2}))
    assert message.splitlines()[1:] == [
        "  - worker_groups[0]: min_replicas 3 of worker group 'a100x4' is larger than its max_replicas 2"
    ]


def test_two_worker_groups_may_not_share_a_name():
    group = {"name": "a100x4", "gpus_per_worker": 4}
    message = _error_for(_grouped(group, {**group, "gpus_per_worker": 8}))
    assert message.splitlines()[1:] == ["  - worker_groups[1]: the name 'a100x4' is used twice"]


def test_every_broken_rule_is_its_own_line_naming_its_listing():
    message = _error_for(
        _catalog(
            _listing(id="a", autoscaling={"min_replicas": 2}),
            _listing(id="b", default_max_tokens=4096, engine={"extra": {"max_model_len": 8}}),
        )
    )
    assert message.splitlines() == [
        "catalog is invalid:",
        "  - listing 'a' (listings[0]): autoscaling.min_replicas 2 is larger than autoscaling.max_replicas 1",
        "  - listing 'b' (listings[1]): default_max_tokens 4096 must be smaller than context_length 4096",
        "  - listing 'b' (listings[1]): field engine.extra: set max_model_len as its own field (or context_length), "
        "not in extra",
    ]


def test_cached_prompt_tokens_cost_the_cached_price_and_the_hold_covers_any_split():
    from decimal import Decimal

    from tokenmart.deployments.catalog import Pricing

    listing = Catalog.model_validate(
        {
            "listings": [
                {
                    "id": "m",
                    "owner": "o",
                    "source": "fake/m",
                    "context_length": 4096,
                    "accelerator": {"kind": "cpu"},
                    "pricing": {
                        "prompt_usd_per_1m": "0.3",
                        "completion_usd_per_1m": "1.2",
                        "cached_prompt_usd_per_1m": "0.075",
                    },
                }
            ]
        }
    ).get("m")
    assert listing is not None
    # 1,000 prompt tokens of which 600 cached, 100 completion: 400 x 0.3 + 600 x 0.075 + 100 x 1.2
    # = 120 + 45 + 120 = 285 micro-USD, computed in integers and rounded up once.
    assert listing.cost_micros(1_000, 100, 600) == -(-(400 * 300_000 + 600 * 75_000 + 100 * 1_200_000) // 1_000_000)
    assert listing.cost_micros(1_000, 100, 600) == 285
    assert listing.cost_micros(1_000, 100) == listing.hold_micros(1_000, 100) == 420
    assert listing.cost_micros(10, 0, 50) == listing.cost_micros(10, 0, 10)  # never more cached than prompt
    # Unset, the cached price is the prompt price; above it, the hold is at the cached price.
    plain = Pricing(prompt_usd_per_1m=Decimal("0.3"), completion_usd_per_1m=Decimal("1.2"))
    assert plain.cached_prompt_micros_per_1m == plain.prompt_micros_per_1m == 300_000
    dear = listing.model_copy(update={"pricing": plain.model_copy(update={"cached_prompt_usd_per_1m": Decimal("0.5")})})
    assert dear.hold_micros(1_000, 100) == 500 + 120 >= dear.cost_micros(1_000, 100, 1_000)
    with pytest.raises(ValueError, match="6 decimal"):
        Pricing(prompt_usd_per_1m=1, completion_usd_per_1m=1, cached_prompt_usd_per_1m=Decimal("0.0000001"))
