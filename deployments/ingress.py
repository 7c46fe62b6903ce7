"""The marketplace ingress: Ray Serve LLM's OpenAiIngress with keys, prices and billing.

Routes stay thin: they parse, call the gateway (paid calls) or the key store / meter
(account and admin calls), and return JSON or SSE. The route table is `ENDPOINTS`, given
to Ray Serve LLM's `make_fastapi_ingress`, so every public path is listed in one place.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from datetime import date, datetime, timedelta, timezone
from typing import Any, Literal

import ray
from fastapi import FastAPI, Query, Request
from pydantic import SecretStr, ValidationError
from ray.serve.handle import DeploymentHandle
from ray.serve.llm.ingress import OpenAiIngress
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import alerts, auth, responses_api
from .alerts import AlertDeliverer, AlertSettingsRequest
from .billing import Meter
from .catalog import Catalog, Listing
from .config import AccountOptions
from .console.routes import mount_console
from .errors import (
    APIError,
    BadRequest,
    BillingUnavailable,
    NotFound,
    PayloadTooLarge,
    install_error_handlers,
    internal_error_response,
)
from .gateway import Gateway
from .generations import MAX_RECENT_GENERATIONS, find_generation, recent_generations
from .keystore import SCHEMA_KEY, KeyStore, Locator, connect
from .ledger import MAX_PAGE, export_page, rows_csv, rows_jsonl, trim_all
from .live import live_holds
from .metrics import UNKNOWN_MODEL, MarketplaceMetrics
from .migrate import LEGACY_KEY_INDEX
from .ray_llm import ModelCard
from .reconcile import reconcile
from .redis_connection import check_eviction_policy, replica_ack
from .request_id import HEADER as REQUEST_ID_HEADER
from .request_id import client_request_id
from .schemas import (
    CreatedKey,
    CreateKeyRequest,
    CreateOrgRequest,
    CreditRequest,
    KeyRecord,
    Limits,
    OrgRecord,
    RotateKeyRequest,
    UpdateKeyRequest,
    UpdateOrgRequest,
    UsageGroup,
    usd_to_micros,
)
from .shedding import DoorShedder
from .tokens import PromptCounter
from .usage import usage_report
from .validation import ChatRequest, EmbeddingsRequest, TextCompletionRequest

logger = logging.getLogger("tokenmart.ingress")

DEFAULT_USAGE_WINDOW_DAYS = 30


RateLimitSource = Callable[[str | None, int], Awaitable[dict[str, str]]]
_RATE_LIMIT_HEADER = b"x-ratelimit-limit-requests"


class RequestContextMiddleware:
    """Every response carries x-request-id and the x-ratelimit-* headers; bodies over the limit get 413.

    Behind Ray Serve's proxy the request already has an id and the proxy echoes it on the
    response, so the id is only added here when the request came without one. Unexpected
    errors are turned into the 500 envelope here, inside the id handling, so they carry it too.
    Admission puts the rate-limit headers on inference responses; every other response gets
    them from the app's rate-limit source (`attach_rate_limits`), which the ingress replica
    attaches to its own app: the calling key's state, or the operator's defaults when there
    is no key. An app without a source sends none.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        # An id that is not UTF-8 is replaced, never decoded into a crash (see request_id.py).
        request_id = client_request_id(headers.get(REQUEST_ID_HEADER)) or ""
        echo_id = not request_id
        if echo_id:
            request_id = uuid.uuid4().hex
            kept = [(name, value) for name, value in scope.get("headers", []) if name != REQUEST_ID_HEADER]
            scope["headers"] = [*kept, (REQUEST_ID_HEADER, request_id.encode())]
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                extra = []
                if echo_id:
                    extra.append((REQUEST_ID_HEADER, request_id.encode()))
                source = rate_limit_source(scope)
                if source is not None and not any(name == _RATE_LIMIT_HEADER for name, _ in message.get("headers", [])):
                    authorization = headers.get(b"authorization", b"").decode(errors="replace") or None
                    limits = await source(authorization, message["status"])
                    extra += [(name.encode(), value.encode()) for name, value in limits.items()]
                if extra:
                    message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # An HTTPException, so FastAPI's body parsing re-raises it unchanged and
                    # the error handlers render the 413 envelope.
                    raise StarletteHTTPException(413, detail=too_large_message)
            return message

        too_large_message = f"The request body is larger than {self.max_body_bytes} bytes."
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await PayloadTooLarge(too_large_message).response()(scope, receive, send_with_id)
            return
        try:
            await self.app(scope, receive_limited, send_with_id)
        except Exception:
            if started:
                raise
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            await internal_error_response()(scope, receive, send_with_id)


def attach_rate_limits(app: FastAPI, source: RateLimitSource | None) -> None:
    """Give one app its rate-limit source (the headers of responses admission did not decide)."""
    app.state.rate_limits = source


def rate_limit_source(scope: Scope) -> RateLimitSource | None:
    """The rate-limit source of the app serving this request (Starlette puts it in the scope)."""
    return getattr(getattr(scope.get("app"), "state", None), "rate_limits", None)


def create_fastapi_app(max_body_bytes: int = 1 << 20, max_paid_requests: int = 128) -> FastAPI:
    """The ingress's FastAPI app: `max_paid_requests` is how many inference requests one replica
    serves at once before it refuses more with a fast 503 (shedding.py)."""
    app = FastAPI(title="tokenmart", version="0.1.0", description="OpenAI-compatible pay-per-token LLM marketplace")
    install_error_handlers(app)
    # Added first, so it runs inside the request-id middleware and its 503s carry the id.
    app.add_middleware(DoorShedder, limit=max_paid_requests, paths=PAID_PATHS)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=max_body_bytes)
    attach_rate_limits(app, None)  # until an ingress replica attaches its own
    return app


def listing_card(listing: Listing, base: Listing | None = None) -> dict[str, Any]:
    """A model in GET /v1/models; a LoRA adapter names its base model as `parent`."""
    return {
        "id": listing.id,
        "object": "model",
        "created": 0,
        "owned_by": listing.owner,
        "parent": base.id if base else None,
        "description": listing.description,
        "context_length": listing.context_length,
        "task": listing.task,
        "pricing": {
            "prompt_usd_per_1m": float(listing.pricing.prompt_usd_per_1m),
            "completion_usd_per_1m": float(listing.pricing.completion_usd_per_1m),
            "cached_prompt_usd_per_1m": float(listing.pricing.cached_prompt_usd),
        },
    }


def _usage_window(start: date | None, end: date | None) -> tuple[date, date]:
    end = end or datetime.now(timezone.utc).date()
    start = start or end - timedelta(days=DEFAULT_USAGE_WINDOW_DAYS - 1)
    if start > end:
        raise BadRequest("'start' must not be after 'end'.", param="start")
    return start, end


class MarketplaceIngress(OpenAiIngress):
    def __init__(
        self,
        llm_deployments: dict[str, DeploymentHandle],
        model_cards: dict[str, ModelCard],
        *,
        lora_paths: dict[str, str] | None = None,
        catalog: dict[str, Any],
        redis_url: str,
        redis_timeout_s: float = 1.0,
        default_limits: dict[str, Any] | None = None,
        tokenizer_sources: dict[str, str] | None = None,
        plain_requests: bool = False,
        per_key_metrics: bool = False,
        spool_dir: str | None = None,
        admin_token: SecretStr | None = None,
        accounts: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        self.accounts = AccountOptions.model_validate(accounts or {})
        self.catalog = Catalog.model_validate(catalog)
        self.redis = connect(redis_url, timeout_s=redis_timeout_s)
        locator = Locator(self.redis)  # one cache of the secrets index, for keys and admission
        self.keys = KeyStore(self.redis, replica_ack=replica_ack(redis_url, timeout_s=redis_timeout_s), locator=locator)
        self.meter = Meter(
            self.redis,
            Limits.model_validate(default_limits) if default_limits else None,
            spool_dir=spool_dir,
            generation_ttl_s=self.accounts.generation_retention_days * 24 * 3600,
            locator=locator,
        )
        # Exact prompt counts where the listing's tokenizer is on this node; byte bounds elsewhere.
        # Multimodal listings bound each image by its most tokens; the byte bound covers the rest.
        counters = {
            listing.id: PromptCounter.for_source(
                (tokenizer_sources or {}).get(listing.id), tokens_per_image=listing.max_tokens_per_image
            )
            for listing in self.catalog.listings
        }
        self.gateway = Gateway(
            self.catalog,
            llm_deployments,
            self.meter,
            counters,
            plain_requests=plain_requests,
            metrics=MarketplaceMetrics(per_key_labels=per_key_metrics),
            caller=ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None,
        )
        if self.accounts.ledger_retention_days is not None:
            self.gateway.background.append(self._trim_ledger_hourly)
        if self.accounts.deliver_alerts:
            self.gateway.background.append(self._deliver_alerts)
        # From AppArgs.admin_token (the environment of the process that built the app); None: no admin API.
        self.admin_token = admin_token
        self._cards = [listing_card(offer, self.catalog.base_of(offer.id)) for offer in self.catalog.offers]

    async def __serve_build_asgi_app__(self) -> ASGIApp:
        """Ray Serve calls this in the replica after the constructor, before the app serves.

        The app is this replica's own (Ray Serve unpickles one per replica process, and
        `self.app` is it); it gets this ingress's rate-limit source.
        """
        app = self.app  # type: ignore[attr-defined]  # set by Ray Serve's ASGI replica wrapper
        await check_eviction_policy(self.redis)  # a loud log unless Redis refuses writes instead of evicting
        await self._check_layout()
        attach_rate_limits(app, self._rate_limit_headers)
        app.state.refusals = self.gateway.refusals
        app.state.listing_peek = self.gateway.peek
        app.state.door_hook = self._record_door_refusal
        app.state.key_label = self.gateway.key_label
        mount_console(app, self)
        return app

    async def _deliver_alerts(self) -> None:
        """POST the spend alerts settlements raise; every replica runs one (a per-organization
        lease keeps them apart). Made here, so its HTTP client belongs to the serving loop."""
        deliverer = AlertDeliverer(self.redis)
        try:
            await deliverer.run_forever()
        finally:
            await deliverer.aclose()

    async def _trim_ledger_hourly(self) -> None:
        """Trim ledger events past the retention into each organization's checkpoint, hourly
        (every replica does; the trim script is atomic, so they never count an event twice)."""
        days = self.accounts.ledger_retention_days
        assert days is not None
        while True:
            try:
                trimmed = await trim_all(self.redis, days)
                if trimmed:
                    logger.info("trimmed %d ledger events older than %d days into checkpoints", trimmed, days)
            except RedisError as exc:
                logger.warning("ledger trim skipped: %s", exc)
            await asyncio.sleep(3600)

    async def _check_layout(self) -> None:
        """A loud log when Redis holds data of the layout before organizations: its keys would
        get 401 until `tokenmart migrate` moves them."""
        try:
            version = await self.redis.get(SCHEMA_KEY)
            legacy = not version and await self.redis.exists(LEGACY_KEY_INDEX)
        except RedisError:
            return  # Redis down: requests get their 503s; checked again at the next start
        if legacy:
            logger.error(
                "Redis holds API keys in the layout before organizations; they are refused until "
                "`tokenmart migrate` (docs/accounts.md) moves them"
            )

    def _record_door_refusal(
        self, status: int, code: str, key_id: str | None, seconds: float, model: str | None = None
    ) -> None:
        """A request the door refused (shedding.py): its model, when the door read its body."""
        metrics = self.gateway.metrics
        if metrics is not None:
            label = model if model is not None and self.catalog.get(model) else UNKNOWN_MODEL
            metrics.request_done(label, status, code, stream=False, key_id=key_id, seconds=seconds)

    async def _rate_limit_headers(self, authorization: str | None, status: int) -> dict[str, str]:
        """The calling key's current limits for responses that admission did not decide.

        Unknown callers, 401s and 5xx get the operator's defaults without a Redis call, so a
        Redis outage never slows its own 503s down.
        """
        state = self.meter.default_state()
        if status != 401 and status < 500 and authorization:
            try:
                state = await self.meter.current_state(auth.parse_api_key(authorization))
            except APIError:
                pass  # not a well-formed key: the defaults
            except Exception:  # headers must never break the response they ride on
                logger.warning("could not read the rate-limit state for the response headers", exc_info=True)
        return state.headers()

    # -- OpenAI-compatible inference -------------------------------------------------
    async def chat(self, body: ChatRequest, request: Request) -> Response:
        return await self.gateway.handle(body, request, method="chat")

    async def completions(self, body: TextCompletionRequest, request: Request) -> Response:
        return await self.gateway.handle(body, request, method="completions")

    async def embeddings(self, body: EmbeddingsRequest, request: Request) -> Response:
        return await self.gateway.handle(body, request, method="embeddings")

    async def responses(self, request: Request) -> Response:
        """OpenAI's Responses API, served and billed through the chat pipeline (responses_api.py)."""
        try:
            raw = await request.json()
        except ValueError as exc:
            raise BadRequest(f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
        wanted = responses_api.parse_request(raw)
        try:
            body = ChatRequest.model_validate(responses_api.to_chat_request(wanted))
        except ValidationError as exc:
            raise BadRequest(f"The request cannot be served: {exc.errors()[0].get('msg')}.") from None
        answer = await self.gateway.handle(body, request, method="chat")
        headers = {name: value for name, value in answer.headers.items() if name.startswith("x-")}
        if not isinstance(answer, StreamingResponse):
            chat = json.loads(answer.body)
            return JSONResponse(responses_api.chat_to_response(chat, wanted), headers=headers)
        answer.body_iterator = _response_events(answer.body_iterator, responses_api.ResponseStream(wanted))
        return answer

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": self.model_cards()}

    async def model_data(self, model: str) -> dict[str, Any]:
        listing = self.catalog.get(model)
        if listing is None:
            raise NotFound(f"The model {model!r} does not exist.", param="model", code="model_not_found")
        return listing_card(listing, self.catalog.base_of(listing.id))

    # -- the calling key's own account -------------------------------------------------
    async def key_info(self, request: Request) -> dict[str, Any]:
        record, org = await self.keys.authenticate(request.headers.get("authorization"))
        return record.view(org).model_dump()

    async def usage(
        self,
        request: Request,
        start: date | None = Query(default=None, description="first UTC day, YYYY-MM-DD"),
        end: date | None = Query(default=None, description="last UTC day, YYYY-MM-DD"),
        group_by: UsageGroup = Query(default="model"),
    ) -> dict[str, Any]:
        """The calling key's own usage."""
        record, org = await self.keys.authenticate(request.headers.get("authorization"))
        first, last = _usage_window(start, end)
        return (await usage_report(self.redis, [org.id], first, last, group_by, key_id=record.id)).model_dump()

    async def generation(self, request: Request, id: str = Query(min_length=1, max_length=200)) -> dict[str, Any]:
        """One response of the caller's organization: its tokens, cost, status and timings."""
        _, org = await self.keys.authenticate(request.headers.get("authorization"))
        if id.startswith(responses_api.RESPONSE_ID_PREFIX):  # a Responses API id names its chat completion
            id = responses_api.chat_id_for(id)
        return (await find_generation(self.redis, org.id, id)).model_dump()

    async def generations(
        self, request: Request, limit: int = Query(default=20, ge=1, le=MAX_RECENT_GENERATIONS)
    ) -> dict[str, Any]:
        """The calling key's newest settled requests, newest first."""
        record, org = await self.keys.authenticate(request.headers.get("authorization"))
        data = await recent_generations(self.redis, org.id, record.id, limit)
        return {"object": "list", "data": [view.model_dump() for view in data]}

    async def healthz(self) -> Response:
        try:
            await self.redis.ping()
        except RedisError:
            return BillingUnavailable("The billing store is unreachable.", retry_after_s=2).response()
        return JSONResponse({"status": "ok", "models": len(self.catalog.offers), "time": int(time.time())})

    # -- admin API -----------------------------------------------------------------------
    def _admin(self, request: Request) -> None:
        token = self.admin_token.get_secret_value() if self.admin_token else None
        auth.check_admin_token(request.headers.get("authorization"), token)

    def _check_models(self, models: list[str] | None) -> None:
        unknown = [m for m in models or [] if self.catalog.get(m) is None]
        if unknown:
            raise BadRequest(f"Unknown model(s) {', '.join(map(repr, unknown))}; see GET /v1/models.", param="models")

    def _check_tier(self, tier: str | None) -> None:
        if tier is not None and tier not in self.catalog.tiers:
            raise BadRequest(
                f"Unknown tier {tier!r}; the catalog's tiers are {', '.join(map(repr, self.catalog.tiers))}.",
                param="tier",
            )

    async def _key_view(self, record: KeyRecord) -> dict[str, Any]:
        record, org = await self.keys.with_org(record)
        return record.view(org).model_dump()

    # -- what the admin API and the console's operator pages both do ---------------------------
    async def create_key(self, body: CreateKeyRequest) -> dict[str, Any]:
        """A new key's view, with the key itself (shown once)."""
        self._check_models(body.models)
        self._check_tier(body.tier)
        record, key = await self.keys.create(body)
        return CreatedKey(**(await self._key_view(record)), key=key).model_dump()

    async def update_key(self, key_id: str, body: UpdateKeyRequest) -> dict[str, Any]:
        self._check_models(body.models)
        self._check_tier(body.tier)
        return await self._key_view(await self.keys.update(key_id, body))

    async def create_org(self, body: CreateOrgRequest) -> dict[str, Any]:
        self._check_tier(body.tier)
        return await self._org_view(await self.keys.create_org(body))

    async def org_rows(self) -> list[dict[str, Any]]:
        """Every organization's view with its number of keys (GET /admin/v1/orgs)."""
        counts: dict[str, int] = {}
        for owner in (await self.keys.ids()).values():
            counts[owner] = counts.get(owner, 0) + 1
        return [{**org.view().model_dump(), "keys": counts.get(org.id, 0)} for org in await self.keys.list_orgs()]

    async def account_scope(self) -> dict[str, list[str]]:
        """Every organization id -> its key ids."""
        return await self._scope(None, None)

    def model_cards(self) -> list[dict[str, Any]]:
        """GET /v1/models's cards."""
        return self._cards

    async def admin_create_key(self, body: CreateKeyRequest, request: Request) -> JSONResponse:
        self._admin(request)
        return JSONResponse(await self.create_key(body), status_code=201)

    async def admin_list_keys(self, request: Request, org_id: str | None = Query(default=None)) -> dict[str, Any]:
        self._admin(request)
        if org_id is not None:
            await self.keys.require_org(org_id)
        data = [record.view(org).model_dump() for record, org in await self.keys.list(org_id)]
        return {"object": "list", "data": data}

    async def admin_get_key(self, key_id: str, request: Request) -> dict[str, Any]:
        self._admin(request)
        return await self._key_view(await self.keys.require(key_id))

    async def admin_update_key(self, key_id: str, body: UpdateKeyRequest, request: Request) -> dict[str, Any]:
        self._admin(request)
        return await self.update_key(key_id, body)

    async def admin_revoke_key(self, key_id: str, request: Request) -> dict[str, Any]:
        self._admin(request)
        return await self._key_view(await self.keys.revoke(key_id))

    async def admin_add_credit(self, key_id: str, body: CreditRequest, request: Request) -> dict[str, Any]:
        """Credit the key's organization (kept from before organizations)."""
        self._admin(request)
        return await self._key_view(await self.keys.add_credit(key_id, usd_to_micros(body.amount_usd)))

    async def admin_rotate_key(self, key_id: str, body: RotateKeyRequest, request: Request) -> dict[str, Any]:
        """A new secret for the key (shown once, here); the old one works for `grace_s` more seconds."""
        self._admin(request)
        record, key = await self.keys.rotate(key_id, body.grace_s)
        return CreatedKey(**(await self._key_view(record)), key=key).model_dump()

    # organizations
    async def _org_view(self, org: OrgRecord) -> dict[str, Any]:
        keys = sum(owner == org.id for owner in (await self.keys.ids()).values())
        return {**org.view().model_dump(), "keys": keys}

    async def admin_create_org(self, body: CreateOrgRequest, request: Request) -> JSONResponse:
        self._admin(request)
        return JSONResponse(await self.create_org(body), status_code=201)

    async def admin_list_orgs(self, request: Request) -> dict[str, Any]:
        self._admin(request)
        return {"object": "list", "data": await self.org_rows()}

    async def admin_get_org(self, org_id: str, request: Request) -> dict[str, Any]:
        self._admin(request)
        return await self._org_view(await self.keys.require_org(org_id))

    async def admin_update_org(self, org_id: str, body: UpdateOrgRequest, request: Request) -> dict[str, Any]:
        self._admin(request)
        self._check_tier(body.tier)
        return await self._org_view(await self.keys.update_org(org_id, body))

    async def admin_add_org_credit(self, org_id: str, body: CreditRequest, request: Request) -> dict[str, Any]:
        self._admin(request)
        return await self._org_view(await self.keys.add_org_credit(org_id, usd_to_micros(body.amount_usd)))

    async def admin_set_alerts(self, org_id: str, body: AlertSettingsRequest, request: Request) -> dict[str, Any]:
        self._admin(request)
        return (await alerts.set_alerts(self.redis, org_id, body)).model_dump()

    async def admin_get_alerts(self, org_id: str, request: Request) -> dict[str, Any]:
        self._admin(request)
        view = await alerts.get_alerts(self.redis, org_id)
        if view is None:
            raise NotFound(f"The organization {org_id!r} has no alert settings.", param="id", code="alerts_not_found")
        return view.model_dump()

    async def admin_delete_alerts(self, org_id: str, request: Request) -> dict[str, Any]:
        self._admin(request)
        if not await alerts.delete_alerts(self.redis, org_id):
            raise NotFound(f"The organization {org_id!r} has no alert settings.", param="id", code="alerts_not_found")
        return {"object": "alert_settings", "org_id": org_id, "deleted": True}

    async def admin_alert_deliveries(
        self, org_id: str, request: Request, limit: int = Query(default=50, ge=1, le=1000)
    ) -> dict[str, Any]:
        self._admin(request)
        return {"object": "list", "data": await alerts.deliveries(self.redis, org_id, limit)}

    async def admin_ledger(
        self,
        request: Request,
        after: str | None = Query(default=None, description="the `next` cursor of the previous page"),
        limit: int = Query(default=1000, ge=1, le=MAX_PAGE),
        org_id: str | None = Query(default=None),
        format: Literal["json", "jsonl", "csv"] = Query(default="json"),
    ) -> Response:
        """Settled ledger rows in one total order, resumable with `next` (docs/accounts.md)."""
        self._admin(request)
        org_ids = [(await self.keys.require_org(org_id)).id] if org_id else sorted(await self.keys.org_ids())
        try:
            page = await export_page(self.redis, org_ids, after, limit)
        except RedisError as exc:
            raise BillingUnavailable("The billing store is unavailable. Retry shortly.", retry_after_s=2) from exc
        if format == "json":
            return JSONResponse({"object": "list", "data": page.rows, "next": page.next, "has_more": page.has_more})
        body, media = (
            (rows_jsonl(page.rows), "application/x-ndjson") if format == "jsonl" else (rows_csv(page.rows), "text/csv")
        )
        return Response(body, media_type=media, headers={"x-tokenmart-next-cursor": page.next})

    async def _scope(self, org_id: str | None, key_id: str | None) -> dict[str, list[str]]:
        """Organization id -> its key ids, for an admin report over one key, one organization or all."""
        located = await self.keys.ids()
        if key_id is not None:
            if key_id not in located:
                await self.keys.require(key_id)  # its 404
            if org_id is not None and located[key_id] != org_id:
                raise BadRequest(f"The key {key_id!r} is not in the organization {org_id!r}.", param="key_id")
            return {located[key_id]: [key_id]}
        if org_id is not None:
            await self.keys.require_org(org_id)
            return {org_id: [k for k, o in located.items() if o == org_id]}
        scope: dict[str, list[str]] = {org: [] for org in await self.keys.org_ids()}
        for key, owner in located.items():
            scope.setdefault(owner, []).append(key)
        return scope

    async def admin_usage(
        self,
        request: Request,
        key_id: str | None = Query(default=None),
        org_id: str | None = Query(default=None),
        start: date | None = Query(default=None),
        end: date | None = Query(default=None),
        group_by: UsageGroup = Query(default="model"),
    ) -> dict[str, Any]:
        self._admin(request)
        first, last = _usage_window(start, end)
        scope = await self._scope(org_id, key_id)
        report = await usage_report(self.redis, sorted(scope), first, last, group_by, key_id=key_id)
        return report.model_dump()

    async def admin_holds(
        self, request: Request, key_id: str | None = Query(default=None), org_id: str | None = Query(default=None)
    ) -> dict[str, Any]:
        """What each organization and key holds and has in flight now."""
        self._admin(request)
        rows = await live_holds(self.redis, await self._scope(org_id, key_id))
        return {"object": "list", "data": [row.model_dump() for row in rows]}

    async def admin_reconcile(
        self, request: Request, key_id: str | None = Query(default=None), org_id: str | None = Query(default=None)
    ) -> dict[str, Any]:
        """Every level of the organizations (of the one holding `key_id`, or `org_id`)."""
        self._admin(request)
        if key_id is not None:
            owner = await self.keys.org_of(key_id)
            if org_id is not None and owner != org_id:
                raise BadRequest(f"The key {key_id!r} is not in the organization {org_id!r}.", param="key_id")
            org_id = owner
        scope = await self._scope(org_id, None)
        try:
            return (await reconcile(self.redis, scope)).model_dump()
        except RedisError as exc:
            raise BillingUnavailable("The billing store is unavailable. Retry shortly.", retry_after_s=2) from exc


async def _response_events(chat_events: AsyncIterator[str], stream: responses_api.ResponseStream) -> AsyncIterator[str]:
    """The chat pipeline's SSE events as Responses API events. Closing this closes the chat
    stream, which settles what was produced (the gateway's own rule for a client that left)."""
    async with aclosing(chat_events) as events:
        for event in stream.start():
            yield event
        async for event in events:
            for line in event.split("\n"):
                if line.startswith("data: ") and line != "data: [DONE]":
                    for out in stream.feed(json.loads(line[len("data: ") :])):
                        yield out
        for event in stream.finish():
            yield event


def _route(method: str, *paths: str, **kwargs: Any):
    """An endpoint-map entry that serves one method on several paths (the public aliases)."""

    def factory(app: FastAPI):
        def decorate(func):
            for path in paths:
                getattr(app, method)(path, **kwargs)(func)
            return func

        return decorate

    return factory


# Every customer route is served under the OpenAI prefix and the two public APIs tokenmart
# replaces: OpenRouter's /api/v1 and the /v1/inference of inference marketplaces.
CUSTOMER_PREFIXES = ("/v1", "/api/v1", "/v1/inference")


def customer_paths(path: str) -> tuple[str, ...]:
    """`path` (e.g. "/completions") under every customer prefix."""
    return tuple(prefix + path for prefix in CUSTOMER_PREFIXES)


CHAT_PATHS = customer_paths("/chat/completions")
COMPLETION_PATHS = customer_paths("/completions")
RESPONSES_PATHS = customer_paths("/responses")
EMBEDDING_PATHS = customer_paths("/embeddings")
PAID_PATHS = (*CHAT_PATHS, *COMPLETION_PATHS, *RESPONSES_PATHS, *EMBEDDING_PATHS)

ENDPOINTS = {
    "chat": _route("post", *CHAT_PATHS),
    "completions": _route("post", *COMPLETION_PATHS),
    "responses": _route("post", *RESPONSES_PATHS),
    "embeddings": _route("post", *EMBEDDING_PATHS),
    "models": _route("get", *customer_paths("/models")),
    "model_data": _route("get", *customer_paths("/models/{model:path}")),
    "key_info": _route("get", *customer_paths("/key")),
    "usage": _route("get", *customer_paths("/usage")),
    "generation": _route("get", *customer_paths("/generation")),
    "generations": _route("get", *customer_paths("/generations")),
    "healthz": _route("get", "/healthz"),
    "admin_create_key": _route("post", "/admin/v1/keys", status_code=201),
    "admin_list_keys": _route("get", "/admin/v1/keys"),
    "admin_get_key": _route("get", "/admin/v1/keys/{key_id}"),
    "admin_update_key": _route("patch", "/admin/v1/keys/{key_id}"),
    "admin_revoke_key": _route("delete", "/admin/v1/keys/{key_id}"),
    "admin_add_credit": _route("post", "/admin/v1/keys/{key_id}/credit"),
    "admin_rotate_key": _route("post", "/admin/v1/keys/{key_id}/rotate"),
    "admin_create_org": _route("post", "/admin/v1/orgs", status_code=201),
    "admin_list_orgs": _route("get", "/admin/v1/orgs"),
    "admin_get_org": _route("get", "/admin/v1/orgs/{org_id}"),
    "admin_update_org": _route("patch", "/admin/v1/orgs/{org_id}"),
    "admin_add_org_credit": _route("post", "/admin/v1/orgs/{org_id}/credit"),
    "admin_set_alerts": _route("post", "/admin/v1/orgs/{org_id}/alerts"),
    "admin_get_alerts": _route("get", "/admin/v1/orgs/{org_id}/alerts"),
    "admin_delete_alerts": _route("delete", "/admin/v1/orgs/{org_id}/alerts"),
    "admin_alert_deliveries": _route("get", "/admin/v1/orgs/{org_id}/alerts/deliveries"),
    "admin_usage": _route("get", "/admin/v1/usage"),
    "admin_ledger": _route("get", "/admin/v1/ledger"),
    "admin_holds": _route("get", "/admin/v1/holds"),
    "admin_reconcile": _route("get", "/admin/v1/reconcile"),
}
