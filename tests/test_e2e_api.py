"""The HTTP API on a whole stack (every service a process, `api` among them, as `outreach up` runs it): a campaign
created from a CSV upload, answered with the handler's answer, run with the disclaimer (a disclaimer short of a
flag and an unknown campaign are answered 422 and 404 with their reasons) while a Server-Sent Events stream
reports progress up to the final status, then its messages, export, history, as-of view, a command rejected for
the campaign's state (409), and its deletion, all over HTTP."""
from __future__ import annotations

import asyncio
import csv
import io
import json
import uuid

import httpx
import pytest

from outreach.up import SERVICES
from tests.conftest import async_wait_until
from tests.e2e_fixtures import api_client, stack_token
from tests.e2e_stack import stack_environment
from tests.e2e_support import ALL_TRUE, sms_contacts

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

SIZE = 300  # at the contract's 100 SMS segments/s: a run of a few seconds, long enough to watch
REFUSED = "+15005550001"  # the simulator refuses it: failed, invalid_destination


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    return stack_environment(stack_bootstrap, tmp_path_factory.mktemp("api-e2e-data"))


STACK_SERVICES = tuple(SERVICES)  # the API too


@pytest.fixture(scope="module")
def token(env) -> str:
    return stack_token(env, "grace", "campaigner")


@pytest.fixture
async def api(env, stack, token):
    async with api_client(env, token) as client:
        yield client


def contacts_csv() -> bytes:
    lines = ["phone,first_name,note\n"]
    lines += [f"{c['destination']},{c['variables']['name']},n{c['row']}\n" for c in sms_contacts(SIZE)]
    lines += [f"{REFUSED},Refused,r\n", "12345,Bad,b\n", ",Empty,e\n"]  # one refused by the provider, two invalid
    return "".join(lines).encode()


async def answer(api: httpx.AsyncClient, command_id: str, wait_s: float = 30) -> dict:
    response = await api.get(f"/commands/{command_id}", params={"wait": wait_s})
    assert response.status_code == 200, response.text
    return response.json()


async def progress_events(api: httpx.AsyncClient, campaign_id: str, into: list[dict]) -> None:
    """Collects the `progress` events of the stream until the server ends it."""
    async with api.stream("GET", f"/campaigns/{campaign_id}/progress", timeout=120) as response:
        assert response.status_code == 200
        event, data = None, []
        async for line in response.aiter_lines():
            if line == "":
                if event == "progress" and data:
                    into.append(json.loads("\n".join(data)))
                event, data = None, []
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())


async def test_campaign_over_http_from_upload_to_history(api):
    created = await api.post("/campaigns", files={"contacts": ("people.csv", contacts_csv(), "text/csv")}, data={
        "name": "API e2e", "channel": "sms", "template": json.dumps({"body": "Hi {{first_name}}"}),
        "variables": json.dumps(["first_name"]), "consent_confirmed": "true"})
    assert created.status_code == 202, created.text
    accepted = created.json()
    campaign_id = accepted["campaign_id"]
    assert accepted["contacts"] == SIZE + 3 and accepted["destination_column"] == "phone"

    # The answer waits for the create's and the last chunk's answers (CampaignReady + the status change). A stack
    # just started may take longer than the wait (its consumer groups joining): then they are fetched.
    if accepted["state"] == "pending":
        accepted["events"] = (await answer(api, accepted["command_id"]))["events"]
        accepted["contacts_events"] = (await answer(api, accepted["contacts_command_ids"][-1]))["events"]
    assert [e["type"] for e in accepted["events"]] == ["CampaignCreated"]
    last_chunk = accepted["contacts_events"]
    assert [e["type"] for e in last_chunk] == ["ContactsAdded", "CampaignReady", "CampaignStatusChanged"]
    added = last_chunk[0]
    assert added["valid"] == SIZE + 1 and added["invalid"] == 2
    assert {r["reason"] for r in added["invalid_rows"]} == {"invalid_e164", "missing_destination"}

    campaign = await async_wait_until(
        lambda: _campaign_if(api, campaign_id, lambda c: c["status"] == "ready"
                             and c["counts"]["waiting"] == SIZE + 1), 30, message="never ready in the read model")
    assert campaign["summary"]["message_count"] == SIZE + 1
    ready_at = campaign["updated_at"]

    # Progress is watched from before the run to the end of the campaign.
    updates: list[dict] = []
    watcher = asyncio.create_task(progress_events(api, campaign_id, updates))
    await async_wait_until(lambda: updates, 30, message="no first progress event")
    # Rejected by the handler within the wait, answered with the reason: three flags of four (422), a campaign that
    # does not exist (404, whatever the disclaimer says: the contract's order of reasons).
    short = await api.post(f"/campaigns/{campaign_id}/run", json={"disclaimer": {**ALL_TRUE, "opt_out": False}})
    assert short.status_code == 422, short.text
    assert short.json()["reason"] == "disclaimer_not_accepted" and short.json()["state"] == "rejected"
    assert short.json()["campaign_id"] == campaign_id and short.json()["command_type"] == "RunCampaign"
    unknown_id = str(uuid.uuid4())
    unknown = await api.post(f"/campaigns/{unknown_id}/run", json={"disclaimer": {"consent": True}})
    assert unknown.status_code == 404 and unknown.json()["reason"] == "unknown_campaign", unknown.text
    assert (await answer(api, unknown.json()["command_id"]))["state"] == "rejected"  # kept, as every answer
    run = await api.post(f"/campaigns/{campaign_id}/run", json={"disclaimer": ALL_TRUE})
    assert run.status_code == 202, run.text
    run_answer = run.json()
    assert run_answer["state"] == "answered", run_answer  # accepted within the wait, with its answer
    assert [e["type"] for e in run_answer["events"]] == ["CampaignRunStarted", "CampaignStatusChanged"]
    assert run_answer["events"][0]["accepted_by"] == "grace"  # the token's principal
    await asyncio.wait_for(watcher, 120)  # the server ends the stream after the final status

    assert updates[0]["status"] == "ready"
    final = updates[-1]
    assert final["final"] and final["status"] == "complete_with_errors"
    assert final["counts"]["delivered"] == SIZE and final["counts"]["failed"] == 1, final
    during = [u for u in updates if u["status"] == "in_progress"]
    assert len(during) >= 2, updates  # several updates while messages were being sent
    finished = [u["counts"]["delivered"] + u["counts"]["failed"] for u in during]
    assert finished == sorted(finished) and finished[0] < SIZE + 1
    assert all(a != b for a, b in zip(updates, updates[1:]))

    # Messages, filters and export.
    failed = (await api.get(f"/campaigns/{campaign_id}/messages", params={"status": "failed"})).json()
    assert failed["total"] == 1
    assert failed["items"][0]["destination"] == REFUSED and failed["items"][0]["reason"] == "invalid_destination"
    assert failed["items"][0]["row"] == SIZE + 2 and failed["items"][0]["variables"] == {"first_name": "Refused"}
    export = await api.get(f"/campaigns/{campaign_id}/messages.csv")
    table = list(csv.reader(io.StringIO(export.text)))
    assert len(table) == SIZE + 2 and table[0][-1] == "first_name"
    assert {row[3] for row in table[1:]} == {"delivered", "failed"}

    # The ordered history, and the campaign as it stood when it became ready.
    history = (await api.get(f"/campaigns/{campaign_id}/history")).json()
    types = [r["type"] for r in history]
    assert types[0] == "CampaignCreated" and "CampaignRunStarted" in types
    assert types.index("CampaignReady") < types.index("CampaignRunStarted")
    assert [r["occurred_at"] for r in history] == sorted(r["occurred_at"] for r in history)
    started = next(r for r in history if r["type"] == "CampaignRunStarted")
    assert started["accepted_by"] == "grace" and started["disclaimer"] == ALL_TRUE
    assert sum(1 for r in history if r["type"] == "MessageStatusChanged" and r["status"] == "delivered") == SIZE
    then = (await api.get(f"/campaigns/{campaign_id}", params={"as_of": ready_at})).json()
    assert then["status"] == "ready" and then["counts"]["waiting"] == SIZE + 1
    messages_then = (await api.get(f"/campaigns/{campaign_id}/messages",
                                   params={"as_of": ready_at, "status": "waiting"})).json()
    assert messages_then["total"] == SIZE + 1

    # A command the campaign's state refuses (409), then the deletion.
    stop = await api.post(f"/campaigns/{campaign_id}/stop", json={"confirmed": True})
    assert stop.status_code == 409 and stop.json()["reason"] == "campaign_not_running", stop.text
    assert stop.json()["events"][0]["type"] == "CommandRejected"
    deleted = await api.delete(f"/campaigns/{campaign_id}")
    assert deleted.status_code == 202 and deleted.json()["state"] == "answered", deleted.text
    assert [e["type"] for e in deleted.json()["events"]] == ["CampaignDeleted", "CampaignStatusChanged"]
    await async_wait_until(lambda: _campaign_if(api, campaign_id, lambda c: c["status"] == "deleted"), 30)


async def _campaign_if(api: httpx.AsyncClient, campaign_id: str, condition) -> dict | None:
    response = await api.get(f"/campaigns/{campaign_id}")
    if response.status_code != 200:
        return None
    campaign = response.json()
    return campaign if condition(campaign) else None


async def test_two_api_processes_share_the_port_and_the_tokens(api, stack, token):
    """A second API instance (the same port, SO_REUSEPORT; tokens and settings in PostgreSQL) keeps answering
    the same client, with the same token, when the first one is killed."""
    stack.start_service("api", 1)
    try:
        await async_wait_until(lambda: "HTTP API on" in (stack.log_dir / "api-1.log").read_text(errors="replace"),
                               30, message="the second API did not start")
        stack.kill("api", 0)
        async def answers() -> bool:
            try:
                return (await api.get("/campaigns")).status_code == 200
            except httpx.TransportError:  # a connection the dead process had
                return False
        await async_wait_until(answers, 30, 0.2, message="the second API did not answer")
        for _ in range(5):  # every request now reaches the second process, which knows the token
            assert (await api.get("/campaigns")).status_code == 200
    finally:
        stack.kill("api", 1)
        stack.start_service("api", 0)
