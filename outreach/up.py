"""`outreach up`: the embedded broker and every service as its own process, in the foreground.

The same `Stack` runs the end-to-end tests and the benchmark, so what a newcomer runs is what is tested.
`outreach up` adds a `Supervisor`: a service that exits is started again after a back-off, and a crash loop
is reported without stopping the other services or the broker. The tests' `Stack` is not supervised (they
kill services on purpose and look at `Stack.dead()`).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from services.common import safe_defaults
from services.common.embedded_broker import EmbeddedBroker, parse_bootstrap, port_answers
from services.common.runtime import EXIT_CONFIG
from services.common.retry import backoff_s

# name -> python module run as `python -m MODULE`
SERVICES: dict[str, str] = {
    "command-handler": "services.command_handler",
    "relay": "services.command_handler.relay",
    "sender": "services.sender",
    "webhooks": "services.webhook_receiver",
    "timeout-sweeper": "services.timeout_sweeper",
    "projections": "services.projections",
    "simulator": "services.simulator",
    "api": "services.api",
}

# Services proven to run as several instances at once (docs/design.md says each one's rule).
# (docs/design.md, "Scaling out"; the API and the webhook receiver share their port.)
SCALABLE = ("command-handler", "relay", "sender", "timeout-sweeper", "projections", "webhooks", "api")


def parse_instances(specs: list[str]) -> dict[str, int]:
    """`NAME=N` items (`--instances sender=2`) -> {name: N}; ValueError naming what is wrong."""
    counts: dict[str, int] = {}
    for spec in specs:
        name, _, count = spec.partition("=")
        if name not in SCALABLE:
            raise ValueError(f"{name!r} cannot run as several instances (those that can: {', '.join(SCALABLE)})")
        if not count.isdigit() or not 1 <= int(count) <= 8:
            raise ValueError(f"{spec!r}: the count must be a whole number from 1 to 8")
        counts[name] = int(count)
    return counts


@dataclass
class ServiceProcess:
    name: str
    module: str
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", self.module], env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the crash every service must survive."""
        if self.running:
            self.process.kill()
            self.process.wait()

    def terminate(self, timeout_s: float = 10) -> None:
        if self.running:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()


# glibc keeps what a process freed: an arena per allocating thread (up to 8 a core), and a trim threshold that
# rises with every large buffer freed (fetched batches are about 1 MB). A service behind a long backlog crept
# up although every batch is bounded (the sweeper alone behind 300,000 messages' statuses: 158.8 MB peak, 1.14x
# its 30,000 figure; with these two: 143.0 MB, 1.08x). The environment may say otherwise (docs: mallopt(3)).
SERVICE_PROCESS_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "131072"}


@dataclass
class Stack:
    """Every service as a process, sharing one environment (settings come only from the environment)."""
    env: dict[str, str]
    log_dir: Path
    names: tuple[str, ...] = tuple(SERVICES)
    processes: dict[str, list[ServiceProcess]] = field(default_factory=dict)
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)  # per-service overrides
    instances: dict[str, int] = field(default_factory=dict)  # how many of a service (default one)
    modules: dict[str, str] = field(default_factory=lambda: dict(SERVICES))  # name -> module (tests add theirs)

    def start(self) -> "Stack":
        for name in self.names:
            for instance in range(self.instances.get(name, 1)):
                self.start_service(name, instance)
        return self

    def start_service(self, name: str, instance: int = 0) -> ServiceProcess:
        suffix = f"-{instance}" if instance else ""
        # Metrics and health: every process on a free port of its own (all share one host), recorded in
        # data_dir/instances/NAME[-N].json (services/common/observability.py); a per-service override wins.
        env = {**SERVICE_PROCESS_ENV, **self.env, "OUTREACH_METRICS_PORT": "0", **self.service_env.get(name, {})}
        if instance:  # its own local files (the sender's journal...) beside the first instance's
            env["OUTREACH_INSTANCE_NAME"] = str(instance)
        proc = ServiceProcess(name, self.modules[name], env, self.log_dir / f"{name}{suffix}.log")
        proc.start()
        instances = self.processes.setdefault(name, [])
        instances[instance:instance + 1] = [proc]
        return proc

    def kill(self, name: str, instance: int = 0) -> None:
        self.processes[name][instance].kill()

    def restart(self, name: str, instance: int = 0) -> None:
        self.processes[name][instance].kill()
        self.start_service(name, instance)

    def dead(self) -> list[str]:
        return [p.name for ps in self.processes.values() for p in ps if not p.running]

    def stop(self) -> None:
        for ps in self.processes.values():
            for p in ps:
                if p.running:
                    p.process.terminate()
        for ps in self.processes.values():
            for p in ps:
                p.terminate()

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------ supervision (`outreach up` only)

@dataclass(frozen=True)
class RestartPolicy:
    """When an exited service is started again, and when its exits count as a crash loop.

    The wait is the project's one back-off rule (services.common.retry.backoff_s): it doubles from
    `first_wait_s` with up to `first_wait_s` of jitter, at most `longest_wait_s`. It starts over once the
    service has stayed up `healthy_after_s`. `crash_loop_exits` exits within `crash_loop_window_s` is a crash
    loop: reported once, and the service is still restarted at the capped back-off."""
    first_wait_s: float = 0.5
    longest_wait_s: float = 30.0
    healthy_after_s: float = 60.0
    crash_loop_exits: int = 5
    crash_loop_window_s: float = 60.0

    def wait_s(self, failures: int) -> float:
        return backoff_s(failures, first_wait_s=self.first_wait_s, longest_wait_s=self.longest_wait_s)


def describe_exit(code: int | None) -> str:
    """An exit as the supervisor's lines show it: `exit 3`, or `exit -9, SIGKILL` when a signal ended it."""
    if code is not None and code < 0:
        try:
            return f"exit {code}, {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit {code}"


def log_tail(path: Path, lines: int = 8) -> list[str]:
    """The last `lines` lines of a log file (its last 8 KiB), [] if there is none."""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 8192))
            return log.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return []


@dataclass
class ServiceStatus:
    """What the supervisor knows of one service instance (also written to `supervision.json`)."""
    name: str
    instance: int
    log_path: Path
    pid: int | None
    started_at: float  # supervisor clock
    restarts: int = 0  # every restart since `outreach up` began
    failures: int = 0  # exits in a row without staying up `healthy_after_s`: drives the back-off
    last_exit: int | None = None
    last_exit_time: str | None = None  # wall clock, ISO 8601
    restart_at: float | None = None  # supervisor clock; set while waiting to restart
    wait_s: float = 0.0  # the wait before the pending (or last) restart
    crash_loop: bool = False
    refused: bool = False  # exited refusing its configuration: not restarted (restarting changes nothing)
    exits: deque[float] = field(default_factory=deque)  # exit times within the crash-loop window

    @property
    def label(self) -> str:
        return f"{self.name}-{self.instance}" if self.instance else self.name

    def as_dict(self) -> dict:
        return {"service": self.name, "instance": self.instance, "pid": self.pid,
                "state": "configuration refused" if self.refused else
                         "waiting to restart" if self.restart_at is not None else "running",
                "restarts": self.restarts, "last_exit": self.last_exit, "last_exit_time": self.last_exit_time,
                "crash_loop": self.crash_loop, "log": str(self.log_path),
                "supervisor_pid": os.getpid()}  # `outreach status` trusts the record only while it runs


class Supervisor:
    """Keeps a `Stack`'s services running: `poll()` restarts each exited one after its back-off, reports every
    exit and restart in one line, and a crash loop once, prominently. `start()` polls in a background thread.

    The clock and the reporting are injectable (tests drive `poll()` with a fake clock)."""

    def __init__(self, stack: Stack, policy: RestartPolicy = RestartPolicy(), *,
                 clock: Callable[[], float] = time.monotonic, report: Callable[[str], None] | None = None,
                 status_path: Path | None = None, poll_interval_s: float = 0.5) -> None:
        self.stack = stack
        self.policy = policy
        self.clock = clock
        self.report = report or (lambda line: print(line, file=sys.stderr, flush=True))
        self.status_path = status_path
        self.poll_interval_s = poll_interval_s
        self.statuses: dict[tuple[str, int], ServiceStatus] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> None:
        """One look at every process: note exits, start those whose wait is over, reset recovered back-offs."""
        now = self.clock()
        changed = False
        for name, processes in list(self.stack.processes.items()):
            for instance, proc in enumerate(list(processes)):
                status = self.statuses.get((name, instance))
                pid = proc.process.pid if proc.process is not None else None
                if status is None or (status.restart_at is None and status.pid != pid):
                    # new to us, or started again by someone else (Stack.restart): up since now
                    status = self._watch(status, name, instance, proc, now)
                    changed = True
                if status.refused:
                    continue
                if status.restart_at is not None:
                    if now >= status.restart_at:
                        self._restart(status, now)
                        changed = True
                elif proc.running:
                    self._maybe_recovered(status, now)
                else:
                    self._exited(status, proc.process.returncode if proc.process else None, now)
                    changed = True
        if changed:
            self._write_status()

    def _watch(self, status: ServiceStatus | None, name: str, instance: int, proc: ServiceProcess,
               now: float) -> ServiceStatus:
        pid = proc.process.pid if proc.process is not None else None
        if status is None:
            status = self.statuses[(name, instance)] = ServiceStatus(name, instance, proc.log_path, pid, now)
        status.pid, status.started_at = pid, now
        return status

    def _exited(self, status: ServiceStatus, code: int | None, now: float) -> None:
        policy = self.policy
        if code == EXIT_CONFIG:
            status.refused = True
            status.last_exit, status.last_exit_time = code, datetime.now(UTC).isoformat(timespec="seconds")
            tail = "".join(f"\n    | {line}" for line in log_tail(status.log_path))
            self.report(f"{status.label} refused its configuration (exit {code}); not restarted: fix the settings "
                        f"its log names, then start outreach up again. Read {status.log_path}"
                        + (f"; its last lines:{tail}" if tail else ""))
            return
        if now - status.started_at >= policy.healthy_after_s:
            status.failures = 0
        status.failures += 1
        status.last_exit, status.last_exit_time = code, datetime.now(UTC).isoformat(timespec="seconds")
        status.exits.append(now)
        while status.exits and status.exits[0] < now - policy.crash_loop_window_s:
            status.exits.popleft()
        status.wait_s = policy.wait_s(status.failures)
        status.restart_at = now + status.wait_s
        self.report(f"{status.label} exited ({describe_exit(code)}) after {now - status.started_at:.1f} s up; "
                    f"restart {status.restarts + 1} in {status.wait_s:.1f} s")
        if not status.crash_loop and len(status.exits) >= policy.crash_loop_exits:
            status.crash_loop = True
            tail = "".join(f"\n    | {line}" for line in log_tail(status.log_path))
            self.report(f"CRASH LOOP: {status.label} exited {len(status.exits)} times within "
                        f"{policy.crash_loop_window_s:g} s (last: {describe_exit(code)}). Still restarting it "
                        f"(waiting up to {policy.longest_wait_s:g} s between tries); the other services keep running. "
                        f"Read {status.log_path}" + (f"; its last lines:{tail}" if tail else ""))

    def _restart(self, status: ServiceStatus, now: float) -> None:
        status.restart_at = None
        try:
            proc = self.stack.start_service(status.name, status.instance)
        except OSError as exc:  # could not even start it (no such interpreter, no file handles...)
            self.report(f"could not restart {status.label}: {exc}")
            status.started_at = now
            self._exited(status, status.last_exit, now)
            return
        status.restarts += 1
        status.pid, status.started_at = proc.process.pid, now
        self.report(f"restarted {status.label} ({describe_exit(status.last_exit)}) after {status.wait_s:.1f} s, "
                    f"restart {status.restarts}, pid {status.pid}" + (" (crash loop)" if status.crash_loop else ""))

    def _maybe_recovered(self, status: ServiceStatus, now: float) -> None:
        if status.failures and now - status.started_at >= self.policy.healthy_after_s:
            status.failures = 0
            if status.crash_loop:
                status.crash_loop = False
                status.exits.clear()
                self.report(f"{status.label} has stayed up {self.policy.healthy_after_s:g} s: crash loop over "
                            f"({status.restarts} restarts in all)")
                self._write_status()

    def _write_status(self) -> None:
        if self.status_path is None:
            return
        try:
            self.status_path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.status_path.with_suffix(".tmp")
            partial.write_text(json.dumps([s.as_dict() for s in self.statuses.values()], indent=1))
            os.replace(partial, self.status_path)
        except OSError:
            pass  # the record is a convenience; supervision goes on without it

    def start(self) -> "Supervisor":
        """Poll every `poll_interval_s` in a background thread until `stop()`."""
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="outreach-supervisor", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stopping.wait(self.poll_interval_s):
            try:
                self.poll()
            except Exception as exc:  # never let one bad look end supervision
                self.report(f"supervisor: {exc!r}")

    def stop(self) -> None:
        """Stop polling (before the stack stops, so that nothing is started while it does)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class BrokerPortTaken(RuntimeError):
    """Something already answers on the port `outreach up` would start its broker on."""


def listener_on(port: int) -> str | None:
    """The process listening on a local TCP port: "NAME (pid N: COMMAND LINE)", or None if unknown."""
    import psutil

    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):  # not allowed to look (another user's sockets)
        return None
    for connection in connections:
        if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port \
                and connection.pid:
            try:
                process = psutil.Process(connection.pid)
                return f"{process.name()} (pid {connection.pid}: {' '.join(process.cmdline())[:160]})"
            except psutil.Error:
                return f"pid {connection.pid}"
    return None


def check_broker_port(bootstrap: str, external: bool) -> None:
    """BrokerPortTaken, naming what answers, if something already answers where the embedded broker would
    listen: a second stack on one broker would share the first one's consumer groups and split its work (say
    OUTREACH_EXTERNAL_KAFKA=true to mean it)."""
    host, port = parse_bootstrap(bootstrap)
    if external:
        return
    if port_answers(host, port):
        what = listener_on(port) or "a process this user cannot see"
        raise BrokerPortTaken(
            f"Something already answers at {bootstrap}: {what}. `outreach up` starts its own broker there. "
            "Stop it, choose another KAFKA_BOOTSTRAP_SERVERS, or set OUTREACH_EXTERNAL_KAFKA=true to use "
            "that broker (give each stack its own OUTREACH_DEPLOYMENT, or they share consumer groups).")


class ServicePortTaken(RuntimeError):
    """A port a service of `outreach up` would listen on cannot be bound."""


def service_ports(settings, names: tuple[str, ...] = tuple(SERVICES)) -> list[tuple[str, str, int, str]]:
    """(service, host, port, setting) of every listening service `outreach up` starts (instances of the API and
    of the webhook receiver share their port)."""
    wanted = {"simulator": (settings.simulator_host, settings.simulator_port, "OUTREACH_SIMULATOR_PORT"),
              "webhooks": (settings.webhook_host, settings.webhook_port, "OUTREACH_WEBHOOK_PORT"),
              "api": (settings.api_host, settings.api_port, "OUTREACH_API_PORT")}
    return [(name, *wanted[name]) for name in names if name in wanted]


def port_taken(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on (bound as the services bind it, SO_REUSEADDR), or None if it can."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return f"{host} does not resolve: {exc}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def check_service_ports(settings, names: tuple[str, ...] = tuple(SERVICES)) -> None:
    """ServicePortTaken naming every port a service would listen on that cannot be bound, and which service
    wanted it (and what listens there, when this user may see it): checked before anything is started."""
    problems = []
    for name, host, port, setting in service_ports(settings, names):
        why = port_taken(host, port)
        if why is not None:
            who = listener_on(port)
            problems.append(f"port {port} on {host} ({name}, {setting}) is taken: {why}"
                            + (f"; listening: {who}" if who else ""))
    if problems:
        raise ServicePortTaken("Cannot start: " + "; ".join(problems) + ". Stop what uses it or choose another "
                               "port; nothing was started.")


def start_embedded_broker_if_needed(bootstrap: str, external: bool) -> EmbeddedBroker | None:
    """The embedded broker at `bootstrap`, unless told to use an external one (check_broker_port first)."""
    check_broker_port(bootstrap, external)
    if external:
        return None
    host, port = parse_bootstrap(bootstrap)
    broker = EmbeddedBroker(host, port)
    broker.start()
    print(f"Embedded broker (tansu, memory only) listening at {bootstrap}.")
    return broker


def run_up(*, demo: bool, exit_after_summary: bool, demo_size: int = 200,
           instances: dict[str, int] | None = None) -> int:
    from services.common.runtime import settings_or_exit

    settings = settings_or_exit()  # a value no service accepts (OUTREACH_DEFAULT_REGION...): said once, exit 78
    problems = safe_defaults.unsafe_defaults(settings)
    if problems:  # every service would refuse to start: say so once, before starting anything
        print(safe_defaults.refusal(settings, problems), file=sys.stderr)
        return EXIT_CONFIG
    env = dict(os.environ)
    data_dir = Path(settings.data_dir)
    try:  # every port first: nothing is started when one is taken
        check_broker_port(settings.kafka_bootstrap_servers, settings.external_kafka)
        check_service_ports(settings)
    except (BrokerPortTaken, ServicePortTaken) as exc:
        print(exc, file=sys.stderr)
        return 1
    # Operator commands (`outreach token`, `replay`) find this stack's data folder from any folder.
    from outreach.config import write_stack

    write_stack(data_dir, pid=os.getpid(), api_url=f"http://{settings.api_host}:{settings.api_port}",
                kafka_bootstrap_servers=settings.kafka_bootstrap_servers, started_at=datetime.now(UTC).isoformat())
    try:
        broker = start_embedded_broker_if_needed(settings.kafka_bootstrap_servers, settings.external_kafka)
    except BrokerPortTaken as exc:
        print(exc, file=sys.stderr)
        return 1
    stack = Stack(env=env, log_dir=data_dir / "logs", instances=instances or {})
    supervisor = Supervisor(stack, status_path=stack.log_dir / "supervision.json")
    interrupted = False

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
        supervisor.start()  # from now on (the demo too): an exited service is restarted, never the end
        started = [f"{name} x{stack.instances[name]}" if stack.instances.get(name, 1) > 1 else name
                   for name in stack.names]
        print(f"Services started ({', '.join(started)}); logs in {stack.log_dir}/.")
        print(f"HTTP API at http://{settings.api_host}:{settings.api_port} (docs at /docs).")
        print(f"Metrics and health (/metrics, /healthz, /readyz) of every instance: {data_dir / 'instances'}/*.json.")
        if demo:
            from outreach.demo import run_demo
            from outreach.tokens import demo_token
            from outreach.users import demo_user

            ok = run_demo(settings, size=demo_size)
            token = demo_token()
            print(f"Demo API token (org_admin): {token}\n  try: curl -H 'Authorization: Bearer {token}' "
                  f"http://{settings.api_host}:{settings.api_port}/campaigns")
            username, password = demo_user()
            print(f"Demo console sign-in (org_admin): http://{settings.api_host}:{settings.api_port}/console/ "
                  f"user {username}, password {password}")
            if exit_after_summary:
                return 0 if ok else 1
        print("Serving (a service that exits is restarted). Press Ctrl-C to stop.")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        interrupted = True
        return 0
    finally:
        supervisor.stop()
        stack.stop()
        if broker is not None:
            broker.stop()
        if interrupted:
            print("Stopped.")
