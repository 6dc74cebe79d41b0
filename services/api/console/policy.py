"""What each role sees and may do in the console (shared/product-reference.md, Roles), and which campaign
actions a campaign's status allows (Campaigns; Stopping; Monitoring, retry, export). Plain Python: the
screens ask it, tests check it without a browser.

- org_admin: everything, including channel settings and every user.
- admin: campaigns, opt-outs, and campaigner users; no channel settings.
- campaigner: campaigns and opt-outs; no settings, no users.
- operations: no campaigns; the operational view (what `outreach status` shows) only.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

Section = Literal["campaigns", "opt_outs", "settings", "users", "audit", "operations"]
Action = Literal["edit", "run", "stop", "retry", "resume", "delete", "export", "test_send"]

CAMPAIGN_ROLES = frozenset({"org_admin", "admin", "campaigner"})
SECTIONS: dict[str, frozenset[str]] = {
    "org_admin": frozenset({"campaigns", "opt_outs", "settings", "users", "audit", "operations"}),
    "admin": frozenset({"campaigns", "opt_outs", "users", "audit"}),
    "campaigner": frozenset({"campaigns", "opt_outs"}),
    "operations": frozenset({"operations"}),
}
# Which roles' accounts a role may create, list, disable and enable.
MANAGED_USER_ROLES: dict[str, frozenset[str]] = {
    "org_admin": frozenset({"org_admin", "admin", "campaigner", "operations"}),
    "admin": frozenset({"campaigner"}),
}
# Removing an opt-out (a recipient normally opts back in by START) is org_admin's, with a reason.
OPT_OUT_REMOVERS = frozenset({"org_admin"})


def may_see(role: str, section: Section) -> bool:
    return section in SECTIONS.get(role, frozenset())


# Wire contract, Campaign status: the statuses a campaign has run in (a retry is accepted only after a run), the
# ones Delete takes, and the ones before a run (nothing to export yet).
RUN_STATUSES = frozenset({"in_progress", "active_retries", "complete", "complete_with_errors", "failed"})
DELETABLE_STATUSES = frozenset({"created", "ready", "complete", "complete_with_errors", "failed"})
NOT_RUN_STATUSES = frozenset({"created", "ready"})


def holds_channel(counts: Mapping[str, int], stopped: bool) -> bool:
    """Whether the campaign holds its channel, as far as the read model's counts tell (wire contract: from its run
    until it is stopped, or until no message is queued or claimed but not yet accepted by the provider).

    Queued messages hold it whatever `stopped` says (a stop cancels every queued message, so queued ones after it
    come from a resume). Sending ones hold it unless the campaign was stopped: the counts do not tell a message
    handed over from one the provider has accepted (both are `sending`), and after a stop the in-flight ones no
    longer hold the channel. So a resumed campaign whose last messages are being handed over reads as not
    holding it: Stop is then left out of its menu, and the handler's campaign_not_running would have been the
    likely answer anyway."""
    if counts.get("queued", 0) > 0:
        return True
    return not stopped and counts.get("sending", 0) > 0


def campaign_actions(status: str, role: str, *, stopped: bool = False, has_failed: bool = False,
                     has_cancelled: bool = False, running: bool = False) -> list[Action]:
    """The actions the campaign's action menu offers, in menu order.

    `running`: it holds its channel (holds_channel): Stop applies, and Retry, Resume and Delete do not (a retry
    while the campaign itself holds the channel is channel_busy). `has_failed`: failed messages a bulk retry
    re-queues (failed, not timed out: those are retried only by naming them, in the campaign view).
    `has_cancelled`: cancelled messages, which Resume (a retry with include_cancelled) re-queues on a stopped
    campaign. Another campaign holding the channel is not known here: the handler's channel_busy says it."""
    if role not in CAMPAIGN_ROLES or status == "deleted":
        return []
    actions: list[Action] = []
    if status == "ready":
        actions += ["edit", "run", "test_send"]
    if running and status in RUN_STATUSES:
        actions.append("stop")
    if not running and status in RUN_STATUSES and has_failed:
        actions.append("retry")
    if not running and status in RUN_STATUSES and stopped and has_cancelled:
        actions.append("resume")
    if status not in NOT_RUN_STATUSES:
        actions.append("export")
    if not running and status in DELETABLE_STATUSES:
        actions.append("delete")
    return actions


def actions_for(campaign: Mapping[str, Any], role: str, *, timed_out_failed: int = 0) -> list[Action]:
    """campaign_actions for a read model's campaign (`status`, `stopped`, `counts`); `timed_out_failed`: how many
    of its failed messages failed timed_out (a bulk retry leaves them out)."""
    counts, stopped = campaign.get("counts") or {}, bool(campaign.get("stopped"))
    return campaign_actions(str(campaign.get("status")), role, stopped=stopped,
                            has_failed=counts.get("failed", 0) > timed_out_failed,
                            has_cancelled=counts.get("cancelled", 0) > 0,
                            running=holds_channel(counts, stopped))
