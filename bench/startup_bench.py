"""Benchmark: how long `outreach up` takes to start, from launch until the engine works.

Each run launches `python -m outreach.cli up` (embedded broker, every service as a process, a fresh data
dir, free ports) and measures from the launch:
- `consuming`: until each consumer-group service has logged aiokafka's "Setting newly assigned partitions"
  (its group joined and partitions assigned: the same line on any consumer, hand-written or FastStream),
  per service and the slowest of them;
- `answered`: until a CreateCampaign published as soon as the broker answers is answered on the
  campaign-events topic (the command handler and the relay are up);
- `read_model`: until the read model shows that campaign (the projections are up too).
Then SIGTERM, as Ctrl-C would. Prints each run and the median of the runs.

    python bench/startup_bench.py [PROJECT_ROOT] [--runs 3]

PROJECT_ROOT (default: this checkout) is the code that is started: a worktree of another commit can be
measured with this script and this venv's Python (the root goes first on PYTHONPATH; the script prints
which `services` package the services import, to check).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120
# Consumer-group services whose start-up this measures (each joins one group per consumer).
GROUP_SERVICES = ("command-handler", "timeout-sweeper", "projections", "sender")
ASSIGNED = re.compile(r"Setting newly assigned partitions")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_answers(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


async def one_run(root: Path) -> dict[str, float]:
    # Imported here, from the root under test (first on sys.path).
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from schemas import topics
    from services.common import jsoncodec, kafka
    from services.common.settings import Settings

    data_dir = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(root), "OUTREACH_DATA_DIR": str(data_dir),
           "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}", "OUTREACH_API_PORT": str(free_port()),
           "OUTREACH_SIMULATOR_PORT": str(free_port()), "OUTREACH_WEBHOOK_PORT": str(free_port()),
           "OUTREACH_SMTP_PORT": str(free_port()), "OUTREACH_SMS_PROVIDER": "inprocess",
           "OUTREACH_EMAIL_PROVIDER": "inprocess"}
    settings = Settings(kafka_bootstrap_servers=f"127.0.0.1:{port}", data_dir=data_dir)
    log_dir = data_dir / "logs"
    started = time.monotonic()
    up = subprocess.Popen([sys.executable, "-m", "outreach.cli", "up"], cwd=root, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    result: dict[str, float] = {}
    try:
        while not port_answers(port):
            if time.monotonic() - started > TIMEOUT_S or up.poll() is not None:
                raise RuntimeError("the embedded broker did not start")
            await asyncio.sleep(0.02)
        await kafka.ensure_topics(settings)  # as the services do; whoever comes first creates them
        campaign_id, command_id = str(uuid.uuid4()), str(uuid.uuid4())
        command = {"type": "CreateCampaign", "command_id": command_id, "campaign_id": campaign_id,
                   "issued_by": "startup-bench", "issued_at": "2026-01-01T00:00:00Z", "name": "startup",
                   "channel": "sms", "template": {"body": "Hello {{name}}"}}
        producer = kafka.make_producer(settings)
        await producer.start()
        await producer.send_and_wait(topics.COMMANDS, jsoncodec.dumps(command), key=campaign_id.encode())
        await producer.stop()
        watcher = AIOKafkaConsumer(**kafka.consumer_config(settings))
        await watcher.start()
        parts = [TopicPartition(topics.CAMPAIGN_EVENTS, p) for p in range(settings.partitions)]
        watcher.assign(parts)
        await watcher.seek_to_beginning(*parts)
        read_model = data_dir / "read-model.db"
        try:
            while time.monotonic() - started < TIMEOUT_S:
                now = time.monotonic() - started
                for name in GROUP_SERVICES:
                    log = log_dir / f"{name}.log"
                    if name not in result and log.exists() and ASSIGNED.search(log.read_text(errors="replace")):
                        result[name] = now
                if "answered" not in result:
                    batches = await watcher.getmany(timeout_ms=20)
                    if any(jsoncodec.loads(r.value).get("causation_id") == command_id
                           for records in batches.values() for r in records):
                        result["answered"] = time.monotonic() - started
                if "read_model" not in result and read_model.exists():
                    try:
                        with sqlite3.connect(read_model) as db:
                            if db.execute("SELECT 1 FROM campaigns WHERE campaign_id = ?", (campaign_id,)).fetchone():
                                result["read_model"] = time.monotonic() - started
                    except sqlite3.Error:
                        pass
                if all(k in result for k in (*GROUP_SERVICES, "answered", "read_model")):
                    break
                await asyncio.sleep(0.02)
            else:
                raise RuntimeError(f"not ready after {TIMEOUT_S} s: {result}")
        finally:
            await watcher.stop()
        result["consuming"] = max(result[name] for name in GROUP_SERVICES)
        return result
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", type=Path, default=HERE)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    root = args.root.resolve()
    sys.path.insert(0, str(root))
    import services

    print(f"project root {root} (services from {Path(services.__file__).parent}; "
          f"commit {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=root, capture_output=True, text=True).stdout.strip()})")
    keys = ("consuming", *GROUP_SERVICES, "answered", "read_model")
    runs = []
    for n in range(args.runs):
        run = asyncio.run(one_run(root))
        runs.append(run)
        print(f"run {n + 1}: " + ", ".join(f"{k} {run[k]:.2f} s" for k in keys))
    print(f"median of {len(runs)}: " + ", ".join(f"{k} {statistics.median(r[k] for r in runs):.2f} s" for k in keys))


if __name__ == "__main__":
    main()
