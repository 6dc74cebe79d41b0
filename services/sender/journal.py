"""The sender's durable journal (SQLite, WAL) at `settings.data_dir / "sender-journal.db"` (one per instance:
`sender-journal-NAME.db` for `OUTREACH_INSTANCE_NAME=NAME`).

- `handoffs`: one row per (message_id, claim_id): `claimed` when the claim arrives, `done` with the
  provider's results once known: a cache, so a redelivered WorkClaimed re-publishes the results of `done`
  rows. Whether a message may be submitted is the hand-off fence's to say (services/common/fence.py), not
  this file's. (`handed_off` rows come only from journals written before the fence: left alone.)
- `active_campaigns`: the campaigns the sender is claiming for (resumed after a restart).
- `campaigns`: what the sender learnt from campaign events: the channel (CampaignRunStarted does not carry
  it), the SMS template's segments per message (sizes claims after a restart too) and the last run
  started, so a redelivered CampaignRunStarted / RetryStarted does not restart claiming.
- `event_positions`: per partition of the campaign events, the next offset to read. Every sender reads
  every campaign event (no consumer group): holds and runs concern all instances, and whichever owns a
  campaign tomorrow must know it today. A lost journal reads them again from the start (idempotent).

Calls are short and batched (one transaction per claim and per results flush), so they run on the event
loop's thread. Opened by `services.common.sqlite.open_sqlite` (WAL, `synchronous=NORMAL`): a commit survives
any crash of the process (what every service must survive); only a power cut can lose the last few.
"""
from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from services.common import jsoncodec
from services.common.settings import Settings
from services.common.sqlite import open_sqlite

JOURNAL_FILE = "sender-journal.db"
BUSY_TIMEOUT_S = 5.0  # one process writes it: a lock held longer than this is a bug, not contention

_SCHEMA = """
CREATE TABLE IF NOT EXISTS handoffs (
    message_id  TEXT NOT NULL,
    claim_id    TEXT NOT NULL,
    campaign_id TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('claimed', 'handed_off', 'done')),
    results     TEXT,               -- JSON list of result dicts, once done
    updated_at  REAL NOT NULL,
    PRIMARY KEY (message_id, claim_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS handoffs_by_claim ON handoffs (claim_id);
CREATE INDEX IF NOT EXISTS handoffs_by_age ON handoffs (updated_at);
CREATE TABLE IF NOT EXISTS active_campaigns (
    campaign_id TEXT PRIMARY KEY,
    channel     TEXT,               -- null until learnt
    run_no      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS campaigns (
    campaign_id TEXT PRIMARY KEY,
    channel     TEXT,
    run_no      INTEGER NOT NULL DEFAULT 0,  -- last run (or retry) started
    segments    REAL,                        -- SMS: segments per message, once known
    ended       INTEGER NOT NULL DEFAULT 0   -- the last run ended (stopped, deleted, final status)
);
-- Campaigns told `held: true` by a breaker and not yet told `held: false`: kept so that a sender restarted
-- during an outage still tells them when sending resumes.
-- Holds seen in the campaign events (any sender's) and not yet lifted: a restarted sender must still pause
-- the campaign's claims and probe (the CampaignSendingHeld it read before the restart does not come again).
CREATE TABLE IF NOT EXISTS holds_seen (
    campaign_id TEXT PRIMARY KEY,
    provider    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS event_positions (
    partition   INTEGER PRIMARY KEY,
    next_offset INTEGER NOT NULL
);
-- Each campaign's template as its campaign events last gave it: work records name it by digest (a template
-- may be up to 1 MiB), and a restarted sender does not read those events again.
CREATE TABLE IF NOT EXISTS templates (
    campaign_id TEXT PRIMARY KEY,
    digest      TEXT NOT NULL,
    template    TEXT NOT NULL        -- JSON
);
CREATE TABLE IF NOT EXISTS held_campaigns (
    provider    TEXT NOT NULL,
    campaign_id TEXT NOT NULL,
    PRIMARY KEY (provider, campaign_id)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class Handoff:
    state: str  # 'claimed' | 'handed_off' | 'done'
    results: list[dict] | None


@dataclass(frozen=True)
class ActiveCampaign:
    campaign_id: str
    channel: str | None
    run_no: int
    segments: float | None = None


def journal_path(settings: Settings) -> Path:
    return settings.instance_file(JOURNAL_FILE)


class Journal:
    def __init__(self, path: Path):
        self._db = open_sqlite(path, busy_timeout_s=BUSY_TIMEOUT_S)  # autocommit: explicit BEGIN/COMMIT below
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(campaigns)")}
        if "segments" not in columns:  # a journal from before it
            self._db.execute("ALTER TABLE campaigns ADD COLUMN segments REAL")
        if "ended" not in columns:
            self._db.execute("ALTER TABLE campaigns ADD COLUMN ended INTEGER NOT NULL DEFAULT 0")

    @classmethod
    def open(cls, settings: Settings) -> "Journal":
        return cls(journal_path(settings))

    def close(self) -> None:
        self._db.close()

    def _write(self, fn):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(self._db)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return result

    # ------------------------------------------------------------------ hand-offs

    def begin(self, claim_id: str, campaign_id: str, message_ids: Iterable[str]) -> dict[str, Handoff]:
        """Journal every message of a claim as claimed, in one transaction, unless already journalled.

        Returns the entries handed off or done before (a redelivered claim); the others may be submitted.
        """
        message_ids = list(message_ids)

        def write(db: sqlite3.Connection) -> dict[str, Handoff]:
            wanted = set(message_ids)
            existing = {mid: Handoff(state, jsoncodec.loads(results) if results else None)
                        for mid, state, results in db.execute(
                            "SELECT message_id, state, results FROM handoffs WHERE claim_id = ?", (claim_id,))
                        if mid in wanted}
            now = time.time()
            db.executemany(
                "INSERT INTO handoffs (message_id, claim_id, campaign_id, state, updated_at) "
                "VALUES (?, ?, ?, 'claimed', ?)",
                [(mid, claim_id, campaign_id, now) for mid in message_ids if mid not in existing])
            return {mid: h for mid, h in existing.items() if h.state != "claimed"}

        return self._write(write)

    def finish(self, rows: Iterable[tuple[str, str, list[dict]]]) -> None:
        """Mark (message_id, claim_id, results) rows done with the provider's results, in one transaction."""
        now = time.time()
        params = [(jsoncodec.dumps(results).decode(), now, mid, cid) for mid, cid, results in rows]
        if params:
            self._write(lambda db: db.executemany(
                "UPDATE handoffs SET state = 'done', results = ?, updated_at = ? "
                "WHERE message_id = ? AND claim_id = ?", params))

    def forget(self, claim_id: str, message_ids: Iterable[str]) -> None:
        """Drop hand-offs that were journalled but certainly never submitted (a stop before their turn)."""
        params = [(mid, claim_id) for mid in message_ids]
        if params:
            self._write(lambda db: db.executemany(
                "DELETE FROM handoffs WHERE message_id = ? AND claim_id = ? AND state = 'claimed'", params))

    def handoff(self, message_id: str, claim_id: str) -> Handoff | None:
        row = self._db.execute("SELECT state, results FROM handoffs WHERE message_id = ? AND claim_id = ?",
                               (message_id, claim_id)).fetchone()
        return Handoff(row[0], jsoncodec.loads(row[1]) if row[1] else None) if row else None

    def prune(self, older_than_s: float) -> int:
        """Delete finished hand-offs older than this (a claim is redelivered within minutes, not days)."""
        cutoff = time.time() - older_than_s
        return self._write(lambda db: db.execute(
            "DELETE FROM handoffs WHERE state = 'done' AND updated_at < ?", (cutoff,)).rowcount)

    # ------------------------------------------------------------------ campaigns

    def learn_channel(self, campaign_id: str, channel: str) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO campaigns (campaign_id, channel) VALUES (?, ?) "
                       "ON CONFLICT (campaign_id) DO UPDATE SET channel = excluded.channel", (campaign_id, channel))
            db.execute("UPDATE active_campaigns SET channel = ? WHERE campaign_id = ?", (channel, campaign_id))

        self._write(write)

    def learn_segments(self, campaign_id: str, segments: float) -> None:
        self._write(lambda db: db.execute(
            "INSERT INTO campaigns (campaign_id, segments) VALUES (?, ?) "
            "ON CONFLICT (campaign_id) DO UPDATE SET segments = excluded.segments", (campaign_id, segments)))

    def learn_template(self, campaign_id: str, digest: str, template: dict) -> None:
        self._write(lambda db: db.execute(
            "INSERT INTO templates (campaign_id, digest, template) VALUES (?, ?, ?) ON CONFLICT (campaign_id) "
            "DO UPDATE SET digest = excluded.digest, template = excluded.template",
            (campaign_id, digest, jsoncodec.dumps(template).decode())))

    def template(self, campaign_id: str, digest: str) -> dict | None:
        """The campaign's template if the last one learnt has this digest, else None."""
        row = self._db.execute("SELECT template FROM templates WHERE campaign_id = ? AND digest = ?",
                               (campaign_id, digest)).fetchone()
        return jsoncodec.loads(row[0]) if row else None

    def forget_template(self, campaign_id: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM templates WHERE campaign_id = ?", (campaign_id,)))

    def channel(self, campaign_id: str) -> str | None:
        row = self._db.execute("SELECT channel FROM campaigns WHERE campaign_id = ?", (campaign_id,)).fetchone()
        return row[0] if row else None

    def activate(self, campaign_id: str, run_no: int) -> ActiveCampaign | None:
        """Start claiming for a run (or retry) not seen before; None if this run was already started."""

        def write(db: sqlite3.Connection) -> ActiveCampaign | None:
            row = db.execute("SELECT channel, run_no, segments FROM campaigns WHERE campaign_id = ?",
                             (campaign_id,)).fetchone()
            channel, last_run, segments = row if row else (None, 0, None)
            if run_no <= last_run:
                return None
            db.execute("INSERT INTO campaigns (campaign_id, channel, run_no) VALUES (?, ?, ?) "
                       "ON CONFLICT (campaign_id) DO UPDATE SET run_no = excluded.run_no, ended = 0",
                       (campaign_id, channel, run_no))
            db.execute("INSERT OR REPLACE INTO active_campaigns (campaign_id, channel, run_no) VALUES (?, ?, ?)",
                       (campaign_id, channel, run_no))
            return ActiveCampaign(campaign_id, channel, run_no, segments)

        return self._write(write)

    def reactivate(self, campaign_id: str) -> ActiveCampaign | None:
        """Claim again for the last run started (messages went back to the queue); None if none started or
        it ended."""

        def write(db: sqlite3.Connection) -> ActiveCampaign | None:
            row = db.execute("SELECT channel, run_no, segments FROM campaigns WHERE campaign_id = ? AND NOT ended",
                             (campaign_id,)).fetchone()
            if row is None or not row[1]:
                return None
            db.execute("INSERT OR REPLACE INTO active_campaigns (campaign_id, channel, run_no) VALUES (?, ?, ?)",
                       (campaign_id, row[0], row[1]))
            return ActiveCampaign(campaign_id, *row)

        return self._write(write)

    def end(self, campaign_id: str) -> None:
        """The last run ended (stopped, deleted, final): no claims until a new run, not even after a resume."""

        def write(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM active_campaigns WHERE campaign_id = ?", (campaign_id,))
            db.execute("UPDATE campaigns SET ended = 1 WHERE campaign_id = ?", (campaign_id,))

        self._write(write)

    # ------------------------------------------------------------------ campaign-event positions

    def event_positions(self) -> dict[int, int]:
        return dict(self._db.execute("SELECT partition, next_offset FROM event_positions"))

    def save_event_positions(self, positions: dict[int, int]) -> None:
        if positions:
            self._write(lambda db: db.executemany(
                "INSERT OR REPLACE INTO event_positions (partition, next_offset) VALUES (?, ?)",
                list(positions.items())))

    # ------------------------------------------------------------------ provider holds

    def saw_hold(self, campaign_id: str, provider: str) -> None:
        self._write(lambda db: db.execute(
            "INSERT OR REPLACE INTO holds_seen (campaign_id, provider) VALUES (?, ?)", (campaign_id, provider)))

    def saw_resume(self, campaign_id: str) -> None:
        self._write(lambda db: db.execute("DELETE FROM holds_seen WHERE campaign_id = ?", (campaign_id,)))

    def holds_seen(self) -> list[tuple[str, str]]:
        """(campaign_id, provider) of the holds the campaign events announced and did not lift yet."""
        return list(self._db.execute("SELECT campaign_id, provider FROM holds_seen ORDER BY 1"))

    def remember_held(self, provider: str, campaign_id: str) -> None:
        self._write(lambda db: db.execute(
            "INSERT OR IGNORE INTO held_campaigns (provider, campaign_id) VALUES (?, ?)", (provider, campaign_id)))

    def forget_held(self, provider: str, campaign_id: str) -> None:
        self._write(lambda db: db.execute(
            "DELETE FROM held_campaigns WHERE provider = ? AND campaign_id = ?", (provider, campaign_id)))

    def held_campaigns(self) -> list[tuple[str, str]]:
        """(provider, campaign_id) pairs told `held: true` and not yet `held: false`."""
        return list(self._db.execute("SELECT provider, campaign_id FROM held_campaigns ORDER BY 1, 2"))

    def active_campaigns(self) -> list[ActiveCampaign]:
        return [ActiveCampaign(*row) for row in self._db.execute(
            "SELECT a.campaign_id, a.channel, a.run_no, c.segments FROM active_campaigns a "
            "LEFT JOIN campaigns c ON c.campaign_id = a.campaign_id ORDER BY a.campaign_id")]
