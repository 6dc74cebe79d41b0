"""The contract's id form: a UUID in the lowercase 8-4-4-4-12 form, echoed byte for byte."""
from __future__ import annotations

import re

UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_UUID_RE = re.compile(UUID_PATTERN)


def is_wire_uuid(value: object) -> bool:
    """True for a string in the lowercase 8-4-4-4-12 form the contract requires."""
    return isinstance(value, str) and _UUID_RE.fullmatch(value) is not None  # `$` alone admits a final "\n"
