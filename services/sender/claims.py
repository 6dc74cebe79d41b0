"""The claim loop's decisions and bookkeeping (pure: no I/O, time passed in).

Per active campaign the sender keeps up to `MAX_OUTSTANDING` claims outstanding. A claim is outstanding
from its ClaimRequest until the first submission of each of its items is done (presend retries go on
in the background without holding a slot), so claiming follows the provider's pace. A claim with no
answer within the timeout is dropped from the book and another one is issued: a lost request or answer
cannot stall a campaign (a late answer is still worked on, it just no longer holds a slot).

An empty WorkClaimed means nothing is queued now: the campaign drains. A drained campaign is still asked
once every `DRAIN_POLL_S`, because messages can come back to the queue without a campaign event (the
Sending limit returns a claimed message nobody handed off); claiming ends when the campaign's status is
final (the sender follows CampaignStatusChanged). An empty answer from an older run is stale (a
RetryStarted arrived after it was claimed) and changes nothing; a non-empty answer ends the draining.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.settings import Settings

MAX_OUTSTANDING = 2
CLAIM_TIMEOUT_S = 10.0
CLAIM_SECONDS = 2.0  # a claim holds about 2 s worth of the channel's rate (contract)
MAX_CLAIM = 1000
DRAIN_POLL_S = 2.0  # a drained campaign's one claim, this often (one small stored event each)


def channel_rate(settings: Settings, channel: str | None) -> float:
    """The channel's rate setting: SMS segments per second, emails per second.

    An unknown channel (its CampaignCreated not seen) gets the slower rate: a small claim is always safe.
    """
    if channel == "sms":
        return settings.sms_rate
    if channel == "email":
        return settings.email_rate
    return min(settings.sms_rate, settings.email_rate)


def claim_size(settings: Settings, channel: str | None, segments_per_message: float | None = None) -> int:
    """Messages in a claim: about CLAIM_SECONDS of the channel's rate, at least one submission.

    SMS: the segment rate divided by the segments per message when known (else one segment each).
    """
    rate = channel_rate(settings, channel)
    if channel == "sms" and segments_per_message:
        rate /= max(1.0, segments_per_message)
    return min(MAX_CLAIM, max(1, int(CLAIM_SECONDS * rate)))


@dataclass
class CampaignClaims:
    campaign_id: str
    channel: str | None
    run_no: int
    segments: float | None = None  # SMS: segments per message, once known (sizes the claims)
    draining: bool = False
    polled_at: float = float("-inf")  # when a drained campaign was last asked
    held: bool = False  # a provider hold is on (CampaignSendingHeld): no claims until it lifts
    requested: dict[str, float] = field(default_factory=dict)  # claim_id -> when requested (unanswered)
    working: set[str] = field(default_factory=set)  # answered, first submissions not all done yet

    @property
    def outstanding(self) -> int:
        return len(self.requested) + len(self.working)


class ClaimBook:
    def __init__(self, max_outstanding: int = MAX_OUTSTANDING, timeout_s: float = CLAIM_TIMEOUT_S,
                 drain_poll_s: float = DRAIN_POLL_S):
        self.max_outstanding = max_outstanding
        self.timeout_s = timeout_s
        self.drain_poll_s = drain_poll_s
        self.campaigns: dict[str, CampaignClaims] = {}

    def activate(self, campaign_id: str, channel: str | None, run_no: int, segments: float | None = None) -> None:
        """Claim for this run (a new run or retry of a draining campaign starts claiming again)."""
        current = self.campaigns.get(campaign_id)
        if current is None:
            self.campaigns[campaign_id] = CampaignClaims(campaign_id, channel, run_no, segments)
        elif run_no >= current.run_no:
            current.run_no, current.draining = run_no, False
            current.channel = channel or current.channel
            current.segments = segments or current.segments

    def learn_channel(self, campaign_id: str, channel: str) -> None:
        if campaign_id in self.campaigns:
            self.campaigns[campaign_id].channel = channel

    def learn_segments(self, campaign_id: str, segments: float) -> None:
        if campaign_id in self.campaigns:
            self.campaigns[campaign_id].segments = segments

    def hold(self, campaign_id: str) -> None:
        if campaign_id in self.campaigns:
            self.campaigns[campaign_id].held = True

    def resume(self, campaign_id: str) -> bool:
        """The hold lifted: claim again, also if the campaign drained meanwhile (a hold returns claimed
        messages to the queue). False if the campaign is not in the book (the caller re-activates it)."""
        campaign = self.campaigns.get(campaign_id)
        if campaign is None:
            return False
        campaign.held = campaign.draining = False
        return True

    def remove(self, campaign_id: str) -> None:
        self.campaigns.pop(campaign_id, None)

    def due(self, now: float, owns: Callable[[str], bool] = lambda campaign_id: True
            ) -> list[tuple[CampaignClaims, str]]:
        """Drop claims that timed out, then issue new claim ids up to the limit for the campaigns this sender
        `owns` (several senders: the one whose work partitions hold the campaign): [(campaign, claim_id)]."""
        issued = []
        for campaign in self.campaigns.values():
            for claim_id, at in list(campaign.requested.items()):
                if now - at >= self.timeout_s:
                    del campaign.requested[claim_id]
            if not owns(campaign.campaign_id) or campaign.held:
                continue
            if campaign.draining:
                if not campaign.outstanding and now - campaign.polled_at >= self.drain_poll_s:
                    campaign.polled_at = now
                    issued.append((campaign, self._request(campaign, now)))
                continue
            while campaign.outstanding < self.max_outstanding:
                issued.append((campaign, self._request(campaign, now)))
        return issued

    @staticmethod
    def _request(campaign: CampaignClaims, now: float) -> str:
        claim_id = str(uuid.uuid4())
        campaign.requested[claim_id] = now
        return claim_id

    def disown(self, owns: Callable[[str], bool]) -> None:
        """Ownership moved (a rebalance): the claims of campaigns no longer owned hold no slots here; their
        answers go to the new owner, and the claims in hand finish without counting."""
        for campaign in self.campaigns.values():
            if not owns(campaign.campaign_id):
                campaign.requested.clear()
                campaign.working.clear()

    def answered(self, campaign_id: str, claim_id: str, run_no: int, empty: bool) -> None:
        """A WorkClaimed arrived (possibly for a claim timed out or issued before a restart)."""
        campaign = self.campaigns.get(campaign_id)
        if campaign is None:
            return
        known = campaign.requested.pop(claim_id, None) is not None
        if empty:
            if run_no >= campaign.run_no:
                campaign.draining = True
            return
        if run_no >= campaign.run_no:
            campaign.draining = False  # a poll found messages back in the queue: claim at full pace again
        if known:
            campaign.working.add(claim_id)

    def submitted(self, campaign_id: str, claim_id: str) -> None:
        """Every item of the claim had its first submission: the slot is free."""
        campaign = self.campaigns.get(campaign_id)
        if campaign is not None:
            campaign.working.discard(claim_id)
