"""The aggregates: Campaign, MessageBlock, ChannelLock, CommandLog (eventsourcing style, no I/O).

Each public method checks its own guards (small `check_*` methods raising `Rejected`, in the contract's
order of rejection reasons) and then calls its `@event` method, which only applies what was decided, so
replaying stored events rebuilds exactly the state that was saved. Every campaign event carries the
status change it caused (if any), so the relay can map stored events to wire records without state.
"""
from __future__ import annotations

import sys
import uuid
from collections.abc import Iterable, Sequence
from types import MappingProxyType
from typing import Any

from eventsourcing.domain import Aggregate, event
from eventsourcing.domain import Snapshot as LibrarySnapshot

from schemas.commands import EmailTemplate, SmsTemplate, template_matches_channel
from schemas.destinations import DestinationSet  # noqa: F401  (the campaign's; shared with the importers' check)
from schemas.internal import template_digest
from services.common import ids
from services.command_handler.domain import rules
from services.command_handler.domain.rules import MessageState, Move
from services.command_handler.domain.summary import run_summary

MAX_CONTACTS = 300_000
RECENT_CLAIMS_KEPT = 256
TEST_MESSAGES_KEPT = 64  # a campaign remembers its latest test messages (their late results), no more


class Snapshot(LibrarySnapshot):
    """The state of an aggregate at a version (eventsourcing's snapshot), restored exactly: JSON has no int
    keys and no sets, so an aggregate with such state says how to restore it (`restore_snapshot_state`;
    sets are stored by the application's `set` transcoding). A later change of an aggregate's attributes
    must come with `class_version` and an `upcast_v1_v2` (eventsourcing's rule), so older snapshots still load.
    """

    def mutate(self, _: None) -> Any:
        aggregate = super().mutate(None)
        restore = getattr(aggregate, "restore_snapshot_state", None)
        if restore is not None:
            restore()
        return aggregate


class Rejected(Exception):
    """A command the rules refuse: answered by a CommandRejected with this reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Campaign(Aggregate):
    Snapshot = Snapshot

    @event("Created")
    def __init__(self, campaign_id: uuid.UUID, name: str, description: str | None, channel: str,
                 template: dict, created_by: str, causation_id: str):
        self.name = name
        self.description = description
        self.channel = channel
        self.template = template
        self.created_by = created_by
        self.status = "created"
        self.ready = False
        self.next_chunk_no = 0
        self.contacts_closed = False
        self.chunk_answers: dict[int, dict] = {}
        self.destinations = DestinationSet()  # while the contacts are open
        self.rows_seen = 0
        self.message_count = 0
        self.block_nos: list[int] = []
        self.run_no = 0
        self.stopped = False
        self.stopped_by: str | None = None
        self.holds_channel = False
        self.setup_failed = False
        self.accepted_in_run = False  # the provider accepted a message of the current run
        self.counts = rules.empty_counts()
        self.awaiting_acceptance = 0
        self.claim_cursor = 0
        self.recent_claims: list[str] = []
        self.held_by: dict[str, bool] = {}
        self.summary: dict | None = None

    @staticmethod
    def create_id(campaign_id: uuid.UUID, **_: Any) -> uuid.UUID:
        return campaign_id

    def restore_snapshot_state(self) -> None:
        """After a snapshot: the chunk numbers were JSON object keys (text)."""
        self.chunk_answers = {int(chunk_no): answer for chunk_no, answer in self.chunk_answers.items()}

    # ----- guards -------------------------------------------------------------------------------
    @property
    def deleted(self) -> bool:
        return self.status == "deleted"

    @property
    def has_run(self) -> bool:
        return self.run_no > 0

    def _derived_status(self, counts: dict[str, int], *, ready: bool | None = None,
                        has_run: bool | None = None, setup_failed: bool | None = None) -> str:
        if self.deleted:
            return "deleted"
        return rules.derive_status(
            counts,
            has_run=self.has_run if has_run is None else has_run,
            ready=self.ready if ready is None else ready,
            setup_failed=self.setup_failed if setup_failed is None else setup_failed,
        )

    def _status_change(self, new_status: str, counts: dict[str, int], stopped: bool | None = None) -> dict | None:
        if new_status == self.status:
            return None
        return {
            "status": new_status,
            "previous_status": self.status,
            "stopped": self.stopped if stopped is None else stopped,
            "counts": {"total": self.message_count, **counts},
        }

    def _apply_status_change(self, status_change: dict | None) -> None:
        if status_change:
            self.status = status_change["status"]

    # ----- contacts -----------------------------------------------------------------------------
    def chunk_applied(self, chunk_no: int) -> bool:
        """The chunk was applied before: a repeat (under any command id) is answered with its stored counts."""
        return chunk_no < self.next_chunk_no

    def check_contacts_open(self) -> None:
        if self.contacts_closed or self.has_run:
            raise Rejected("contacts_closed", "the last chunk was already added")

    def check_within_contacts_limit(self, row_count: int) -> None:
        if self.rows_seen + row_count > MAX_CONTACTS:
            raise Rejected("too_many_contacts", f"more than {MAX_CONTACTS:,} contacts in all")

    def check_chunk_in_order(self, chunk_no: int) -> None:
        if chunk_no > self.next_chunk_no:
            raise Rejected("invalid_command", f"chunk {chunk_no} arrived before chunk {self.next_chunk_no}")

    @staticmethod
    def check_rows_unique(rows: list[int]) -> None:
        if len(set(rows)) != len(rows):
            raise Rejected("invalid_command", "a row number appears twice in the chunk")

    def check_can_add_contacts(self, chunk_no: int, rows: list[int]) -> None:
        """The guards of `add_contacts`, which need no screening: a use case calls them before it screens."""
        self.check_contacts_open()
        self.check_within_contacts_limit(len(rows))
        self.check_chunk_in_order(chunk_no)
        self.check_rows_unique(rows)

    def add_contacts(self, *, chunk_no: int, valid_rows: list[int], destinations: list[str],
                     invalid_rows: list[list], last_chunk: bool, blocks: Iterable[MessageBlock],
                     causation_id: str) -> None:
        """One screened chunk (`invalid_rows`: [row, reason]). After the last chunk the campaign is ready and
        its run summary is made from `blocks`, every block of the campaign (this chunk's included), read once
        (the application loads them one at a time)."""
        self.check_can_add_contacts(chunk_no, valid_rows + [row for row, _reason in invalid_rows])
        summary = run_summary(self.name, self.channel, self.template, blocks) if last_chunk else None
        message_count = self.message_count + len(valid_rows)
        ready = last_chunk
        counts = dict(self.counts)
        counts["waiting"] += len(valid_rows)
        change = self._status_change(self._derived_status(counts, ready=ready), counts)
        if change:
            change["counts"]["total"] = message_count
        self._contacts_added(
            chunk_no=chunk_no, message_count=message_count, valid_rows=valid_rows, destinations=destinations, invalid_rows=invalid_rows,
            last_chunk=last_chunk, summary=summary, status_change=change, causation_id=causation_id,
        )

    @event("ContactsAdded")
    def _contacts_added(self, chunk_no: int, message_count: int, valid_rows: list[int], destinations: list[str],
                        invalid_rows: list[list], last_chunk: bool, summary: dict | None,
                        status_change: dict | None, causation_id: str) -> None:
        self.chunk_answers[chunk_no] = {
            "chunk_no": chunk_no, "valid": len(valid_rows), "invalid": len(invalid_rows),
            "invalid_rows": invalid_rows,
        }
        self.next_chunk_no = chunk_no + 1
        self.rows_seen += len(valid_rows) + len(invalid_rows)
        self.destinations.update(destinations)
        if valid_rows:
            self.block_nos.append(chunk_no)
        self.message_count = message_count
        self.counts["waiting"] += len(valid_rows)
        if last_chunk:
            self.contacts_closed = True
            self.ready = True
            self.summary = summary
            # Only the screening of later chunks reads them: not kept (in memory, in snapshots) once closed.
            self.destinations = DestinationSet()
        self._apply_status_change(status_change)

    def repeat_contacts_answer(self, chunk_no: int, causation_id: str) -> None:
        """A chunk already applied, under another command id: answered again with the stored counts."""
        self._contacts_answer_repeated(answer=self.chunk_answers[chunk_no], causation_id=causation_id)

    @event("ContactsAnswerRepeated")
    def _contacts_answer_repeated(self, answer: dict, causation_id: str) -> None:
        pass

    # ----- template -----------------------------------------------------------------------------
    def check_editable(self) -> None:
        if self.status not in rules.EDITABLE_STATUSES:
            raise Rejected("not_editable", f"the campaign is {self.status}")

    def check_template_fits_channel(self, template: SmsTemplate | EmailTemplate) -> None:
        if not template_matches_channel(template, self.channel):
            raise Rejected("invalid_command", f"the template is not a valid {self.channel} template")

    def check_can_update_template(self, template: SmsTemplate | EmailTemplate) -> None:
        """The guards of `update_template`: a use case calls them before it loads the blocks."""
        self.check_editable()
        self.check_template_fits_channel(template)

    def update_template(self, template: SmsTemplate | EmailTemplate, blocks: Iterable[MessageBlock],
                        causation_id: str) -> None:
        """A new template; once the contacts are closed the run summary is made again from `blocks` (read once)."""
        self.check_can_update_template(template)
        plain = template.model_dump(mode="json")
        summary = run_summary(self.name, self.channel, plain, blocks) if self.contacts_closed else None
        self._template_updated(template=plain, summary=summary, causation_id=causation_id)

    @event("TemplateUpdated")
    def _template_updated(self, template: dict, summary: dict | None, causation_id: str) -> None:
        self.template = template
        if summary is not None:
            self.summary = summary

    # ----- run / stop / retry -------------------------------------------------------------------
    def check_ready(self) -> None:
        if self.status != "ready":
            raise Rejected("campaign_not_ready", f"the campaign is {self.status}")

    @staticmethod
    def check_disclaimer_accepted(disclaimer: dict) -> None:
        if not all(disclaimer.get(k) is True for k in rules.DISCLAIMER_CONFIRMATIONS):
            raise Rejected("disclaimer_not_accepted", "all four disclaimer confirmations are required")

    def check_has_valid_contacts(self) -> None:
        if self.message_count == 0:
            raise Rejected("no_valid_contacts", "the campaign has no valid contact")

    def check_attachments_uploaded(self) -> None:
        if self.channel == "email":
            pending = [a.get("filename") for a in self.template.get("attachments", []) if a.get("status") != "complete"]
            if pending:
                raise Rejected("attachments_not_ready", f"not fully uploaded: {', '.join(map(str, pending))}")

    def check_can_run(self, disclaimer: dict) -> None:
        """The guards of `start_run`: a use case calls them before it works out the run's moves."""
        self.check_ready()
        self.check_disclaimer_accepted(disclaimer)
        self.check_has_valid_contacts()
        self.check_attachments_uploaded()

    def start_run(self, *, accepted_by: str, disclaimer: dict, queued: int, suppressed: int,
                  causation_id: str) -> None:
        """The first run: `queued` waiting messages queued, `suppressed` ones opted out (their destination is
        on the channel's opt-out list). The channel is held while any message is queued."""
        self.check_can_run(disclaimer)
        counts = dict(self.counts)
        counts["waiting"] -= queued + suppressed
        counts["queued"] += queued
        counts["opted_out"] += suppressed
        change = self._status_change(self._derived_status(counts, has_run=True), counts)
        self._run_started(run_no=self.run_no + 1, accepted_by=accepted_by, disclaimer=disclaimer,
                          message_count=queued, suppressed_count=suppressed, counts=counts,
                          holds_channel=queued > 0, status_change=change, causation_id=causation_id)

    @event("RunStarted")
    def _run_started(self, run_no: int, accepted_by: str, disclaimer: dict, message_count: int,
                     suppressed_count: int, counts: dict, holds_channel: bool, status_change: dict | None,
                     causation_id: str) -> None:
        self.run_no = run_no
        self.counts = dict(counts)
        self.holds_channel = holds_channel
        self.accepted_in_run = False
        self.claim_cursor = 0
        self._apply_status_change(status_change)

    def check_running(self) -> None:
        if not self.holds_channel:
            raise Rejected("campaign_not_running", f"the campaign is {self.status} and holds no channel")

    @staticmethod
    def check_stop_confirmed(confirmed: bool) -> None:
        if confirmed is not True:
            raise Rejected("stop_not_confirmed", "a stop needs an explicit confirmation")

    def stop(self, *, stopped_by: str, confirmed: bool, cancelled: int, causation_id: str) -> None:
        """A confirmed stop: the `cancelled` queued messages are cancelled and the channel is released."""
        self.check_running()
        self.check_stop_confirmed(confirmed)
        counts = dict(self.counts)
        counts["queued"] -= cancelled
        counts["cancelled"] += cancelled
        change = self._status_change(self._derived_status(counts), counts, stopped=True)
        self._stopped(stopped_by=stopped_by, cancelled_count=cancelled, counts=counts,
                      status_change=change, causation_id=causation_id)

    @event("Stopped")
    def _stopped(self, stopped_by: str, cancelled_count: int, counts: dict, status_change: dict | None,
                 causation_id: str) -> None:
        self.stopped = True
        self.stopped_by = stopped_by
        self.holds_channel = False
        self.counts = dict(counts)
        self._apply_status_change(status_change)

    def check_retryable(self) -> None:
        if not self.has_run:
            raise Rejected("not_retryable", f"the campaign is {self.status}: it has not run")

    @staticmethod
    def check_messages_known(unknown_message_ids: Sequence[str]) -> None:
        if unknown_message_ids:
            raise Rejected("invalid_command",
                           f"not messages of this campaign: {', '.join(unknown_message_ids[:5])}")

    @staticmethod
    def check_something_to_retry(moved_from: dict[str, int]) -> None:
        if not moved_from:
            raise Rejected("nothing_to_retry", "no message of the campaign can be retried")

    def start_retry(self, *, moved_from: dict[str, int], unknown_message_ids: Sequence[str] = (),
                    causation_id: str) -> None:
        """A new run of the retryable messages (`moved_from`: how many leave each status for `queued`);
        `unknown_message_ids`: ids the command named that are not messages of this campaign."""
        self.check_retryable()
        self.check_messages_known(unknown_message_ids)
        self.check_something_to_retry(moved_from)
        counts = dict(self.counts)
        queued = sum(moved_from.values())
        for status, n in moved_from.items():
            counts[status] -= n
        counts["queued"] += queued
        change = self._status_change(self._derived_status(counts, setup_failed=False), counts)
        self._retry_started(run_no=self.run_no + 1, message_count=queued, counts=counts,
                            status_change=change, causation_id=causation_id)

    @event("RetryStarted")
    def _retry_started(self, run_no: int, message_count: int, counts: dict, status_change: dict | None,
                       causation_id: str) -> None:
        self.run_no = run_no
        self.counts = dict(counts)
        self.holds_channel = True
        self.setup_failed = False
        self.accepted_in_run = False
        self.claim_cursor = 0
        self._apply_status_change(status_change)

    # ----- delete -------------------------------------------------------------------------------
    def check_deletable(self) -> None:
        if self.status not in rules.DELETABLE_STATUSES:
            raise Rejected("not_deletable", f"the campaign is {self.status}")

    def delete(self, causation_id: str) -> None:
        self.check_deletable()
        change = self._status_change("deleted", dict(self.counts))
        self._deleted(status_change=change, causation_id=causation_id)

    @event("Deleted")
    def _deleted(self, status_change: dict | None, causation_id: str) -> None:
        self._apply_status_change(status_change)

    # ----- rejections ---------------------------------------------------------------------------
    def record_rejection(self, *, command_id: str, command_type: str, reason: str, detail: str) -> None:
        """A refused command is still an event of the campaign: it gets a sequence and is answered once."""
        self._command_rejected(command_id=command_id, command_type=command_type, reason=reason,
                               detail=detail, causation_id=command_id)

    @event("CommandRejected")
    def _command_rejected(self, command_id: str, command_type: str, reason: str, detail: str,
                          causation_id: str) -> None:
        pass

    # ----- test messages (SendTestMessage, our addition) ----------------------------------------
    # message_id -> {"destination", "requested_by", "outcome"} of the campaign's latest test messages (at most
    # TEST_MESSAGES_KEPT; an older one's late result is ignored). A class default (read-only, not annotated: an
    # annotation would make the aggregate a dataclass), so a campaign stored or snapshotted before test messages
    # existed has none; the attribute is always replaced, never changed in place.
    test_messages = MappingProxyType({})

    def check_test_contact(self, row: int | None, found: bool) -> None:
        """A test message's `row` must be a valid contact of the campaign (`found`: the application looked)."""
        if row is not None and not found:
            raise Rejected("invalid_command", f"row {row} is no valid contact of this campaign")

    def queue_test_message(self, *, message_id: str, destination: str, requested_by: str, row: int | None,
                           variables: dict[str, str], preview: str, causation_id: str) -> None:
        """A test message goes to the sender. It is no message of the campaign: no block, count or status
        changes, and the channel lock is not asked (the application checked the destination and the quota)."""
        self._test_message_queued(message_id=message_id, destination=destination, requested_by=requested_by,
                                  row=row, variables=variables, preview=preview, channel=self.channel,
                                  template_digest=template_digest(self.template), causation_id=causation_id)

    @event("TestMessageQueued")
    def _test_message_queued(self, message_id: str, destination: str, requested_by: str, row: int | None,
                             variables: dict, preview: str, channel: str, template_digest: str,
                             causation_id: str) -> None:
        # channel and template_digest: for the sender's work record, which the relay makes from this event alone.
        self._remember_test_message(message_id, destination, requested_by, None)

    def complete_test_message(self, *, message_id: str, outcome: str, reason: str | None,
                              provider_code: str | None, provider_message_id: str | None, causation_id: str,
                              destination: str | None = None, requested_by: str | None = None) -> bool:
        """Record a test message's outcome, if it applies (`rules.outcome_of_test_message_applies`); a message
        not queued here (`destination` and `requested_by` given: answered at once, opted out) is recorded too.
        Returns whether it was. `causation_id` is the SendTestMessage's command_id: the outcome answers it."""
        known = self.test_messages.get(message_id)
        if known is None and destination is None:
            return False  # not a test message of this campaign (or one forgotten long ago)
        current = known["outcome"] if known is not None else None
        if known is not None and not rules.outcome_of_test_message_applies(current, outcome):
            return False
        self._test_message_completed(
            message_id=message_id, destination=known["destination"] if known else destination,
            requested_by=known["requested_by"] if known else requested_by, outcome=outcome, reason=reason,
            provider_code=provider_code, provider_message_id=provider_message_id, causation_id=causation_id)
        return True

    @event("TestMessageCompleted")
    def _test_message_completed(self, message_id: str, destination: str, requested_by: str, outcome: str,
                                reason: str | None, provider_code: str | None, provider_message_id: str | None,
                                causation_id: str) -> None:
        self._remember_test_message(message_id, destination, requested_by, outcome)

    def _remember_test_message(self, message_id: str, destination: str, requested_by: str,
                               outcome: str | None) -> None:
        kept = {mid: known for mid, known in self.test_messages.items() if mid != message_id}
        kept[message_id] = {"destination": destination, "requested_by": requested_by, "outcome": outcome}
        self.test_messages = dict(list(kept.items())[-TEST_MESSAGES_KEPT:])

    # ----- provider holds -----------------------------------------------------------------------
    @property
    def is_held(self) -> bool:
        """A provider hold is on: no claims are answered until it lifts (contract v1.1)."""
        return any(self.held_by.values())

    def record_hold(self, *, provider: str, held: bool, reason: str, causation_id: str) -> None:
        """The sender's circuit breaker held (or resumed) this campaign's sending; told only on a change."""
        if self.held_by.get(provider, False) == held:
            return
        self._hold_changed(provider=provider, held=held, reason=reason, causation_id=causation_id)

    @event("HoldChanged")
    def _hold_changed(self, provider: str, held: bool, reason: str, causation_id: str) -> None:
        self.held_by = {**self.held_by, provider: held}

    # ----- claims and message progress ----------------------------------------------------------
    def accepts_claim(self, claim_id: str) -> bool:
        """A claim is answered once, and only for a campaign that has run (a WorkClaimed names its run)."""
        return self.has_run and claim_id not in self.recent_claims

    def record_claim(self, *, claim_id: str, items: list[dict], suppressed: int, cursor: int,
                     causation_id: str) -> bool:
        """Messages moved queued -> sending for the sender. Returns True when the channel is released."""
        delta = {"queued": -(len(items) + suppressed), "sending": len(items), "opted_out": suppressed}
        was_holding = self.holds_channel
        counts, change, holds = self._progress(delta, awaiting_delta=len(items))
        self._work_claimed(claim_id=claim_id, run_no=self.run_no, channel=self.channel,
                           template_digest=template_digest(self.template), template=None,
                           items=items, counts=counts, awaiting_acceptance=self.awaiting_acceptance + len(items),
                           holds_channel=holds, cursor=cursor, status_change=change, causation_id=causation_id)
        return was_holding and not holds

    @event("WorkClaimed")
    def _work_claimed(self, claim_id: str, run_no: int, channel: str, items: list[dict],
                      counts: dict, awaiting_acceptance: int, holds_channel: bool, cursor: int,
                      status_change: dict | None, causation_id: str, template_digest: str | None = None,
                      template: dict | None = None) -> None:
        # Stored WorkClaimed events name the template by digest; older ones carry the template (`template`),
        # which the relay turns into its digest.
        self.recent_claims = (self.recent_claims + [claim_id])[-RECENT_CLAIMS_KEPT:]
        self.counts = dict(counts)
        self.awaiting_acceptance = awaiting_acceptance
        self.holds_channel = holds_channel
        self.claim_cursor = cursor
        self._apply_status_change(status_change)

    def setup_fails(self, *, refused_credentials: bool, accepted_now: bool) -> bool:
        """Contract: the provider refused the channel's credentials before accepting any message of the run
        (`setup_error`): the run fails and its messages not yet accepted fail with it."""
        return refused_credentials and not accepted_now and not self.accepted_in_run

    def record_progress(self, *, delta: dict[str, int], awaiting_delta: int, causation_id: str,
                        accepted: bool = False, setup_failed: bool = False,
                        requeued_from: int | None = None) -> bool:
        """Messages moved by provider results or timers. Returns True when the channel is released.

        `setup_failed`: the provider refused the credentials before accepting any message of the run
        (contract: the campaign ends `failed`, its channel is released). `requeued_from`: the first block
        position where messages went back to `queued`: claiming starts there again.
        """
        was_holding = self.holds_channel
        counts, change, holds = self._progress(delta, awaiting_delta, setup_failed=setup_failed)
        if setup_failed:
            holds = False
        cursor = None if requeued_from is None else min(self.claim_cursor, requeued_from)
        self._progressed(counts=counts, awaiting_acceptance=self.awaiting_acceptance + awaiting_delta,
                         holds_channel=holds, setup_failed=setup_failed or self.setup_failed,
                         accepted_in_run=accepted or self.accepted_in_run,
                         status_change=change, causation_id=causation_id, claim_cursor=cursor)
        return was_holding and not holds

    @event("Progressed")
    def _progressed(self, counts: dict, awaiting_acceptance: int, holds_channel: bool, setup_failed: bool,
                    accepted_in_run: bool, status_change: dict | None, causation_id: str,
                    claim_cursor: int | None = None) -> None:
        # claim_cursor: absent from events stored before messages could return to the queue.
        self.counts = dict(counts)
        self.awaiting_acceptance = awaiting_acceptance
        self.holds_channel = holds_channel
        self.setup_failed = setup_failed
        self.accepted_in_run = accepted_in_run
        if claim_cursor is not None:
            self.claim_cursor = claim_cursor
        self._apply_status_change(status_change)

    def _progress(self, delta: dict[str, int], awaiting_delta: int, setup_failed: bool = False):
        counts = dict(self.counts)
        for status, n in delta.items():
            counts[status] += n
        awaiting = self.awaiting_acceptance + awaiting_delta
        holds = self.holds_channel and rules.still_holds_channel(counts, awaiting)
        status = self._derived_status(counts, setup_failed=setup_failed or self.setup_failed)
        return counts, self._status_change(status, counts), holds


def _shared(value: str | None) -> str | None:
    """One string object per distinct status, reason or code (each decoded event brings its own copies)."""
    return sys.intern(value) if isinstance(value, str) else value


SEQUENCE_STEP = 100  # a message's status-record sequence = block version * 100 + its n-th change in that event


def message_sequences(version: int, changes: list[list]) -> list[int]:
    """The per-message sequence of each change: strictly increasing per message across the block's events."""
    seen: dict[int, int] = {}
    out = []
    for change in changes:
        n = seen.get(change[0], 0)
        seen[change[0]] = n + 1
        out.append(version * SEQUENCE_STEP + n)
    return out


class MessageBlock(Aggregate):
    """Up to 1,000 messages of one contacts chunk: one stored event moves many messages at once."""

    Snapshot = Snapshot

    @event("Created")
    def __init__(self, campaign_id: str, block_no: int, channel: str, rows: list[int],
                 destinations: list[str], variables: list[dict], causation_id: str):
        self.campaign_id = campaign_id
        self.block_no = block_no
        self.channel = channel
        self.rows = rows
        self.destinations = destinations
        self.variables = variables
        n = len(rows)
        self.status = ["waiting"] * n
        self.reason: list[str | None] = [None] * n
        self.provider_code: list[str | None] = [None] * n
        self.attempt = [0] * n
        self.run_no = [0] * n
        self.accepted = [False] * n
        self.changed_at = [SEQUENCE_STEP] * n  # sequence of each message's last status record

    @staticmethod
    def create_id(campaign_id: str, block_no: int, **_: Any) -> uuid.UUID:
        return ids.block_id(campaign_id, block_no)

    @property
    def cache_weight(self) -> int:
        """What it weighs in the application's aggregate cache: its messages."""
        return len(self.rows)

    def restore_snapshot_state(self) -> None:
        """After a snapshot: the few distinct statuses, reasons and codes shared, not one string per message."""
        for values in (self.status, self.reason, self.provider_code):
            values[:] = [_shared(v) for v in values]

    def state(self, index: int) -> MessageState:
        return MessageState(self.status[index], self.reason[index], self.attempt[index], self.accepted[index])

    def changed_since(self, index: int, sequence: int) -> bool:
        """The message's last status record is not the one at `sequence`: a timer started then no longer applies."""
        return self.changed_at[index] != sequence

    def indexes_in(self, status: str) -> list[int]:
        return [i for i, s in enumerate(self.status) if s == status]

    def move(self, moves: list[tuple[int, Move]], *, run_no: int | None, causation_id: str) -> dict[str, int]:
        """Applies decided moves in one stored event; returns the change of counts per status.

        One message may move several times in one event (accepted, sent, delivered): each change starts
        from the state the previous one left.
        """
        changes = []
        delta: dict[str, int] = {}
        current: dict[int, list] = {}
        for index, mv in moves:
            status, code, attempt, runs, accepted = current.get(index) or (
                self.status[index], self.provider_code[index], self.attempt[index], self.run_no[index],
                self.accepted[index])
            after = [
                mv.status,
                mv.provider_code if mv.provider_code is not None else (code if mv.status == status else None),
                mv.attempt if mv.attempt is not None else attempt,
                run_no if run_no is not None else runs,
                accepted if mv.accepted is None else mv.accepted,
            ]
            current[index] = after
            changes.append([index, self.rows[index], status, mv.status, mv.reason, after[1], after[2], after[3],
                            after[4], mv.record])
            if status != mv.status:
                delta[status] = delta.get(status, 0) - 1
                delta[mv.status] = delta.get(mv.status, 0) + 1
        if changes:
            self._moved(campaign_id=self.campaign_id, channel=self.channel, changes=changes,
                        causation_id=causation_id)
        return delta

    @event("Moved")
    def _moved(self, campaign_id: str, channel: str, changes: list[list], causation_id: str) -> None:
        version = self.version + 1  # the version this event gets; the decorator bumps it after the body
        for (index, _row, _prev, status, reason, code, attempt, run_no, accepted, record), sequence in zip(
                changes, message_sequences(version, changes)):
            self.status[index] = _shared(status)
            self.reason[index] = _shared(reason)
            self.provider_code[index] = _shared(code)
            self.attempt[index] = attempt
            self.run_no[index] = run_no
            self.accepted[index] = accepted
            if record:
                self.changed_at[index] = sequence


class ChannelLock(Aggregate):
    """Who holds a channel. Saved with the run that takes it, so two racing runs conflict on its version."""

    Snapshot = Snapshot

    @event("Created")
    def __init__(self, channel: str):
        self.channel = channel
        self.holder: str | None = None

    @staticmethod
    def create_id(channel: str) -> uuid.UUID:
        return ids.channel_lock_id(channel)

    def check_free_for(self, campaign_id: str) -> None:
        if self.holder is not None:
            if self.holder == campaign_id:
                raise Rejected("channel_busy", "this campaign already holds the channel")
            raise Rejected("channel_busy", f"campaign {self.holder} is running on the {self.channel} channel")

    def take(self, campaign_id: str, *, hold: bool) -> None:
        """A run or retry starts: refused while any campaign holds the channel; held from now on only if
        the campaign has messages to send (`hold`; a run whose every message is opted out holds nothing)."""
        self.check_free_for(campaign_id)
        if hold:
            self._acquired(campaign_id=campaign_id)

    @event("Acquired")
    def _acquired(self, campaign_id: str) -> None:
        self.holder = campaign_id

    def release(self, campaign_id: str) -> None:
        if self.holder == campaign_id:
            self._released(campaign_id=campaign_id)

    @event("Released")
    def _released(self, campaign_id: str) -> None:
        self.holder = None


class OptOutList(Aggregate):
    """The destinations of one channel that opted out (SMS STOP, 21610, email unsubscribe or spam report, or added
    by hand). Idempotent by state: a change is stored only when it changes the list, so a redelivered record
    (they are keyed by destination: one destination's changes arrive in order) changes nothing again."""

    Snapshot = Snapshot

    @event("Created")
    def __init__(self, channel: str):
        self.channel = channel
        self.destinations: set[str] = set()

    @staticmethod
    def create_id(channel: str) -> uuid.UUID:
        return ids.opt_out_list_id(channel)

    def opt_out(self, destination: str, source: str, causation_id: str, *, issued_by: str | None = None) -> None:
        if destination not in self.destinations:
            self._opted_out(destination=destination, source=source, causation_id=causation_id, issued_by=issued_by)

    def opt_in(self, destination: str, source: str, causation_id: str, *, issued_by: str | None = None,
               reason: str | None = None) -> None:
        if destination in self.destinations:
            self._opted_in(destination=destination, source=source, causation_id=causation_id, issued_by=issued_by,
                           reason=reason)

    # issued_by and reason (a change made by hand): absent from events stored before they could be.
    @event("OptedOut")
    def _opted_out(self, destination: str, source: str, causation_id: str, issued_by: str | None = None) -> None:
        self.destinations.add(destination)

    @event("OptedIn")
    def _opted_in(self, destination: str, source: str, causation_id: str, issued_by: str | None = None,
                  reason: str | None = None) -> None:
        self.destinations.discard(destination)


class TestSendQuota(Aggregate):
    """One issuer's test messages in the last window (rules.TEST_MESSAGES_PER_HOUR, over every campaign): saved
    with the campaign that records each one, so two racing test sends conflict on its version."""

    Snapshot = Snapshot

    @event("Created")
    def __init__(self, principal: str):
        self.principal = principal
        self.sent_at: list[float] = []  # POSIX times of the test messages still in the window

    @staticmethod
    def create_id(principal: str) -> uuid.UUID:
        return ids.quota_id_of_test_sends(principal)

    def in_window(self, now: float) -> list[float]:
        return [at for at in self.sent_at if at > now - rules.TEST_MESSAGE_WINDOW_S]

    def check_room(self, now: float) -> None:
        recent = self.in_window(now)
        if len(recent) >= rules.TEST_MESSAGES_PER_HOUR:
            wait_s = int(min(recent) + rules.TEST_MESSAGE_WINDOW_S - now) + 1
            raise Rejected("test_send_limit", f"{rules.TEST_MESSAGES_PER_HOUR} test messages per hour per user: "
                                              f"{self.principal} may send the next one in {wait_s} s")

    def use(self, now: float) -> None:
        """One more test message now (refused past the limit); times out of the window are dropped."""
        self.check_room(now)
        self._used(sent_at=[*self.in_window(now), now])

    @event("Used")
    def _used(self, sent_at: list[float]) -> None:
        self.sent_at = sent_at


class CommandLog(Aggregate):
    """The answer given to one command_id, so a repeated command is answered again with the same events."""

    @event("Answered")
    def __init__(self, command_id: str, campaign_id: str, records: list[dict], publish: bool):
        self.command_id = command_id
        self.records = records
        self.publish = publish

    @staticmethod
    def create_id(command_id: str, **_: Any) -> uuid.UUID:
        return ids.command_log_id(command_id)

    @event("AnswerRepeated")
    def repeat(self, records: list[dict]) -> None:
        pass
