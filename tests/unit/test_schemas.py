"""Money conversion, admin request bodies, organization and key records."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from tokenmart.deployments.schemas import (
    MAX_CONCURRENCY,
    MAX_RPM,
    MAX_TOKENS_PER_REQUEST,
    MAX_TPM,
    CreatedKey,
    CreateKeyRequest,
    CreateOrgRequest,
    CreditRequest,
    KeyRecord,
    KeyView,
    Limits,
    OrgRecord,
    RotateKeyRequest,
    UpdateKeyRequest,
    micros_to_usd,
    usd_to_micros,
)
from tokenmart.deployments.scripts import SCALE

# -- money ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usd", "micros"),
    [
        (Decimal("0.000001"), 1),
        (Decimal("0"), 0),
        (Decimal("1"), 1_000_000),
        (Decimal("12.345678"), 12_345_678),
        (Decimal("0.1"), 100_000),
        (Decimal("1000000"), 1_000_000_000_000),
        (Decimal("5.000000"), 5_000_000),
    ],
)
def test_usd_to_micros_is_exact(usd: Decimal, micros: int):
    result = usd_to_micros(usd)
    assert result == micros
    assert type(result) is int


@pytest.mark.parametrize("usd", ["0.0000001", "1.0000005", "12.3456789"])
def test_usd_with_seven_decimals_is_rejected(usd: str):
    with pytest.raises(ValueError, match="6 decimal places"):
        usd_to_micros(Decimal(usd))


@pytest.mark.parametrize(("micros", "usd"), [(1, 0.000001), (0, 0.0), (1_500_000, 1.5), (12_345_678, 12.345678)])
def test_micros_to_usd(micros: int, usd: float):
    assert micros_to_usd(micros) == usd


def test_micros_round_trip_through_json_number():
    for micros in (1, 7, 999_999, 1_000_001, 123_456_789_012):
        usd = micros_to_usd(micros)
        assert usd_to_micros(Decimal(json.dumps(usd))) == micros


# -- CreateKeyRequest -------------------------------------------------------------------------


def test_create_key_request_minimal():
    body = CreateKeyRequest.model_validate({"name": "alice"})
    assert body.credit_usd == Decimal(0)
    assert body.models is None
    assert body.rpm is None and body.tpm is None and body.max_concurrency is None
    assert body.expires_at_epoch is None


def test_create_key_request_keeps_credit_exact_from_json():
    body = CreateKeyRequest.model_validate_json('{"name": "alice", "credit_usd": 0.1}')
    assert usd_to_micros(body.credit_usd) == 100_000
    body = CreateKeyRequest.model_validate_json('{"name": "alice", "credit_usd": 12.345678}')
    assert usd_to_micros(body.credit_usd) == 12_345_678


def test_create_key_request_rejects_unknown_fields():
    with pytest.raises(ValidationError, match="credit"):
        CreateKeyRequest.model_validate({"name": "alice", "credit": 5})


def test_create_key_request_rejects_negative_credit():
    with pytest.raises(ValidationError) as info:
        CreateKeyRequest.model_validate({"name": "alice", "credit_usd": -1})
    assert info.value.errors()[0]["loc"] == ("credit_usd",)


@pytest.mark.parametrize("credit", [0.0000001, Decimal("0.0000001"), 1.0000005])
def test_create_key_request_rejects_credit_with_seven_decimals(credit: float | Decimal):
    with pytest.raises(ValidationError, match="6 decimal places"):
        CreateKeyRequest.model_validate({"name": "alice", "credit_usd": credit})


@pytest.mark.parametrize("field", ["rpm", "tpm", "max_concurrency"])
def test_create_key_request_rejects_zero_limits(field: str):
    with pytest.raises(ValidationError) as info:
        CreateKeyRequest.model_validate({"name": "alice", field: 0})
    assert info.value.errors()[0]["loc"] == (field,)


def test_create_key_request_rejects_empty_name_and_empty_model_list():
    with pytest.raises(ValidationError):
        CreateKeyRequest.model_validate({"name": ""})
    with pytest.raises(ValidationError):
        CreateKeyRequest.model_validate({"name": "alice", "models": []})


def test_expires_at_accepts_iso_string():
    body = CreateKeyRequest.model_validate({"name": "a", "expires_at": "2030-01-01T00:00:00Z"})
    assert body.expires_at_epoch == int(datetime(2030, 1, 1, tzinfo=timezone.utc).timestamp()) == 1_893_456_000


def test_expires_at_iso_string_with_offset():
    body = CreateKeyRequest.model_validate({"name": "a", "expires_at": "2030-01-01T02:00:00+02:00"})
    assert body.expires_at_epoch == 1_893_456_000


def test_expires_at_naive_iso_string_is_utc():
    body = CreateKeyRequest.model_validate({"name": "a", "expires_at": "2030-01-01T00:00:00"})
    assert body.expires_at_epoch == 1_893_456_000


def test_expires_at_accepts_epoch_seconds():
    body = CreateKeyRequest.model_validate({"name": "a", "expires_at": 1_893_456_000})
    assert body.expires_at_epoch == 1_893_456_000


def test_expires_at_rejects_garbage():
    with pytest.raises(ValidationError):
        CreateKeyRequest.model_validate({"name": "a", "expires_at": "next tuesday"})


# -- UpdateKeyRequest / CreditRequest ------------------------------------------------------------


def test_update_key_request_rejects_unknown_status_and_fields():
    with pytest.raises(ValidationError):
        UpdateKeyRequest.model_validate({"status": "paused"})
    with pytest.raises(ValidationError):
        UpdateKeyRequest.model_validate({"credit_usd": 5})
    assert UpdateKeyRequest.model_validate({"status": "revoked"}).status == "revoked"


def test_update_key_request_only_marks_given_fields_set():
    body = UpdateKeyRequest.model_validate({"rpm": 10})
    assert body.model_fields_set == {"rpm"}
    assert body.expires_at_epoch is None


@pytest.mark.parametrize("amount", [0, -5])
def test_credit_request_must_be_positive(amount: int):
    with pytest.raises(ValidationError):
        CreditRequest.model_validate({"amount_usd": amount})


def test_credit_request_rejects_seven_decimals_and_keeps_six():
    with pytest.raises(ValidationError, match="6 decimal places"):
        CreditRequest.model_validate({"amount_usd": 1.0000001})
    assert usd_to_micros(CreditRequest.model_validate({"amount_usd": 1.000001}).amount_usd) == 1_000_001


# -- strict admin bodies: numbers are numbers, limits are bounded, expiry is unambiguous -------------

LIMIT_BOUNDS = {
    "rpm": MAX_RPM,
    "tpm": MAX_TPM,
    "max_concurrency": MAX_CONCURRENCY,
    "max_tokens_per_request": MAX_TOKENS_PER_REQUEST,
}


def _refusal(model: type, body: dict[str, Any]) -> dict[str, Any]:
    """The one error a body gets (the first, which is what the API reports)."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return info.value.errors()[0]


@pytest.mark.parametrize("model", [CreateKeyRequest, UpdateKeyRequest])
@pytest.mark.parametrize("field", list(LIMIT_BOUNDS))
@pytest.mark.parametrize("value", ["5", True, False, 5.0, 5.5, [5], {"n": 5}])
def test_limits_must_be_json_integers_not_strings_booleans_or_floats(model: type, field: str, value: Any):
    body = {"name": "a", field: value} if model is CreateKeyRequest else {field: value}
    error = _refusal(model, body)
    assert error["loc"] == (field,)
    assert error["type"] == "int_type"


@pytest.mark.parametrize("model", [CreateKeyRequest, UpdateKeyRequest])
@pytest.mark.parametrize(("field", "bound"), list(LIMIT_BOUNDS.items()))
def test_limits_have_upper_bounds(model: type, field: str, bound: int):
    base = {"name": "a"} if model is CreateKeyRequest else {}
    for too_big in (bound + 1, 10**30, 10**400):
        error = _refusal(model, {**base, field: too_big})
        assert error["loc"] == (field,)
        assert error["type"] == "less_than_equal"
    assert getattr(model.model_validate({**base, field: bound}), field) == bound


@pytest.mark.parametrize(("field", "bound"), list(LIMIT_BOUNDS.items()))
def test_limits_bounds_hold_for_stored_records_and_operator_defaults(field: str, bound: int):
    assert Limits.model_validate({field: bound}).model_dump()[field] == bound
    with pytest.raises(ValidationError):
        Limits.model_validate({field: bound + 1})
    with pytest.raises(ValidationError):
        Limits.model_validate_json(json.dumps({field: "5"}))


def test_rate_limit_bounds_stay_exact_in_the_admission_scripts_doubles():
    """admit.lua keeps bucket levels as doubles scaled by SCALE; every level must be an exact integer."""
    assert SCALE == 60_000
    for bound in (MAX_RPM, MAX_TPM):
        assert bound * SCALE < 2**53
        assert float(bound * SCALE) == bound * SCALE
    # The README states these figures.
    assert (MAX_RPM, MAX_TPM, MAX_CONCURRENCY, MAX_TOKENS_PER_REQUEST) == (10**6, 10**9, 10**4, 10**8)


def test_create_key_request_takes_max_tokens_per_request_into_its_limits():
    body = CreateKeyRequest.model_validate({"name": "a", "rpm": 5, "max_tokens_per_request": 4096})
    assert body.limits == Limits(rpm=5, max_tokens_per_request=4096)


@pytest.mark.parametrize(("model", "field"), [(CreateKeyRequest, "credit_usd"), (CreditRequest, "amount_usd")])
@pytest.mark.parametrize("value", ["1", "1_000", "0.5", True, False, None, [1], {"usd": 1}])
def test_money_must_be_a_json_number(model: type, field: str, value: Any):
    body = {"name": "a", field: value} if model is CreateKeyRequest else {field: value}
    error = _refusal(model, body)
    assert error["loc"] == (field,)
    assert error["type"] == "usd_number"
    assert "JSON number of US dollars" in error["msg"]


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_money_must_be_finite(value: float):
    assert _refusal(CreditRequest, {"amount_usd": value})["loc"] == ("amount_usd",)


@pytest.mark.parametrize(("value", "micros"), [(5, 5_000_000), (0.1, 100_000), (12.345678, 12_345_678), (1e-6, 1)])
def test_money_as_json_numbers_is_exact(value: float, micros: int):
    assert usd_to_micros(CreditRequest.model_validate({"amount_usd": value}).amount_usd) == micros
    assert usd_to_micros(CreditRequest.model_validate_json(json.dumps({"amount_usd": value})).amount_usd) == micros


@pytest.mark.parametrize("model", [CreateKeyRequest, UpdateKeyRequest])
@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (1_893_456_000_000, "expiry_milliseconds"),  # milliseconds
        (100_000_000_000, "expiry_milliseconds"),
        (1_893_456_000.0, "expiry_type"),  # a float
        (1_893_456_000.5, "expiry_type"),
        (True, "expiry_type"),
        ("1893456000", "expiry_type"),  # a numeric string
        ("1893456000000", "expiry_type"),
        (-1, "expiry_range"),
    ],
)
def test_ambiguous_expiry_is_refused(model: type, value: Any, kind: str):
    base = {"name": "a"} if model is CreateKeyRequest else {}
    error = _refusal(model, {**base, "expires_at": value})
    assert error["loc"] == ("expires_at",)
    assert error["type"] == kind


def test_expiry_in_epoch_seconds_just_below_the_milliseconds_threshold_is_seconds():
    body = UpdateKeyRequest.model_validate({"expires_at": 99_999_999_999})
    assert body.expires_at_epoch == 99_999_999_999


@pytest.mark.parametrize("value", ["2020-01-01T00:00:00Z", "2020-01-01T00:00:00", 1_000, 0])
def test_a_key_cannot_be_created_already_expired(value: Any):
    error = _refusal(CreateKeyRequest, {"name": "a", "expires_at": value})
    assert error["loc"] == ("expires_at",)
    assert error["type"] == "expired"


def test_a_key_expiring_a_minute_from_now_can_be_created():
    soon = int(time.time()) + 60
    assert CreateKeyRequest.model_validate({"name": "a", "expires_at": soon}).expires_at_epoch == soon


def test_patch_may_set_a_past_expiry_to_expire_a_key_now():
    assert UpdateKeyRequest.model_validate({"expires_at": "2020-01-01T00:00:00Z"}).expires_at_epoch == 1_577_836_800


@pytest.mark.parametrize("field", ["name", "status"])
def test_patch_refuses_null_for_fields_that_always_have_a_value(field: str):
    error = _refusal(UpdateKeyRequest, {field: None})
    assert error["loc"] == (field,)
    assert error["type"] == "not_null"


def test_patch_null_resets_limits_models_and_expiry():
    body = UpdateKeyRequest.model_validate({"rpm": None, "models": None, "expires_at": None})
    assert body.model_dump(exclude_unset=True) == {"rpm": None, "models": None, "expires_at": None}
    assert body.expires_at_epoch is None


# -- KeyRecord ------------------------------------------------------------------------------------


ORG = OrgRecord(
    id="org_00112233445566778899",
    name="acme",
    created_at=1_699_000_000,
    balance_micros=2_500_000,
    hold_micros=40_000,
    spent_micros=460_000,
    credited_micros=3_000_000,
)
# 2024-02-29 13:20:00 UTC, a Thursday of a leap year
THURSDAY = 1_709_212_800


def _record(**overrides) -> KeyRecord:
    fields = {
        "id": "key_0123456789abcdef0123",
        "org_id": ORG.id,
        "name": "alice",
        "prefix": "sk-tm-AbCd...wXyZ",
        "key_hash": "f" * 64,
        "created_at": 1_700_000_000,
        "hold_micros": 1,
        "spent_micros": 123_456,
    }
    fields.update(overrides)
    return KeyRecord.model_validate(fields)


def test_key_without_expiry_never_expires():
    assert not _record(expires_at=None).is_expired(now=4_000_000_000)


def test_key_expires_at_its_expiry_time():
    record = _record(expires_at=1_800_000_000)
    assert not record.is_expired(now=1_799_999_999.9)
    assert record.is_expired(now=1_800_000_000)
    assert record.is_expired(now=1_800_000_001)


def test_view_never_exposes_key_hash():
    record = _record(key_hash="deadbeef" * 8, prev_key_hash="cafebabe" * 8, prev_valid_until_ms=1)
    view = record.view(ORG)
    dumped = view.model_dump()
    assert "key_hash" not in dumped and "prev_key_hash" not in dumped
    assert "deadbeef" not in view.model_dump_json()
    assert "cafebabe" not in view.model_dump_json()
    assert "key" not in dumped
    assert "key_hash" not in KeyView.model_fields


def test_view_shows_the_organizations_credit_and_the_keys_own_holds_and_spend():
    view = _record().view(ORG).model_dump()
    # What the key can draw on is its organization's balance...
    assert view["credit_usd"] == 2.5
    assert view["org_credit_usd"] == 2.5
    assert view["org_id"] == "org_00112233445566778899"
    assert view["org_name"] == "acme"
    # ...while holds and spend are this key's alone, not the organization's.
    assert view["on_hold_usd"] == 0.000001
    assert view["spent_usd"] == 0.123456
    assert view["object"] == "api_key"
    assert view["id"] == "key_0123456789abcdef0123"
    assert view["prefix"] == "sk-tm-AbCd...wXyZ"
    assert view["status"] == "active"
    assert view["models"] is None
    assert view["limits"] == {"rpm": None, "tpm": None, "max_concurrency": None, "max_tokens_per_request": None}
    assert view["spend_cap_usd"] is None
    assert view["spend_cap_period"] is None
    assert view["spent_this_period_usd"] == 0.0
    assert view["period_resets_at"] is None


def test_view_carries_limits_and_models():
    record = _record(models=["m"], limits=Limits(rpm=60, tpm=10_000, max_concurrency=4), expires_at=1_900_000_000)
    view = record.view(ORG).model_dump()
    assert view["models"] == ["m"]
    assert view["limits"] == {"rpm": 60, "tpm": 10_000, "max_concurrency": 4, "max_tokens_per_request": None}
    assert view["expires_at"] == 1_900_000_000


def test_org_view_shows_its_money_in_usd():
    view = ORG.view().model_dump()
    assert view == {
        "object": "organization",
        "id": "org_00112233445566778899",
        "name": "acme",
        "tier": None,
        "credit_usd": 2.5,
        "on_hold_usd": 0.04,
        "spent_usd": 0.46,
        "credited_usd": 3.0,
        "created_at": 1_699_000_000,
    }


# -- spend caps in the view -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("period", "period_id", "resets_at"),
    [
        ("daily", "daily:2024-02-29", 1_709_251_200),  # 2024-03-01 00:00 UTC
        ("weekly", "weekly:2024-02-26", 1_709_510_400),  # Monday 2024-03-04 00:00 UTC
        ("monthly", "monthly:2024-02", 1_709_251_200),  # 2024-03-01 00:00 UTC
    ],
)
def test_view_shows_this_periods_spend_and_when_the_period_resets(period: str, period_id: str, resets_at: int):
    record = _record(cap_micros=5_000_000, cap_period=period, period_id=period_id, period_spent_micros=1_250_000)
    view = record.view(ORG, now_s=THURSDAY)
    assert view.spend_cap_usd == 5.0
    assert view.spend_cap_period == period
    assert view.spent_this_period_usd == 1.25
    assert view.period_resets_at == resets_at
    assert datetime.fromtimestamp(resets_at, tz=timezone.utc).time() == datetime.min.time()


def test_spend_of_a_past_period_is_not_this_periods():
    """The stored spend belongs to yesterday: today starts from nothing, before any settlement writes."""
    record = _record(
        cap_micros=5_000_000, cap_period="daily", period_id="daily:2024-02-28", period_spent_micros=4_000_000
    )
    view = record.view(ORG, now_s=THURSDAY)
    assert view.spent_this_period_usd == 0.0
    assert view.period_resets_at == 1_709_251_200
    # one second before midnight it is still today; at midnight the next day's period starts
    assert (
        _record(cap_micros=1, cap_period="daily", period_id="daily:2024-02-29")
        .view(ORG, now_s=1_709_251_199)
        .period_resets_at
        == 1_709_251_200
    )
    assert _record(cap_micros=1, cap_period="daily").view(ORG, now_s=1_709_251_200).period_resets_at == 1_709_337_600


def test_a_cap_without_a_period_never_resets():
    record = _record(cap_micros=2_000_000, cap_period=None, period_id="", period_spent_micros=700_000)
    view = record.view(ORG, now_s=THURSDAY)
    assert view.spend_cap_usd == 2.0
    assert view.spend_cap_period is None
    assert view.spent_this_period_usd == 0.7
    assert view.period_resets_at is None


def test_created_key_shows_the_key_once_but_not_its_hash():
    record = _record()
    created = CreatedKey(**record.view(ORG).model_dump(), key="sk-tm-secret").model_dump()
    assert created["key"] == "sk-tm-secret"
    assert "key_hash" not in created
    assert created["id"] == record.id
    assert created["org_id"] == ORG.id


# -- organizations, caps and rotation in the admin bodies -------------------------------------


def test_a_key_in_an_existing_organization_takes_no_credit_of_its_own():
    error = _refusal(CreateKeyRequest, {"name": "a", "org_id": "org_1", "credit_usd": 5})
    assert error["type"] == "org_credit"
    assert "POST /admin/v1/orgs/{id}/credit" in error["msg"]
    body = CreateKeyRequest.model_validate({"name": "a", "org_id": "org_1"})
    assert (body.org_id, body.credit_usd) == ("org_1", Decimal(0))
    # credit_usd 0 sent explicitly is no credit either
    assert CreateKeyRequest.model_validate({"name": "a", "org_id": "org_1", "credit_usd": 0}).org_id == "org_1"


def test_a_cap_period_needs_a_cap():
    error = _refusal(CreateKeyRequest, {"name": "a", "spend_cap_period": "daily"})
    assert error["type"] == "cap_period"
    body = CreateKeyRequest.model_validate({"name": "a", "spend_cap_usd": 2.5, "spend_cap_period": "weekly"})
    assert usd_to_micros(body.spend_cap_usd) == 2_500_000
    assert body.spend_cap_period == "weekly"


@pytest.mark.parametrize("model", [CreateKeyRequest, UpdateKeyRequest])
def test_a_spend_cap_is_positive_with_a_known_period(model: type):
    base = {"name": "a"} if model is CreateKeyRequest else {}
    assert _refusal(model, {**base, "spend_cap_usd": 0})["loc"] == ("spend_cap_usd",)
    assert _refusal(model, {**base, "spend_cap_usd": "5"})["loc"] == ("spend_cap_usd",)
    assert _refusal(model, {**base, "spend_cap_usd": 1, "spend_cap_period": "hourly"})["loc"] == ("spend_cap_period",)


def test_patch_null_removes_the_cap_and_its_period():
    body = UpdateKeyRequest.model_validate({"spend_cap_usd": None, "spend_cap_period": None})
    assert body.model_dump(exclude_unset=True) == {"spend_cap_usd": None, "spend_cap_period": None}


def test_create_org_request_takes_exact_credit_and_a_name():
    body = CreateOrgRequest.model_validate_json('{"name": "acme", "credit_usd": 12.345678}')
    assert usd_to_micros(body.credit_usd) == 12_345_678
    assert _refusal(CreateOrgRequest, {"name": ""})["loc"] == ("name",)
    assert _refusal(CreateOrgRequest, {"name": "a", "credit_usd": -1})["loc"] == ("credit_usd",)
    assert _refusal(CreateOrgRequest, {"name": "a", "balance_usd": 1})["type"] == "extra_forbidden"


def test_rotation_grace_is_whole_seconds_up_to_thirty_days():
    assert RotateKeyRequest.model_validate({}).grace_s == 0
    assert RotateKeyRequest.model_validate({"grace_s": 30 * 24 * 3600}).grace_s == 2_592_000
    assert _refusal(RotateKeyRequest, {"grace_s": 30 * 24 * 3600 + 1})["loc"] == ("grace_s",)
    assert _refusal(RotateKeyRequest, {"grace_s": -1})["loc"] == ("grace_s",)
    assert _refusal(RotateKeyRequest, {"grace_s": "60"})["loc"] == ("grace_s",)


def test_key_record_rejects_unknown_status():
    with pytest.raises(ValidationError):
        _record(status="suspended")


def test_stored_limits_from_before_the_bounds_are_clamped_so_the_record_still_loads() -> None:
    raw = '{"rpm": 1e30, "tpm": "5000", "max_concurrency": true, "max_tokens_per_request": 0, "extra": 1}'
    assert Limits.from_stored(raw) == Limits(rpm=1_000_000, tpm=5000)
    assert Limits.from_stored(None) == Limits.from_stored("not json") == Limits()
    assert Limits.from_stored('{"rpm": 60, "tpm": 10000}') == Limits(rpm=60, tpm=10_000)
