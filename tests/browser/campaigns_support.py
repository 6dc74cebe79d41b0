"""What the browser tests of the campaign screens share: campaigns made through the HTTP API (faster than the
New campaign steps, which have a test of their own), waits on a campaign's status, its messages, and the
action menu (⋮) of the campaigns list as a person opens it."""
from __future__ import annotations

import csv
import io
import json

import httpx

from tests.conftest import async_wait_until

REFUSED = "+15005550001"  # the simulator refuses it: failed, invalid_destination
FINAL = {"complete", "complete_with_errors", "failed"}


def phone_numbers(count: int, start: int = 0) -> list[str]:
    return [f"+1{200 + (start + i) % 800}555{(start + i) // 800:04d}" for i in range(count)]


def contacts_csv(numbers: list[str], invalid: bool = False) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["phone", "first_name"])
    writer.writerows([number, f"Ada{i}"] for i, number in enumerate(numbers))
    if invalid:
        writer.writerows([["12345", "Short"], ["", "Nobody"]])
    return out.getvalue().encode()


async def campaign(api: httpx.AsyncClient, campaign_id: str) -> dict:
    response = await api.get(f"/campaigns/{campaign_id}")
    assert response.status_code == 200, response.text
    return response.json()


async def wait_for_status(api: httpx.AsyncClient, campaign_id: str, statuses: set[str], timeout_s: float = 120):
    async def reached():
        response = await api.get(f"/campaigns/{campaign_id}")
        return response.status_code == 200 and response.json()["status"] in statuses and response.json()

    return await async_wait_until(reached, timeout_s, 0.2, message=f"{campaign_id} never reached {statuses}")


async def ready_campaign(api: httpx.AsyncClient, name: str, numbers: list[str]) -> str:
    created = await api.post("/campaigns", files={"contacts": ("c.csv", contacts_csv(numbers), "text/csv")}, data={
        "name": name, "channel": "sms", "template": json.dumps({"body": "Hi {{first_name}}"}),
        "variables": json.dumps(["first_name"]), "consent_confirmed": "true"})
    assert created.status_code == 202, created.text
    campaign_id = created.json()["campaign_id"]
    await wait_for_status(api, campaign_id, {"ready"}, 60)
    return campaign_id


async def channel_free(api: httpx.AsyncClient) -> None:
    """One SMS campaign runs at a time: wait until none of the earlier tests' holds the channel."""
    async def free():
        listed = (await api.get("/campaigns", params={"limit": 200})).json()["items"]
        return not any(c["status"] in ("in_progress", "active_retries") for c in listed)

    await async_wait_until(free, 180, 0.5, message="an earlier campaign still holds the SMS channel")


async def history_types(api: httpx.AsyncClient, campaign_id: str) -> list[str]:
    return [record["type"] for record in (await api.get(f"/campaigns/{campaign_id}/history")).json()]


async def open_action(page, campaign_name: str, action: str):
    """The row's action menu (⋮), then one of its items; the confirmation dialog it opens, if any."""
    await page.get_by_role("button", name=f"Actions for {campaign_name}").click()
    await page.get_by_role("menuitem", name=action, exact=True).click()
    return page.get_by_role("dialog")


def row_of(page, campaign_id: str):
    return page.locator(f"#campaign-{campaign_id}")


async def messages(api: httpx.AsyncClient, campaign_id: str, status: str) -> list[dict]:
    found: list[dict] = []
    while True:
        page = (await api.get(f"/campaigns/{campaign_id}/messages",
                              params={"status": status, "limit": 500, "offset": len(found)})).json()
        found += page["items"]
        if not page["items"] or len(found) >= page["total"]:
            return found
