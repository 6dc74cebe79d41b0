"""`outreach up` supervises its services: an exited service is restarted after a capped exponential back-off, a
crash loop is reported once (naming the service and its log) and the others keep running.

The policy is driven with a fake clock and fake processes; then real service processes are SIGKILLed (the
provider simulator, which needs no broker) and a real module that exits at once is left to crash-loop.
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from outreach.up import SERVICES, RestartPolicy, Stack, Supervisor, describe_exit
from services.common.embedded_broker import free_port
from tests.conftest import wait_until

# ---------------------------------------------------------------- the policy, with a fake clock

_pids = itertools.count(1000)


@dataclass
class FakePopen:
    pid: int = field(default_factory=lambda: next(_pids))
    returncode: int | None = None


@dataclass
class FakeProcess:
    name: str
    log_path: Path
    process: FakePopen = field(default_factory=FakePopen)

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def exit(self, code: int) -> None:
        self.process.returncode = code


@dataclass
class FakeStack:
    """What the supervisor uses of a Stack: `processes` and `start_service`."""
    log_dir: Path
    processes: dict[str, list[FakeProcess]] = field(default_factory=dict)
    starts: list[tuple[str, int]] = field(default_factory=list)

    def start_service(self, name: str, instance: int = 0) -> FakeProcess:
        suffix = f"-{instance}" if instance else ""
        proc = FakeProcess(name, self.log_dir / f"{name}{suffix}.log")
        instances = self.processes.setdefault(name, [])
        instances[instance:instance + 1] = [proc]
        self.starts.append((name, instance))
        return proc


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


POLICY = RestartPolicy(first_wait_s=0.5, longest_wait_s=30.0, healthy_after_s=60.0, crash_loop_exits=5,
                       crash_loop_window_s=60.0)


def wait_bounds(failures: int, policy: RestartPolicy = POLICY) -> tuple[float, float]:
    """backoff_s: doubling from first_wait_s, plus up to first_wait_s of jitter, at most longest_wait_s."""
    base = policy.first_wait_s * 2 ** (failures - 1)
    return min(base, policy.longest_wait_s), min(base + policy.first_wait_s, policy.longest_wait_s)


@pytest.fixture
def supervised(tmp_path):
    clock, lines = FakeClock(), []
    stack = FakeStack(tmp_path / "logs")
    stack.start_service("sender")
    stack.start_service("sender", 1)
    stack.start_service("simulator")
    stack.starts.clear()
    supervisor = Supervisor(stack, POLICY, clock=clock, report=lines.append,
                            status_path=tmp_path / "logs" / "supervision.json")
    supervisor.poll()  # sees them all running
    return stack, supervisor, clock, lines


def crash_and_restart(stack, supervisor, clock, name="sender", instance=0, code=-9, up_s=0.0) -> float:
    """`up_s` after its start the instance exits with `code`; returns the wait until it was started again."""
    clock.advance(up_s)
    stack.processes[name][instance].exit(code)
    supervisor.poll()
    status = supervisor.statuses[(name, instance)]
    wait = status.restart_at - clock.now
    before = len(stack.starts)
    clock.advance(wait - 0.01)
    supervisor.poll()
    assert len(stack.starts) == before, "restarted before its wait was over"
    clock.advance(0.01)
    supervisor.poll()
    assert stack.starts[before:] == [(name, instance)]
    return wait


def test_the_wait_doubles_from_half_a_second_up_to_thirty(supervised):
    stack, supervisor, clock, lines = supervised
    waits = [crash_and_restart(stack, supervisor, clock) for _ in range(9)]
    for failures, wait in enumerate(waits, start=1):
        low, high = wait_bounds(failures)
        assert low <= wait <= high, (failures, wait)
    assert waits[-1] == 30.0 and waits[-2] == 30.0  # 0.5 * 2**7 = 64: capped
    assert supervisor.statuses[("sender", 0)].restarts == 9
    assert supervisor.statuses[("sender", 1)].restarts == 0  # nothing else touched


def test_a_service_that_refuses_its_configuration_is_reported_and_not_restarted(supervised):
    """Exit 78 (EX_CONFIG, e.g. a real provider with the public development secrets): restarting changes nothing."""
    stack, supervisor, clock, lines = supervised
    stack.processes["sender"][0].exit(78)
    for _ in range(5):
        supervisor.poll()
        clock.advance(60)
    assert stack.starts == []
    refusals = [line for line in lines if "refused its configuration" in line]
    assert len(refusals) == 1 and refusals[0].startswith("sender refused its configuration (exit 78); not restarted")
    state = {(s["service"], s["instance"]): s["state"] for s in
             json.loads((stack.log_dir / "supervision.json").read_text())}
    assert state[("sender", 0)] == "configuration refused" and state[("sender", 1)] == "running"


def test_the_back_off_starts_over_once_the_service_stayed_up(supervised):
    stack, supervisor, clock, lines = supervised
    for _ in range(4):
        crash_and_restart(stack, supervisor, clock)
    assert supervisor.statuses[("sender", 0)].failures == 4
    wait = crash_and_restart(stack, supervisor, clock, up_s=61.0)  # up a minute, then it crashes again
    assert wait_bounds(1)[0] <= wait <= wait_bounds(1)[1]
    assert supervisor.statuses[("sender", 0)].failures == 1


def test_each_exit_and_restart_is_one_line_naming_the_instance_its_exit_the_attempt_and_the_wait(supervised):
    stack, supervisor, clock, lines = supervised
    wait = crash_and_restart(stack, supervisor, clock, name="sender", instance=1, code=-9, up_s=12.0)
    exited, restarted = lines
    assert exited == f"sender-1 exited (exit -9, SIGKILL) after 12.0 s up; restart 1 in {wait:.1f} s"
    pid = stack.processes["sender"][1].process.pid
    assert restarted == f"restarted sender-1 (exit -9, SIGKILL) after {wait:.1f} s, restart 1, pid {pid}"
    crash_and_restart(stack, supervisor, clock, name="sender", instance=1, code=3)
    assert lines[-1].startswith("restarted sender-1 (exit 3) after ") and ", restart 2, pid " in lines[-1]
    assert describe_exit(-15) == "exit -15, SIGTERM" and describe_exit(1) == "exit 1"


def test_the_status_record_says_restarts_and_last_exit(supervised, tmp_path):
    stack, supervisor, clock, lines = supervised
    crash_and_restart(stack, supervisor, clock, name="simulator", code=-9)
    clock.advance(1)
    stack.processes["simulator"][0].exit(2)
    supervisor.poll()  # waiting to restart
    record = {(s["service"], s["instance"]): s
              for s in json.loads((tmp_path / "logs" / "supervision.json").read_text())}
    assert record[("simulator", 0)] | {"last_exit_time": None} == {
        "service": "simulator", "instance": 0, "pid": stack.processes["simulator"][0].process.pid,
        "state": "waiting to restart", "restarts": 1, "last_exit": 2, "last_exit_time": None, "crash_loop": False,
        "log": str(tmp_path / "logs" / "simulator.log"), "supervisor_pid": os.getpid()}
    assert record[("sender", 1)]["state"] == "running" and record[("sender", 1)]["restarts"] == 0


def test_a_crash_loop_is_reported_once_and_the_service_is_still_restarted(supervised, tmp_path):
    stack, supervisor, clock, lines = supervised
    log = tmp_path / "logs" / "sender.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("starting\n" + "".join(f"noise {i}\n" for i in range(20)) + "Error: OUTREACH_X is not set\n")
    for _ in range(4):
        crash_and_restart(stack, supervisor, clock, code=3, up_s=0.2)
    assert not any("CRASH LOOP" in line for line in lines)
    crash_and_restart(stack, supervisor, clock, code=3, up_s=0.2)  # the 5th exit within a minute
    reports = [line for line in lines if "CRASH LOOP" in line]
    assert len(reports) == 1
    report = reports[0]
    assert report.startswith("CRASH LOOP: sender exited 5 times within 60 s (last: exit 3).")
    assert f"Read {log}; its last lines:" in report and "| Error: OUTREACH_X is not set" in report
    assert "noise 0" not in report  # only the last lines
    assert supervisor.statuses[("sender", 0)].crash_loop

    for _ in range(6):  # still restarted, at the capped back-off, never reported again
        wait = crash_and_restart(stack, supervisor, clock, code=3, up_s=0.2)
    assert wait == 30.0 and supervisor.statuses[("sender", 0)].restarts == 11
    assert sum("CRASH LOOP" in line for line in lines) == 1
    assert lines[-1].endswith("(crash loop)")
    assert all(supervisor.statuses[key].restarts == 0 for key in (("sender", 1), ("simulator", 0)))
    assert ("sender", 1) not in stack.starts and ("simulator", 0) not in stack.starts

    clock.advance(60)  # it stays up: the loop is over, the back-off starts over
    supervisor.poll()
    assert lines[-1] == "sender has stayed up 60 s: crash loop over (11 restarts in all)"
    assert not supervisor.statuses[("sender", 0)].crash_loop
    wait = crash_and_restart(stack, supervisor, clock, code=3)
    assert wait <= wait_bounds(1)[1]


def test_exits_spread_out_are_no_crash_loop(supervised):
    stack, supervisor, clock, lines = supervised
    for _ in range(8):  # up 15 s each time: never 5 exits within 60 s
        crash_and_restart(stack, supervisor, clock, code=1, up_s=15.0)
    assert not any("CRASH LOOP" in line for line in lines)
    assert supervisor.statuses[("sender", 0)].restarts == 8


def test_a_process_restarted_by_hand_is_watched_from_its_new_start(supervised):
    stack, supervisor, clock, lines = supervised
    clock.advance(100)
    stack.start_service("sender")  # as Stack.restart does
    supervisor.poll()
    clock.advance(1)
    stack.processes["sender"][0].exit(1)
    supervisor.poll()
    assert lines == ["sender exited (exit 1) after 1.0 s up; restart 1 in "
                     f"{supervisor.statuses[('sender', 0)].wait_s:.1f} s"]


# ---------------------------------------------------------------- real processes

FAST = RestartPolicy(first_wait_s=0.1, longest_wait_s=0.4, healthy_after_s=60.0, crash_loop_exits=3,
                     crash_loop_window_s=60.0)


def service_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OUTREACH_DATA_DIR": str(tmp_path / "var"), "OUTREACH_SIMULATOR_PORT": str(free_port("127.0.0.1")),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "modules"), env.get("PYTHONPATH")]))})
    return env


class Lines:
    """The supervisor's report lines, from its thread, also printed as `outreach up` prints them."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        print(line, flush=True)
        with self._lock:
            self._lines.append(line)

    def matching(self, text: str) -> list[str]:
        with self._lock:
            return [line for line in self._lines if text in line]


def simulator_answers(env: dict[str, str]) -> bool:
    try:
        url = f"http://127.0.0.1:{env['OUTREACH_SIMULATOR_PORT']}/_simulator/stats"
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_a_killed_service_is_started_again_with_a_new_pid(tmp_path):
    env = service_env(tmp_path)
    lines = Lines()
    with Stack(env=env, log_dir=tmp_path / "logs", names=("simulator",)) as stack:
        supervisor = Supervisor(stack, FAST, report=lines, poll_interval_s=0.05,
                                status_path=tmp_path / "logs" / "supervision.json").start()
        try:
            wait_until(lambda: simulator_answers(env), 60, 0.1, message="the simulator did not start")
            first = stack.processes["simulator"][0].process.pid
            os.kill(first, signal.SIGKILL)

            wait_until(lambda: lines.matching("restarted simulator (exit -9, SIGKILL) after "), 30, 0.05,
                       message="no restart was reported")
            restarted = stack.processes["simulator"][0]
            assert restarted.process.pid != first and restarted.running
            assert lines.matching("simulator exited (exit -9, SIGKILL)")
            assert lines.matching(", restart 1, pid ")[0].endswith(f"pid {restarted.process.pid}")
            wait_until(lambda: simulator_answers(env), 60, 0.1, message="the restarted simulator does not serve")
            assert stack.dead() == []
            status = supervisor.statuses[("simulator", 0)]
            assert (status.restarts, status.last_exit, status.pid) == (1, -9, restarted.process.pid)
            record = json.loads((tmp_path / "logs" / "supervision.json").read_text())
            assert record[0]["restarts"] == 1 and record[0]["last_exit"] == -9
        finally:
            supervisor.stop()


def test_a_crash_looping_service_is_reported_while_the_other_keeps_running(tmp_path):
    env = service_env(tmp_path)
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "crashy_service.py").write_text(
        "import sys\nprint('crashy: OUTREACH_CRASHY_SETTING is not set', flush=True)\nsys.exit(3)\n")
    lines = Lines()
    with Stack(env=env, log_dir=tmp_path / "logs", names=("simulator", "crashy"),
               modules={**SERVICES, "crashy": "crashy_service"}) as stack:
        supervisor = Supervisor(stack, FAST, report=lines, poll_interval_s=0.05).start()
        try:
            wait_until(lambda: simulator_answers(env), 60, 0.1, message="the simulator did not start")
            simulator_pid = stack.processes["simulator"][0].process.pid

            reports = wait_until(lambda: lines.matching("CRASH LOOP"), 60, 0.05, message="no crash loop reported")
            log = tmp_path / "logs" / "crashy.log"
            assert reports[0].startswith("CRASH LOOP: crashy exited 3 times within 60 s (last: exit 3).")
            assert f"Read {log}" in reports[0] and "| crashy: OUTREACH_CRASHY_SETTING is not set" in reports[0]

            # still restarted after the report, at the capped back-off; reported once
            wait_until(lambda: supervisor.statuses[("crashy", 0)].restarts >= FAST.crash_loop_exits + 2, 60, 0.05,
                       message="the crash-looping service was given up on")
            assert len(lines.matching("CRASH LOOP")) == 1
            assert lines.matching("restarted crashy (exit 3) after ")

            # the other service and the stack were never touched
            simulator = stack.processes["simulator"][0]
            assert simulator.running and simulator.process.pid == simulator_pid
            assert ("simulator", 0) in supervisor.statuses and supervisor.statuses[("simulator", 0)].restarts == 0
            assert not lines.matching("simulator")
            assert simulator_answers(env)
        finally:
            supervisor.stop()
    assert not stack.processes["simulator"][0].running  # the stack stops as before


def test_the_stack_alone_does_not_restart_anything(tmp_path):
    """The end-to-end tests kill services on purpose and look at `Stack.dead()`: unsupervised, as before."""
    env = service_env(tmp_path)
    with Stack(env=env, log_dir=tmp_path / "logs", names=("simulator",)) as stack:
        killed = stack.processes["simulator"][0]
        stack.kill("simulator")
        assert stack.dead() == ["simulator"] and stack.processes["simulator"] == [killed]


def _process_env(pid: int) -> dict[str, str]:
    """The environment the process was started with, once it runs its own program (before the exec, /proc
    shows the forking parent's)."""
    wait_until(lambda: b"services." in Path(f"/proc/{pid}/cmdline").read_bytes(), 10, 0.01,
               message="the service process never started its module")
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_services_run_with_two_malloc_arenas_unless_the_environment_says_otherwise(tmp_path):
    env = {k: v for k, v in service_env(tmp_path).items() if not k.startswith("MALLOC_")}
    with Stack(env=env, log_dir=tmp_path / "logs", names=("simulator",)) as stack:
        started = _process_env(stack.processes["simulator"][0].process.pid)
        assert (started["MALLOC_ARENA_MAX"], started["MALLOC_TRIM_THRESHOLD_"]) == ("2", "131072")
    env["MALLOC_ARENA_MAX"] = "4"
    with Stack(env=env, log_dir=tmp_path / "logs2", names=("simulator",)) as stack:
        assert _process_env(stack.processes["simulator"][0].process.pid)["MALLOC_ARENA_MAX"] == "4"
