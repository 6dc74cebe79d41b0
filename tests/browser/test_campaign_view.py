"""One campaign's view and its test send in a real browser, on a whole stack: the counts moving without a reload
while it runs (streamed, at least once a second) until it is final; its failed messages filtered by reason and
exported; one failed message retried, reaching the provider again; a test send reaching the provider simulator
while the campaign's counts stay as they were; axe-core on the view, a message, the history, the as-of view and
the test send at a laptop's and a phone's width."""
from __future__ import annotations

import csv
import io
import statistics

import pytest

from tests.browser.campaigns_support import (FINAL, REFUSED, campaign, channel_free, messages, phone_numbers,
                                             ready_campaign, wait_for_status)
from tests.browser.conftest import VIEWPORTS
from tests.conftest import async_wait_until
from tests.e2e_stack import simulator_submissions
from tests.e2e_support import ALL_TRUE

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]
expect = pytest.importorskip("playwright.async_api", reason="browser tests: playwright is not installed").expect

UNDELIVERABLE = "+15005550002"  # the simulator refuses it: failed, undeliverable
SIZE = 600  # at 100 SMS a second: a run of about six seconds, long enough to watch

# Each change of the delivered count as the page shows it: (ms since the page loaded, the count).
WATCH_DELIVERED = """() => {
  window.deliveredChanges = [];
  window.loadedOnce = true;  // gone if the page is reloaded
  const cell = document.querySelector('[data-count="delivered"]');
  new MutationObserver(() => window.deliveredChanges.push([performance.now(), Number(cell.textContent)]))
    .observe(cell, {childList: true, characterData: true, subtree: true});
}"""


@pytest.fixture(scope="module")
def finished(request):
    """The campaign the first test ran, for the tests that look at a final campaign."""
    return {}


async def test_the_counts_move_without_a_reload_until_the_campaign_is_final(signed_in_page, api, finished):
    campaign_id = await ready_campaign(api, "Watched", [*phone_numbers(SIZE, 9000), REFUSED, UNDELIVERABLE])
    await channel_free(api)
    page = await signed_in_page("campaigner")
    await page.goto(f"/console/campaigns/{campaign_id}")
    await expect(page.get_by_role("heading", name="Watched", exact=True)).to_be_visible()
    await expect(page.locator('[data-count="waiting"]')).to_have_text(str(SIZE + 2))
    await page.evaluate(WATCH_DELIVERED)

    run = await api.post(f"/campaigns/{campaign_id}/run", json={"disclaimer": ALL_TRUE})
    assert run.status_code == 202, run.text
    await expect(page.locator("[data-campaign-status]")).to_have_text("In Progress")
    await expect(page.locator("[data-live]")).to_have_text("Live")
    await expect(page.locator("[data-campaign-status]")).to_have_text("Complete (with errors)", timeout=120_000)
    await expect(page.locator("[data-live]")).to_have_text("Final")
    await expect(page.locator('[data-count="delivered"]')).to_have_text(str(SIZE))
    await expect(page.locator('[data-count="failed"]')).to_have_text("2")
    await expect(page.locator('[data-reason-count="invalid_destination"]')).to_have_text("1")
    await expect(page.locator('[data-reason-count="undeliverable"]')).to_have_text("1")
    await expect(page.locator("label[for=campaign-progress]")).to_have_text(f"{SIZE + 2} of {SIZE + 2} messages final")

    assert await page.evaluate("() => window.loadedOnce === true"), "the page was reloaded"
    changes = await page.evaluate("() => window.deliveredChanges")
    counts = [count for _, count in changes]
    assert len(changes) >= 3 and counts == sorted(counts) and counts[-1] == SIZE, changes
    gaps = [(b - a) / 1000 for (a, _), (b, _) in zip(changes, changes[1:])]
    print(f"live counts: {len(changes)} updates of the delivered count, gaps median {statistics.median(gaps):.2f} s, "
          f"longest {max(gaps):.2f} s")
    assert statistics.median(gaps) <= 1.0, gaps  # at least once a second while it runs
    finished["campaign_id"] = campaign_id


async def test_failed_messages_filtered_by_reason_exported_and_one_retried(signed_in_page, api, env, finished):
    if "campaign_id" not in finished:
        pytest.skip("needs the campaign the live counts test ran")
    campaign_id = finished["campaign_id"]
    page = await signed_in_page("campaigner")
    await page.goto(f"/console/campaigns/{campaign_id}")
    filters = page.get_by_role("search", name="Filter messages")
    await filters.get_by_label("Status").select_option(label="Failed")
    await filters.get_by_role("button", name="Filter").click()
    table = page.locator("#message-table tbody")
    await expect(table.get_by_role("row")).to_have_count(2)
    await filters.get_by_label("Reason").select_option(label="Invalid destination")
    await filters.get_by_role("button", name="Filter").click()
    await expect(table.get_by_role("row")).to_have_count(1)
    await expect(table.get_by_role("row")).to_contain_text(REFUSED)
    await expect(table.get_by_role("row")).to_contain_text("Invalid destination")

    async with page.expect_download() as downloading:
        await page.get_by_role("link", name="Export CSV (this filter)").click()
    exported = list(csv.DictReader(io.StringIO((await (await downloading.value).path()).read_text())))
    assert len(exported) == 1 and exported[0]["status"] == "failed", exported
    assert exported[0]["reason"] == "invalid_destination" and REFUSED in exported[0]["destination"]
    async with page.expect_download() as downloading:
        await page.get_by_role("link", name="Export all messages as CSV").click()
    assert len((await (await downloading.value).path()).read_text().splitlines()) == SIZE + 3  # and the header

    (failed,) = [m for m in await messages(api, campaign_id, "failed") if m["reason"] == "invalid_destination"]
    await table.get_by_role("link", name="Retry").click()
    await expect(page.get_by_role("heading", name=f"Retry the message to {REFUSED}")).to_be_visible()
    await page.get_by_role("button", name="Retry message").click()
    await expect(page.get_by_role("status")).to_contain_text("Retry")

    async def submitted_twice():
        return len((await simulator_submissions(env)).get(failed["message_id"], [])) == 2

    await async_wait_until(submitted_twice, 60, 0.3, message="the retried message did not reach the provider again")
    again = await wait_for_status(api, campaign_id, FINAL)
    assert again["counts"]["failed"] == 2 and again["counts"]["delivered"] == SIZE
    await page.get_by_role("link", name="The message's status history").click()
    await expect(page.get_by_role("heading", name=f"Message to {REFUSED}")).to_be_visible()


async def test_a_test_send_reaches_the_simulator_and_leaves_the_counts(signed_in_page, api, env):
    campaign_id = await ready_campaign(api, "Tried first", phone_numbers(4, 9700))
    before = (await campaign(api, campaign_id))["counts"]
    page = await signed_in_page("campaigner")
    await page.goto(f"/console/campaigns/{campaign_id}/test-send")
    await expect(page.get_by_role("heading", name="Test send")).to_be_visible()
    destination = "+14155550142"
    await page.get_by_label("Send to (phone number").fill(destination)
    await page.get_by_role("button", name="Send test message").click()
    outcome = page.get_by_role("status")
    await expect(outcome).to_contain_text(f"Sent: the provider accepted the test message to {destination}",
                                          timeout=30_000)
    await expect(outcome).to_contain_text("Hi Ada0")  # what was sent: filled from the first contact

    async def reached():
        entries = [e for log in (await simulator_submissions(env)).values() for e in log]
        return [e for e in entries if e["destination"] == destination and e["campaign_id"] == campaign_id]

    (submission,) = await async_wait_until(reached, 30, 0.3, message="the test message never reached the simulator")
    assert submission["channel"] == "sms"
    after = await campaign(api, campaign_id)
    assert after["status"] == "ready" and after["counts"] == before  # not one of the campaign's messages


# ---------------------------------------------------------------- accessibility

@pytest.fixture(params=sorted(VIEWPORTS), ids=str)
def viewport(request) -> dict:
    return VIEWPORTS[request.param]


async def test_the_campaign_view_and_its_pages_pass_axe(signed_in_page, api, assert_accessible, viewport, finished):
    if "campaign_id" not in finished:
        pytest.skip("needs the campaign the live counts test ran")
    campaign_id = finished["campaign_id"]
    page = await signed_in_page("org_admin", viewport)
    await page.goto(f"/console/campaigns/{campaign_id}?status=failed")
    await assert_accessible(page, "the campaign view, failed messages")
    await page.locator("#message-table tbody").get_by_role("link").first.click()
    await expect(page.locator("#message-title")).to_be_visible()
    await assert_accessible(page, "a message and its history")
    for path, what in (("history", "the campaign history"), ("as-of", "the campaign as of a time")):
        await page.goto(f"/console/campaigns/{campaign_id}/{path}")
        await assert_accessible(page, what)
    ready_id = await ready_campaign(api, f"Test send at {viewport['width']}", phone_numbers(2, 9800))
    await page.goto(f"/console/campaigns/{ready_id}")
    await assert_accessible(page, "a ready campaign's view")
    await page.goto(f"/console/campaigns/{ready_id}/test-send")
    await assert_accessible(page, "the test send form")
    for path in (f"/console/campaigns/{campaign_id}", f"/console/campaigns/{ready_id}/test-send"):
        await page.goto(path)
        overflow = await page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{path} scrolls sideways by {overflow}px at {viewport['width']}px"
