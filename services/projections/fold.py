"""The campaign fold: a campaign's read-model row as a function of its events, in sequence order.

Pure (no database): the projector folds new events onto the stored row (or the whole stored history when an
event arrives out of order), and the as-of view folds the events up to a time. Every value comes from the
events: nothing is stamped with the projection's own clock.
"""
from __future__ import annotations

from typing import Any

from services.projections.schema import CAMPAIGN_COLUMNS


def new_campaign(campaign_id: str) -> dict[str, Any]:
    """The row of a campaign no event has touched yet."""
    state = dict.fromkeys(CAMPAIGN_COLUMNS)
    state.update(campaign_id=campaign_id, status="created", stopped=0, last_sequence=-1)
    return state


def fold_campaign(campaign_id: str, events: list[dict[str, Any]],
                  state: dict[str, Any] | None = None) -> dict[str, Any]:
    """The campaign row after `events` (in sequence order) on top of `state` (default: nothing yet)."""
    state = dict(state) if state is not None else new_campaign(campaign_id)
    for event in events:
        if event["sequence"] <= state["last_sequence"]:
            continue  # the same event twice in one batch
        _evolve(state, event)
        state["last_sequence"] = event["sequence"]
        state["updated_at"] = event.get("occurred_at") or state["updated_at"]
    return state


def _evolve(state: dict[str, Any], event: dict[str, Any]) -> None:
    """The effect of one new campaign event on the campaign's row (unknown types: none)."""
    kind = event["type"]
    if kind == "CampaignCreated":
        state.update(name=event.get("name"), description=event.get("description"), channel=event.get("channel"),
                     template=event.get("template"), created_by=event.get("created_by"),
                     created_at=event.get("occurred_at"))
    elif kind == "CampaignReady":
        state["message_count"] = event.get("message_count")
        if event.get("summary") is not None:
            state["summary"] = event["summary"]
    elif kind == "TemplateUpdated":
        state["template"] = event.get("template")
        if isinstance(event.get("summary"), dict):
            state["summary"] = event["summary"]
            state["message_count"] = event["summary"].get("message_count", state["message_count"])
    elif kind in ("CampaignRunStarted", "RetryStarted"):
        state["run_no"] = event.get("run_no")
    elif kind == "CampaignStopped":
        state["stopped"] = 1
        state["stopped_by"] = event.get("stopped_by")
        state["stopped_at"] = event.get("occurred_at")
    elif kind == "CampaignDeleted":
        state["previous_status"], state["status"] = state["status"], "deleted"
    elif kind == "CampaignStatusChanged":
        state["status"] = event.get("status") or state["status"]
        state["previous_status"] = event.get("previous_status")
        state["stopped"] = int(bool(state["stopped"]) or bool(event.get("stopped")))
        state["reported_counts"] = event.get("counts")
