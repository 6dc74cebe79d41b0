"""Rate limiting of provider submissions: one token bucket per channel (contract, "Sending rules").

Cost of one submission (one provider call):
- SMS: the segments of each rendered message (`templating.render` + `sms_segments`); rate
  `OUTREACH_SMS_RATE` segments/s.
- email: 1 per recipient, so a batched (SendGrid-like) call of N recipients costs N; rate
  `OUTREACH_EMAIL_RATE` messages/s.
Pre-send re-submissions pay again: each one is a request the provider counts.

The bucket holds a quarter second's worth of tokens and starts full. A submission costing more than
that (a 1,000-recipient email call at 1,000/s) waits for a full bucket, then takes its whole cost: the
balance goes negative and the next submission waits until it is repaid. So a burst is at most
max(a quarter second's worth, the cost of one submission), and over any longer stretch the rate is the
setting, never more.

Waiters are served in arrival order (one at a time, behind an asyncio.Lock, which is FIFO), so a large
submission is not starved by a stream of small ones.

Why not a library: `aiolimiter.AsyncLimiter(max_rate, time_period)` is a leaky bucket whose burst is
tied to the rate (capacity = max_rate per time_period; a quarter second's burst is expressible as
AsyncLimiter(rate / 4, 0.25)), but `acquire(amount)` refuses an amount above the capacity (ValueError),
and a batched email call or a long SMS at a low rate is exactly that. The other PyPI limiters count
calls in windows rather than weighted costs. This class is small, has an injectable clock and sleep,
and is tested on a fake clock (tests/test_sender_ratelimit.py).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from services.common.settings import Settings
from services.common.templating import render, sms_segments

BURST_SECONDS = 0.25  # contract: a burst is at most a quarter second's worth (or one submission)
_EPSILON = 1e-9  # float slack when comparing balances
_MIN_WAIT_S = 0.0005  # never spin on a deficit smaller than the float noise


class TokenBucket:
    """`rate` tokens per second, at most `capacity` (default: BURST_SECONDS of the rate) in hand.

    `acquire(cost)` returns once the submission may go (immediately when the bucket has the tokens and
    nobody is waiting). `clock` and `sleep` are injectable so tests can run on virtual time.
    """

    def __init__(self, rate: float, capacity: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.capacity = float(capacity) if capacity is not None else self.rate * BURST_SECONDS
        if self.capacity <= 0:
            raise ValueError("capacity must be positive")
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.capacity  # starts full
        self._stamp = clock()
        self._lock = asyncio.Lock()
        self._waiting = 0  # acquirers on the slow path (queued or sleeping)

    def _refill(self) -> None:
        now = self._clock()
        if now > self._stamp:
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    @property
    def tokens(self) -> float:
        """The balance now (negative while a submission larger than the capacity is being repaid)."""
        self._refill()
        return self._tokens

    def _take(self, cost: float) -> bool:
        self._refill()
        if self._tokens + _EPSILON >= min(cost, self.capacity):
            self._tokens -= cost
            return True
        return False

    def try_acquire(self, cost: float = 1) -> bool:
        """Take `cost` now if the bucket allows it and nobody is waiting before us."""
        _check_cost(cost)
        return self._waiting == 0 and self._take(cost)

    async def acquire(self, cost: float = 1) -> float:
        """Wait until a submission of `cost` may go and take its tokens; the seconds waited."""
        _check_cost(cost)
        if self._waiting == 0 and self._take(cost):
            return 0.0
        started = self._clock()
        self._waiting += 1
        try:
            async with self._lock:  # FIFO: one waiter refills at a time, the others queue behind it
                while not self._take(cost):
                    deficit = min(cost, self.capacity) - self._tokens
                    await self._sleep(max(deficit / self.rate, _MIN_WAIT_S))
        finally:
            self._waiting -= 1
        return self._clock() - started


def _check_cost(cost: float) -> None:
    if cost < 0:
        raise ValueError("cost must not be negative")


# ------------------------------------------------------------------ costs (pure)

def sms_cost(template: Mapping[str, Any], variables: Mapping[str, object] | None) -> int:
    """Segments of one rendered SMS (at least 1)."""
    body = template.get("body") if isinstance(template, Mapping) else None
    if not isinstance(body, str):
        return 1
    return sms_segments(render(body, variables))


def item_cost(channel: str, template: Mapping[str, Any], item: Mapping[str, Any]) -> int:
    """Tokens one message costs in a submission: SMS segments; email 1 per recipient."""
    if channel == "sms":
        return sms_cost(template, item.get("variables"))
    return 1


def submission_cost(channel: str, template: Mapping[str, Any], items: Iterable[Mapping[str, Any]]) -> int:
    """Tokens one provider call carrying `items` costs (a batched email call of N costs N)."""
    return sum(item_cost(channel, template, item) for item in items)


def mean_segments(template: Mapping[str, Any], items: list[Mapping[str, Any]], sample: int = 50) -> float:
    """Average segments per rendered SMS over (a sample of) a claim's items; the unrendered body if none."""
    if not items:
        return float(sms_cost(template, None))
    step = max(1, len(items) // sample)
    picked = items[::step][:sample]
    return sum(sms_cost(template, it.get("variables")) for it in picked) / len(picked)


def channel_limiters(settings: Settings, **bucket_options) -> dict[str, TokenBucket]:
    """The bucket of each channel, at the rates the settings give."""
    return {"sms": TokenBucket(settings.sms_rate, **bucket_options),
            "email": TokenBucket(settings.email_rate, **bucket_options)}
