"""The campaigns list in a real browser, on a whole stack: the Run Campaign modal (Run disabled until the four boxes
are ticked; closing it queues nothing; running from it), Stop on a running campaign cancelling only its queued
messages, Retry failed reaching the provider again, what each role may see, and axe-core on the list, its action
menu and its modals at a laptop's and a phone's width. Each action is done in the browser as a person would, and
checked through the HTTP API and the provider simulator."""
from __future__ import annotations

import re

import pytest

from tests.browser.campaigns_support import (FINAL, REFUSED, campaign, channel_free, history_types, messages,
                                             open_action, phone_numbers, ready_campaign, row_of, wait_for_status)
from tests.browser.conftest import VIEWPORTS
from tests.conftest import async_wait_until
from tests.e2e_stack import simulator_submissions
from tests.e2e_support import ALL_TRUE

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]
expect = pytest.importorskip("playwright.async_api", reason="browser tests: playwright is not installed").expect


# ---------------------------------------------------------------- run

async def test_the_run_modal_runs_only_with_the_four_boxes_ticked(signed_in_page, api, assert_accessible):
    campaign_id = await ready_campaign(api, "Run modal", phone_numbers(30, 1000))
    await channel_free(api)
    page = await signed_in_page("campaigner")
    await page.goto("/console/campaigns")

    dialog = await open_action(page, "Run modal", "Run")
    await expect(dialog.get_by_role("heading", name="Run Campaign")).to_be_visible()
    await expect(dialog.locator("#run-message-count")).to_have_text("30")
    await expect(dialog.locator("#sms-preview")).to_contain_text("Hi Ada0")
    run = dialog.get_by_role("button", name="Run Campaign")
    boxes = dialog.get_by_role("checkbox")
    await expect(boxes).to_have_count(4)
    for index in range(4):
        await expect(run).to_be_disabled()
        await boxes.nth(index).check()
    await expect(run).to_be_enabled()
    await boxes.nth(2).uncheck()
    await expect(run).to_be_disabled()
    await assert_accessible(page, "the Run Campaign modal")

    await dialog.get_by_role("link", name="Cancel").click()  # closing queues nothing
    await expect(dialog).to_be_hidden()
    await expect(page.get_by_role("button", name="Actions for Run modal")).to_be_focused()  # focus goes back
    dialog = await open_action(page, "Run modal", "Run")
    await expect(dialog.get_by_role("checkbox").first).to_be_checked(checked=False)  # a fresh form every time
    await page.keyboard.press("Escape")
    await expect(dialog).to_be_hidden()
    assert (await campaign(api, campaign_id))["status"] == "ready"
    assert "CampaignRunStarted" not in await history_types(api, campaign_id)

    dialog = await open_action(page, "Run modal", "Run")
    for index in range(4):
        await dialog.get_by_role("checkbox").nth(index).check()
    await dialog.get_by_role("button", name="Run Campaign").click()
    await expect(page.get_by_role("status")).to_contain_text(re.compile(r"Run modal.? is running: 30 messages queued"))
    started = await wait_for_status(api, campaign_id, {"in_progress", *FINAL}, 30)
    assert started["status"] != "ready"
    history = (await api.get(f"/campaigns/{campaign_id}/history")).json()
    run_started = next(r for r in history if r["type"] == "CampaignRunStarted")
    assert run_started["disclaimer"] == ALL_TRUE and run_started["accepted_by"].startswith("user:")
    await wait_for_status(api, campaign_id, FINAL)


# ---------------------------------------------------------------- stop

async def test_stop_cancels_only_the_queued_messages(signed_in_page, api, env, assert_accessible):
    campaign_id = await ready_campaign(api, "Stop me", phone_numbers(3000, 2000))  # 30 s at 100 a second
    await channel_free(api)
    page = await signed_in_page("admin")
    run = await api.post(f"/campaigns/{campaign_id}/run", json={"disclaimer": ALL_TRUE})
    assert run.status_code == 202, run.text

    async def some_delivered():
        counts = (await campaign(api, campaign_id))["counts"]
        return counts["delivered"] > 0 and counts["queued"] > 0

    await async_wait_until(some_delivered, 60, 0.2, message="never part-way through")
    await page.goto("/console/campaigns")
    dialog = await open_action(page, "Stop me", "Stop")
    await expect(dialog.get_by_role("heading", name="Stop campaign")).to_be_visible()
    await expect(dialog.locator("#stop-queued")).to_contain_text("queued messages will be cancelled")
    await expect(dialog.locator("#stop-carry-on")).to_contain_text("not affected")
    await assert_accessible(page, "the Stop campaign modal")
    await dialog.get_by_role("button", name="Stop campaign").click()
    notice = page.get_by_role("status")
    await expect(notice).to_contain_text(re.compile(r"Stop me.? is stopped: \d+ queued messages cancelled"))
    said = int(re.search(r"stopped: (\d+) queued", await notice.text_content()).group(1))

    final = await wait_for_status(api, campaign_id, FINAL, 120)
    counts = final["counts"]
    assert counts["cancelled"] == said > 0
    assert counts["delivered"] > 0 and counts["queued"] == 0 and counts["sending"] == 0
    assert counts["cancelled"] + counts["delivered"] + counts["failed"] + counts["opted_out"] == 3000, counts
    # Only queued messages were cancelled: none of them had been handed to the provider.
    cancelled = {m["message_id"] for m in await messages(api, campaign_id, "cancelled")}
    assert len(cancelled) == said and not cancelled & set(await simulator_submissions(env))
    await page.reload()
    await expect(row_of(page, campaign_id).locator(".badge.stopped")).to_contain_text("Stopped by")
    # Resume is offered once it no longer holds its channel: its modal, checked and closed (nothing issued).
    dialog = await open_action(page, "Stop me", "Resume")
    await expect(dialog.get_by_role("heading", name="Resume campaign")).to_be_visible()
    await assert_accessible(page, "the Resume campaign modal")
    await page.keyboard.press("Escape")
    await expect(dialog).to_be_hidden()
    assert (await campaign(api, campaign_id))["counts"]["cancelled"] == said


# ---------------------------------------------------------------- retry

async def test_retry_failed_sends_the_failed_message_again(signed_in_page, api, env, assert_accessible):
    campaign_id = await ready_campaign(api, "Retry me", [*phone_numbers(5, 6000), REFUSED])
    await channel_free(api)
    run = await api.post(f"/campaigns/{campaign_id}/run", json={"disclaimer": ALL_TRUE})
    assert run.status_code == 202, run.text
    done = await wait_for_status(api, campaign_id, {"complete_with_errors"})
    assert done["counts"]["failed"] == 1
    (failed,) = await messages(api, campaign_id, "failed")
    assert failed["reason"] == "invalid_destination"

    page = await signed_in_page("campaigner")
    await page.goto("/console/campaigns")
    dialog = await open_action(page, "Retry me", "Retry failed")
    await expect(dialog.locator("#retry-count")).to_contain_text("1 failed message will be queued again")
    await assert_accessible(page, "the Retry failed modal")
    await dialog.get_by_role("button", name="Retry failed messages").click()
    await expect(page.get_by_role("status")).to_contain_text(re.compile(r"Retry me.?: 1 failed messages queued again"))

    async def submitted_twice():
        return len((await simulator_submissions(env)).get(failed["message_id"], [])) == 2

    await async_wait_until(submitted_twice, 60, 0.3, message="the failed message did not reach the provider again")
    again = await wait_for_status(api, campaign_id, {"complete_with_errors"})
    assert again["counts"]["failed"] == 1 and again["counts"]["delivered"] == 5  # refused again, the rest untouched


# ---------------------------------------------------------------- roles

SECTION_LINKS = ("Campaigns", "Opt-outs", "Users", "Settings", "Audit log", "Operations")
SECTION_PATHS = dict(zip(SECTION_LINKS, ("/console/campaigns", "/console/opt-outs", "/console/users",
                                         "/console/settings", "/console/audit", "/console/operations")))
# The product's roles: org admin everything; admin no channel settings; campaigner campaigns and opt-outs;
# operations the operational views only, nothing of campaigns.
ROLE_SECTIONS = {"org_admin": set(SECTION_LINKS), "admin": {"Campaigns", "Opt-outs", "Users", "Audit log"},
                 "campaigner": {"Campaigns", "Opt-outs"}, "operations": {"Operations"}}


@pytest.mark.parametrize("role", sorted(ROLE_SECTIONS))
async def test_each_role_sees_only_what_it_may(signed_in_page, api, role):
    page = await signed_in_page(role)
    shown = await page.get_by_role("navigation", name="Sections").get_by_role("link").all_text_contents()
    assert set(shown) == ROLE_SECTIONS[role]
    for section in SECTION_LINKS:
        answer = await page.goto(SECTION_PATHS[section])
        if section in ROLE_SECTIONS[role]:
            assert answer.status == 200, f"{role} on {section}: {answer.status}"
        else:
            assert answer.status == 403, f"{role} reached {section}: {answer.status}"
            await expect(page.get_by_role("alert")).to_contain_text("role")
    if "Campaigns" not in ROLE_SECTIONS[role]:
        campaign_id = await ready_campaign(api, f"Not for {role}", phone_numbers(2, 8000))
        for path in (f"/console/campaigns/{campaign_id}", f"/console/campaigns/{campaign_id}/run",
                     f"/console/campaigns/{campaign_id}/messages.csv", "/console/campaigns/new"):
            answer = await page.goto(path) if not path.endswith(".csv") else await page.request.get(path)
            assert answer.status in (403, 404), f"{role} reached {path}: {answer.status}"


# ---------------------------------------------------------------- accessibility

@pytest.fixture(params=sorted(VIEWPORTS), ids=str)
def viewport(request) -> dict:
    return VIEWPORTS[request.param]


async def test_the_campaign_screens_pass_axe(signed_in_page, api, assert_accessible, viewport):
    name = f"Accessible at {viewport['width']}"
    campaign_id = await ready_campaign(api, name, phone_numbers(3, 7000))
    page = await signed_in_page("org_admin", viewport)
    await page.goto("/console/campaigns")
    await assert_accessible(page, "the campaigns list")
    await page.get_by_role("button", name=f"Actions for {name}").click()
    await expect(page.get_by_role("menu", name=f"Actions for {name}")).to_be_visible()
    await assert_accessible(page, "the campaigns list with an action menu open")
    await page.keyboard.press("Escape")
    for action, heading in (("Run", "Run Campaign"), ("Delete", "Delete campaign")):
        dialog = await open_action(page, name, action)
        await expect(dialog.get_by_role("heading", name=heading)).to_be_visible()
        await assert_accessible(page, f"the {heading} modal")
        await page.keyboard.press("Escape")
        await expect(dialog).to_be_hidden()
    await page.goto(f"/console/campaigns/{campaign_id}/run")  # the modal's page, without JavaScript's dialog
    await assert_accessible(page, "the Run Campaign page")
    await page.goto(f"/console/campaigns/{campaign_id}/edit")
    await expect(page.get_by_role("button", name="Save template")).to_be_visible()
    await assert_accessible(page, "the Edit template page")


async def test_the_people_and_operations_screens_pass_axe(signed_in_page, assert_accessible, viewport):
    page = await signed_in_page("org_admin", viewport)
    for section in ("Users", "Settings", "Audit log", "Operations", "Opt-outs"):
        answer = await page.goto(SECTION_PATHS[section])
        assert answer.status == 200, f"{section}: {answer.status}"
        await assert_accessible(page, f"the {section} screen")
        overflow = await page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{section} scrolls sideways by {overflow}px at {viewport['width']}px"
