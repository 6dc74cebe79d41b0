"""Signed one-click unsubscribe links (RFC 8058) for the email adapters and the webhook receiver.

`unsubscribe_url(settings, campaign_id, message_id, destination)` ->
`{webhook_url}/unsubscribe?v=1&campaign_id=...&message_id=...&destination=...&sig=...` where `sig` is the
lowercase hex HMAC-SHA256, keyed with `settings.unsubscribe_secret`, over the canonical string
`"v1\\n{campaign_id}\\n{message_id}\\n{destination}"` (the parameters' values, not their encoding, so a
proxy re-encoding the query does not break the link).

`verify_unsubscribe(settings, params)` takes the query parameters as received (any mapping, e.g. aiohttp's
`request.query`, or the one-click POST's query; the POST body `List-Unsubscribe=One-Click` carries nothing
to sign) and answers `(campaign_id, message_id, destination)` when the signature matches, else None.
It never raises on malformed input. The links carry no expiry: an unsubscribe link must keep working.

The secret never leaves this module: it is neither logged nor part of any URL or exception.
"""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import urlencode

from services.common.settings import Settings

__all__ = ["UNSUBSCRIBE_PATH", "unsubscribe_url", "unsubscribe_signature", "verify_unsubscribe",
           "list_unsubscribe_headers"]

UNSUBSCRIBE_PATH = "/unsubscribe"
VERSION = "1"
_MAX_PARAM = 1024  # longer than any id or address: refuse before hashing attacker-sized input


def _canonical(campaign_id: str, message_id: str, destination: str) -> bytes:
    return f"v{VERSION}\n{campaign_id}\n{message_id}\n{destination}".encode()


def unsubscribe_signature(settings: Settings, campaign_id: str, message_id: str, destination: str) -> str:
    key = settings.unsubscribe_secret.get_secret_value().encode()
    return hmac.new(key, _canonical(campaign_id, message_id, destination), hashlib.sha256).hexdigest()


def unsubscribe_url(settings: Settings, campaign_id: str, message_id: str, destination: str) -> str:
    """The recipient's signed unsubscribe link (one-click POST and GET both go here)."""
    query = urlencode({"v": VERSION, "campaign_id": campaign_id, "message_id": message_id,
                       "destination": destination,
                       "sig": unsubscribe_signature(settings, campaign_id, message_id, destination)})
    return f"{settings.webhook_url}{UNSUBSCRIBE_PATH}?{query}"


def verify_unsubscribe(settings: Settings, params: Mapping[str, str]) -> tuple[str, str, str] | None:
    """`(campaign_id, message_id, destination)` of a genuine link's parameters, else None."""
    try:
        values = [params.get(name) for name in ("v", "campaign_id", "message_id", "destination", "sig")]
    except Exception:
        return None
    version, campaign_id, message_id, destination, sig = values
    if version != VERSION or not all(isinstance(v, str) and len(v) <= _MAX_PARAM
                                     for v in (campaign_id, message_id, destination, sig)):
        return None
    if not destination or not message_id:
        return None
    expected = unsubscribe_signature(settings, campaign_id, message_id, destination)
    if not hmac.compare_digest(expected.encode(), sig.lower().encode("ascii", "replace")):
        return None
    return campaign_id, message_id, destination


def list_unsubscribe_headers(settings: Settings, campaign_id: str, message_id: str, destination: str,
                             mailto: str | None = None) -> dict[str, str]:
    """RFC 2369 / RFC 8058 headers: the signed HTTPS link (plus an optional mailto) and one-click POST."""
    targets = [f"<{unsubscribe_url(settings, campaign_id, message_id, destination)}>"]
    if mailto:
        targets.append(f"<mailto:{mailto}>" if not mailto.startswith("mailto:") else f"<{mailto}>")
    return {"List-Unsubscribe": ", ".join(targets), "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
