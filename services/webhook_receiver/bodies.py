"""Webhook bodies: read within their route's cap, parsed strictly.

Caps (bytes of the body as read, after any Content-Encoding is undone, so a compressed bomb stops at the cap
too):
- `POST /sendgrid/events`: 1 MiB. SendGrid posts a batch when it reaches 768 KB; the simulator's largest
  batch (1,000 events) is about 550 KB.
- `POST /twilio/status`, `POST /twilio/inbound`: 64 KiB. A few dozen short fields; an SMS body is at most
  1,600 characters (a form-encoded emoji takes 12 bytes a character: ~19 KB).
- `POST /unsubscribe`: 4 KiB (RFC 8058: `List-Unsubscribe=One-Click`; the body is not read at all).
A declared Content-Length above the cap is answered 413 before any of the body is read (`Expect:
100-continue`: before the client sends it); a body without one (chunked) is read up to the cap and answered
413 at the first byte beyond it. Nothing of a refused body is kept: the connection is closed after the
answer, once the server discarded what the client was still sending for at most `LINGER_S` (so an honest
client reads the 413 instead of a reset connection).

Twilio's routes take `application/x-www-form-urlencoded` only (else 415), in UTF-8 (a byte sequence or
percent-escape that is not UTF-8: 400), at most `MAX_FORM_FIELDS` fields (else 400). A body whose chunked
or compressed encoding is broken: 400.
"""
from __future__ import annotations

import logging
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import MultiDict

log = logging.getLogger("outreach.webhooks")

KiB = 1024
MiB = 1024 * KiB
SENDGRID_MAX_BYTES = 1 * MiB
TWILIO_MAX_BYTES = 64 * KiB
UNSUBSCRIBE_MAX_BYTES = 4 * KiB
LIMITS = {  # route path -> cap of its POST body
    "/sendgrid/events": SENDGRID_MAX_BYTES,
    "/twilio/status": TWILIO_MAX_BYTES,
    "/twilio/inbound": TWILIO_MAX_BYTES,
    "/unsubscribe": UNSUBSCRIBE_MAX_BYTES,
}
APP_MAX_BYTES = max(LIMITS.values())  # aiohttp's own cap (client_max_size), for anything else
LINGER_S = 2.0
FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FORM_FIELDS = 200


class BodyRefused(Exception):
    """A body the receiver does not take: `status` (400, 413, 415) and a short reason (no echo of input)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def response(self) -> web.Response:
        response = web.Response(status=self.status, text=self.reason)
        if self.status == 413:
            response.force_close()  # the rest of the body is never read
        return response


def too_large(limit: int) -> BodyRefused:
    return BodyRefused(413, f"body larger than {limit} bytes")


def declared_too_large(request: web.BaseRequest, limit: int) -> bool:
    return request.content_length is not None and request.content_length > limit


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, or BodyRefused(413) as soon as it is known to exceed `limit`."""
    if declared_too_large(request, limit):
        raise too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = await request.content.readany()
        except web.RequestPayloadError:  # a broken chunked encoding or compressed stream
            raise BodyRefused(400, "body could not be read") from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)


def parse_form(request: web.Request, body: bytes) -> MultiDict[str]:
    """A Twilio form post's fields, strictly: the form type, UTF-8, at most MAX_FORM_FIELDS fields."""
    if request.content_type != FORM_TYPE:
        raise BodyRefused(415, f"expected {FORM_TYPE}")
    charset = (request.charset or "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise BodyRefused(415, "expected UTF-8")
    try:
        decoded = body.decode("utf-8")
        pairs = parse_qsl(decoded, keep_blank_values=True, encoding="utf-8", errors="strict",
                          max_num_fields=MAX_FORM_FIELDS)
    except UnicodeDecodeError:
        raise BodyRefused(400, "form is not UTF-8") from None
    except ValueError:  # more fields than max_num_fields
        raise BodyRefused(400, f"more than {MAX_FORM_FIELDS} form fields") from None
    return MultiDict(pairs)


async def expect_within_limit(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue`: a declared body above the route's cap is refused before the client sends it."""
    limit = LIMITS.get(request.path)
    if limit is not None and declared_too_large(request, limit):
        return too_large(limit).response()
    if request.version == (1, 1):  # then as aiohttp's own expect handler
        if request.headers.get("Expect", "").lower() != "100-continue":
            return web.Response(status=417, text="unknown Expect")
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer's body has not started
    return None


@web.middleware
async def body_limits(request: web.Request, handler) -> web.StreamResponse:
    """A POST whose declared body exceeds its route's cap is answered 413 before its handler runs; a handler's
    BodyRefused becomes its answer."""
    limit = LIMITS.get(request.path)
    if request.method == "POST" and limit is not None and declared_too_large(request, limit):
        log.warning("refused %s: declared body of %s bytes (cap %d)", request.path, request.content_length, limit)
        return too_large(limit).response()
    try:
        return await handler(request)
    except BodyRefused as refused:
        log.warning("refused %s: %s", request.path, refused.reason)
        return refused.response()
