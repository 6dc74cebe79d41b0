"""How the simulator signs its callbacks, exactly as the providers do.

Twilio (`X-Twilio-Signature`): base64(HMAC-SHA1(auth_token, url + name1 + value1 + name2 + value2 ...)) with
`url` the full callback URL as given (query included) and the POST parameters sorted by name (a repeated
name contributes each of its values, sorted), as Twilio's `RequestValidator.compute_signature` does. Written
here rather than adding the `twilio` package (which brings requests, PyJWT, aiohttp-retry for 15 lines);
tests/test_simulator_http.py checks it against the vectors of Twilio's own validator tests.

SendGrid Event Webhook (`X-Twilio-Email-Event-Webhook-Signature`, `X-Twilio-Email-Event-Webhook-Timestamp`):
base64 of the DER ECDSA P-256 / SHA-256 signature over `timestamp + raw body`.

!!! TEST KEY PAIR — SIMULATOR ONLY !!!
`SIMULATOR_SENDGRID_PRIVATE_KEY_PEM` is public (it is in this repository). It signs the simulator's
SendGrid events and nothing else; `SIMULATOR_SENDGRID_PUBLIC_KEY` (base64 DER SubjectPublicKeyInfo, the
form SendGrid's console shows) is what the webhook receiver verifies with when
`OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY` is unset. Never configure a real SendGrid account with it.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from functools import cache

TWILIO_SIGNATURE_HEADER = "X-Twilio-Signature"
SENDGRID_SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"

# TEST KEY PAIR, SIMULATOR ONLY (see the module docstring).
SIMULATOR_SENDGRID_PRIVATE_KEY_PEM = b"""-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgkBjy1ar0gXABejRK
/NOx/ZjMQd1/vt5BzzbafywvH+KhRANCAARkZFGYBsaL4oW2Q9y4D/vzh6FCFf5x
ahmcCka2wj0xMW+3Bxw74zHsmoDw/CbZd9rQEQMyHkKIGc9wJFQLgpbY
-----END PRIVATE KEY-----
"""
SIMULATOR_SENDGRID_PUBLIC_KEY = (
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEZGRRmAbGi+KFtkPcuA/784ehQhX+cWoZnApGtsI9MTFvtwccO+Mx7JqA8Pwm2Xfa0BEDMh5CiBnPcCRUC4KW2A=="
)


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str] | Iterable[tuple[str, str]]) -> str:
    """The `X-Twilio-Signature` header of a POST of form `params` to `url`."""
    items = params.items() if isinstance(params, Mapping) else params
    by_name: dict[str, set[str]] = {}
    for name, value in items:
        by_name.setdefault(name, set()).add(value)
    data = url + "".join(name + value for name in sorted(by_name) for value in sorted(by_name[name]))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


@cache
def _private_key():
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(SIMULATOR_SENDGRID_PRIVATE_KEY_PEM, password=None)


def sendgrid_signature(payload: bytes, timestamp: str) -> str:
    """The `X-Twilio-Email-Event-Webhook-Signature` header of an event POST with this body and timestamp."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    der = _private_key().sign(timestamp.encode() + payload, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(der).decode("ascii")
