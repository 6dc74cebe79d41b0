"""Benchmark: the sender's real-clock timings (prints figures; not a test).

The tests keep what must hold on any machine (lower bounds, behaviour); how fast it goes on this one is
measured here, next to the upper bound the tests used to assert (a busy 2-core machine could break those):
- the token bucket on the real clock: a burst of 50 at 200/s, then 150 tokens in all (was: < 0.05 s, < 0.9 s);
- 500 one-segment SMS at 50 segments/s through the dispatcher and the in-process simulator (was: < 14 s);
- 400 emails in calls of 50 at 200/s (was: < 3 s);
- the Twilio adapter's 0.3 s read timeout on a server that never answers, and its 0.3 s connect timeout
  on a listener whose backlog is full (each was: < 5 s);
- the provider simulator: an SMS it never answers, until the client's 0.4 s timeout (was: < 2 s), and
  its stop releasing a request it holds (was: < 3 s).

    python bench/sender_timings.py
"""
from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from services.common.settings import Settings  # noqa: E402
from services.sender.ratelimit import TokenBucket  # noqa: E402
from services.sender.twilio import TwilioAdapter  # noqa: E402
from services.simulator.app import Simulator  # noqa: E402
from tests import fakes  # noqa: E402
from tests.test_adapters_twilio import ACCEPT, HANG, TEMPLATE, FakeTwilio, item, settings_for  # noqa: E402
from tests.test_simulator_http import Receiver, make_settings, twilio_create  # noqa: E402


def report(what: str, seconds: float, was: str) -> None:
    print(f"{what:<62} {seconds:8.3f} s   (test bound was {was})")


async def token_bucket() -> None:
    bucket = TokenBucket(200)  # burst 50
    started = time.monotonic()
    for _ in range(50):
        await bucket.acquire(1)
    burst = time.monotonic() - started
    for _ in range(100):
        await bucket.acquire(1)
    total = time.monotonic() - started
    report("token bucket: burst of 50 at 200/s", burst, "< 0.05 s")
    report("token bucket: 150 tokens at 200/s (ideal 0.5)", total, "0.48 <= t < 0.9 s")


async def dispatcher_run(channel: str, count: int, claims: int, destination, template, was: str,
                         **settings_kw) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(data_dir=Path(data_dir), **settings_kw)
        adapter = fakes.RecordingAdapter(settings)
        async with fakes.dispatcher_harness(settings, {"sms": adapter, "email": adapter}) as h:
            claim_items = fakes.items([destination(n) for n in range(count)])
            size = count // claims
            claims = [fakes.work(channel, claim_items[i:i + size], template) for i in range(0, count, size)]
            started = time.monotonic()
            await asyncio.gather(*(h.dispatcher.process(c) for c in claims))
            report(f"dispatcher: {count} {channel} ({len(adapter.calls)} calls)", time.monotonic() - started, was)


async def twilio_timeouts() -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        fake = FakeTwilio()
        async with fakes.serving(fake.app, fake.release) as url:
            adapter = TwilioAdapter(settings_for(url, Path(data_dir)), read_timeout_s=0.3)
            try:
                started = time.monotonic()
                await adapter.submit("sms", [item(HANG)], TEMPLATE)
                report("twilio adapter: 0.3 s read timeout, no answer", time.monotonic() - started, "< 5 s")
            finally:
                await adapter.close()

        with fakes.full_backlog() as port:
            adapter = TwilioAdapter(settings_for(f"http://127.0.0.1:{port}", Path(data_dir)),
                                    connect_timeout_s=0.3, read_timeout_s=30)
            try:
                started = time.monotonic()
                await adapter.submit("sms", [item(ACCEPT)], TEMPLATE)
                report("twilio adapter: 0.3 s connect timeout, full backlog", time.monotonic() - started, "< 5 s")
            finally:
                await adapter.close()


async def simulator_holds() -> None:
    receiver = Receiver()
    await receiver.start()
    simulator = Simulator(make_settings(receiver.url))
    await simulator.start("127.0.0.1", 0)
    stopped = False
    try:
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            try:
                await twilio_create(session, simulator, "+12125550106", timeout=0.4)
            except asyncio.TimeoutError:
                pass
            report("simulator: no answer until the client's 0.4 s timeout", time.monotonic() - started, "< 2 s")

            pending = asyncio.ensure_future(twilio_create(session, simulator, "+12125550106", timeout=30))
            deadline = time.monotonic() + 5
            while len(simulator._held) < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            await simulator.stop()
            stopped = True
            report("simulator: stop releasing a held request", time.monotonic() - started, "< 3 s")
            await asyncio.gather(pending, return_exceptions=True)
    finally:
        if not stopped:
            await simulator.stop()
        await receiver.stop()


async def main() -> None:
    await token_bucket()
    await dispatcher_run("sms", 500, 5, lambda n: f"+1202555{1000 + n:04d}", {"body": "Hi {{name}}"},
                         "9.5 <= t < 14 s (ideal 9.75)", sms_rate=50)
    await dispatcher_run("email", 400, 1, lambda n: f"user{n}@example.com", None,
                         "1.7 <= t < 3 s (ideal 1.75)", email_rate=200, email_batch=50)
    await twilio_timeouts()
    await simulator_holds()


if __name__ == "__main__":
    asyncio.run(main())
