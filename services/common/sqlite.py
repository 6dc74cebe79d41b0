"""The one way services open their own SQLite files (journal, timers, checkpoints, read model, API store).

WAL with synchronous=NORMAL: a committed transaction survives any crash of the process (what the
standards ask), not a power cut; FULL costs about ten times as much per commit. Autocommit mode
(`isolation_level=None`): callers write `BEGIN ... COMMIT` themselves, so a use case is one transaction.
The connection may be used from a worker thread (`asyncio.to_thread`); a caller that shares it between
threads guards it with a lock.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

BUSY_TIMEOUT_S = 30.0


def open_sqlite(
    path: Path | str,
    *,
    synchronous: str = "NORMAL",
    cache_mib: int | None = None,
    busy_timeout_s: float = BUSY_TIMEOUT_S,
) -> sqlite3.Connection:
    """A connection to the SQLite file at `path` (its folder is created), set up as the module says.

    `synchronous="FULL"` for a file whose last commit must survive a power cut; `cache_mib` for a
    database that is read much more than it fits in SQLite's default 2 MiB page cache.
    """
    if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ValueError(f"synchronous={synchronous!r}")
    path = Path(path)
    if str(path) != ":memory:":
        path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    conn.execute("PRAGMA temp_store=MEMORY")
    if cache_mib:
        conn.execute(f"PRAGMA cache_size={-1024 * cache_mib}")
    return conn
