"""The web console's sign-in for people (issue 14, item 2) over real HTTP: sessions in the API's store, the CSRF
token on every unsafe request, expiry by lifetime and by idleness (on a clock the test moves), the sign-in
throttle and its one generic message, a password change signing out the user's other sessions, sign-out; and
`outreach user create` (its prompt and --password-stdin), the `user:NAME` principal, the audit log."""
from __future__ import annotations

import re
import statistics
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from cryptography.fernet import Fernet
from typer.testing import CliRunner

from outreach.cli import app as cli_app
from services.api.app import BackgroundServer, create_app
from services.api.console.routes import (LOCK_DURATION, LOCK_FAILURES, SESSION_COOKIE, SIGN_IN_COOKIE,
                                         SIGN_IN_REFUSED, ConsoleSession)
from services.api.store import ApiStore, hash_token
from services.common.settings import Settings
from tests.conftest import fresh_postgres_database

PASSWORD = "correct horse battery"
NEW_PASSWORD = "staple of a longer phrase"


class Clock:
    """The console's clock: real time, plus what a test adds."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    # No command is published: the broker is never contacted. Sessions: 2 hours, 30 minutes idle.
    return Settings(data_dir=tmp_path_factory.mktemp("console"), console_session_hours=2, console_idle_minutes=30)


@pytest.fixture(scope="module")
def store(settings):
    with ApiStore.open(settings) as opened:
        yield opened


@pytest.fixture(scope="module")
def running(settings, store):
    app = create_app(settings, store=store, answer_wait_s=0)
    app.state.console.now = (clock := Clock()).now
    with BackgroundServer(app) as server:
        yield server, clock


@pytest.fixture
def server(running):
    return running[0]


@pytest.fixture
def clock(running):
    running[1].offset = timedelta()
    return running[1]


@pytest.fixture
def browser(server):
    with httpx.Client(base_url=server.url, timeout=30, follow_redirects=False) as client:
        yield client


@pytest.fixture
def make_user(store):
    def make(name: str, role: str = "campaigner") -> str:
        store.create_user(name, role, PASSWORD, created_by="cli:test")
        return name

    return make


def form_token(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


def sign_in(client: httpx.Client, username: str, password: str = PASSWORD) -> httpx.Response:
    form = client.get("/console/sign-in")
    assert form.status_code == 200, form.text
    return client.post("/console/sign-in", data={"username": username, "password": password,
                                                 "csrf_token": form_token(form.text)})


def is_signed_in(client: httpx.Client) -> bool:
    home = client.get("/console/")
    if home.status_code == 303:
        assert home.headers["location"] == "/console/sign-in"
        return False
    assert home.status_code == 200, home.text
    return True


def page_token(client: httpx.Client) -> str:
    return form_token(client.get("/console/").text)


def test_sign_in_opens_a_session_that_says_who_and_which_role(browser, make_user, store):
    make_user("ada", "org_admin")
    assert not is_signed_in(browser)
    answer = sign_in(browser, "Ada")  # usernames are compared without case
    assert answer.status_code == 303 and answer.headers["location"] == "/console/"
    cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE + "="))
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "path", "max-age"} <= attributes and "secure" not in attributes  # http: no Secure
    assert "samesite=lax" in cookie.lower() and "path=/console" in cookie.lower()
    home = browser.get("/console/")
    assert home.status_code == 200 and home.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in home.headers["content-security-policy"]
    assert '<strong class="username">ada</strong>' in home.text and '<strong class="role">org_admin</strong>' in home.text
    assert "<code>user:ada</code>" in home.text  # the principal the user's changes are recorded as
    session_id = browser.cookies[SESSION_COOKIE]
    session = ConsoleSession(session_id, store.session(session_id))
    assert session.principal.name == "user:ada" and session.principal.role == "org_admin"
    # only a hash of the session id is stored: the store's file does not sign anyone in
    assert session_id.encode() not in store.path.read_bytes() and store.session(hash_token(session_id)) is None
    assert browser.get("/console/sign-in").status_code == 303  # signed in already: to the console
    stylesheet = browser.get("/console/static/console.css")  # the console's own, no CDN
    assert stylesheet.status_code == 200 and stylesheet.headers["content-type"].startswith("text/css")


def test_a_wrong_password_and_an_unknown_user_get_the_same_answer(browser, make_user):
    make_user("bea")
    wrong = sign_in(browser, "bea", "not the password at all")
    unknown = sign_in(browser, "nobody-here", PASSWORD)
    for answer in (wrong, unknown):
        assert answer.status_code == 403 and SIGN_IN_REFUSED in answer.text
        assert not any(c.startswith(SESSION_COOKIE + "=") for c in answer.headers.get_list("set-cookie"))
    assert not is_signed_in(browser)
    echoed = sign_in(browser, '"><script>alert(1)</script>')  # the typed name is shown again, escaped
    assert echoed.status_code == 403 and "<script>alert(1)" not in echoed.text and "&lt;script&gt;" in echoed.text


def test_an_unknown_username_takes_as_long_to_refuse_as_a_wrong_password(store, make_user):
    make_user("timo")

    def seconds(username: str) -> float:
        started = time.perf_counter()
        assert store.check_password(username, "a wrong password here") is None
        return time.perf_counter() - started

    # interleaved, medians: the machine's load moves both alike; without the dummy hash an unknown name would be
    # refused in about a millisecond, a hundred times faster than a real Argon2 check
    samples = [(seconds("timo"), seconds("no-such-user")) for _ in range(3)]
    wrong, unknown = (statistics.median(column) for column in zip(*samples))
    assert unknown > 0.3 * wrong, (wrong, unknown)


def test_unsafe_requests_without_the_csrf_token_are_refused(browser, make_user):
    make_user("cid")
    # the sign-in form: its token must match its cookie
    fresh = httpx.Client(base_url=browser.base_url, follow_redirects=False)
    with fresh:
        no_form = fresh.post("/console/sign-in", data={"username": "cid", "password": PASSWORD})
        assert no_form.status_code == 403 and "sign in again from a fresh form" in no_form.text
        forged = fresh.post("/console/sign-in", data={"username": "cid", "password": PASSWORD,
                                                      "csrf_token": "forged"})
        assert forged.status_code == 403 and not is_signed_in(fresh)
    assert sign_in(browser, "cid").status_code == 303
    token = page_token(browser)
    for refused in (browser.post("/console/sign-out"),
                    browser.post("/console/sign-out", data={"csrf_token": "not-it"}),
                    browser.post("/console/sign-out", headers={"X-CSRF-Token": token[:-1]}),
                    browser.post("/console/password", data={"current_password": PASSWORD, "new_password": "x" * 20,
                                                            "new_password_again": "x" * 20})):
        assert refused.status_code == 403 and "did not come from this console" in refused.text
    assert is_signed_in(browser)  # nothing happened
    assert browser.post("/console/sign-out", headers={"X-CSRF-Token": token}).status_code == 303  # fetch's way
    assert not is_signed_in(browser)


def test_a_session_ends_when_idle_too_long_and_at_its_lifetime(browser, make_user, clock):
    make_user("dan")
    assert sign_in(browser, "dan").status_code == 303
    clock.advance(timedelta(minutes=29))
    assert is_signed_in(browser)  # active within the idle timeout: it goes on
    clock.advance(timedelta(minutes=30, seconds=1))
    assert not is_signed_in(browser)  # 30 minutes without a request
    assert sign_in(browser, "dan").status_code == 303
    for _ in range(4):  # busy, never idle, but the 2-hour lifetime ends it
        clock.advance(timedelta(minutes=25))
        assert is_signed_in(browser)
    clock.advance(timedelta(minutes=19))
    assert is_signed_in(browser)  # 1 h 59 min
    clock.advance(timedelta(minutes=2))
    assert not is_signed_in(browser)


def test_repeated_failures_lock_the_pair_with_the_same_message(browser, make_user, store, clock):
    make_user("eve")
    make_user("fay")
    for _ in range(LOCK_FAILURES):
        answer = sign_in(browser, "eve", "a wrong password here")
        assert answer.status_code == 403 and SIGN_IN_REFUSED in answer.text
    locked = sign_in(browser, "eve")  # the right password, while locked: the same answer
    assert locked.status_code == 403 and SIGN_IN_REFUSED in locked.text and not is_signed_in(browser)
    assert [e.action for e in store.audit_log(subject="eve")] == ["sign_in_locked", "user_created"]
    assert "5 failed sign-ins from 127.0.0.1" in store.audit_log(subject="eve")[0].detail
    assert sign_in(browser, "fay").status_code == 303  # another username from the same client is not locked
    browser.cookies.clear()
    clock.advance(LOCK_DURATION - timedelta(seconds=5))
    assert sign_in(browser, "eve").status_code == 403  # still locked
    clock.advance(timedelta(seconds=10))
    assert sign_in(browser, "eve").status_code == 303 and is_signed_in(browser)


def test_failures_spread_wider_than_the_window_do_not_lock(browser, make_user, clock):
    make_user("gus")
    for _ in range(LOCK_FAILURES + 2):
        assert sign_in(browser, "gus", "a wrong password here").status_code == 403
        clock.advance(timedelta(minutes=4))  # 4 failures at most within any 15 minutes
    assert sign_in(browser, "gus").status_code == 303


def test_a_password_change_signs_out_the_other_sessions(server, browser, make_user, store):
    make_user("hal")
    with httpx.Client(base_url=server.url, follow_redirects=False) as other:
        assert sign_in(browser, "hal").status_code == 303 and sign_in(other, "hal").status_code == 303
        assert store.session_count("hal") == 2
        form = browser.get("/console/password")
        token = form_token(form.text)

        def change(current: str, new: str, again: str) -> httpx.Response:
            return browser.post("/console/password", data={"csrf_token": token, "current_password": current,
                                                           "new_password": new, "new_password_again": again})

        assert change("wrong current password", NEW_PASSWORD, NEW_PASSWORD).status_code == 403
        assert change(PASSWORD, NEW_PASSWORD, NEW_PASSWORD + "!").status_code == 422
        too_short = change(PASSWORD, "short", "short")
        assert too_short.status_code == 422 and "at least 12 characters" in too_short.text
        assert is_signed_in(other)  # refused changes changed nothing
        done = change(PASSWORD, NEW_PASSWORD, NEW_PASSWORD)
        assert done.status_code == 200 and "Password changed" in done.text
        assert is_signed_in(browser) and not is_signed_in(other)
        assert store.session_count("hal") == 1
        assert sign_in(other, "hal").status_code == 403 and sign_in(other, "hal", NEW_PASSWORD).status_code == 303
    entry = store.audit_log(subject="hal")[0]
    assert (entry.action, entry.actor) == ("password_changed", "user:hal")  # attributed to the console user


def test_sign_out_ends_the_session_on_the_server(server, browser, make_user):
    make_user("ivy")
    assert sign_in(browser, "ivy").status_code == 303
    stolen = browser.cookies[SESSION_COOKIE]
    out = browser.post("/console/sign-out", data={"csrf_token": page_token(browser)})
    assert out.status_code == 303 and out.headers["location"] == "/console/sign-in"
    assert not is_signed_in(browser)
    with httpx.Client(base_url=server.url, follow_redirects=False, cookies={SESSION_COOKIE: stolen}) as replay:
        assert not is_signed_in(replay)  # the old cookie, replayed, is worth nothing


def test_disabling_a_user_ends_its_sessions_and_a_role_change_applies_at_once(browser, make_user, store):
    make_user("jon", "admin")
    assert sign_in(browser, "jon").status_code == 303
    store.set_role("jon", "operations", by="user:ada")
    assert '<strong class="role">operations</strong>' in browser.get("/console/").text
    store.set_disabled("jon", True, by="user:ada")
    assert not is_signed_in(browser) and sign_in(browser, "jon").status_code == 403
    store.set_disabled("jon", False, by="user:ada")
    assert sign_in(browser, "jon").status_code == 303
    assert [(e.action, e.actor) for e in store.audit_log(subject="jon")] == [
        ("user_enabled", "user:ada"), ("user_disabled", "user:ada"), ("role_changed", "user:ada"),
        ("user_created", "cli:test")]


def test_token_names_cannot_pose_as_console_users(store, settings):
    for name in ("user:ada", "USER:ada", "cli:root"):
        with pytest.raises(ValueError, match="may not start with"):
            store.create_token(name, "campaigner")
    org_admin_token, _ = store.create_token("token-admin", "org_admin")
    with BackgroundServer(create_app(settings, store=store, answer_wait_s=0)) as server:
        answer = httpx.post(f"{server.url}/tokens", json={"name": "user:ada", "role": "campaigner"},
                            headers={"Authorization": f"Bearer {org_admin_token}"})
    assert answer.status_code == 422 and "may not start with" in answer.text


def test_outreach_user_create_prompts_or_reads_stdin(tmp_path, monkeypatch):
    monkeypatch.setenv("OUTREACH_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    prompted = runner.invoke(cli_app, ["user", "create", "Olga", "--role", "org_admin"],
                             input=f"{PASSWORD}\n{PASSWORD}\n")
    assert prompted.exit_code == 0, prompted.output
    assert "user olga (org_admin) created" in prompted.output and PASSWORD not in prompted.output  # no echo
    mismatch = runner.invoke(cli_app, ["user", "create", "pat", "--role", "admin"],
                             input=f"{PASSWORD}\n{PASSWORD}x\n{PASSWORD}\n{PASSWORD}\n")
    assert mismatch.exit_code == 0 and "do not match" in mismatch.output  # Click asks again
    piped = runner.invoke(cli_app, ["user", "create", "quinn", "--role", "campaigner", "--password-stdin", "--json"],
                          input=NEW_PASSWORD + "\n")
    assert piped.exit_code == 0, piped.output
    assert '"username": "quinn"' in piped.output and '"created_by": "cli:' in piped.output
    for refused, stdin in ((["olga", "--role", "admin"], NEW_PASSWORD), (["rex", "--role", "admin"], "short"),
                           (["bad name", "--role", "admin"], NEW_PASSWORD)):
        answer = runner.invoke(cli_app, ["user", "create", *refused, "--password-stdin"], input=stdin + "\n")
        assert answer.exit_code == 2, answer.output
    with ApiStore(tmp_path / "api.db") as store:
        assert [(u.username, u.role) for u in store.users()] == [("olga", "org_admin"), ("pat", "admin"),
                                                                ("quinn", "campaigner")]
        assert store.check_password("quinn", NEW_PASSWORD) is not None and store.check_password("olga", PASSWORD)
        assert store.audit_log(subject="olga")[0].actor.startswith("cli:")
    assert runner.invoke(cli_app, ["user", "disable", "quinn"]).exit_code == 0
    listed = runner.invoke(cli_app, ["user", "list", "--json"])
    assert listed.exit_code == 0 and "password" not in listed.output
    with ApiStore(tmp_path / "api.db") as store:
        assert store.user("quinn").disabled_at is not None and store.check_password("quinn", NEW_PASSWORD) is None


def test_accounts_sessions_and_throttle_in_postgresql(postgres_dsn, tmp_path):
    settings = Settings(event_store="postgres", postgres_dsn=fresh_postgres_database(), data_dir=tmp_path,
                        api_encryption_key=Fernet.generate_key().decode())
    now = datetime.now(UTC)
    with ApiStore.open(settings) as first, ApiStore.open(settings) as second:
        first.create_user("kim", "admin", PASSWORD, created_by="cli:root")
        assert second.check_password("KIM", PASSWORD).role == "admin"
        session_id, _ = second.create_session("kim", now, timedelta(hours=1))
        assert first.session(session_id).principal == "user:kim"
        first.set_password("kim", NEW_PASSWORD, changed_by="user:kim")
        assert second.session(session_id) is None
        locked = [first.record_sign_in_failure("kim", "10.0.0.1", now, limit=3, window=timedelta(minutes=15),
                                               lock_for=timedelta(minutes=15)) for _ in range(3)]
        assert locked == [False, False, True] and second.sign_in_locked("kim", "10.0.0.1", now)
        assert not second.sign_in_locked("kim", "10.0.0.2", now)
        first.save_channel_settings("sms", "twilio", {"account_sid": "AC1", "auth_token": "secret"}, "user:kim")
        assert [e.action for e in second.audit_log()] == ["channel_settings_changed", "sign_in_locked",
                                                           "password_changed", "user_created"]
        assert "secret" not in repr(second.audit_log())


def test_an_api_db_brings_its_console_users_to_postgresql(postgres_dsn, tmp_path):
    key = Fernet.generate_key().decode()
    with ApiStore(tmp_path / "api.db", key.encode()) as old:
        old.create_user("lou", "org_admin", PASSWORD, created_by="cli:root")
    settings = Settings(event_store="postgres", postgres_dsn=fresh_postgres_database(), data_dir=tmp_path,
                        api_encryption_key=key)
    with ApiStore.open(settings) as store:
        assert store.check_password("lou", PASSWORD).role == "org_admin"
        assert [e.action for e in store.audit_log(subject="lou")] == ["user_created"]
