"""The CLI run as a subprocess from an unrelated folder against a running stack (issue 13, item 5): the operator
makes a token (local, on the stack's store), the user signs in with it from elsewhere, then lists campaigns,
creates one from a CSV, runs it and watches it to the end, all through the HTTP API; the audit trail names the
token's principal, the commands carry `issued_via: "api"`, and no `var/` appears in that folder."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from outreach.up import SERVICES
from schemas import topics
from tests.conftest import async_wait_until
from tests.e2e_fixtures import api_client
from tests.e2e_stack import stack_environment
from tests.e2e_support import sms_contacts

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

STACK_SERVICES = tuple(SERVICES)  # the API too
TAIL_TOPICS = (topics.COMMANDS, topics.CAMPAIGN_EVENTS)
SIZE = 20


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    return stack_environment(stack_bootstrap, tmp_path_factory.mktemp("cli-e2e-data"))


def cli(args: list[str], env: dict[str, str], cwd, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "outreach.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def user_environment(home) -> dict[str, str]:
    """A user's shell elsewhere: none of the stack's settings (no data folder, no read model, no store), a
    config folder of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTREACH_", "KAFKA_"))}
    env.update({"XDG_CONFIG_HOME": str(home / "config"), "XDG_STATE_HOME": str(home / "state")})
    env.pop("PYTHONPATH", None)  # the installed package, as a user has it
    return env


async def test_the_cli_from_another_folder_runs_a_campaign_as_the_tokens_principal(env, stack, tail, tmp_path):
    # The operator's bootstrap: local, with the stack's settings.
    made = await asyncio.to_thread(cli, ["token", "create", "casey", "--role", "campaigner", "--json"], env,
                                   tmp_path)
    assert made.returncode == 0, made.stdout + made.stderr
    token = json.loads(made.stdout)["token"]
    async with api_client(env, token):
        pass  # the API answers

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    user = user_environment(tmp_path)
    url = f"http://127.0.0.1:{env['OUTREACH_API_PORT']}"
    signed = await asyncio.to_thread(cli, ["login", "--url", url, "--token", token], user, elsewhere)
    assert signed.returncode == 0, signed.stdout + signed.stderr

    csv_path = elsewhere / "contacts.csv"
    csv_path.write_text("phone,name\n" + "".join(f"{c['destination']},{c['variables']['name']}\n"
                                                  for c in sms_contacts(SIZE)) + "12345,Bad\n")
    created = await asyncio.to_thread(cli, ["campaign", "create", "contacts.csv", "--name", "From elsewhere",
                                            "--channel", "sms", "--template-body", "Hi {{name}}", "--json"],
                                      user, elsewhere)
    assert created.returncode == 0, created.stdout + created.stderr
    out = json.loads(created.stdout)
    campaign_id = out["campaign_id"]
    assert (out["valid"], out["invalid"], out["ready"], out["message_count"]) == (SIZE, 1, True, SIZE)

    async def listed() -> bool:
        done = await asyncio.to_thread(cli, ["campaign", "list", "--json"], user, elsewhere)
        assert done.returncode == 0, done.stdout + done.stderr
        return any(c["campaign_id"] == campaign_id and c["status"] == "ready" for c in json.loads(done.stdout))

    await async_wait_until(listed, 60, 0.5, message="the campaign is not listed as ready")

    ran = await asyncio.to_thread(cli, ["campaign", "run", campaign_id, "--accept-disclaimer", "--json"], user,
                                  elsewhere)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    started = next(e for e in json.loads(ran.stdout)["events"] if e["type"] == "CampaignRunStarted")
    assert started["accepted_by"] == "casey"  # the token's principal

    watched = await asyncio.to_thread(cli, ["campaign", "show", campaign_id, "--watch", "--json"], user, elsewhere)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    final = json.loads(watched.stdout)
    assert final["status"] == "complete" and final["counts"]["delivered"] == SIZE

    history = await asyncio.to_thread(cli, ["campaign", "events", campaign_id, "--no-messages", "--json"], user,
                                      elsewhere)
    assert history.returncode == 0, history.stdout + history.stderr
    events = json.loads(history.stdout)
    assert next(e for e in events if e["type"] == "CampaignCreated")["created_by"] == "casey"
    assert next(e for e in events if e["type"] == "CampaignRunStarted")["accepted_by"] == "casey"
    # The history itself says the commands came through the API (an auditor need not read the commands topic).
    assert {e.get("issued_via") for e in events if e["type"] in ("CampaignCreated", "CampaignRunStarted")} == {"api"}

    commands = [v for v in tail.values(topics.COMMANDS) if isinstance(v, dict) and v.get("campaign_id") == campaign_id]
    assert {c["type"] for c in commands} == {"CreateCampaign", "AddContacts", "RunCampaign"}
    assert all(c["issued_by"] == "casey" and c["issued_via"] == "api" for c in commands)

    malformed = await asyncio.to_thread(cli, ["campaign", "show", campaign_id.upper()], user, elsewhere, 30)
    assert malformed.returncode == 2, malformed.stdout + malformed.stderr
    assert not (elsewhere / "var").exists()  # nothing written where the CLI ran but the CSV
    assert sorted(p.name for p in elsewhere.iterdir()) == ["contacts.csv"]
