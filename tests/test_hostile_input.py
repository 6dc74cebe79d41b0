"""Hostile Kafka input, end to end: every service a process on its own embedded broker, event store on
PostgreSQL.

- A command in every codec Kafka defines, produced by librdkafka (confluent-kafka, the client most non-Python
  systems use), is answered, and the handler keeps answering.
- A record batch that cannot be decoded (a corrupt compressed payload with a valid CRC, a bad CRC) does not
  stop a consumer: it lands in the DLQ with the error, and consumption goes on.
- A barrage of malformed records on every topic a service consumes (not JSON, wrong JSON types, missing and
  extra fields, bad ids, huge and deeply nested values, unknown types, empty and null values, invalid UTF-8,
  every codec): every service stays up, every command is answered or dead-lettered as the contract says,
  and nothing changes state that should not (the read model still equals a replay of the event store, a
  bystander campaign is untouched, and a campaign run afterwards completes).
"""
from __future__ import annotations

import asyncio
import json
import struct
import uuid
from collections import Counter
from contextlib import contextmanager

import confluent_kafka
import pytest
from aiokafka.producer import message_accumulator
from aiokafka.record.util import calc_crc32c

from outreach.replay import run_replay
from schemas import topics
from schemas.ids import is_wire_uuid
from services.common import jsoncodec, kafka
from services.common.settings import Settings
from services.projections.projector import ReadModel
from tests.conftest import async_wait_until, fresh_postgres_database
from tests.e2e_stack import simulator_submissions, stack_environment
from tests.e2e_support import ALL_TRUE, command, sms_contacts

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

TAIL_TOPICS = (topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS, topics.COMMANDS_DLQ)
CODECS = ("gzip", "snappy", "lz4", "zstd")  # every codec Kafka defines
# The topics the services consume (the DLQ is read by operators only, the heartbeats by `outreach status`).
CONSUMED_TOPICS = tuple(t for t in topics.ALL_TOPICS if t not in (topics.COMMANDS_DLQ, topics.HEARTBEATS))


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    return stack_environment(stack_bootstrap, tmp_path_factory.mktemp("hostile-data"),
                             OUTREACH_READ_MODEL_URL=fresh_postgres_database("outreach_e2e_hostile_rm"))


def stack_settings(env: dict[str, str]) -> Settings:
    return Settings(event_store=env["OUTREACH_EVENT_STORE"], postgres_dsn=env["OUTREACH_POSTGRES_DSN"],
                    data_dir=env["OUTREACH_DATA_DIR"], kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])


# ------------------------------------------------------------------------------------------ producing

def librdkafka_produce(bootstrap: str, topic: str, values: list[tuple[bytes | None, bytes]], codec: str) -> None:
    """Publish with librdkafka, compressed with `codec` (idempotence off: tansu has no InitProducerId)."""
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "compression.type": codec,
                                         "enable.idempotence": False, "acks": "all", "linger.ms": 5})
    failures = []
    for key, value in values:
        producer.produce(topic, key=key, value=value, on_delivery=lambda err, msg: err and failures.append(err))
    assert producer.flush(30) == 0 and not failures, failures


_ATTRIBUTES = struct.calcsize(">qiibI")  # record batch v2: offset of the attributes field (the CRC covers from here)
_CRC = struct.calcsize(">qiib")
_HEADER = 61


def _damaged(batch: bytes, *, fix_crc: bool) -> bytearray:
    """The batch marked zstd-compressed with its records scrambled; with `fix_crc` its CRC is made right again
    (so only decompression fails), else the CRC no longer matches."""
    out = bytearray(batch)
    attributes = struct.unpack_from(">h", out, _ATTRIBUTES)[0]
    struct.pack_into(">h", out, _ATTRIBUTES, (attributes & ~0x07) | 4)
    for i in range(_HEADER, len(out)):
        out[i] ^= 0x5A
    if fix_crc:
        struct.pack_into(">I", out, _CRC, calc_crc32c(bytes(out[_ATTRIBUTES:])))
    return out


@contextmanager
def damaging_batches(fix_crc: bool):
    """aiokafka producers built meanwhile send damaged record batches."""
    original = message_accumulator.BatchBuilder._build

    def build(self):
        if self._buffer is None:
            self._buffer = _damaged(original(self), fix_crc=fix_crc)
        return self._buffer

    message_accumulator.BatchBuilder._build = build
    try:
        yield
    finally:
        message_accumulator.BatchBuilder._build = original


async def publish_damaged(settings: Settings, topic: str, value: bytes, *, fix_crc: bool, key: bytes = b"k") -> str:
    """Publishes one damaged batch; returns where it went as the DLQ's `x-source-offset` names it."""
    producer = kafka.make_producer(settings, linger_ms=0)
    await producer.start()
    try:
        with damaging_batches(fix_crc):
            sent = await producer.send_and_wait(topic, value, key=key)
            return f"{sent.partition}:{sent.offset}"
    finally:
        await producer.stop()


def dead_letters(tail) -> list:
    return [record for record, _ in tail.records[topics.COMMANDS_DLQ]]


def header(record, name: str) -> str | None:
    return next((v.decode() for k, v in record.headers if k == name), None)


# ------------------------------------------------------------------------------------------ the corpus

def deeply_nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def hostile_values(topic: str) -> list[tuple[str, bytes]]:
    """(kind, value) for one topic: at least 25 malformed records of every kind the issue lists."""
    cid, mid = str(uuid.uuid4()), str(uuid.uuid4())
    envelope = {"type": "CreateCampaign", "command_id": str(uuid.uuid4()), "campaign_id": cid,
                "issued_by": "hostile", "issued_at": "2026-12-05T00:00:00Z"}
    like = {  # the shape each topic's records have, to damage field by field
        topics.COMMANDS: envelope,
        topics.CAMPAIGN_EVENTS: {"type": "CampaignCreated", "event_id": str(uuid.uuid4()), "campaign_id": cid,
                                 "sequence": 1, "occurred_at": "2026-12-05T00:00:00Z", "causation_id": cid},
        topics.MESSAGE_STATUS: {"type": "MessageStatusChanged", "event_id": str(uuid.uuid4()), "campaign_id": cid,
                                "message_id": mid, "status": "delivered", "sequence": 3},
        topics.CLAIM_REQUESTS: {"type": "ClaimRequest", "claim_id": str(uuid.uuid4()), "campaign_id": cid,
                                "max_messages": 10},
        topics.SENDER_WORK: {"type": "WorkClaimed", "event_id": str(uuid.uuid4()), "claim_id": str(uuid.uuid4()),
                             "campaign_id": cid, "channel": "sms", "run_no": 1, "items": []},
        topics.SENDER_RESULTS: {"type": "SenderResults", "result_id": str(uuid.uuid4()), "campaign_id": cid,
                                "results": [{"message_id": mid, "outcome": "sent"}]},
        topics.EXPIRIES: {"type": "Expiry", "expiry_id": str(uuid.uuid4()), "campaign_id": cid, "message_id": mid,
                          "kind": "sending"},
        topics.OPT_OUTS: {"type": "OptOutChanged", "opt_out_id": str(uuid.uuid4()), "channel": "sms",
                          "destination": "+12025550100", "opted_out": True},
        topics.CHANNEL_SETTINGS: {"type": "ChannelSettingsChanged", "channel": "sms"},
        topics.OPT_OUT_LIST: {"type": "OptOutListChanged", "event_id": str(uuid.uuid4()), "channel": "sms",
                              "destination": "+12025550100", "opted_out": True, "source": "manual"},
    }[topic]

    def js(value) -> bytes:  # the standard library's: it writes what orjson refuses to (integers past 64 bits)
        return json.dumps(value).encode()

    def but(**changes) -> bytes:
        return js({**like, **changes})

    out = [
        ("not json", b"not json"), ("not json", b"{"), ("not json", b"\x00\x01\x02"), ("empty", b""),
        ("not json", b"{'single': 'quotes'}"),
        ("invalid utf-8", b'{"type": "\xff\xfe"}'), ("invalid utf-8", b"\xc3\x28"),
        ("not an object", b"null"), ("not an object", b"1"), ("not an object", b'"text"'), ("not an object", b"[]"),
        ("not an object", b"true"),
        ("empty object", b"{}"),
        ("null values", js({k: None for k in like})), ("empty values", js({k: "" for k in like})),
        ("wrong types", but(type=1)), ("wrong types", js({k: [v] for k, v in like.items()})),
        ("wrong types", js({k: {"nested": v} for k, v in like.items()})),
        ("unknown type", but(type="Nope")),
        ("missing fields", js({"type": like["type"]})),
        ("extra fields", but(unexpected=True, __proto__={"polluted": 1})),
        ("bad ids", but(campaign_id=cid.upper())), ("bad ids", but(campaign_id=cid + "\n")),
        ("bad ids", but(campaign_id="not-a-uuid")), ("bad ids", but(campaign_id=12345)),
        ("huge", but(campaign_id=cid, pad="x" * (900 * 1024))),
        ("deeply nested", b'{"type": "X", "v": ' + deeply_nested(5000) + b"}"),
        ("deeply nested", js({**like, "v": _nest(200)})),
        ("huge numbers", but(sequence=10 ** 100, max_messages=1e308)),
        ("duplicate keys", b'{"type": "A", "type": "B"}'),
    ]
    if topic == topics.COMMANDS:  # valid envelopes with bad payloads: answered by CommandRejected
        out += [("bad payload", js({**envelope, "command_id": str(uuid.uuid4()), "name": 7, "channel": "fax"})),
                ("bad payload", js({**envelope, "command_id": str(uuid.uuid4()), "type": "AddContacts",
                                    "chunk_no": "0", "contacts": "all"})),
                ("bad payload", js({**envelope, "command_id": str(uuid.uuid4()), "type": "RunCampaign",
                                    "disclaimer": {"consent": "yes"}})),
                ("unknown type", js({**envelope, "command_id": str(uuid.uuid4()), "type": "LaunchMissiles"})),
                ("deeply nested", js({**envelope, "command_id": str(uuid.uuid4()), "template": _nest(300)}))]
    return out


def _nest(depth: int) -> dict:
    node: dict = {}
    for _ in range(depth):
        node = {"a": node}
    return node


def command_fate(value: bytes) -> str:
    """What the contract says becomes of a command record: 'dlq', or the command_id that must be answered."""
    try:
        parsed = jsoncodec.loads(value)
    except Exception:
        return "dlq"
    if (isinstance(parsed, dict) and isinstance(parsed.get("type"), str) and is_wire_uuid(parsed.get("command_id"))
            and is_wire_uuid(parsed.get("campaign_id"))):
        return parsed["command_id"]
    return "dlq"


# ------------------------------------------------------------------------------------------ the tests

async def test_a_command_in_every_codec_is_answered(env, settings, stack, tail, commands):
    bootstrap = env["KAFKA_BOOTSTRAP_SERVERS"]
    sent = {}
    for codec in CODECS:
        value = command("CreateCampaign", str(uuid.uuid4()), name=f"from librdkafka, {codec}", channel="sms",
                        template={"body": "Hi"})
        await asyncio.to_thread(librdkafka_produce, bootstrap, topics.COMMANDS,
                                [(value["campaign_id"].encode(), jsoncodec.dumps(value))], codec)
        sent[codec] = value["command_id"]
    for codec, command_id in sent.items():
        [answer] = await commands.answer(command_id)
        assert answer["type"] == "CampaignCreated", (codec, answer)
    answer = await commands.send("CreateCampaign", str(uuid.uuid4()), name="plain", channel="sms",
                                 template={"body": "Hi"})
    assert answer[0]["type"] == "CampaignCreated"  # and it keeps answering
    assert stack.dead() == []


@pytest.mark.parametrize("fix_crc", [True, False], ids=["corrupt-payload", "bad-crc"])
async def test_an_undecodable_batch_is_parked_and_consumption_goes_on(fix_crc, env, settings, stack, tail, commands):
    # Parking is at least once (a batch redelivered before its commit is parked again, with the same source
    # offset): this batch is the one whose source offset no earlier record named.
    poison_campaign = str(uuid.uuid4())
    source = await publish_damaged(settings, topics.COMMANDS,
                                   jsoncodec.dumps(command("DeleteCampaign", poison_campaign)),
                                   fix_crc=fix_crc, key=poison_campaign.encode())
    answer = await commands.send("CreateCampaign", str(uuid.uuid4()), name="after a damaged batch", channel="sms",
                                 template={"body": "Hi"})
    assert answer[0]["type"] == "CampaignCreated"

    def parked() -> list:
        # This batch's own (an earlier test's parking may reach the tail later: not counted here).
        return [r for r in dead_letters(tail) if header(r, "x-source-topic") == topics.COMMANDS
                and header(r, "x-source-offset") == source
                and "undecodable record batch" in (header(r, "x-error") or "")]

    await async_wait_until(parked, 15, message="the damaged batch never reached the DLQ")
    assert len({header(r, "x-source-offset") for r in parked()}) == 1  # one batch, maybe parked twice
    record = parked()[0]
    assert header(record, "x-error").startswith("undecodable record batch")
    assert header(record, "x-consumer") == "outreach-command-handler"
    assert len(record.value) > 61  # the raw batch, as it came
    assert stack.dead() == []


async def test_hostile_records_on_every_consumed_topic(env, settings, stack, tail, commands):
    bootstrap = env["KAFKA_BOOTSTRAP_SERVERS"]
    # A bystander: a ready campaign the barrage must not touch, and a campaign that has completed.
    bystander = await commands.create_ready_campaign("sms", sms_contacts(5))
    finished = await commands.create_ready_campaign("sms", sms_contacts(5))
    await commands.send("RunCampaign", finished, disclaimer=ALL_TRUE)
    await async_wait_until(lambda: tail.latest_status(finished) in ("complete", "complete_with_errors"), 60,
                           message="the finished campaign never completed")
    bystander_events = tail.campaign_events(bystander)
    submissions_before = sum(len(v) for v in (await simulator_submissions(env)).values())
    dlq_before = len(dead_letters(tail))
    events_before = len(tail.records[topics.CAMPAIGN_EVENTS])

    published: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    command_values: list[bytes] = []
    hostile_bytes: list[bytes] = []
    producer = kafka.make_producer(settings)
    await producer.start()
    try:
        for topic in CONSUMED_TOPICS:
            for kind, value in hostile_values(topic):
                # Keys: the bystander's (so a hostile record meets real state), none, and bytes that are no id.
                for key in (bystander.encode(), None, b"\xff\xfe")[: 1 if kind != "bad ids" else 3]:
                    await producer.send_and_wait(topic, value, key=key)
                    hostile_bytes.append(value)
                    published[topic] += 1
                    kinds[kind] += 1
                    if topic == topics.COMMANDS:
                        command_values.append(value)
    finally:
        await producer.stop()
    for codec in CODECS:  # each codec, on every consumed topic
        for topic in CONSUMED_TOPICS:
            codec_values = [(b"k", b"not json"), (bystander.encode(), b'{"type": null}')]
            hostile_bytes += [v for _, v in codec_values]
            await asyncio.to_thread(librdkafka_produce, bootstrap, topic, codec_values, codec)
            published[topic] += len(codec_values)
            kinds[f"codec {codec}"] += len(codec_values)
            if topic == topics.COMMANDS:
                command_values += [v for _, v in codec_values]
    for topic in CONSUMED_TOPICS:  # undecodable batches too
        for fix_crc in (True, False):
            await publish_damaged(settings, topic, b'{"type": "X"}', fix_crc=fix_crc)
            published[topic] += 1
            kinds["undecodable batch"] += 1
    total = sum(published.values())
    print(f"hostile records published: {total}; per topic {dict(published)}; per kind {dict(kinds)}")
    assert total >= 200

    # Every command is answered or dead-lettered, as the contract says.
    fates = [command_fate(v) for v in command_values]
    answered = sorted({f for f in fates if f != "dlq"})  # a command_id sent again is answered again, same event
    for command_id in answered:
        answer = await commands.answer(command_id, timeout_s=30)
        assert {a["type"] for a in answer} == {"CommandRejected"} and len({a["event_id"] for a in answer}) == 1, answer
    expected_command_dlq = fates.count("dlq") + 2  # + the two undecodable batches
    await async_wait_until(
        lambda: sum(header(r, "x-source-topic") == topics.COMMANDS for r in dead_letters(tail)[dlq_before:])
        >= expected_command_dlq, 30, message="not every unanswerable command reached the DLQ")
    command_dlq = [r for r in dead_letters(tail)[dlq_before:] if header(r, "x-source-topic") == topics.COMMANDS]
    assert len(command_dlq) == expected_command_dlq
    # The handler's internal topics park what they cannot read too; a DLQ value is at most 64 KiB.
    assert all(len(r.value or b"") <= 64 * 1024 for r in dead_letters(tail)[dlq_before:])

    # A campaign run after the barrage completes: every consumer still works.
    after = await commands.create_ready_campaign("sms", sms_contacts(20))
    await commands.send("RunCampaign", after, disclaimer=ALL_TRUE)
    await async_wait_until(lambda: tail.all_final(after, 20), 60, message="the campaign after the barrage stalled")
    assert stack.dead() == [], "a service died"

    # Nothing changed state that should not have.
    assert tail.campaign_events(bystander) == bystander_events
    ours = set(hostile_bytes)
    relayed = [v for r, v in tail.records[topics.CAMPAIGN_EVENTS][events_before:] if r.value not in ours
               and isinstance(v, dict) and v.get("campaign_id") != after]
    assert relayed and all(v["type"] == "CommandRejected" and v["causation_id"] in answered for v in relayed), \
        [v for v in relayed if v["type"] != "CommandRejected" or v["causation_id"] not in answered][:3]
    submissions_after = await simulator_submissions(env)
    assert sum(len(v) for v in submissions_after.values()) == submissions_before + 20
    live = ReadModel(env["OUTREACH_READ_MODEL_URL"])
    # The live read model applies the last campaign's records after the tail has seen them: compare once it has.
    await async_wait_until(lambda: (live.campaign(after) or {}).get("status") in ("complete", "complete_with_errors"),
                           60, message="the read model never showed the last campaign complete")
    replayed = await asyncio.to_thread(run_replay, stack_settings(env), into=str(env["OUTREACH_DATA_DIR"]) + "/rebuilt.db",
                                       compare_with=live)
    assert replayed.comparison.identical, replayed.comparison.differences[:5]
    print(f"commands answered: {len(answered)}; commands dead-lettered: {len(command_dlq)}; "
          f"DLQ records from all topics: {len(dead_letters(tail)) - dlq_before}")


# ------------------------------------------------------------------------------------------ oversized content

def largest_email_template() -> dict:
    """The largest email template the contract allows in a command (v1.1: html and subject each at most 512 KiB
    of UTF-8; the whole CreateCampaign at most 1 MiB), in multi-byte characters so characters != bytes."""
    html = "<p>Hello {{name}}</p>" + "é" * ((512 * 1024 - 21) // 2)
    assert len(html.encode()) <= 512 * 1024 < len(html.encode()) + 2
    subject = "Ω" * 200_000  # 400,000 bytes: the command stays just under 1 MiB
    return {"subject": subject, "html": html, "from_email": "team@example.org", "from_name": "Team",
            "attachments": []}


async def test_a_template_of_the_largest_size_runs_end_to_end(env, settings, stack, tail, commands):
    from tests.e2e_support import email_contacts

    template = largest_email_template()
    value = command("CreateCampaign", str(uuid.uuid4()), name="largest", channel="email", template=template)
    assert len(jsoncodec.dumps(value)) <= topics.MAX_RECORD_BYTES
    campaign_id = await commands.create_ready_campaign("email", email_contacts(30), template=template)
    await commands.send("RunCampaign", campaign_id, disclaimer=ALL_TRUE)
    await async_wait_until(lambda: tail.all_final(campaign_id, 30), 120, message="the largest template stalled")
    statuses = {r["status"] for r in tail.latest_per_message(campaign_id).values()}
    assert statuses == {"delivered"}, statuses
    # Every record the system produced stayed within the contract's limit.
    assert all(len(r.value or b"") <= topics.MAX_RECORD_BYTES for r, _ in tail.records[topics.CAMPAIGN_EVENTS])


async def test_a_template_over_the_limit_is_refused_and_nothing_is_stored(env, settings, stack, tail, commands):
    over = {**largest_email_template(), "subject": "s", "html": "x" * (512 * 1024 + 1)}
    campaign_id = str(uuid.uuid4())
    [answer] = await commands.send("CreateCampaign", campaign_id, name="too big", channel="email", template=over)
    assert (answer["type"], answer["reason"]) == ("CommandRejected", "invalid_command"), answer
    assert "html" in answer["detail"]
    # A command under 1 MiB whose event would be over it (a long name beside the largest template).
    template = largest_email_template()
    template["subject"] = "Ω" * 50_000
    value = command("CreateCampaign", campaign_id, name="", channel="email", template=template)
    value["name"] = "n" * (topics.MAX_RECORD_BYTES - 20 - len(jsoncodec.dumps(value)))  # the event adds ~100 bytes
    assert topics.MAX_RECORD_BYTES - 20 <= len(jsoncodec.dumps(value)) <= topics.MAX_RECORD_BYTES
    await commands.publish(value)
    [answer] = await commands.answer(value["command_id"])
    assert (answer["type"], answer["reason"]) == ("CommandRejected", "invalid_command"), answer
    assert "bytes, more than" in answer["detail"]
    [answer] = await commands.send("UpdateTemplate", campaign_id, template={"body": "x"})
    assert answer["reason"] == "unknown_campaign"  # nothing of it was stored
    assert stack.dead() == []
