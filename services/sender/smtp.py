"""SMTP adapter (email) over aiosmtplib, with our own durable re-submission of deferred messages.

One message = one SMTP transaction (MAIL FROM, one RCPT TO, DATA) on a connection taken from a small pool
(`pool_size`, default min(provider_concurrency, 8)); connections are kept for `idle_s` and reused (RSET
after a refused transaction). A call (`batch_size("email")`, default 10 messages) runs its transactions
concurrently over the pool. Each message is rendered with `services.common.templating.render_email` and
carries `List-Unsubscribe` (signed link, optional mailto) and `List-Unsubscribe-Post: List-Unsubscribe=One-Click`
(RFC 8058), a `Message-ID` `<{message_id}.{attempt}@{from domain}>` (the result's provider_message_id) and
`X-Outreach-Message-Id` / `X-Outreach-Campaign-Id`. A line break a contact's value brings into the subject
becomes a space (a header is one line).

Outcomes (wire contract, "Sending rules"; results in the `SenderResults` shape):

| what happens | results | provider_code |
|---|---|---|
| error before MAIL FROM: connect refused / timed out, 4xx/5xx greeting, EHLO, STARTTLS or AUTH refused | `presend_error` | the reply code, else `"connect"` |
| 4xx at MAIL FROM (nothing handed over) or the connection lost before DATA | `presend_error` | the code / `"disconnected"` |
| 5xx at MAIL FROM (e.g. 530 authentication required, 550 sender refused) | `refused` | the code |
| the message cannot be built (e.g. a line break in a header value) | `refused` | `"invalid_message"` |
| 250 after DATA | `accepted`, then `delivered` | |
| 4xx at RCPT or DATA | `deferred` (status `retrying`), scheduled for re-submission | the code |
| 5xx at RCPT or DATA | `bounced` | the code |
| DATA sent, then no reply (timeout) or the connection lost | `no_answer` (never re-sent) | |

**250 = delivered.** SMTP has no delivery receipt: a 250 after DATA means the receiving server took
responsibility for the message, which is as far as we can see. So a 250 is reported as `accepted` (the
provider took it) and `delivered` at once. A later bounce (DSN) is not tracked.

**Re-submission of deferrals.** A deferred message is kept in SQLite at
`settings.data_dir / "smtp-retries.db"` (message_id, campaign_id, destination, variables, template,
attempt, next_at, deadline = first deferral + `retry_window_s`) before its `deferred` result is returned.
`run_retries(stop, publish)` re-submits due ones (every `smtp_retry_s`); each re-submission is reported
as `resubmitted` (attempt n, provider_code = that submission's reply code: status stays `retrying`) and then
its outcome: `delivered`, `bounced`, or `deferred` again (no status change; re-scheduled). When the window
closes nothing more is sent: the row is dropped and the timeout sweeper expires the message. A
re-submission that reaches nobody (pre-send error) is not reported and not counted: it is tried again at
the next interval. One whose DATA got no reply is reported `resubmitted` and never sent again.
Results of re-submissions go through a durable outbox in the same database, written in the same
transaction as the row's new state, so a failed `publish` loses nothing (it is retried each pass).
A crash between a re-submission and its bookkeeping re-sends that message at the next interval (the row
is advanced before sending, so never in a tight loop).

`publish` is `async publish([(campaign_id, [result, ...]), ...])` (the sender's `publish_later`, through
its results batcher); nothing here knows about Kafka.

**Secrets.** The SMTP password is given to aiosmtplib for AUTH only; it is never logged nor put in
results or exception text here.

`campaign_id` is read from each item (`item["campaign_id"]`) when the dispatcher provides it.
"""
from __future__ import annotations

import asyncio
import collections
import email.policy
import hashlib
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formataddr, formatdate
from pathlib import Path
from typing import Any

import aiosmtplib
import orjson

from schemas.times import utc_now
from services.common import logs
from services.common.fence import HandoffFence
from services.common.settings import Settings
from services.common.sqlite import open_sqlite
from services.common.templating import render_email
from services.common.unsubscribe import list_unsubscribe_headers
from services.sender.providers import make_result

log = logging.getLogger("outreach.sender.smtp")

RETRIES_FILE = "smtp-retries.db"
CONNECT_CODE = "connect"
DISCONNECTED_CODE = "disconnected"
INVALID_MESSAGE_CODE = "invalid_message"  # the handler's failed / unknown
RETRY_PASS_LIMIT = 1000  # re-submissions started per pass at most
PRUNE_EVERY_S = 600.0  # unreferenced templates are dropped at least this often

Publish = Callable[[list[tuple[str, list[dict]]]], Awaitable[None]]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS retries (
    message_id  TEXT PRIMARY KEY,
    campaign_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    variables   TEXT NOT NULL,       -- JSON
    template_id TEXT NOT NULL,
    attempt     INTEGER NOT NULL,    -- submissions so far (the next one is attempt + 1)
    next_at     REAL NOT NULL,       -- unix time of the next re-submission
    deadline    REAL NOT NULL,       -- first deferral + retry window: nothing is sent after it
    last_code   TEXT,
    claim_id    TEXT NOT NULL DEFAULT ''  -- the claim whose hand-off fence each re-submission asks
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS retries_due ON retries (next_at);
CREATE TABLE IF NOT EXISTS templates (
    template_id TEXT PRIMARY KEY,
    template    TEXT NOT NULL        -- JSON
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    campaign_id TEXT NOT NULL,
    results     TEXT NOT NULL        -- JSON list of result dicts
);
"""


def retries_path(settings: Settings) -> Path:
    return settings.instance_file(RETRIES_FILE)


# ------------------------------------------------------------------ the durable schedule

class RetryStore:
    """Deferred emails awaiting re-submission, and the outbox of re-submission results (SQLite, WAL)."""

    def __init__(self, path: Path):
        # FULL, as before: a row here is the only trace that a deferred email must still be re-sent, and
        # it is written per deferral and per re-submission (not per message sent), so the cost is small.
        self._db = open_sqlite(path, synchronous="FULL", busy_timeout_s=5.0)
        self._db.executescript(_SCHEMA)
        if "claim_id" not in {row[1] for row in self._db.execute("PRAGMA table_info(retries)")}:
            self._db.execute("ALTER TABLE retries ADD COLUMN claim_id TEXT NOT NULL DEFAULT ''")  # an older file

    def close(self) -> None:
        self._db.close()

    def schedule(self, deferrals: list[tuple[Mapping[str, Any], int, str | None]], template: Mapping[str, Any],
                 now: float, retry_s: float, window_s: float) -> None:
        """First deferral of each `(item, attempt, code)`, in one transaction (a still-open window's deadline
        is kept if the message is already scheduled)."""
        body = orjson.dumps(dict(template), option=orjson.OPT_SORT_KEYS)
        template_id = hashlib.sha256(body).hexdigest()
        with self._tx():
            self._db.execute("INSERT OR IGNORE INTO templates VALUES (?, ?)", (template_id, body.decode()))
            self._db.executemany(
                """INSERT INTO retries (message_id, campaign_id, destination, variables, template_id, attempt,
                                        next_at, deadline, last_code, claim_id)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (message_id) DO UPDATE SET
                     campaign_id = excluded.campaign_id, destination = excluded.destination,
                     variables = excluded.variables, template_id = excluded.template_id,
                     attempt = excluded.attempt, next_at = excluded.next_at, last_code = excluded.last_code,
                     claim_id = excluded.claim_id,
                     deadline = CASE WHEN retries.deadline > ? THEN retries.deadline ELSE excluded.deadline END""",
                [(item["message_id"], item.get("campaign_id") or "", item["destination"],
                  orjson.dumps(item.get("variables") or {}).decode(), template_id, attempt, now + retry_s,
                  now + window_s, code, item.get("claim_id") or "", now) for item, attempt, code in deferrals])

    def expire(self, now: float) -> int:
        """Drop the rows whose retry window closed; returns how many."""
        return self._db.execute("DELETE FROM retries WHERE deadline <= ?", (now,)).rowcount

    def prune_templates(self) -> None:
        self._db.execute("DELETE FROM templates WHERE template_id NOT IN (SELECT template_id FROM retries)")

    def claim_due(self, now: float, retry_s: float, limit: int = RETRY_PASS_LIMIT) -> list[dict]:
        """Due rows, advanced (attempt + 1, next_at + interval) before anything is sent."""
        with self._tx():
            rows = self._db.execute(
                """SELECT r.message_id, r.campaign_id, r.destination, r.variables, r.attempt, t.template, r.claim_id
                   FROM retries r JOIN templates t USING (template_id)
                   WHERE r.next_at <= ? AND r.deadline > ? ORDER BY r.next_at LIMIT ?""",
                (now, now, limit)).fetchall()
            self._db.executemany("UPDATE retries SET attempt = attempt + 1, next_at = ? WHERE message_id = ?",
                                 [(now + retry_s, row[0]) for row in rows])
        return [{"message_id": mid, "campaign_id": cid, "destination": dest, "variables": orjson.loads(variables),
                 "attempt": attempt, "template": orjson.loads(template), "claim_id": claim_id}
                for mid, cid, dest, variables, attempt, template, claim_id in rows]

    def settle(self, done: list[tuple[dict, str, list[dict]]]) -> None:
        """For each re-submission (row, action, results): its results to the outbox and the row's new state,
        in one transaction. action: `keep` (deferred again), `drop` (final or no answer), `undo` (reached
        nobody: the attempt does not count)."""
        with self._tx():
            for row, action, results in done:
                if action == "drop":
                    self._db.execute("DELETE FROM retries WHERE message_id = ?", (row["message_id"],))
                elif action == "undo":
                    self._db.execute("UPDATE retries SET attempt = ? WHERE message_id = ?",
                                     (row["attempt"], row["message_id"]))
                elif results:
                    self._db.execute("UPDATE retries SET last_code = ? WHERE message_id = ?",
                                     (results[0].get("provider_code"), row["message_id"]))
                if results:
                    self._db.execute("INSERT INTO outbox (campaign_id, results) VALUES (?, ?)",
                                     (row["campaign_id"], orjson.dumps(results).decode()))

    def outbox(self) -> list[tuple[int, str, list[dict]]]:
        return [(seq, cid, orjson.loads(results)) for seq, cid, results
                in self._db.execute("SELECT seq, campaign_id, results FROM outbox ORDER BY seq")]

    def published(self, up_to_seq: int) -> None:
        self._db.execute("DELETE FROM outbox WHERE seq <= ?", (up_to_seq,))

    def scheduled(self) -> list[dict]:
        """Every row (tests, tools)."""
        cursor = self._db.execute("SELECT message_id, campaign_id, destination, attempt, next_at, deadline, "
                                  "last_code FROM retries ORDER BY next_at")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor]

    def _tx(self):
        db = self._db

        class _Tx:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, *_):
                db.execute("ROLLBACK" if exc_type else "COMMIT")

        return _Tx()


# ------------------------------------------------------------------ connections

class _Pool:
    """At most `size` SMTP connections, idle ones reused for up to `idle_s`."""

    def __init__(self, connect: Callable[[], Awaitable[aiosmtplib.SMTP]], size: int, idle_s: float):
        self._connect = connect
        self._slots = asyncio.Semaphore(size)
        self._idle: collections.deque[tuple[aiosmtplib.SMTP, float]] = collections.deque()
        self._idle_s = idle_s

    async def acquire(self) -> tuple[aiosmtplib.SMTP, bool]:
        """(connection, reused). Raises what connecting raises (the slot is given back)."""
        await self._slots.acquire()
        try:
            while self._idle:
                smtp, since = self._idle.pop()
                if smtp.is_connected and time.monotonic() - since < self._idle_s:
                    return smtp, True
                smtp.close()
            return await self._connect(), False
        except BaseException:
            self._slots.release()
            raise

    def release(self, smtp: aiosmtplib.SMTP, reusable: bool) -> None:
        if reusable and smtp.is_connected:
            self._idle.append((smtp, time.monotonic()))
        else:
            smtp.close()
        self._slots.release()

    async def close(self) -> None:
        while self._idle:
            smtp, _ = self._idle.pop()
            try:
                await asyncio.wait_for(smtp.quit(), 2)
            except Exception:
                smtp.close()


# ------------------------------------------------------------------ one transaction

@dataclass(frozen=True)
class Outcome:
    kind: str  # delivered | deferred | bounced | refused | presend | no_answer
    code: str | None = None
    provider_message_id: str | None = None


class _PreSend(Exception):
    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


class SmtpAdapter:
    """`ProviderAdapter` for email over SMTP, plus `run_retries` for the deferred ones."""

    def __init__(self, settings: Settings, *, batch: int = 10, pool_size: int | None = None,
                 connect_timeout_s: float = 10.0, command_timeout_s: float = 30.0, data_timeout_s: float = 60.0,
                 idle_s: float = 30.0, unsubscribe_mailto: str | None = None, local_hostname: str | None = None,
                 db_path: Path | None = None, clock: Callable[[], float] = time.time):
        self._settings = settings
        self._batch = max(1, batch)
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._data_timeout_s = data_timeout_s
        self._mailto = unsubscribe_mailto
        self._local_hostname = local_hostname
        self._retry_s = settings.smtp_retry_s
        self._window_s = settings.retry_window_s
        self._clock = clock
        self._pruned_at = 0.0
        self._pool = _Pool(self._open, pool_size or min(settings.provider_concurrency, 8), idle_s)
        self.store = RetryStore(db_path or retries_path(settings))
        self.fence: HandoffFence | None = None  # the sender's (attach_fence): re-submissions ask it too

    def attach_fence(self, fence: HandoffFence) -> None:
        """Re-submissions go through the hand-off fence the first submissions went through: each takes the
        message under its claim first, so a re-submission interrupted after the 250 is never sent again,
        and none goes out after the message left `retrying` under that claim."""
        self.fence = fence

    def __repr__(self) -> str:  # never the password
        return f"SmtpAdapter({self._settings.smtp_host!r}, {self._settings.smtp_port})"

    async def close(self) -> None:
        await self._pool.close()
        self.store.close()

    # ------------------------------------------------------------------ connections

    async def _open(self) -> aiosmtplib.SMTP:
        """A connected, greeted (EHLO/HELO), STARTTLS'd and authenticated connection, or `_PreSend`."""
        settings = self._settings
        if self._local_hostname is None:
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        password = settings.smtp_password.get_secret_value() if settings.smtp_password is not None else None
        smtp = aiosmtplib.SMTP(hostname=settings.smtp_host, port=settings.smtp_port,
                               local_hostname=self._local_hostname, timeout=self._connect_timeout_s,
                               start_tls=True if settings.smtp_starttls else False,
                               username=settings.smtp_username if password is not None else None,
                               password=password if settings.smtp_username else None)
        try:
            await smtp.connect()
            if smtp.is_ehlo_or_helo_needed:
                try:
                    await smtp.ehlo()
                except aiosmtplib.SMTPHeloError:
                    if not smtp.is_connected:
                        raise
                    await smtp.helo()
        except asyncio.CancelledError:
            smtp.close()
            raise
        except aiosmtplib.SMTPResponseException as exc:  # greeting, EHLO, STARTTLS or AUTH refused
            smtp.close()
            log.warning("SMTP server %s:%s refused the session: %d", settings.smtp_host, settings.smtp_port, exc.code)
            raise _PreSend(str(exc.code)) from None
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
            smtp.close()
            log.warning("SMTP server %s:%s not reached: %s", settings.smtp_host, settings.smtp_port,
                        type(exc).__name__)
            raise _PreSend(CONNECT_CODE) from None
        smtp.timeout = self._command_timeout_s
        return smtp

    # ------------------------------------------------------------------ the message

    def build_message(self, item: Mapping[str, Any], template: Mapping[str, Any], attempt: int) -> EmailMessage:
        subject, html = render_email(template["subject"], template["html"], item.get("variables"))
        subject = one_line(subject)
        campaign_id = item.get("campaign_id") or ""
        domain = template["from_email"].rpartition("@")[2] or "outreach.invalid"
        policy = email.policy.SMTP if _ascii(item["destination"], template["from_email"]) else email.policy.SMTPUTF8
        message = EmailMessage(policy=policy)
        message["From"] = formataddr((template.get("from_name") or "", template["from_email"]))
        message["To"] = item["destination"]
        message["Subject"] = subject
        if template.get("reply_to"):
            message["Reply-To"] = template["reply_to"]
        message["Date"] = formatdate(localtime=False, usegmt=True)
        message["Message-ID"] = f"<{item['message_id']}.{attempt}@{domain}>"
        for name, value in list_unsubscribe_headers(self._settings, campaign_id, item["message_id"],
                                                    item["destination"], self._mailto).items():
            message[name] = value
        message["X-Outreach-Message-Id"] = item["message_id"]
        if campaign_id:
            message["X-Outreach-Campaign-Id"] = campaign_id
        message.set_content(html, subtype="html")
        return message

    async def _transact(self, item: Mapping[str, Any], template: Mapping[str, Any], attempt: int) -> Outcome:
        with logs.context(campaign_id=item.get("campaign_id") or None, message_id=item["message_id"]):
            return await self._transact_one(item, template, attempt)

    async def _transact_one(self, item: Mapping[str, Any], template: Mapping[str, Any], attempt: int) -> Outcome:
        try:
            message = self.build_message(item, template, attempt)
        except (ValueError, TypeError, KeyError) as exc:  # e.g. a line break in a header value: never sendable
            log.error("message %s cannot be built as an email: %s", item["message_id"], type(exc).__name__)
            return Outcome("refused", INVALID_MESSAGE_CODE)
        message_id_header = message["Message-ID"]
        utf8 = message.policy is email.policy.SMTPUTF8
        data = message.as_bytes()
        sender = template["from_email"]
        options = ["SMTPUTF8"] if utf8 else None
        encoding = "utf-8" if utf8 else "ascii"
        for first_try in (True, False):
            try:
                smtp, reused = await self._pool.acquire()
            except _PreSend as exc:
                return Outcome("presend", exc.code)
            reusable = False
            stage = "mail"
            try:
                try:
                    await smtp.mail(sender, options=options, encoding=encoding)
                except aiosmtplib.SMTPServerDisconnected:
                    if reused and first_try:  # the server closed the idle connection: nothing was sent
                        continue
                    raise
                stage = "rcpt"
                await smtp.rcpt(item["destination"], encoding=encoding)
                stage = "data"
                await smtp.data(data, timeout=self._data_timeout_s)
                reusable = True
                return Outcome("delivered", None, message_id_header)
            except asyncio.CancelledError:
                raise
            except aiosmtplib.SMTPResponseException as exc:
                reusable = await self._reset(smtp)
                return _classify_reply(stage, exc.code)
            except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
                if stage == "data":  # DATA may have been taken: never sent again
                    log.warning("SMTP DATA for message %s got no reply: %s", item["message_id"], type(exc).__name__)
                    return Outcome("no_answer")
                log.warning("SMTP connection lost at %s for message %s: %s", stage.upper(), item["message_id"],
                            type(exc).__name__)
                return Outcome("presend", DISCONNECTED_CODE)
            finally:
                self._pool.release(smtp, reusable)
        return Outcome("presend", DISCONNECTED_CODE)  # not reached: the second try never `continue`s

    @staticmethod
    async def _reset(smtp: aiosmtplib.SMTP) -> bool:
        """RSET after a refused transaction; the connection is reused only if that works."""
        if not smtp.is_connected:
            return False
        try:
            await smtp.rset()
            return True
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
            return False

    # ------------------------------------------------------------------ ProviderAdapter

    def batch_size(self, channel: str) -> int:
        return self._batch

    async def submit(self, channel: str, items: list[dict], template: Mapping[str, Any]) -> list[dict]:
        if channel != "email":
            raise ValueError(f"SmtpAdapter sends email, not {channel!r}")
        attempts = [item["attempt"] + 1 for item in items]
        answers = await asyncio.gather(*(self._transact(item, template, attempt)
                                         for item, attempt in zip(items, attempts)))
        deferrals = [(item, attempt, outcome.code) for item, attempt, outcome in zip(items, attempts, answers)
                     if outcome.kind == "deferred"]
        if deferrals:
            # Durable before they are reported: the re-submission loop owns them from here.
            now = self._clock()
            self.store.schedule(deferrals, template, now, self._retry_s, self._window_s)
            if self.fence is not None:
                for claim_id, mids in _by_claim(item for item, _, _ in deferrals).items():
                    self.fence.defer(claim_id, mids, until=time.time() + self._window_s)
        return [result for item, attempt, outcome in zip(items, attempts, answers)
                for result in _submission_results(item["message_id"], attempt, outcome)]

    async def probe(self) -> bool:
        """A session without a message (connect, EHLO, AUTH, QUIT): True when the server takes it."""
        try:
            smtp = await self._open()
        except _PreSend:
            return False
        try:
            await asyncio.wait_for(smtp.quit(), self._command_timeout_s)
        except Exception:
            smtp.close()
        return True

    # ------------------------------------------------------------------ re-submissions

    async def run_retries(self, stop: asyncio.Event, publish: Publish) -> None:
        """Re-submit due deferrals until `stop` is set (polling every min(smtp_retry_s, 1 s))."""
        poll_s = min(self._retry_s, 1.0)
        while not stop.is_set():
            try:
                await self.retry_pass(publish)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("SMTP re-submission pass failed; trying again")
            try:
                await asyncio.wait_for(stop.wait(), poll_s)
            except TimeoutError:
                pass
        try:
            await self._flush_outbox(publish)
        except Exception:
            log.exception("SMTP re-submission results not published; they stay in the outbox")

    async def retry_pass(self, publish: Publish) -> int:
        """One pass: publish leftovers, drop expired rows, re-submit the due ones. Returns how many were sent."""
        await self._flush_outbox(publish)
        now = self._clock()
        expired = self.store.expire(now)
        if expired or now - self._pruned_at > PRUNE_EVERY_S:
            self._pruned_at = now
            self.store.prune_templates()
        if expired:
            log.info("%d deferred emails reached the end of their retry window: no more re-submissions", expired)
        due = self.store.claim_due(now, self._retry_s)
        if not due:
            return 0
        settled = await asyncio.gather(*(self._resubmit(row) for row in due))
        self.store.settle(list(settled))
        await self._flush_outbox(publish)
        return len(due)

    async def _resubmit(self, row: dict) -> tuple[dict, str, list[dict]]:
        attempt = row["attempt"] + 1
        fenced = self.fence is not None and bool(row.get("claim_id"))
        if fenced:
            granted = self.fence.take(row["claim_id"], [row["message_id"]], time.time())
            if not granted:  # taken before (a crash after its 250), or no longer `retrying` under the claim
                log.info("SMTP re-submission of message %s refused by the fence: dropped", row["message_id"])
                return row, "drop", []
            attempt = granted[row["message_id"]]
        try:
            outcome = await self._transact(row, row["template"], attempt)
        except Exception:  # e.g. a template that no longer renders: keep it, try again next interval
            log.exception("SMTP re-submission of message %s failed", row["message_id"])
            if fenced:
                self.fence.give_back(row["claim_id"], [row["message_id"]], uncount=True)
            return row, "undo", []
        mid, now = row["message_id"], utc_now()
        if fenced and outcome.kind in ("presend", "deferred"):  # nothing taken: the next one may go
            # A re-submission that reached nobody is not counted (nor reported): so in the fence either.
            self.fence.give_back(row["claim_id"], [mid], uncount=outcome.kind == "presend")

        def result(outcome_name: str, code: str | None = None, pmid: str | None = None) -> dict:
            return make_result(mid, outcome_name, attempt, provider_code=code, provider_message_id=pmid,
                               occurred_at=now)

        if outcome.kind == "presend":
            log.warning("SMTP re-submission of message %s reached nobody (%s): next interval",
                        mid, outcome.code)
            return row, "undo", []
        if outcome.kind == "delivered":
            return row, "drop", [result("resubmitted", "250", outcome.provider_message_id),
                                 result("delivered", None, outcome.provider_message_id)]
        if outcome.kind == "deferred":
            return row, "keep", [result("resubmitted", outcome.code), result("deferred", outcome.code)]
        if outcome.kind == "no_answer":
            return row, "drop", [result("resubmitted")]
        # bounced (5xx at RCPT/DATA) or refused (5xx at MAIL FROM)
        return row, "drop", [result("resubmitted", outcome.code), result(_OUTCOME[outcome.kind], outcome.code)]

    async def _flush_outbox(self, publish: Publish) -> None:
        pending = self.store.outbox()
        if not pending:
            return
        per_campaign: dict[str, list[dict]] = collections.defaultdict(list)
        for _seq, campaign_id, results in pending:
            per_campaign[campaign_id].extend(results)
        await publish(list(per_campaign.items()))
        self.store.published(pending[-1][0])


_OUTCOME = {"bounced": "bounced", "refused": "refused"}


def _by_claim(items: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    claims: dict[str, list[str]] = collections.defaultdict(list)
    for item in items:
        if item.get("claim_id"):
            claims[item["claim_id"]].append(item["message_id"])
    return claims


def _classify_reply(stage: str, code: int) -> Outcome:
    if stage == "mail":  # nothing handed over yet
        if 400 <= code < 500:
            return Outcome("presend", str(code))
        return Outcome("refused", str(code))
    if code >= 500:
        return Outcome("bounced", str(code))
    return Outcome("deferred", str(code))  # 4xx (or an odd non-error reply): try again later


def _submission_results(message_id: str, attempt: int, outcome: Outcome) -> list[dict]:
    now = utc_now()

    def result(name: str, code: str | None = None) -> dict:
        return make_result(message_id, name, attempt, provider_code=code,
                           provider_message_id=outcome.provider_message_id, occurred_at=now)

    if outcome.kind == "delivered":
        return [result("accepted"), result("delivered")]
    if outcome.kind == "presend":
        return [result("presend_error", outcome.code)]
    if outcome.kind == "no_answer":
        return [result("no_answer")]
    return [result(outcome.kind, outcome.code)]  # deferred, bounced, refused


def one_line(text: str) -> str:
    """A header value on one line: a line break from a contact's value becomes a space."""
    return _LINE_BREAKS.sub(" ", text)


_LINE_BREAKS = re.compile(r"\r\n|[\r\n]")


def _ascii(*texts: str) -> bool:
    return all(text.isascii() for text in texts)


__all__ = ["SmtpAdapter", "RetryStore", "Outcome", "retries_path", "RETRIES_FILE"]
