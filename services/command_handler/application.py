"""The command handler's use cases: load the aggregates, call the domain method that decides (it checks
its own guards and raises `Rejected`), then one save() of every aggregate touched. Commands arrive as
the typed `schemas.commands` union, provider results as `schemas.internal.SenderResult` (handlers.py).

Only this application writes to the event store. Each use case commits its message moves, the campaign's
derived status, the channel lock and the command's stored answer in one transaction; a racing writer
loses on optimistic concurrency and the use case is decided again on fresh state.
"""
from __future__ import annotations

import functools
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.persistence import IntegrityError, OperationalError, ProgrammingError

from schemas.commands import (
    AddContacts, Command, CommandHeader, CreateCampaign, DeleteCampaign, RetryFailedMessages, RunCampaign,
    StopCampaign, UpdateTemplate,
)
from schemas.internal import SenderResult
from services.common import ids
from services.common.fence import HandoffFence, open_fence
from services.common.retry import retrying
from services.common.settings import Settings
from services.command_handler import wire
from services.command_handler.domain import contacts as contact_rules
from services.command_handler.domain import rules
from services.command_handler.domain.model import (
    Campaign, ChannelLock, CommandLog, MessageBlock, OptOutList, Rejected,
)
from services.command_handler.domain.rules import Move

log = logging.getLogger(__name__)

CONFLICT_RETRIES = 20
WORK_RECORD_BUDGET = 700 * 1024  # a claim's work record stays well under the 1 MiB record limit
OPEN_ATTEMPTS = 10

T = TypeVar("T")


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


def open_app(settings: Settings, attempts: int = OPEN_ATTEMPTS) -> "OutreachApp":
    """The application, retrying while another process creates the same tables in a fresh database
    (PostgreSQL's CREATE TABLE IF NOT EXISTS races between processes: e.g. DuplicateTable)."""
    for attempt in retrying(on=(IntegrityError, OperationalError, ProgrammingError), timeout_s=None,
                            attempts=attempts):
        with attempt:
            return OutreachApp(settings)
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

    @functools.cached_property
    def fence(self) -> HandoffFence:
        """The hand-off fence (the relay opens claims there, the use cases that take a claim back close
        them); opened on first use, so a reader of the store (`outreach replay`) never makes one."""
        return open_fence(self.settings)

    def close(self) -> None:
        super().close()
        if "fence" in self.__dict__:
            self.fence.close_connection()

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
    def handle_command(self, command: Command | None, header: CommandHeader, invalid_detail: str | None = None) -> None:
        """Answers one command exactly once: a repeated command_id gets its stored answer again.

        `command` is the parsed command, or None with `invalid_detail` when it failed validation (`header`
        then still says what to answer).
        """
        command_id, campaign_id, command_type = header.command_id, header.campaign_id, header.type

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

    def _decide(self, command: Command) -> list[Any]:
        """The use case of one command: every aggregate it changed (not saved yet)."""
        return self._USE_CASES[type(command)](self, command)

    def _create_campaign(self, cmd: CreateCampaign) -> list[Any]:
        if self._load(uuid.UUID(cmd.campaign_id)) is not None:
            raise Rejected("campaign_exists", "campaign ids are never reused")
        campaign = Campaign(campaign_id=uuid.UUID(cmd.campaign_id), name=cmd.name, description=cmd.description,
                            channel=cmd.channel, template=cmd.template.model_dump(mode="json"),
                            created_by=cmd.issued_by, causation_id=cmd.command_id)
        return [campaign]

    def _add_contacts(self, cmd: AddContacts) -> list[Any]:
        campaign = self._campaign(cmd.campaign_id)
        if campaign.chunk_applied(cmd.chunk_no):
            campaign.repeat_contacts_answer(cmd.chunk_no, cmd.command_id)
            return [campaign]
        campaign.check_can_add_contacts(cmd.chunk_no, [c.row for c in cmd.contacts])  # before the screening
        valid, invalid_rows = contact_rules.screen_chunk(
            campaign.channel, [(c.row, c.destination, dict(c.variables)) for c in cmd.contacts],
            campaign.destinations)
        to_save: list[Any] = [campaign]
        new_blocks = []
        if valid:
            new_blocks.append(MessageBlock(
                campaign_id=cmd.campaign_id, block_no=cmd.chunk_no, channel=campaign.channel,
                rows=[r for r, _, _ in valid], destinations=[d for _, d, _ in valid],
                variables=[v for _, _, v in valid], causation_id=cmd.command_id))
            to_save += new_blocks
        blocks = self._blocks(campaign) + new_blocks if cmd.last_chunk else []  # for the run summary
        campaign.add_contacts(chunk_no=cmd.chunk_no, valid_rows=[r for r, _, _ in valid],
                              destinations=[d for _, d, _ in valid],
                              invalid_rows=[[row, reason] for row, reason in invalid_rows],
                              last_chunk=cmd.last_chunk, blocks=blocks, causation_id=cmd.command_id)
        return to_save

    def _update_template(self, cmd: UpdateTemplate) -> list[Any]:
        campaign = self._campaign(cmd.campaign_id)
        campaign.check_can_update_template(cmd.template)  # before the blocks are loaded
        blocks = self._blocks(campaign) if campaign.contacts_closed else []  # for the run summary
        campaign.update_template(cmd.template, blocks, cmd.command_id)
        return [campaign]

    def _run_campaign(self, cmd: RunCampaign) -> list[Any]:
        campaign = self._campaign(cmd.campaign_id)
        disclaimer = cmd.disclaimer.model_dump(mode="json")
        campaign.check_can_run(disclaimer)  # before the blocks are loaded and every message's move worked out
        lock = self._lock(campaign.channel)
        blocks = self._blocks(campaign)
        suppressed_destinations = self.suppressed(campaign.channel)
        moves = {}  # each waiting message: queued, or opted out when its destination is
        for position, block in enumerate(blocks):
            moves[position] = [
                (index, Move(status="opted_out" if block.destinations[index] in suppressed_destinations
                             else "queued"))
                for index in block.indexes_in("waiting")]
        suppressed = sum(mv.status == "opted_out" for block_moves in moves.values() for _, mv in block_moves)
        queued = sum(len(block_moves) for block_moves in moves.values()) - suppressed
        campaign.start_run(accepted_by=cmd.issued_by, disclaimer=disclaimer,
                           queued=queued, suppressed=suppressed, causation_id=cmd.command_id)
        lock.take(cmd.campaign_id, hold=campaign.holds_channel)
        for position, block in enumerate(blocks):
            block.move(moves[position], run_no=campaign.run_no, causation_id=cmd.command_id)
        return [campaign, *blocks, *([lock] if lock.pending_events else [])]

    def _stop_campaign(self, cmd: StopCampaign) -> list[Any]:
        campaign = self._campaign(cmd.campaign_id)
        blocks = self._blocks(campaign)
        queued = [block.indexes_in("queued") for block in blocks]
        campaign.stop(stopped_by=cmd.issued_by, confirmed=cmd.confirmed, cancelled=sum(map(len, queued)),
                      causation_id=cmd.command_id)
        for block, indexes in zip(blocks, queued):
            block.move([(i, Move(status="cancelled")) for i in indexes], run_no=None, causation_id=cmd.command_id)
        lock = self._lock(campaign.channel)
        lock.release(cmd.campaign_id)
        return [campaign, *blocks, lock]

    def _retry_failed(self, cmd: RetryFailedMessages) -> list[Any]:
        campaign = self._campaign(cmd.campaign_id)
        campaign.check_retryable()  # before the blocks are loaded
        blocks = self._blocks(campaign)
        named = cmd.message_ids is not None
        unknown: list[str] = []
        if named:
            refs = self._refs(campaign)
            unknown = [m for m in cmd.message_ids if m not in refs]
            wanted: dict[int, list[int]] = defaultdict(list)
            for m in dict.fromkeys(cmd.message_ids):
                if m in refs:
                    position, index = refs[m]
                    wanted[position].append(index)
            candidates: dict[int, Any] = wanted
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
        campaign.start_retry(moved_from=dict(moved_from), unknown_message_ids=unknown, causation_id=cmd.command_id)
        lock = self._lock(campaign.channel)
        lock.take(cmd.campaign_id, hold=True)
        for position, indexes in selected.items():
            blocks[position].move([(i, Move(status="queued", reason=None, accepted=False)) for i in indexes],
                                  run_no=campaign.run_no, causation_id=cmd.command_id)
        return [campaign, *blocks, lock]

    def _delete_campaign(self, cmd: DeleteCampaign) -> list[Any]:
        campaign = self._campaign(cmd.campaign_id)
        campaign.delete(cmd.command_id)
        return [campaign]

    # Each command's use case.
    _USE_CASES: dict[type, Callable[[Any, Any], list[Any]]] = {
        CreateCampaign: _create_campaign, AddContacts: _add_contacts, UpdateTemplate: _update_template,
        RunCampaign: _run_campaign, StopCampaign: _stop_campaign, RetryFailedMessages: _retry_failed,
        DeleteCampaign: _delete_campaign,
    }

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
        """A sender's breaker held (or released) the campaign's provider. A hold also returns the claimed
        messages nobody handed off to the queue (contract v1.1): the fence closes them first, so no sender
        can still hand one off, and tells which they are."""

        def decide() -> list[Any]:
            campaign = self._load(uuid.UUID(campaign_id))
            if campaign is None:
                return []
            campaign.record_hold(provider=provider, held=held, reason=reason, causation_id=hold_id)
            to_save: list[Any] = []
            if held:
                returned = self.fence.close_open_of_campaign(campaign_id, closed_by=hold_id)
                refs = self._refs(campaign) if returned else {}
                per_block: dict[int, list[tuple[int, None]]] = defaultdict(list)
                for message_id in returned:
                    if (ref := refs.get(message_id)) is not None:
                        per_block[ref[0]].append((ref[1], None))
                claiming = campaign.holds_channel
                to_save = self._move_messages(campaign, per_block, hold_id,
                                              lambda state, _: rules.hold_move(state, claiming=claiming))
            return to_save or ([campaign] if campaign.pending_events else [])

        self._run(decide)

    # ----- claims -------------------------------------------------------------------------------
    def claim(self, *, claim_id: str, campaign_id: str, max_messages: int) -> int:
        """Moves up to max_messages queued messages to sending in one save; returns how many."""
        claimed = 0

        def decide() -> list[Any]:
            nonlocal claimed
            campaign = self._load(uuid.UUID(campaign_id))
            if campaign is None or not campaign.accepts_claim(claim_id) or campaign.is_held:
                return []  # held: unanswered (the senders pause claiming until CampaignSendingResumed)
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
    def apply_results(self, *, result_id: str, campaign_id: str, results: Sequence[SenderResult]) -> None:
        """Provider outcomes for many messages of one campaign, applied in one save."""

        def decide() -> list[Any]:
            campaign = self._load(uuid.UUID(campaign_id))
            if campaign is None:
                return []
            refs = self._refs(campaign)
            per_block: dict[int, list[tuple[int, SenderResult]]] = defaultdict(list)
            for result in self._current_submissions(results):
                ref = refs.get(result.message_id)
                if ref is None:
                    log.warning("result for unknown message %s of campaign %s", result.message_id, campaign_id)
                    continue
                per_block[ref[0]].append((ref[1], result))
            to_save = self._move_messages(campaign, per_block, result_id,
                                          lambda state, r: rules.result_move(state, r, campaign.channel))
            opting_out = [(position, index, r) for position, block_results in per_block.items()
                          for index, r in block_results if rules.opts_out_destination(r, campaign.channel)]
            if not opting_out:
                return to_save
            opt_outs = self._opt_out_list(campaign.channel)
            for position, index, r in opting_out:
                block = self._block_at(campaign, position)
                # Only for a message the provider had: a result about one never claimed is not believed.
                if block.status[index] not in rules.NEVER_HANDED_OFF:
                    opt_outs.opt_out(block.destinations[index], f"result:{r.outcome}", result_id)
            return to_save + ([opt_outs] if opt_outs.pending_events else [])

        self._run(decide)

    def _current_submissions(self, results: Sequence[SenderResult]) -> list[SenderResult]:
        """The results about each message's latest submission, every one with its number: a receipt that came
        without it (before the sender's own result, or from a provider that does not echo it) gets the
        fence's count of hand-offs; one about an earlier submission (a late receipt of an earlier run, after
        a retry handed the message off again) is dropped. Messages without a fence row keep their results."""
        submissions = self.fence.submissions([r.message_id for r in results])
        current = []
        for result in results:
            made = submissions.get(result.message_id)
            if made is not None and result.attempt is not None and result.attempt < made:
                log.info("result %s of submission %d of message %s ignored: it was handed off %d times",
                         result.outcome, result.attempt, result.message_id, made)
                continue
            if made and result.attempt is None:
                result = result.model_copy(update={"attempt": made})
            current.append(result)
        return current

    def apply_expiry(self, *, expiry_id: str, campaign_id: str, message_id: str, kind: str,
                     since_sequence: int) -> None:
        """A timer fired; it changes the message only if nothing happened to it since the timer started."""

        def decide() -> list[Any]:
            campaign = self._load(uuid.UUID(campaign_id))
            if campaign is None:
                return []
            ref = self._refs(campaign).get(message_id)
            block = self._block_at(campaign, ref[0]) if ref is not None else None
            if block is None or block.changed_since(ref[1], since_sequence):
                return []
            # Still `sending` at the Sending limit: a message the fence never granted to a sender did not reach
            # a provider (closed now, so none can take it any more) and is queued again, not timed out.
            was_open, submissions = False, None
            if kind == "sending" and block.status[ref[1]] == "sending":
                was_open, submissions = self.fence.close_if_open(message_id, closed_by=expiry_id)
            per_block = {ref[0]: [(ref[1], kind)]}
            claiming = campaign.holds_channel
            return self._move_messages(
                campaign, per_block, expiry_id,
                lambda state, k: rules.expiry_move(state, k, campaign.channel, handed_off=not was_open,
                                                   submissions=submissions, claiming=claiming))

        self._run(decide)

    def _move_messages(self, campaign: Campaign, per_block: dict[int, list[tuple[int, T]]], causation_id: str,
                       decide_move: Callable[[rules.MessageState, T], Move | None]) -> list[Any]:
        """Applies to each (message index, what happened) of each block position the move `decide_move`
        decides, then the campaign's progress, in one list of aggregates to save."""
        delta: dict[str, int] = defaultdict(int)
        awaiting_delta = 0
        accepted = setup_error = False
        requeued_from: int | None = None
        touched = []
        for position, block_results in per_block.items():
            block = self._block_at(campaign, position)
            states: dict[int, rules.MessageState] = {}
            moves = []
            for index, happened in block_results:
                state = states.get(index) or block.state(index)
                move = decide_move(state, happened)
                if move is None:
                    continue
                after = rules.MessageState(move.status, move.reason,
                                           move.attempt if move.attempt is not None else state.attempt,
                                           state.accepted if move.accepted is None else move.accepted)
                awaiting_delta += rules.awaiting_acceptance(after) - rules.awaiting_acceptance(state)
                accepted = accepted or (after.accepted and not state.accepted and move.reason != "setup_error")
                setup_error = setup_error or move.reason == "setup_error"
                states[index] = after
                moves.append((index, move))
                if move.status == "queued":
                    requeued_from = position if requeued_from is None else min(requeued_from, position)
            if moves:
                for status, n in block.move(moves, run_no=None, causation_id=causation_id).items():
                    delta[status] += n
                touched.append(block)
        if not touched:
            return []
        setup_failed = campaign.setup_fails(refused_credentials=setup_error, accepted_now=accepted)
        if setup_failed:
            awaiting_delta += self._fail_unaccepted(campaign, delta, touched, causation_id)
        released = campaign.record_progress(delta=dict(delta), awaiting_delta=awaiting_delta,
                                            causation_id=causation_id, accepted=accepted,
                                            setup_failed=setup_failed, requeued_from=requeued_from)
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
                if rules.fails_on_setup_error(status, block.accepted[index]):
                    awaiting_delta -= rules.awaiting_acceptance(block.state(index))
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

