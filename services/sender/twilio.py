"""Twilio Programmable Messaging adapter (SMS), over aiohttp.

One submission = one `POST {twilio_url}/2010-04-01/Accounts/{sid}/Messages.json` (form: `To`, `Body`
rendered with `services.common.templating.render`, `MessagingServiceSid`, `StatusCallback` =
`{webhook_url}/twilio/status?message_id=...&campaign_id=...`), HTTP Basic auth (account SID, auth token).
One `ClientSession` per adapter (keep-alive; connector limit = `provider_concurrency`), created in the
running loop on first use; `close()` ends it.

Answers, in the `SenderResults` result shape (docs/design.md):

| Twilio answers | outcome | provider_code |
|---|---|---|
| 201 (or 200) | `accepted`, provider_message_id = the message `sid` | |
| 401 | `refused` (setup_error) | `"20003"` |
| 429, 5xx, any other unexpected status (1xx/3xx) | `presend_error` | the HTTP status |
| other 4xx | `refused` | Twilio's JSON `code` (21211, 21610, ...), else `"http_<status>"` |
| connection refused, connect timeout, DNS or TLS failure | `presend_error` | `"connect"` |
| request sent, no answer within `read_timeout_s`, or connection dropped after sending | `no_answer` | |

**Connect vs read errors.** aiohttp raises `ClientConnectorError` (and its DNS / SSL subclasses) and
`ConnectionTimeoutError` (the `sock_connect` timeout) before any byte of the request is written: nothing
reached Twilio, so it is a pre-send error the dispatcher retries. Once connected, `SocketTimeoutError` (the
`sock_read` timeout), `ServerDisconnectedError`, other `ClientOSError`s and a broken response body mean the
request may have been handed off: `no_answer`, never retried (a duplicate SMS is worse than a time-out).
aiohttp does not silently retry a POST on a stale keep-alive connection (only idempotent methods), so a
POST is sent at most once; the client's `keepalive_timeout_s` (default 15 s) is kept shorter than the
servers' idle timeouts to make "server closed the idle connection as we reused it" rare.
The pool wait (all `provider_concurrency` connections busy) has no timeout of its own: the dispatcher
bounds the calls in flight.

**Secrets.** The auth token is turned into the Authorization header once and kept only there; it appears
in no log line, exception text or result (results carry only ids, outcomes and provider codes).

`campaign_id` for the callback URL is read from each item (`item["campaign_id"]`) when the dispatcher
provides it; without it the callback URL carries `message_id` only.
"""
from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

from schemas.times import utc_now
from services.common import jsoncodec, logs
from services.common.settings import Settings
from services.sender.http_session import ProviderSession
from services.common.templating import render
from services.sender.providers import make_result

log = logging.getLogger("outreach.sender.twilio")

API_VERSION = "2010-04-01"
STATUS_CALLBACK_PATH = "/twilio/status"
AUTH_FAILED_CODE = "20003"
CONNECT_CODE = "connect"


def basic_authorization(login: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode("ascii")


def status_callback_url(settings: Settings, message_id: str, campaign_id: str | None,
                        attempt: int | None = None) -> str:
    """Where Twilio reports this submission's status: our ids and the submission's number (`attempt`), so a
    receipt says which submission it answers even when it arrives before the sender's own result."""
    params = {"message_id": message_id}
    if campaign_id:
        params["campaign_id"] = campaign_id
    if attempt is not None:
        params["submission"] = str(attempt)
    return f"{settings.webhook_url}{STATUS_CALLBACK_PATH}?{urlencode(params)}"


class TwilioAdapter:
    """`ProviderAdapter` for SMS through Twilio's Messages API (one message per call)."""

    def __init__(self, settings: Settings, *, read_timeout_s: float = 10.0, connect_timeout_s: float = 5.0,
                 keepalive_timeout_s: float = 15.0, base_url: str | None = None):
        self._settings = settings
        self._base = (base_url or settings.twilio_url).rstrip("/")
        sid = quote(settings.twilio_account_sid, safe="")
        self._messages_url = f"{self._base}/{API_VERSION}/Accounts/{sid}/Messages.json"
        self._account_url = f"{self._base}/{API_VERSION}/Accounts/{sid}.json"
        self._messaging_service_sid = settings.twilio_messaging_service_sid
        self._http = ProviderSession(
            authorization=basic_authorization(settings.twilio_account_sid,
                                              settings.twilio_auth_token.get_secret_value()),
            concurrency=settings.provider_concurrency, connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s, keepalive_timeout_s=keepalive_timeout_s)

    def __repr__(self) -> str:  # never the token
        return f"TwilioAdapter({self._base!r}, account={self._settings.twilio_account_sid!r})"

    # ------------------------------------------------------------------ session

    def _client(self) -> aiohttp.ClientSession:
        return self._http.client()

    async def close(self) -> None:
        await self._http.close()

    async def __aenter__(self) -> "TwilioAdapter":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ ProviderAdapter

    def batch_size(self, channel: str) -> int:
        return 1

    async def submit(self, channel: str, items: list[dict], template: Mapping[str, Any]) -> list[dict]:
        if channel != "sms":
            raise ValueError(f"TwilioAdapter sends SMS, not {channel!r}")
        if len(items) == 1:
            return await self._send(items[0], template)
        answers = await asyncio.gather(*(self._send(item, template) for item in items))
        return [result for results in answers for result in results]

    async def probe(self) -> bool:
        """An account lookup (sends no message): True when Twilio answers 200 (the circuit breaker's probe)."""
        try:
            async with self._client().get(self._account_url, allow_redirects=False) as resp:
                await resp.read()
                ok = resp.status == 200
                if not ok:
                    log.warning("Twilio account probe answered HTTP %d", resp.status)
                return ok
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("Twilio account probe failed: %s", type(exc).__name__)
            return False

    # ------------------------------------------------------------------ one message

    async def _send(self, item: Mapping[str, Any], template: Mapping[str, Any]) -> list[dict]:
        with logs.context(message_id=item["message_id"]):
            return await self._send_one(item, template)

    async def _send_one(self, item: Mapping[str, Any], template: Mapping[str, Any]) -> list[dict]:
        message_id = item["message_id"]
        attempt = item["attempt"] + 1
        form = {
            "To": item["destination"],
            "Body": render(template["body"], item.get("variables")),
            "MessagingServiceSid": self._messaging_service_sid,
            "StatusCallback": status_callback_url(self._settings, message_id, item.get("campaign_id"), attempt),
        }

        def result(outcome: str, code: str | None = None, sid: str | None = None) -> list[dict]:
            return [make_result(message_id, outcome, attempt, provider_code=code, provider_message_id=sid,
                                occurred_at=utc_now())]

        try:
            async with self._client().post(self._messages_url, data=form, allow_redirects=False) as resp:
                status = resp.status
                try:
                    body: bytes | None = await resp.read()
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    body = None  # the status line is in: the answer is known, only its details are lost
        except asyncio.CancelledError:
            raise
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            # Before any byte was written (connect refused / timed out, DNS, TLS handshake).
            log.warning("Twilio not reached for message %s: %s", message_id, type(exc).__name__)
            return result("presend_error", CONNECT_CODE)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            # Sent (or being sent) and no answer: it may have been handed off; never retried.
            log.warning("Twilio gave no answer for message %s: %s", message_id, type(exc).__name__)
            return result("no_answer")

        payload = _json_object(body)
        if status in (200, 201):
            sid = payload.get("sid")
            return result("accepted", sid=sid if isinstance(sid, str) else None)
        if status == 401:
            log.error("Twilio refused the account credentials (HTTP 401)")
            return result("refused", AUTH_FAILED_CODE)
        if status == 429 or status >= 500 or status < 400:
            return result("presend_error", str(status))
        code = payload.get("code")
        if isinstance(code, (int, str)) and not isinstance(code, bool) and str(code).strip():
            return result("refused", str(code).strip())
        return result("refused", f"http_{status}")


def _json_object(body: bytes | None) -> dict:
    if not body:
        return {}
    try:
        value = jsoncodec.loads(body)
    except Exception:
        return {}
    return value if isinstance(value, dict) else {}
