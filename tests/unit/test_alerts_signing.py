"""Alert webhooks without Redis: the signature, the body and headers, and the settings body's checks."""

from __future__ import annotations

import hashlib
import hmac
import json
from decimal import Decimal
from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from tokenmart.deployments.alerts import (
    AlertSettingsRequest,
    AlertSettingsView,
    alert_body,
    encode_body,
    sign,
    webhook_headers,
)
from tokenmart.deployments.errors import validation_error

SECRET = "0123456789abcdef"  # the shortest secret allowed


# -- the signature ------------------------------------------------------------------------------


def test_the_signature_is_hmac_sha256_of_the_body_in_hex():
    # The widely published HMAC-SHA256 example: key "key", the pangram as the message.
    assert sign("key", b"The quick brown fox jumps over the lazy dog") == (
        "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
    )


@pytest.mark.parametrize("body", [b"", b'{"id":"dlv_1_balance_below","object":"alert"}', bytes(range(256))])
@pytest.mark.parametrize("secret", [SECRET, "s" * 256, "clé-secrète-ünïcode-✓"])
def test_the_signature_is_what_a_receiver_computes_with_hmac(secret: str, body: bytes):
    expected = "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    assert sign(secret, body) == expected


def test_a_changed_byte_or_secret_changes_the_signature():
    body = b'{"value_usd":4.99}'
    assert sign(SECRET, body) != sign(SECRET, b'{"value_usd":4.98}')
    assert sign(SECRET, body) != sign(SECRET[::-1], body)


# -- the body and headers ---------------------------------------------------------------------------

BALANCE_ENTRY = {
    "delivery_id": "dlv_6f1d_balance_below",
    "kind": "balance_below",
    "org_id": "org_0123456789abcdef0123",
    "key_id": "",
    "threshold_micros": "5000000",
    "value_micros": "4999999",
    "request_id": "6f1d",
    "raised_at_ms": "1733011200999",
}
CAP_ENTRY = {
    "delivery_id": "dlv_77aa_cap_percent",
    "kind": "cap_percent",
    "org_id": "org_0123456789abcdef0123",
    "key_id": "key_aaaaaaaaaaaaaaaaaaaa",
    "threshold_percent": "80",
    "value_micros": "8000000",
    "request_id": "77aa",
    "raised_at_ms": "1733011201000",
}


def test_a_balance_alert_body():
    assert alert_body(BALANCE_ENTRY) == {
        "id": "dlv_6f1d_balance_below",
        "object": "alert",
        "type": "balance_below",
        "org_id": "org_0123456789abcdef0123",
        "key_id": None,
        "threshold_usd": 5.0,
        "value_usd": 4.999999,
        "request_id": "6f1d",
        "created": 1733011200,
    }


def test_a_cap_alert_body():
    assert alert_body(CAP_ENTRY) == {
        "id": "dlv_77aa_cap_percent",
        "object": "alert",
        "type": "cap_percent",
        "org_id": "org_0123456789abcdef0123",
        "key_id": "key_aaaaaaaaaaaaaaaaaaaa",
        "threshold_percent": 80,
        "value_usd": 8.0,
        "request_id": "77aa",
        "created": 1733011201,
    }


def test_the_body_is_compact_json_and_the_same_bytes_every_time():
    content = encode_body(alert_body(BALANCE_ENTRY))
    assert content == encode_body(alert_body(dict(BALANCE_ENTRY)))
    assert content.startswith(b'{"id":"dlv_6f1d_balance_below","object":"alert","type":"balance_below",')
    assert b" " not in content
    assert json.loads(content) == alert_body(BALANCE_ENTRY)


@pytest.mark.parametrize(
    "entry",
    [
        {**BALANCE_ENTRY, "kind": "credit_low"},
        {key: value for key, value in BALANCE_ENTRY.items() if key != "threshold_micros"},
        {**CAP_ENTRY, "value_micros": "lots"},
    ],
)
def test_a_malformed_entry_has_no_body(entry: dict[str, str]):
    with pytest.raises((KeyError, ValueError)):
        alert_body(entry)


def test_the_webhook_headers():
    content = encode_body(alert_body(CAP_ENTRY))
    assert webhook_headers(SECRET, "dlv_77aa_cap_percent", content) == {
        "content-type": "application/json",
        "x-tokenmart-signature": "sha256=" + hmac.new(SECRET.encode(), content, hashlib.sha256).hexdigest(),
        "x-tokenmart-delivery": "dlv_77aa_cap_percent",
        "user-agent": "tokenmart-alerts/1",
    }


# -- the settings body ----------------------------------------------------------------------------

VALID = {"url": "https://hooks.example.com/tokenmart", "secret": SECRET}


def refusal(body: dict[str, Any]) -> tuple[str | None, str]:
    """(param, message) of the 400 the admin API answers for this body."""
    with pytest.raises(ValidationError) as refused:
        AlertSettingsRequest.model_validate(body)
    errors = [{**error, "loc": ("body", *error["loc"])} for error in refused.value.errors()]
    error = validation_error(RequestValidationError(errors))
    assert error.status_code == 400
    return error.param, error.message


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        (
            {**VALID, "url": "ftp://hooks.example.com/x", "cap_percent": 50},
            "url",
            "URL scheme should be 'http' or 'https'",
        ),
        ({**VALID, "url": "hooks.example.com/x", "cap_percent": 50}, "url", "URL"),
        ({**VALID, "secret": "a" * 15, "cap_percent": 50}, "secret", "at least 16 characters"),
        ({**VALID, "secret": "a" * 257, "cap_percent": 50}, "secret", "at most 256 characters"),
        (VALID, "cap_percent", "set balance_below_usd, cap_percent or both"),
        ({**VALID, "balance_below_usd": None, "cap_percent": None}, "cap_percent", "balance_below_usd, cap_percent"),
        ({**VALID, "cap_percent": 0}, "cap_percent", "greater than or equal to 1"),
        ({**VALID, "cap_percent": 101}, "cap_percent", "less than or equal to 100"),
        ({**VALID, "cap_percent": "50"}, "cap_percent", "valid integer"),
        ({**VALID, "cap_percent": True}, "cap_percent", "valid integer"),
        ({**VALID, "balance_below_usd": "5"}, "balance_below_usd", "JSON number of US dollars, not a string"),
        ({**VALID, "balance_below_usd": -1}, "balance_below_usd", "greater than or equal to 0"),
        ({**VALID, "balance_below_usd": 0.0000001}, "balance_below_usd", "6 decimal places"),
        ({**VALID, "balance_below_usd": 5, "events": ["all"]}, "events", "Extra inputs are not permitted"),
    ],
)
def test_a_wrong_settings_body_is_a_400_naming_the_field(body: dict[str, Any], param: str, says: str):
    named, message = refusal(body)
    assert named == param
    assert f"'{param}'" in message
    assert says in message


@pytest.mark.parametrize("missing", ["url", "secret"])
def test_url_and_secret_are_required(missing: str):
    body = {key: value for key, value in VALID.items() if key != missing} | {"cap_percent": 50}
    assert refusal(body) == (missing, f"Missing required parameter: '{missing}'.")


def test_a_wrong_balance_is_named_alone_not_as_a_missing_threshold():
    with pytest.raises(ValidationError) as refused:
        AlertSettingsRequest.model_validate({**VALID, "balance_below_usd": "5"})
    assert [error["loc"] for error in refused.value.errors()] == [("balance_below_usd",)]


@pytest.mark.parametrize(
    ("thresholds", "balance", "cap"),
    [
        ({"balance_below_usd": 12.5}, Decimal("12.5"), None),
        ({"balance_below_usd": 0}, Decimal(0), None),
        ({"cap_percent": 1}, None, 1),
        ({"cap_percent": 100, "balance_below_usd": 1000000}, Decimal(1000000), 100),
    ],
)
def test_either_threshold_or_both_is_enough(thresholds: dict[str, Any], balance: Decimal | None, cap: int | None):
    request = AlertSettingsRequest.model_validate({**VALID, **thresholds})
    assert (request.balance_below_usd, request.cap_percent) == (balance, cap)


def test_the_view_has_no_secret_field():
    assert "secret" not in AlertSettingsView.model_fields
    view = AlertSettingsView(
        org_id="org_0123456789abcdef0123",
        url="https://hooks.example.com/tokenmart",
        balance_below_usd=None,
        cap_percent=80,
        created_at=1733011200,
    )
    assert view.model_dump() == {
        "object": "alert_settings",
        "org_id": "org_0123456789abcdef0123",
        "url": "https://hooks.example.com/tokenmart",
        "secret_set": True,
        "balance_below_usd": None,
        "cap_percent": 80,
        "created_at": 1733011200,
    }
