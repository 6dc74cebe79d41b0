"""The command handler's use cases: load -> decide -> one save() of every aggregate touched.

Only this application writes to the event store. Each use case commits its message moves, the campaign's
derived status, the channel lock and the command's stored answer in one transaction; a racing writer
loses on optimistic concurrency and the use case is decided again on fresh state.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import unquote, urlparse

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError, OperationalError, ProgrammingError

from services.common import ids, templating
from services.common.settings import Settings
from services.command_handler import wire
from services.command_handler.domain import contacts as contact_rules
from services.command_handler.domain import provider_codes, rules
from services.command_handler.domain.model import (
    Campaign, ChannelLock, CommandLog, MessageBlock, OptOutList, Rejected,
)
from services.command_handler.domain.rules import Move

log = logging.getLogger(__name__)

CONFLICT_RETRIES = 20
MAX_CHUNK_BYTES = 900 * 1024
WORK_RECORD_BUDGET = 700 * 1024  # a claim's work record stays well under the 1 MiB record limit
SUMMARY_ROWS_LISTED = 100


def store_env(settings: Settings) -> dict[str, str]:
    """eventsourcing's persistence settings from ours (SQLite file by default, PostgreSQL by setting)."""
    env = {
        "AGGREGATE_CACHE_MAXSIZE": "5000",
        # The cache hands out its own objects (no deepcopy per load: blocks are big); a failed use case
        # evicts what it touched, so a half-decided aggregate never survives in the cache.
        "DEEPCOPY_FROM_AGGREGATE_CACHE": "n",
    }
    if settings.event_store == "postgres":
        url = urlparse(settings.postgres_dsn)
        env.update({
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": url.path.lstrip("/") or "postgres",
            "POSTGRES_HOST": url.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(url.port or 5432),
            "POSTGRES_USER": unquote(url.username or "postgres"),
            "POSTGRES_PASSWORD": unquote(url.password or ""),
        })
    else:
        path = settings.event_store_sqlite_path
        path.parent.mkdir(parents=True, exist_ok=True)
        env.update({"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(path),
                    "SQLITE_LOCK_TIMEOUT": "30"})
    return env


def open_app(settings: Settings, attempts: int = 10) -> "OutreachApp":
    """The application, retrying while another process creates the same tables in a fresh database
    (PostgreSQL's CREATE TABLE IF NOT EXISTS races between processes)."""
    for attempt in range(1, attempts + 1):
        try:
            return OutreachApp(settings)
        except (IntegrityError, OperationalError, ProgrammingError):  # e.g. DuplicateTable from a racing creator
            if attempt == attempts:
                raise
            time.sleep(0.1 * attempt)
    raise AssertionError("unreachable")


def now() -> datetime:
    return datetime.now(timezone.utc)


class OutreachApp(Application):
    name = "outreach"

    def __init__(self, settings: Settings, env: dict[str, str] | None = None):
        super().__init__(env={**store_env(settings), **(env or {})})
        self.settings = settings
        self._touched: set[uuid.UUID] = set()
        self._message_refs: dict[str, dict[str, tuple[int, int]]] = {}

    # ----- loading ------------------------------------------------------------------------------
    def _load(self, aggregate_id: uuid.UUID) -> Any | None:
        self._touched.add(aggregate_id)
        try:
            return self.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None

    def _campaign(self, campaign_id: str) -> Campaign:
        campaign = self._load(uuid.UUID(campaign_id))
        if campaign is None or campaign.deleted:
            raise Rejected("unknown_campaign", f"no campaign {campaign_id}")
        return campaign

    def _blocks(self, campaign: Campaign) -> list[MessageBlock]:
        campaign_id = str(campaign.id)
        return [self._load(ids.block_id(campaign_id, n)) for n in campaign.block_nos]

    def _block_at(self, campaign: Campaign, position: int) -> MessageBlock:
        return self._load(ids.block_id(str(campaign.id), campaign.block_nos[position]))

    def _lock(self, channel: str) -> ChannelLock:
        return self._load(ids.channel_lock_id(channel)) or ChannelLock(channel)

    def _refs(self, campaign: Campaign) -> dict[str, tuple[int, int]]:
        """message_id -> (block position, index), built once per campaign (contacts never change after Run)."""
        campaign_id = str(campaign.id)
        refs = self._message_refs.get(campaign_id)
        if refs is None or len(refs) != campaign.message_count:
            refs = {}
            for position, block in enumerate(self._blocks(campaign)):
                for index, row in enumerate(block.rows):
                    refs[ids.message_id(campaign_id, row)] = (position, index)
            self._message_refs[campaign_id] = refs
        return refs

    def _run(self, decide: Callable[[], list[Any]]) -> list[Any]:
        """Runs a use case until it saves without conflict; evicts what a failed attempt touched."""
        for attempt in range(CONFLICT_RETRIES):
            self._touched = set()
            try:
                to_save = decide()
                if to_save:
                    self.save(*to_save)
                return to_save
            except IntegrityError:
                self._evict()
                log.info("optimistic concurrency conflict, deciding again (attempt %d)", attempt + 1)
            except BaseException:
                self._evict()
                raise
        raise RuntimeError("use case kept conflicting")

    def _evict(self) -> None:
        cache = self.repository.cache
        for aggregate_id in self._touched:
            try:
                cache.get(aggregate_id, evict=True)
            except KeyError:
                pass

    # ----- commands -----------------------------------------------------------------------------
    def handle_command(self, command: Any | None, envelope: dict, invalid_detail: str | None = None) -> None:
        """Answers one command exactly once: a repeated command_id gets its stored answer again.

        `command` is the parsed command model, or None with `invalid_detail` when it failed validation.
        """
        command_id = envelope["command_id"]
        campaign_id = envelope["campaign_id"]
        command_type = envelope["type"]

        def decide() -> list[Any]:
            previous = self._load(ids.command_log_id(command_id))
            if previous is not None:
                previous.repeat(records=previous.records)
                return [previous]
            try:
                if command is None:
                    raise Rejected("invalid_command", invalid_detail or "invalid command")
                changed = self._decide(command)
            except Rejected as rejection:
                self._evict()
                return self._reject(command_id, campaign_id, command_type, rejection)
            campaign = next(a for a in changed if isinstance(a, Campaign))
            answer = wire.campaign_answer_records(campaign.pending_events, command_id)
            return [*changed, CommandLog(command_id=command_id, campaign_id=campaign_id,
                                         records=[r.as_dict() for r in answer], publish=False)]

        self._run(decide)

    def _reject(self, command_id: str, campaign_id: str, command_type: str, rejection: Rejected) -> list[Any]:
        campaign = self._load(uuid.UUID(campaign_id))
        if campaign is None:
            record = wire.rejection_for_unknown_campaign(
                command_id=command_id, campaign_id=campaign_id, command_type=command_type,
                reason=rejection.reason, detail=rejection.detail, occurred_at=now())
            return [CommandLog(command_id=command_id, campaign_id=campaign_id, records=[record.as_dict()],
                               publish=True)]
        campaign.record_rejection(command_id=command_id, command_type=command_type, reason=rejection.reason,
                                  detail=rejection.detail)
        answer = wire.campaign_answer_records(campaign.pending_events, command_id)
        return [campaign, CommandLog(command_id=command_id, campaign_id=campaign_id,
                                     records=[r.as_dict() for r in answer], publish=False)]

    def _decide(self, command: Any) -> list[Any]:
        handler = {
            "CreateCampaign": self._create_campaign,
            "AddContacts": self._add_contacts,
            "UpdateTemplate": self._update_template,
            "RunCampaign": self._run_campaign,
            "StopCampaign": self._stop_campaign,
            "RetryFailedMessages": self._retry_failed,
            "DeleteCampaign": self._delete_campaign,
        }[command.type]
        return handler(command)

    def _create_campaign(self, cmd: Any) -> list[Any]:
        if self._load(uuid.UUID(cmd.campaign_id)) is not None:
            raise Rejected("campaign_exists", "campaign ids are never reused")
        campaign = Campaign(campaign_id=uuid.UUID(cmd.campaign_id), name=cmd.name, description=cmd.description,
                            channel=cmd.channel, template=_plain(cmd.template), created_by=cmd.issued_by,
                            causation_id=cmd.command_id)
        return [campaign]

    def _add_contacts(self, cmd: Any) -> list[Any]:
        campaign = self._campaign(cmd.campaign_id)
        stored_answer = campaign.check_contacts_accepted(cmd.chunk_no, len(cmd.contacts))
        if stored_answer is not None:
            campaign.repeat_contacts_answer(cmd.chunk_no, cmd.command_id)
            return [campaign]
        rows = [c.row for c in cmd.contacts]
        if len(set(rows)) != len(rows):
            raise Rejected("invalid_command", "a row number appears twice in the chunk")
        valid, invalid_rows = contact_rules.screen_chunk(
            campaign.channel, [(c.row, c.destination, dict(c.variables)) for c in cmd.contacts],
            campaign.destinations)
        to_save: list[Any] = [campaign]
        new_block = None
        if valid:
            new_block = MessageBlock(
                campaign_id=cmd.campaign_id, block_no=cmd.chunk_no, channel=campaign.channel,
                rows=[r for r, _, _ in valid], destinations=[d for _, d, _ in valid],
                variables=[v for _, _, v in valid], causation_id=cmd.command_id)
            to_save.append(new_block)
        summary = None
        if cmd.last_chunk:
            blocks = self._blocks(campaign) + ([new_block] if new_block else [])
            summary = run_summary(campaign.name, campaign.channel, campaign.template, blocks)
        campaign.add_contacts(chunk_no=cmd.chunk_no, valid_rows=[r for r, _, _ in valid],
                              destinations=[d for _, d, _ in valid],
                              invalid_rows=[[row, reason] for row, reason in invalid_rows],
                              last_chunk=cmd.last_chunk, summary=summary, causation_id=cmd.command_id)
        return to_save

    def _update_template(self, cmd: Any) -> list[Any]:
        from schemas.commands import template_matches_channel

        campaign = self._campaign(cmd.campaign_id)
        if campaign.status not in ("created", "ready"):
            raise Rejected("not_editable", f"the campaign is {campaign.status}")
        if not template_matches_channel(cmd.template, campaign.channel):
            raise Rejected("invalid_command", f"the template is not a valid {campaign.channel} template")
        template = _plain(cmd.template)
        summary = None
        if campaign.contacts_closed:
            summary = run_summary(campaign.name, campaign.channel, template, self._blocks(campaign))
        campaign.update_template(template, summary, cmd.command_id)
        return [campaign]

    def _run_campaign(self, cmd: Any) -> list[Any]:
        campaign = self._campaign(cmd.campaign_id)
        disclaimer = _plain(cmd.disclaimer) if cmd.disclaimer is not None else {}
        campaign.check_can_run(disclaimer)
        lock = self._lock(campaign.channel)
        lock.check_free_for(cmd.campaign_id)
        blocks = self._blocks(campaign)
        suppressed_destinations = self.suppressed(campaign.channel)
        run_no = campaign.run_no + 1
        queued = suppressed = 0
        for block in blocks:
            moves = []
            for index in block.indexes_in("waiting"):
                if block.destinations[index] in suppressed_destinations:
                    moves.append((index, Move(status="opted_out")))
                    suppressed += 1
                else:
                    moves.append((index, Move(status="queued")))
                    queued += 1
            block.move(moves, run_no=run_no, causation_id=cmd.command_id)
        campaign.start_run(accepted_by=cmd.issued_by, disclaimer=disclaimer, queued=queued,
                           suppressed=suppressed, causation_id=cmd.command_id)
        to_save: list[Any] = [campaign, *blocks]
        if campaign.holds_channel:
            lock.acquire(cmd.campaign_id)
            to_save.append(lock)
        return to_save

    def _stop_campaign(self, cmd: Any) -> list[Any]:
        campaign = self._campaign(cmd.campaign_id)
        campaign.check_can_stop(cmd.confirmed)
        blocks = self._blocks(campaign)
        cancelled = 0
        for block in blocks:
            moves = [(i, Move(status="cancelled")) for i in block.indexes_in("queued")]
            cancelled += len(moves)
            block.move(moves, run_no=None, causation_id=cmd.command_id)
        campaign.stop(stopped_by=cmd.issued_by, cancelled=cancelled, causation_id=cmd.command_id)
        lock = self._lock(campaign.channel)
        lock.release(cmd.campaign_id)
        return [campaign, *blocks, lock]

    def _retry_failed(self, cmd: Any) -> list[Any]:
        campaign = self._campaign(cmd.campaign_id)
        campaign.check_can_retry()
        blocks = self._blocks(campaign)
        named = cmd.message_ids is not None
        if named:
            refs = self._refs(campaign)
            unknown = [m for m in cmd.message_ids if m not in refs]
            if unknown:
                raise Rejected("invalid_command", f"not messages of this campaign: {', '.join(unknown[:5])}")
            wanted: dict[int, list[int]] = defaultdict(list)
            for m in dict.fromkeys(cmd.message_ids):
                position, index = refs[m]
                wanted[position].append(index)
            candidates = wanted
        else:
            candidates = {p: range(len(b.rows)) for p, b in enumerate(blocks)}
        selected: dict[int, list[int]] = {}
        moved_from: dict[str, int] = defaultdict(int)
        for position, indexes in candidates.items():
            block = blocks[position]
            chosen = [i for i in indexes
                      if rules.is_retryable(block.state(i), named=named, include_cancelled=cmd.include_cancelled)]
            if chosen:
                selected[position] = chosen
                for i in chosen:
                    moved_from[block.status[i]] += 1
        if not selected:
            raise Rejected("nothing_to_retry", "no message of the campaign can be retried")
        lock = self._lock(campaign.channel)
        lock.check_free_for(cmd.campaign_id)
        run_no = campaign.run_no + 1
        for position, indexes in selected.items():
            blocks[position].move([(i, Move(status="queued", reason=None, accepted=False)) for i in indexes],
                                  run_no=run_no, causation_id=cmd.command_id)
        campaign.start_retry(moved_from=dict(moved_from), causation_id=cmd.command_id)
        lock.acquire(cmd.campaign_id)
        return [campaign, *blocks, lock]

    def _delete_campaign(self, cmd: Any) -> list[Any]:
        campaign = self._campaign(cmd.campaign_id)
        campaign.delete(cmd.command_id)
        return [campaign]

    def suppressed(self, channel: str) -> set[str]:
        """Opted-out destinations of a channel: never sent to until they opt back in."""
        opt_outs = self._load(ids.opt_out_list_id(channel))
        return opt_outs.destinations if opt_outs is not None else set()

    def _opt_out_list(self, channel: str) -> OptOutList:
        return self._load(ids.opt_out_list_id(channel)) or OptOutList(channel)

    def apply_opt_out(self, *, opt_out_id: str, channel: str, destination: str, opted_out: bool,
                      source: str) -> None:
        """SMS STOP/START, 21610, email unsubscribe or spam report: the channel's opt-out list changes."""

        def decide() -> list[Any]:
            opt_outs = self._opt_out_list(channel)
            if opted_out:
                opt_outs.opt_out(destination, source, opt_out_id)
            else:
                opt_outs.opt_in(destination, source, opt_out_id)
            return [opt_outs] if opt_outs.pending_events else []

        self._run(decide)

    def apply_hold(self, *, hold_id: str, campaign_id: str, provider: str, held: bool, reason: str) -> None:
        def decide() -> list[Any]:
            campaign = self._load(uuid.UUID(campaign_id))
            if campaign is None:
                return []
            campaign.record_hold(provider=provider, held=held, reason=reason, causation_id=hold_id)
            return [campaign] if campaign.pending_events else []

        self._run(decide)

    # ----- claims -------------------------------------------------------------------------------
    def claim(self, *, claim_id: str, campaign_id: str, max_messages: int) -> int:
        """Moves up to max_messages queued messages to sending in one save; returns how many."""
        claimed = 0

        def decide() -> list[Any]:
            nonlocal claimed
            campaign = self._load(uuid.UUID(campaign_id))
            if campaign is None or campaign.claim_seen(claim_id):
                return []
            block_count = len(campaign.block_nos) if campaign.holds_channel else 0
            suppressed_destinations = self.suppressed(campaign.channel)
            items: list[dict] = []
            touched: list[MessageBlock] = []
            suppressed = 0
            budget = WORK_RECORD_BUDGET - len(str(campaign.template))
            cursor = campaign.claim_cursor
            for position in range(campaign.claim_cursor, block_count):
                block = self._block_at(campaign, position)
                moves = []
                for index in block.indexes_in("queued"):
                    if len(items) >= max_messages or budget <= 0:
                        break
                    destination = block.destinations[index]
                    if destination in suppressed_destinations:
                        moves.append((index, Move(status="opted_out")))
                        suppressed += 1
                        continue
                    item = {
                        "message_id": ids.message_id(campaign_id, block.rows[index]),
                        "row": block.rows[index],
                        "destination": destination,
                        "variables": block.variables[index],
                        "attempt": block.attempt[index],
                    }
                    budget -= 96 + len(destination) + sum(len(k) + len(v) + 8 for k, v in item["variables"].items())
                    items.append(item)
                    moves.append((index, Move(status="sending", accepted=False)))
                if moves:
                    block.move(moves, run_no=None, causation_id=claim_id)
                    touched.append(block)
                if len(items) >= max_messages or budget <= 0:
                    break
                cursor = position + 1
            released = campaign.record_claim(claim_id=claim_id, items=items, suppressed=suppressed,
                                             cursor=cursor, causation_id=claim_id)
            claimed = len(items)
            to_save: list[Any] = [campaign, *touched]
            if released:
                lock = self._lock(campaign.channel)
                lock.release(campaign_id)
                to_save.append(lock)
            return to_save

        self._run(decide)
        return claimed

    # ----- provider results and timers ----------------------------------------------------------
    def apply_results(self, *, result_id: str, campaign_id: str, results: list[dict]) -> None:
        """Provider outcomes for many messages of one campaign, applied in one save."""

        def decide() -> list[Any]:
            campaign = self._load(uuid.UUID(campaign_id))
            if campaign is None:
                return []
            refs = self._refs(campaign)
            per_block: dict[int, list[dict]] = defaultdict(list)
            for result in results:
                ref = refs.get(result["message_id"])
                if ref is None:
                    log.warning("result for unknown message %s of campaign %s", result["message_id"], campaign_id)
                    continue
                per_block[ref[0]].append({**result, "_index": ref[1]})
            to_save = self._move_messages(campaign, per_block, result_id,
                                          lambda state, r: _result_move(state, r, campaign.channel))
            opting_out = [(position, r) for position, block_results in per_block.items() for r in block_results
                          if _opts_out(r, campaign.channel)]
            if not opting_out:
                return to_save
            opt_outs = self._opt_out_list(campaign.channel)
            for position, r in opting_out:
                block = self._block_at(campaign, position)
                # Only for a message the provider had: a result about one never claimed is not believed.
                if block.status[r["_index"]] not in NEVER_HANDED_OFF:
                    opt_outs.opt_out(block.destinations[r["_index"]], f"result:{r['outcome']}", result_id)
            return to_save + ([opt_outs] if opt_outs.pending_events else [])

        self._run(decide)

    def apply_expiry(self, *, expiry_id: str, campaign_id: str, message_id: str, kind: str,
                     since_sequence: int) -> None:
        """A timer fired; it changes the message only if nothing happened to it since the timer started."""

        def decide() -> list[Any]:
            campaign = self._load(uuid.UUID(campaign_id))
            if campaign is None:
                return []
            ref = self._refs(campaign).get(message_id)
            if ref is None:
                return []
            if self._block_at(campaign, ref[0]).changed_at[ref[1]] != since_sequence:
                return []
            per_block = {ref[0]: [{"_index": ref[1], "kind": kind}]}
            return self._move_messages(campaign, per_block, expiry_id,
                                       lambda state, r: rules.expiry_move(state, r["kind"], campaign.channel))

        self._run(decide)

    def _move_messages(self, campaign: Campaign, per_block: dict[int, list[dict]],
                       causation_id: str, decide_move: Callable[[rules.MessageState, dict], Move | None]) -> list[Any]:
        delta: dict[str, int] = defaultdict(int)
        awaiting_delta = 0
        accepted = setup_error = False
        touched = []
        for position, block_results in per_block.items():
            block = self._block_at(campaign, position)
            states: dict[int, rules.MessageState] = {}
            moves = []
            for result in block_results:
                index = result["_index"]
                state = states.get(index) or block.state(index)
                move = decide_move(state, result)
                if move is None:
                    continue
                after = rules.MessageState(move.status, move.reason,
                                           move.attempt if move.attempt is not None else state.attempt,
                                           state.accepted if move.accepted is None else move.accepted)
                awaiting_delta += _awaiting(after) - _awaiting(state)
                accepted = accepted or (after.accepted and not state.accepted and move.reason != "setup_error")
                setup_error = setup_error or move.reason == "setup_error"
                states[index] = after
                moves.append((index, move))
            if moves:
                for status, n in block.move(moves, run_no=None, causation_id=causation_id).items():
                    delta[status] += n
                touched.append(block)
        if not touched:
            return []
        setup_failed = setup_error and not accepted and not campaign.accepted_in_run
        if setup_failed:
            awaiting_delta += self._fail_unaccepted(campaign, delta, touched, causation_id)
        released = campaign.record_progress(delta=dict(delta), awaiting_delta=awaiting_delta,
                                            causation_id=causation_id, accepted=accepted,
                                            setup_failed=setup_failed)
        to_save: list[Any] = [campaign, *touched]
        if released:
            lock = self._lock(campaign.channel)
            lock.release(str(campaign.id))
            to_save.append(lock)
        return to_save

    def _fail_unaccepted(self, campaign: Campaign, delta: dict[str, int], touched: list[MessageBlock],
                         causation_id: str) -> int:
        """The provider refused the credentials before accepting anything: every message of the run not yet
        accepted fails `setup_error` (contract). Returns the change of messages awaiting acceptance."""
        awaiting_delta = 0
        for position in range(len(campaign.block_nos)):
            block = self._block_at(campaign, position)
            moves = []
            for index, status in enumerate(block.status):
                if status == "queued" or (status == "sending" and not block.accepted[index]):
                    awaiting_delta -= 1 if status == "sending" else 0
                    moves.append((index, Move(status="failed", reason="setup_error", accepted=False)))
            if moves:
                for status, n in block.move(moves, run_no=None, causation_id=causation_id).items():
                    delta[status] += n
                if block not in touched:
                    touched.append(block)
        return awaiting_delta

    # ----- reading (CLI, tests) -----------------------------------------------------------------
    def campaign_view(self, campaign_id: str) -> dict | None:
        campaign = self._load(uuid.UUID(campaign_id))
        if campaign is None:
            return None
        return {"campaign_id": campaign_id, "name": campaign.name, "channel": campaign.channel,
                "status": campaign.status, "stopped": campaign.stopped, "holds_channel": campaign.holds_channel,
                "run_no": campaign.run_no, "counts": {"total": campaign.message_count, **campaign.counts}}


def _awaiting(state: rules.MessageState) -> int:
    return 1 if state.status == "sending" and not state.accepted else 0


NEVER_HANDED_OFF = frozenset({"waiting", "queued", "cancelled"})
# Outcomes that put the destination on the channel's opt-out list (the message keeps its own status rules).
_OPT_OUT_OUTCOMES = frozenset({"spamreport", "unsubscribe", "opted_out"})


def _opts_out(result: dict, channel: str) -> bool:
    if result["outcome"] in _OPT_OUT_OUTCOMES:
        return True
    return channel == "sms" and result["outcome"] in ("refused", "failed", "undelivered") \
        and str(result.get("provider_code")) == "21610"


def _result_move(state: rules.MessageState, result: dict, channel: str) -> Move | None:
    outcome = result["outcome"]
    attempt = result.get("attempt") or 0
    code = result.get("provider_code")
    if outcome in ("spamreport", "unsubscribe"):
        return None  # after delivery: only the opt-out list changes
    if outcome == "resubmitted":
        # Our own SMTP re-submission of a deferred email: recorded, status stays retrying.
        if state.status != "retrying" or attempt <= state.attempt:
            return None
        return Move(status="retrying", provider_code=code, attempt=attempt)
    if outcome == "blocked":
        outcome, code = "bounced", "blocked"
    elif outcome == "dropped":
        outcome, code = "bounced", f"dropped: {code or ''}"
    if outcome == "accepted":
        return rules.acceptance_move(state, attempt)
    if outcome == "presend_error":
        return rules.presend_error_move(state, attempt, code, bool(result.get("final")))
    if outcome == "no_answer":
        return None
    try:
        status, reason = provider_codes.classify(outcome, code, channel)
    except ValueError:  # e.g. `sent` for an email, `deferred` for an SMS
        log.warning("ignoring outcome %r (code %r) that the %s channel does not have", outcome, code, channel)
        return None
    move = rules.receipt_move(state, status, reason, code, attempt)
    if move is not None and outcome == "refused":
        # Refused at submission: the provider did not accept it (acceptance = Twilio 201 / SendGrid 202 / SMTP 250).
        move = dataclasses.replace(move, accepted=False)
    return move


def _plain(model: Any) -> Any:
    return model.model_dump(mode="json") if hasattr(model, "model_dump") else model


def run_summary(name: str, channel: str, template: dict, blocks: list[MessageBlock]) -> dict:
    """What the run modal shows: counts, a preview, SMS encoding and segments, rows missing variables."""
    message_count = sum(len(b.rows) for b in blocks)
    missing_rows: list[int] = []
    missing_count = 0
    summary: dict[str, Any] = {"name": name, "channel": channel, "message_count": message_count,
                               "from_email": None, "from_name": None, "attachments": [], "encoding": None,
                               "segments": None, "segments_total": None}
    if channel == "sms":
        text = template["body"]
        first = True
        encoding = "GSM-7"
        segments_max = segments_total = 0
        for block in blocks:
            for row, variables in zip(block.rows, block.variables):
                rendered = templating.render(text, variables)
                if first:
                    summary["preview"] = rendered
                    first = False
                if templating.missing_variables(text, variables):
                    missing_count += 1
                    if len(missing_rows) < SUMMARY_ROWS_LISTED:
                        missing_rows.append(row)
                if encoding == "GSM-7" and templating.sms_encoding(rendered) == "UCS-2":
                    encoding = "UCS-2"
                segments = templating.sms_segments(rendered)
                segments_max = max(segments_max, segments)
                segments_total += segments
        if first:
            summary["preview"] = text
        summary.update(encoding=encoding, segments=segments_max or templating.sms_segments(text),
                       segments_total=segments_total)
    else:
        texts = template["subject"] + "\n" + template["html"]
        for block in blocks:
            for row, variables in zip(block.rows, block.variables):
                if templating.missing_variables(texts, variables):
                    missing_count += 1
                    if len(missing_rows) < SUMMARY_ROWS_LISTED:
                        missing_rows.append(row)
        variables0 = blocks[0].variables[0] if blocks and blocks[0].rows else {}
        summary.update(preview=templating.render(template["subject"], variables0),
                       from_email=template.get("from_email"), from_name=template.get("from_name"),
                       attachments=[a["filename"] for a in template.get("attachments", [])])
    summary.update(rows_missing_variables=missing_rows, missing_variables_count=missing_count)
    return summary
