"""Channel settings set over the HTTP API take effect on a whole stack (every service a process, the API
among them): the provider simulator takes only the credentials an org_admin sets, not the environment's.
Wrong SMS credentials make a campaign fail with setup_error; the right ones deliver the next campaign
(its receipts come back through the webhook receiver, which now verifies with the new auth token); a
callback signed with the environment's token is then refused; the wrong ones again fail the next one."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from outreach.up import SERVICES, Stack
from services.common.settings import Settings
from services.common.webhook_signatures import TWILIO_SIGNATURE_HEADER, twilio_signature
from tests.conftest import async_wait_until
from tests.e2e_fixtures import api_client, stack_token
from tests.e2e_stack import stack_environment
from tests.e2e_support import ALL_TRUE

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

STACK_SERVICES = tuple(SERVICES)  # the API too
RIGHT = {"account_sid": "ACe2e00000000000000000000000000001", "auth_token": "e2e-right-auth-token-0123",
         "messaging_service_sid": "MGe2e00000000000000000000000000001"}
WRONG = {**RIGHT, "auth_token": "e2e-wrong-auth-token-4567"}


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    return stack_environment(stack_bootstrap, tmp_path_factory.mktemp("channel-settings-e2e-data"))


# The simulator (the provider) knows only RIGHT; every other service starts with the environment's (default)
# Twilio credentials.
STACK_SERVICE_ENV = {"simulator": {"OUTREACH_TWILIO_ACCOUNT_SID": RIGHT["account_sid"],
                                   "OUTREACH_TWILIO_AUTH_TOKEN": RIGHT["auth_token"],
                                   "OUTREACH_TWILIO_MESSAGING_SERVICE_SID": RIGHT["messaging_service_sid"]}}


@pytest.fixture(scope="module")
def token(env) -> str:
    return stack_token(env, "olga", "org_admin")


@pytest.fixture
async def api(env, stack, token):
    async with api_client(env, token) as client:
        yield client


def log_count(stack: Stack, service: str, text: str) -> int:
    path = stack.log_dir / f"{service}.log"
    return path.read_text(errors="replace").count(text) if path.exists() else 0


async def put_sms_settings(api: httpx.AsyncClient, stack: Stack, credentials: dict, applied_before: int) -> None:
    """PUT, then wait until the sender and the webhook receiver say they applied it."""
    response = await api.put("/settings/channels/sms", json={"provider": "twilio", "credentials": credentials})
    assert response.status_code == 200, response.text
    assert response.json()["applied_to_sender"] is True
    await async_wait_until(lambda: log_count(stack, "sender", "sms now sends through") > applied_before
                           and log_count(stack, "webhooks", "sms callbacks verified with") > applied_before,
                           30, message="the sender or the webhook receiver did not apply the settings")


async def sms_campaign(api: httpx.AsyncClient, name: str, size: int) -> dict:
    """Create, run and wait for the final status of an SMS campaign of `size` deliverable numbers."""
    contacts = "phone\n" + "".join(f"+1202555{3000 + row:04d}\n" for row in range(size))
    created = await api.post("/campaigns", files={"contacts": ("c.csv", contacts.encode(), "text/csv")}, data={
        "name": name, "channel": "sms", "template": json.dumps({"body": "Hello"}), "variables": "[]",
        "consent_confirmed": "true"})
    assert created.status_code == 202, created.text
    campaign_id = created.json()["campaign_id"]

    async def campaign_if(condition) -> dict | None:
        response = await api.get(f"/campaigns/{campaign_id}")
        return response.json() if response.status_code == 200 and condition(response.json()) else None

    await async_wait_until(lambda: campaign_if(lambda c: c["status"] == "ready"), 30, message="never ready")
    run = await api.post(f"/campaigns/{campaign_id}/run", json={"disclaimer": ALL_TRUE})
    assert run.status_code == 202, run.text
    return await async_wait_until(lambda: campaign_if(lambda c: c["status"] not in ("ready", "in_progress")), 60,
                                  message="the campaign never ended")


async def test_channel_settings_set_over_the_api_take_effect(api, stack, env):
    started = time.monotonic()
    await put_sms_settings(api, stack, WRONG, 0)
    failed = await sms_campaign(api, "wrong credentials", 3)
    assert failed["status"] == "failed", failed
    messages = (await api.get(f"/campaigns/{failed['campaign_id']}/messages")).json()
    assert {(m["status"], m["reason"]) for m in messages["items"]} == {("failed", "setup_error")}

    await put_sms_settings(api, stack, RIGHT, 1)
    delivered = await sms_campaign(api, "right credentials", 3)
    # Delivered: the simulator took the submissions, and its receipts, signed with RIGHT's token, passed
    # the webhook receiver.
    assert delivered["status"] == "complete" and delivered["counts"]["delivered"] == 3, delivered

    webhook = f"http://127.0.0.1:{env['OUTREACH_WEBHOOK_PORT']}"
    form = {"From": "+12025550100", "To": "+12025550199", "Body": "hello", "MessageSid": "SM" + "0" * 32}
    async with httpx.AsyncClient(base_url=webhook, timeout=30) as client:
        for auth_token, expected in ((RIGHT["auth_token"], 200), (Settings().twilio_auth_token.get_secret_value(), 403)):
            signature = twilio_signature(auth_token, f"{webhook}/twilio/inbound", form)
            response = await client.post("/twilio/inbound", data=form, headers={TWILIO_SIGNATURE_HEADER: signature})
            assert response.status_code == expected, (auth_token, response.text)

    # And back: the wrong ones again fail the next campaign (the running services follow every change).
    await put_sms_settings(api, stack, WRONG, 2)
    assert (await sms_campaign(api, "wrong again", 2))["status"] == "failed"
    assert time.monotonic() - started < 60
