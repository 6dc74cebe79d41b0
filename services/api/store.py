"""The API's state: bearer tokens and channel settings. In the event store's PostgreSQL database when the
event store is PostgreSQL (tables `outreach_api_tokens`, `outreach_api_channel_settings`: every API
instance, and `outreach token` from any machine, sees the same), else in the API's own small SQLite file
(`data_dir/api.db`: one machine, one API). An `api.db` found beside a PostgreSQL deployment is imported once.

Tokens are kept only as SHA-256 hashes: a leaked file lets no one in. A token is 32 random bytes, so a
plain hash (no salt, no slow KDF) is enough: there is nothing to brute-force. Channel credentials are
kept as one Fernet token (AES-128-CBC + HMAC-SHA256) of their JSON; the key comes from
`OUTREACH_API_ENCRYPTION_KEY`, else from `data_dir/api-encryption.key`, generated once with mode 0600
(services/common/secrets.py: the sender and the webhook receiver decrypt with it too).
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from cryptography.fernet import Fernet, InvalidToken

from schemas.times import utc_now
from services.common import jsoncodec
from services.common.connections import ReconnectingConnection, created_meanwhile
from services.common.retry import retrying
from services.common.secrets import encryption_key
from services.common.sqlite import open_sqlite
from services.common.settings import Settings

FILE_NAME = "api.db"
TOKEN_PREFIX = "otk_"

Role = Literal["org_admin", "admin", "campaigner", "operations"]
ROLES: tuple[Role, ...] = get_args(Role)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {tokens} (
    token_id    TEXT PRIMARY KEY,
    token_hash  TEXT NOT NULL UNIQUE,
    principal   TEXT NOT NULL,
    role        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT,
    created_by  TEXT,               -- who made it (a principal, or cli:<OS user>); null before it was kept
    revoked_by  TEXT
);
CREATE TABLE IF NOT EXISTS {settings} (
    channel     TEXT PRIMARY KEY,
    provider    TEXT NOT NULL,
    credentials {blob} NOT NULL,    -- Fernet token of the credentials' JSON
    updated_by  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    settings_id TEXT                -- the ChannelSettingsChanged record's id (outreach.internal.channel-settings)
);
"""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: the name written in `issued_by`, and the role that decides access."""
    name: str
    role: Role
    token_id: str


@dataclass(frozen=True)
class TokenInfo:
    token_id: str
    principal: str
    role: str
    created_at: str
    revoked_at: str | None
    created_by: str | None = None
    revoked_by: str | None = None


_TOKEN_COLUMNS = "token_id, principal, role, created_at, revoked_at, created_by, revoked_by"


@dataclass(frozen=True)
class StoredChannelSettings:
    channel: str
    provider: str
    credentials: dict[str, str]
    updated_by: str
    updated_at: str
    settings_id: str | None = None


@dataclass(frozen=True)
class SealedChannelSettings:
    """Stored settings as kept (credentials still sealed): what the API republishes on the broker."""
    channel: str
    provider: str
    sealed_credentials: str  # the Fernet token of the credentials' JSON
    settings_id: str
    updated_at: str


class _Conn:
    """The store's one connection: SQL written with `?` placeholders and the tables' SQLite names, turned
    into the PostgreSQL dialect (`%s`, `outreach_api_*`) when it is PostgreSQL."""

    def __init__(self, connect: Any, postgres: bool):
        self._connection = ReconnectingConnection(connect)
        self.postgres = postgres

    def execute(self, sql: str, params: Any = ()) -> Any:
        if self.postgres:
            sql = (sql.replace("?", "%s").replace(" tokens ", " outreach_api_tokens ")
                   .replace(" channel_settings ", " outreach_api_channel_settings "))
        with self._connection.reconnecting():
            return self._connection.db.execute(sql, params)

    def close(self) -> None:
        self._connection.close()


class ApiStore:
    """Tokens and channel settings (see the module). Thread-safe (one connection, one lock)."""

    def __init__(self, path: Path | str | None = None, encryption_key: bytes | None = None, *,
                 postgres_dsn: str | None = None):
        self._lock = threading.Lock()
        if postgres_dsn is not None:
            import psycopg

            self.path = None
            self._conn = _Conn(lambda: psycopg.connect(postgres_dsn, autocommit=True, connect_timeout=5), True)
            schema = _SCHEMA.format(tokens="outreach_api_tokens", settings="outreach_api_channel_settings", blob="BYTEA")
            for statement in re.sub(r"--[^\n]*", "", schema).split(";"):  # comments hold semicolons
                if statement.strip():
                    self._retry_create(statement)
        else:
            self.path = Path(path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():  # private from the start (SQLite gives its -wal and -shm files the same mode)
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            # FULL: a token is shown once and settings are answered 200 once stored: a commit survives a power cut.
            sqlite = open_sqlite(self.path, synchronous="FULL", busy_timeout_s=30)
            sqlite.executescript(_SCHEMA.format(tokens="tokens", settings="channel_settings", blob="BLOB"))
            token_columns = {row[1] for row in sqlite.execute("PRAGMA table_info(tokens)")}
            for column in ("created_by", "revoked_by"):  # an api.db from before token audit
                if column not in token_columns:
                    sqlite.execute(f"ALTER TABLE tokens ADD COLUMN {column} TEXT")
            columns = {row[1] for row in sqlite.execute("PRAGMA table_info(channel_settings)")}
            if "settings_id" not in columns:  # an api.db from before the settings were published
                sqlite.execute("ALTER TABLE channel_settings ADD COLUMN settings_id TEXT")
            self._conn = _Conn(lambda: sqlite, False)
        self._fernet = Fernet(encryption_key) if encryption_key else None

    def _retry_create(self, statement: str) -> None:
        """PostgreSQL's IF NOT EXISTS races between instances creating one table: the loser finds it made."""
        for attempt in retrying(on=created_meanwhile, timeout_s=None, attempts=5):
            with attempt:
                self._conn.execute(statement)

    @classmethod
    def open(cls, settings: Settings, *, with_encryption: bool = True) -> ApiStore:
        key = encryption_key(settings) if with_encryption else None
        if settings.event_store != "postgres":
            return cls(settings.data_dir / FILE_NAME, key)
        store = cls(encryption_key=key, postgres_dsn=settings.postgres_dsn)
        local = settings.data_dir / FILE_NAME
        if local.exists():  # from before the API kept its state in PostgreSQL
            store.import_from(local)
            local.rename(local.with_suffix(".db.imported"))
        return store

    def import_from(self, path: Path) -> None:
        """Tokens and channel settings of an `api.db`, added where this store has none with their id."""
        old = open_sqlite(path)
        try:
            old_store_columns = {row[1] for row in old.execute("PRAGMA table_info(tokens)")}
            audit = "created_by, revoked_by" if "created_by" in old_store_columns else "NULL, NULL"
            tokens = old.execute(f"SELECT token_id, token_hash, principal, role, created_at, revoked_at, {audit} "
                                 "FROM tokens").fetchall()
            with_id = "settings_id" in {row[1] for row in old.execute("PRAGMA table_info(channel_settings)")}
            settings = old.execute("SELECT channel, provider, credentials, updated_by, updated_at, "
                                   f"{'settings_id' if with_id else 'NULL'} FROM channel_settings").fetchall()
        finally:
            old.close()
        with self._lock:
            for row in tokens:
                self._conn.execute("INSERT INTO tokens (token_id, token_hash, principal, role, created_at, revoked_at, "
                                   "created_by, revoked_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                                   "ON CONFLICT (token_id) DO NOTHING", row)
            for channel, provider, sealed, updated_by, updated_at, settings_id in settings:
                self._conn.execute("INSERT INTO channel_settings (channel, provider, credentials, updated_by, "
                                   "updated_at, settings_id) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (channel) DO NOTHING",
                                   (channel, provider, bytes(sealed), updated_by, updated_at, settings_id))

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> ApiStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ tokens

    def create_token(self, principal: str, role: str, *, created_by: str | None = None) -> tuple[str, TokenInfo]:
        """A new token for `principal` with `role`, made by `created_by`: (the token, shown once; its info)."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        principal = principal.strip()
        if not principal:
            raise ValueError("the principal name is empty")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        info = TokenInfo(token_id=secrets.token_hex(6), principal=principal, role=role, created_at=utc_now(),
                         revoked_at=None, created_by=created_by)
        with self._lock:
            self._conn.execute(
                "INSERT INTO tokens (token_id, token_hash, principal, role, created_at, created_by) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (info.token_id, hash_token(token), info.principal, info.role, info.created_at, created_by),
            )
        return token, info

    def authenticate(self, token: str) -> Principal | None:
        """The principal of a live token, or None (unknown or revoked)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT token_id, principal, role FROM tokens WHERE token_hash = ? AND revoked_at IS NULL",
                (hash_token(token),),
            ).fetchone()
        if row is None or row[2] not in ROLES:
            return None
        return Principal(name=row[1], role=row[2], token_id=row[0])

    def tokens(self, *, include_revoked: bool = False, roles: Iterable[str] | None = None) -> list[TokenInfo]:
        """Tokens, oldest first: live ones (or all), of every role (or of `roles` only)."""
        sql = f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE 1 = 1"
        params: list[str] = []
        if not include_revoked:
            sql += " AND revoked_at IS NULL"
        if roles is not None:
            wanted = sorted(set(roles))
            sql += f" AND role IN ({', '.join('?' * len(wanted))})" if wanted else " AND 0 = 1"
            params += wanted
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY created_at, token_id", params).fetchall()
        return [TokenInfo(*row) for row in rows]

    def token(self, token_id: str) -> TokenInfo | None:
        """One token's info (live or revoked), or None."""
        with self._lock:
            row = self._conn.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE token_id = ?",
                                     (token_id,)).fetchone()
        return None if row is None else TokenInfo(*row)

    def revoke_token(self, token_id: str, *, revoked_by: str | None = None) -> TokenInfo | None:
        """Revoke the token with this id only (never by principal name); a revoked one keeps its first
        revocation (time and who). Its info afterwards, or None if there is no such token."""
        with self._lock:
            self._conn.execute("UPDATE tokens SET revoked_at = ?, revoked_by = ? WHERE token_id = ? "
                               "AND revoked_at IS NULL", (utc_now(), revoked_by, token_id))
        return self.token(token_id)

    def revoke(self, token_id_or_principal: str, *, revoked_by: str | None = None) -> int:
        """Revoke the token with this id, else every live token of this principal; returns how many."""
        now = utc_now()
        with self._lock:
            cursor = self._conn.execute("UPDATE tokens SET revoked_at = ?, revoked_by = ? WHERE revoked_at IS NULL "
                                        "AND token_id = ?", (now, revoked_by, token_id_or_principal))
            if cursor.rowcount:
                return cursor.rowcount
            cursor = self._conn.execute(
                "UPDATE tokens SET revoked_at = ?, revoked_by = ? WHERE revoked_at IS NULL AND principal = ?",
                (now, revoked_by, token_id_or_principal))
            return cursor.rowcount

    # ------------------------------------------------------------------ channel settings

    def _cipher(self) -> Fernet:
        if self._fernet is None:
            raise RuntimeError("this store was opened without an encryption key")
        return self._fernet

    def save_channel_settings(self, channel: str, provider: str, credentials: dict[str, str],
                              updated_by: str) -> StoredChannelSettings:
        sealed = self._cipher().encrypt(jsoncodec.dumps(credentials))
        now = utc_now()
        settings_id = str(uuid.uuid4())
        with self._lock:
            self._conn.execute(
                "INSERT INTO channel_settings (channel, provider, credentials, updated_by, updated_at, settings_id) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (channel) DO UPDATE SET provider = excluded.provider, "
                "credentials = excluded.credentials, updated_by = excluded.updated_by, "
                "updated_at = excluded.updated_at, settings_id = excluded.settings_id",
                (channel, provider, sealed, updated_by, now, settings_id),
            )
        return StoredChannelSettings(channel, provider, dict(credentials), updated_by, now, settings_id)

    def sealed_channel_settings(self) -> list[SealedChannelSettings]:
        """Every channel's stored settings, credentials still sealed (nothing is decrypted)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT channel, provider, credentials, settings_id, updated_at FROM channel_settings "
                "ORDER BY channel").fetchall()
        # A row from before settings_id existed gets a stable one (the same on every start).
        return [SealedChannelSettings(channel, provider, bytes(sealed).decode("ascii"),
                                      settings_id or str(uuid.uuid5(uuid.NAMESPACE_URL, f"{channel}@{updated_at}")),
                                      updated_at)
                for channel, provider, sealed, settings_id, updated_at in rows]

    def channel_settings(self, channel: str) -> StoredChannelSettings | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT provider, credentials, updated_by, updated_at, settings_id FROM channel_settings "
                "WHERE channel = ?",
                (channel,),
            ).fetchone()
        if row is None:
            return None
        try:
            credentials = jsoncodec.loads(self._cipher().decrypt(row[1]))
        except InvalidToken:
            raise CredentialsUnreadable(
                f"the stored {channel} credentials cannot be decrypted with the current key "
                "(OUTREACH_API_ENCRYPTION_KEY or data_dir/api-encryption.key changed?)") from None
        return StoredChannelSettings(channel, row[0], credentials, row[2], row[3], row[4])

    def raw_credentials(self, channel: str) -> bytes | None:
        """The stored (encrypted) bytes, for tests that check nothing is kept in clear."""
        with self._lock:
            row = self._conn.execute("SELECT credentials FROM channel_settings WHERE channel = ?",
                                     (channel,)).fetchone()
        return None if row is None else bytes(row[0])


class CredentialsUnreadable(RuntimeError):
    """Stored credentials do not decrypt with the key in use."""


def token_store(settings: Settings) -> ApiStore:
    """The store for token commands (no encryption key needed, none created)."""
    return ApiStore.open(settings, with_encryption=False)
