"""Templates: `{{variable}}` placeholders, rendering, and SMS encoding / segment counting.

Pure functions, no I/O. Used by the command handler (template checks), the sender (rendering, the
segment cost of an SMS for the rate limit) and the CLI (previews).

Placeholders
    `{{name}}`, with optional spaces or tabs inside the braces (`{{ first_name }}`). A name is any run of
    characters without braces or line breaks, trimmed of surrounding spaces, so CSV headers such as
    `First Name` work. Names are matched to the contact's variables exactly (case-sensitive).

Rendering
    Each placeholder is replaced by the contact's value. A variable with no value -- key missing, value
    `None` or the empty string -- leaves the placeholder exactly as written (`{{ name }}` stays
    `{{ name }}`, spaces included), as the product specifies. Rendering is one pass: a value that itself
    looks like a placeholder is inserted verbatim, never expanded again. Rendering never raises.

SMS encoding (GSM 03.38)
    A text is GSM-7 when every character is in the basic character set or the extension table;
    otherwise the whole message is UCS-2. Basic characters cost 1 septet, extension characters
    (form feed and ``^{}\\[~]|€``) cost 2 (escape + character).

Segments
    GSM-7: up to 160 septets is 1 segment, else ceil(septets / 153).
    UCS-2: up to 70 UTF-16 code units is 1 segment, else ceil(units / 67) (characters outside the BMP,
    such as most emoji, count 2 units).
    We count by these formulas. A handset never splits an escape pair or a surrogate pair across two
    segments, so in rare edge cases the real count is one more; the count here is the cost used for
    rate limiting and previews, not a wire-exact split.
    Empty text is 1 segment (**decision**: a submission always costs at least one segment; valid
    templates are never empty anyway, and a placeholder with no value stays literal).
"""
from __future__ import annotations

import html as _html
import re
from collections.abc import Mapping
from typing import Any

from schemas.events import MISSING_VARIABLE_NAME_LIMIT, MISSING_VARIABLE_ROWS_LIMIT, MISSING_VARIABLES_LIMIT

__all__ = [
    "GSM7_BASIC",
    "GSM7_EXTENSION",
    "placeholders",
    "render",
    "missing_variables",
    "MissingVariables",
    "template_texts",
    "render_email",
    "sms_encoding",
    "sms_septets",
    "sms_segments",
]

# A name: no braces, no line breaks, does not start or end with whitespace.
_PLACEHOLDER_RE = re.compile(r"\{\{[ \t]*([^{}\s](?:[^{}\r\n]*[^{}\s])?)[ \t]*\}\}")

# GSM 03.38 default alphabet (basic character set), without the escape code 0x1B.
GSM7_BASIC: frozenset[str] = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# GSM 03.38 extension table: each costs 2 septets (escape + character).
GSM7_EXTENSION: frozenset[str] = frozenset("\f^{}\\[~]|€")
_GSM7_ALL: frozenset[str] = GSM7_BASIC | GSM7_EXTENSION

GSM7_SINGLE_SEPTETS = 160
GSM7_MULTI_SEPTETS = 153
UCS2_SINGLE_UNITS = 70
UCS2_MULTI_UNITS = 67


def _value(variables: Mapping[str, object] | None, name: str) -> str | None:
    """The contact's value for `name`, or None when it has no value (missing, None or empty)."""
    if not variables:
        return None
    value = variables.get(name)
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text or None


def placeholders(text: str) -> list[str]:
    """Distinct placeholder names in `text`, in order of first appearance."""
    return list(dict.fromkeys(m.group(1) for m in _PLACEHOLDER_RE.finditer(text)))


def missing_variables(text: str, variables: Mapping[str, object] | None) -> list[str]:
    """Distinct placeholder names that have no value in `variables` (they would stay literal)."""
    return [name for name in placeholders(text) if _value(variables, name) is None]


def template_texts(channel: str, template: Any) -> str | None:
    """The text a template's placeholders are read from (SMS: the body; email: subject and html), or None when
    `template` is not one of the channel's (the command handler judges it then)."""
    if not isinstance(template, Mapping):
        return None
    if channel == "sms" and isinstance(template.get("body"), str):
        return template["body"]
    if channel == "email" and isinstance(template.get("subject"), str) and isinstance(template.get("html"), str):
        return template["subject"] + "\n" + template["html"]
    return None


class MissingVariables:
    """Which placeholders of `text` have no value in which contacts: fed one contact at a time (`add`), it keeps a
    count and the first rows per placeholder, so a campaign of any size costs a few rows per variable.

    The one report of missing variables: the command handler's run summary (`RunSummary.missing_variables`) and
    the importers' check of a CSV (services/common/import_check.py) both make it with this."""

    def __init__(self, text: str, rows_shown: int = MISSING_VARIABLE_ROWS_LIMIT,
                 variables_shown: int = MISSING_VARIABLES_LIMIT):
        self.names = placeholders(text)
        self.rows_shown = rows_shown
        self.variables_shown = variables_shown
        self.rows = 0  # contacts missing at least one variable
        self._counts = dict.fromkeys(self.names, 0)
        self._first_rows: dict[str, list[int]] = {name: [] for name in self.names}

    def add(self, row: int, variables: Mapping[str, object] | None) -> bool:
        """Count one contact's missing variables; True when it misses any."""
        missing = False
        for name in self.names:
            if _value(variables, name) is None:
                missing = True
                self._counts[name] += 1
                rows = self._first_rows[name]
                if len(rows) < self.rows_shown:
                    rows.append(row)
        if missing:
            self.rows += 1
        return missing

    def report(self) -> list[dict[str, Any]]:
        """`[{variable, count, first_rows}]` for each placeholder some contact has no value for, in the template's
        order, at most `variables_shown` of them (a name over MISSING_VARIABLE_NAME_LIMIT characters is cut)."""
        report = []
        for name in self.names:
            if self._counts[name]:
                limit = MISSING_VARIABLE_NAME_LIMIT
                shown = name if len(name) <= limit else name[:limit - 1] + "…"
                report.append({"variable": shown, "count": self._counts[name], "first_rows": self._first_rows[name]})
                if len(report) >= self.variables_shown:
                    break
        return report


def _render(text: str, variables: Mapping[str, object] | None, escape: bool) -> str:
    def substitute(match: re.Match[str]) -> str:
        value = _value(variables, match.group(1))
        if value is None:
            return match.group(0)
        return _html.escape(value, quote=True) if escape else value

    return _PLACEHOLDER_RE.sub(substitute, text)


def render(text: str, variables: Mapping[str, object] | None) -> str:
    """`text` with each placeholder replaced by its value; placeholders with no value stay literal."""
    return _render(text, variables, escape=False)


def render_email(subject: str, html: str, variables: Mapping[str, object] | None) -> tuple[str, str]:
    """Render an email's subject and HTML body.

    The subject is plain text: values go in as they are. In the HTML body values are HTML-escaped
    (**decision**: contact data is text, never markup, so a value such as `<b>` or `Tom & Jerry` cannot
    break or inject into the page). Placeholders with no value stay literal in both.
    """
    return _render(subject, variables, escape=False), _render(html, variables, escape=True)


def sms_encoding(text: str) -> str:
    """`"GSM-7"` when every character is in the GSM 03.38 basic or extension table, else `"UCS-2"`."""
    return "GSM-7" if _GSM7_ALL.issuperset(text) else "UCS-2"


def sms_septets(text: str) -> int:
    """GSM-7 length in septets (extension characters count 2). Only meaningful for GSM-7 text."""
    return len(text) + sum(1 for c in text if c in GSM7_EXTENSION)


def _utf16_units(text: str) -> int:
    # surrogatepass: a lone surrogate in a Python str still counts as one unit instead of raising.
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def sms_segments(text: str) -> int:
    """Number of SMS segments for `text` (see the module docstring); empty text is 1 segment."""
    if sms_encoding(text) == "GSM-7":
        septets = sms_septets(text)
        if septets <= GSM7_SINGLE_SEPTETS:
            return 1
        return -(-septets // GSM7_MULTI_SEPTETS)
    units = _utf16_units(text)
    if units <= UCS2_SINGLE_UNITS:
        return 1
    return -(-units // UCS2_MULTI_UNITS)
