"""The Fernet key that seals channel credentials: in api.db (the API) and on the channel-settings topic
(read by the sender and the webhook receiver, which must decrypt with the same key).

`OUTREACH_API_ENCRYPTION_KEY`, else `data_dir/api-encryption.key`, generated once (mode 0600). `outreach up`
runs every service on one data_dir, so they share the file; services on separate disks (docker-compose)
must all be given the same OUTREACH_API_ENCRYPTION_KEY.
"""
from __future__ import annotations

import os
import secrets

from cryptography.fernet import Fernet

from services.common.settings import Settings

KEY_FILE_NAME = "api-encryption.key"


def encryption_key(settings: Settings) -> bytes:
    """The Fernet key: the setting, else the key file, created once (0600) if missing."""
    if settings.api_encryption_key is not None:
        key = settings.api_encryption_key.get_secret_value().encode()
        Fernet(key)  # a malformed key fails here, at start, not at the first use
        return key
    path = settings.data_dir / KEY_FILE_NAME
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole to a private temporary file, then linked into place: link() fails if the key exists, so
    # two processes starting together agree on one key, and no one ever reads a half-written file.
    temporary = path.with_name(f".{KEY_FILE_NAME}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(Fernet.generate_key())
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
    finally:
        temporary.unlink(missing_ok=True)
    return path.read_bytes().strip()


def cipher(settings: Settings) -> Fernet:
    return Fernet(encryption_key(settings))
