"""Benchmark: read-model replay and apply speed on SQLite and PostgreSQL.

Builds an event store (SQLite file, or PostgreSQL with --event-store postgres) holding one SMS campaign of
--messages messages taken to `delivered` by the command handler's own use cases (no broker: claims and
provider results are fed to the application directly), then measures:
- replay: `outreach replay`'s path (notification log -> wire.to_records -> read model in large batches)
  into a fresh SQLite file and into a fresh PostgreSQL database, in records/s and stored events/s;
- apply: the projections' part alone (the same records, already decoded, applied in batches of the
  consumer's size) into each read model, in records/s; the engine makes ~5 records per message.

    python bench/replay_bench.py [--messages 20000] [--event-store sqlite|postgres]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from outreach.replay import run_replay  # noqa: E402
from schemas import topics  # noqa: E402
from schemas.internal import SenderResult  # noqa: E402
from services.common import jsoncodec  # noqa: E402
from services.common.settings import Settings  # noqa: E402
from services.command_handler import wire  # noqa: E402
from services.command_handler.application import open_app  # noqa: E402
from services.command_handler.handlers import RecordHandler  # noqa: E402
from services.projections.app import MAX_RECORDS  # noqa: E402
from services.projections.projector import ReadModel  # noqa: E402

ALL_TRUE = {"consent": True, "content_compliance": True, "opt_out": True, "data_responsibility": True}
ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
CHUNK = 1000


def command(type_: str, campaign_id: str, **payload) -> bytes:
    return jsoncodec.dumps({"type": type_, "command_id": str(uuid.uuid4()), "campaign_id": campaign_id,
                            "issued_by": "bench", "issued_at": "2026-01-01T00:00:00Z", **payload})


def create_database() -> str:
    import psycopg

    name = f"outreach_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(ADMIN_DSN, autocommit=True) as db:
        db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def build_event_store(settings: Settings, messages: int) -> None:
    """One SMS campaign of `messages` messages, run and delivered through the application's use cases."""
    app = open_app(settings)
    handler = RecordHandler(app)
    try:
        cid = str(uuid.uuid4())
        handler.handle(topics.COMMANDS, command("CreateCampaign", cid, name="bench", channel="sms",
                                                template={"body": "Hi {{name}}, your code is ready"}))
        chunks = (messages + CHUNK - 1) // CHUNK
        for n in range(chunks):
            rows = range(2 + n * CHUNK, 2 + min(messages, (n + 1) * CHUNK))
            contacts = [{"row": row, "destination": f"+1202{row:07d}", "variables": {"name": f"P{row}"}}
                        for row in rows]
            handler.handle(topics.COMMANDS, command("AddContacts", cid, chunk_no=n, contacts=contacts,
                                                    last_chunk=n == chunks - 1))
        handler.handle(topics.COMMANDS, command("RunCampaign", cid, disclaimer=ALL_TRUE))
        position = app.recorder.max_notification_id() or 0
        while True:
            if app.claim(claim_id=str(uuid.uuid4()), campaign_id=cid, max_messages=CHUNK) == 0:
                break
            items = []
            for notification in app.recorder.select_notifications(start=position + 1, limit=100):
                position = notification.id
                for record in wire.to_records(app.mapper.to_domain_event(notification)):
                    if record.topic == topics.SENDER_WORK:
                        items += record.value["items"]
            results = [SenderResult(message_id=item["message_id"], outcome=outcome, attempt=1,
                                    occurred_at="2026-01-01T00:00:00Z")
                       for item in items for outcome in ("accepted", "sent", "delivered")]
            app.apply_results(result_id=str(uuid.uuid4()), campaign_id=cid, results=results)
            position = app.recorder.max_notification_id() or position
    finally:
        app.close()


def public_records(settings: Settings) -> list[tuple[str, dict]]:
    app = open_app(settings)
    try:
        out, position = [], 0
        while notifications := app.recorder.select_notifications(start=position + 1, limit=500):
            position = notifications[-1].id
            out += [(r.topic, r.value) for n in notifications for r in wire.to_records(app.mapper.to_domain_event(n))
                    if r.topic in (topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS)]
        return out
    finally:
        app.close()


def measure_apply(location: str, records: list[tuple[str, dict]]) -> float:
    with ReadModel(location) as model:
        started = time.perf_counter()
        for i in range(0, len(records), MAX_RECORDS):
            model.apply(records[i:i + MAX_RECORDS])
        return len(records) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--event-store", choices=("sqlite", "postgres"), default="sqlite")
    args = parser.parse_args()

    databases: list[str] = []
    with tempfile.TemporaryDirectory(prefix="outreach-replay-bench-") as tmp:
        store = {"event_store": args.event_store, "data_dir": Path(tmp)}
        if args.event_store == "postgres":
            databases.append(create_database())
            store["postgres_dsn"] = f"postgresql://postgres@127.0.0.1:5432/{databases[-1]}"
        settings = Settings(**store)
        try:
            started = time.perf_counter()
            build_event_store(settings, args.messages)
            print(f"event store ({args.event_store}): {args.messages} messages built in "
                  f"{time.perf_counter() - started:.1f} s")
            records = public_records(settings)
            print(f"{len(records)} public records ({len(records) / args.messages:.1f} per message)\n")
            print(f"{'read model':<12} {'stored events':>14} {'records':>9} {'seconds':>8} {'replay rec/s':>13} "
                  f"{'stored ev/s':>12} {'apply rec/s':>12}")
            for kind in ("sqlite", "postgres"):
                if kind == "sqlite":
                    replay_into, apply_into = str(Path(tmp) / "replay.db"), str(Path(tmp) / "apply.db")
                else:
                    databases += [create_database(), create_database()]
                    replay_into, apply_into = (f"postgresql://postgres@127.0.0.1:5432/{name}"
                                               for name in databases[-2:])
                result = run_replay(settings, into=replay_into)
                apply_rate = measure_apply(apply_into, records)
                print(f"{kind:<12} {result.stored_events:>14} {result.records:>9} {result.seconds:>8.2f} "
                      f"{result.records_per_s:>13,.0f} {result.stored_events / result.seconds:>12,.1f} "
                      f"{apply_rate:>12,.0f}")
        finally:
            for name in databases:
                drop_database(name)


if __name__ == "__main__":
    main()
