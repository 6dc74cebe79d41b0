"""Benchmark: one campaign end to end, every service as its own process.

Scenarios (default: all):
- engine-sqlite, engine-postgres: SMS through the in-process simulator (the engine alone), each store;
- http-sms-postgres: SMS through the real Twilio adapter, the HTTP simulator and signed status callbacks;
- http-email-postgres: email through the real SendGrid adapter (batched sends) and signed event batches.
Rate limits are set far above what one machine reaches (printed), so the engine is what is measured.

Prints messages/s from publishing RunCampaign to consuming the last final status record (median of the
runs), when each stage finished for the last message (queued, claimed, sent, final) and when the read
model showed the campaign complete.

`--senders 1,2` runs each scenario with one sender process and again with two (`outreach up --instances
sender=2`): a campaign is sent by the one sender that owns its partition, so a second one adds a standby
and a share of other campaigns, not speed for one campaign; the figures side by side show what it costs.

    python bench/run_bench.py [--messages 20000] [--runs 3] [--scenarios engine-sqlite,...] [--senders 1,2]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: E402

from outreach.up import Stack  # noqa: E402
from schemas import topics  # noqa: E402
from services.common import jsoncodec, kafka  # noqa: E402
from services.common.embedded_broker import EmbeddedBroker, free_port  # noqa: E402
from services.common.settings import Settings  # noqa: E402

ALL_TRUE = {"consent": True, "content_compliance": True, "opt_out": True, "data_responsibility": True}
FINAL = {"delivered", "assumed_delivered", "failed", "opted_out", "cancelled"}
STAGES = ("queued", "sending", "sent", "delivered")
BENCH_RATE = "1000000"  # per second, both channels: far above any floor
SCENARIOS = {  # name -> (store, channel, sms provider, email provider)
    "engine-sqlite": ("sqlite", "sms", "inprocess", "inprocess"),
    "engine-postgres": ("postgres", "sms", "inprocess", "inprocess"),
    "http-sms-postgres": ("postgres", "sms", "twilio", "sendgrid"),
    "http-email-postgres": ("postgres", "email", "twilio", "sendgrid"),
}


def command(type_: str, campaign_id: str, **payload) -> dict:
    return {"type": type_, "command_id": str(uuid.uuid4()), "campaign_id": campaign_id, "issued_by": "bench",
            "issued_at": "2026-01-01T00:00:00Z", **payload}


def fresh_postgres_dsn() -> str:
    import psycopg

    name = f"outreach_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def drop_postgres(dsn: str) -> None:
    import psycopg

    name = dsn.rsplit("/", 1)[1]
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as db:
        db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Watcher:
    """Follows campaign events and message status from the start of the topics (no consumer group)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.answers: dict[str, list[dict]] = {}
        self.stage_counts = {s: 0 for s in STAGES}
        self.stage_done_at: dict[str, float] = {}
        self.final = 0
        self.campaign_id = ""
        self.expected = 0

    async def start(self) -> None:
        self.consumer = AIOKafkaConsumer(**kafka.consumer_config(self.settings))
        await self.consumer.start()
        parts = [TopicPartition(t, p) for t in (topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS)
                 for p in range(self.settings.partitions)]
        self.consumer.assign(parts)
        await self.consumer.seek_to_beginning(*parts)
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        seen: set[str] = set()
        while True:
            batches = await self.consumer.getmany(timeout_ms=50, max_records=20_000)
            now = time.monotonic()
            for records in batches.values():
                for r in records:
                    v = jsoncodec.loads(r.value)
                    if v.get("event_id") in seen or v.get("campaign_id") != self.campaign_id:
                        continue
                    seen.add(v["event_id"])
                    if r.topic == topics.CAMPAIGN_EVENTS:
                        self.answers.setdefault(v["causation_id"], []).append(v)
                        continue
                    status = v["status"]
                    if status in self.stage_counts:
                        self.stage_counts[status] += 1
                        if self.stage_counts[status] == self.expected:
                            self.stage_done_at[status] = now
                    if status in FINAL:
                        self.final += 1
                        if self.final == self.expected:
                            self.stage_done_at["final"] = now

    async def answer(self, command_id: str, timeout_s: float = 60) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while command_id not in self.answers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer to {command_id}")
            await asyncio.sleep(0.01)
        return self.answers[command_id]

    async def stop(self) -> None:
        self.task.cancel()
        await self.consumer.stop()


def bench_contacts(channel: str, start: int, stop: int) -> list[dict]:
    if channel == "email":
        return [{"row": i + 2, "destination": f"reader{i}@example.com", "variables": {"name": f"P{i}"}}
                for i in range(start, stop)]
    # Exchanges 600+ stay clear of the simulator's special +1NXX555010d range: every message is delivered.
    return [{"row": i + 2, "destination": f"+1{200 + i % 800}{600 + i // 800:03d}{i % 10000:04d}",
             "variables": {"name": f"P{i}"}} for i in range(start, stop)]


TEMPLATES = {
    "sms": {"body": "Hello {{name}}, this is the benchmark."},
    "email": {"subject": "Hello {{name}}", "html": "<p>Hello {{name}}, this is the benchmark.</p>",
              "from_email": "bench@example.org", "from_name": "Bench", "attachments": []},
}


async def one_run(settings: Settings, channel: str, messages: int, read_model_path: Path) -> dict:
    watcher = Watcher(settings)
    campaign_id = str(uuid.uuid4())
    watcher.campaign_id, watcher.expected = campaign_id, messages
    await watcher.start()
    producer = kafka.make_producer(settings)
    await producer.start()

    async def send(value: dict) -> list[dict]:
        await producer.send_and_wait(topics.COMMANDS, jsoncodec.dumps(value), key=campaign_id.encode())
        return await watcher.answer(value["command_id"])

    try:
        await send(command("CreateCampaign", campaign_id, name="bench", channel=channel, template=TEMPLATES[channel]))
        for chunk_no, start in enumerate(range(0, messages, 1000)):
            contacts = bench_contacts(channel, start, min(start + 1000, messages))
            answer = await send(command("AddContacts", campaign_id, chunk_no=chunk_no, contacts=contacts,
                                        last_chunk=start + 1000 >= messages))
            assert answer[0]["type"] == "ContactsAdded" and answer[0]["invalid"] == 0, answer[0]
        started_at = time.monotonic()
        answer = await send(command("RunCampaign", campaign_id, disclaimer=ALL_TRUE))
        assert answer[0]["type"] == "CampaignRunStarted", answer
        while "final" not in watcher.stage_done_at:
            if time.monotonic() - started_at > 600:
                raise TimeoutError(f"not final after 600 s: {watcher.stage_counts}, final {watcher.final}")
            await asyncio.sleep(0.05)
        final_at = watcher.stage_done_at["final"]
        read_model_at = await read_model_complete(read_model_path, campaign_id, started_at)
        return {
            "messages_per_s": messages / (final_at - started_at),
            "seconds": final_at - started_at,
            **{f"{stage}_done_s": watcher.stage_done_at.get(stage, float("nan")) - started_at for stage in STAGES},
            "read_model_complete_s": read_model_at - started_at,
        }
    finally:
        await producer.stop()
        await watcher.stop()


async def read_model_complete(path: Path, campaign_id: str, since: float) -> float:
    import sqlite3

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if path.exists():
            try:
                db = sqlite3.connect(path)
                row = db.execute("SELECT status FROM campaigns WHERE campaign_id = ?", (campaign_id,)).fetchone()
                db.close()
                if row and row[0] == "complete":
                    return time.monotonic()
            except sqlite3.Error:
                pass
        await asyncio.sleep(0.05)
    return float("nan")


def bench_environment(store: str, data_dir: Path, kafka_port: int, **extra: str) -> dict[str, str]:
    """The environment of a whole stack on its own broker port, store and data folder: short session
    timeouts, rate limits far above what one machine reaches (unless OUTREACH_SMS_RATE / OUTREACH_EMAIL_RATE
    are set), free ports; `extra` on top."""
    env = dict(os.environ)
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka_port}",
        "OUTREACH_EXTERNAL_KAFKA": "true",
        "OUTREACH_EVENT_STORE": store,
        "OUTREACH_DATA_DIR": str(data_dir),
        "OUTREACH_KAFKA_SESSION_TIMEOUT_MS": "2000",
        "OUTREACH_KAFKA_HEARTBEAT_MS": "200",
        "OUTREACH_SMS_RATE": env.get("OUTREACH_SMS_RATE", BENCH_RATE),
        "OUTREACH_EMAIL_RATE": env.get("OUTREACH_EMAIL_RATE", BENCH_RATE),
        "OUTREACH_SIMULATOR_PORT": str(free_port("127.0.0.1")),
        "OUTREACH_WEBHOOK_PORT": str(free_port("127.0.0.1")),
        "OUTREACH_API_PORT": str(free_port("127.0.0.1")),
    })
    env.update(extra)
    return env


def bench_scenario(name: str, messages: int, runs: int, senders: int = 1) -> list[dict]:
    store, channel, sms_provider, email_provider = SCENARIOS[name]
    results = []
    for run in range(runs):
        port = free_port("127.0.0.1")
        data_dir = Path(tempfile.mkdtemp(prefix=f"outreach-bench-{name}-"))
        env = bench_environment(store, data_dir, port, OUTREACH_SMS_PROVIDER=sms_provider,
                                OUTREACH_EMAIL_PROVIDER=email_provider)
        if run == 0:
            print(f"{name}, {senders} sender(s): {messages:,} {channel} messages, {store} store, providers sms={sms_provider} "
                  f"email={email_provider}, rates sms={env['OUTREACH_SMS_RATE']}/s "
                  f"email={env['OUTREACH_EMAIL_RATE']}/s", flush=True)
        dsn = None
        if store == "postgres":
            dsn = env["OUTREACH_POSTGRES_DSN"] = fresh_postgres_dsn()
        settings = Settings(kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
        with EmbeddedBroker("127.0.0.1", port):
            asyncio.run(kafka.ensure_topics(settings))
            with Stack(env=env, log_dir=data_dir / "logs", instances={"sender": senders}):
                result = asyncio.run(one_run(settings, channel, messages, data_dir / "read-model.db"))
        if dsn:
            drop_postgres(dsn)
        print(f"  run {run + 1}: {result['messages_per_s']:.0f} msg/s ({result['seconds']:.1f} s; "
              + ", ".join(f"{s} {result[f'{s}_done_s']:.1f} s" for s in STAGES if result[f"{s}_done_s"] == result[f"{s}_done_s"])
              + f"; read model complete at {result['read_model_complete_s']:.1f} s)", flush=True)
        results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--senders", default="1", help="sender processes, a comma list (e.g. 1,2): each is run")
    args = parser.parse_args()
    counts = [int(n) for n in args.senders.split(",")]
    print(f"Benchmark: every service a process; {args.runs} run(s) per scenario, median reported.")
    summary = {}
    for name in args.scenarios.split(","):
        for senders in counts:
            results = bench_scenario(name, args.messages, args.runs, senders)
            summary[name, senders] = {k: statistics.median(r[k] for r in results) for k in results[0]}
    print("\nMedian per scenario (Run published -> last final status consumed):")
    for (name, senders), m in summary.items():
        stages = "  ".join(f"{s} {m[f'{s}_done_s']:.1f} s" for s in STAGES if m[f"{s}_done_s"] == m[f"{s}_done_s"])
        label = f"{name} x{senders}" if len(counts) > 1 else name
        print(f"  {label:23s} {m['messages_per_s']:7.0f} msg/s  {m['seconds']:.1f} s;  {stages};  "
              f"read model {m['read_model_complete_s']:.1f} s")


if __name__ == "__main__":
    main()
