"""What each role sees and may do in the console (shared/product-reference.md, Roles), and which campaign
actions a campaign's status allows (Campaigns; Stopping; Monitoring, retry, export). Plain Python: the
screens ask it, tests check it without a browser.

- org_admin: everything, including channel settings and every user.
- admin: campaigns, opt-outs, and campaigner users; no channel settings.
- campaigner: campaigns and opt-outs; no settings, no users.
- operations: no campaigns; the operational view (what `outreach status` shows) only.
"""
from __future__ import annotations

from typing import Literal

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


def campaign_actions(status: str, role: str, *, stopped: bool = False, has_failed: bool = False,
                     has_cancelled: bool = False, running: bool = False) -> list[Action]:
    """The actions the campaign's action menu offers, in menu order.

    `running`: it holds its channel (messages queued or handed over, not yet accepted): Stop applies.
    `has_failed` / `has_cancelled`: Retry failed / Resume (re-queues a stopped campaign's cancelled
    messages) have something to act on."""
    if role not in CAMPAIGN_ROLES or status == "deleted":
        return []
    actions: list[Action] = []
    if status == "ready":
        actions += ["edit", "run", "test_send"]
    if status in ("in_progress", "active_retries") and running:
        actions.append("stop")
    if status in ("in_progress", "active_retries", "complete", "complete_with_errors", "failed") and has_failed:
        actions.append("retry")
    if stopped and has_cancelled:
        actions.append("resume")
    if status not in ("created", "ready", "waiting"):
        actions.append("export")
    if status in ("created", "ready", "complete", "complete_with_errors", "failed"):
        actions.append("delete")
    return actions
