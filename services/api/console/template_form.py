"""The template editor's pure parts: the form's fields to a contract template and back, its problems in plain
words, and what the editor shows beside it (SMS encoding and segments, the preview with the first contact's
values). The rules are the project's (services/common/templating.py); static/editor.js shows the same live,
from the GSM-7 tables and segment sizes this module hands it (`sms_rules`), and a test checks both agree.
"""
from __future__ import annotations

import html as _html
from collections.abc import Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

from pydantic import ValidationError

from schemas.commands import ATTACHMENTS_MAX_BYTES, SMS_BODY_MAX_CHARS, EmailTemplate, SmsTemplate
from services.common import templating

EMAIL_FIELDS = ("subject", "html", "from_email", "from_name", "reply_to")
ATTACHMENT_FIELDS = ("filename", "content_type", "size_bytes", "status")
ATTACHMENT_STATUSES = {"complete": "Uploaded (complete)", "pending": "Not fully uploaded (blocks Run)"}
FIELD_LABELS = {"body": "Message text", "subject": "Subject", "html": "HTML body", "from_email": "From email",
                "from_name": "From name", "reply_to": "Reply-to", "attachments": "Attachments"}


def sms_rules() -> dict[str, Any]:
    """The GSM 03.38 tables and segment sizes, as editor.js takes them (so the rule is written once, here)."""
    return {"basic": "".join(sorted(templating.GSM7_BASIC)), "extension": "".join(sorted(templating.GSM7_EXTENSION)),
            "gsm7_single": templating.GSM7_SINGLE_SEPTETS, "gsm7_multi": templating.GSM7_MULTI_SEPTETS,
            "ucs2_single": templating.UCS2_SINGLE_UNITS, "ucs2_multi": templating.UCS2_MULTI_UNITS,
            "body_max": SMS_BODY_MAX_CHARS, "attachments_max": ATTACHMENTS_MAX_BYTES}


@dataclass(frozen=True)
class SmsMeter:
    encoding: str  # GSM-7 or UCS-2
    length: int  # septets (GSM-7: ^{}\[~]|€ count two) or UTF-16 units (UCS-2: most emoji count two)
    segments: int

    @classmethod
    def of(cls, text: str) -> SmsMeter:
        encoding = templating.sms_encoding(text)
        length = templating.sms_septets(text) if encoding == "GSM-7" else len(text.encode("utf-16-le", "surrogatepass")) // 2
        return cls(encoding, length, templating.sms_segments(text))

    def describe(self) -> str:
        per = ""
        if self.segments > 1:
            per = f" of {templating.GSM7_MULTI_SEPTETS if self.encoding == 'GSM-7' else templating.UCS2_MULTI_UNITS}"
        return (f"{self.encoding}, {self.length} character{'s' * (self.length != 1)}, "
                f"{self.segments} segment{'s' * (self.segments != 1)}{per}")


@dataclass
class TemplateForm:
    """The editor's fields as typed (`fields`, `attachments`) and the template they make, or its problems."""
    channel: str
    fields: dict[str, str]
    attachments: list[dict[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    template: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        """The text placeholders are read from (SMS: the body; email: subject and HTML), as the handler reads it."""
        if self.channel == "sms":
            return self.fields.get("body", "")
        return self.fields.get("subject", "") + "\n" + self.fields.get("html", "")

    def preview(self, sample: Mapping[str, Any] | None) -> dict[str, Any]:
        """What the first contact would get, and for SMS the meter of the text as written and as rendered."""
        variables = (sample or {}).get("variables") or {}
        to = (sample or {}).get("destination") or ""
        if self.channel == "sms":
            body = self.fields.get("body", "")
            rendered = templating.render(body, variables)
            return {"to": to, "body": rendered, "written": SmsMeter.of(body), "rendered": SmsMeter.of(rendered)}
        subject, html = templating.render_email(self.fields.get("subject", ""), self.fields.get("html", ""), variables)
        return {"to": to, "subject": subject, "html": preview_html(html), "from_email": self.fields.get("from_email", ""),
                "from_name": self.fields.get("from_name", ""), "reply_to": self.fields.get("reply_to", "")}


def _problem(error: Mapping[str, Any]) -> str:
    names = []
    for part in error.get("loc", ()):
        if isinstance(part, int):
            names.append(f"attachment {part + 1}")
        elif part in FIELD_LABELS:
            names.append(FIELD_LABELS[part])
        elif part in ATTACHMENT_FIELDS:
            names.append(part.replace("_", " "))
    if error.get("type") in ("string_too_short", "missing"):
        message = "must not be empty"
    else:
        message = str(error.get("msg", "is not valid")).removeprefix("Value error, ")
    return f"{': '.join(names) or 'Template'}: {message}"


def read_template_form(channel: str, form: Mapping[str, Any], attachment_rows: list[dict[str, str]] | None = None,
                       ) -> TemplateForm:
    """The template of the editor's fields: SMS `body`; email `subject`, `html`, `from_email`, `from_name`,
    `reply_to` (blank: none) and the attachment rows ({filename, content_type, size_bytes, status}; a row
    without a filename is left out). Checked with the contract's own models; problems in plain words."""
    if channel == "sms":
        fields = {"body": str(form.get("body") or "")}
        candidate: dict[str, Any] = dict(fields)
        model: type = SmsTemplate
    else:
        fields = {name: str(form.get(name) or "").strip() if name != "html" else str(form.get(name) or "")
                  for name in EMAIL_FIELDS}
        candidate = {name: fields[name] for name in ("subject", "html", "from_email", "from_name")}
        if fields["reply_to"]:
            candidate["reply_to"] = fields["reply_to"]
        model = EmailTemplate
    # The body as typed (a textarea sends \r\n): the handler keeps what it is given, line breaks are \n.
    for name in ("body", "html"):
        if name in fields:
            fields[name] = fields[name].replace("\r\n", "\n")
            candidate[name] = fields[name]
    # A row left empty (its upload select always has a value) is no attachment.
    rows = [row for row in (attachment_rows or [])
            if any(str(row.get(name) or "").strip() for name in ("filename", "content_type", "size_bytes"))]
    result = TemplateForm(channel, fields, rows)
    if channel == "email":
        attachments = []
        for number, row in enumerate(rows, start=1):
            size = str(row.get("size_bytes", "")).strip()
            if not str(row.get("filename", "")).strip():
                result.problems.append(f"attachment {number}: a file name is needed")
                continue
            if not size.isdigit():
                result.problems.append(f"attachment {number}: the size is a whole number of bytes")
                continue
            attachments.append({"filename": str(row["filename"]).strip(),
                                "content_type": str(row.get("content_type") or "application/octet-stream").strip(),
                                "size_bytes": int(size), "status": str(row.get("status") or "pending")})
        candidate["attachments"] = attachments
    if not result.problems:
        try:
            result.template = model.model_validate(candidate).model_dump(mode="json", exclude_none=True)
        except ValidationError as exc:
            result.problems = [_problem(error) for error in exc.errors(include_url=False)]
    return result


def attachment_rows(form_lists: Mapping[str, list[str]]) -> list[dict[str, str]]:
    """The attachment rows of the form's repeated fields `attachment_filename`, `attachment_content_type`, ..."""
    columns = {name: form_lists.get(f"attachment_{name}", []) for name in ATTACHMENT_FIELDS}
    count = max((len(values) for values in columns.values()), default=0)
    return [{name: (values[i] if i < len(values) else "") for name, values in columns.items()} for i in range(count)]


def form_of_template(channel: str, template: Mapping[str, Any] | None) -> TemplateForm:
    """The editor's fields for a stored template (a campaign's, to edit)."""
    template = template or {}
    if channel == "sms":
        return TemplateForm(channel, {"body": str(template.get("body") or "")}, template=dict(template))
    fields = {name: str(template.get(name) or "") for name in EMAIL_FIELDS}
    rows = [{"filename": str(a.get("filename", "")), "content_type": str(a.get("content_type", "")),
             "size_bytes": str(a.get("size_bytes", "")), "status": str(a.get("status", ""))}
            for a in template.get("attachments") or []]
    return TemplateForm(channel, fields, rows, template=dict(template))


# ------------------------------------------------------------------ the email preview

# The email body shown in the console: its text and structure only. The preview frame inherits the console's
# Content-Security-Policy, which refuses inline styles, scripts and outside resources (and the console fetches
# nothing from outside): kept are these elements and attributes, an image becomes its alt text.
PREVIEW_TAGS = frozenset(
    "a abbr b blockquote br caption center cite code dd del div dl dt em font h1 h2 h3 h4 h5 h6 hr i ins kbd li "
    "mark ol p pre q s small span strike strong sub sup table tbody td tfoot th thead tr u ul".split())
PREVIEW_ATTRIBUTES = frozenset({"align", "alt", "colspan", "dir", "lang", "rowspan", "title"})
_DROPPED_WITH_CONTENT = frozenset({"head", "script", "style", "template", "noscript", "svg", "math", "object",
                                   "iframe", "title", "textarea", "select"})


class _PreviewHtml(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.dropped = 0  # depth inside an element dropped with its content

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _DROPPED_WITH_CONTENT:
            self.dropped += 1
        if self.dropped:
            return
        if tag == "img":
            alt = dict(attrs).get("alt")
            self.out.append(_html.escape(f"[image: {alt}]" if alt else "[image]"))
        elif tag in PREVIEW_TAGS:
            kept = "".join(f' {name}="{_html.escape(value or "")}"' for name, value in attrs
                           if name in PREVIEW_ATTRIBUTES)
            self.out.append(f"<{tag}{kept}>")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag in _DROPPED_WITH_CONTENT:
            self.dropped -= 1

    def handle_endtag(self, tag: str) -> None:
        if tag in _DROPPED_WITH_CONTENT:
            self.dropped = max(0, self.dropped - 1)
        elif not self.dropped and tag in PREVIEW_TAGS:
            self.out.append(f"</{tag}>")

    def handle_data(self, data: str) -> None:
        if not self.dropped:
            self.out.append(_html.escape(data, quote=False))


def preview_html(html: str) -> str:
    """A rendered email body reduced to what the console shows of it (PREVIEW_TAGS, PREVIEW_ATTRIBUTES)."""
    parser = _PreviewHtml()
    parser.feed(html)
    parser.close()
    return "".join(parser.out)
