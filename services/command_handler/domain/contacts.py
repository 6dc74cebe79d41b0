"""Contact screening for one chunk: validity (the contract's rule, ``schemas.destinations``) and duplicates.

Pure, no I/O. A destination already in the campaign, or earlier in the same chunk, is
``duplicate_destination`` (the later row is the invalid one). With a default region (contract v1.1), SMS
destinations are compared and stored after normalisation to E.164.
"""
from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from typing import Any

from schemas.destinations import DUPLICATE_DESTINATION, validate_destination

__all__ = ["screen_chunk"]


def screen_chunk(
    channel: str,
    contacts: Iterable[tuple[int, Any, Mapping[str, Any]]],
    known_destinations: Container[str],
    default_region: str | None = None,
) -> tuple[list[tuple[int, str, Mapping[str, Any]]], list[tuple[int, str]]]:
    """Split one chunk into valid contacts and invalid rows, in input order.

    `contacts`: (row, destination cell, variables). `known_destinations`: normalized destinations
    already in the campaign; it is only read, never changed (the caller adds the valid ones when the
    event is applied). `default_region`: the region national SMS numbers are read with (the command's, else
    OUTREACH_DEFAULT_REGION), None for the strict rule. Returns (valid: [(row, normalized destination,
    variables)], invalid_rows: [(row, reason)]).
    """
    valid: list[tuple[int, str, Mapping[str, Any]]] = []
    invalid_rows: list[tuple[int, str]] = []
    seen: set[str] = set()
    for row, cell, variables in contacts:
        destination, reason = validate_destination(channel, cell, default_region)
        if destination is None:
            invalid_rows.append((row, reason))  # type: ignore[arg-type]
        elif destination in known_destinations or destination in seen:
            invalid_rows.append((row, DUPLICATE_DESTINATION))
        else:
            seen.add(destination)
            valid.append((row, destination, variables))
    return valid, invalid_rows
