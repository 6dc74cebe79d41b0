"""The API's state: bearer tokens, channel settings, and the web console's people (accounts, sign-in sessions,
the sign-in throttle, the audit log of account and settings changes). In the event store's PostgreSQL database
when the event store is PostgreSQL (tables `outreach_api_tokens`, `outreach_api_channel_settings`,
`outreach_api_users`...: every API instance, and `outreach token` from any machine, sees the same), else in the
API's own small SQLite file (`data_dir/api.db`: one machine, one API). An `api.db` found beside a PostgreSQL
deployment is imported once (its console sessions excepted).

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
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, get_args

from cryptography.fernet import Fernet, InvalidToken

from schemas.times import rfc3339, utc_now
from services.api.passwords import hash_password, needs_rehash, verify_password
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

# The console's people (services/api/console): accounts, their sign-in sessions, the sign-in throttle, and the
# audit log of account and settings changes. {p} is the tables' prefix (outreach_api_ on PostgreSQL).
_ACCOUNTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS {p}users (
    username      TEXT PRIMARY KEY,     -- lower case (usernames are compared without case)
    role          TEXT NOT NULL,
    password_hash TEXT NOT NULL,        -- Argon2id (services/api/passwords.py)
    created_by    TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    disabled_at   TEXT,                 -- null: may sign in
    disabled_by   TEXT
);
CREATE TABLE IF NOT EXISTS {p}console_sessions (
    session_hash  TEXT PRIMARY KEY,     -- SHA-256 of the cookie's random id: a leaked store signs no one in
    username      TEXT NOT NULL,
    csrf_token    TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    last_seen_at  TEXT NOT NULL,
    expires_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS {p}sign_in_failures (
    username      TEXT NOT NULL,        -- as typed (lower case), known or not
    client        TEXT NOT NULL,        -- the client's address
    failed_at     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS {p}sign_in_locks (
    username      TEXT NOT NULL,
    client        TEXT NOT NULL,
    locked_until  TEXT NOT NULL,
    PRIMARY KEY (username, client)
);
CREATE TABLE IF NOT EXISTS {p}account_audit (
    audit_id      TEXT PRIMARY KEY,
    at            TEXT NOT NULL,
    actor         TEXT NOT NULL,        -- user:NAME (console), cli:<OS user>, a token's principal
    action        TEXT NOT NULL,        -- one of AUDIT_ACTIONS
    subject       TEXT NOT NULL,        -- the username, or the channel whose settings changed
    detail        TEXT NOT NULL         -- what changed (never a secret)
);
CREATE INDEX IF NOT EXISTS {p}account_audit_newest ON {p}account_audit (at, audit_id)
"""
_ACCOUNT_TABLES = ("users", "console_sessions", "sign_in_failures", "sign_in_locks", "account_audit")
AUDIT_ACTIONS = ("user_created", "user_disabled", "user_enabled", "role_changed", "password_changed",
                 "sign_in_locked", "channel_settings_changed", "opt_out_added", "opt_out_removed")
USERNAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")
# Console users act as `user:NAME` (issued_by, updated_by, the audit log); API tokens keep their bare principal
# name, as before the console. Token names may not take the console's (or the CLI's) prefix.
USER_PRINCIPAL_PREFIX = "user:"
RESERVED_TOKEN_PREFIXES = (USER_PRINCIPAL_PREFIX, "cli:")


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


def normalize_username(username: str) -> str:
    """Usernames are kept and compared in lower case, without surrounding blanks."""
    return username.strip().lower()


def user_principal(username: str) -> str:
    """The principal a console user acts as: `user:NAME` (issued_by, updated_by, the audit log)."""
    return USER_PRINCIPAL_PREFIX + username


@dataclass(frozen=True)
class UserInfo:
    """A console account (never its password hash)."""
    username: str
    role: str
    created_by: str
    created_at: str
    disabled_at: str | None
    disabled_by: str | None

    @property
    def principal(self) -> str:
        return user_principal(self.username)


_USER_COLUMNS = "username, role, created_by, created_at, disabled_at, disabled_by"


@dataclass(frozen=True)
class SessionInfo:
    """A console session as stored (its id is only in the cookie), with its account's current role."""
    username: str
    role: str
    csrf_token: str
    created_at: str
    last_seen_at: str
    expires_at: str

    @property
    def principal(self) -> str:
        return user_principal(self.username)


@dataclass(frozen=True)
class AuditEntry:
    at: str
    actor: str
    action: str
    subject: str
    detail: str
    audit_id: str


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
            for table in _ACCOUNT_TABLES:
                sql = sql.replace(f" {table} ", f" outreach_api_{table} ")
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
            schema += ";" + _ACCOUNTS_SCHEMA.format(p="outreach_api_")
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
            sqlite.executescript(_ACCOUNTS_SCHEMA.format(p=""))  # an api.db from before the console gets them
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
            old_tables = {row[0] for row in old.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            users = old.execute("SELECT username, role, password_hash, created_by, created_at, disabled_at, "
                                "disabled_by FROM users").fetchall() if "users" in old_tables else []
            audit_rows = old.execute("SELECT audit_id, at, actor, action, subject, detail FROM account_audit"
                                     ).fetchall() if "account_audit" in old_tables else []
        finally:
            old.close()
        with self._lock:
            # Console users and their audit log come along; their sessions do not (they sign in again).
            for row in users:
                self._conn.execute("INSERT INTO users (username, role, password_hash, created_by, created_at, "
                                   "disabled_at, disabled_by) VALUES (?, ?, ?, ?, ?, ?, ?) "
                                   "ON CONFLICT (username) DO NOTHING", row)
            for row in audit_rows:
                self._conn.execute("INSERT INTO account_audit (audit_id, at, actor, action, subject, detail) "
                                   "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (audit_id) DO NOTHING", row)
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
        if principal.lower().startswith(RESERVED_TOKEN_PREFIXES):
            raise ValueError(f"a token's name may not start with {' or '.join(RESERVED_TOKEN_PREFIXES)} (the "
                             "console's users and the CLI's operators are named so)")
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

    # ------------------------------------------------------------------ console users

    def create_user(self, username: str, role: str, password: str, *, created_by: str) -> UserInfo:
        """A new console account. ValueError: a malformed name, an unknown role, a refused password, a name taken."""
        username = normalize_username(username)
        if not USERNAME_PATTERN.match(username):
            raise ValueError(f"username {username!r}: 1 to 64 of a-z, 0-9, '.', '_', '@', '-', starting with a "
                             "letter or digit")
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        password_hash = hash_password(password)
        now = utc_now()
        with self._lock:
            cursor = self._conn.execute(
                "INSERT INTO users (username, role, password_hash, created_by, created_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (username) DO NOTHING", (username, role, password_hash, created_by, now))
            if not cursor.rowcount:
                raise ValueError(f"user {username!r} exists already")
            self._audit(created_by, "user_created", username, f"role {role}", now)
        return UserInfo(username, role, created_by, now, None, None)

    def user(self, username: str) -> UserInfo | None:
        with self._lock:
            row = self._conn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE username = ?",
                                     (normalize_username(username),)).fetchone()
        return None if row is None else UserInfo(*row)

    def users(self) -> list[UserInfo]:
        """Every account (disabled ones too), by name."""
        with self._lock:
            rows = self._conn.execute(f"SELECT {_USER_COLUMNS} FROM users ORDER BY username").fetchall()
        return [UserInfo(*row) for row in rows]

    def check_password(self, username: str, password: str) -> UserInfo | None:
        """The account, when the password is its own and it is not disabled; else None, after as long a check
        (an unknown name checks a dummy hash: the answer's time tells no one which names exist)."""
        username = normalize_username(username)
        with self._lock:
            row = self._conn.execute(f"SELECT {_USER_COLUMNS}, password_hash FROM users WHERE username = ?",
                                     (username,)).fetchone()
        stored_hash = row[-1] if row is not None else None
        if not verify_password(stored_hash, password) or row[4] is not None:
            return None
        if needs_rehash(stored_hash):  # hashed with older parameters: today's from now on
            with self._lock:
                self._conn.execute("UPDATE users SET password_hash = ? WHERE username = ?",
                                   (hash_password(password), username))
        return UserInfo(*row[:-1])

    def set_password(self, username: str, password: str, *, changed_by: str,
                     keep_session: str | None = None) -> None:
        """A new password; every session of the user ends but `keep_session` (the one that changed it)."""
        username = normalize_username(username)
        password_hash = hash_password(password)
        now = utc_now()
        with self._lock:
            if not self._conn.execute("UPDATE users SET password_hash = ? WHERE username = ?",
                                      (password_hash, username)).rowcount:
                raise ValueError(f"no user {username!r}")
            self._conn.execute("DELETE FROM console_sessions WHERE username = ? AND session_hash <> ?",
                               (username, hash_token(keep_session) if keep_session else ""))
            self._audit(changed_by, "password_changed", username, "", now)

    def set_disabled(self, username: str, disabled: bool, *, by: str) -> UserInfo:
        """Disable (its sessions end at once) or enable an account; no change, no audit entry."""
        username = normalize_username(username)
        now = utc_now()
        with self._lock:
            if disabled:
                changed = self._conn.execute("UPDATE users SET disabled_at = ?, disabled_by = ? WHERE username = ? "
                                             "AND disabled_at IS NULL", (now, by, username)).rowcount
                self._conn.execute("DELETE FROM console_sessions WHERE username = ?", (username,))
            else:
                changed = self._conn.execute("UPDATE users SET disabled_at = NULL, disabled_by = NULL "
                                             "WHERE username = ? AND disabled_at IS NOT NULL", (username,)).rowcount
            if changed:
                self._audit(by, "user_disabled" if disabled else "user_enabled", username, "", now)
        info = self.user(username)
        if info is None:
            raise ValueError(f"no user {username!r}")
        return info

    def set_role(self, username: str, role: str, *, by: str) -> UserInfo:
        """A new role, in force from the user's next request (sessions read the role each time)."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        before = self.user(username)
        if before is None:
            raise ValueError(f"no user {username!r}")
        if before.role != role:
            with self._lock:
                self._conn.execute("UPDATE users SET role = ? WHERE username = ?", (role, before.username))
                self._audit(by, "role_changed", before.username, f"{before.role} -> {role}", utc_now())
        return self.user(username)

    # ------------------------------------------------------------------ console sessions

    def create_session(self, username: str, now: datetime, lifetime: timedelta) -> tuple[str, SessionInfo]:
        """A new session (expired ones are swept meanwhile): (its id, for the cookie only; its info)."""
        session_id = secrets.token_urlsafe(32)
        info = SessionInfo(username=normalize_username(username), role="", csrf_token=secrets.token_urlsafe(32),
                           created_at=rfc3339(now), last_seen_at=rfc3339(now), expires_at=rfc3339(now + lifetime))
        with self._lock:
            self._conn.execute("DELETE FROM console_sessions WHERE expires_at <= ?", (rfc3339(now),))
            self._conn.execute(
                "INSERT INTO console_sessions (session_hash, username, csrf_token, created_at, last_seen_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (hash_token(session_id), info.username, info.csrf_token, info.created_at, info.last_seen_at,
                 info.expires_at))
        return session_id, info

    def session(self, session_id: str) -> SessionInfo | None:
        """A session of an enabled account (with the account's role of now), or None; expiry is the caller's."""
        with self._lock:
            row = self._conn.execute(
                "SELECT s.username, u.role, s.csrf_token, s.created_at, s.last_seen_at, s.expires_at "
                "FROM console_sessions s JOIN users u ON u.username = s.username "
                "WHERE s.session_hash = ? AND u.disabled_at IS NULL", (hash_token(session_id),)).fetchone()
        return None if row is None else SessionInfo(*row)

    def touch_session(self, session_id: str, now: datetime) -> None:
        with self._lock:
            self._conn.execute("UPDATE console_sessions SET last_seen_at = ? WHERE session_hash = ?",
                               (rfc3339(now), hash_token(session_id)))

    def end_session(self, session_id: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM console_sessions WHERE session_hash = ?", (hash_token(session_id),))

    def session_count(self, username: str) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM console_sessions WHERE username = ?",
                                      (normalize_username(username),)).fetchone()[0]

    # ------------------------------------------------------------------ sign-in throttle

    def sign_in_locked(self, username: str, client: str, now: datetime) -> bool:
        with self._lock:
            row = self._conn.execute("SELECT locked_until FROM sign_in_locks WHERE username = ? AND client = ?",
                                     (normalize_username(username), client)).fetchone()
        return row is not None and row[0] > rfc3339(now)

    def record_sign_in_failure(self, username: str, client: str, now: datetime, *, limit: int,
                               window: timedelta, lock_for: timedelta) -> bool:
        """Count a failed sign-in of this (username, client) pair; the `limit`-th within `window` locks the pair
        for `lock_for` (audited). True when it is locked now."""
        username = normalize_username(username)
        with self._lock:
            self._conn.execute("DELETE FROM sign_in_failures WHERE failed_at <= ?", (rfc3339(now - window),))
            self._conn.execute("INSERT INTO sign_in_failures (username, client, failed_at) VALUES (?, ?, ?)",
                               (username, client, rfc3339(now)))
            failures = self._conn.execute("SELECT COUNT(*) FROM sign_in_failures WHERE username = ? AND client = ?",
                                          (username, client)).fetchone()[0]
            if failures < limit:
                return False
            self._conn.execute("DELETE FROM sign_in_failures WHERE username = ? AND client = ?", (username, client))
            self._conn.execute(
                "INSERT INTO sign_in_locks (username, client, locked_until) VALUES (?, ?, ?) "
                "ON CONFLICT (username, client) DO UPDATE SET locked_until = excluded.locked_until",
                (username, client, rfc3339(now + lock_for)))
            self._audit("console", "sign_in_locked", username,
                        f"{failures} failed sign-ins from {client}; locked until {rfc3339(now + lock_for)}",
                        utc_now())
            return True

    def clear_sign_in_failures(self, username: str, client: str) -> None:
        """A successful sign-in forgets the pair's earlier failures."""
        with self._lock:
            self._conn.execute("DELETE FROM sign_in_failures WHERE username = ? AND client = ?",
                               (normalize_username(username), client))

    # ------------------------------------------------------------------ audit log

    def _audit(self, actor: str, action: str, subject: str, detail: str, at: str) -> None:
        """One audit entry; the caller holds the lock."""
        self._conn.execute("INSERT INTO account_audit (audit_id, at, actor, action, subject, detail) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (uuid.uuid4().hex, at, actor, action, subject, detail))

    def record_audit(self, actor: str, action: str, subject: str, detail: str, *, audit_id: str) -> bool:
        """One audit entry of a change made elsewhere (an opt-out added or removed by hand: `subject` CHANNEL:
        DESTINATION, `detail` the removal's reason), under `audit_id`: the same id again (a retried request) adds
        nothing. True when it was added."""
        if action not in AUDIT_ACTIONS:
            raise ValueError(f"unknown audit action {action!r}")
        with self._lock:
            cursor = self._conn.execute("INSERT INTO account_audit (audit_id, at, actor, action, subject, detail) "
                                        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (audit_id) DO NOTHING",
                                        (audit_id, utc_now(), actor, action, subject, detail))
            return cursor.rowcount == 1

    def audit_entry(self, audit_id: str) -> AuditEntry | None:
        with self._lock:
            row = self._conn.execute("SELECT at, actor, action, subject, detail, audit_id FROM account_audit "
                                     "WHERE audit_id = ?", (audit_id,)).fetchone()
        return AuditEntry(*row) if row else None

    def audit_log(self, *, subject: str | None = None, limit: int = 200) -> list[AuditEntry]:
        """Account and settings changes, newest first (of one user or channel, or of all)."""
        sql, params = "SELECT at, actor, action, subject, detail, audit_id FROM account_audit", []
        if subject is not None:
            sql += " WHERE subject = ?"
            params.append(subject)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY at DESC, audit_id DESC LIMIT ?", [*params, limit]).fetchall()
        return [AuditEntry(*row) for row in rows]

    def audit_page(self, *, after: tuple[str, str] | None = None, limit: int = 50,
                   of_roles: Iterable[str] | None = None) -> list[AuditEntry]:
        """One page of the audit log, newest first: the `limit` entries that follow `after` (the last shown
        entry's (at, audit_id); None: from the newest). Keyset paging: a page costs the same however deep.
        `of_roles`: only the entries about accounts that have one of these roles now (None: every entry)."""
        sql, conditions, params = "SELECT at, actor, action, subject, detail, audit_id FROM account_audit", [], []
        if after is not None:
            conditions.append("(at, audit_id) < (?, ?)")
            params += list(after)
        if of_roles is not None:
            roles = sorted(of_roles) or [""]
            conditions.append(f"subject IN (SELECT username FROM users WHERE role IN ({', '.join('?' * len(roles))}))")
            params += roles
        if conditions:
            sql += " WHERE " + " AND ".join(conditions)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY at DESC, audit_id DESC LIMIT ?", [*params, limit]).fetchall()
        return [AuditEntry(*row) for row in rows]

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
            self._audit(updated_by, "channel_settings_changed", channel, f"provider {provider}", now)
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
