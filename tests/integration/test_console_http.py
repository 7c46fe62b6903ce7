"""The console's sign-in and session rules over plain HTTP: a real Redis, the ingress's own app
(its engines never called), no Ray. The browser tests (test_console_browser.py) cover the
pages themselves."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from tokenmart.deployments.app import model_cards
from tokenmart.deployments.console.routes import mount_console
from tokenmart.deployments.ingress import MarketplaceIngress, create_fastapi_app
from tokenmart.deployments.schemas import CreateKeyRequest

from .conftest import TEST_CATALOG

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "adm-console-http-tests"


class _Handle:
    def options(self, **_: Any) -> _Handle:
        return self


@pytest.fixture
def console(redis_server, redis_client):
    ingress = MarketplaceIngress(
        {listing.id: _Handle() for listing in TEST_CATALOG.listings},
        model_cards(TEST_CATALOG),
        catalog=TEST_CATALOG.model_dump(mode="json"),
        redis_url=redis_server.url,
        admin_token=SecretStr(ADMIN_TOKEN),
    )
    app = create_fastapi_app()
    mount_console(app, ingress)
    return ingress, app


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


async def sign_in(client: httpx.AsyncClient, secret: str, *, admin: bool) -> httpx.Response:
    path = "/console/admin/login" if admin else "/console/login"
    page = await client.get(path)
    return await client.post(path, data={"csrf": csrf_of(page.text), "secret": secret})


def run(app, scenario, base_url: str = "http://console.test"):
    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url) as client:
            return await scenario(client)

    return asyncio.run(main())


def test_a_wrong_key_or_token_is_refused_on_the_page_with_the_apis_message(console):
    _, app = console

    async def scenario(client):
        wrong_key = await sign_in(client, "sk-tm-" + "x" * 40, admin=False)
        wrong_token = await sign_in(client, "not-the-token", admin=True)
        return wrong_key, wrong_token

    wrong_key, wrong_token = run(app, scenario)
    assert wrong_key.status_code == 401 and 'id="error"' in wrong_key.text
    assert wrong_token.status_code == 401 and "Incorrect admin token." in wrong_token.text
    assert "tm_console=" not in wrong_key.headers.get("set-cookie", "")


def test_a_sign_in_form_without_its_double_submit_token_is_refused(console):
    _, app = console

    async def scenario(client):
        return await client.post("/console/admin/login", data={"csrf": "made-up", "secret": ADMIN_TOKEN})

    refused = run(app, scenario)
    assert refused.status_code == 403 and "tm_console=" not in refused.headers.get("set-cookie", "")


def test_an_admin_session_ends_when_the_admin_token_changes(console):
    ingress, app = console

    async def scenario(client):
        signed_in = await sign_in(client, ADMIN_TOKEN, admin=True)
        before = await client.get("/console/admin")
        ingress.admin_token = SecretStr("a-new-admin-token")
        after = await client.get("/console/admin")
        return signed_in, before, after

    signed_in, before, after = run(app, scenario)
    assert (signed_in.status_code, signed_in.headers["location"]) == (303, "/console/admin")
    assert before.status_code == 200
    assert (after.status_code, after.headers["location"]) == (303, "/console/admin/login?ended=1")


def test_cookies_are_httponly_strict_and_secure_over_https(console):
    _, app = console

    async def scenario(client):
        return await sign_in(client, ADMIN_TOKEN, admin=True)

    cookie = run(app, scenario, base_url="https://console.test").headers["set-cookie"]
    assert "tm_console=" in cookie
    for attribute in ("HttpOnly", "SameSite=strict", "Secure", "Path=/console"):
        assert attribute.lower() in cookie.lower(), cookie


def test_a_customer_session_cannot_post_to_operator_forms(console):
    ingress, app = console

    async def scenario(client):
        created = await ingress.create_key(CreateKeyRequest(name="customer", credit_usd=1))
        await sign_in(client, created["key"], admin=False)
        page = await client.get("/console")
        token = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)
        refused = await client.post("/console/admin/keys", data={"csrf": token, "name": "sneaky"})
        return refused, [record.name for record, _ in await ingress.keys.list()]

    refused, names = run(app, scenario)
    assert refused.status_code == 403 and 'id="refused"' in refused.text
    assert names == ["customer"]
