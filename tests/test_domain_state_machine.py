"""A hypothesis state machine over one application (in-memory event store, no broker): SMS and email
campaigns are run, stopped, claimed, fed random provider results and timer expiries, retried and deleted
in random order. After every step the invariants of the wire contract must hold: the campaign status is
derived from its message counts, the counts match the messages, the channel lock agrees with the
campaigns, and the published MessageStatusChanged records form a legal chain per message."""
from __future__ import annotations

import uuid
from collections import Counter

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from schemas import topics
from services.common import ids
from services.common.settings import get_settings
from services.command_handler import wire
from services.command_handler.application import OutreachApp
from services.command_handler.domain import rules
from tests.handler_driver import Driver, sender_result

ALL_TRUE = {"consent": True, "content_compliance": True, "opt_out": True, "data_responsibility": True}
DISCLAIMERS = [ALL_TRUE, ALL_TRUE, ALL_TRUE, None, {**ALL_TRUE, "consent": False}, {"opt_out": True}]
DELETABLE = {"created", "ready", "complete", "complete_with_errors", "failed"}
FINAL = {"delivered", "assumed_delivered", "failed", "opted_out", "cancelled"}

SMS_OUTCOMES = [
    ("accepted", None), ("presend_error", "503"), ("refused", "21211"), ("refused", "21610"), ("refused", "30003"),
    ("sent", None), ("delivered", None), ("undelivered", "30003"), ("undelivered", None), ("no_answer", None),
    ("refused", "20003"),
]
EMAIL_OUTCOMES = [
    ("accepted", None), ("presend_error", "503"), ("refused", "550 5.1.1"), ("refused", "421"),
    ("delivered", None), ("deferred", "421"), ("bounced", None), ("bounced", "dropped: Unsubscribed Address"),
    ("undelivered", None), ("no_answer", None), ("refused", "535"),
]
EXPIRY_KINDS = {"sms": ["sending", "sent"], "email": ["sending", "retry_window"]}

# The moves the contract allows a message's status stream to make (previous status -> statuses).
# Leaving a final state: a late receipt (from assumed_delivered, or failed/timed_out: checked below) or
# an accepted retry (failed / cancelled -> queued).
ALLOWED = {
    None: {"waiting"},
    "waiting": {"queued", "opted_out"},
    "queued": {"sending", "cancelled", "opted_out", "failed"},  # failed: setup_error only (checked below)
    "sending": {"sending", "sent", "delivered", "retrying", "failed", "opted_out"},
    "sent": {"delivered", "assumed_delivered", "failed", "opted_out"},
    "retrying": {"retrying", "delivered", "failed", "opted_out"},
    "assumed_delivered": {"delivered", "failed", "opted_out"},
    "failed": {"queued", "delivered", "failed", "opted_out"},
    "cancelled": {"queued"},
    "delivered": set(),
    "opted_out": set(),
}


def expected_expiry(status: str, reason: str | None, accepted: bool, kind: str, channel: str):
    """(status, reason) a timer leads to per the contract, or None when it changes nothing."""
    if kind == "sending" and status == "sending" and (channel == "sms" or not accepted):
        return "failed", "timed_out"
    if kind == "sent" and status == "sent":
        return "assumed_delivered", None
    if kind == "retry_window" and (status == "retrying" or (status == "sending" and accepted)):
        return "failed", "expired"
    return None


class OutreachMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.app = OutreachApp(get_settings(), env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
        self.d = Driver(self.app)
        self.reader_position = 0
        self.campaigns: list[dict] = []
        self.deleted: set[str] = set()
        self.stopped: set[str] = set()
        self.last_record: dict[str, dict] = {}  # message_id -> its last MessageStatusChanged
        self.campaign_status: dict[str, str] = {}  # campaign_id -> status per CampaignStatusChanged

    def teardown(self):
        self.app.close()

    # ----- reading state ------------------------------------------------------------------------
    def campaign(self, ci: int) -> dict:
        return self.campaigns[ci % len(self.campaigns)]

    def agg(self, c: dict):
        return self.app.repository.get(uuid.UUID(c["cid"]))

    def blocks(self, c: dict):
        return [self.app.repository.get(ids.block_id(c["cid"], n)) for n in self.agg(c).block_nos]

    def messages(self, c: dict) -> list[tuple[str, object, int]]:
        """(message_id, block, index) for every message of the campaign."""
        return [(ids.message_id(c["cid"], row), b, i) for b in self.blocks(c) for i, row in enumerate(b.rows)]

    def message(self, c: dict, pick: int, focus: bool = False):
        """A message of the campaign; with focus, one a provider result or timer can still move
        (claimed and in flight, or final but open to a late receipt), when there is one."""
        msgs = self.messages(c)
        if focus:
            live = [(m, b, i) for m, b, i in msgs if b.status[i] in ("sending", "sent", "retrying", "assumed_delivered")
                    or (b.status[i], b.reason[i]) == ("failed", "timed_out")]
            msgs = live or msgs
        return msgs[pick % len(msgs)]

    def snapshot(self, c: dict):
        return ([(b.status[i], b.reason[i], b.accepted[i], b.changed_at[i]) for _, b, i in self.messages(c)],
                dict(self.agg(c).counts))

    def lock_holder(self, channel: str) -> str | None:
        from eventsourcing.application import AggregateNotFoundError

        try:
            return self.app.repository.get(ids.channel_lock_id(channel)).holder
        except AggregateNotFoundError:
            return None

    def refusal(self, answers: list[dict]) -> str | None:
        assert answers, "every command is answered"
        if answers[0]["type"] == "CommandRejected":
            assert len(answers) == 1
            return answers[0]["reason"]
        return None

    # ----- setup --------------------------------------------------------------------------------
    @initialize(two_sms=st.booleans(),
                chunks=st.lists(st.lists(st.integers(1, 3), min_size=1, max_size=2), min_size=3, max_size=3),
                run_at_once=st.lists(st.booleans(), min_size=3, max_size=3))
    def create_campaigns(self, two_sms, chunks, run_at_once):
        channels = ["sms", "sms", "email"] if two_sms else ["sms", "email"]
        row = 2
        for channel, sizes in zip(channels, chunks):
            cid = str(uuid.uuid4())
            template = {"body": "Hi {{name}}"} if channel == "sms" else {
                "subject": "s", "html": "<p>h</p>", "from_email": "a@example.com", "from_name": "A", "attachments": []}
            self.d.send("CreateCampaign", cid, name="c", channel=channel, template=template)
            for chunk_no, size in enumerate(sizes):
                contacts = []
                for _ in range(size):
                    dest = f"+1202555{row:04d}" if channel == "sms" else f"u{row}@example.com"
                    contacts.append({"row": row, "destination": dest, "variables": {"name": str(row)}})
                    row += 1
                [added, *_] = self.d.send("AddContacts", cid, chunk_no=chunk_no, contacts=contacts,
                                          last_chunk=chunk_no == len(sizes) - 1)
                assert added["valid"] == size
            assert self.app.campaign_view(cid)["status"] == "ready"
            self.campaigns.append({"cid": cid, "channel": channel, "total": sum(sizes)})
        self.check_records()
        for ci, now in enumerate(run_at_once[:len(self.campaigns)]):
            if now:
                self.run(ci, 0)

    # ----- commands -----------------------------------------------------------------------------
    @rule(ci=st.integers(0, 2), disclaimer=st.sampled_from(range(len(DISCLAIMERS))))
    def run(self, ci, disclaimer):
        c = self.campaign(ci)
        disclaimer = DISCLAIMERS[disclaimer]
        before = self.agg(c).status
        holder = self.lock_holder(c["channel"])
        payload = {} if disclaimer is None else {"disclaimer": disclaimer}
        answers = self.d.send("RunCampaign", c["cid"], **payload)
        if c["cid"] in self.deleted:
            expected = "unknown_campaign"
        elif before != "ready":
            expected = "campaign_not_ready"
        elif disclaimer is not ALL_TRUE:
            expected = "disclaimer_not_accepted"
        elif holder is not None:
            expected = "channel_busy"
        else:
            expected = None
        assert self.refusal(answers) == expected, answers
        event(f"run: {expected or 'started'}")
        if expected is None:
            assert answers[0]["type"] == "CampaignRunStarted"
            # Destinations on the channel's opt-out list (21610, spam reports) are suppressed at Run.
            suppressed = sum(b.destinations[i] in self.app.suppressed(c["channel"]) for _, b, i in self.messages(c))
            assert (answers[0]["run_no"], answers[0]["message_count"], answers[0]["suppressed_count"]) == (
                1, c["total"] - suppressed, suppressed)
            # Everything suppressed: nothing queued, so the run holds no channel and is complete at once.
            assert self.lock_holder(c["channel"]) == (c["cid"] if answers[0]["message_count"] else None)

    @rule(ci=st.integers(0, 2), confirmed=st.booleans())
    def stop(self, ci, confirmed):
        c = self.campaign(ci)
        agg = self.agg(c)
        holds, queued = agg.holds_channel, agg.counts["queued"]
        answers = self.d.send("StopCampaign", c["cid"], confirmed=confirmed)
        if c["cid"] in self.deleted:
            expected = "unknown_campaign"
        elif not holds:
            expected = "campaign_not_running"
        elif not confirmed:
            expected = "stop_not_confirmed"
        else:
            expected = None
        assert self.refusal(answers) == expected, answers
        event(f"stop: {expected or 'stopped'}")
        if expected is None:
            assert (answers[0]["type"], answers[0]["cancelled_count"]) == ("CampaignStopped", queued)
            agg = self.agg(c)
            assert agg.stopped and agg.counts["queued"] == 0 and not agg.holds_channel
            self.stopped.add(c["cid"])

    @rule(ci=st.integers(0, 2), mode=st.sampled_from(["default", "include_cancelled", "named"]),
          picks=st.lists(st.integers(0, 20), min_size=1, max_size=3), include_cancelled=st.booleans(),
          foreign=st.booleans())
    def retry(self, ci, mode, picks, include_cancelled, foreign):
        c = self.campaign(ci)
        agg = self.agg(c)
        has_run, run_no = agg.has_run, agg.run_no
        holder = self.lock_holder(c["channel"])
        msgs = self.messages(c)
        payload: dict = {}
        if mode == "default":
            wanted = [(m, b.status[i], b.reason[i]) for m, b, i in msgs]
            retryable = lambda status, reason: status == "failed" and reason != "timed_out"  # noqa: E731
        elif mode == "include_cancelled":
            payload["include_cancelled"] = True
            wanted = [(m, b.status[i], b.reason[i]) for m, b, i in msgs]
            retryable = lambda status, reason: (  # noqa: E731
                (status == "failed" and reason != "timed_out") or status == "cancelled")
        else:
            chosen = list({msgs[p % len(msgs)][0]: msgs[p % len(msgs)] for p in picks}.values())
            payload["message_ids"] = [m for m, _, _ in chosen]
            payload["include_cancelled"] = include_cancelled
            if foreign:
                payload["message_ids"].append(ids.message_id(str(uuid.uuid4()), 2))
            wanted = [(m, b.status[i], b.reason[i]) for m, b, i in chosen]
            # named: any failed one (timed_out too) and a cancelled one; never an opted-out one
            retryable = lambda status, reason: status in ("failed", "cancelled")  # noqa: E731
        selected = {m for m, status, reason in wanted if retryable(status, reason)}
        answers = self.d.send("RetryFailedMessages", c["cid"], **payload)
        if c["cid"] in self.deleted:
            expected = "unknown_campaign"
        elif not has_run:
            expected = "not_retryable"
        elif mode == "named" and foreign:
            expected = "invalid_command"
        elif not selected:
            expected = "nothing_to_retry"
        elif holder is not None:
            expected = "channel_busy"
        else:
            expected = None
        assert self.refusal(answers) == expected, answers
        event(f"retry ({mode}): {expected or 'started'}")
        if expected is None:
            assert answers[0]["type"] == "RetryStarted"
            assert (answers[0]["run_no"], answers[0]["message_count"]) == (run_no + 1, len(selected))
            now = {m: (b.status[i], b.run_no[i]) for m, b, i in self.messages(c)}
            assert all(now[m] == ("queued", run_no + 1) for m in selected)
            assert self.lock_holder(c["channel"]) == c["cid"]

    @rule(ci=st.integers(0, 2), before_run=st.integers(0, 3))
    def delete(self, ci, before_run):
        c = self.campaign(ci)
        status = self.agg(c).status
        if status in ("created", "ready") and before_run:
            return  # mostly keep campaigns that have not run yet: deleting them early ends the interesting part
        answers = self.d.send("DeleteCampaign", c["cid"])
        if c["cid"] in self.deleted:
            expected = "unknown_campaign"
        elif status not in DELETABLE:
            expected = "not_deletable"
        else:
            expected = None
        assert self.refusal(answers) == expected, answers
        event(f"delete: {expected or 'deleted'}")
        if expected is None:
            assert answers[0]["type"] == "CampaignDeleted"
            self.deleted.add(c["cid"])

    # ----- sender and timers --------------------------------------------------------------------
    @rule(ci=st.integers(0, 2), max_messages=st.integers(1, 4), repeat=st.booleans())
    def claim(self, ci, max_messages, repeat):
        c = self.campaign(ci)
        agg = self.agg(c)
        opted_out = self.app.suppressed(c["channel"])
        claimable = sum(b.status[i] == "queued" and b.destinations[i] not in opted_out for _, b, i in self.messages(c))
        expected = min(max_messages, claimable) if agg.holds_channel else 0
        event(f"claim: {'some' if expected else 'none'}")
        claim_id = str(uuid.uuid4())
        self.d.new_records()
        assert self.app.claim(claim_id=claim_id, campaign_id=c["cid"], max_messages=max_messages) == expected
        answers = [r["value"] for r in self.d.new_records()
                   if r["topic"] == topics.SENDER_WORK and r["value"]["claim_id"] == claim_id]
        if not agg.has_run:  # no run to claim for: nothing stored, nothing published (WorkClaimed names its run)
            assert answers == []
            return
        [work] = answers
        status = {m: b.status[i] for m, b, i in self.messages(c)}
        assert len(work["items"]) == expected and all(status[i["message_id"]] == "sending" for i in work["items"])
        assert work["remaining_queued"] == self.agg(c).counts["queued"]
        if repeat:
            self.d.new_records()
            before = self.snapshot(c)
            assert self.app.claim(claim_id=claim_id, campaign_id=c["cid"], max_messages=max_messages) == 0
            assert self.snapshot(c) == before

    @rule(ci=st.integers(0, 2), max_messages=st.integers(1, 4))
    def claim_more(self, ci, max_messages):
        self.claim(ci, max_messages, False)

    @rule(ci=st.integers(0, 2), pick=st.integers(0, 20), outcome=st.integers(0, 10), attempt=st.integers(1, 4),
          final=st.booleans())
    def one_result(self, ci, pick, outcome, attempt, final):
        self.results(ci, [(pick, outcome, attempt, final)], False, True)

    @rule(ci=st.integers(0, 2), pick=st.integers(0, 20), choice=st.integers(0, 3))
    def advance(self, ci, pick, choice):
        """The provider's usual next step for one in-flight message (keeps examples deep enough to reach
        Sent, Retrying, the timers and late receipts)."""
        c = self.campaign(ci)
        mid, block, index = self.message(c, pick, True)
        status, accepted = block.status[index], block.accepted[index]
        attempt = block.attempt[index] + 1
        if status == "sending" and not accepted:
            outcome = ["accepted", "accepted", "presend_error", "no_answer"][choice]
        elif status == "sending":
            outcome = ("sent" if c["channel"] == "sms" else "deferred") if choice < 3 else "delivered"
        elif status in ("sent", "retrying"):
            kind = "sent" if status == "sent" else "retry_window"
            if choice < 2:
                self.check_records()
                self.app.apply_expiry(expiry_id=str(uuid.uuid4()), campaign_id=c["cid"], message_id=mid, kind=kind,
                                      since_sequence=block.changed_at[index])
                return
            outcome = "delivered" if choice == 2 else "undelivered"
        else:
            outcome = ["delivered", "undelivered", "delivered", "refused"][choice]
        code = {"presend_error": "503", "deferred": "421", "refused": "21610" if c["channel"] == "sms" else None}.get(outcome)
        self.app.apply_results(result_id=str(uuid.uuid4()), campaign_id=c["cid"], results=[
            sender_result(mid, outcome, attempt, code, final=choice == 3)])

    @rule(ci=st.integers(0, 2), pick=st.integers(0, 20))
    def setup_refusal(self, ci, pick):
        """The provider refuses the channel's credentials (Twilio 20003 / SMTP 535) for one claimed message."""
        c = self.campaign(ci)
        mid, block, index = self.message(c, pick, True)
        claimed_unaccepted = block.status[index] == "sending" and not block.accepted[index]
        nothing_accepted = not self.agg(c).accepted_in_run
        self.app.apply_results(result_id=str(uuid.uuid4()), campaign_id=c["cid"], results=[
            sender_result(mid, "refused", block.attempt[index] + 1, "20003" if c["channel"] == "sms" else "535")])
        if claimed_unaccepted and nothing_accepted and c["cid"] not in self.deleted:
            agg = self.agg(c)
            event("setup failure")
            assert agg.setup_failed and agg.status in ("failed", "in_progress")  # in flight: accepted earlier runs
            assert agg.status == "failed" or agg.counts["sending"] + agg.counts["sent"] > 0

    @rule(ci=st.integers(0, 2),
          picks=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 10), st.integers(1, 4), st.booleans()),
                         min_size=1, max_size=5),
          replay=st.booleans(), focus=st.booleans())
    def results(self, ci, picks, replay, focus):
        c = self.campaign(ci)
        table = SMS_OUTCOMES if c["channel"] == "sms" else EMAIL_OUTCOMES
        batch = []
        for pick, outcome, attempt, final in picks:
            mid, _, _ = self.message(c, pick, focus)
            outcome, code = table[outcome]
            batch.append(sender_result(mid, outcome, attempt, code, final=outcome == "presend_error" and final))
        self.app.apply_results(result_id=str(uuid.uuid4()), campaign_id=c["cid"], results=batch)
        if replay:  # the same results again (a redelivered record): nothing changes
            self.check_records()
            self.d.new_records()
            before = self.snapshot(c)
            self.app.apply_results(result_id=str(uuid.uuid4()), campaign_id=c["cid"], results=batch)
            assert self.snapshot(c) == before
            assert not [r for r in self.d.new_records() if r["topic"] == topics.MESSAGE_STATUS]

    @rule(ci=st.integers(0, 2), pick=st.integers(0, 20), kind=st.integers(0, 1), stale=st.booleans(),
          focus=st.booleans())
    def expiry(self, ci, pick, kind, stale, focus):
        self.check_records()
        c = self.campaign(ci)
        kind = EXPIRY_KINDS[c["channel"]][kind]
        mid, block, index = self.message(c, pick, focus)
        status, reason, accepted = block.status[index], block.reason[index], block.accepted[index]
        current = block.changed_at[index]
        # a stale timer carries the sequence of an earlier status record of the message
        since = (self.last_record[mid].get("previous_sequence") or current - 1) if stale else current
        self.app.apply_expiry(expiry_id=str(uuid.uuid4()), campaign_id=c["cid"], message_id=mid, kind=kind,
                              since_sequence=since)
        [(_, block, index)] = [(m, b, i) for m, b, i in self.messages(c) if m == mid]
        outcome = None if stale else expected_expiry(status, reason, accepted, kind, c["channel"])
        event(f"expiry {kind}: {'stale' if stale else outcome}")
        if outcome is None:
            assert (block.status[index], block.reason[index], block.changed_at[index]) == (status, reason, current)
        else:
            assert (block.status[index], block.reason[index]) == outcome
            assert block.changed_at[index] > current

    # ----- invariants ---------------------------------------------------------------------------
    def check_records(self) -> None:
        """Every record published so far: message status chains and campaign status chains."""
        for n in self.app.recorder.select_notifications(start=self.reader_position + 1, limit=10_000):
            self.reader_position = n.id
            for record in wire.to_records(self.app.mapper.to_domain_event(n)):
                value = record.value
                if record.topic == topics.MESSAGE_STATUS:
                    self.check_message_record(value)
                elif record.topic == topics.CAMPAIGN_EVENTS and value["type"] == "CampaignStatusChanged":
                    cid = value["campaign_id"]
                    assert value["previous_status"] == self.campaign_status.get(cid, "created"), value
                    self.campaign_status[cid] = value["status"]
                    counts = value["counts"]
                    assert sum(v for k, v in counts.items() if k != "total") == counts["total"], value

    def check_message_record(self, r: dict) -> None:
        mid = r["message_id"]
        last = self.last_record.get(mid)
        prev_status = last["status"] if last else None
        assert r["previous_status"] == prev_status, (last, r)
        assert r["status"] in ALLOWED[prev_status], (last, r)
        assert (r["reason"] is not None) == (r["status"] == "failed"), r
        if last is not None:
            assert r["sequence"] > last["sequence"], (last, r)
            assert (r["attempt"] or 0) >= (last["attempt"] or 0), (last, r)  # counted across runs
            assert (r["run_no"] or 0) >= (last["run_no"] or 0), (last, r)
            if prev_status == "failed" and r["status"] != "queued":
                # a late receipt may amend failed only when it was timed_out
                assert last["reason"] == "timed_out" and r["reason"] != "timed_out", (last, r)
            if prev_status == "sending" and r["status"] == "sending":
                # one record per failed pre-send submission: a new attempt with its provider code
                assert r["attempt"] > (last["attempt"] or 0) and r["provider_code"] is not None, (last, r)
            if prev_status == "retrying" and r["status"] == "retrying":
                assert r["attempt"] > (last["attempt"] or 0), (last, r)
        if prev_status == "queued" and r["status"] == "failed":
            # the provider refused the credentials before anything was accepted: the run fails
            assert r["reason"] == "setup_error", (last, r)
        if r["status"] == "queued":
            assert r["run_no"] is not None and r["run_no"] > ((last or {}).get("run_no") or 0), (last, r)
        event(f"message: {prev_status} -> {r['status']}" + (f" ({r['reason']})" if r["reason"] else ""))
        self.last_record[mid] = {**r, "previous_sequence": last["sequence"] if last else None}

    @invariant()
    def invariants(self):
        if not self.campaigns:
            return
        self.check_records()
        holders = {"sms": [], "email": []}
        for c in self.campaigns:
            agg = self.agg(c)
            msgs = self.messages(c)
            recount = Counter(b.status[i] for _, b, i in msgs)
            counts = agg.counts
            assert {k: v for k, v in counts.items() if v} == dict(recount), (counts, recount)
            assert sum(counts.values()) == agg.message_count == len(msgs) == c["total"]
            view = self.app.campaign_view(c["cid"])
            assert view["stopped"] == (c["cid"] in self.stopped)  # stays true from the stop on
            assert view["counts"]["total"] == sum(v for k, v in view["counts"].items() if k != "total")
            if c["cid"] in self.deleted:
                assert agg.status == "deleted" and not agg.holds_channel
            else:
                assert agg.status == rules.derive_status(counts, has_run=agg.has_run, ready=agg.ready,
                                                         setup_failed=agg.setup_failed)
            assert self.campaign_status.get(c["cid"], "created") == agg.status
            awaiting = sum(1 for _, b, i in msgs if b.status[i] == "sending" and not b.accepted[i])
            assert agg.awaiting_acceptance == awaiting
            # holds its channel from its run until stopped or nothing is queued or claimed-not-accepted
            if counts["queued"]:
                assert agg.holds_channel
            if agg.holds_channel:
                assert counts["queued"] or awaiting
                holders[c["channel"]].append(c["cid"])
            if agg.setup_failed:
                # a setup failure fails every queued or claimed-not-accepted message and ends the hold
                assert not counts["queued"] and not awaiting and not agg.holds_channel
            # the status stream ends where the messages are
            for mid, b, i in msgs:
                last = self.last_record[mid]
                assert (last["status"], last["reason"], last["sequence"]) == (b.status[i], b.reason[i], b.changed_at[i])
        for channel, holding in holders.items():
            assert len(holding) <= 1, holding
            assert self.lock_holder(channel) == (holding[0] if holding else None)


OutreachMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestOutreachMachine = OutreachMachine.TestCase
