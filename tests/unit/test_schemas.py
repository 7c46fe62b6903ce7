"""Money conversion, admin request bodies and key records."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal

import pytest
from pydantic import ValidationError

from tokenmart.deployments.schemas import (
    CreatedKey,
    CreateKeyRequest,
    CreditRequest,
    KeyRecord,
    KeyView,
    Limits,
    UpdateKeyRequest,
    micros_to_usd,
    usd_to_micros,
)

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


def test_create_key_request_rejects_credit_with_seven_decimals():
    with pytest.raises(ValidationError, match="6 decimal places"):
        CreateKeyRequest.model_validate({"name": "alice", "credit_usd": "0.0000001"})


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
        CreditRequest.model_validate({"amount_usd": "1.0000001"})
    assert usd_to_micros(CreditRequest.model_validate({"amount_usd": "1.000001"}).amount_usd) == 1_000_001


# -- KeyRecord ------------------------------------------------------------------------------------


def _record(**overrides) -> KeyRecord:
    fields = {
        "id": "key_0123456789abcdef0123",
        "name": "alice",
        "prefix": "sk-tm-AbCd...wXyZ",
        "key_hash": "f" * 64,
        "created_at": 1_700_000_000,
        "balance_micros": 2_500_000,
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
    record = _record(key_hash="deadbeef" * 8)
    view = record.view()
    dumped = view.model_dump()
    assert "key_hash" not in dumped
    assert "deadbeef" not in view.model_dump_json()
    assert "key" not in dumped
    assert "key_hash" not in KeyView.model_fields


def test_view_shows_money_in_usd():
    view = _record().view().model_dump()
    assert view["credit_usd"] == 2.5
    assert view["on_hold_usd"] == 0.000001
    assert view["spent_usd"] == 0.123456
    assert view["object"] == "api_key"
    assert view["id"] == "key_0123456789abcdef0123"
    assert view["prefix"] == "sk-tm-AbCd...wXyZ"
    assert view["status"] == "active"
    assert view["models"] is None
    assert view["limits"] == {"rpm": None, "tpm": None, "max_concurrency": None}


def test_view_carries_limits_and_models():
    record = _record(models=["m"], limits=Limits(rpm=60, tpm=10_000, max_concurrency=4), expires_at=1_900_000_000)
    view = record.view().model_dump()
    assert view["models"] == ["m"]
    assert view["limits"] == {"rpm": 60, "tpm": 10_000, "max_concurrency": 4}
    assert view["expires_at"] == 1_900_000_000


def test_created_key_shows_the_key_once_but_not_its_hash():
    record = _record()
    created = CreatedKey(**record.view().model_dump(), key="sk-tm-secret").model_dump()
    assert created["key"] == "sk-tm-secret"
    assert "key_hash" not in created
    assert created["id"] == record.id


def test_key_record_rejects_unknown_status():
    with pytest.raises(ValidationError):
        _record(status="suspended")
