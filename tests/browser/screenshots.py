"""`make screenshots`: a PNG of each console screen in docs/screenshots/ (python -m tests.browser.screenshots DIR).

Starts `outreach up --demo` as `make run` does (the embedded broker, SQLite, free ports, a temporary data folder),
waits for its banner (the demo's two campaigns final, its API token, its console sign-in), adds campaigns in
other states through the HTTP API with that token (one ready, one running while it is photographed), then signs
in with Debian's Chromium (Playwright, as the browser tests) and photographs each screen at 1280x800, a few at
375x812 too. A screen the console does not have (404) is said and skipped. The tests never write here: they
photograph only under their tmp_path, on failure."""
from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from outreach.client import ALL_DISCLAIMER_FLAGS
from services.api.store import ApiStore
from services.common.embedded_broker import free_port
from tests.browser.conftest import DESKTOP, PASSWORD, PHONE, REPO, chromium_launch_options, sign_in

BANNER_TIMEOUT_S = 420
MAX_HEIGHT = 1800  # pixels of a full-page screenshot
SIGN_IN_LINE = re.compile(r"Demo console sign-in \(org_admin\): (http://\S+)/console/ user (\S+), password (\S+)")
TOKEN_LINE = re.compile(r"Demo API token \(org_admin\): (\S+)")


def demo_environment(data_dir: Path) -> dict[str, str]:
    """A newcomer's `make run` (SQLite, the embedded broker) on free ports, its data in data_dir."""
    env = dict(os.environ)
    for name in ("OUTREACH_EXTERNAL_KAFKA", "OUTREACH_EVENT_STORE", "OUTREACH_POSTGRES_DSN", "OUTREACH_READ_MODEL"):
        env.pop(name, None)
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port('127.0.0.1')}",
        "OUTREACH_DATA_DIR": str(data_dir),
        "OUTREACH_KAFKA_SESSION_TIMEOUT_MS": "2000",
        "OUTREACH_KAFKA_HEARTBEAT_MS": "200",
        "OUTREACH_SIMULATOR_PORT": str(free_port("127.0.0.1")),
        "OUTREACH_WEBHOOK_PORT": str(free_port("127.0.0.1")),
        "OUTREACH_API_PORT": str(free_port("127.0.0.1")),
        "XDG_CONFIG_HOME": str(data_dir / "xdg-config"),  # the stack file `outreach up` writes: not the user's
        "XDG_STATE_HOME": str(data_dir / "xdg-state"),
    })
    return env


class DemoStack:
    """`outreach up --demo` in the background, until stopped (SIGTERM: it stops every service)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [str(REPO / ".venv" / "bin" / "outreach"), "up", "--demo", "--demo-size", "200"], cwd=data_dir,
            env=demo_environment(data_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for_banner(self) -> tuple[str, str, str, str]:
        """(console base URL, username, password, API token), once the demo printed them."""
        deadline = time.monotonic() + BANNER_TIMEOUT_S
        while time.monotonic() < deadline:
            text = "".join(self.lines)
            signed, token = SIGN_IN_LINE.search(text), TOKEN_LINE.search(text)
            if signed and token:
                return signed.group(1), signed.group(2), signed.group(3), token.group(1)
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise SystemExit("outreach up --demo printed no console sign-in:\n" + "".join(self.lines[-40:]))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def contacts_csv(size: int, invalid: bool = True) -> bytes:
    rows = [["phone", "first_name", "city"]]
    rows += [[f"+1{200 + i % 800}555{i // 800:04d}", f"Ada{i}", "Lisbon"] for i in range(size)]
    if invalid:
        rows += [["12345", "Short", "Porto"], ["", "Nobody", "Braga"]]
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue().encode()


async def create_sms_campaign(api: httpx.AsyncClient, name: str, size: int, body: str) -> str:
    created = await api.post("/campaigns", files={"contacts": ("contacts.csv", contacts_csv(size), "text/csv")},
                             data={"name": name, "channel": "sms", "template": json.dumps({"body": body}),
                                   "variables": json.dumps(["first_name", "city"]), "consent_confirmed": "true"})
    created.raise_for_status()
    campaign_id = created.json()["campaign_id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = await api.get(f"/campaigns/{campaign_id}")
        if found.status_code == 200 and found.json()["status"] == "ready":
            return campaign_id
        await asyncio.sleep(0.3)
    raise SystemExit(f"campaign {name} never became ready")


async def run_campaign(api: httpx.AsyncClient, campaign_id: str) -> None:
    started = await api.post(f"/campaigns/{campaign_id}/run", json={"disclaimer": dict(ALL_DISCLAIMER_FLAGS)})
    started.raise_for_status()


class Camera:
    """Pages signed in as the demo's org admin, at a laptop's and a phone's width; `snap` writes NAME.png."""

    def __init__(self, browser, base_url: str, out: Path) -> None:
        self.browser, self.base_url, self.out = browser, base_url, out
        self.taken: list[str] = []

    async def page(self, viewport: dict, username: str | None = None, password: str = PASSWORD):
        context = await self.browser.new_context(base_url=self.base_url, viewport=viewport)
        context.set_default_timeout(30_000)
        page = await context.new_page()
        if username:
            await sign_in(page, username, password)
            await page.wait_for_url(re.compile(r"/console/$"))
        return page

    async def snap(self, page, name: str, full_page: bool = True) -> None:
        """The page (the whole of it up to MAX_HEIGHT, or what the window shows) as NAME.png."""
        await page.wait_for_load_state("networkidle")
        target = self.out / f"{name}.png"
        height = await page.evaluate("() => document.documentElement.scrollHeight")
        clip = None
        if full_page and height > MAX_HEIGHT:  # a long table: its first screens say enough
            clip = {"x": 0, "y": 0, "width": page.viewport_size["width"], "height": MAX_HEIGHT}
        await page.screenshot(path=str(target), full_page=full_page, clip=clip)
        self.taken.append(name)
        print(f"  {name}: {page.url.removeprefix(self.base_url)}")

    async def visit(self, page, path: str, name: str, full_page: bool = True) -> bool:
        """The page at `path`, photographed; False (and said) when the console has no such page."""
        answer = await page.goto(path)
        if answer is None or answer.status == 404:
            print(f"  {name}: skipped, the console has no {path}")
            return False
        await self.snap(page, name, full_page)
        return True


async def open_menu_item(page, campaign_name: str, item: str):
    await page.get_by_role("button", name=f"Actions for {campaign_name}").click()
    if item:
        await page.get_by_role("menuitem", name=item, exact=True).click()
        await page.get_by_role("dialog").wait_for()


async def photograph(base_url: str, username: str, password: str, ids: dict[str, str], out: Path) -> list[str]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(**chromium_launch_options())
        camera = Camera(browser, base_url, out)
        anonymous = await camera.page(DESKTOP)
        await camera.visit(anonymous, "/console/sign-in", "sign-in")
        await sign_in(anonymous, username, "not the pass phrase")
        await camera.snap(anonymous, "sign-in-refused")

        page = await camera.page(DESKTOP, username, password)
        phone = await camera.page(PHONE, username, password)
        # While "Clinic recall" runs: the list, its live view, its Stop confirmation (closed again, unsent).
        await camera.visit(page, "/console/campaigns", "campaigns")
        await camera.visit(phone, "/console/campaigns", "campaigns-phone")
        await camera.visit(page, f"/console/campaigns/{ids['running']}", "campaign-running")
        await camera.visit(phone, f"/console/campaigns/{ids['running']}", "campaign-running-phone", full_page=False)
        await page.goto("/console/campaigns")
        await open_menu_item(page, "Clinic recall", "Stop")
        await camera.snap(page, "stop-modal", full_page=False)
        await page.keyboard.press("Escape")
        # The Run Campaign modal of the ready campaign: first as it opens, then with the four boxes ticked.
        await open_menu_item(page, "Spring reminders", "")
        await camera.snap(page, "campaigns-menu", full_page=False)
        await page.keyboard.press("Escape")
        await open_menu_item(page, "Spring reminders", "Run")
        await camera.snap(page, "run-modal", full_page=False)
        for box in await page.get_by_role("dialog").get_by_role("checkbox").all():
            await box.check()
        await camera.snap(page, "run-modal-confirmed", full_page=False)
        await page.keyboard.press("Escape")
        await phone.goto("/console/campaigns")
        await open_menu_item(phone, "Spring reminders", "Run")
        await camera.snap(phone, "run-modal-phone", full_page=False)

        # New campaign, its three steps and the import report (a campaign is made).
        if await camera.visit(page, "/console/campaigns/new", "new-campaign"):
            await page.get_by_label("Name").fill("Autumn check-ups")
            await page.get_by_role("radio", name="SMS").check()
            await page.get_by_label("Contacts CSV").set_input_files(files=[
                {"name": "autumn.csv", "mimeType": "text/csv", "buffer": contacts_csv(40)}])
            await page.get_by_role("button", name="Upload and choose columns").click()
            await page.get_by_role("button", name="Check the contacts").wait_for()
            await camera.snap(page, "new-campaign-columns")
            await page.get_by_role("button", name="Check the contacts").click()
            await page.get_by_label("Message text").fill("Hi {{first_name}}, your {{city}} check-up is due. {{day}}?")
            await page.get_by_role("button", name="Preview").click()
            await page.get_by_label("Message text").wait_for()
            await camera.snap(page, "new-campaign-template")
            await page.get_by_label("Message text").fill("Hi {{first_name}}, your {{city}} check-up is due.")
            await page.get_by_label("The contacts consented to be contacted").check()
            await page.get_by_role("button", name="Create campaign").click()
            await page.locator("#import-done").wait_for(timeout=60_000)
            await camera.snap(page, "import-report")

        # A final campaign: its failed messages, one of them, its history; the test send of a ready one.
        await camera.visit(page, f"/console/campaigns/{ids['done']}?status=failed", "campaign-failed-messages")
        await page.goto(f"/console/campaigns/{ids['done']}?status=failed")
        await page.locator("#message-table tbody").get_by_role("link").first.click()
        await camera.snap(page, "message")
        await camera.visit(page, f"/console/campaigns/{ids['done']}/history", "campaign-history")
        if (await page.goto(f"/console/campaigns/{ids['ready']}/test-send")).ok:
            await page.get_by_label("Send to (phone number").fill("+14155550142")
            await page.get_by_role("button", name="Send test message").click()
            await page.get_by_role("status").wait_for()
            await camera.snap(page, "test-send")

        for path, name in (("/console/opt-outs", "opt-outs"), ("/console/users", "users"),
                           ("/console/settings", "settings"), ("/console/audit", "audit"),
                           ("/console/operations", "operations"), ("/console/password", "password")):
            await camera.visit(page, path, name)
        campaigner = await camera.page(DESKTOP, "carl")
        await camera.visit(campaigner, "/console/settings", "campaigner-refused-settings")
        await browser.close()
    return camera.taken


async def make_screenshots(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="outreach-screenshots-") as folder:
        stack = DemoStack(Path(folder))
        try:
            print("Starting outreach up --demo (the demo runs its two campaigns first)...")
            base_url, username, password, token = await asyncio.to_thread(stack.wait_for_banner)
            with ApiStore(Path(folder) / "api.db") as store:  # people of the other roles, for the Users screen
                for name, role in (("ana", "admin"), ("carl", "campaigner"), ("otto", "operations")):
                    store.create_user(name, role, PASSWORD, created_by="cli:screenshots")
            async with httpx.AsyncClient(base_url=base_url, timeout=60,
                                         headers={"Authorization": f"Bearer {token}"}) as api:
                ids = {"ready": await create_sms_campaign(api, "Spring reminders", 1200,
                                                          "Hi {{first_name}}, see you in {{city}} on Friday."),
                       "running": await create_sms_campaign(api, "Clinic recall", 9000,
                                                            "Hello {{first_name}}, your {{city}} clinic calls.")}
                listed = (await api.get("/campaigns")).json()
                items = listed["items"] if isinstance(listed, dict) else listed
                ids["done"] = next(c["campaign_id"] for c in items if c.get("name") == "Demo SMS")
                await run_campaign(api, ids["running"])  # 9,000 at 100 a second: still running while photographed
            taken = await photograph(base_url, username, password, ids, out)
        finally:
            stack.stop()
    print(f"{len(taken)} screenshots in {out}")
    return 0 if taken else 1


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "docs" / "screenshots")
    return asyncio.run(make_screenshots(out.resolve()))


if __name__ == "__main__":
    raise SystemExit(main())
