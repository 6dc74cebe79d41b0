"""The console's policy (services/api/console/policy.py) without a browser or a server: which sections each role
sees, and which actions a campaign's action menu offers for its status, its counts and the user's role, as the
product reference (Campaigns, Running, Stopping, Monitoring, retry, export, Roles) and the wire contract say; and
the plain words the Campaigns screen says a refusal and an accepted command in."""
from __future__ import annotations

import pytest

from schemas.events import MESSAGE_STATUSES
from services.api.console.campaigns import done_words, refusal_words
from services.api.console.policy import actions_for, campaign_actions, holds_channel, may_see

CAMPAIGN_ROLES = ("org_admin", "admin", "campaigner")


def campaign(status: str, *, stopped: bool = False, **counts: int) -> dict:
    full = {s: 0 for s in MESSAGE_STATUSES} | counts
    return {"status": status, "stopped": stopped, "counts": {**full, "total": sum(full.values())}}


def test_operations_sees_the_operational_view_and_nothing_of_campaigns():
    assert may_see("operations", "operations") and not may_see("operations", "campaigns")
    assert campaign_actions("ready", "operations") == []
    assert actions_for(campaign("complete_with_errors", failed=3), "operations") == []


def test_only_org_admin_sees_channel_settings():
    assert may_see("org_admin", "settings")
    assert not any(may_see(role, "settings") for role in ("admin", "campaigner", "operations"))
    assert may_see("admin", "users") and not may_see("campaigner", "users")


@pytest.mark.parametrize("role", CAMPAIGN_ROLES)
def test_a_ready_campaign_is_edited_run_test_sent_or_deleted_by_every_campaign_role(role):
    assert actions_for(campaign("ready", waiting=10), role) == ["edit", "run", "test_send", "delete"]


def test_a_campaign_still_importing_can_only_be_deleted():
    assert actions_for(campaign("created", waiting=4), "campaigner") == ["delete"]


def test_a_running_campaign_is_stopped_or_exported_never_retried_nor_deleted():
    running = campaign("in_progress", queued=50, sending=5, delivered=40, failed=5)
    assert actions_for(running, "campaigner") == ["stop", "export"]


def test_queued_or_sending_messages_hold_the_channel_until_a_stop():
    assert holds_channel(campaign("in_progress", queued=1)["counts"], stopped=False)
    assert holds_channel(campaign("in_progress", sending=1)["counts"], stopped=False)
    # Stopped: queued messages were cancelled and the channel released; the in-flight ones carry on without it.
    assert not holds_channel(campaign("in_progress", sending=3, cancelled=9)["counts"], stopped=True)
    # Resumed after a stop: its re-queued messages hold the channel again.
    assert holds_channel(campaign("in_progress", queued=9)["counts"], stopped=True)
    # Sent, awaiting receipts (or an email retrying at its provider): the channel is free.
    assert not holds_channel(campaign("in_progress", sent=7, retrying=2)["counts"], stopped=False)


def test_a_stopped_campaign_still_sending_is_not_stopped_again():
    stopped = campaign("in_progress", stopped=True, sending=2, cancelled=30, delivered=10)
    assert actions_for(stopped, "campaigner") == ["resume", "export"]


def test_a_stopped_campaign_that_finished_is_resumed_or_deleted():
    stopped = campaign("complete", stopped=True, cancelled=30, delivered=10)
    assert actions_for(stopped, "admin") == ["resume", "export", "delete"]


def test_bulk_retry_is_offered_only_for_failures_other_than_timed_out_ones():
    with_errors = campaign("complete_with_errors", delivered=10, failed=3)
    assert actions_for(with_errors, "campaigner") == ["retry", "export", "delete"]
    assert actions_for(with_errors, "campaigner", timed_out_failed=2) == ["retry", "export", "delete"]
    # Every failure timed out: a bulk retry would leave them all out (nothing_to_retry); one by one in the view.
    assert actions_for(with_errors, "campaigner", timed_out_failed=3) == ["export", "delete"]


def test_a_campaign_whose_run_failed_is_retried_after_its_channel_settings_are_fixed():
    failed = campaign("failed", failed=12)
    assert actions_for(failed, "org_admin") == ["retry", "export", "delete"]


def test_an_email_campaign_with_active_retries_is_neither_stopped_nor_deleted():
    # Nothing queued or sending: its channel is free; the provider retries its deferred messages.
    retrying = campaign("active_retries", retrying=4, delivered=6)
    assert actions_for(retrying, "campaigner") == ["export"]


def test_a_deleted_campaign_offers_nothing():
    assert actions_for(campaign("deleted", waiting=3), "org_admin") == []


def test_nothing_before_a_run_is_exported_and_nothing_after_it_is_run_again():
    assert "export" not in actions_for(campaign("ready", waiting=1), "campaigner")
    for status in ("in_progress", "active_retries", "complete", "complete_with_errors", "failed"):
        actions = campaign_actions(status, "campaigner")
        assert "export" in actions and "run" not in actions and "edit" not in actions


# ------------------------------------------------------------------ refusals and notices in plain words

def test_a_busy_channel_is_said_with_the_campaign_that_holds_it():
    words = refusal_words("run", "channel_busy", "campaign 5f0c... is running", holder="“Spring sale” (SMS)")
    assert words.startswith("The channel is busy: campaign “Spring sale” (SMS) is running on it")
    # The campaign itself still holds it (its last messages are being handed over): said so, not as another's.
    assert "This campaign still holds its channel" in refusal_words("retry", "channel_busy", "", holder=None)


def test_refusals_name_the_campaigns_status_and_what_was_not_done():
    assert refusal_words("run", "campaign_not_ready", "", status="in_progress") == \
        "Only a Ready campaign can be run (it is In Progress now). Nothing was queued or sent."
    assert "no cancelled or failed message" in refusal_words("resume", "nothing_to_retry", "")
    assert "retry those one by one in the campaign view" in refusal_words("retry", "nothing_to_retry", "")
    # A reason added to the contract later: its own name and detail, rather than nothing.
    assert refusal_words("run", "quota_exceeded", "monthly quota reached") == \
        "Refused (quota_exceeded): monthly quota reached."


def test_notices_say_what_the_accepted_command_did():
    assert done_words("run", "“Spring”", 298, 3, pending=False) == \
        "“Spring” is running: 298 messages queued (3 opted-out recipients left out)."
    assert done_words("stop", "“Spring”", 120, None, pending=False).startswith("“Spring” is stopped: 120 queued")
    assert "its answer has not come yet" in done_words("delete", "“Spring”", None, None, pending=True)
