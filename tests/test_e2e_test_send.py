"""Test send (SendTestMessage, issue 14) on a whole stack: every service a process, the API among them, the
provider simulator behind the real Twilio adapter. A test message reaches the simulator once, with the rendered
text; its answer is on outreach.campaign-events, nothing on outreach.message-status, and the campaign's counts do
not move; a recipient the provider says opted out is refused at once the next time, nothing sent; the sixth test
message of a user within the hour is refused (429); the console's form sends one as `user:NAME`, once however
often the form is sent, and refuses the operations role."""
from __future__ import annotations

import contextlib
import html
import json
import re
from collections.abc import AsyncIterator

import httpx
import pytest

from outreach.up import SERVICES
from services.api.store import ApiStore
from services.common.settings import Settings
from tests.conftest import async_wait_until
from tests.e2e_fixtures import api_client, console_as, hidden_value, stack_token
from tests.e2e_stack import simulator_submissions, stack_environment
from tests.e2e_support import sms_contacts

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

STACK_SERVICES = tuple(SERVICES)  # the API too: the route and the console are its
PASSWORD = "test send pass phrase"
TEMPLATE = {"body": "Hi {{first_name}}, spring is here"}
DELIVERED = "+14155550100"  # the simulator's fictional range, last digit 0: delivered
OPTED_OUT = "+15005550004"  # Twilio's test number of a recipient who replied STOP: refused 21610


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    return stack_environment(stack_bootstrap, tmp_path_factory.mktemp("test-send-data"))


@pytest.fixture(scope="module")
def people(env) -> dict[str, str]:
    names = {"campaigner": "tess", "operations": "oscar"}
    with ApiStore.open(Settings(data_dir=env["OUTREACH_DATA_DIR"], event_store=env["OUTREACH_EVENT_STORE"],
                                postgres_dsn=env["OUTREACH_POSTGRES_DSN"])) as store:
        for role, name in names.items():
            store.create_user(name, role, PASSWORD, created_by="cli:test")
    return names


@contextlib.asynccontextmanager
async def api_as(env: dict[str, str], name: str) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(env, stack_token(env, name, "campaigner")) as client:
        yield client


@pytest.fixture(scope="module")
async def campaign(env, stack) -> str:
    """A Ready SMS campaign of three contacts (rows 2, 3, 4: P0, P1, P2), made through the API."""
    lines = ["phone,first_name\n", *(f"{c['destination']},{c['variables']['name']}\n" for c in sms_contacts(3))]
    async with api_as(env, "maker") as api:
        created = await api.post("/campaigns", files={"contacts": ("people.csv", "".join(lines).encode(), "text/csv")},
                                 data={"name": "Test send", "channel": "sms", "consent_confirmed": "true",
                                       "template": json.dumps(TEMPLATE)})
        assert created.status_code == 202 and created.json()["state"] == "answered", created.text
        return created.json()["campaign_id"]


async def send_test(api: httpx.AsyncClient, campaign_id: str, destination: str, **body) -> dict:
    """POST test-send; once accepted, its outcome (waited for at GET /commands/ID if the route's wait ended first)."""
    response = await api.post(f"/campaigns/{campaign_id}/test-send", json={"destination": destination, **body})
    answer = response.json()
    if response.status_code != 202 or (answer["test_message"] or {}).get("outcome"):
        return {"status": response.status_code, **answer}

    async def completed() -> dict | None:
        later = (await api.get(f"/commands/{answer['command_id']}", params={"wait": 5})).json()
        return later if any(e["type"] == "TestMessageCompleted" for e in later["events"]) else None

    later = await async_wait_until(completed, 60, 0.2, message="the test message got no outcome")
    outcome = next(e for e in reversed(later["events"]) if e["type"] == "TestMessageCompleted")
    return {"status": 202, **answer, "events": later["events"],
            "test_message": {**(answer["test_message"] or {}), "outcome": outcome["outcome"],
                             "reason": outcome["reason"], "provider_code": outcome["provider_code"]}}


async def campaign_events(env: dict[str, str], campaign_id: str) -> list[dict]:
    async with api_as(env, "reader") as api:
        history = await api.get(f"/campaigns/{campaign_id}/history", params={"include_messages": "false"})
        assert history.status_code == 200, history.text
        return history.json()


async def published(tail, campaign_id: str, command_id: str) -> list[dict]:
    """What the topics hold once a test message's outcome is out: (its answers on outreach.campaign-events, every
    record of the campaign on outreach.message-status)."""
    await async_wait_until(lambda: any(e.get("type") == "TestMessageCompleted" for e in tail.answers(command_id)),
                           30, message="the test message's outcome is not on outreach.campaign-events")
    return tail.answers(command_id), tail.statuses(campaign_id)


async def test_a_test_message_reaches_the_provider_once_rendered_and_changes_nothing_of_the_campaign(env, campaign,
                                                                                                   tail):
    async with api_as(env, "ada") as api:
        before = (await api.get(f"/campaigns/{campaign}")).json()
        sent = await send_test(api, campaign, DELIVERED)
        assert sent["status"] == 202 and sent["state"] == "answered", sent
        message = sent["test_message"]
        assert (message["outcome"], message["destination"], message["preview"]) == (
            "accepted", DELIVERED, "Hi P0, spring is here")

        submissions = (await simulator_submissions(env))[message["message_id"]]
        assert [(s["destination"], s["body"], s["outcome"]) for s in submissions] == [
            (DELIVERED, "Hi P0, spring is here", "accepted")]

        events = await campaign_events(env, campaign)
        answers = [e for e in events if e["causation_id"] == sent["command_id"]]
        assert [e["type"] for e in answers] == ["TestMessageQueued", "TestMessageCompleted"]
        assert answers[0]["requested_by"] == "ada" and answers[0]["issued_via"] == "api"
        assert not any(e["type"] == "CampaignStatusChanged" and e["occurred_at"] >= answers[0]["occurred_at"]
                       for e in events)
        on_topic, statuses = await published(tail, campaign, sent["command_id"])
        assert [e["type"] for e in on_topic] == ["TestMessageQueued", "TestMessageCompleted"]
        assert [r["status"] for r in statuses] == ["waiting"] * 3  # nothing for analytics to count
        after = (await api.get(f"/campaigns/{campaign}")).json()
        assert (after["status"], after["counts"], after["message_count"]) == (
            before["status"], before["counts"], before["message_count"]) == ("ready", after["counts"], 3)

        row = await send_test(api, campaign, DELIVERED, row=4, variables={"first_name": "Tess"})
        assert row["test_message"]["preview"] == "Hi Tess, spring is here"
        wrong = await send_test(api, campaign, "ada@example.org")
        assert (wrong["status"], wrong["reason"]) == (422, "invalid_command")


async def test_a_recipient_who_opted_out_is_refused_and_not_sent_to(env, campaign):
    async with api_as(env, "olly") as api:
        first = await send_test(api, campaign, OPTED_OUT)
        assert (first["test_message"]["outcome"], first["test_message"]["provider_code"]) == ("opted_out", "21610")
        again = await send_test(api, campaign, OPTED_OUT)  # on the SMS opt-out list now: answered at once
        assert again["status"] == 202 and again["test_message"]["outcome"] == "opted_out"
        assert [e["type"] for e in again["events"]] == ["TestMessageCompleted"]
        submissions = await simulator_submissions(env)
        assert len(submissions[first["test_message"]["message_id"]]) == 1
        assert again["test_message"]["message_id"] not in submissions


async def test_the_sixth_test_message_of_a_user_within_the_hour_is_refused(env, campaign):
    async with api_as(env, "lim") as api:
        for n in range(5):
            sent = await send_test(api, campaign, DELIVERED, variables={"n": str(n)})
            assert sent["status"] == 202, sent
        refused = await send_test(api, campaign, DELIVERED)
        assert (refused["status"], refused["reason"], refused["state"]) == (429, "test_send_limit", "rejected")
        assert "5 test messages per hour per user" in refused["detail"]
    async with api_as(env, "other") as api:  # the limit is each user's
        assert (await send_test(api, campaign, DELIVERED))["status"] == 202




def text_of(page: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


async def test_the_console_form_sends_one_as_the_signed_in_person(env, campaign, people):
    path = f"/console/campaigns/{campaign}/test-send"
    async with console_as(env, people["campaigner"], PASSWORD) as console:
        form = await console.get(path)
        assert form.status_code == 200 and 'name="destination"' in form.text, form.text
        assert "At most 5 test messages per person per hour" in text_of(form.text)
        data = {"csrf_token": hidden_value(form.text, "csrf_token"), "form_key": hidden_value(form.text, "form_key"),
                "destination": "+14155550110", "row": "3"}
        sent = await console.post(path, data=data)
        assert sent.status_code == 200, sent.text
        assert "Sent: the provider accepted the test message to +14155550110." in text_of(sent.text)
        assert "Hi P1, spring is here" in text_of(sent.text)
        again = await console.post(path, data=data)  # the same form sent twice: one command, one message
        assert again.status_code == 200 and "Sent: the provider accepted" in text_of(again.text)
        events = await campaign_events(env, campaign)
        mine = [e for e in events if e["type"] == "TestMessageQueued" and e["requested_by"] == "user:tess"]
        assert len(mine) == 1 and mine[0]["row"] == 3
        assert len((await simulator_submissions(env))[mine[0]["message_id"]]) == 1

        refused = await console.post(path, data={**data, "form_key": "another", "destination": "not a number"})
        assert refused.status_code == 422 and "Not sent: destination is invalid_e164" in text_of(refused.text)
        no_csrf = await console.post(path, data={k: v for k, v in data.items() if k != "csrf_token"})
        assert no_csrf.status_code == 403
    async with console_as(env, people["operations"], PASSWORD) as console:
        assert (await console.get(path)).status_code == 403


async def test_no_test_message_ever_reaches_the_message_status_stream(env, campaign, tail):
    """Last: the delivery receipts of every test message above (signed callbacks through the webhook receiver to
    the handler, which knows them for test messages) changed nothing either."""
    events = await campaign_events(env, campaign)
    test_ids = {e["message_id"] for e in events if e["type"].startswith("TestMessage")}
    assert len(test_ids) >= 10 and test_ids <= {e["message_id"] for e in events if e["type"] == "TestMessageCompleted"}
    last = max((e for e in events if e["type"] == "TestMessageCompleted"), key=lambda e: e["sequence"])
    _, statuses = await published(tail, campaign, last["causation_id"])
    assert [r["status"] for r in statuses] == ["waiting"] * 3
    assert not test_ids & {r["message_id"] for r in tail.statuses()}
    async with api_as(env, "reader") as api:
        campaign_now = (await api.get(f"/campaigns/{campaign}")).json()
        assert (campaign_now["status"], campaign_now["counts"]["waiting"], campaign_now["counts"]["total"]) == (
            "ready", 3, 3)
