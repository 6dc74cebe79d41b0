"""The Opt-outs screen in a real browser, on a whole stack: a person adds a destination by its labelled form, finds it
by searching, and an org admin removes it through the confirmation with its required reason, each checked through
the HTTP API; axe-core on the list with entries, and on the confirmation, at a laptop's and a phone's width, with
no sideways scroll for a long address."""
from __future__ import annotations

import uuid

import pytest

from tests.browser.conftest import VIEWPORTS
from tests.conftest import async_wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]
expect = pytest.importorskip("playwright.async_api", reason="browser tests: playwright is not installed").expect


async def on_list(api, channel: str, destination: str) -> bool:
    page = (await api.get("/opt-outs", params={"channel": channel, "q": destination})).json()
    return any(e["destination"] == destination for e in page["items"])


async def test_a_person_adds_finds_and_an_org_admin_removes_an_opt_out(signed_in_page, api):
    number = f"+1202555{uuid.uuid4().int % 10_000:04d}"
    page = await signed_in_page("org_admin")
    await page.goto("/console/opt-outs?channel=sms")
    await page.get_by_label("Destination", exact=True).fill(number)
    await page.get_by_role("button", name="Add opt-out").click()
    await expect(page.get_by_role("status")).to_contain_text(f"{number} is on the opt-out list")
    assert await on_list(api, "sms", number)

    await page.get_by_label("Search destination").fill(number[-4:])
    await page.get_by_role("button", name="Search").click()
    row = page.locator(f'#opt-outs-table tr[data-destination="{number}"]')
    await expect(row).to_contain_text("added by hand by user:")
    await row.get_by_role("link", name=f"Remove {number}").click()
    remove = page.get_by_role("button", name="Remove opt-out")
    await remove.click()  # the reason is required: the browser keeps the form
    await expect(page.get_by_role("heading", name="Remove an opt-out")).to_be_visible()
    assert await on_list(api, "sms", number)
    await page.get_by_label("Reason").fill("they asked for the newsletter again")
    await remove.click()
    await expect(page.get_by_role("status")).to_contain_text(f"{number} is off the opt-out list")
    await async_wait_until(lambda: _gone(api, number), 30, 0.2, message="the removal never showed in the API")


async def _gone(api, number: str) -> bool:
    return not await on_list(api, "sms", number)


@pytest.fixture(params=sorted(VIEWPORTS), ids=str)
def viewport(request) -> dict:
    return VIEWPORTS[request.param]


async def test_the_opt_out_screens_pass_axe(signed_in_page, api, assert_accessible, viewport):
    address = f"a.rather.long.local.part.{uuid.uuid4().hex}@subdomain.of.a.long.example.org"
    added = await api.post("/opt-outs", json={"channel": "email", "destination": address})
    assert added.status_code == 202, added.text
    await async_wait_until(lambda: on_list(api, "email", address), 30, 0.2, message="the opt-out never showed")
    page = await signed_in_page("org_admin", viewport)
    for path, what in (("/console/opt-outs?channel=email", "the email opt-out list"),
                       (f"/console/opt-outs?channel=email&q={address[:20]}", "a search of it")):
        answer = await page.goto(path)
        assert answer.status == 200
        await expect(page.locator(f'#opt-outs-table tr[data-destination="{address}"]')).to_be_visible()
        await assert_accessible(page, what)
        overflow = await page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{what} scrolls sideways by {overflow}px at {viewport['width']}px"
    await page.get_by_role("link", name=f"Remove {address}").click()
    await expect(page.get_by_label("Reason")).to_be_visible()
    await assert_accessible(page, "the removal's confirmation")
