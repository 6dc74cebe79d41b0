"""`Idempotency-Key` on the command endpoints, over real HTTP to the session's broker: a retried request
publishes the same command_id (read back from `outreach.commands`), so the command handler's rule ("a
command_id seen before has no new effect") makes the retry harmless; the records read back are then fed to
the real command handler to see that rule hold for a retried CSV upload."""
from __future__ import annotations

import json
import uuid

import httpx
import pytest

from schemas import topics
from schemas.commands import parse_command
from services.api.app import BackgroundServer, create_app
from services.api.store import ApiStore
from services.common import ids, jsoncodec, kafka
from services.common.settings import Settings
from tests.conftest import async_wait_until
from tests.e2e_support import Tail

ALL_TRUE = {"consent": True, "content_compliance": True, "opt_out": True, "data_responsibility": True}


@pytest.fixture(scope="module")
def settings(tmp_path_factory, kafka_bootstrap) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("api-idempotency"), kafka_bootstrap_servers=kafka_bootstrap)


@pytest.fixture(scope="module")
def tokens(settings) -> dict[str, str]:
    with ApiStore.open(settings) as store:
        return {"ada": store.create_token("ada", "admin")[0], "bob": store.create_token("bob", "campaigner")[0],
                # a second token of the same principal (a rotated token): the same principal, the same ids
                "ada-again": store.create_token("ada", "campaigner")[0]}


@pytest.fixture(scope="module")
def server(settings, tokens):
    with BackgroundServer(create_app(settings, answer_wait_s=0)) as running:  # no handler here: 202 pending at once
        yield running


@pytest.fixture(scope="module")
async def commands_tail(settings):
    tail = await Tail(settings, topics.COMMANDS).start()
    yield tail
    await tail.stop()


@pytest.fixture
async def clients(server, tokens):
    opened = {name: httpx.AsyncClient(base_url=server.url, timeout=60,
                                      headers={"Authorization": f"Bearer {token}"})
              for name, token in tokens.items()}
    yield opened
    for client in opened.values():
        await client.aclose()


def records_of(tail: Tail, command_id: str) -> list[dict]:
    return [v for v in tail.values(topics.COMMANDS) if isinstance(v, dict) and v.get("command_id") == command_id]


async def published_times(tail: Tail, command_id: str, times: int) -> list[dict]:
    """The records with this command_id once `times` of them are on the topic."""
    return await async_wait_until(lambda: (found := records_of(tail, command_id)) and len(found) >= times and found,
                                  30, message=f"{command_id} not published {times} times")


async def everything_published(tail: Tail, settings: Settings) -> list[dict]:
    """Every record on outreach.commands so far: the broker's end offsets, then the tail waited for up to them.
    A request answered already has had its records acknowledged (acks=all) before its answer, so this list is
    complete for it: no sleeping on the chance that something might still arrive."""
    total = await kafka.end_offsets_total(settings, topics.COMMANDS)
    await async_wait_until(lambda: len(tail.records[topics.COMMANDS]) >= total, 30,
                           message="the tail did not reach the end of outreach.commands")
    return tail.values(topics.COMMANDS)


def command_calls(campaign_id: str) -> list[tuple[str, str, dict | None, str]]:
    """(method, url, JSON body, command type) of every command route that has a campaign id."""
    return [
        ("PUT", f"/campaigns/{campaign_id}/template", {"template": {"body": "Hello {{first_name}}"}},
         "UpdateTemplate"),
        ("POST", f"/campaigns/{campaign_id}/run", {"disclaimer": ALL_TRUE}, "RunCampaign"),
        ("POST", f"/campaigns/{campaign_id}/stop", {"confirmed": True}, "StopCampaign"),
        ("POST", f"/campaigns/{campaign_id}/retry", {"include_cancelled": True}, "RetryFailedMessages"),
        ("DELETE", f"/campaigns/{campaign_id}", None, "DeleteCampaign"),
    ]


async def send(client: httpx.AsyncClient, method: str, url: str, body: dict | None, key: str | None) -> dict:
    headers = {} if key is None else {"Idempotency-Key": key}
    response = await client.request(method, url, json=body, headers=headers)
    assert response.status_code == 202, response.text
    return response.json()


# ------------------------------------------------------------------ the commands of one campaign

async def test_the_same_key_publishes_the_same_command_id_and_another_key_another(clients, commands_tail):
    campaign_id, other_campaign = str(uuid.uuid4()), str(uuid.uuid4())
    api = clients["ada"]
    for (method, url, body, command_type), (_, other_url, _, _) in zip(command_calls(campaign_id),
                                                                         command_calls(other_campaign)):
        key = f"retry-{command_type}-{uuid.uuid4()}"
        first = await send(api, method, url, body, key)
        again = await send(api, method, url, body, key)  # the retry after a lost response
        assert again == first and first["command_type"] == command_type and first["campaign_id"] == campaign_id
        command_id = first["command_id"]
        records = await published_times(commands_tail, command_id, 2)
        assert len(records) == 2  # both requests published: the handler is the one that ignores the repeat
        for record in records:
            parse_command(json.dumps(record))
            assert record["type"] == command_type and record["campaign_id"] == campaign_id
            assert record["issued_by"] == "ada"
        other_key = await send(api, method, url, body, key + "-2")
        without_key = [await send(api, method, url, body, None) for _ in range(2)]
        other_campaign_same_key = await send(api, method, other_url, body, key)
        distinct = {command_id, other_key["command_id"], *(r["command_id"] for r in without_key),
                    other_campaign_same_key["command_id"]}
        assert len(distinct) == 5, (command_type, distinct)
        for accepted in (other_key, *without_key, other_campaign_same_key):
            assert len(await published_times(commands_tail, accepted["command_id"], 1)) == 1


async def test_a_key_is_scoped_to_its_command_type_and_principal(clients, commands_tail):
    campaign_id = str(uuid.uuid4())
    key = f"shared-{uuid.uuid4()}"
    # one key on every route of the campaign: one command each
    by_type = {command_type: (await send(clients["ada"], method, url, body, key))["command_id"]
               for method, url, body, command_type in command_calls(campaign_id)}
    assert len(set(by_type.values())) == len(by_type)
    # two principals, one key: their commands are theirs, never each other's
    method, url, body, _ = command_calls(campaign_id)[1]
    ada, bob = await send(clients["ada"], method, url, body, key), await send(clients["bob"], method, url, body, key)
    assert ada["command_id"] == by_type["RunCampaign"] and bob["command_id"] != ada["command_id"]
    (bob_record,) = await published_times(commands_tail, bob["command_id"], 1)
    assert bob_record["issued_by"] == "bob"
    # another token of the same principal (say, after rotating it): still the same principal, the same command
    rotated = await send(clients["ada-again"], method, url, body, key)
    assert rotated["command_id"] == ada["command_id"]


# ------------------------------------------------------------------ create from a CSV upload

def upload_csv(rows: int) -> bytes:
    return ("phone,first_name\n" + "".join(f"+1555{i:07d},P{i}\n" for i in range(rows))).encode()


async def create(client: httpx.AsyncClient, csv_bytes: bytes, key: str | None, name: str = "Retried") -> httpx.Response:
    return await client.post(
        "/campaigns", headers={} if key is None else {"Idempotency-Key": key},
        files={"contacts": ("c.csv", csv_bytes, "text/csv")},
        data={"name": name, "channel": "sms", "template": json.dumps({"body": "Hi {{first_name}}"}),
              "consent_confirmed": "true"})


async def test_a_retried_csv_upload_publishes_the_same_campaign_and_chunks(clients, commands_tail):
    api = clients["bob"]
    key = f"upload-{uuid.uuid4()}"
    csv_bytes = upload_csv(2100)  # three AddContacts chunks
    first = await create(api, csv_bytes, key)
    again = await create(api, csv_bytes, key)
    assert first.status_code == again.status_code == 202, (first.text, again.text)
    assert again.json() == first.json()  # the whole 202 body, ids included
    accepted = first.json()
    chunk_ids = accepted["contacts_command_ids"]
    assert len(chunk_ids) == 3 and len({accepted["command_id"], *chunk_ids}) == 4
    creates = await published_times(commands_tail, accepted["command_id"], 2)
    assert [c["type"] for c in creates] == ["CreateCampaign"] * 2
    assert {c["campaign_id"] for c in creates} == {accepted["campaign_id"]}
    for chunk_no, chunk_id in enumerate(chunk_ids):
        chunks = await published_times(commands_tail, chunk_id, 2)
        assert [(c["type"], c["chunk_no"], c["campaign_id"]) for c in chunks] == \
            [("AddContacts", chunk_no, accepted["campaign_id"])] * 2
        assert chunks[0]["contacts"] == chunks[1]["contacts"]

    # another key, another principal, no key: other campaigns, other chunk ids
    others = [(await create(api, csv_bytes, key + "-2")).json(), (await create(clients["ada"], csv_bytes, key)).json(),
              (await create(api, csv_bytes, None)).json(), (await create(api, csv_bytes, None)).json()]
    assert len({accepted["campaign_id"], *(o["campaign_id"] for o in others)}) == 5
    all_chunk_ids = [c for o in (accepted, *others) for c in o["contacts_command_ids"]]
    assert len(set(all_chunk_ids)) == len(all_chunk_ids)

    # The command handler, fed what was published, acts once and answers the retry with its stored answers.
    answers = handle(records_of(commands_tail, accepted["command_id"])
                     + [r for c in chunk_ids for r in records_of(commands_tail, c)])
    first_answers = {cid: events for cid, events in answers[:4]}
    repeated = {cid: events for cid, events in answers[4:]}
    assert [e["type"] for e in first_answers[accepted["command_id"]]] == ["CampaignCreated"]
    assert "CampaignReady" in [e["type"] for e in first_answers[chunk_ids[-1]]]
    for command_id, events in repeated.items():
        assert events == first_answers[command_id], command_id  # same events, same event ids: not campaign_exists


def handle(records: list[dict]) -> list[tuple[str, list[dict]]]:
    """(command_id, its answer records) for each record in order, handled by the real command handler
    (in memory): creates first, then chunks, each published twice, so the first four are the originals."""
    from services.command_handler.application import OutreachApp
    from services.common.settings import get_settings
    from tests.handler_driver import Driver

    originals, repeats, seen = [], [], set()
    for record in sorted(records, key=lambda r: (r["type"] != "CreateCampaign", r.get("chunk_no", -1))):
        (repeats if record["command_id"] in seen else originals).append(record)
        seen.add(record["command_id"])
    app = OutreachApp(get_settings(), env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    try:
        driver = Driver(app)
        out = []
        for record in originals + repeats:
            assert driver.handler.handle(topics.COMMANDS, jsoncodec.dumps(record)) is None
            stored = driver.new_records()
            out.append((record["command_id"], [r["value"] for r in stored if r["topic"] == topics.CAMPAIGN_EVENTS
                                               and r["value"]["causation_id"] == record["command_id"]]))
        return out
    finally:
        app.close()


# ------------------------------------------------------------------ invalid keys

INVALID_KEYS = [
    "",  # empty
    "k" * 201,  # too long
    "tab\there",  # a control character
    "caf\u00e9".encode(),  # not ASCII (UTF-8 bytes on the wire)
]
VALID_EDGE_KEYS = ["k" * 200, "a key with spaces", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"]


async def test_an_invalid_key_is_422_and_publishes_nothing(clients, commands_tail, settings):
    api = clients["ada"]
    campaign_id = str(uuid.uuid4())
    before = len(await everything_published(commands_tail, settings))
    for key in INVALID_KEYS:
        for method, url, body, _ in command_calls(campaign_id):
            response = await api.request(method, url, json=body, headers={"Idempotency-Key": key})
            assert response.status_code == 422, (key, url, response.text)
            assert "Idempotency-Key" in response.text
        response = await create(api, upload_csv(3), key, name="never published")  # type: ignore[arg-type]
        assert response.status_code == 422 and "Idempotency-Key" in response.text, (key, response.text)
    after = await everything_published(commands_tail, settings)
    assert after[before:] == []
    assert not [v for v in after if isinstance(v, dict) and (v.get("campaign_id") == campaign_id
                                                             or v.get("name") == "never published")]
    # the edges of what is valid
    method, url, body, _ = command_calls(campaign_id)[2]
    accepted = [await send(api, method, url, body, key) for key in VALID_EDGE_KEYS]
    assert len({a["command_id"] for a in accepted}) == len(VALID_EDGE_KEYS)
    for a in accepted:
        await published_times(commands_tail, a["command_id"], 1)


def test_openapi_documents_the_header_on_every_command_route(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    commands = [("post", "/campaigns"), ("put", "/campaigns/{campaign_id}/template"),
                ("post", "/campaigns/{campaign_id}/run"), ("post", "/campaigns/{campaign_id}/stop"),
                ("post", "/campaigns/{campaign_id}/retry"), ("delete", "/campaigns/{campaign_id}"),
                ("post", "/campaigns/{campaign_id}/test-send"), ("post", "/opt-outs"), ("post", "/opt-outs/remove")]
    for method, path in commands:
        (header,) = [p for p in spec["paths"][path][method]["parameters"] if p["in"] == "header"]
        assert header["name"] == "Idempotency-Key" and header["required"] is False, (method, path)
        assert "first command wins" in header["description"] and "printable ASCII" in header["description"]
    for path, operations in spec["paths"].items():  # and nowhere else
        for method, operation in operations.items():
            if (method, path) not in commands:
                assert not [p for p in operation.get("parameters", []) if p["in"] == "header"], (method, path)


def test_derived_ids_are_stable_across_releases():
    """A retry after an upgrade must still make the same ids: the derivation is pinned here."""
    from services.api import idempotency

    assert str(idempotency.IDEMPOTENCY_NS) == str(uuid.uuid5(ids.OUTREACH_NS, "api:idempotency-key"))
    campaign_id = "0a0a0a0a-0000-4000-8000-000000000001"
    assert idempotency.command_id("ada", "RunCampaign", campaign_id, "k1") == str(uuid.uuid5(
        idempotency.IDEMPOTENCY_NS, f'["ada","RunCampaign","{campaign_id}","k1",null]'))
    assert idempotency.command_id("ada", "RunCampaign", campaign_id, None) is None
    # free text on both sides of a join cannot collide
    assert idempotency.derived_id("a:b", "X", None, "c") != idempotency.derived_id("a", "X", None, "b:c")
