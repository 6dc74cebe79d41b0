"""How the simulator signs its callbacks, exactly as the providers do (services/common/webhook_signatures.py,
the module the webhook receiver verifies with).

Twilio (`X-Twilio-Signature`): base64(HMAC-SHA1(auth_token, url + name1 + value1 + name2 + value2 ...)) with
`url` the full callback URL as given (query included) and the POST parameters sorted by name (a repeated
name contributes each of its values, sorted), as Twilio's `RequestValidator.compute_signature` does. Written
by hand rather than adding the `twilio` package (which brings requests, PyJWT, aiohttp-retry for 15 lines);
tests/test_simulator_http.py checks it against the vectors of Twilio's own validator tests.

SendGrid Event Webhook (`X-Twilio-Email-Event-Webhook-Signature`, `X-Twilio-Email-Event-Webhook-Timestamp`):
base64 of the DER ECDSA P-256 / SHA-256 signature over `timestamp + raw body`.

!!! TEST KEY PAIR — SIMULATOR ONLY !!!
`SIMULATOR_SENDGRID_PRIVATE_KEY_PEM` is public (it is in this repository). It signs the simulator's
SendGrid events and nothing else; `SIMULATOR_SENDGRID_PUBLIC_KEY` (base64 DER SubjectPublicKeyInfo, the
form SendGrid's console shows; kept in the kernel module) is what the webhook receiver verifies with when
`OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY` is unset. Never configure a real SendGrid account with it.
"""
from __future__ import annotations

from functools import cache

from services.common import webhook_signatures
from services.common.webhook_signatures import (  # noqa: F401  (re-exported: the simulator's signing vocabulary)
    SENDGRID_SIGNATURE_HEADER,
    SENDGRID_TIMESTAMP_HEADER,
    SIMULATOR_SENDGRID_PUBLIC_KEY,
    TWILIO_SIGNATURE_HEADER,
    twilio_signature,
)

# TEST KEY PAIR, SIMULATOR ONLY (see the module docstring).
SIMULATOR_SENDGRID_PRIVATE_KEY_PEM = b"""-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgkBjy1ar0gXABejRK
/NOx/ZjMQd1/vt5BzzbafywvH+KhRANCAARkZFGYBsaL4oW2Q9y4D/vzh6FCFf5x
ahmcCka2wj0xMW+3Bxw74zHsmoDw/CbZd9rQEQMyHkKIGc9wJFQLgpbY
-----END PRIVATE KEY-----
"""


@cache
def _private_key():
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(SIMULATOR_SENDGRID_PRIVATE_KEY_PEM, password=None)


def sendgrid_signature(payload: bytes, timestamp: str) -> str:
    """The `X-Twilio-Email-Event-Webhook-Signature` header of an event POST with this body and timestamp."""
    return webhook_signatures.sendgrid_signature(_private_key(), payload, timestamp)
