"""A circuit breaker per provider (contract, "Sending rules").

- It opens only after pre-send failures of at least `threshold` (10) DISTINCT messages in a row: a
  provider answer to any submission (accepted or refused) resets the streak. One destination that
  always fails is one message however often it is retried, so it never opens the breaker and still ends
  `failed` / `provider_error` after its retries. A submission with no answer (handed off, unknown
  outcome) is neither a failure nor a success: it leaves the streak as it is.
- While it is open no submission is made; a submission held by it is not a submission (the message's
  attempt number does not advance: the dispatcher counts submissions, not waits).
- While open it probes with a request that sends no message (the adapter's `probe()`, an account
  lookup), first after `first_probe_s`, then with the wait doubling up to `max_probe_s`; it closes when
  a probe succeeds. Only a probe closes it: a late success of a submission made before it opened does
  not (the contract names the probe).
- The provider counts as held (the campaigns are told, and the command handler returns their claimed
  messages not handed off to the queue: contract v1.1) from the first probe that fails: a burst of
  pre-send errors the first probe shows is not an outage (the provider answers its account lookup, e.g.
  a block of destinations it refuses for a while) pauses the submissions in place for that probe only,
  instead of sending every claimed message back through the queue for each burst.

`BreakerState` is the pure state machine (time passed in); `ProviderBreaker` runs it for one provider:
it decides from each submission's results, runs the probe loop while open, wakes the held submissions
when it closes and tells `on_change(held, reason)` about both transitions.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from services.common.observability import BREAKER_STATE

log = logging.getLogger("outreach.sender")

THRESHOLD = 10  # distinct messages failing pre-send in a row (contract)
FIRST_PROBE_S = 0.5
MAX_PROBE_S = 10.0

HELD_REASON = "presend_errors"  # SendingHold.reason when the breaker opens
RESUMED_REASON = "probe_succeeded"  # ... and when it closes

ANSWERED = ("accepted", "refused")  # outcomes of a submission the provider answered


class BreakerState:
    """The breaker's decisions (pure: no I/O, `now` passed in)."""

    def __init__(self, threshold: int = THRESHOLD, first_probe_s: float = FIRST_PROBE_S,
                 max_probe_s: float = MAX_PROBE_S):
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        self.threshold = threshold
        self.first_probe_s = first_probe_s
        self.max_probe_s = max(max_probe_s, first_probe_s)
        self.is_open = False
        self.streak: set[str] = set()  # distinct messages that failed pre-send since the last answer
        self.probe_wait_s = first_probe_s  # the wait before the next probe while open
        self.next_probe_at: float | None = None

    def success(self) -> None:
        """The provider answered a submission: the streak starts again."""
        self.streak.clear()

    def failure(self, message_ids: Iterable[str], now: float) -> bool:
        """A submission of these messages failed pre-send; True if that opened the breaker."""
        if self.is_open:
            return False  # a submission made before it opened: nothing more to decide
        self.streak.update(message_ids)
        if len(self.streak) < self.threshold:
            return False
        return self.trip(now)

    def trip(self, now: float) -> bool:
        """Open without failures of its own (another sender found the provider down); True if it opened."""
        if self.is_open:
            return False
        self.is_open = True
        self.streak.clear()
        self.probe_wait_s = self.first_probe_s
        self.next_probe_at = now + self.probe_wait_s
        return True

    def probe_due(self, now: float) -> bool:
        return self.is_open and self.next_probe_at is not None and now >= self.next_probe_at

    def probed(self, ok: bool, now: float) -> bool:
        """A probe answered; True if that closed the breaker (else the next one waits twice as long)."""
        if not self.is_open:
            return False
        if ok:
            self.is_open = False
            self.next_probe_at = None
            self.probe_wait_s = self.first_probe_s
            self.streak.clear()
            return True
        self.probe_wait_s = min(self.probe_wait_s * 2, self.max_probe_s)
        self.next_probe_at = now + self.probe_wait_s
        return False


def classify(results: Iterable[Mapping[str, Any]]) -> str | None:
    """What one submission's results say about the provider: "failure" (pre-send error), "success"
    (it answered: accepted or refused) or None (no answer: says nothing)."""
    outcomes = [r["outcome"] for r in results]
    if "presend_error" in outcomes:
        return "failure"
    if any(o in ANSWERED for o in outcomes):
        return "success"
    return None


OnChange = Callable[[bool, str], None]


class ProviderBreaker:
    """The breaker of one provider, with its probe loop.

    `probe()` answers True when the provider is reachable (an account lookup; an exception counts as
    False); `on_change(held, reason)` is called when the breaker opens (held=True) and closes.
    `clock` and `sleep` are injectable so tests run on virtual time.
    """

    def __init__(self, name: str, probe: Callable[[], Awaitable[bool]], *,
                 on_change: OnChange = lambda held, reason: None, threshold: int = THRESHOLD,
                 first_probe_s: float = FIRST_PROBE_S, max_probe_s: float = MAX_PROBE_S,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep):
        self.name = name
        self.state = BreakerState(threshold, first_probe_s, max_probe_s)
        self.on_change = on_change
        self._probe = probe
        self._clock = clock
        self._sleep = sleep
        self._closed = asyncio.Event()
        self._closed.set()
        self._prober: asyncio.Task | None = None
        self.probes = 0  # probes made (for tests and logs)
        self.is_held = False  # open and a probe failed: an outage, announced through on_change
        self._report()

    def _report(self) -> None:
        """`outreach_breaker_state{provider}`: 0 closed, 1 open (probing), 2 held."""
        BREAKER_STATE.labels(self.name).set(2 if self.is_held and self.state.is_open else int(self.state.is_open))

    @property
    def is_open(self) -> bool:
        return self.state.is_open

    def allows(self) -> bool:
        return not self.state.is_open

    async def wait_closed(self) -> None:
        """Return once submissions may go (at once while closed)."""
        while self.state.is_open:
            await self._closed.wait()

    def record(self, message_ids: Iterable[str], results: Iterable[Mapping[str, Any]]) -> None:
        """Decide from the results of one submission carrying `message_ids`."""
        verdict = classify(results)
        if verdict == "success":
            self.state.success()
        elif verdict == "failure" and self.state.failure(message_ids, self._clock()):
            self._opened()

    def held_elsewhere(self) -> None:
        """Another sender's probe failed (its hold came as a campaign event): this one pauses the provider's
        submissions and probes too, so that whichever probe succeeds first lifts the hold."""
        if self.state.trip(self._clock()):
            log.warning("provider %s: held by another sender; sending paused, probing", self.name)
            self._closed.clear()
            self._prober = asyncio.ensure_future(self._probe_loop())
        self.is_held = True
        self._report()

    def _opened(self) -> None:
        log.warning("provider %s: %d messages failed pre-send in a row; sending paused, probing",
                    self.name, self.state.threshold)
        self._closed.clear()
        self._prober = asyncio.ensure_future(self._probe_loop())
        self._report()

    def _notify(self, held: bool, reason: str) -> None:
        try:
            self.on_change(held, reason)
        except Exception:
            log.exception("provider %s: breaker listener failed", self.name)

    async def _probe_loop(self) -> None:
        while self.state.is_open:
            wait = (self.state.next_probe_at or self._clock()) - self._clock()
            if wait > 0:
                await self._sleep(wait)
            if not self.state.probe_due(self._clock()):
                continue
            self.probes += 1
            try:
                ok = bool(await self._probe())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("provider %s: probe failed: %r", self.name, exc)
                ok = False
            if self.state.probed(ok, self._clock()):
                log.warning("provider %s: probe succeeded; sending resumed", self.name)
                self._closed.set()
                if self.is_held:
                    self.is_held = False
                    self._notify(False, RESUMED_REASON)
                self._report()
            elif not ok and not self.is_held:
                log.warning("provider %s: probe failed; sending held", self.name)
                self.is_held = True
                self._notify(True, HELD_REASON)
                self._report()

    async def close(self) -> None:
        """Stop probing (shutdown). Submissions held stay held until cancelled by their owners."""
        if self._prober is not None and not self._prober.done():
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
