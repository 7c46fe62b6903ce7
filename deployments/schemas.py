"""Marketplace types: key records, admin bodies, usage rows.

OpenAI request/response models are not here: they come from Ray Serve LLM (which takes
them from vLLM). Money crosses the API as USD numbers with up to 6 decimals and is integer
micro-USD everywhere else.
"""

from __future__ import annotations

import json
import math
import re
import time
from datetime import datetime, timezone
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .catalog import MICROS_PER_USD, TIER_PATTERN
from .periods import cap_period_id, period_resets_at

KeyStatus = Literal["active", "revoked"]

# Upper bounds of the per-key limits. The admission script keeps its token buckets as Lua
# doubles scaled by 60,000 per request or token (scripts.SCALE), so limit x 60,000 must stay
# an exact integer, below 2^53; these bounds keep it below 2^46, and keep the x-ratelimit
# headers ordinary integers.
MAX_RPM = 1_000_000
MAX_TPM = 1_000_000_000
MAX_CONCURRENCY = 10_000
MAX_TOKENS_PER_REQUEST = 100_000_000
# Epoch values at or above this are refused as milliseconds (in seconds it is the year 5138).
EPOCH_SECONDS_BELOW = 100_000_000_000
MAX_USD = 1_000_000

# Strict: a JSON string or boolean is refused (400 naming the field), never coerced.
Rpm = Annotated[StrictInt, Field(ge=1, le=MAX_RPM)]
Tpm = Annotated[StrictInt, Field(ge=1, le=MAX_TPM)]
Concurrency = Annotated[StrictInt, Field(ge=1, le=MAX_CONCURRENCY)]
# A fair-share tier's name (the catalog's `tiers`, checked against them by the ingress).
TierName = Annotated[str, Field(pattern=TIER_PATTERN)]
# As stored in a Redis hash: '' for none.
StoredTier = Annotated[str | None, BeforeValidator(lambda value: value or None)]
TokensPerRequest = Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_PER_REQUEST)]


def usd_to_micros(value: Decimal) -> int:
    micros = value * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise ValueError("amounts may have at most 6 decimal places")
    return int(micros)


def micros_to_usd(micros: int) -> float:
    return round(micros / MICROS_PER_USD, 6)


def _json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages a client can act on."""
    kinds = {bool: "boolean", str: "string", list: "array", dict: "object", float: "number", int: "integer"}
    return kinds.get(type(value), type(value).__name__)


def _usd_number(value: Any) -> Any:
    """Money arrives as a JSON number; a string ("5", "1_000") or a boolean is a client mistake.

    A float is read through its shortest repr, so 0.1 is exactly 0.1 and 1e-07 is refused for
    its seventh decimal rather than rounded. Python callers may pass a Decimal.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        kind = {"kind": _json_kind(value)}
        raise PydanticCustomError("usd_number", "Input should be a JSON number of US dollars, not a {kind}", kind)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PydanticCustomError("usd_number", "Input should be a finite number of US dollars")
        return Decimal(repr(value))
    return value


def _six_decimals(value: Decimal) -> Decimal:
    usd_to_micros(value)
    return value


Usd = Annotated[Decimal, BeforeValidator(_usd_number), AfterValidator(_six_decimals)]

_EXPIRY_FORMS = "Input should be an ISO-8601 date-time or an integer of epoch seconds"
_NUMERIC_TEXT = re.compile(r"\s*[-+]?\d+(\.\d*)?([eE][-+]?\d+)?\s*")


def _expiry(value: Any) -> Any:
    """ISO-8601 text (UTC when it has no zone) or integer epoch seconds; nothing ambiguous.

    pydantic would also take floats, numeric strings and booleans, and reads large numbers as
    milliseconds; a key's expiry must not depend on such guesses.
    """
    if value is None or isinstance(value, datetime):
        return value
    if isinstance(value, (bool, float)):
        kind = {"kind": _json_kind(value)}
        raise PydanticCustomError("expiry_type", f"{_EXPIRY_FORMS}, not a {{kind}}", kind)
    if isinstance(value, int):
        if value < 0:
            raise PydanticCustomError("expiry_range", "Epoch seconds must not be negative")
        if value >= EPOCH_SECONDS_BELOW:
            raise PydanticCustomError(
                "expiry_milliseconds",
                "{value} looks like milliseconds; give epoch seconds (or an ISO-8601 date-time)",
                {"value": value},
            )
        return datetime.fromtimestamp(value, tz=timezone.utc)
    if isinstance(value, str) and _NUMERIC_TEXT.fullmatch(value):
        raise PydanticCustomError("expiry_type", f"{_EXPIRY_FORMS}, not a numeric string")
    return value  # text: parsed as an ISO-8601 date-time by pydantic


Expiry = Annotated[datetime, BeforeValidator(_expiry)]


class Limits(BaseModel):
    """Per-key limits; None means the operator's default applies."""

    model_config = ConfigDict(extra="forbid")

    rpm: Rpm | None = Field(default=None, description=f"Requests per minute (1 to {MAX_RPM:,}).")
    tpm: Tpm | None = Field(default=None, description=f"Tokens per minute, prompt plus max output (1 to {MAX_TPM:,}).")
    max_concurrency: Concurrency | None = Field(
        default=None, description=f"Requests in flight at once (1 to {MAX_CONCURRENCY:,})."
    )
    max_tokens_per_request: TokensPerRequest | None = Field(
        default=None,
        description=f"The most output one request may ask for: prompts x n x max output tokens "
        f"(1 to {MAX_TOKENS_PER_REQUEST:,}).",
    )

    @classmethod
    def from_stored(cls, raw: str | None) -> Limits:
        """A key record's stored limits, read leniently: records written before the bounds
        existed may hold larger numbers (or strings); they are clamped into range, so a key
        record always loads (admit.lua reads the same JSON and applies it as stored)."""
        try:
            stored = json.loads(raw or "{}")
        except ValueError:
            stored = {}
        bounds = {
            "rpm": MAX_RPM,
            "tpm": MAX_TPM,
            "max_concurrency": MAX_CONCURRENCY,
            "max_tokens_per_request": MAX_TOKENS_PER_REQUEST,
        }
        clamped: dict[str, int] = {}
        for name, upper in bounds.items():
            value = stored.get(name) if isinstance(stored, dict) else None
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1:
                clamped[name] = int(min(value, upper))
        return cls(**clamped)


CapPeriod = Literal["daily", "weekly", "monthly"]


class OrgRecord(BaseModel):
    """An organization as stored in Redis (`{acct:<id>}:org`, a hash): it holds the credit."""

    id: str
    name: str
    created_at: int
    balance_micros: int = 0
    hold_micros: int = 0
    spent_micros: int = 0
    # Every credit ever granted; balance + hold + spent always equals it (see reconcile.py).
    credited_micros: int = 0
    tier: StoredTier = None  # its keys' fair-share tier, unless a key has its own

    def view(self) -> OrgView:
        return OrgView(
            id=self.id,
            name=self.name,
            tier=self.tier,
            credit_usd=micros_to_usd(self.balance_micros),
            on_hold_usd=micros_to_usd(self.hold_micros),
            spent_usd=micros_to_usd(self.spent_micros),
            credited_usd=micros_to_usd(self.credited_micros),
            created_at=self.created_at,
        )


class OrgView(BaseModel):
    object: Literal["organization"] = "organization"
    id: str
    name: str
    tier: str | None
    credit_usd: float
    on_hold_usd: float
    spent_usd: float
    credited_usd: float
    created_at: int


class KeyRecord(BaseModel):
    """A key as stored in Redis (`{acct:<org id>}:key:<id>`, a hash); its credit is its organization's."""

    id: str
    org_id: str
    name: str
    prefix: str
    key_hash: str
    # The secret a rotation replaced, valid until prev_valid_until_ms (its grace).
    prev_key_hash: str = ""
    prev_valid_until_ms: int = 0
    status: KeyStatus = "active"
    models: list[str] | None = None  # None: every listing
    limits: Limits = Limits()
    created_at: int
    expires_at: int | None = None
    hold_micros: int = 0  # what this key's requests in flight hold of the organization's credit
    spent_micros: int = 0  # this key's spend, ever
    cap_micros: int | None = None
    cap_period: CapPeriod | None = None  # None with a cap: the cap never resets
    period_id: str = ""
    period_spent_micros: int = 0
    # Tokens billed to this key, ever (written by the settle script only; cached_tokens are the
    # prompt tokens the engine read from its prefix cache).
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    tier: StoredTier = None  # None: the organization's tier

    def is_expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def view(self, org: OrgRecord, now_s: float | None = None) -> KeyView:
        now_s = time.time() if now_s is None else now_s
        current = cap_period_id(self.cap_period, now_s)
        spent_this_period = self.period_spent_micros if self.period_id == current else 0
        return KeyView(
            id=self.id,
            name=self.name,
            prefix=self.prefix,
            status=self.status,
            org_id=self.org_id,
            org_name=org.name,
            tier=self.tier or org.tier,
            credit_usd=micros_to_usd(org.balance_micros),
            org_credit_usd=micros_to_usd(org.balance_micros),
            on_hold_usd=micros_to_usd(self.hold_micros),
            spent_usd=micros_to_usd(self.spent_micros),
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            completion_tokens=self.completion_tokens,
            spend_cap_usd=None if self.cap_micros is None else micros_to_usd(self.cap_micros),
            spend_cap_period=self.cap_period,
            spent_this_period_usd=micros_to_usd(spent_this_period),
            period_resets_at=None if self.cap_micros is None else period_resets_at(self.cap_period, now_s),
            models=self.models,
            limits=self.limits,
            created_at=self.created_at,
            expires_at=self.expires_at,
        )


class KeyView(BaseModel):
    """What `/v1/key` and the admin API show: never the key or its hash."""

    object: Literal["api_key"] = "api_key"
    id: str
    name: str
    prefix: str
    status: KeyStatus
    org_id: str
    org_name: str
    tier: str | None  # the key's fair-share tier (its own, else its organization's; None: the catalog's default)
    credit_usd: float  # the organization's balance: what this key can draw on (as org_credit_usd)
    org_credit_usd: float
    on_hold_usd: float  # held for this key's requests in flight
    spent_usd: float  # this key's spend, ever
    # Tokens billed to this key, ever; cached_tokens: the prompt tokens served from the engine's
    # prefix cache (charged at the listing's cached prompt price).
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    spend_cap_usd: float | None
    spend_cap_period: CapPeriod | None
    spent_this_period_usd: float
    period_resets_at: int | None  # epoch seconds; None without a cap or for a cap that never resets
    models: list[str] | None
    limits: Limits
    created_at: int
    expires_at: int | None


class CreatedKey(KeyView):
    key: str  # shown exactly once, at creation


def _epoch(value: datetime | None) -> int | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp())


class _AdminBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateKeyRequest(_AdminBody):
    name: str = Field(min_length=1, max_length=100)
    # Without org_id the key gets an organization of its own, and credit_usd is its credit;
    # with org_id the credit is the organization's (POST /admin/v1/orgs/{id}/credit).
    org_id: str | None = Field(default=None, min_length=1, max_length=64)
    credit_usd: Usd = Field(default=Decimal(0), ge=0, le=MAX_USD)
    spend_cap_usd: Usd | None = Field(default=None, gt=0, le=MAX_USD)
    spend_cap_period: CapPeriod | None = None
    models: list[str] | None = Field(default=None, min_length=1)
    rpm: Rpm | None = None
    tpm: Tpm | None = None
    max_concurrency: Concurrency | None = None
    max_tokens_per_request: TokensPerRequest | None = None
    expires_at: Expiry | None = None
    tier: TierName | None = None  # None: the organization's tier

    @model_validator(mode="after")
    def _credit_and_cap(self) -> CreateKeyRequest:
        if self.org_id is not None and self.credit_usd:
            raise PydanticCustomError(
                "org_credit",
                "credit belongs to the organization: leave credit_usd out with org_id and use "
                "POST /admin/v1/orgs/{id}/credit",
            )
        if self.spend_cap_period is not None and self.spend_cap_usd is None:
            raise PydanticCustomError("cap_period", "spend_cap_period needs spend_cap_usd")
        return self

    @field_validator("expires_at")
    @classmethod
    def _not_expired(cls, value: datetime | None) -> datetime | None:
        # A key that is dead on arrival is always a mistake (a past date, a wrong zone).
        if value is not None and _epoch(value) <= time.time():  # type: ignore[operator]
            raise PydanticCustomError("expired", "the key would be created already expired; give a future time")
        return value

    @property
    def expires_at_epoch(self) -> int | None:
        return _epoch(self.expires_at)

    @property
    def limits(self) -> Limits:
        return Limits(
            rpm=self.rpm,
            tpm=self.tpm,
            max_concurrency=self.max_concurrency,
            max_tokens_per_request=self.max_tokens_per_request,
        )


def _refuse_null(value: Any) -> Any:
    """A PATCH field that always has a value: field validators run only for fields that were
    sent, so this refuses an explicit null."""
    if value is None:
        raise PydanticCustomError("not_null", "null is not a value here; leave the field out to keep the current value")
    return value


class UpdateKeyRequest(_AdminBody):
    """A PATCH: only the fields sent change.

    null resets a limit to the operator's default, `models: null` allows every listing and
    `expires_at: null` removes the expiry; a key's name and status always have a value, so
    null is refused for them rather than stored.
    """

    name: str | None = Field(default=None, min_length=1, max_length=100)
    models: list[str] | None = Field(default=None, min_length=1)
    rpm: Rpm | None = None
    tpm: Tpm | None = None
    max_concurrency: Concurrency | None = None
    max_tokens_per_request: TokensPerRequest | None = None
    status: KeyStatus | None = None
    expires_at: Expiry | None = None
    spend_cap_usd: Usd | None = Field(default=None, gt=0, le=MAX_USD)  # null removes the cap
    spend_cap_period: CapPeriod | None = None  # null: the cap never resets
    tier: TierName | None = None  # null: the organization's tier

    _not_null = field_validator("name", "status", mode="before")(_refuse_null)

    @property
    def expires_at_epoch(self) -> int | None:
        return _epoch(self.expires_at)


class CreditRequest(_AdminBody):
    amount_usd: Usd = Field(gt=0, le=MAX_USD)


class CreateOrgRequest(_AdminBody):
    name: str = Field(min_length=1, max_length=100)
    credit_usd: Usd = Field(default=Decimal(0), ge=0, le=MAX_USD)
    tier: TierName | None = None  # None: the catalog's default tier


class UpdateOrgRequest(_AdminBody):
    """A PATCH: only the fields sent change (`tier: null`: the catalog's default tier)."""

    name: str | None = Field(default=None, min_length=1, max_length=100)
    tier: TierName | None = None

    _not_null = field_validator("name", mode="before")(_refuse_null)


MAX_GRACE_S = 30 * 24 * 3600


class RotateKeyRequest(_AdminBody):
    """The old secret keeps working for grace_s seconds after the rotation (0: it stops now)."""

    grace_s: StrictInt = Field(default=0, ge=0, le=MAX_GRACE_S)


UsageGroup = Literal["model", "day", "key", "org"]


class UsageRow(BaseModel):
    """Totals for one group (a model, a UTC day, a key, an organization, or everything)."""

    model: str | None = None
    date: str | None = None
    key_id: str | None = None
    org_id: str | None = None
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of the prompt tokens, served from the engine's prefix cache
    total_tokens: int = 0
    cost_usd: float = 0.0


class UsageReport(BaseModel):
    object: Literal["usage"] = "usage"
    key_id: str | None
    org_id: str | None = None
    start: str
    end: str
    group_by: UsageGroup
    data: list[UsageRow]
    total: UsageRow


class Discrepancy(BaseModel):
    """One figure that disagrees between the ledger, the counters and the balances."""

    org_id: str
    key_id: str | None = None
    check: Literal[
        "ledger_vs_counters",
        "ledger_vs_spent",
        "credit_balance",
        "holds",
        "key_spent",
        "key_holds",
        "hold_exceeded",
    ]
    field: str
    expected: int
    actual: int


class OrgReconciliation(BaseModel):
    org_id: str
    name: str
    keys: int
    events: int  # settlements in the ledger, including those trimmed into its checkpoint
    ledger_cost_usd: float
    counters_cost_usd: float
    spent_usd: float
    credited_usd: float
    balance_usd: float
    on_hold_usd: float
    in_flight: int  # admissions holding credit
    ok: bool


class ReconciliationReport(BaseModel):
    object: Literal["reconciliation"] = "reconciliation"
    ok: bool
    orgs: list[OrgReconciliation]
    differences: list[Discrepancy]
