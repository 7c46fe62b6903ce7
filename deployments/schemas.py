"""Marketplace types: key records, admin bodies, usage rows.

OpenAI request/response models are not here: they come from Ray Serve LLM (which takes
them from vLLM). Money crosses the API as USD numbers with up to 6 decimals and is integer
micro-USD everywhere else.
"""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .catalog import MICROS_PER_USD

KeyStatus = Literal["active", "revoked"]


def usd_to_micros(value: Decimal) -> int:
    micros = value * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise ValueError("amounts may have at most 6 decimal places")
    return int(micros)


def micros_to_usd(micros: int) -> float:
    return round(micros / MICROS_PER_USD, 6)


class Limits(BaseModel):
    """Per-key limits; None means the operator's default applies."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_concurrency: int | None = Field(default=None, ge=1)


class KeyRecord(BaseModel):
    """A key as stored in Redis (`{acct:<id>}:key`, a hash)."""

    id: str
    name: str
    prefix: str
    key_hash: str
    status: KeyStatus = "active"
    models: list[str] | None = None  # None: every listing
    limits: Limits = Limits()
    created_at: int
    expires_at: int | None = None
    balance_micros: int = 0
    hold_micros: int = 0
    spent_micros: int = 0
    # Every credit ever granted; balance + hold + spent always equals it (see reconcile.py).
    credited_micros: int = 0

    def is_expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def view(self) -> KeyView:
        return KeyView(
            id=self.id,
            name=self.name,
            prefix=self.prefix,
            status=self.status,
            credit_usd=micros_to_usd(self.balance_micros),
            on_hold_usd=micros_to_usd(self.hold_micros),
            spent_usd=micros_to_usd(self.spent_micros),
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
    credit_usd: float
    on_hold_usd: float
    spent_usd: float
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
    credit_usd: Decimal = Field(default=Decimal(0), ge=0, le=1_000_000)
    models: list[str] | None = Field(default=None, min_length=1)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_concurrency: int | None = Field(default=None, ge=1)
    expires_at: datetime | None = None

    @field_validator("credit_usd")
    @classmethod
    def _six_decimals(cls, value: Decimal) -> Decimal:
        usd_to_micros(value)
        return value

    @property
    def expires_at_epoch(self) -> int | None:
        return _epoch(self.expires_at)


class UpdateKeyRequest(_AdminBody):
    name: str | None = Field(default=None, min_length=1, max_length=100)
    models: list[str] | None = Field(default=None, min_length=1)
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    max_concurrency: int | None = Field(default=None, ge=1)
    status: KeyStatus | None = None
    expires_at: datetime | None = None

    @property
    def expires_at_epoch(self) -> int | None:
        return _epoch(self.expires_at)


class CreditRequest(_AdminBody):
    amount_usd: Decimal = Field(gt=0, le=1_000_000)

    @field_validator("amount_usd")
    @classmethod
    def _six_decimals(cls, value: Decimal) -> Decimal:
        usd_to_micros(value)
        return value


class UsageRow(BaseModel):
    """Totals for one group (a model, a UTC day, or everything)."""

    model: str | None = None
    date: str | None = None
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost_usd: float = 0.0


class UsageReport(BaseModel):
    object: Literal["usage"] = "usage"
    key_id: str | None
    start: str
    end: str
    group_by: Literal["model", "day"]
    data: list[UsageRow]
    total: UsageRow


class Discrepancy(BaseModel):
    """One figure that disagrees between the ledger, the counters and the key's balances."""

    key_id: str
    check: Literal["ledger_vs_counters", "ledger_vs_spent", "credit_balance", "holds"]
    field: str
    expected: int
    actual: int


class KeyReconciliation(BaseModel):
    key_id: str
    name: str
    events: int
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
    keys: list[KeyReconciliation]
    differences: list[Discrepancy]
