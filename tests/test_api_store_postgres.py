"""The API's state in PostgreSQL (issue 11): every API instance, and `outreach token` from any machine, sees
the same tokens and channel settings; an `api.db` from before is imported once."""
from __future__ import annotations

from cryptography.fernet import Fernet

from services.api.store import ApiStore
from services.common.settings import Settings
from tests.conftest import fresh_postgres_database


def test_two_api_instances_share_tokens_and_channel_settings(postgres_dsn, tmp_path):
    settings = Settings(event_store="postgres", postgres_dsn=fresh_postgres_database(), data_dir=tmp_path,
                        api_encryption_key=Fernet.generate_key().decode())
    with ApiStore.open(settings) as first, ApiStore.open(settings) as second:
        token, info = first.create_token("grace", "campaigner", created_by="cli:root")
        assert second.authenticate(token).name == "grace"  # made on one, accepted by the other
        second.save_channel_settings("sms", "twilio", {"account_sid": "AC1", "auth_token": "secret"}, "olga")
        assert first.channel_settings("sms").credentials["auth_token"] == "secret"
        assert b"secret" not in first.raw_credentials("sms")  # sealed in the database too
        assert first.revoke(info.token_id, revoked_by="olga") == 1 and second.authenticate(token) is None
    assert not (tmp_path / "api.db").exists()  # nothing of it on this machine's disk


def test_an_api_db_from_before_is_imported_once(postgres_dsn, tmp_path):
    key = Fernet.generate_key().decode()
    with ApiStore(tmp_path / "api.db", key.encode()) as old:
        token, _ = old.create_token("ada", "org_admin")
        old.save_channel_settings("email", "sendgrid", {"api_key": "SG.x"}, "ada")
    settings = Settings(event_store="postgres", postgres_dsn=fresh_postgres_database(), data_dir=tmp_path,
                        api_encryption_key=key)
    with ApiStore.open(settings) as store:
        assert store.authenticate(token).role == "org_admin"
        assert store.channel_settings("email").credentials == {"api_key": "SG.x"}
    assert not (tmp_path / "api.db").exists() and (tmp_path / "api.db.imported").exists()
    with ApiStore.open(settings) as again:  # the next start imports nothing more, loses nothing
        assert again.authenticate(token) is not None and len(again.tokens()) == 1
