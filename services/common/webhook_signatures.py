"""Provider webhook signatures: pure functions, no I/O. The webhook receiver verifies with them
(services/webhook_receiver/signatures.py), the provider simulator signs with them (services/simulator/).

Twilio (`X-Twilio-Signature`): base64(HMAC-SHA1(auth_token, url + key1 + value1 + key2 + value2 ...)),
where `url` is the full URL Twilio requested (scheme, host, port, path and query, exactly as configured)
and the POST parameters are sorted by name (a repeated name contributes each of its values, sorted), as
Twilio's helper libraries compute it.

SendGrid Event Webhook (`X-Twilio-Email-Event-Webhook-Signature` / `-Timestamp`): an ECDSA P-256 /
SHA-256 signature (base64 of DER) over the timestamp header followed by the raw request body, verified
with the account's public key (base64 of a DER SubjectPublicKeyInfo, as the SendGrid console shows it).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

TWILIO_SIGNATURE_HEADER = "X-Twilio-Signature"
SENDGRID_SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"

# The public half of the simulator's TEST key pair (its private half is in services/simulator/signing.py):
# what the receiver verifies SendGrid events with when OUTREACH_SENDGRID_WEBHOOK_PUBLIC_KEY is unset.
SIMULATOR_SENDGRID_PUBLIC_KEY = (
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEZGRRmAbGi+KFtkPcuA/784ehQhX+cWoZnApGtsI9MTFvtwccO+Mx7JqA8Pwm2Xfa0BEDMh5CiBnPcCRUC4KW2A=="
)

Params = Mapping[str, Any] | Iterable[tuple[str, str]]


def _pairs(params: Params) -> list[tuple[str, str]]:
    """(name, value) pairs, repeated names kept (a MultiDict's `items()` yields every value)."""
    items = params.items() if isinstance(params, Mapping) else params
    pairs = []
    for name, value in items:
        if isinstance(value, (list, tuple)):
            pairs.extend((name, str(v)) for v in value)
        else:
            pairs.append((name, str(value)))
    return pairs


def twilio_signature(auth_token: str, url: str, params: Params = ()) -> str:
    """The `X-Twilio-Signature` Twilio sends for a POST of `params` to `url`."""
    by_name: dict[str, set[str]] = {}
    for name, value in _pairs(params):
        by_name.setdefault(name, set()).add(value)
    data = url + "".join(name + value for name in sorted(by_name) for value in sorted(by_name[name]))
    digest = hmac.new(auth_token.encode("utf-8"), data.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def verify_twilio_signature(auth_token: str, url: str, params: Params, signature: str | None) -> bool:
    """True when `signature` (the header value; None when absent) is Twilio's for this request."""
    if not signature or not auth_token:
        return False
    expected = twilio_signature(auth_token, url, params)
    return hmac.compare_digest(expected.encode("ascii"), signature.strip().encode("utf-8", "replace"))


def load_sendgrid_public_key(key: Any) -> ec.EllipticCurvePublicKey:
    """The verification key from base64 DER (SendGrid's console form), PEM text, or a key object.

    ValueError when it is none of these or not an EC P-256 key.
    """
    if isinstance(key, ec.EllipticCurvePublicKey):
        loaded = key
    else:
        raw = key.encode("ascii") if isinstance(key, str) else bytes(key)
        if raw.lstrip().startswith(b"-----BEGIN"):
            loaded = serialization.load_pem_public_key(raw)
        else:
            try:
                der = base64.b64decode(b"".join(raw.split()), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError(f"not base64: {exc}") from exc
            loaded = serialization.load_der_public_key(der)
    if not isinstance(loaded, ec.EllipticCurvePublicKey) or not isinstance(loaded.curve, ec.SECP256R1):
        raise ValueError("the SendGrid Event Webhook key must be an ECDSA P-256 public key")
    return loaded


def verify_sendgrid_signature(public_key: ec.EllipticCurvePublicKey, payload: bytes,
                              signature: str | None, timestamp: str | None) -> bool:
    """True when `signature` (base64 DER ECDSA) signs `timestamp + payload` (the raw body bytes)."""
    if not signature or not timestamp:
        return False
    try:
        der_signature = base64.b64decode(signature.strip(), validate=True)
        public_key.verify(der_signature, timestamp.encode("utf-8") + payload, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError, UnicodeEncodeError):
        return False
    return True


def sendgrid_signature(private_key: ec.EllipticCurvePrivateKey, payload: bytes, timestamp: str) -> str:
    """The signature header SendGrid would send (the simulator's, and tests')."""
    der = private_key.sign(timestamp.encode("utf-8") + payload, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(der).decode("ascii")
