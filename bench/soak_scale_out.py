"""Soak: two of every scaled service on PostgreSQL, campaigns one round after another, a random instance
SIGKILLed and restarted every few seconds, for minutes (issue 11; prints figures, not a test).

Each round runs an SMS and an email campaign of `--size` messages together; every third round stops its
email campaign once a fifth of it is delivered. At the end it prints the kills, the messages, how many a
provider accepted twice, how many were submitted after their cancellation, how many are stranded (not final
two minutes after the last round), and whether the read model equals a replay of the event store.

    python bench/soak_scale_out.py [--minutes 5] [--size 2000] [--kill-every 4]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from outreach.replay import compare_dumps, run_replay  # noqa: E402
from outreach.up import SCALABLE, SERVICES, Stack  # noqa: E402
from schemas import topics  # noqa: E402
from services.common import kafka  # noqa: E402
from services.common.embedded_broker import EmbeddedBroker, free_port  # noqa: E402
from services.common.settings import Settings  # noqa: E402
from services.projections.projector import ReadModel  # noqa: E402
from bench.run_bench import drop_postgres, fresh_postgres_dsn  # noqa: E402
# The whole-stack tests' helpers: a tail of the public topics, and commands answered through it.
from tests.e2e_support import ALL_TRUE, FINAL_MESSAGE_STATUSES, Commands, Tail, occurred_at  # noqa: E402

def contacts(channel: str, n: int, round_no: int) -> list[dict]:
    if channel == "sms":
        return [{"row": i + 2, "destination": f"+1{200 + i % 700}{600 + round_no % 300:03d}{i % 10000:04d}",
                 "variables": {"name": f"P{i}"}} for i in range(n)]
    return [{"row": i + 2, "destination": f"success+r{round_no}x{i}@simulator.amazonses.com",
             "variables": {"name": f"E{i}"}} for i in range(n)]


async def kill_loop(stack: Stack, stop: asyncio.Event, every_s: float, kills: list[str]) -> None:
    rng = random.Random(7)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), rng.uniform(every_s * 0.75, every_s * 1.25))
            return
        except TimeoutError:
            pass
        service, instance = rng.choice(SCALABLE), rng.randrange(2)
        stack.kill(service, instance)
        kills.append(f"{service}[{instance}]")
        print(f"  {time.strftime('%H:%M:%S')} SIGKILL {service}[{instance}]", flush=True)
        await asyncio.sleep(rng.uniform(0.3, 1.0))
        stack.start_service(service, instance)


async def soak(env: dict[str, str], stack: Stack, minutes: float, size: int, kill_every_s: float) -> None:
    settings = Settings(kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    tail = await Tail(settings, topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS, topics.COMMANDS_DLQ).start()
    commands = await Commands(settings, tail).start()
    stop, kills = asyncio.Event(), []
    killer = asyncio.create_task(kill_loop(stack, stop, kill_every_s, kills))
    campaigns: dict[str, int] = {}
    stopped: set[str] = set()
    ends = time.monotonic() + minutes * 60
    round_no = 0
    try:
        while time.monotonic() < ends:
            round_no += 1
            sms = await commands.create_ready_campaign("sms", contacts("sms", size, round_no))
            email = await commands.create_ready_campaign("email", contacts("email", size, round_no))
            campaigns.update({sms: size, email: size})
            await commands.send("RunCampaign", sms, disclaimer=ALL_TRUE, timeout_s=60)
            await commands.send("RunCampaign", email, disclaimer=ALL_TRUE, timeout_s=60)
            if round_no % 3 == 0:
                while sum(r["status"] == "delivered" for r in tail.statuses(email)) < size // 5:
                    await asyncio.sleep(0.5)
                await commands.send("StopCampaign", email, confirmed=True, timeout_s=60)
                stopped.add(email)
            while not (tail.all_final(sms, size) and tail.all_final(email, size)):
                if time.monotonic() > ends + 120:
                    break
                await asyncio.sleep(1)
            print(f"round {round_no} done at {time.strftime('%H:%M:%S')} ({len(kills)} kills so far)", flush=True)
    finally:
        stop.set()
        await killer
    deadline = time.monotonic() + 120
    while not all(tail.all_final(c, n) for c, n in campaigns.items()) and time.monotonic() < deadline:
        await asyncio.sleep(1)
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{env['OUTREACH_SIMULATOR_PORT']}/_simulator/submissions") as r:
            log = await r.json()
    latest = {c: tail.latest_per_message(c) for c in campaigns}
    stranded = sum(1 for c, n in campaigns.items() for r in latest[c].values() if r["status"] not in FINAL_MESSAGE_STATUSES) + sum(
        n - len(latest[c]) for c, n in campaigns.items())
    twice = sum(1 for entries in log.values() if sum(e["outcome"] == "accepted" for e in entries) > 1)
    after_cancel = 0
    for c in stopped:
        for mid, record in latest[c].items():
            if record["status"] == "cancelled":
                after_cancel += any(e["at"] > occurred_at(record) for e in log.get(mid, []))
    outcome = Counter(f"{r['status']}/{r['reason']}" if r["reason"] else r["status"]
                      for c in campaigns for r in latest[c].values())
    takeovers = sum(p.read_text(errors="replace").count("active: this relay holds the lock")
                    for p in stack.log_dir.glob("relay*.log"))
    print(f"\n{round_no} rounds, {len(campaigns)} campaigns, {sum(campaigns.values()):,} messages in "
          f"{minutes:.0f} min; kills {len(kills)} ({dict(Counter(k.split('[')[0] for k in kills))}); relay "
          f"became active {takeovers} times")
    print(f"final {dict(outcome)}; accepted twice {twice}; submitted after cancel {after_cancel}; "
          f"stranded {stranded}; parked {len(tail.values(topics.COMMANDS_DLQ))}")
    await commands.stop()
    await tail.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--kill-every", type=float, default=4.0, help="seconds between kills (about)")
    args = parser.parse_args()
    port = free_port("127.0.0.1")
    data_dir = Path(tempfile.mkdtemp(prefix="outreach-soak-"))
    env = dict(os.environ)
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}", "OUTREACH_EXTERNAL_KAFKA": "true",
        "OUTREACH_EVENT_STORE": "postgres", "OUTREACH_POSTGRES_DSN": fresh_postgres_dsn(),
        "OUTREACH_READ_MODEL_URL": fresh_postgres_dsn(), "OUTREACH_DATA_DIR": str(data_dir),
        "OUTREACH_KAFKA_SESSION_TIMEOUT_MS": "2000", "OUTREACH_KAFKA_HEARTBEAT_MS": "200",
        "OUTREACH_SENDING_TIMEOUT_S": "10", "OUTREACH_SENT_TIMEOUT_S": "5",
        "OUTREACH_EMAIL_RATE": "200",  # slow enough that a Stop finds messages still queued
        "OUTREACH_SIMULATOR_PORT": str(free_port("127.0.0.1")), "OUTREACH_WEBHOOK_PORT": str(free_port("127.0.0.1")),
        "OUTREACH_API_PORT": str(free_port("127.0.0.1")),
    })
    names = tuple(SERVICES)
    print(f"Soak: {args.minutes:.0f} min, rounds of an SMS and an email campaign of {args.size:,} each, two of "
          f"{', '.join(SCALABLE)}; a kill every ~{args.kill_every:.0f} s; logs in {data_dir}/logs", flush=True)
    try:
        with EmbeddedBroker("127.0.0.1", port):
            asyncio.run(kafka.ensure_topics(Settings(kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])))
            with Stack(env=env, log_dir=data_dir / "logs", names=names, instances=dict.fromkeys(SCALABLE, 2)) as stack:
                asyncio.run(soak(env, stack, args.minutes, args.size, args.kill_every))
                settings = Settings(event_store="postgres", postgres_dsn=env["OUTREACH_POSTGRES_DSN"],
                                    data_dir=data_dir, kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
                run_replay(settings, into=str(data_dir / "rebuilt.db"))
                with ReadModel(data_dir / "rebuilt.db") as rebuilt, ReadModel(env["OUTREACH_READ_MODEL_URL"]) as live:
                    comparison = compare_dumps(rebuilt.canonical_dump(), live.canonical_dump())
                print(f"read model equals a replay of the event store: {comparison.identical}"
                      + ("" if comparison.identical else f" ({comparison.differences[:3]})"))
    finally:
        drop_postgres(env["OUTREACH_POSTGRES_DSN"])
        drop_postgres(env["OUTREACH_READ_MODEL_URL"])


if __name__ == "__main__":
    main()
