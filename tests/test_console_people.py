"""The console's people screens (issue 14): Users, Settings, the audit log and Operations, over real HTTP with
a real session and its CSRF token, against an API on the session's broker. Each role sees only what it may
(refused server-side, not only hidden links); users are created, disabled and enabled through the store's
code; every change is in the audit log under `user:NAME`, newest first and paged; the Settings form shows
secrets only as set / not set and refuses a real provider address while secrets keep their development
values; Operations shows `outreach status`'s report of real instances."""
from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import httpx
import pytest

from outreach.up import SERVICES
from services.api.app import BackgroundServer, create_app
from services.api.console.people import AUDIT_PAGE
from services.api.store import ApiStore
from services.common.observability import Observability
from services.common.settings import Settings
from tests.conftest import async_wait_until, fresh_postgres_database
from tests.e2e_stack import stack_environment

PASSWORD = "correct horse battery"
TWILIO_SID = "AC" + "1" * 32
TWILIO_SERVICE = "MG" + "2" * 32
TWILIO_TOKEN = "a-twilio-token-of-our-own-0123"
SECTIONS = {"opt_outs": "/console/opt-outs", "users": "/console/users", "settings": "/console/settings", "audit": "/console/audit",
            "operations": "/console/operations"}
# What each role may open (shared/product-reference.md, Roles; services/api/console/policy.py).
MAY_OPEN = {"org_admin": {"opt_outs", "users", "settings", "audit", "operations"},
            "admin": {"opt_outs", "users", "audit"}, "campaigner": {"opt_outs"}, "operations": {"operations"}}
STACK_SERVICES = tuple(SERVICES)  # the last test's whole stack (the `stack` fixture), the API among them
NAV_LINKS = {"Opt-outs": "opt_outs", "Users": "users", "Settings": "settings", "Audit log": "audit", "Operations": "operations"}


@pytest.fixture(scope="module")
def settings(kafka_bootstrap, tmp_path_factory) -> Settings:
    # A deployment of its own: Operations lists only this module's instances' heartbeats.
    return Settings(data_dir=tmp_path_factory.mktemp("console-people"), kafka_bootstrap_servers=kafka_bootstrap,
                    deployment=f"people-{uuid.uuid4().hex[:8]}", heartbeat_interval_s=0.5, metrics_port=0)


@pytest.fixture(scope="module")
def store(settings) -> Iterator[ApiStore]:
    with ApiStore.open(settings) as opened:
        yield opened


@pytest.fixture(scope="module")
def server(settings, store) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(settings, store=store, answer_wait_s=0)) as running:
        yield running


def form_token(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


class Person:
    """A browser signed in to the console as one user: pages, and forms posted with the session's token."""

    def __init__(self, server: BackgroundServer, username: str):
        self.username = username
        self.client = httpx.Client(base_url=server.url, timeout=60, follow_redirects=False)
        form = self.client.get("/console/sign-in")
        answer = self.client.post("/console/sign-in", data={"username": username, "password": PASSWORD,
                                                            "csrf_token": form_token(form.text)})
        assert answer.status_code == 303, answer.text
        self.token = form_token(self.client.get("/console/password").text)

    def get(self, path: str, **params: str) -> httpx.Response:
        return self.client.get(path, params=params)

    def post(self, path: str, **fields: str) -> httpx.Response:
        return self.client.post(path, data={"csrf_token": self.token, **fields})

    def signed_in(self) -> bool:
        return self.client.get("/console/password").status_code == 200


@pytest.fixture
def person(server, store) -> Iterator:
    opened: list[Person] = []

    def sign_in(role: str, name: str | None = None) -> Person:
        name = name or f"{role.replace('_', '')}-{uuid.uuid4().hex[:6]}"
        store.create_user(name, role, PASSWORD, created_by="cli:test")
        opened.append(Person(server, name))
        return opened[-1]

    yield sign_in
    for p in opened:
        p.client.close()


def rows(html: str, table_id: str) -> list[str]:
    """The `data-*` key of each row of a table (users: username; audit: action; instances: label)."""
    table = html.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    return re.findall(r'<tr data-[a-z]+="([^"]+)"', table)


# ------------------------------------------------------------------ who sees what

@pytest.mark.parametrize("role", ["org_admin", "admin", "campaigner", "operations"])
def test_each_role_opens_only_its_sections_and_sees_links_only_to_them(person, role):
    someone = person(role)
    for section, path in SECTIONS.items():
        answer = someone.get(path)
        if section in MAY_OPEN[role]:
            assert answer.status_code == 200, (role, section, answer.text)
        else:  # refused by the server, whatever link led there
            assert answer.status_code == 403 and "has no access to" in answer.text, (role, section)
    nav = someone.get("/console/password").text.split('aria-label="Sections"', 1)[1].split("</nav>", 1)[0]
    shown = {section for label, section in NAV_LINKS.items() if f">{label}</a>" in nav}
    assert shown == MAY_OPEN[role]
    if role == "operations":  # nothing of campaigns: no link, and no campaign page opens
        assert ">Campaigns</a>" not in nav
        assert someone.get("/console/campaigns").status_code != 200
    # changes are refused the same way, not only pages (those allowed fail on their own form: nothing changes)
    posted = {"users": someone.post("/console/users", username="x-" + role, role="campaigner",
                                    password=PASSWORD, password_again="a different one"),
              "settings": someone.post("/console/settings/sms", provider="no-such-provider")}
    for section, answer in posted.items():
        assert answer.status_code == (422 if section in MAY_OPEN[role] else 403), (role, section, answer.text)


def test_an_admin_sees_and_manages_campaigners_only(person, store):
    boss = person("org_admin")
    admin = person("admin")
    worker = person("campaigner")
    listed = rows(admin.get("/console/users").text, "users-table")
    assert worker.username in listed and boss.username not in listed and admin.username not in listed
    assert all(store.user(name).role == "campaigner" for name in listed)
    form = admin.get("/console/users").text.split('id="create-user"', 1)[1]
    assert re.findall(r'<option value="([a-z_]+)"', form) == ["campaigner"]

    made = admin.post("/console/users", username="Carla", role="campaigner", password=PASSWORD,
                      password_again=PASSWORD)
    assert made.status_code == 200 and "User carla (Campaigner) created" in made.text
    assert store.user("carla").created_by == f"user:{admin.username}"
    promoted = admin.post("/console/users", username="notanadmin", role="admin", password=PASSWORD,
                          password_again=PASSWORD)
    assert promoted.status_code == 403 and store.user("notanadmin") is None
    # an org admin's account is not the admin's to disable, nor even to know of
    assert admin.post(f"/console/users/{boss.username}/disable").status_code == 404
    assert store.user(boss.username).disabled_at is None
    assert admin.post(f"/console/users/{worker.username}/disable").status_code == 200
    assert not worker.signed_in()
    # the audit log likewise: the changes to campaigners' accounts, not to the org admin's
    audit = admin.get("/console/audit").text
    subjects = re.findall(r'<td>User (?:created|disabled)</td>\s*<td>([^<]+)</td>', audit)
    assert {"carla", worker.username} <= set(subjects) and boss.username not in subjects
    assert boss.username in boss.get("/console/audit").text


# ------------------------------------------------------------------ users and the audit log

def test_users_are_created_disabled_and_enabled_and_each_change_is_audited_under_its_author(person, server, store):
    boss = person("org_admin")
    name = f"ops-{uuid.uuid4().hex[:6]}"
    for refused, why in (({"password_again": PASSWORD + "!"}, "The two passwords differ"),
                         ({"password": "short", "password_again": "short"}, "The password is refused"),
                         ({"username": "No Spaces"}, "The user was not created")):
        fields = {"username": name, "role": "operations", "password": PASSWORD, "password_again": PASSWORD,
                  **refused}
        answer = boss.post("/console/users", **fields)
        assert answer.status_code == 422 and why in answer.text
    assert store.user(name) is None
    assert boss.post("/console/users", username=name, role="operations", password=PASSWORD,
                     password_again=PASSWORD).status_code == 200
    again = boss.post("/console/users", username=name, role="campaigner", password=PASSWORD, password_again=PASSWORD)
    assert again.status_code == 422 and "exists already" in again.text

    newcomer = Person(server, name)  # signs in with the password chosen for them
    assert newcomer.get("/console/operations").status_code == 200
    disabled = boss.post(f"/console/users/{name}/disable")
    assert disabled.status_code == 200 and f"User {name} disabled" in disabled.text
    assert not newcomer.signed_in()  # its session ended at once
    assert boss.post(f"/console/users/{name}/enable").status_code == 200
    assert Person(server, name).signed_in()
    mine = boss.post(f"/console/users/{boss.username}/disable")
    assert mine.status_code == 422 and "You cannot disable your own account" in mine.text
    assert boss.signed_in()

    entries = [e for e in store.audit_log(subject=name)]
    assert [(e.action, e.actor) for e in entries] == [("user_enabled", f"user:{boss.username}"),
                                                      ("user_disabled", f"user:{boss.username}"),
                                                      ("user_created", f"user:{boss.username}")]
    # one's own password, changed on its page (routes.py), is there too
    assert boss.post("/console/password", current_password=PASSWORD, new_password=PASSWORD + " again",
                     new_password_again=PASSWORD + " again").status_code == 200
    page = boss.get("/console/audit").text
    assert rows(page, "audit-table")[:4] == ["password_changed", "user_enabled", "user_disabled", "user_created"]
    assert f'<td class="actor">user:{boss.username}</td>' in page


def test_the_audit_log_pages_from_the_newest(person, store):
    boss = person("org_admin")
    subject = person("campaigner").username
    for n in range(AUDIT_PAGE + 10):  # role changes write one entry each, and cost no password hashing
        store.set_role(subject, "admin" if n % 2 == 0 else "campaigner", by=f"cli:pager-{n}")
    first = boss.get("/console/audit").text
    actors = re.findall(r'<td class="actor">([^<]+)</td>', first)
    assert len(actors) == AUDIT_PAGE and actors[0] == f"cli:pager-{AUDIT_PAGE + 9}"
    older = re.search(r'href="/console/audit\?after=([^"]+)" rel="next"', first).group(1)
    second = boss.client.get(f"/console/audit?after={older}").text
    following = re.findall(r'<td class="actor">([^<]+)</td>', second)
    assert following[:10] == [f"cli:pager-{n}" for n in range(9, -1, -1)]  # where the first page stopped
    assert not set(actors) & set(following)
    assert 'href="/console/audit">Newest</a>' in second


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_audit_pages_follow_each_other_without_gap_or_repeat_in_both_stores(kind, tmp_path, request):
    if kind == "postgres":
        request.getfixturevalue("postgres_dsn")  # skips when PostgreSQL is down; drops the database at the end
        opened = ApiStore(encryption_key=None, postgres_dsn=fresh_postgres_database("outreach_people"))
    else:
        opened = ApiStore(tmp_path / "api.db")
    with opened as store:
        store.create_user("pat", "campaigner", PASSWORD, created_by="cli:test")
        for n in range(24):  # pages of 7: (at, audit_id) orders every entry, so none is skipped or repeated
            store.set_role("pat", "admin" if n % 2 == 0 else "campaigner", by=f"cli:n{n}")
        shown, after = [], None
        while page := store.audit_page(after=after, limit=7):
            shown += page
            after = (page[-1].at, page[-1].audit_id)
        assert [e.actor for e in shown] == [f"cli:n{n}" for n in range(23, -1, -1)] + ["cli:test"]
        assert shown == store.audit_log(limit=100)
        about_admins = store.audit_page(of_roles=["admin"], limit=100)  # pat ended a campaigner
        assert about_admins == [] and len(store.audit_page(of_roles=["campaigner"], limit=100)) == 25


# ------------------------------------------------------------------ settings

def test_settings_show_secrets_only_as_set_and_a_blank_secret_keeps_its_value(person, store):
    boss = person("org_admin")
    saved = boss.post("/console/settings/sms", provider="twilio", account_sid=TWILIO_SID, auth_token=TWILIO_TOKEN,
                      messaging_service_sid=TWILIO_SERVICE, base_url="")
    assert saved.status_code == 200, saved.text
    assert "Saved: sms now uses Twilio" in saved.text
    stored = store.channel_settings("sms")
    assert stored.credentials["auth_token"] == TWILIO_TOKEN and stored.updated_by == f"user:{boss.username}"
    shown = boss.get("/console/settings").text
    assert TWILIO_TOKEN not in shown and TWILIO_TOKEN[-4:] not in shown  # not even a masked tail
    sms = shown.split('id="channel-sms"', 1)[1].split("</section>", 1)[0]
    assert re.search(r'Auth token</th>\s*<td><span class="pill on">set</span>', sms)
    assert f"<code>{TWILIO_SID}</code>" in sms  # an account id is not a secret: shown, and prefilled
    assert f'name="account_sid" value="{TWILIO_SID}"' in sms and 'name="auth_token" type="password"' in sms

    kept = boss.post("/console/settings/sms", provider="twilio", account_sid=TWILIO_SID, auth_token="",
                     messaging_service_sid="MG" + "3" * 32)
    assert kept.status_code == 200, kept.text
    now = store.channel_settings("sms")
    assert now.credentials["auth_token"] == TWILIO_TOKEN and now.credentials["messaging_service_sid"] == "MG" + "3" * 32
    missing = boss.post("/console/settings/email", provider="smtp", host="", port="2525")  # not in use: none kept
    assert missing.status_code == 422 and "Not saved: Host: required" in missing.text
    audited = [e for e in store.audit_log(subject="sms") if e.actor == f"user:{boss.username}"]
    assert [e.action for e in audited] == ["channel_settings_changed"] * 2
    assert TWILIO_TOKEN not in boss.get("/console/audit").text


def test_settings_refuse_a_real_provider_address_while_secrets_keep_their_development_values(person, store):
    boss = person("org_admin")
    before = store.channel_settings("email")
    page = re.sub(r"\s+", " ", boss.get("/console/settings").text)
    assert "A real provider address (anything but the built-in simulator) is refused while any secret still" in page
    refused = boss.post("/console/settings/email", provider="sendgrid", api_key="SG.a-key-of-our-own-0123456789",
                        base_url="https://api.sendgrid.com")
    assert refused.status_code == 422
    said = refused.text.split('id="channel-email"', 1)[1].split("</section>", 1)[0]
    assert "Not saved: refused: these settings use a real provider endpoint" in said
    assert "OUTREACH_UNSUBSCRIBE_SECRET" in said  # names each secret to set first
    assert store.channel_settings("email") == before  # nothing stored


# ------------------------------------------------------------------ operations

async def test_operations_shows_the_status_report_of_the_running_instances(person, settings):
    ops = person("operations")
    ready = await Observability(settings, "projections").start()
    failing = await Observability(settings.model_copy(update={"instance_name": "1"}), "projections",
                                  checks={"broker": lambda: False}).start()
    try:
        page = await _get(ops, "/console/operations")
        assert page.status_code == 200
        instances = page.text.split('id="instances-table"', 1)[1].split("</table>", 1)[0]
        assert rows(page.text, "instances-table") == ["projections", "projections-1"]
        assert "state-ready" in instances and "state-alive" in instances and "not ready: broker" in instances
        assert "1 ready, 1 alive" in re.sub(r"\s+", " ", page.text)
        assert "Relay lag" in page.text and "Parked (DLQ)" in page.text and "Pending timers" in page.text
        assert "/console/campaigns" not in page.text  # nothing of campaigns, not even a link
    finally:
        await failing.stop()
        await ready.stop()


async def _get(someone: Person, path: str) -> httpx.Response:
    import asyncio

    return await asyncio.to_thread(someone.get, path)


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    return stack_environment(stack_bootstrap, tmp_path_factory.mktemp("console-people-stack"))


@pytest.mark.e2e
@pytest.mark.postgres
async def test_operations_shows_a_whole_stack_as_outreach_status_does(env, stack):
    """Every service a process (as `outreach up` runs them), the console served by the stack's own API: the
    operations user sees each instance ready, the lag of each consumer group, the relay's lag, the timers and
    the parked records, and nothing of campaigns."""
    with ApiStore.open(Settings(data_dir=env["OUTREACH_DATA_DIR"], event_store=env["OUTREACH_EVENT_STORE"],
                                postgres_dsn=env["OUTREACH_POSTGRES_DSN"])) as stack_store:
        stack_store.create_user("otto", "operations", PASSWORD, created_by="cli:test")

    class StackApi:
        url = f"http://127.0.0.1:{env['OUTREACH_API_PORT']}"

    async def console_answers() -> bool:
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(f"{StackApi.url}/console/sign-in")).status_code == 200
        except httpx.TransportError:
            return False

    await async_wait_until(console_answers, 60, 0.2, message="the stack's API did not serve the console")
    otto = Person(StackApi, "otto")

    async def whole_report() -> str | None:
        text = re.sub(r"\s+", " ", (await _get(otto, "/console/operations")).text)
        states = dict(re.findall(r'<tr data-instance="([^"]+)">.*?state-([a-z]+)', text))
        everything = set(states) >= {"command-handler", "relay", "sender", "webhooks", "timeout-sweeper",
                                     "projections", "api"} and set(states.values()) == {"ready"}
        numbers = "stored events not yet published" in text and 'id="lag-table"' in text and \
                  "no sweeper answered" not in text and "record(s)" in text
        return text if everything and numbers else None

    text = await async_wait_until(whole_report, 120, 1, message="the Operations page never showed the whole stack")
    assert set(rows(text, "lag-table")) >= {"outreach-projections"}
    assert re.search(r"Relay lag</th> <td>\d+ stored events not yet published", text)
    assert re.search(r'Parked \(DLQ\)</th> <td><span class="pill on">0</span> record\(s\)', text)  # nothing parked
    assert "/console/campaigns" not in text and otto.get("/console/users").status_code == 403
    otto.client.close()
