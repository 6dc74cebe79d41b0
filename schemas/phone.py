"""Phone numbers given with a default region (wire contract v1.1, "Contact validity" and
`OUTREACH_DEFAULT_REGION`): national and formatted numbers normalised to E.164 with `phonenumbers`, before
the strict rule of ``schemas.destinations`` judges them. Pure, no I/O.

``schemas.destinations.validate_destination`` keeps a cell the strict rule already accepts byte for byte
(phonenumbers would rewrite some: ``+4401234567`` with GB becomes ``+441234567``), so a region never changes
a destination that is valid without one. Any other cell goes through ``normalise_phone(cell, region)``:
- it is parsed with ``phonenumbers.parse(cell, region)`` (the region is used only when the cell
  has no ``+``/international prefix) and written with ``format_number(..., PhoneNumberFormat.E164)``:
  ``+1 (415) 555-0142``, ``" +14155550141 "``, ``(415) 555-0142`` with US, ``020 7946 0958`` with GB;
- parse and format only: allocation is never checked (no ``is_valid_number``), so a well-formed unallocated
  number (the simulator's ``+1NXX555010d`` range, Twilio's ``+1500555000x``) stays valid. Refused (None, the
  row is then ``invalid_e164``): what ``parse`` refuses (``NumberParseException``), a number with an extension
  (an SMS cannot reach one), and a number whose length is not possible for its country
  (``is_possible_number_with_reason`` other than ``IS_POSSIBLE``: too short, too long, or a local number
  without its area code such as ``555-0142`` with US), because formatting such a cell would make up a number
  (``12`` with US would otherwise become ``+112``).

phonenumbers is imported on first use: the services that never normalise do not load its metadata.
"""
from __future__ import annotations

import functools
from typing import Any

__all__ = ["supported_regions", "check_region", "normalise_phone"]


@functools.cache
def supported_regions() -> frozenset[str]:
    """The ISO 3166-1 alpha-2 regions phonenumbers has metadata for (``US``, ``GB``, ``FR``...)."""
    import phonenumbers

    return frozenset(phonenumbers.SUPPORTED_REGIONS)


def check_region(value: Any) -> str:
    """`value` if it is a region phonenumbers knows (upper case, as ISO 3166 writes it), else ValueError."""
    if not isinstance(value, str) or value not in supported_regions():
        raise ValueError(f"{value!r} is not a region phonenumbers knows: an ISO 3166-1 alpha-2 code such as "
                         "US, GB or FR")
    return value


def normalise_phone(cell: str, region: str) -> str | None:
    """`cell` as E.164 read with the default `region` (see the module docstring), or None if it is not a number
    of a possible length there. The strict rule still judges the result (``schemas.destinations``)."""
    import phonenumbers

    try:
        number = phonenumbers.parse(cell, region)
    except phonenumbers.NumberParseException:
        return None
    if number.extension:
        return None
    if phonenumbers.is_possible_number_with_reason(number) != phonenumbers.ValidationResult.IS_POSSIBLE:
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
