"""`outreach up`: the embedded broker and every service as its own process, in the foreground.

The same `Stack` runs the end-to-end tests and the benchmark, so what a newcomer runs is what is tested.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.common.embedded_broker import EmbeddedBroker, parse_bootstrap, port_answers

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


@dataclass
class Stack:
    """Every service as a process, sharing one environment (settings come only from the environment)."""
    env: dict[str, str]
    log_dir: Path
    names: tuple[str, ...] = tuple(SERVICES)
    processes: dict[str, list[ServiceProcess]] = field(default_factory=dict)
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)  # per-service overrides
    instances: dict[str, int] = field(default_factory=dict)  # how many of a service (default one)

    def start(self) -> "Stack":
        for name in self.names:
            for instance in range(self.instances.get(name, 1)):
                self.start_service(name, instance)
        return self

    def start_service(self, name: str, instance: int = 0) -> ServiceProcess:
        suffix = f"-{instance}" if instance else ""
        env = {**self.env, **self.service_env.get(name, {})}
        if instance:  # its own local files (the sender's journal...) beside the first instance's
            env["OUTREACH_INSTANCE_NAME"] = str(instance)
        proc = ServiceProcess(name, SERVICES[name], env, self.log_dir / f"{name}{suffix}.log")
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


def start_embedded_broker_if_needed(bootstrap: str, external: bool) -> EmbeddedBroker | None:
    """The embedded broker at `bootstrap`, unless told to use an external one. Something already answering
    there is refused, named: a second stack on one broker would share the first one's consumer groups and
    split its work (say OUTREACH_EXTERNAL_KAFKA=true to mean it)."""
    host, port = parse_bootstrap(bootstrap)
    if external:
        return None
    if port_answers(host, port):
        what = listener_on(port) or "a process this user cannot see"
        raise BrokerPortTaken(
            f"Something already answers at {bootstrap}: {what}. `outreach up` starts its own broker there. "
            "Stop it, choose another KAFKA_BOOTSTRAP_SERVERS, or set OUTREACH_EXTERNAL_KAFKA=true to use "
            "that broker (give each stack its own OUTREACH_DEPLOYMENT, or they share consumer groups).")
    broker = EmbeddedBroker(host, port)
    broker.start()
    print(f"Embedded broker (tansu, memory only) listening at {bootstrap}.")
    return broker


def run_up(*, demo: bool, exit_after_summary: bool, demo_size: int = 200,
           instances: dict[str, int] | None = None) -> int:
    from services.common.settings import get_settings

    settings = get_settings()
    env = dict(os.environ)
    data_dir = Path(settings.data_dir)
    try:
        broker = start_embedded_broker_if_needed(settings.kafka_bootstrap_servers, settings.external_kafka)
    except BrokerPortTaken as exc:
        print(exc, file=sys.stderr)
        return 1
    stack = Stack(env=env, log_dir=data_dir / "logs", instances=instances or {})
    interrupted = False

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
        started = [f"{name} x{stack.instances[name]}" if stack.instances.get(name, 1) > 1 else name
                   for name in stack.names]
        print(f"Services started ({', '.join(started)}); logs in {stack.log_dir}/.")
        print(f"HTTP API at http://{settings.api_host}:{settings.api_port} (docs at /docs).")
        if demo:
            from outreach.demo import run_demo
            from outreach.tokens import demo_token

            ok = run_demo(settings, size=demo_size)
            token = demo_token()
            print(f"Demo API token (org_admin): {token}\n  try: curl -H 'Authorization: Bearer {token}' "
                  f"http://{settings.api_host}:{settings.api_port}/campaigns")
            if exit_after_summary:
                return 0 if ok else 1
        print("Serving. Press Ctrl-C to stop.")
        while True:
            time.sleep(0.5)
            dead = stack.dead()
            if dead:
                print(f"Service(s) exited: {', '.join(dead)}; see {stack.log_dir}/.", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        interrupted = True
        return 0
    finally:
        stack.stop()
        if broker is not None:
            broker.stop()
        if interrupted:
            print("Stopped.")
