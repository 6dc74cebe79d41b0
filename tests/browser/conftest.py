"""Browser tests of the web console: a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright
through `executable_path`; Playwright's own browser builds are never downloaded) against a whole stack, every
service a process, the API among them. One stack for the whole package: starting one costs a minute here.

Fixtures:
- `env`, `stack` (package scope): the stack, on a broker of its own when it is the embedded one; the e2e
  fixtures `settings`, `tail` and `commands` (tests/e2e_fixtures.py) work on it.
- `console_url`: the API's address, once /healthz answers.
- `users`: one account of each role, {role: username}, all with PASSWORD; `make_user(role)` makes another
  (a test that changes a password or fails sign-ins uses its own, so no other test's session or throttle moves).
- `api`: an HTTP client of the stack's API with an org_admin token (to make campaigns, and to check).
- `signed_in_page(role, viewport=DESKTOP)`: a new browser context signed in through the real sign-in form.
  `new_page(viewport=DESKTOP)`: a context signed in as nobody.
  Every page made so is watched: a script error or a Content-Security-Policy refusal fails the test (the CSP is
  enforced, not bypassed: an inline script or style the console would lose in a real browser shows up here).
- `assert_accessible(page, what)`: axe-core (npm, package.json; `make install` runs npm ci) on the page as it
  is; any violation of impact serious or critical fails, each listed with the elements it names.

Skips, each saying why: no Chromium, no playwright package, no node_modules/axe-core (npm missing).
A failing test leaves a screenshot of each of its pages under its tmp_path (never under docs/)."""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from outreach.up import SERVICES, Stack
from services.api.store import ApiStore
from services.common.settings import Settings
from tests.conftest import _broker_choice, async_wait_until
from tests.e2e_fixtures import api_client, stack_token
from tests.e2e_stack import stack_environment

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("OUTREACH_CHROMIUM", "/usr/bin/chromium"))
AXE_SOURCE = REPO / "node_modules" / "axe-core" / "axe.min.js"
PASSWORD = "browser tests pass phrase"
ROLE_USERS = {"org_admin": "olga", "admin": "adam", "campaigner": "carla", "operations": "otto"}
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 375, "height": 812}
VIEWPORTS = {"1280x800": DESKTOP, "375x812": PHONE}
# Playwright's waits (expect, click...): generous for a 2-core machine running a whole stack.
EXPECT_TIMEOUT_MS = 15_000
BLOCKING_IMPACTS = ("serious", "critical")


def chromium_launch_options() -> dict:
    """Debian's Chromium, headless; --no-sandbox: the tests run as root, where Chromium's sandbox refuses."""
    return {"executable_path": str(CHROMIUM), "headless": True, "args": ["--no-sandbox"]}


def _missing_tools() -> str | None:
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM} (`make install` installs Debian's chromium)"
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (`make install`: the test extra)"
    if not AXE_SOURCE.exists():
        node = "npm is missing" if shutil.which("npm") is None else "npm ci was not run"
        return f"no {AXE_SOURCE.relative_to(REPO)} ({node}; `make install` runs npm ci)"
    return None


def pytest_collection_modifyitems(config, items):
    missing = _missing_tools()
    if missing is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=f"browser tests: {missing}"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.browser_test_failed = report.failed
    return report


# ---------------------------------------------------------------- the stack

@pytest.fixture(scope="package")
def browser_bootstrap(kafka_bootstrap) -> Iterator[str]:
    """As tests/conftest.py's stack_bootstrap, for the package: a broker of its own when embedded."""
    if not _broker_choice()[0].startswith("embedded"):
        yield kafka_bootstrap
        return
    from services.common.embedded_broker import EmbeddedBroker, free_port

    with EmbeddedBroker("127.0.0.1", free_port()) as broker:
        yield broker.bootstrap


@pytest.fixture(scope="package")
def env(browser_bootstrap, tmp_path_factory, postgres_dsn) -> dict[str, str]:
    return stack_environment(browser_bootstrap, tmp_path_factory.mktemp("browser-data"))


@pytest.fixture(scope="package")
def stack(env, tmp_path_factory) -> Iterator[Stack]:
    with Stack(env=env, log_dir=tmp_path_factory.mktemp("browser-logs"), names=tuple(SERVICES)) as running:
        yield running


@pytest.fixture(scope="package")
async def console_url(env, stack) -> str:
    import httpx

    url = f"http://127.0.0.1:{env['OUTREACH_API_PORT']}"

    async def healthy() -> bool:
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                return (await client.get(f"{url}/healthz")).status_code == 200
        except httpx.TransportError:
            return False

    await async_wait_until(healthy, 90, 0.2, message="the API did not start")
    return url


def open_store(env: dict[str, str]) -> ApiStore:
    """The stack's own API store (on PostgreSQL: the API's database), where its console accounts live."""
    return ApiStore.open(Settings(data_dir=env["OUTREACH_DATA_DIR"], event_store=env["OUTREACH_EVENT_STORE"],
                                  postgres_dsn=env["OUTREACH_POSTGRES_DSN"]))


@pytest.fixture(scope="package")
def make_user(env):
    def make(role: str, name: str | None = None) -> str:
        name = name or f"{role.replace('_', '-')}-{uuid.uuid4().hex[:8]}"
        with open_store(env) as store:
            store.create_user(name, role, PASSWORD, created_by="cli:browser-tests")
        return name

    return make


@pytest.fixture(scope="package")
def api_token(env, stack) -> str:
    return stack_token(env, "browser-tests", "org_admin")


@pytest.fixture
async def api(env, console_url, api_token):
    """The stack's HTTP API as an org_admin token: to make and check what the browser acts on."""
    async with api_client(env, api_token) as client:
        yield client


@pytest.fixture(scope="package")
def users(make_user) -> dict[str, str]:
    return {role: make_user(role, name) for role, name in ROLE_USERS.items()}


# ---------------------------------------------------------------- the browser

@pytest.fixture(scope="package")
async def browser():
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(**chromium_launch_options())
        yield launched
        await launched.close()


class PageProblems:
    """What a page said went wrong: uncaught script errors and the browser's Content-Security-Policy refusals."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def watch(self, page) -> None:
        page.on("pageerror", lambda error: self.seen.append(f"{page.url}: script error: {error}"))
        page.on("console", self._console(page))

    def _console(self, page):
        def on_message(message) -> None:
            if message.type == "error" and "Content Security Policy" in message.text:
                self.seen.append(f"{page.url}: {message.text}")
        return on_message


@pytest.fixture
async def new_page(browser, console_url, request, tmp_path) -> AsyncIterator:
    """new_page(viewport=DESKTOP): a fresh context (its own cookies) and a page in it, at no address yet."""
    contexts, pages, problems = [], [], PageProblems()

    async def make(viewport: dict = DESKTOP):
        context = await browser.new_context(base_url=console_url, viewport=viewport, accept_downloads=True)
        context.set_default_timeout(EXPECT_TIMEOUT_MS)
        contexts.append(context)
        page = await context.new_page()
        problems.watch(page)
        pages.append(page)
        return page

    yield make
    if getattr(request.node, "browser_test_failed", False):
        for number, page in enumerate(pages):
            if not page.is_closed():
                shot = tmp_path / f"failure-{number}.png"
                await page.screenshot(path=str(shot), full_page=True)
                print(f"screenshot of {page.url} at failure: {shot}")
    for context in contexts:
        await context.close()
    assert not problems.seen, "the browser reported:\n" + "\n".join(problems.seen)


async def sign_in(page, username: str, password: str = PASSWORD) -> None:
    """Through the real form, as a person would: labels, typing, the button."""
    await page.goto("/console/sign-in")
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Sign in").click()


@pytest.fixture
def signed_in_page(new_page, users):
    """signed_in_page(role, viewport=DESKTOP): a page signed in as that role's user, on the console's home."""
    from playwright.async_api import expect

    async def make(role: str, viewport: dict = DESKTOP, username: str | None = None):
        page = await new_page(viewport)
        await sign_in(page, username or users[role])
        await expect(page.get_by_role("heading", name="Signed in")).to_be_visible()
        return page

    return make


# ---------------------------------------------------------------- accessibility

def describe_violations(violations: list[dict]) -> str:
    lines = []
    for violation in violations:
        lines.append(f"- {violation['impact']}: {violation['id']}: {violation['help']} ({violation['helpUrl']})")
        for node in violation["nodes"][:10]:
            lines.append(f"    at {' '.join(map(str, node['target']))}: {node.get('failureSummary', '').strip()}"
                         .replace("\n", " "))
        if len(violation["nodes"]) > 10:
            lines.append(f"    ... and {len(violation['nodes']) - 10} more elements")
    return "\n".join(lines)


async def axe_violations(page) -> list[dict]:
    """axe-core's violations on the page as it is now. The source is evaluated through the DevTools protocol,
    which the page's CSP does not govern, so the page keeps its real CSP."""
    if not await page.evaluate("() => typeof window.axe === 'object'"):
        await page.evaluate(AXE_SOURCE.read_text())
    result = await page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
    return result["violations"]


@pytest.fixture
def assert_accessible():
    async def check(page, what: str) -> None:
        blocking = [v for v in await axe_violations(page) if v["impact"] in BLOCKING_IMPACTS]
        assert not blocking, f"axe-core on {what} ({page.url}, {page.viewport_size}):\n" + \
            describe_violations(blocking)

    return check
