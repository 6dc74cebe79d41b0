"""`make run` reaches the demo's final summary with no step by hand (run with the exit flag)."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from services.api.store import ApiStore
from services.common.embedded_broker import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def embedded_defaults(tmp_path: Path) -> dict[str, str]:
    """A newcomer's environment (SQLite, the embedded broker) on free ports, data in tmp_path/var."""
    env = dict(os.environ)
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port('127.0.0.1')}",
        "OUTREACH_DATA_DIR": str(tmp_path / "var"),
        "OUTREACH_KAFKA_SESSION_TIMEOUT_MS": "2000",
        "OUTREACH_KAFKA_HEARTBEAT_MS": "200",
        "OUTREACH_SIMULATOR_PORT": str(free_port("127.0.0.1")),
        "OUTREACH_WEBHOOK_PORT": str(free_port("127.0.0.1")),
        "OUTREACH_API_PORT": str(free_port("127.0.0.1")),
    })
    env.pop("OUTREACH_EXTERNAL_KAFKA", None)
    env.pop("OUTREACH_EVENT_STORE", None)  # the embedded defaults: SQLite, embedded broker
    return env


def test_make_run_reaches_the_demo_summary(tmp_path):
    env = embedded_defaults(tmp_path)
    done = subprocess.run(["make", "run", "UP_ARGS=--exit-after-demo"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "Final summary" in output
    assert "Demo SMS" in output and "Demo email" in output
    assert output.count("complete") >= 2, output[-3000:]
    assert (tmp_path / "var" / "outreach-events.db").exists()  # the SQLite event store by default
    # the banner's console sign-in: a demo org admin whose printed password is the stored one
    sign_in = re.search(r"Demo console sign-in \(org_admin\): (http://\S+/console/) user (\S+), password (\S+)",
                        output)
    assert sign_in, output[-3000:]
    assert sign_in.group(1) == f"http://127.0.0.1:{env['OUTREACH_API_PORT']}/console/"
    with ApiStore(tmp_path / "var" / "api.db") as store:
        assert store.check_password(sign_in.group(2), sign_in.group(3)).role == "org_admin"


def test_outreach_up_runs_two_senders_on_the_embedded_defaults(tmp_path):
    """`outreach up --instances sender=2`: both senders own work partitions, each has its own journal, and the
    demo still completes (SQLite event store and fence)."""
    env = embedded_defaults(tmp_path)
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "outreach"), "up", "--demo", "--exit-after-demo",
                           "--demo-size", "100", "--instances", "sender=2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "sender x2" in output and output.count("complete") >= 2, output[-3000:]
    logs = tmp_path / "var" / "logs"
    for log in ("sender.log", "sender-1.log"):
        assert "sender-work partitions owned: [" in (logs / log).read_text()
    assert {p.name for p in (tmp_path / "var").glob("sender-journal*.db")} == {"sender-journal.db",
                                                                              "sender-journal-1.db"}


@pytest.mark.parametrize("spec, complaint", [("simulator=2", "cannot run as several instances"),
                                             ("sender=0", "from 1 to 8"), ("sender=two", "from 1 to 8")])
def test_outreach_up_refuses_instances_it_cannot_run(spec, complaint):
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "outreach"), "up", "--instances", spec],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and complaint in done.stderr, done.stderr


def test_outreach_up_refuses_a_broker_port_something_answers_on(tmp_path):
    """A second stack on the first one's broker would share its consumer groups and split its work: `outreach
    up` names what answers on the port and stops, unless told to use an external broker."""
    import socket
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}", "OUTREACH_DATA_DIR": str(tmp_path)}
        env.pop("OUTREACH_EXTERNAL_KAFKA", None)
        done = subprocess.run([str(ROOT / ".venv" / "bin" / "outreach"), "up"], env=env, capture_output=True,
                              text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"Something already answers at 127.0.0.1:{port}" in done.stderr
    assert f"pid {os.getpid()}" in done.stderr and sys.executable.rsplit("/", 1)[-1] in done.stderr  # named
    assert "OUTREACH_EXTERNAL_KAFKA=true" in done.stderr
    assert not (tmp_path / "logs").exists()  # nothing was started


def test_a_service_killed_under_outreach_up_comes_back(tmp_path):
    """SIGKILL one service of a running `outreach up`: it is restarted (logged), the rest and the broker stay."""
    import signal
    import time

    import psutil

    env = embedded_defaults(tmp_path)
    output = tmp_path / "up.out"
    with open(output, "wb") as out:
        up = subprocess.Popen([str(ROOT / ".venv" / "bin" / "outreach"), "up"], cwd=tmp_path, env=env, stdout=out,
                              stderr=subprocess.STDOUT)
    try:
        def service(module: str) -> psutil.Process | None:
            return next((p for p in psutil.Process(up.pid).children(recursive=True)
                         if module in " ".join(p.cmdline())), None)

        def wait_for(predicate, what: str, timeout_s: float = 60):
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                assert up.poll() is None, output.read_text()[-3000:]
                if (result := predicate()):
                    return result
                time.sleep(0.1)
            raise AssertionError(f"{what}; output:\n{output.read_text()[-3000:]}")

        wait_for(lambda: "Serving" in output.read_text(), "outreach up never served")
        victim = wait_for(lambda: service("services.projections"), "no projections process")
        others = {p.pid for p in psutil.Process(up.pid).children(recursive=True)} - {victim.pid}
        victim.send_signal(signal.SIGKILL)
        wait_for(lambda: "restarted projections" in output.read_text(), "projections was not restarted")
        back = wait_for(lambda: service("services.projections"), "no projections process after the restart")
        assert back.pid != victim.pid
        assert others <= {p.pid for p in psutil.Process(up.pid).children(recursive=True)}  # nothing else restarted
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
    assert "Stopped." in output.read_text()


def test_outreach_up_refuses_a_real_provider_with_the_public_secrets(tmp_path):
    """Every service would refuse (services/common/safe_defaults.py): `outreach up` says so once, starts nothing."""
    env = embedded_defaults(tmp_path)
    env["OUTREACH_TWILIO_BASE_URL"] = "https://api.twilio.com"
    for name in ("OUTREACH_UNSUBSCRIBE_SECRET", "OUTREACH_TWILIO_AUTH_TOKEN", "OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY"):
        env.pop(name, None)
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "outreach"), "up"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 78, done.stdout + done.stderr
    for setting in ("OUTREACH_UNSUBSCRIBE_SECRET", "OUTREACH_TWILIO_AUTH_TOKEN", "OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY"):
        assert setting in done.stderr
    assert not (tmp_path / "var" / "logs").exists()  # nothing was started
