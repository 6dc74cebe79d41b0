"""Import (contract v1.1) on a real stack (the command handler, relay, projections and the HTTP API, each its own
process, over the real broker; OUTREACH_DEFAULT_REGION=US for all of them): a default-region import normalises
national and formatted numbers and counts the invalid ones (the API's check and the handler's answer agree), an
import's own region wins over the setting, an upstream AddContacts without one is read with the handler's
setting, a CSV without a valid row is refused by the API (422) and the CLI (exit 2) with nothing published, and a
campaign's CSV export imports again unchanged."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid

import httpx
import pytest

from schemas import topics
from tests.conftest import async_wait_until
from tests.e2e_fixtures import api_client, stack_token
from tests.e2e_stack import stack_environment

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

STACK_SERVICES = ("command-handler", "relay", "projections", "api")  # nothing is sent: no sender, no simulator
TAIL_TOPICS = (topics.CAMPAIGN_EVENTS, topics.COMMANDS)  # the commands too: to see what was (not) published


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    return stack_environment(stack_bootstrap, tmp_path_factory.mktemp("import-e2e-data"), OUTREACH_DEFAULT_REGION="US")


@pytest.fixture(scope="module")
def token(env) -> str:
    return stack_token(env, "ida", "campaigner")


@pytest.fixture
async def api(env, stack, token):
    async with api_client(env, token) as client:
        yield client


TEMPLATE = {"body": "Hi {{first_name}} ({{status}})"}
NATIONAL_CSV = (  # line numbers are the rows
    "phone,first_name,status\n"          # 1
    "(415) 555-0100,Ada,vip\n"           # 2 valid: +14155550100
    "+1 415-555-0101,-Bob,\n"            # 3 valid: +14155550101 (no status)
    '" +14155550102 ",@Cy,=x\n'          # 4 valid: +14155550102
    "4155550100,Dup,\n"                  # 5 duplicate_destination (row 2, once normalised)
    "555-0142,Local,\n"                  # 6 invalid_e164 (no area code)
    "12345,Bad,\n"                       # 7 invalid_e164
    ",Empty,\n"                          # 8 missing_destination
    "+14155550103,,\n"                   # 9 valid, as given (no first_name, no status)
)
NORMALISED = {2: "+14155550100", 3: "+14155550101", 4: "+14155550102", 9: "+14155550103"}
INVALID_REASONS = {"invalid_e164": {"count": 2, "first_rows": [6, 7]},
                   "duplicate_destination": {"count": 1, "first_rows": [5]},
                   "missing_destination": {"count": 1, "first_rows": [8]}}
MISSING_VARIABLES = [{"variable": "first_name", "count": 1, "first_rows": [9]},
                     {"variable": "status", "count": 2, "first_rows": [3, 9]}]


async def create(api: httpx.AsyncClient, csv_text: str, name: str, **form: str) -> httpx.Response:
    return await api.post("/campaigns", files={"contacts": ("c.csv", csv_text.encode(), "text/csv")}, data={
        "name": name, "channel": "sms", "template": json.dumps(TEMPLATE), "consent_confirmed": "true", **form})


async def answered(api: httpx.AsyncClient, accepted: dict) -> dict:
    """The create's answer with its events, fetched when the wait ran out before them."""
    if accepted["state"] == "pending":
        for field, command_id in (("events", accepted["command_id"]),
                                  ("contacts_events", accepted["contacts_command_ids"][-1])):
            response = await api.get(f"/commands/{command_id}", params={"wait": 30})
            assert response.status_code == 200, response.text
            accepted[field] = response.json()["events"]
    return accepted


async def messages(api: httpx.AsyncClient, campaign_id: str, count: int) -> list[dict]:
    """The campaign's messages in the read model, once it has all `count` of them."""
    async def page() -> list[dict] | None:
        items = (await api.get(f"/campaigns/{campaign_id}/messages", params={"limit": 1000})).json().get("items")
        return items if items is not None and len(items) == count else None

    return await async_wait_until(page, 30, message=f"{campaign_id}: never {count} messages in the read model")


def contacts_of(items: list[dict]) -> list[tuple[str, dict]]:
    return sorted((m["destination"], m["variables"]) for m in items)


def published_for(tail, campaign_id: str) -> list[dict]:
    return [v for v in tail.values(topics.COMMANDS) if isinstance(v, dict) and v.get("campaign_id") == campaign_id]


async def the_chunk(tail, campaign_id: str) -> dict:
    """The campaign's one AddContacts as published (once the tail has read it)."""
    chunks = await async_wait_until(lambda: [c for c in published_for(tail, campaign_id) if c["type"] == "AddContacts"],
                                    30, message=f"{campaign_id}: no AddContacts on {topics.COMMANDS}")
    assert len(chunks) == 1, chunks
    return chunks[0]


async def test_a_default_region_import_normalises_counts_invalids_and_its_export_imports_unchanged(api, tail):
    response = await create(api, NATIONAL_CSV, "national")  # no default_region: the API's setting (US)
    assert response.status_code == 202, response.text
    accepted = await answered(api, response.json())
    campaign_id = accepted["campaign_id"]
    # what the API's check found before publishing ...
    assert accepted["check"] == {"contacts": 8, "valid": 4, "invalid": 4, "default_region": "US",
                                 "invalid_reasons": INVALID_REASONS, "missing_variables": MISSING_VARIABLES}
    assert accepted["missing_variables"] == MISSING_VARIABLES
    # ... is what the handler answers, reading the cells with the region the chunk carries
    added, ready, _ = accepted["contacts_events"]
    assert (added["type"], added["valid"], added["invalid"]) == ("ContactsAdded", 4, 4)
    assert {r["row"]: r["reason"] for r in added["invalid_rows"]} == {
        5: "duplicate_destination", 6: "invalid_e164", 7: "invalid_e164", 8: "missing_destination"}
    assert ready["type"] == "CampaignReady" and ready["message_count"] == 4
    assert ready["summary"]["missing_variables"] == MISSING_VARIABLES
    chunk = await the_chunk(tail, campaign_id)
    assert chunk["default_region"] == "US" and chunk["contacts"][0]["destination"] == "(415) 555-0100"
    # stored and shown as E.164
    items = await messages(api, campaign_id, 4)
    assert {m["row"]: m["destination"] for m in items} == NORMALISED
    assert {m["row"]: m["variables"] for m in items}[4] == {"first_name": "@Cy", "status": "=x"}
    # a template update names the variables its contacts miss, with their rows (the handler's run summary)
    updated = await api.put(f"/campaigns/{campaign_id}/template",
                            json={"template": {"body": "{{first_name}}, {{city}}"}})
    assert updated.status_code == 202 and updated.json()["state"] == "answered", updated.text
    assert updated.json()["missing_variables"] == [{"variable": "first_name", "count": 1, "first_rows": [9]},
                                                   {"variable": "city", "count": 4, "first_rows": [2, 3, 4, 9]}]

    # The export (formula-guarded: '+1..., '-Bob, '@Cy, '=x) imports again unchanged, with no region needed.
    export = await api.get(f"/campaigns/{campaign_id}/messages.csv")
    assert export.status_code == 200 and "'+14155550100" in export.text and "'-Bob" in export.text
    again = await create(api, export.text, "re-imported", default_region="GB")  # E.164 cells: kept as given
    assert again.status_code == 202, again.text
    reimported = await answered(api, again.json())
    assert reimported["destination_column"] == "destination"
    assert set(reimported["variables"].values()) == {"first_name", "status"}  # not row, status... of the export
    assert reimported["check"]["valid"] == 4 and reimported["check"]["invalid"] == 0
    assert reimported["contacts_events"][0]["valid"] == 4
    copy = await messages(api, reimported["campaign_id"], 4)
    assert contacts_of(copy) == contacts_of(items)
    second_export = await api.get(f"/campaigns/{reimported['campaign_id']}/messages.csv")
    assert second_export.text.splitlines()[0] == export.text.splitlines()[0]


async def test_an_imports_own_region_wins_and_upstream_chunks_get_the_handlers(api, tail, commands):
    response = await create(api, "phone,first_name,status\n020 7946 0958,Gus,x\n(415) 555-0199,Al,y\n", "british",
                            default_region="GB")
    assert response.status_code == 202, response.text
    accepted = await answered(api, response.json())
    assert accepted["check"]["default_region"] == "GB" and accepted["check"]["valid"] == 2
    chunk = await the_chunk(tail, accepted["campaign_id"])
    assert chunk["default_region"] == "GB"
    items = await messages(api, accepted["campaign_id"], 2)
    assert sorted(m["destination"] for m in items) == ["+442079460958", "+444155550199"]  # read as British

    # An upstream system's AddContacts without a region: the handler reads it with OUTREACH_DEFAULT_REGION (US).
    campaign_id = str(uuid.uuid4())
    [created] = await commands.send("CreateCampaign", campaign_id, name="upstream", channel="sms",
                                    template={"body": "Hi"})
    assert created["type"] == "CampaignCreated"
    added, ready, _ = await commands.send("AddContacts", campaign_id, chunk_no=0, last_chunk=True, contacts=[
        {"row": 1, "destination": "(415) 555-0177", "variables": {}},
        {"row": 2, "destination": "+14155550177", "variables": {}},
        {"row": 3, "destination": "555-0177", "variables": {}}])
    assert (added["valid"], added["invalid"]) == (1, 2)
    assert {r["row"]: r["reason"] for r in added["invalid_rows"]} == {2: "duplicate_destination", 3: "invalid_e164"}
    assert [m["destination"] for m in await messages(api, campaign_id, 1)] == ["+14155550177"]


async def test_an_import_without_a_valid_row_is_refused_and_nothing_is_published(api, tail, env, tmp_path):
    invalid, empty, by_cli = names = [f"refused-{kind}-{uuid.uuid4()}" for kind in ("invalid", "empty", "cli")]
    response = await create(api, "phone,first_name\n555-0142,Local\n12,Bad\nabc,Text\n,Empty\n", invalid)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["reason"] == "no_valid_contacts" and "no valid contact among the CSV's 4 contacts" in body["detail"]
    assert body["check"]["valid"] == 0 and body["check"]["invalid_reasons"]["invalid_e164"]["first_rows"] == [2, 3, 4]
    assert "default region US" in body["detail"]
    response = await create(api, "phone,first_name\n", empty)
    assert response.status_code == 422 and "has no contact" in response.json()["detail"], response.text

    path = tmp_path / "invalid.csv"
    path.write_text("phone,first_name\n555-0142,Local\n12,Bad\n")
    done = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "outreach.cli", "campaign", "create", str(path), "--name", by_cli, "--channel", "sms",
        "--template-body", "Hi {{first_name}}", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no valid contact" in json.loads(done.stdout)["error"]

    # A create published now would reach the tail within this second (it reads the commands topic).
    marker = str(uuid.uuid4())
    response = await create(api, "phone\n+14155550150\n", f"marker-{marker}")
    assert response.status_code == 202
    await async_wait_until(lambda: any(isinstance(v, dict) and v.get("name") == f"marker-{marker}"
                                       for v in tail.values(topics.COMMANDS)), 30, message="the marker never came")
    await asyncio.sleep(0.5)  # the other partitions' records of that time too
    assert not [v for v in tail.values(topics.COMMANDS) if isinstance(v, dict) and v.get("name") in names]
    listed = (await api.get("/campaigns", params={"limit": 1000})).json()["items"]
    assert not [c for c in listed if c.get("name") in names]
