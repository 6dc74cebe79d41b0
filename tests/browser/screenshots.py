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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from outreach.client import ALL_DISCLAIMER_FLAGS
from services.api.store import ApiStore
from services.common.embedded_broker import free_port
from tests.browser.conftest import DESKTOP, PASSWORD, PHONE, REPO, chromium_launch_options, sign_in

BANNER_TIMEOUT_S = 420
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


@dataclass
class Shot:
    name: str  # docs/screenshots/NAME.png
    path: str  # where the page is (after the setup's {ready}, {running}, {done} ids are filled in)
    prepare: Callable[[object], Awaitable[None]] | None = None  # what a person does before it is taken
    viewport: dict | None = None
    signed_in: bool = True


async def nothing(page) -> None:
    return None


def shots() -> list[Shot]:
    async def refused_sign_in(page) -> None:
        await sign_in(page, "demo", "not the pass phrase")

    return [
        Shot("sign-in", "/console/sign-in", signed_in=False),
        Shot("sign-in-refused", "/console/sign-in", refused_sign_in, signed_in=False),
        Shot("home", "/console/"),
        Shot("password", "/console/password"),
        Shot("campaigns", "/console/campaigns"),
        Shot("campaigns-phone", "/console/campaigns", viewport=PHONE),
        Shot("new-campaign", "/console/campaigns/new"),
        Shot("campaign-running", "/console/campaigns/{running}"),
        Shot("campaign-complete", "/console/campaigns/{done}"),
        Shot("campaign-phone", "/console/campaigns/{done}", viewport=PHONE),
        Shot("test-send", "/console/campaigns/{ready}/test-send"),
        Shot("opt-outs", "/console/opt-outs"),
        Shot("users", "/console/users"),
        Shot("settings", "/console/settings"),
        Shot("audit", "/console/audit"),
        Shot("operations", "/console/operations"),
    ]


async def photograph(base_url: str, username: str, password: str, ids: dict[str, str], out: Path) -> list[str]:
    from playwright.async_api import async_playwright

    taken: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(**chromium_launch_options())
        contexts: dict[tuple[int, int, bool], object] = {}

        async def page_for(shot: Shot):
            viewport = shot.viewport or DESKTOP
            key = (viewport["width"], viewport["height"], shot.signed_in)
            if key not in contexts:
                context = await browser.new_context(base_url=base_url, viewport=viewport)
                if shot.signed_in:
                    first = await context.new_page()
                    await sign_in(first, username, password)
                    await first.wait_for_url(re.compile(r"/console/$"))
                    await first.close()
                contexts[key] = context
            return await contexts[key].new_page()

        for shot in shots():
            page = await page_for(shot)
            try:
                answer = await page.goto(shot.path.format(**ids))
                if answer is None or answer.status == 404:
                    print(f"  {shot.name}: skipped, the console has no {shot.path} yet")
                    continue
                await page.wait_for_load_state("networkidle")
                await (shot.prepare or nothing)(page)
                target = out / f"{shot.name}.png"
                await page.screenshot(path=str(target), full_page=True)
                taken.append(target.name)
                print(f"  {shot.name}: {target.relative_to(REPO) if target.is_relative_to(REPO) else target}")
            finally:
                await page.close()
        await browser.close()
    return taken


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
