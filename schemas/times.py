"""The wire's one time format: RFC 3339 in UTC with microseconds, fixed width (text order is time order).

Every service formats times through here, so a record made anywhere sorts and compares like the others.
"""
from __future__ import annotations

from datetime import datetime, timezone

# The text rfc3339() writes, and nothing else: what internal records carry as their times (checked without a
# Python call per value). [0-9], not \d: the pattern engine's \d also takes other scripts' digits.
WIRE_TIME_PATTERN = (r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
                     r"T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)\.[0-9]{6}Z$")

def rfc3339(moment: datetime) -> str:
    """`moment` in the wire's format; a naive moment is taken as UTC.

    The year is zero-padded by hand: strftime's %Y gives "999" for the year 999, which sorts after "2026".
    OverflowError if the moment in UTC is out of datetime's range (before 0001-01-01 or after 9999)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    m = moment.astimezone(timezone.utc)
    return (f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
            f".{m.microsecond:06d}Z")


def from_timestamp(seconds: float) -> str:
    """A POSIX timestamp in the wire's format."""
    return rfc3339(datetime.fromtimestamp(seconds, timezone.utc))


def utc_now() -> str:
    """Now, in the wire's format."""
    return rfc3339(datetime.now(timezone.utc))
