"""The shared runtime hands freed memory back to the system (services/common/runtime.py, TRIM_EVERY_S)."""
from __future__ import annotations

import asyncio
import sys

import pytest

from services.common import runtime


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_glibc_malloc_trim_is_found_and_callable():
    trim = runtime._malloc_trim()
    assert trim is not None and trim() in (0, 1)


async def test_trimming_runs_every_period_and_ends_with_the_stop(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "_malloc_trim", lambda: lambda: calls.append(1))
    stop = asyncio.Event()
    task = asyncio.create_task(runtime.trim_memory(stop, every_s=0.02))
    deadline = asyncio.get_running_loop().time() + 5
    while len(calls) < 3 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert len(calls) >= 3
    stop.set()
    await asyncio.wait_for(task, 1)


async def test_no_trimming_where_the_c_library_has_none(monkeypatch):
    monkeypatch.setattr(runtime, "_malloc_trim", lambda: None)
    await asyncio.wait_for(runtime.trim_memory(asyncio.Event(), every_s=0.01), 1)  # returns at once
