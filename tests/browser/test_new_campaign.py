"""New campaign in a real browser, on a whole stack: a CSV with invalid rows uploaded, its columns mapped, the
contacts checked (the invalid rows by reason, downloadable), the template written with a missing variable flagged
before the campaign exists, then the import report of the campaign made Ready; axe-core on each step and on the
report at a laptop's and a phone's width."""
from __future__ import annotations

import pytest

from tests.browser.campaigns_support import contacts_csv, phone_numbers
from tests.browser.conftest import VIEWPORTS

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]
expect = pytest.importorskip("playwright.async_api", reason="browser tests: playwright is not installed").expect


async def upload(page, name: str, csv: bytes, filename: str = "people.csv") -> None:
    """Step 1: details and file, from the campaigns list."""
    await page.goto("/console/campaigns")
    await page.get_by_role("link", name="New campaign").click()
    await page.get_by_label("Name").fill(name)
    await page.get_by_role("radio", name="SMS").check()
    await page.get_by_label("Contacts CSV").set_input_files(
        files=[{"name": filename, "mimeType": "text/csv", "buffer": csv}])
    await page.get_by_role("button", name="Upload and choose columns").click()
    await expect(page.get_by_role("heading", name=f"Columns of {filename}")).to_be_visible()


async def test_a_campaign_from_a_csv_with_invalid_rows(signed_in_page, api):
    page = await signed_in_page("campaigner")
    await upload(page, "Browser import", contacts_csv(phone_numbers(20), invalid=True))
    await expect(page.get_by_label("phone", exact=True)).to_have_value("destination")  # guessed from the name
    await page.get_by_role("button", name="Check the contacts").click()

    await expect(page.get_by_role("heading", name="Template for Browser import")).to_be_visible()
    await expect(page.locator("#valid-count")).to_have_text("20 valid")
    await expect(page.locator("#invalid-count")).to_have_text("2 invalid")
    reasons = page.get_by_role("table", name="Invalid rows by reason")
    await expect(reasons.get_by_role("row")).to_have_count(3)  # the header, and one row per reason
    async with page.expect_download() as downloading:
        await page.get_by_role("link", name="Download the invalid rows (CSV)").click()
    invalid_rows = (await (await downloading.value).path()).read_text()
    assert "12345" in invalid_rows and "Nobody" in invalid_rows and "Ada0" not in invalid_rows

    await page.get_by_label("Message text").fill("Hi {{first_name}}, see you {{day}}.")
    await expect(page.locator("#missing-variables")).to_contain_text("{{day}}")  # flagged before Ready
    await page.get_by_label("Message text").fill("Hi {{first_name}}, see you on Friday.")
    await expect(page.locator("#missing-variables")).to_contain_text("Every placeholder has a value")
    await expect(page.locator("#sms-meter")).to_contain_text("GSM-7")
    await page.get_by_label("The contacts consented to be contacted").check()
    await page.get_by_role("button", name="Create campaign").click()

    await expect(page.get_by_role("heading", name="Import report: Browser import")).to_be_visible()
    await expect(page.locator("#import-done")).to_contain_text("the campaign is Ready", timeout=60_000)
    await expect(page.locator("#valid-rows")).to_have_text("20")
    await expect(page.locator("#invalid-rows")).to_have_text("2")
    listed = (await api.get("/campaigns", params={"limit": 200})).json()["items"]
    made = next(c for c in listed if c["name"] == "Browser import")
    assert made["status"] == "ready" and made["counts"]["waiting"] == 20


@pytest.fixture(params=sorted(VIEWPORTS), ids=str)
def viewport(request) -> dict:
    return VIEWPORTS[request.param]


async def test_the_new_campaign_steps_and_the_import_report_pass_axe(signed_in_page, assert_accessible, viewport):
    name = f"Accessible import at {viewport['width']}"
    page = await signed_in_page("campaigner", viewport)
    await page.goto("/console/campaigns/new")
    await assert_accessible(page, "the New campaign form")
    await upload(page, name, contacts_csv(phone_numbers(3), invalid=True), "a.csv")
    await assert_accessible(page, "the columns step")
    await page.get_by_role("button", name="Check the contacts").click()
    await expect(page.get_by_role("heading", name=f"Template for {name}")).to_be_visible()
    await assert_accessible(page, "the template step")
    await page.get_by_label("The contacts consented to be contacted").check()
    await page.get_by_role("button", name="Create campaign").click()  # no text yet: refused, and said why
    await expect(page.get_by_role("alert")).to_contain_text("Message text")
    await assert_accessible(page, "the template step with its problem")
    await page.get_by_label("Message text").fill("Hi {{first_name}}")
    await page.get_by_label("The contacts consented to be contacted").check()
    await page.get_by_role("button", name="Create campaign").click()
    await expect(page.locator("#import-done")).to_be_visible(timeout=60_000)
    await assert_accessible(page, "the import report")
