"""SendGrid v3 Mail Send adapter (email), batched, over aiohttp.

One submission = one `POST {sendgrid_url}/v3/mail/send` (Bearer API key) carrying up to `email_batch`
personalizations (`batch_size("email") = settings.email_batch`, SendGrid's maximum is 1,000), one per
message:

    {"to": [{"email": destination}],
     "subject": the subject rendered for this contact (render_email: values as they are),
     "substitutions": {"-outreach-0-": html-escaped value, ...},
     "custom_args": {"message_id": ..., "campaign_id": ...},
     "headers": {"List-Unsubscribe": "<signed https link>[, <mailto:...>]",
                 "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}}

and the shared `from` (`from_email`, `from_name`), `reply_to`, `subject` and `content: [{type: text/html}]`
from the template.

**Substitutions, not dynamic_template_data.** SendGrid documents `dynamic_template_data` only for dynamic
(Handlebars, `d-...`) templates stored at SendGrid; for content sent in the request the documented
per-recipient mechanism is the classic `substitutions` map (tag -> value, replaced in the content, subject
and reply-to). We send the content ourselves, so `substitutions` it is. Each placeholder occurrence form of
the HTML (`{{name}}`, `{{ name }}`) is rewritten to a unique tag (`-outreach-N-`, checked absent from the
template) whose value is exactly what `render_email` puts there for the contact (HTML-escaped value, or the
placeholder as written when the contact has no value). The subject is rendered per personalization instead
(plain text, unescaped; a line break from a value becomes a space), so an HTML-escaped value never lands in a subject and a value that looks like a
placeholder is never expanded twice. The rendered email is therefore byte for byte `render_email`'s.
Attachments are not sent: the template carries only their metadata, not their content.

Answers (one per message of the call, same outcome for all: SendGrid answers a whole request):

| SendGrid answers | outcome | provider_code |
|---|---|---|
| 202 (or 200) | `accepted`, provider_message_id = `X-Message-Id` | |
| 401, 403 | `refused` (setup_error) | `"401"` / `"403"` |
| 429, 5xx, any other unexpected status (1xx/3xx) | `presend_error` | the HTTP status |
| other 4xx (400 bad request, 413 too large) | `refused` | `"http_<status>"` (the handler's `failed` / `unknown`: a bare "400" would read as an SMTP 4xx deferral) |
| connection refused, connect timeout, DNS or TLS failure | `presend_error` | `"connect"` |
| sent, no answer within `read_timeout_s`, or dropped after sending | `no_answer` | |

Connect vs read errors are told apart as in twilio.py (aiohttp's `ClientConnectorError` /
`ConnectionTimeoutError` before sending; anything later is `no_answer`, never retried). The API key lives
only in the Authorization header: never in logs, exceptions or results.
"""
from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from typing import Any

import aiohttp

from schemas.times import utc_now
from services.common import jsoncodec
from services.common.settings import Settings
from services.sender.http_session import ProviderSession
from services.common.templating import _PLACEHOLDER_RE, render_email  # the one placeholder grammar
from services.sender.providers import make_result
from services.common.unsubscribe import list_unsubscribe_headers

log = logging.getLogger("outreach.sender.sendgrid")

MAIL_SEND_PATH = "/v3/mail/send"
ACCOUNT_PATH = "/v3/user/account"
CONNECT_CODE = "connect"
MAX_PERSONALIZATIONS = 1000
_LINE_BREAKS = re.compile(r"\r\n|[\r\n]")


def one_line(text: str) -> str:
    """A subject on one line: a line break from a contact's value becomes a space."""
    return _LINE_BREAKS.sub(" ", text)


class HtmlTags:
    """The template HTML with each distinct placeholder text replaced by a unique substitution tag."""

    def __init__(self, html: str):
        forms = list(dict.fromkeys(m.group(0) for m in _PLACEHOLDER_RE.finditer(html)))
        prefix = "-outreach-"
        n = 0
        while any(f"{prefix}{i}-" in html for i in range(len(forms))) or prefix in html:
            n += 1  # the template itself contains our tag pattern: pick another
            prefix = f"-outreach{n}-"
        self.tags: dict[str, str] = {form: f"{prefix}{i}-" for i, form in enumerate(forms)}  # form -> tag
        self.html = _PLACEHOLDER_RE.sub(lambda m: self.tags[m.group(0)], html) if forms else html

    def substitutions(self, variables: Mapping[str, object] | None) -> dict[str, str]:
        # render_email on the placeholder alone gives exactly what it puts in the HTML for this contact.
        return {tag: render_email("", form, variables)[1] for form, tag in self.tags.items()}


class SendGridAdapter:
    """`ProviderAdapter` for email through SendGrid's v3 Mail Send (up to `email_batch` per call)."""

    def __init__(self, settings: Settings, *, read_timeout_s: float = 30.0, connect_timeout_s: float = 5.0,
                 keepalive_timeout_s: float = 15.0, base_url: str | None = None,
                 unsubscribe_mailto: str | None = None):
        self._settings = settings
        self._base = (base_url or settings.sendgrid_url).rstrip("/")
        self._batch = min(settings.email_batch, MAX_PERSONALIZATIONS)
        self._http = ProviderSession(
            authorization="Bearer " + settings.sendgrid_api_key.get_secret_value(),
            concurrency=settings.provider_concurrency, connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s, keepalive_timeout_s=keepalive_timeout_s)
        self._mailto = unsubscribe_mailto
        self._tags: tuple[str, HtmlTags] | None = None  # the last template's, reused call after call

    def __repr__(self) -> str:  # never the key
        return f"SendGridAdapter({self._base!r})"

    # ------------------------------------------------------------------ session

    def _client(self) -> aiohttp.ClientSession:
        return self._http.client()

    async def close(self) -> None:
        await self._http.close()

    async def __aenter__(self) -> "SendGridAdapter":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ the request

    def _html_tags(self, html: str) -> HtmlTags:
        if self._tags is None or self._tags[0] != html:
            self._tags = (html, HtmlTags(html))
        return self._tags[1]

    def request_body(self, items: list[dict], template: Mapping[str, Any]) -> dict:
        """The Mail Send JSON for `items` (public for tests and tools)."""
        tags = self._html_tags(template["html"])
        personalizations = []
        for item in items:
            campaign_id = item.get("campaign_id") or ""
            subject, _ = render_email(template["subject"], "", item.get("variables"))
            subject = one_line(subject)
            personalization: dict[str, Any] = {
                "to": [{"email": item["destination"]}],
                "subject": subject,
                # Echoed in every event: our ids and the submission's number (which one a receipt answers;
                # not "attempt": SendGrid's own deferred events carry an `attempt` of their own).
                "custom_args": {"message_id": item["message_id"], "campaign_id": campaign_id,
                                "submission": str(item["attempt"] + 1)},
                "headers": list_unsubscribe_headers(self._settings, campaign_id, item["message_id"],
                                                    item["destination"], self._mailto),
            }
            if tags.tags:
                personalization["substitutions"] = tags.substitutions(item.get("variables"))
            personalizations.append(personalization)
        sender: dict[str, str] = {"email": template["from_email"]}
        if template.get("from_name"):
            sender["name"] = template["from_name"]
        body: dict[str, Any] = {
            "personalizations": personalizations,
            "from": sender,
            "subject": template["subject"],
            "content": [{"type": "text/html", "value": tags.html}],
        }
        if template.get("reply_to"):
            body["reply_to"] = {"email": template["reply_to"]}
        return body

    # ------------------------------------------------------------------ ProviderAdapter

    def batch_size(self, channel: str) -> int:
        return self._batch

    async def submit(self, channel: str, items: list[dict], template: Mapping[str, Any]) -> list[dict]:
        if channel != "email":
            raise ValueError(f"SendGridAdapter sends email, not {channel!r}")
        if not items:
            return []
        if len(items) > MAX_PERSONALIZATIONS:
            raise ValueError(f"one Mail Send carries at most {MAX_PERSONALIZATIONS} personalizations")
        payload = jsoncodec.dumps(self.request_body(items, template))

        def results(outcome: str, code: str | None = None, provider_message_id: str | None = None) -> list[dict]:
            now = utc_now()
            return [make_result(item["message_id"], outcome, item["attempt"] + 1, provider_code=code,
                                provider_message_id=provider_message_id, occurred_at=now) for item in items]

        try:
            async with self._client().post(self._base + MAIL_SEND_PATH, data=payload, allow_redirects=False,
                                           headers={"Content-Type": "application/json"}) as resp:
                status = resp.status
                x_message_id = resp.headers.get("X-Message-Id")
                try:
                    await resp.read()
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass  # the status line is in: the answer is known
        except asyncio.CancelledError:
            raise
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            log.warning("SendGrid not reached for %d messages: %s", len(items), type(exc).__name__)
            return results("presend_error", CONNECT_CODE)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("SendGrid gave no answer for %d messages: %s", len(items), type(exc).__name__)
            return results("no_answer")

        if status in (200, 202):
            return results("accepted", provider_message_id=x_message_id or None)
        if status in (401, 403):
            log.error("SendGrid refused the API key or sender (HTTP %d)", status)
            return results("refused", str(status))
        if status == 429 or status >= 500 or status < 400:
            return results("presend_error", str(status))
        log.warning("SendGrid refused a send of %d messages (HTTP %d)", len(items), status)
        return results("refused", f"http_{status}")

    async def probe(self) -> bool:
        """`GET /v3/user/account` (sends nothing): True on 200 (the circuit breaker's probe)."""
        try:
            async with self._client().get(self._base + ACCOUNT_PATH, allow_redirects=False) as resp:
                await resp.read()
                if resp.status != 200:
                    log.warning("SendGrid account probe answered HTTP %d", resp.status)
                return resp.status == 200
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("SendGrid account probe failed: %s", type(exc).__name__)
            return False

