"""`make run` reaches the demo's final summary with no step by hand (run with the exit flag)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from services.common.embedded_broker import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def test_make_run_reaches_the_demo_summary(tmp_path):
    env = dict(os.environ)
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port('127.0.0.1')}",
        "OUTREACH_DATA_DIR": str(tmp_path / "var"),
        "OUTREACH_KAFKA_SESSION_TIMEOUT_MS": "2000",
        "OUTREACH_KAFKA_HEARTBEAT_MS": "200",
        "OUTREACH_SIMULATOR_PORT": str(free_port("127.0.0.1")),
        "OUTREACH_WEBHOOK_PORT": str(free_port("127.0.0.1")),
    })
    env.pop("OUTREACH_EXTERNAL_KAFKA", None)
    env.pop("OUTREACH_EVENT_STORE", None)  # the embedded defaults: SQLite, embedded broker
    done = subprocess.run(["make", "run", "UP_ARGS=--exit-after-demo"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "Final summary" in output
    assert "Demo SMS" in output and "Demo email" in output
    assert output.count("complete") >= 2, output[-3000:]
    assert (tmp_path / "var" / "outreach-events.db").exists()  # the SQLite event store by default
