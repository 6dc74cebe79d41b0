"""API tokens over real HTTP (`POST/GET /tokens`, `DELETE /tokens/{id}`), by the product's roles: org_admin
manages every role's tokens, admin only campaigner tokens, campaigner and operations none; and the same tokens
as `outreach token create|list|revoke` (api.db), both ways."""
from __future__ import annotations

import json
import sqlite3

import httpx
import pytest
from typer.testing import CliRunner

from outreach.cli import app as cli_app
from services.api.app import BackgroundServer, create_app
from services.api.store import ROLES, ApiStore, hash_token
from services.common.settings import Settings


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    # No command is published here: the broker is never contacted (the publisher starts on first use).
    return Settings(data_dir=tmp_path_factory.mktemp("api-tokens"))


@pytest.fixture(scope="module")
def tokens(settings) -> dict[str, str]:
    with ApiStore.open(settings) as store:
        return {role: store.create_token(f"{role}-user", role)[0] for role in ROLES}


@pytest.fixture(scope="module")
def server(settings, tokens):
    with BackgroundServer(create_app(settings, answer_wait_s=0)) as running:
        yield running


@pytest.fixture(scope="module")
def clients(server, tokens):
    opened = {role: httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {token}"})
              for role, token in tokens.items()}
    opened["anonymous"] = httpx.Client(base_url=server.url, timeout=30)
    yield opened
    for client in opened.values():
        client.close()


def can_read_campaigns(server, token: str) -> int:
    return httpx.get(f"{server.url}/campaigns", headers={"Authorization": f"Bearer {token}"}).status_code


def listed_ids(client: httpx.Client, **params) -> list[str]:
    response = client.get("/tokens", params=params)
    assert response.status_code == 200, response.text
    return [t["token_id"] for t in response.json()]


def test_org_admin_creates_lists_and_revokes_every_role(server, clients, settings):
    org_admin = clients["org_admin"]
    made = {}
    for role in ROLES:
        response = org_admin.post("/tokens", json={"name": f"made-{role}", "role": role})
        assert response.status_code == 201, response.text
        assert response.headers["cache-control"] == "no-store"  # a secret: no cache keeps the answer
        body = response.json()
        assert body["role"] == role and body["principal"] == f"made-{role}" and body["revoked_at"] is None
        assert body["created_by"] == "org_admin-user" and body["revoked_by"] is None  # who made it, for audit
        assert body["token"].startswith("otk_") and len(body["token"]) > 40
        made[role] = body
    # each token works as its role: operations has no access to campaigns
    assert {role: can_read_campaigns(server, made[role]["token"]) for role in ROLES} == {
        "org_admin": 200, "admin": 200, "campaigner": 200, "operations": 403}
    listing = org_admin.get("/tokens")
    assert listing.status_code == 200
    by_id = {t["token_id"]: t for t in listing.json()}
    for role, body in made.items():
        assert by_id[body["token_id"]] == {k: v for k, v in body.items() if k != "token"}
        assert body["token"] not in listing.text and hash_token(body["token"]) not in listing.text
    assert {t["role"] for t in listing.json()} == set(ROLES)
    assert all(set(t) == {"token_id", "principal", "role", "created_at", "revoked_at", "created_by", "revoked_by"}
               for t in listing.json())
    # stored as a hash only
    database = settings.data_dir / "api.db"
    wal = database.with_name("api.db-wal")
    raw = database.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert made["admin"]["token"].encode() not in raw and hash_token(made["admin"]["token"]).encode() in raw

    revoked_at = {}
    for role in ROLES:
        revoked = org_admin.delete(f"/tokens/{made[role]['token_id']}")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"], revoked.text
        assert revoked.json()["revoked_by"] == "org_admin-user"
        revoked_at[role] = revoked.json()["revoked_at"]
        assert can_read_campaigns(server, made[role]["token"]) == 401  # at once
    assert not set(listed_ids(org_admin)) & {b["token_id"] for b in made.values()}
    assert {b["token_id"] for b in made.values()} <= set(listed_ids(org_admin, include_revoked="true"))
    # a retried DELETE answers the same revocation again (its first time kept)
    first = org_admin.delete(f"/tokens/{made['admin']['token_id']}")
    again = org_admin.delete(f"/tokens/{made['admin']['token_id']}")
    assert first.status_code == again.status_code == 200 and again.json() == first.json()
    assert again.json()["revoked_at"] == revoked_at["admin"]


def test_admin_manages_only_campaigner_tokens(server, clients, tokens):
    admin, org_admin = clients["admin"], clients["org_admin"]
    before = listed_ids(org_admin)
    for role in ("org_admin", "admin", "operations"):
        refused = admin.post("/tokens", json={"name": f"admin-made-{role}", "role": role})
        assert refused.status_code == 403 and role in refused.json()["detail"], refused.text
    assert listed_ids(org_admin) == before  # nothing was created

    campaigner = admin.post("/tokens", json={"name": "casey", "role": "campaigner"})
    assert campaigner.status_code == 201, campaigner.text
    made = campaigner.json()
    assert can_read_campaigns(server, made["token"]) == 200

    listing = admin.get("/tokens", params={"include_revoked": True}).json()
    assert listing and {t["role"] for t in listing} == {"campaigner"}  # though every role has tokens
    assert made["token_id"] in [t["token_id"] for t in listing]
    every = org_admin.get("/tokens").json()
    assert {t["role"] for t in every} == set(ROLES)

    # revoking another role's token: 403, and the token still works
    others = {t["role"]: t["token_id"] for t in every if t["principal"].endswith("-user")}
    for role in ("org_admin", "admin", "operations"):
        refused = admin.delete(f"/tokens/{others[role]}")
        assert refused.status_code == 403, refused.text
    assert can_read_campaigns(server, tokens["org_admin"]) == 200
    assert can_read_campaigns(server, tokens["admin"]) == 200
    assert admin.delete(f"/tokens/{made['token_id']}").status_code == 200
    assert can_read_campaigns(server, made["token"]) == 401


def test_campaigner_operations_and_anonymous_have_no_access(clients, settings):
    with ApiStore.open(settings) as store:
        target = store.create_token("target", "campaigner")[1].token_id
    for who, expected in (("campaigner", 403), ("operations", 403), ("anonymous", 401)):
        client = clients[who]
        responses = [client.post("/tokens", json={"name": "x", "role": "campaigner"}), client.get("/tokens"),
                     client.delete(f"/tokens/{target}")]
        assert [r.status_code for r in responses] == [expected] * 3, (who, [r.text for r in responses])
    assert target in listed_ids(clients["org_admin"])  # not revoked


def test_bad_requests(clients):
    org_admin = clients["org_admin"]
    for body in ({"name": "x", "role": "superuser"}, {"name": "", "role": "admin"}, {"name": "   ", "role": "admin"},
                 {"name": "x" * 201, "role": "admin"}, {"name": "line\nbreak", "role": "admin"}, {"role": "admin"},
                 {"name": "x"}, {"name": 7, "role": "admin"}):
        response = org_admin.post("/tokens", json=body)
        assert response.status_code == 422, (body, response.text)
    assert org_admin.delete("/tokens/0123456789ab").status_code == 404  # well formed, unknown
    assert org_admin.delete("/tokens/NOT-AN-ID").status_code == 422
    # an admin asking for an unknown role's token: the body is wrong before the role is (422, not 403)
    assert clients["admin"].post("/tokens", json={"name": "x", "role": "root"}).status_code == 422


def test_tokens_made_over_http_and_by_the_cli_are_the_same_tokens(server, clients, settings, monkeypatch):
    monkeypatch.setenv("OUTREACH_DATA_DIR", str(settings.data_dir))
    runner = CliRunner()
    org_admin = clients["org_admin"]
    over_http = org_admin.post("/tokens", json={"name": "http-made", "role": "admin"}).json()
    listed = runner.invoke(cli_app, ["token", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert {"token_id": over_http["token_id"], "principal": "http-made", "role": "admin",
            "created_at": over_http["created_at"], "revoked_at": None, "created_by": "org_admin-user",
            "revoked_by": None} in json.loads(listed.output)
    assert runner.invoke(cli_app, ["token", "revoke", over_http["token_id"]]).exit_code == 0
    [revoked_by_cli] = [t for t in org_admin.get("/tokens", params={"include_revoked": "true"}).json()
                        if t["token_id"] == over_http["token_id"]]
    assert revoked_by_cli["revoked_by"].startswith("cli:")  # the terminal's user: the CLI has no token
    assert can_read_campaigns(server, over_http["token"]) == 401

    created = runner.invoke(cli_app, ["token", "create", "cli-made", "--role", "campaigner", "--json"])
    assert created.exit_code == 0, created.output
    by_cli = json.loads(created.output)
    assert by_cli["token_id"] in listed_ids(org_admin) and by_cli["token_id"] in listed_ids(clients["admin"])
    assert can_read_campaigns(server, by_cli["token"]) == 200
    assert by_cli["created_by"].startswith("cli:")
    revoked_by_admin = clients["admin"].delete(f"/tokens/{by_cli['token_id']}")
    assert revoked_by_admin.status_code == 200 and revoked_by_admin.json()["revoked_by"] == "admin-user"
    assert can_read_campaigns(server, by_cli["token"]) == 401
    # HTTP revokes by id only: a principal's name is not an id (the CLI's `revoke NAME` stays the CLI's)
    assert org_admin.delete("/tokens/cli-made").status_code == 422


def test_an_api_db_from_before_token_audit_opens_and_keeps_its_tokens(tmp_path):
    path = tmp_path / "api.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE tokens (token_id TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE, principal TEXT "
                "NOT NULL, role TEXT NOT NULL, created_at TEXT NOT NULL, revoked_at TEXT)")
    old.execute("INSERT INTO tokens VALUES ('t1', ?, 'ada', 'admin', '2026-01-01T00:00:00.000000Z', NULL)",
                (hash_token("otk_old"),))
    old.commit()
    old.close()
    with ApiStore(path) as store:
        assert store.authenticate("otk_old").name == "ada"
        [info] = store.tokens()
        assert (info.created_by, info.revoked_by) == (None, None)  # not known for tokens made before
        assert store.revoke_token("t1", revoked_by="grace").revoked_by == "grace"
