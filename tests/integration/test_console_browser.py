"""The web console in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`) driven by Selenium against the running marketplace (fake engine).

An operator signs in with the admin token and creates a key on the page (shown once); the
key is used through the openai SDK; its customer signs in with it and sees the balance and
usage `/v1/key` and `/v1/usage` report; the operator revokes it on the page and the API
answers 401. Forms without the session's CSRF token are refused, admin pages refuse a
customer session, sessions end at sign-out and when they expire, and no page carries a key
or its hash. Screenshots of each page go to $TOKENMART_SCREENSHOTS (docs/console in the
repository is made that way), else to the test's temporary folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import AuthenticationError, OpenAI
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from tokenmart.deployments.console.sessions import SESSION_PREFIX, SESSION_TTL_S

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("TOKENMART_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TOKENMART_CHROMEDRIVER", "/usr/bin/chromedriver")


def browser() -> webdriver.Chrome:
    for path in (CHROMIUM, CHROMEDRIVER):
        assert shutil.which(path), (
            f"{path} is missing: scripts/install.sh installs Debian's chromium and chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1400",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(5)
    return driver


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("TOKENMART_SCREENSHOTS") or tmp_path_factory.mktemp("console"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def operator(marketplace) -> Iterator[webdriver.Chrome]:
    driver = browser()
    try:
        sign_in(driver, marketplace.base_url, marketplace.admin_token, admin=True)
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def customer_browser() -> Iterator[webdriver.Chrome]:
    driver = browser()
    try:
        yield driver
    finally:
        driver.quit()


def sign_in(driver: webdriver.Chrome, base_url: str, secret: str, *, admin: bool = False) -> None:
    driver.get(f"{base_url}/console/{'admin/' if admin else ''}login")
    driver.find_element(By.ID, "secret").send_keys(secret)
    driver.find_element(By.ID, "sign-in").click()
    assert driver.find_elements(By.ID, "sign-out"), driver.page_source[:2000]


def attributes(driver: webdriver.Chrome, selector: str, name: str) -> list[str]:
    return [element.get_attribute(name) for element in driver.find_elements(By.CSS_SELECTOR, selector)]


def value(driver: webdriver.Chrome, element_id: str) -> float:
    return float(driver.find_element(By.ID, element_id).get_attribute("data-value"))


def no_csp_violations(driver: webdriver.Chrome) -> None:
    logs = [entry["message"] for entry in driver.get_log("browser")]
    assert not [line for line in logs if "Content Security Policy" in line or "Refused to" in line], logs


def test_an_operator_creates_a_key_its_customer_sees_the_apis_numbers_and_a_revoke_ends_it(
    marketplace, operator, customer_browser, shots
):
    base = marketplace.base_url
    # The operator creates a key on the page: the key is shown once.
    operator.get(f"{base}/console/admin")
    operator.find_element(By.ID, "key-name").send_keys("console-customer")
    operator.find_element(By.ID, "key-credit").send_keys("2")
    operator.find_element(By.ID, "key-rpm").send_keys("120")
    Select(operator.find_element(By.ID, "key-tier")).select_by_visible_text("premium")
    operator.find_element(By.ID, "create-key-button").click()
    key = operator.find_element(By.ID, "new-key").text
    key_id = operator.find_element(By.ID, "new-key-id").text
    assert key.startswith("sk-") and key_id.startswith("key_")
    operator.save_screenshot(str(shots / "admin-keys.png"))
    no_csp_violations(operator)

    # The key works through the openai SDK.
    with OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0) as client:
        for turn in range(3):
            client.chat.completions.create(
                model="alpha-chat", messages=[{"role": "user", "content": f"hello {turn}"}], max_tokens=4
            )

    # Its customer signs in with it and sees exactly what the API reports.
    sign_in(customer_browser, base, key)
    account = marketplace.key_info(key)
    assert value(customer_browser, "balance") == account["credit_usd"] < 2
    assert value(customer_browser, "spent") == account["spent_usd"] > 0
    assert customer_browser.find_element(By.ID, "rpm").text == "120"
    customer_browser.save_screenshot(str(shots / "account.png"))
    pages = {"account": customer_browser.page_source}

    customer_browser.get(f"{base}/console/usage")
    total = marketplace.usage(key)["total"]
    assert value(customer_browser, "total-requests") == total["requests"] == 3
    assert value(customer_browser, "total-tokens") == total["total_tokens"]
    assert value(customer_browser, "total-cost") == total["cost_usd"]
    assert customer_browser.find_element(By.CSS_SELECTOR, "#chart-days").size["height"] > 100  # drawn
    customer_browser.save_screenshot(str(shots / "usage.png"))
    pages["usage"] = customer_browser.page_source

    customer_browser.get(f"{base}/console/activity")
    rows = customer_browser.find_elements(By.CSS_SELECTOR, "#activity tbody tr[data-id]")
    assert len(rows) == 3
    customer_browser.save_screenshot(str(shots / "activity.png"))
    pages["activity"] = customer_browser.page_source
    customer_browser.get(f"{base}/console/models")
    listed = [
        row.get_attribute("data-model")
        for row in customer_browser.find_elements(By.CSS_SELECTOR, "#models tr[data-model]")
    ]
    assert listed == [card["id"] for card in marketplace.http.get("/v1/models").json()["data"]]
    customer_browser.save_screenshot(str(shots / "models.png"))
    pages["models"] = customer_browser.page_source
    no_csp_violations(customer_browser)

    # No page but the one that created it carries the key, and none its hash.
    key_hash = hashlib.sha256(key.encode()).hexdigest()
    for name, html in pages.items():
        assert key not in html and key_hash not in html, name
    # The session cookie: HttpOnly, SameSite=Strict, and not the key.
    (cookie,) = [c for c in customer_browser.get_cookies() if c["name"] == "tm_console"]
    assert (cookie["httpOnly"], cookie["sameSite"]) == (True, "Strict") and cookie["value"] != key

    # Admin pages refuse a customer session.
    customer_browser.get(f"{base}/console/admin")
    assert customer_browser.find_element(By.ID, "refused")
    customer_browser.get(f"{base}/console/admin/reconcile")
    assert customer_browser.find_element(By.ID, "refused")

    # The operator revokes the key on the page: the API answers 401 and the session ends.
    operator.get(f"{base}/console/admin")
    operator.execute_script("window.confirm = () => true;")  # the page asks before revoking
    operator.find_element(By.ID, f"revoke-{key_id}").click()
    assert "Revoked" in operator.find_element(By.ID, "notice").text
    with OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0) as client, pytest.raises(AuthenticationError):
        client.chat.completions.create(model="alpha-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    customer_browser.get(f"{base}/console")
    assert customer_browser.find_element(By.ID, "ended")


def test_operator_pages_show_live_holds_traffic_and_balanced_books(marketplace, operator, shots):
    key = marketplace.create_key(name="console-traffic", credit_usd=1)["key"]
    assert marketplace.chat(key, max_tokens=3).status_code == 200
    operator.get(f"{marketplace.base_url}/console/admin/live")
    org_id = marketplace.key_info(key)["org_id"]
    row = f'#holds tr[data-org="{org_id}"] td:nth-child(4)'
    assert operator.find_element(By.CSS_SELECTOR, row).text == "0"

    # A long stream starts: the page (htmx, every 5 s) shows it in flight without a reload.
    def long_stream() -> None:
        body = {"model": "beta-chat", "messages": [{"role": "user", "content": "long [[fake-tokens=400]]"}]}
        with marketplace.http.stream("POST", "/v1/chat/completions", json=body | {"stream": True, "max_tokens": 400},
                                     headers=marketplace.auth(key)) as stream:  # fmt: skip
            for _ in stream.iter_lines():
                pass

    streaming = threading.Thread(target=long_stream)
    streaming.start()
    try:
        wait = WebDriverWait(operator, 15, ignored_exceptions=(StaleElementReferenceException,))
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, row).text == "1")
    finally:
        streaming.join()
    traffic = {
        row.get_attribute("data-model") for row in operator.find_elements(By.CSS_SELECTOR, "#traffic tr[data-model]")
    }
    assert "alpha-chat" in traffic
    operator.save_screenshot(str(shots / "admin-live.png"))
    operator.get(f"{marketplace.base_url}/console/admin/reconcile")
    report = marketplace.http.get("/admin/v1/reconcile", headers=marketplace.admin_headers).json()
    status = operator.find_element(By.ID, "books-status").text
    assert status == ("balanced" if report["ok"] else "differences")
    shown = {
        row.get_attribute("data-org") for row in operator.find_elements(By.CSS_SELECTOR, "#reconcile tr[data-org]")
    }
    assert shown == {org["org_id"] for org in report["orgs"]}
    operator.save_screenshot(str(shots / "admin-books.png"))
    no_csp_violations(operator)


def test_forms_without_the_sessions_csrf_token_are_refused(marketplace, operator):
    operator.get(f"{marketplace.base_url}/console/admin")
    operator.execute_script("document.querySelector('#create-key input[name=csrf]').value = 'forged';")
    operator.find_element(By.ID, "key-name").send_keys("never-made")
    operator.find_element(By.ID, "create-key-button").click()
    assert "CSRF" in operator.find_element(By.ID, "refused").text
    names = [
        key["name"] for key in marketplace.http.get("/admin/v1/keys", headers=marketplace.admin_headers).json()["data"]
    ]
    assert "never-made" not in names
    # A cross-site POST carries no cookie (SameSite=Strict) and no token: refused as well.
    forged = httpx.post(f"{marketplace.base_url}/console/admin/keys", data={"name": "x"}, follow_redirects=False)
    assert forged.status_code == 303 and forged.headers["location"] == "/console/admin/login"


def test_sessions_end_at_sign_out_and_when_they_expire(marketplace, customer_browser, redis_client, shots):
    key = marketplace.create_key(name="console-session", credit_usd=1)["key"]
    customer_browser.get(f"{marketplace.base_url}/console/login")
    customer_browser.save_screenshot(str(shots / "sign-in.png"))
    sign_in(customer_browser, marketplace.base_url, key)
    sessions = [name for name in redis_client.scan_iter(f"{SESSION_PREFIX}*")]
    assert sessions and all(0 < redis_client.ttl(name) <= SESSION_TTL_S for name in sessions)
    assert not any(key in (redis_client.get(name) or "") for name in sessions)  # not stored with the session
    customer_browser.find_element(By.ID, "sign-out").click()
    assert customer_browser.find_element(By.ID, "secret")  # back at sign-in
    assert not [c for c in customer_browser.get_cookies() if c["name"] == "tm_console"]
    customer_browser.get(f"{marketplace.base_url}/console")
    assert customer_browser.current_url.endswith("/console/login")

    # An expired session (its Redis record gone) sends the browser back to sign in.
    sign_in(customer_browser, marketplace.base_url, key)
    for name in redis_client.scan_iter(f"{SESSION_PREFIX}*"):
        redis_client.delete(name)
    customer_browser.get(f"{marketplace.base_url}/console/usage")
    assert customer_browser.current_url.endswith("/console/login")


def test_every_console_response_sends_the_content_security_policy(marketplace):
    for path in ("/console/login", "/console/admin/login"):
        response = httpx.get(f"{marketplace.base_url}{path}")
        assert response.status_code == 200
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy
        assert response.headers["cache-control"] == "no-store"
        assert "<script>" not in response.text and " on" + "click=" not in response.text
    assert httpx.get(f"{marketplace.base_url}/console/static/vendor/htmx.min.js").status_code == 200
    assert httpx.get(f"{marketplace.base_url}/console/static/vendor/chart.umd.min.js").status_code == 200
