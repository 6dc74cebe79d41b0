"""The console's Campaigns screen on a whole stack (every service a process, the API among them), over real HTTP
with a signed-in person's session and CSRF token: campaigns made through the API appear in the list with the
actions their status allows; Run with three of the four confirmations is refused (422, nothing queued) and with
four it runs, recorded as user:NAME; a second SMS campaign is refused the busy channel, naming the campaign that
holds it; Stop cancels the queued messages; Resume (in the modal's fragment form) re-queues them; Retry failed
and Delete; operations is refused every campaign page. The browser tests drive the same pages in Chromium."""
from __future__ import annotations

import html
import json
import re

import httpx
import pytest

from outreach.up import SERVICES
from services.api.console.campaigns import FRAGMENT_HEADER, LOCATION_HEADER
from services.api.store import ApiStore
from services.common.settings import Settings
from tests.conftest import async_wait_until
from tests.e2e_fixtures import api_client, console_as, hidden_value, stack_token
from tests.e2e_stack import stack_environment
from tests.e2e_support import sms_contacts

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

STACK_SERVICES = tuple(SERVICES)  # the API too: the console is served by it
SIZE = 300  # at 20 SMS a second, a run of about 15 s: long enough to stop it with messages still queued
REFUSED = "+15005550001"  # the simulator refuses it: failed, invalid_destination (a bulk retry takes it)
PASSWORD = "console campaigns pass phrase"
FOUR_BOXES = ("consent", "content_compliance", "opt_out", "data_responsibility")
UNSETTLED = ("waiting", "queued", "sending", "sent", "retrying")


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    return stack_environment(stack_bootstrap, tmp_path_factory.mktemp("console-campaigns-data"),
                             OUTREACH_SMS_RATE="20")


@pytest.fixture(scope="module")
def people(env) -> dict[str, str]:
    """One console account per role that matters here, in the stack's own store: {role: username}."""
    names = {"campaigner": "carmen", "operations": "oscar"}
    with ApiStore.open(Settings(data_dir=env["OUTREACH_DATA_DIR"], event_store=env["OUTREACH_EVENT_STORE"],
                                postgres_dsn=env["OUTREACH_POSTGRES_DSN"])) as store:
        for role, name in names.items():
            store.create_user(name, role, PASSWORD, created_by="cli:test")
    return names


@pytest.fixture
async def api(env, stack):
    async with api_client(env, stack_token(env, "console-tests", "campaigner")) as client:
        yield client




def row_of(page: str, campaign_id: str) -> str:
    found = re.search(rf'<tr id="campaign-{campaign_id}".*?</tr>', page, re.S)
    assert found, page
    return found.group()


def actions_in(row: str) -> list[str]:
    return re.findall(r'data-action="([a-z_]+)"', row)


def text_of(page: str) -> str:
    """The page's words, tags and runs of white space dropped (assertions read what a person reads)."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


async def confirm(console: httpx.AsyncClient, campaign_id: str, action: str, fragment: bool = False,
                  **fields: str) -> httpx.Response:
    """Open ACTION's confirmation and send it, as its Run Campaign / Stop campaign / ... button does."""
    headers = {FRAGMENT_HEADER: "1"} if fragment else {}
    form = await console.get(f"/console/campaigns/{campaign_id}/{action}", headers=headers)
    assert form.status_code == 200 and 'id="confirm-form"' in form.text, form.text
    data = {"csrf_token": hidden_value(form.text, "csrf_token"), "form_key": hidden_value(form.text, "form_key"), **fields}
    return await console.post(f"/console/campaigns/{campaign_id}/{action}", data=data, headers=headers)


async def listed_row(console: httpx.AsyncClient, campaign_id: str, condition, message: str) -> str:
    """The campaign's row in the list, once `condition(row)` holds (the read model catches up)."""
    async def row() -> str | None:
        page = await console.get("/console/campaigns")
        assert page.status_code == 200, page.text
        found = row_of(page.text, campaign_id)
        return found if condition(found) else None

    return await async_wait_until(row, 60, 0.2, message=message)


async def create_sms_campaign(api: httpx.AsyncClient, name: str, size: int) -> str:
    lines = ["phone,first_name\n", *(f"{c['destination']},{c['variables']['name']}\n" for c in sms_contacts(size)),
             f"{REFUSED},Refused\n"]
    created = await api.post("/campaigns", files={"contacts": ("people.csv", "".join(lines).encode(), "text/csv")},
                             data={"name": name, "channel": "sms", "consent_confirmed": "true",
                                   "template": json.dumps({"body": "Hi {{first_name}}, spring is here"})})
    assert created.status_code == 202, created.text
    campaign_id = created.json()["campaign_id"]
    await campaign_when(api, campaign_id, lambda c: c["status"] == "ready" and c["counts"]["waiting"] == size + 1,
                        "the campaign never became ready in the read model")
    return campaign_id


async def campaign_when(api: httpx.AsyncClient, campaign_id: str, condition, message: str,
                        timeout_s: float = 90) -> dict:
    async def found() -> dict | None:
        response = await api.get(f"/campaigns/{campaign_id}")
        campaign = response.json() if response.status_code == 200 else None
        return campaign if campaign is not None and condition(campaign) else None

    return await async_wait_until(found, timeout_s, 0.2, message=message)


def settled(campaign: dict) -> bool:
    return campaign["final"] and not any(campaign["counts"][s] for s in UNSETTLED)


async def test_operations_is_refused_every_campaign_page(env, stack, api, people):
    campaign_id = await create_sms_campaign(api, "Not for operations", 2)
    async with console_as(env, people["operations"], PASSWORD) as console:
        for path in ("/console/campaigns", f"/console/campaigns/{campaign_id}/run",
                     f"/console/campaigns/{campaign_id}/messages/export.csv"):
            refused = await console.get(path)
            assert refused.status_code == 403 and "has no access to campaigns" in refused.text, path
        token = hidden_value((await console.get("/console/password")).text, "csrf_token")
        posted = await console.post(f"/console/campaigns/{campaign_id}/run",
                                    data={"csrf_token": token, **{box: "true" for box in FOUR_BOXES}})
        assert posted.status_code == 403
    ready = await campaign_when(api, campaign_id, lambda c: True, "the campaign is gone")
    assert ready["status"] == "ready" and ready["counts"]["queued"] == 0  # nothing was published


@pytest.mark.timeout(600)
async def test_a_campaigner_runs_stops_resumes_retries_and_deletes_from_the_list(env, stack, api, people):
    spring = await create_sms_campaign(api, "Spring sale", SIZE)
    other = await create_sms_campaign(api, "Second SMS", 3)
    async with console_as(env, people["campaigner"], PASSWORD) as console:
        # The list: both campaigns, Ready, with what a Ready campaign allows (no Stop, no Retry, no Export).
        page = await console.get("/console/campaigns")
        assert page.status_code == 200 and 'href="/console/campaigns/new"' in page.text
        row = row_of(page.text, spring)
        assert "Spring sale" in row and ">Ready<" in row and ">SMS<" in row and "Waiting <strong>301</strong>" in row
        assert actions_in(row) == ["edit", "run", "test_send", "delete"]
        assert page.text.index(f"campaign-{other}") < page.text.index(f"campaign-{spring}")  # newest first

        # The Run Campaign form: the summary, the phone preview of the first contact's message, four boxes.
        form = await console.get(f"/console/campaigns/{spring}/run")
        words = text_of(form.text)
        assert "Messages that will be sent 301" in words and "Hi P0, spring is here" in words
        assert "GSM-7" in words and len(re.findall(r'type="checkbox"[^>]* required data-disclaimer', form.text)) == 4
        assert "You have obtained appropriate consent from all recipients" in words

        # Three boxes of four: refused in plain words, the campaign stays Ready, nothing queued.
        three = await confirm(console, spring, "run", **{box: "true" for box in FOUR_BOXES[:3]})
        assert three.status_code == 422, three.text
        assert "All four confirmations are required to run a campaign. Nothing was queued or sent." in \
            text_of(three.text)
        assert 'id="confirm-form"' in three.text  # the form again, to tick the fourth
        still = await campaign_when(api, spring, lambda c: True, "the campaign is gone")
        assert still["status"] == "ready" and still["counts"]["waiting"] == SIZE + 1

        # Four boxes: it runs, as the signed-in person.
        run = await confirm(console, spring, "run", **{box: "true" for box in FOUR_BOXES})
        assert run.status_code == 303, run.text
        assert run.headers["location"].startswith(f"/console/campaigns?done=run&campaign={spring}&n=301")
        notice = text_of((await console.get(run.headers["location"])).text)
        assert "“Spring sale” is running: 301 messages queued." in notice
        history = (await api.get(f"/campaigns/{spring}/history", params={"include_messages": "false"})).json()
        started = next(r for r in history if r["type"] == "CampaignRunStarted")
        assert started["accepted_by"] == f"user:{people['campaigner']}"

        # The second SMS campaign: the channel is busy, and the answer names the campaign holding it.
        busy = await confirm(console, other, "run", **{box: "true" for box in FOUR_BOXES})
        assert busy.status_code == 409, busy.text
        assert "The channel is busy: campaign “Spring sale” (SMS) is running on it" in text_of(busy.text)
        assert (await campaign_when(api, other, lambda c: True, "gone"))["counts"]["queued"] == 0

        # Stop, while messages are still queued: the menu offers it, the confirmation counts them.
        await listed_row(console, spring, lambda r: "stop" in actions_in(r), "Stop was never offered")
        stop_form = text_of((await console.get(f"/console/campaigns/{spring}/stop")).text)
        assert "queued messages will be cancelled" in stop_form and "carry on" in stop_form
        stop = await confirm(console, spring, "stop", confirmed="true")
        assert stop.status_code == 303, stop.text
        cancelled = int(re.search(r"&n=([0-9]+)", stop.headers["location"]).group(1))
        assert cancelled > 0
        assert f"“Spring sale” is stopped: {cancelled} queued messages cancelled." in \
            text_of((await console.get(stop.headers["location"])).text)
        stopped = await campaign_when(api, spring, settled, "the stopped campaign never settled")
        assert stopped["stopped"] and stopped["stopped_by"] == f"user:{people['campaigner']}"
        assert stopped["counts"]["cancelled"] == cancelled
        row = await listed_row(console, spring, lambda r: "resume" in actions_in(r), "Resume was never offered")
        assert f"Stopped by user:{people['campaigner']}" in row and "stop" not in actions_in(row)

        # Resume, as the modal sends it: the fragment form, answered with where to go instead of a redirect.
        resume_form = await console.get(f"/console/campaigns/{spring}/resume", headers={FRAGMENT_HEADER: "1"})
        assert "<html" not in resume_form.text and f"<strong>{cancelled}</strong> cancelled" in resume_form.text
        resumed = await confirm(console, spring, "resume", fragment=True)
        assert resumed.status_code == 204, resumed.text
        assert resumed.headers[LOCATION_HEADER].startswith(f"/console/campaigns?done=resume&campaign={spring}")
        finished = await campaign_when(api, spring, lambda c: settled(c) and c["counts"]["cancelled"] == 0,
                                       "the resumed campaign never finished")
        assert finished["status"] == "complete_with_errors" and finished["counts"]["failed"] == 1

        # Retry failed: the one refused message, queued again (and refused again).
        row = await listed_row(console, spring, lambda r: "retry" in actions_in(r), "Retry was never offered")
        assert ">Complete (with errors)<" in row and "301 of 301 done" in row
        assert actions_in(row) == ["retry", "export", "delete"]
        retried = await confirm(console, spring, "retry")
        assert retried.status_code == 303 and "&n=1" in retried.headers["location"], retried.text
        async def failed_again() -> bool:  # in the retry's run (the third), not still from the one before
            failed = (await api.get(f"/campaigns/{spring}/messages", params={"status": "failed"})).json()["items"]
            return [m["run_no"] for m in failed] == [started["run_no"] + 2]

        await async_wait_until(failed_again, 60, 0.2, message="the retried message never failed again")
        await campaign_when(api, spring, settled, "the retry never finished")

        # The menu's export (the campaign view's, with the session); then Delete, for both.
        export = await console.get(f"/console/campaigns/{spring}/messages/export.csv")
        assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
        assert len(export.text.strip().splitlines()) == SIZE + 2
        for campaign_id in (spring, other):
            deleted = await confirm(console, campaign_id, "delete")
            assert deleted.status_code == 303, deleted.text
        row = await listed_row(console, other, lambda r: ">Deleted<" in r, "the deletion never showed")
        assert actions_in(row) == []
        gone = await console.get(f"/console/campaigns/{spring}/run")
        assert 'id="confirm-form"' not in gone.text and "does not apply to this campaign now" in gone.text
