"""Opt-outs by hand (issue 14) on a whole stack: every service a process, the API among them, the provider simulator
behind the real Twilio adapter. A destination added by hand over the HTTP API reaches the command handler through
outreach.internal.opt-outs and the read model through the relay's outreach.internal.opt-out-list: the list shows
it with who added it, a run leaves its message out (opted_out) and a test send to it is refused; an admin may not
remove it (403), an org admin not without a reason (422), with one it is removed and a test send reaches the
provider again; the audit log has both changes. The console lists, searches, adds and removes as the signed-in
person."""
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
from tests.e2e_fixtures import api_client, console_as, stack_token
from tests.e2e_stack import simulator_submissions, stack_environment
from tests.e2e_support import ALL_TRUE, FINAL_MESSAGE_STATUSES

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

STACK_SERVICES = tuple(SERVICES)  # the API too: the routes and the console are its
PASSWORD = "opt-outs pass phrase"
# The simulator's fictional range, last digit 0: delivered (when not opted out).
KEPT, OPTED_OUT, BY_CONSOLE = "+14155550100", "+14155550110", "+14155550120"


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    return stack_environment(stack_bootstrap, tmp_path_factory.mktemp("opt-outs-data"))


def store_of(env: dict[str, str]) -> ApiStore:
    return ApiStore.open(Settings(data_dir=env["OUTREACH_DATA_DIR"], event_store=env["OUTREACH_EVENT_STORE"],
                                  postgres_dsn=env["OUTREACH_POSTGRES_DSN"]))


@pytest.fixture(scope="module")
def people(env) -> dict[str, str]:
    names = {"campaigner": "cora", "org_admin": "orla"}
    with store_of(env) as store:
        for role, name in names.items():
            store.create_user(name, role, PASSWORD, created_by="cli:test")
    return names


@contextlib.asynccontextmanager
async def api_as(env: dict[str, str], name: str, role: str = "campaigner") -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(env, stack_token(env, name, role)) as client:
        yield client


async def ready_campaign(env: dict[str, str], *phones: str) -> str:
    csv = "phone,first_name\n" + "".join(f"{phone},P{n}\n" for n, phone in enumerate(phones))
    async with api_as(env, "maker") as api:
        created = await api.post("/campaigns", files={"contacts": ("people.csv", csv.encode(), "text/csv")},
                                 data={"name": "Opt-outs", "channel": "sms", "consent_confirmed": "true",
                                       "template": json.dumps({"body": "Hi {{first_name}}"})})
        assert created.status_code == 202 and created.json()["state"] == "answered", created.text
        return created.json()["campaign_id"]


async def listed(api: httpx.AsyncClient, destination: str) -> list[dict]:
    page = await api.get("/opt-outs", params={"channel": "sms", "q": destination})
    assert page.status_code == 200, page.text
    return [e for e in page.json()["items"] if e["destination"] == destination]


async def outcome_of_test_send(api: httpx.AsyncClient, campaign_id: str, destination: str) -> str:
    """The outcome of a test send to `destination` (waited for at GET /commands/ID if the route's wait ended first)."""
    answer = (await api.post(f"/campaigns/{campaign_id}/test-send", json={"destination": destination})).json()
    if (answer.get("test_message") or {}).get("outcome"):
        return answer["test_message"]["outcome"]

    async def completed() -> str | None:
        later = (await api.get(f"/commands/{answer['command_id']}", params={"wait": 5})).json()
        return next((e["outcome"] for e in reversed(later["events"]) if e["type"] == "TestMessageCompleted"), None)

    return await async_wait_until(completed, 60, 0.2, message="the test message got no outcome")


async def test_an_opt_out_added_by_hand_is_obeyed_listed_removed_by_an_org_admin_with_a_reason_and_audited(env, stack):
    campaign = await ready_campaign(env, KEPT, OPTED_OUT)
    async with api_as(env, "carl") as carl, api_as(env, "adam", "admin") as adam, \
            api_as(env, "olga", "org_admin") as olga:
        added = await carl.post("/opt-outs", json={"channel": "sms", "destination": OPTED_OUT})
        assert added.status_code == 202, added.text
        # On the list as the read model shows it (the relay's outreach.internal.opt-out-list), with who added it.
        [entry] = await async_wait_until(lambda: listed(carl, OPTED_OUT), 30, 0.2,
                                         message="the opt-out never showed on the list")
        assert (entry["opted_out"], entry["source"], entry["issued_by"]) == (True, "manual", "carl")

        # The handler obeys it: a test send is refused, a run leaves its message out.
        assert await outcome_of_test_send(carl, campaign, OPTED_OUT) == "opted_out"
        run = await carl.post(f"/campaigns/{campaign}/run", json={"disclaimer": ALL_TRUE})
        assert run.status_code == 202, run.text
        started = next(e for e in run.json()["events"] if e["type"] == "CampaignRunStarted")
        assert (started["message_count"], started["suppressed_count"]) == (1, 1)

        async def messages() -> dict[str, str] | None:
            page = (await carl.get(f"/campaigns/{campaign}/messages")).json()
            statuses = {m["destination"]: m["status"] for m in page["items"]}
            return statuses if statuses.get(KEPT) in FINAL_MESSAGE_STATUSES else None

        statuses = await async_wait_until(messages, 60, 0.2, message="the campaign's other message never ended")
        assert statuses[KEPT] == "delivered"
        assert statuses[OPTED_OUT] == "opted_out"

        # Removal: only an org admin, only with a reason.
        refused = await adam.post("/opt-outs/remove", json={"channel": "sms", "destination": OPTED_OUT,
                                                             "reason": "asked"})
        assert refused.status_code == 403, refused.text
        unexplained = await olga.post("/opt-outs/remove", json={"channel": "sms", "destination": OPTED_OUT})
        assert unexplained.status_code == 422, unexplained.text
        removed = await olga.post("/opt-outs/remove", json={"channel": "sms", "destination": OPTED_OUT,
                                                             "reason": "asked by phone for the news again"})
        assert removed.status_code == 202, removed.text
        await async_wait_until(lambda: _not_listed(carl, OPTED_OUT), 30, 0.2, message="the removal never showed")
        assert await outcome_of_test_send(olga, campaign, OPTED_OUT) == "accepted"  # sendable again
        sent = await simulator_submissions(env)
        assert any(s["destination"] == OPTED_OUT for submissions in sent.values() for s in submissions)

    with store_of(env) as store:
        audit = [(e.actor, e.action, e.detail) for e in store.audit_log(subject=f"sms:{OPTED_OUT}")]
    assert audit == [("olga", "opt_out_removed", "asked by phone for the news again"), ("carl", "opt_out_added", "")]


async def _not_listed(api: httpx.AsyncClient, destination: str) -> bool:
    return not await listed(api, destination)


def hidden(page: str, name: str, form_id: str | None = None) -> str:
    if form_id is not None:
        page = page.split(f'id="{form_id}"', 1)[1].split("</form>", 1)[0]
    found = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert found, page
    return html.unescape(found.group(1))


def rows(page: str) -> list[str]:
    table = page.split('id="opt-outs-table"', 1)[1].split("</table>", 1)[0]
    return [html.unescape(d) for d in re.findall(r'<tr data-destination="([^"]+)"', table)]


def text_of(page: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


async def test_the_console_lists_searches_adds_and_removes_as_the_signed_in_person(env, stack, people):
    async with console_as(env, people["campaigner"], PASSWORD) as cora:
        page = await cora.get("/console/opt-outs", params={"channel": "sms"})
        assert page.status_code == 200 and "Search destination" in page.text
        fields = {name: hidden(page.text, name, "add-opt-out") for name in ("csrf_token", "form_key", "channel")}
        added = await cora.post("/console/opt-outs", data={**fields, "destination": BY_CONSOLE})
        assert added.status_code == 200, added.text

        async def shown() -> str | None:
            found = await cora.get("/console/opt-outs", params={"channel": "sms", "q": BY_CONSOLE[-4:]})
            return found.text if BY_CONSOLE in rows(found.text) else None

        found = await async_wait_until(shown, 30, 0.2, message="the console never listed the opt-out")
        assert f"{BY_CONSOLE} added by hand by user:cora" in text_of(found)
        assert "/opt-outs/remove" not in found  # a campaigner removes nothing
        assert (await cora.get("/console/opt-outs/remove", params={"channel": "sms", "destination": BY_CONSOLE})
                ).status_code == 403

    async with console_as(env, people["org_admin"], PASSWORD) as orla:
        confirm = await orla.get("/console/opt-outs/remove", params={"channel": "sms", "destination": BY_CONSOLE})
        assert confirm.status_code == 200 and "Reason" in confirm.text and "Remove opt-out" in confirm.text
        fields = {name: hidden(confirm.text, name, "remove-opt-out")
                  for name in ("csrf_token", "form_key", "channel", "destination")}
        blank = await orla.post("/console/opt-outs/remove", data={**fields, "reason": ""})
        assert blank.status_code == 422 and "Say why" in text_of(blank.text)
        removed = await orla.post("/console/opt-outs/remove", data={**fields, "reason": "a typo when adding"})
        assert removed.status_code == 200, removed.text

        async def gone() -> bool:
            found = await orla.get("/console/opt-outs", params={"channel": "sms", "q": BY_CONSOLE})
            return BY_CONSOLE not in rows(found.text)

        await async_wait_until(gone, 30, 0.2, message="the console still lists the removed opt-out")
        audit = text_of((await orla.get("/console/audit")).text)
        assert f"user:orla Opt-out removed sms:{BY_CONSOLE} a typo when adding" in audit
        assert f"user:cora Opt-out added by hand sms:{BY_CONSOLE}" in audit
