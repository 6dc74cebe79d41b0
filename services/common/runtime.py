"""The entry point every service process shares: logging (services/common/logs.py), settings from the
environment, the safe-defaults check, and a clean stop on SIGTERM / SIGINT (the `stop` event a service's
`serve(settings, stop)` watches)."""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import signal
import sys
import tracemalloc
from collections.abc import Awaitable, Callable

from pydantic import ValidationError

from services.common import logs, safe_defaults
from services.common.settings import Settings, get_settings

Serve = Callable[[Settings, asyncio.Event], Awaitable[None]]

EXIT_CONFIG = 78  # EX_CONFIG (sysexits.h): the configuration is refused; restarting changes nothing

log = logging.getLogger("outreach")


def refuse_unsafe_defaults(settings: Settings) -> None:
    """Exit (status 78) naming every setting to set, when a real provider endpoint is configured while a
    secret keeps its public development value (services/common/safe_defaults.py)."""
    problems = safe_defaults.unsafe_defaults(settings)
    if problems:
        log.critical("%s", safe_defaults.refusal(settings, problems))
        sys.exit(EXIT_CONFIG)


def settings_refusal(exc: ValidationError) -> str:
    """One line naming every setting the environment gives a value no service can run with."""
    problems = []
    for error in exc.errors(include_url=False):
        if error["type"] == "value_error":  # our validators name the variable themselves
            problems.append(f"{str(error['msg']).removeprefix('Value error, ')} (got {error.get('input')!r})")
        else:
            problems.append(f"{'.'.join(map(str, error['loc']))}: {error['msg']} (got {error.get('input')!r})")
    return f"the configuration is refused: {'; '.join(problems)}"


def settings_or_exit() -> Settings:
    """The settings from the environment, or exit (status 78) saying which value is refused and why, e.g. an
    OUTREACH_DEFAULT_REGION phonenumbers does not know: restarting would change nothing."""
    try:
        return get_settings()
    except ValidationError as exc:
        message = settings_refusal(exc)
        log.critical("%s", message)  # on stderr even before logging is configured (logging.lastResort)
        sys.exit(EXIT_CONFIG)


# glibc keeps memory freed by a process (its heap and the arenas of worker threads) for reuse, and hands it back
# to the system only from the top of the main heap: after a burst (a backlog of records, a large batch) a
# long-running service kept tens of MB it no longer used (the timeout sweeper: 1.2x more at a 300,000-message
# campaign than at 30,000). malloc_trim(0) returns the free pages of every arena; a few ms every 10 s.
TRIM_EVERY_S = 10.0


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


async def trim_memory(stop: asyncio.Event, every_s: float = TRIM_EVERY_S) -> None:
    """Hands freed memory back to the system every `every_s` until `stop` (see TRIM_EVERY_S)."""
    trim = _malloc_trim()
    if trim is None:
        return
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        trim()


def log_allocations(top: int = 25) -> None:
    """The `top` source lines holding the most memory allocated by Python now (a process started with
    PYTHONTRACEMALLOC=N; `kill -USR2 PID` asks): a memory investigation without a debugger."""
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    stats = snapshot.statistics("traceback" if tracemalloc.get_traceback_limit() > 1 else "lineno")
    lines = [f"{stat.size / 1e6:8.2f} MB {stat.count:9d} blocks  "
             + " <- ".join(str(frame) for frame in stat.traceback[:4]) for stat in stats[:top]]
    log.warning("memory held by Python (tracemalloc), %.1f MB in all, largest first:\n%s",
                sum(stat.size for stat in stats) / 1e6, "\n".join(lines))


def run_service(serve: Serve, service: str) -> None:
    """Run `serve` until SIGTERM / SIGINT, `service` naming the process in its log lines (services/common/logs.py)."""
    logs.configure(service)  # first: a refused setting below is logged in the chosen format
    settings = settings_or_exit()
    refuse_unsafe_defaults(settings)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if tracemalloc.is_tracing():  # PYTHONTRACEMALLOC=N: where the memory is, on demand
            loop.add_signal_handler(signal.SIGUSR2, log_allocations)
        trimming = asyncio.create_task(trim_memory(stop))
        try:
            await serve(settings, stop)
        finally:
            stop.set()
            await trimming

    asyncio.run(runner())
