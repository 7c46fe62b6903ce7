"""The web console: customer pages under /console, operator pages under /console/admin.

Pages are rendered on the server (Jinja2 templates in `templates/`) from the same functions
the API's routes call (the key's view of `/v1/key`, `usage_report`, `recent_generations`,
`live_holds`, `reconcile`, the key store's create/revoke/update/credit), never from queries
of their own, so a page shows exactly what the API answers. `static/console.js` adds the
charts (Chart.js) and htmx's CSRF header; the vendored libraries are fetched from the npm
registry at build time (`vendor.py`) and served from the package, never from a CDN.

Security: sessions are Redis records behind an HttpOnly, SameSite=Strict cookie
(`sessions.py`); the API key or admin token is typed once and never stored or rendered (a new
key is shown once, on the page that created it). Every POST carries the session's CSRF token.
Every page sends a Content-Security-Policy without inline scripts or styles, and is not cached.
Admin pages refuse a customer session.
"""

from __future__ import annotations

import functools
import logging
import secrets
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from pydantic import ValidationError
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from .. import auth
from ..errors import APIError, BadRequest, NotFound
from ..generations import recent_generations
from ..live import live_holds
from ..reconcile import reconcile
from ..schemas import CreateKeyRequest, CreateOrgRequest, UpdateKeyRequest, usd_to_micros
from ..usage import usage_report
from .sessions import COOKIE, LOGIN_CSRF_COOKIE, ConsoleSessions, Session, admin_mark, same_token
from .vendor import missing_assets

if TYPE_CHECKING:
    from ..ingress import MarketplaceIngress

logger = logging.getLogger("tokenmart.console")
HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
}
USAGE_DAYS = 30
ACTIVITY_ROWS = 50
OUTCOME_SAMPLE = 200  # recent settled requests per organization on the traffic page
LIMIT_FIELDS = ("rpm", "tpm", "max_concurrency", "max_tokens_per_request")


class _Redirect(Exception):
    def __init__(self, to: str) -> None:
        self.to = to


class _Refused(Exception):
    """A signed-in session that may not see this page (a customer on an admin page), or a
    form without the session's CSRF token."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message)
        self.message = message


def mount_console(app: FastAPI, ingress: MarketplaceIngress) -> None:
    """The console's pages and static files on one ingress replica's app."""
    missing = missing_assets()
    if missing:
        logger.error(
            "the console's vendored scripts are missing (%s): run `python -m tokenmart.deployments.console.vendor`",
            ", ".join(missing),
        )
    app.include_router(console_router(ingress))
    app.mount("/console/static", StaticFiles(directory=str(STATIC)), name="console-static")


def console_router(ingress: MarketplaceIngress) -> APIRouter:
    """The console's routes for one ingress replica (mounted by its app builder)."""
    sessions = ConsoleSessions(ingress.redis)
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.filters["usd"] = usd
    templates.env.filters["count"] = lambda value: f"{int(value):,}"
    templates.env.filters["when"] = lambda epoch: datetime.fromtimestamp(epoch, timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC"
    )
    router = APIRouter(prefix="/console", include_in_schema=False)

    def render(request: Request, name: str, status: int = 200, **context: Any) -> Response:
        response = templates.TemplateResponse(request, name, context, status_code=status)
        response.headers.update(SECURITY_HEADERS)
        return response

    def redirect(to: str) -> Response:
        response = RedirectResponse(to, status_code=303)
        response.headers.update(SECURITY_HEADERS)
        return response

    def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/console",
        )

    async def session_of(request: Request) -> Session | None:
        return await sessions.find(request.cookies.get(COOKIE))

    async def customer(request: Request) -> tuple[Session, dict[str, Any]]:
        """The customer session and its key's view (`/v1/key`'s), or a redirect to sign in."""
        session = await session_of(request)
        if session is None:
            raise _Redirect("/console/login")
        if session.kind != "customer":
            raise _Redirect("/console/admin")
        try:
            record, org = await ingress.keys.with_org(await ingress.keys.require(session.key_id))
        except NotFound:  # the key (or its organization) is gone; Redis failing is not a reason to end it
            record = None
        if record is None or record.status != "active" or record.is_expired(datetime.now(timezone.utc).timestamp()):
            await sessions.end(request.cookies.get(COOKIE))
            raise _Redirect("/console/login?ended=1")
        return session, record.view(org).model_dump()

    async def operator(request: Request) -> Session:
        session = await session_of(request)
        if session is None:
            raise _Redirect("/console/admin/login")
        if session.kind != "admin":
            raise _Refused
        token = ingress.admin_token.get_secret_value() if ingress.admin_token else ""
        if not token or not same_token(session.admin_mark, admin_mark(token)):
            await sessions.end(request.cookies.get(COOKIE))  # the admin token changed since
            raise _Redirect("/console/admin/login?ended=1")
        return session

    async def form_of(request: Request, session: Session) -> dict[str, str]:
        """The posted form, once its CSRF token (field or htmx header) is the session's."""
        form = {name: str(value) for name, value in (await request.form()).items()}
        given = form.pop("csrf", None) or request.headers.get("x-csrf-token")
        if not same_token(given, session.csrf):
            raise _Refused("The form's CSRF token is missing or wrong; reload the page and try again.")
        return form

    def guarded(handler):
        """Turns the page exceptions into their responses."""

        async def page(request: Request, **kwargs: Any) -> Response:
            try:
                return await handler(request, **kwargs)
            except _Redirect as where:
                return redirect(where.to)
            except _Refused as refused:
                return render(request, "refused.html", status=403, session=None, message=refused.message)

        return functools.wraps(handler)(page)  # FastAPI reads the handler's own parameters

    # -- sign-in ---------------------------------------------------------------------------------
    def login_page(request: Request, admin: bool, error: str | None = None, status: int = 200) -> Response:
        token = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(32)
        ended = request.query_params.get("ended") == "1"
        response = render(
            request, "login.html", status=status, session=None, admin=admin, login_csrf=token, error=error, ended=ended
        )
        set_cookie(request, response, LOGIN_CSRF_COOKIE, token, 3600)
        return response

    async def sign_in(request: Request, admin: bool) -> Response:
        form = {name: str(value) for name, value in (await request.form()).items()}
        if not same_token(form.get("csrf"), request.cookies.get(LOGIN_CSRF_COOKIE) or ""):
            return login_page(request, admin, "The sign-in form expired; try again.", 403)
        secret = form.get("secret", "").strip()
        try:
            if admin:
                token = ingress.admin_token.get_secret_value() if ingress.admin_token else None
                auth.check_admin_token(f"Bearer {secret}", token)
                cookie, _ = await sessions.start("admin", admin_token=secret)
                to = "/console/admin"
            else:
                record, org = await ingress.keys.authenticate(f"Bearer {secret}")
                cookie, _ = await sessions.start("customer", key_id=record.id, org_id=org.id)
                to = "/console"
        except APIError as error:
            return login_page(request, admin, error.message, error.status_code)
        response = redirect(to)
        set_cookie(request, response, COOKIE, cookie, sessions.ttl_s)
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/console")
        return response

    def sign_in_routes(admin: bool) -> tuple[Any, Any]:
        async def form(request: Request) -> Response:
            return login_page(request, admin)

        async def submit(request: Request) -> Response:
            return await sign_in(request, admin)

        return form, submit

    for path, admin in (("/login", False), ("/admin/login", True)):
        form, submit = sign_in_routes(admin)
        router.add_api_route(path, form, methods=["GET"])
        router.add_api_route(path, submit, methods=["POST"])

    @router.post("/logout")
    @guarded
    async def logout(request: Request) -> Response:
        session = await session_of(request)
        if session is not None:
            await form_of(request, session)
            await sessions.end(request.cookies.get(COOKIE))
        response = redirect("/console/admin/login" if session and session.kind == "admin" else "/console/login")
        response.delete_cookie(COOKIE, path="/console")
        return response

    # -- customer pages ------------------------------------------------------------------------
    @router.get("")
    @guarded
    async def overview(request: Request) -> Response:
        session, key = await customer(request)
        return render(request, "overview.html", session=session, key=key, nav="overview")

    @router.get("/usage")
    @guarded
    async def usage(request: Request) -> Response:
        session, key = await customer(request)
        last = datetime.now(timezone.utc).date()
        first = last - timedelta(days=USAGE_DAYS - 1)
        by_day = await usage_report(ingress.redis, [key["org_id"]], first, last, "day", key_id=key["id"])
        by_model = await usage_report(ingress.redis, [key["org_id"]], first, last, "model", key_id=key["id"])
        days = [(first + timedelta(days=n)).isoformat() for n in range(USAGE_DAYS)]
        daily = {row.date: row for row in by_day.data}
        return render(
            request,
            "usage.html",
            session=session,
            key=key,
            nav="usage",
            first=first.isoformat(),
            last=last.isoformat(),
            by_day=by_day,
            by_model=by_model,
            day_labels=days,
            day_cost=[daily[day].cost_usd if day in daily else 0 for day in days],
            day_tokens=[daily[day].total_tokens if day in daily else 0 for day in days],
            model_labels=[row.model for row in by_model.data],
            model_cost=[row.cost_usd for row in by_model.data],
        )

    @router.get("/activity")
    @guarded
    async def activity(request: Request) -> Response:
        session, key = await customer(request)
        rows = await recent_generations(ingress.redis, key["org_id"], key["id"], ACTIVITY_ROWS)
        return render(request, "activity.html", session=session, key=key, nav="activity", rows=rows)

    @router.get("/models")
    @guarded
    async def models(request: Request) -> Response:
        session, key = await customer(request)
        return render(request, "models.html", session=session, key=key, nav="models", cards=ingress.model_cards())

    # -- operator pages ------------------------------------------------------------------------
    async def keys_page(request: Request, session: Session, **context: Any) -> Response:
        rows = [record.view(org).model_dump() for record, org in await ingress.keys.list()]
        orgs = await ingress.org_rows()
        return render(
            request,
            "admin_keys.html",
            status=context.pop("status", 200),
            session=session,
            nav="keys",
            admin=True,
            keys=rows,
            orgs=orgs,
            tiers=list(ingress.catalog.tiers),
            models=[offer.id for offer in ingress.catalog.offers],
            **context,
        )

    @router.get("/admin")
    @guarded
    async def admin_home(request: Request) -> Response:
        return await keys_page(request, await operator(request))

    @router.post("/admin/keys")
    @guarded
    async def admin_create_key(request: Request) -> Response:
        session = await operator(request)
        form = await form_of(request, session)
        body = {name: value for name, value in form.items() if value != ""}
        if "models" in body:
            body["models"] = [m.strip() for m in body["models"].split(",") if m.strip()]
        for name in (*LIMIT_FIELDS,):
            if name in body:
                body[name] = _int(body[name])
        if "credit_usd" in body:
            body["credit_usd"] = _number(body["credit_usd"])
        try:
            created = await ingress.create_key(CreateKeyRequest.model_validate(body))
        except (APIError, ValidationError) as error:
            return await keys_page(request, session, status=400, error=_message(error))
        return await keys_page(request, session, status=201, created=created)

    @router.post("/admin/keys/{key_id}/revoke")
    @guarded
    async def admin_revoke(request: Request, key_id: str) -> Response:
        session = await operator(request)
        await form_of(request, session)
        try:
            await ingress.keys.revoke(key_id)
        except APIError as error:
            return await keys_page(request, session, status=error.status_code, error=error.message)
        return await keys_page(request, session, notice=f"Revoked {key_id}.")

    @router.post("/admin/keys/{key_id}/limits")
    @guarded
    async def admin_limits(request: Request, key_id: str) -> Response:
        session = await operator(request)
        form = await form_of(request, session)
        # An empty limit field puts the limit back to the operator's default (null in the API).
        changes: dict[str, Any] = {name: _int(form[name]) if form.get(name) else None for name in LIMIT_FIELDS}
        if form.get("tier") is not None:
            changes["tier"] = form["tier"] or None
        try:
            await ingress.update_key(key_id, UpdateKeyRequest.model_validate(changes))
        except (APIError, ValidationError) as error:
            return await keys_page(request, session, status=400, error=_message(error))
        return await keys_page(request, session, notice=f"Changed the limits of {key_id}.")

    @router.post("/admin/orgs/{org_id}/credit")
    @guarded
    async def admin_credit(request: Request, org_id: str) -> Response:
        session = await operator(request)
        form = await form_of(request, session)
        try:
            amount = _number(form.get("amount_usd", ""))
            if amount is None or amount <= 0:
                raise BadRequest("Give a positive amount in USD.", param="amount_usd")
            await ingress.keys.add_org_credit(org_id, usd_to_micros(amount))
        except APIError as error:
            return await keys_page(request, session, status=error.status_code, error=error.message)
        return await keys_page(request, session, notice=f"Added {amount} USD to {org_id}.")

    @router.post("/admin/orgs")
    @guarded
    async def admin_create_org(request: Request) -> Response:
        session = await operator(request)
        form = await form_of(request, session)
        body = {"name": form.get("name", ""), "credit_usd": _number(form.get("credit_usd") or "0")}
        if form.get("tier"):
            body["tier"] = form["tier"]
        try:
            org = await ingress.create_org(CreateOrgRequest.model_validate(body))
        except (APIError, ValidationError) as error:
            return await keys_page(request, session, status=400, error=_message(error))
        return await keys_page(request, session, notice=f"Created the organization {org['id']}.")

    @router.get("/admin/live")
    @guarded
    async def admin_live(request: Request) -> Response:
        session = await operator(request)
        scope = await ingress.account_scope()
        holds = await live_holds(ingress.redis, scope)
        today = datetime.now(timezone.utc).date()
        traffic = await usage_report(ingress.redis, sorted(scope), today, today, "model")
        outcomes: dict[str, dict[str, int]] = {}
        for org_id in sorted(scope):
            for row in await recent_generations(ingress.redis, org_id, None, OUTCOME_SAMPLE):
                counts = outcomes.setdefault(row.served_by, {"completed": 0, "aborted": 0, "error": 0, "rejected": 0})
                counts[row.status] += 1
        return render(
            request,
            "admin_live.html",
            session=session,
            nav="live",
            admin=True,
            holds=holds,
            traffic=traffic,
            outcomes=outcomes,
            in_flight=sum(row.in_flight for row in holds),
            sample=OUTCOME_SAMPLE,
        )

    @router.get("/admin/reconcile")
    @guarded
    async def admin_reconcile(request: Request) -> Response:
        session = await operator(request)
        report = await reconcile(ingress.redis, await ingress.account_scope())
        return render(request, "admin_reconcile.html", session=session, nav="reconcile", admin=True, report=report)

    return router


def usd(value: float | None) -> str:
    """Money as the API has it (up to 6 decimals), at least cents: $0.5 -> "$0.50", 1e-6 -> "$0.000001"."""
    if value is None:
        return "-"
    text = f"{value:,.6f}".rstrip("0")
    whole, _, cents = text.partition(".")
    return f"${whole}.{cents.ljust(2, '0')}"


def _int(text: str) -> int | str:
    """A form's integer (the schema refuses what is not one, with its own message)."""
    try:
        return int(text)
    except ValueError:
        return text


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _message(error: APIError | ValidationError) -> str:
    if isinstance(error, APIError):
        return error.message
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
