"""The HTTP API matches its OpenAPI document: schemathesis, with every check, a fixed seed and a bounded number of
cases, drives the app in-process (ASGI) while the commands it publishes go through the real broker to the real
command handler, relay and projections, each its own process, so the answers the write routes wait for are real.

    .venv/bin/python -m pytest tests/test_api_schemathesis.py -q -s     # -s prints the number of cases

The event stream (`/progress`, Server-Sent Events) and the long poll (`GET /commands/{id}?wait=`) are left out;
tests/test_api.py and tests/test_e2e_api.py test them. The module's last test checks how many cases ran.

How it is wired: `@schema.parametrize()` needs the schema when the module is collected (the coverage phase builds
its cases then), before any fixture has started the broker and the stack. So the schema is the app's OpenAPI
document, made without starting anything, and the cases reach the live app, which a fixture builds, through
`LIVE`, an ASGI app that forwards to it. (`schemathesis.pytest.from_fixture` would load the schema from a fixture,
but schemathesis 4.32 cannot run it on pytest 9.2: it sets `Function._nodeid`, which pytest 9.2 no longer has.)
"""
from __future__ import annotations

import base64

import json
from collections import Counter
from typing import Any

import pytest
import schemathesis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from schemathesis.python import asgi

from services.api.app import create_app
from services.api.store import ApiStore
from services.common.settings import Settings
from tests.e2e_stack import stack_environment

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

STACK_SERVICES = ("command-handler", "relay", "projections")  # what answers commands; the API runs in-process
SEED = 20260105
MAX_EXAMPLES = 25  # fuzzing cases per operation and mode; the examples and coverage phases add theirs, bounded too
MIN_CASES = 1000  # the run must not shrink unnoticed

CONFIG = schemathesis.Config.from_dict({
    "seed": SEED,
    "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
    "checks": {"enabled": True},  # every check schemathesis has
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True}},
})

STAND_IN = b"Bearer stand-in-for-the-live-token"


class LiveApp:
    """The ASGI app the cases reach: the API built by the `live_api` fixture (its lifespan starts on first use).

    Cases carry a stand-in token (the coverage phase builds its cases when the module is collected, before the
    token exists), which this swaps for the live org_admin token; any other Authorization goes through as sent."""

    app: Any = None
    token: str | None = None

    async def __call__(self, scope, receive, send) -> None:
        assert self.app is not None, "the live_api fixture builds the app"
        if scope["type"] == "http":
            live = f"Bearer {self.token}".encode()
            scope = {**scope, "headers": [(name, live if name == b"authorization" and value == STAND_IN else value)
                                          for name, value in scope["headers"]]}
        await self.app(scope, receive, send)


LIVE = LiveApp()
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi(), config=CONFIG)
schema.app = LIVE
schema = (schema.exclude(path_regex=r"/progress$")  # Server-Sent Events
          .exclude(path="/commands/{command_id}"))  # the long poll


@schema.auth()
class Bearer:
    """Every case acts as an org_admin, whom every route is open to (no token and a wrong one are checks too)."""

    def get(self, case, ctx) -> bytes:
        return STAND_IN

    def set(self, case, value: bytes, ctx) -> None:
        case.headers = {**(case.headers or {}), "Authorization": value.decode()}


# POST /campaigns: what a CSV upload needs beyond what a JSON Schema can state (a CSV file, and a template for the
# campaign's channel; the destination column and variables must name columns of that CSV), as a client that reads
# the route's documentation sends it. Only positive cases are completed so; negative ones go as generated.
UPLOAD_CSV = {"sms": "phone,first_name\n+15555550100,Ada\n+15555550101,Bob\n",
              "email": "email,first_name\nada@example.org,Ada\n"}
UPLOAD_TEMPLATE = {"sms": {"body": "Hi {{first_name}}"},
                   "email": {"subject": "Hi", "html": "<p>Hi {{first_name}}</p>", "from_email": "team@example.org",
                             "from_name": "Team"}}


@schema.hook
def map_case(context, case):
    if (context.operation is None or context.operation.label != "POST /campaigns" or case.meta is None
            or not case.meta.generation.mode.is_positive or not isinstance(case.body, dict)
            or case.body.get("channel") not in UPLOAD_CSV):
        return case
    channel = case.body["channel"]
    body = {key: value for key, value in case.body.items() if key not in ("destination_column", "variables")}
    case.body = {**body, "contacts": UPLOAD_CSV[channel], "template": json.dumps(UPLOAD_TEMPLATE[channel])}
    return case


STATUSES: Counter = Counter()  # (operation, status) -> cases


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    return stack_environment(stack_bootstrap, tmp_path_factory.mktemp("api-schemathesis-data"))


@pytest.fixture(scope="module")
def live_api(env, stack):
    # Secrets of its own: a schema-valid body naming a real provider is then accepted (safe_defaults refuses
    # real endpoints only while a secret keeps its public development value).
    settings = Settings(kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"], event_store=env["OUTREACH_EVENT_STORE"],
                        postgres_dsn=env["OUTREACH_POSTGRES_DSN"], data_dir=env["OUTREACH_DATA_DIR"],
                        unsubscribe_secret="schemathesis-unsubscribe-secret", twilio_auth_token="schemathesis-token",
                        sendgrid_webhook_public_key=_verification_key())
    with ApiStore.open(settings) as store:
        LIVE.token = store.create_token("schemathesis", "org_admin")[0]
    LIVE.app = create_app(settings)  # waits the contract's 5 s for each command's answer
    yield LIVE
    asgi.shutdown_lifespans()  # the app's producer and stores close before the stack and the broker stop
    LIVE.app = LIVE.token = None


def _verification_key() -> str:
    """A SendGrid Event Webhook verification key of this test's own (base64 DER of an ECDSA P-256 public key)."""
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return base64.b64encode(key.public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)).decode()


@schema.parametrize()
def test_the_api_matches_its_openapi_document(case, live_api):
    response = case.call_and_validate()
    STATUSES[case.operation.label, response.status_code] += 1


def test_schemathesis_ran_enough_cases():
    cases = sum(STATUSES.values())
    print(f"\nschemathesis ran {cases} cases: " + ", ".join(
        f"{operation} {status}: {count}" for (operation, status), count in sorted(STATUSES.items())))
    assert cases >= MIN_CASES, STATUSES
    # The commands went to the handler and back: campaigns were created (202 answered), commands of unknown
    # campaigns rejected 404.
    assert STATUSES["POST /campaigns", 202] and STATUSES["POST /campaigns/{campaign_id}/run", 404], STATUSES
