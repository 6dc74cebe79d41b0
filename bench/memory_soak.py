"""Memory soak: one SMS campaign of N messages end to end, every service's peak RSS (issue 12, item 6).

Starts the embedded broker and the whole stack (`outreach.up.Stack`, every service its own process, as
`bench/run_bench.py` does), creates one SMS campaign of `--messages` contacts, runs it, waits until every
message is final and the read model shows the campaign complete, then samples a few seconds more. Every
~0.5 s it reads each service process's RSS (psutil, the process and its children) and keeps the peak.
Prints, per service: the peak RSS, the phase it was reached in (`load`: create + contacts, `send`: Run to
the end) and the RSS at the end.

Providers: the defaults (Twilio adapter -> the HTTP simulator -> signed callbacks to the webhook receiver);
`--providers inprocess` measures the engine without HTTP. Rate limits are set far above what one machine
reaches, timers to the contract's defaults (every destination is one the simulator delivers).

    python bench/memory_soak.py [--messages 30000] [--store sqlite|postgres|sqlite,postgres]
    python bench/memory_soak.py --compare 30000,300000 [--store sqlite,postgres]

`--compare A,B` runs A then B (per store) and prints the two side by side with the ratio B/A: a service
whose memory does not grow with the campaign has a ratio near 1.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: E402

from bench.run_bench import (  # noqa: E402
    ALL_TRUE, FINAL, TEMPLATES, bench_contacts, bench_environment, command, drop_postgres, fresh_postgres_dsn,
    read_model_complete,
)
from outreach.up import Stack  # noqa: E402
from schemas import topics  # noqa: E402
from services.common import jsoncodec, kafka  # noqa: E402
from services.common.embedded_broker import EmbeddedBroker, free_port  # noqa: E402
from services.common.settings import Settings  # noqa: E402

SAMPLE_EVERY_S = 0.5
SETTLE_S = 5.0  # sampled after the read model shows the campaign complete
CHUNK = 1000
IN_FLIGHT_CHUNKS = 16  # AddContacts published ahead of their answers (one partition: applied in order)
MB = 1024 * 1024


class RssSampler:
    """Samples the RSS of every process of a Stack (and of the broker) in a thread; keeps each one's peak."""

    def __init__(self, stack: Stack, extra: dict[str, int] | None = None, traced: tuple[str, ...] = ()):
        self.stack = stack
        self.traced = traced  # services started with PYTHONTRACEMALLOC: asked (SIGUSR2) at new peaks
        self._dumped: dict[str, float] = {}  # when each traced service was last asked
        self._dumped_at: dict[str, int] = {}  # its RSS then: asked again 2 MB higher
        self.extra = extra or {}  # name -> pid of a process that is not a service (the broker)
        self.phase = "start"
        self.peak: dict[str, int] = {}
        self.peak_phase: dict[str, str] = {}
        self.peak_file: dict[str, int] = {}  # the file-backed part of each peak
        self.phase_peak: dict[tuple[str, str], int] = {}  # (service, phase) -> peak in that phase
        self.last: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _pids(self) -> dict[str, list[int]]:
        pids: dict[str, list[int]] = {}
        for name, processes in self.stack.processes.items():
            pids[name] = [p.process.pid for p in processes if p.process is not None and p.process.poll() is None]
        for name, pid in self.extra.items():
            pids[name] = [pid]
        return pids

    @staticmethod
    def rss(pid: int) -> tuple[int, int]:
        """The process's RSS plus its children's, and the part of it that is file-backed (mapped files, such as
        SQLite's shared-memory index; psutil's `shared`) ((0, 0) if it is gone)."""
        try:
            proc = psutil.Process(pid)
            info = proc.memory_info()
            total, shared = info.rss, info.shared
            for child in proc.children(recursive=True):
                try:
                    info = child.memory_info()
                    total, shared = total + info.rss, shared + info.shared
                except psutil.Error:
                    pass
            return total, shared
        except psutil.Error:
            return 0, 0

    def sample(self) -> None:
        for name, pids in self._pids().items():
            readings = [self.rss(pid) for pid in pids]
            value = sum(r[0] for r in readings)
            self.last[name] = value
            key = (name, self.phase)
            self.phase_peak[key] = max(self.phase_peak.get(key, 0), value)
            if value > self.peak.get(name, 0):
                # (not before the campaign starts: a process that has not yet set its handler would die of it)
                if name in self.traced and self.phase != "start" and value > self._dumped_at.get(name, 0) + 2 * MB \
                        and time.monotonic() - self._dumped.get(name, float("-inf")) > 15:
                    self._dumped[name], self._dumped_at[name] = time.monotonic(), value
                    for pid in pids:  # a traced service logs where its memory is, near each new peak
                        with contextlib.suppress(OSError, psutil.Error):
                            # only once it runs (started 30 s ago): before its handler is set, it would die of it
                            if time.time() - psutil.Process(pid).create_time() > 30:
                                os.kill(pid, signal.SIGUSR2)
                self.peak[name] = value
                self.peak_phase[name] = self.phase
                self.peak_file[name] = sum(r[1] for r in readings)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self.sample()

    def __enter__(self) -> "RssSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class Progress:
    """Follows the campaign's events and status records from the start of the topics (no group), keeping
    only what it needs: the answers to our commands and each message's latest sequence and finality."""

    def __init__(self, settings: Settings, campaign_id: str):
        self.settings = settings
        self.campaign_id = campaign_id
        self.answers: dict[str, list[dict]] = {}
        self.latest: dict[str, int] = {}  # message_id -> highest sequence seen
        self.final: set[str] = set()  # messages whose latest record is final
        self.status = ""

    async def start(self) -> "Progress":
        self.consumer = AIOKafkaConsumer(**kafka.consumer_config(self.settings))
        await self.consumer.start()
        parts = [TopicPartition(t, p) for t in (topics.CAMPAIGN_EVENTS, topics.MESSAGE_STATUS)
                 for p in range(self.settings.partitions)]
        self.consumer.assign(parts)
        await self.consumer.seek_to_beginning(*parts)
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=100, max_records=20_000)
            for records in batches.values():
                for r in records:
                    v = jsoncodec.loads(r.value)
                    if not isinstance(v, dict) or v.get("campaign_id") != self.campaign_id:
                        continue
                    if r.topic == topics.CAMPAIGN_EVENTS:
                        answers = self.answers.setdefault(v.get("causation_id") or "", [])
                        if all(a.get("event_id") != v.get("event_id") for a in answers):
                            answers.append(v)
                        if v.get("type") == "CampaignStatusChanged":
                            self.status = v["status"]
                        continue
                    message_id, sequence = v["message_id"], v["sequence"]
                    if sequence <= self.latest.get(message_id, -1):
                        continue
                    self.latest[message_id] = sequence
                    if v["status"] in FINAL:
                        self.final.add(message_id)
                    else:
                        self.final.discard(message_id)

    async def answer(self, command_id: str, timeout_s: float = 600) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while command_id not in self.answers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer to {command_id}")
            await asyncio.sleep(0.02)
        await asyncio.sleep(0)
        return self.answers[command_id]

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except (asyncio.CancelledError, Exception):
            pass
        await self.consumer.stop()


async def campaign(settings: Settings, sampler: RssSampler, messages: int, read_model: Path,
                   timeout_s: float) -> dict:
    campaign_id = str(uuid.uuid4())
    progress = await Progress(settings, campaign_id).start()
    producer = kafka.make_producer(settings)
    await producer.start()

    async def publish(value: dict) -> str:
        await producer.send_and_wait(topics.COMMANDS, jsoncodec.dumps(value), key=campaign_id.encode())
        return value["command_id"]

    try:
        sampler.phase = "load"
        started = time.monotonic()
        created = await progress.answer(await publish(command(
            "CreateCampaign", campaign_id, name="memory soak", channel="sms", template=TEMPLATES["sms"])))
        assert created[0]["type"] == "CampaignCreated", created
        pending: list[str] = []
        starts = list(range(0, messages, CHUNK))
        for chunk_no, start in enumerate(starts):
            pending.append(await publish(command(
                "AddContacts", campaign_id, chunk_no=chunk_no,
                contacts=bench_contacts("sms", start, min(start + CHUNK, messages)),
                last_chunk=chunk_no == len(starts) - 1)))
            if len(pending) >= IN_FLIGHT_CHUNKS:
                answer = await progress.answer(pending.pop(0))
                assert answer[0]["type"] == "ContactsAdded" and answer[0]["invalid"] == 0, answer[0]
        for command_id in pending:
            answer = await progress.answer(command_id)
            assert answer[0]["type"] == "ContactsAdded" and answer[0]["invalid"] == 0, answer[0]
        loaded = time.monotonic()
        sampler.phase = "send"
        # A run moves every message in one save: on a slow machine that takes minutes.
        answer = await progress.answer(await publish(command("RunCampaign", campaign_id, disclaimer=ALL_TRUE)),
                                       timeout_s=timeout_s)
        assert answer[0]["type"] == "CampaignRunStarted", answer
        last_report = time.monotonic()
        while len(progress.final) < messages:
            now = time.monotonic()
            if now - loaded > timeout_s:
                raise TimeoutError(f"{len(progress.final):,} of {messages:,} final after {timeout_s:.0f} s")
            if now - last_report >= 60:
                last_report = now
                print(f"    {now - loaded:5.0f} s: {len(progress.final):,} of {messages:,} final; RSS MB "
                      + ", ".join(f"{n} {v / MB:.0f}" for n, v in sampler.last.items()), flush=True)
            await asyncio.sleep(0.5)
        final = time.monotonic()
        await read_model_complete(read_model, campaign_id, final)
        complete = time.monotonic()
        await asyncio.sleep(SETTLE_S)
        return {"load_s": loaded - started, "send_s": final - loaded, "read_model_s": complete - loaded,
                "status": progress.status}
    finally:
        await producer.stop()
        await progress.stop()


def one_run(messages: int, store: str, providers: str, timeout_s: float, trace: tuple[str, ...] = ()) -> dict:
    port = free_port("127.0.0.1")
    data_dir = Path(tempfile.mkdtemp(prefix=f"outreach-memory-{store}-{messages}-"))
    env = bench_environment(store, data_dir, port)
    if providers == "inprocess":
        env.update({"OUTREACH_SMS_PROVIDER": "inprocess", "OUTREACH_EMAIL_PROVIDER": "inprocess"})
    dsn = None
    if store == "postgres":
        dsn = env["OUTREACH_POSTGRES_DSN"] = fresh_postgres_dsn()
    print(f"  {messages:,} SMS messages, {store} store, providers {providers}; logs in {data_dir}/logs", flush=True)
    settings = Settings(kafka_bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"])
    try:
        with EmbeddedBroker("127.0.0.1", port) as broker:
            asyncio.run(kafka.ensure_topics(settings))
            broker_pid = getattr(getattr(broker, "process", None), "pid", None)
            # --trace: those services trace their allocations; `kill -USR2 PID` logs where the memory is
            # (services/common/runtime.py). Tracing slows them and adds its own memory: not for the figures.
            traced = {name: {"PYTHONTRACEMALLOC": "1"} for name in trace}
            with Stack(env=env, log_dir=data_dir / "logs", service_env=traced) as stack:
                extra = {"(broker)": broker_pid} if broker_pid else {}
                with RssSampler(stack, extra, trace) as sampler:
                    result = asyncio.run(campaign(settings, sampler, messages, data_dir / "read-model.db",
                                                  timeout_s))
                dead = stack.dead()
    finally:
        if dsn:
            drop_postgres(dsn)
    result.update(peak=dict(sampler.peak), phase=dict(sampler.peak_phase), end=dict(sampler.last),
                  peak_file=dict(sampler.peak_file),
                  load={n: v for (n, p), v in sampler.phase_peak.items() if p == "load"},
                  samples=sampler.samples, dead=dead)
    print(f"  done: contacts {result['load_s']:.0f} s, Run -> every message final {result['send_s']:.0f} s, "
          f"read model complete {result['read_model_s']:.0f} s, campaign {result['status']}; "
          f"{sampler.samples} samples" + (f"; DEAD: {dead}" if dead else ""), flush=True)
    return result


def print_run(label: str, result: dict) -> None:
    print(f"\n{label}\n  {'service':18s} {'peak RSS MB':>11s}  {'at':5s} {'load peak':>9s} {'end MB':>7s}"
          f" {'file-backed at peak':>19s}")
    for name in sorted(result["peak"], key=lambda n: (n.startswith("("), n)):
        print(f"  {name:18s} {result['peak'][name] / MB:11.1f}  {result['phase'].get(name, ''):5s} "
              f"{result['load'].get(name, 0) / MB:9.1f} {result['end'].get(name, 0) / MB:7.1f}"
              f" {result['peak_file'].get(name, 0) / MB:19.1f}")


def print_compare(store: str, sizes: list[int], results: list[dict], limit_mb: float) -> None:
    large = results[-1]
    head = "  ".join(f"{f'{n:,} peak MB':>15s}" for n in sizes)
    print(f"\n{store} store: peak RSS per service\n  {'service':18s} {head}  {'ratio':>6s}  verdict")
    for name in sorted(large["peak"], key=lambda n: (n.startswith("("), n)):
        values = [r["peak"].get(name, 0) / MB for r in results]
        ratio = values[-1] / values[0] if values[0] else float("nan")
        verdict = "" if name.startswith("(") else (
            "ok" if values[-1] <= limit_mb and ratio <= 1.2 else
            f"{'over ' + str(int(limit_mb)) + ' MB ' if values[-1] > limit_mb else ''}"
            f"{'grows ' + format(ratio, '.2f') + 'x' if ratio > 1.2 else ''}".strip())
        print(f"  {name:18s} " + "  ".join(f"{v:15.1f}" for v in values) + f"  {ratio:6.2f}  {verdict}")
    print("  (times: " + "; ".join(f"{n:,}: send {r['send_s']:.0f} s" for n, r in zip(sizes, results)) + ")")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--compare", help="two (or more) sizes run one after the other, e.g. 30000,300000")
    parser.add_argument("--store", default="sqlite", help="sqlite, postgres, or both: sqlite,postgres")
    parser.add_argument("--providers", choices=("default", "inprocess"), default="default",
                        help="default: the Twilio adapter and the HTTP simulator; inprocess: no HTTP")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds from Run to every message final")
    parser.add_argument("--trace", default="", help="services whose allocations are traced (PYTHONTRACEMALLOC), "
                                                    "e.g. sender: `kill -USR2 PID` logs their largest holders")
    parser.add_argument("--limit-mb", type=float, default=300, help="the budget the verdict checks")
    args = parser.parse_args()
    sizes = [int(n) for n in args.compare.split(",")] if args.compare else [args.messages]
    print(f"Memory soak: every service a process; RSS sampled every {SAMPLE_EVERY_S} s (process + children)",
          flush=True)
    for store in args.store.split(","):
        results = []
        for messages in sizes:
            result = one_run(messages, store, args.providers, args.timeout,
                             tuple(name for name in args.trace.split(",") if name))
            print_run(f"{store} store, {messages:,} messages, providers {args.providers}:", result)
            results.append(result)
        if len(sizes) > 1:
            print_compare(store, sizes, results, args.limit_mb)


if __name__ == "__main__":
    main()
