"""Opt-outs by hand and the opt-out lists read (issue 14), without a broker: the OptOutChanged rules (a manual change
names who, a manual removal why), the API's destination rule (the contacts' one), the handler's OptOutList keeping
who and why and the relay's OptOutListChanged records of it (events stored before too), the read model's opt_outs
(the latest change per destination whatever the order, keyset pages newest first, searched; on SQLite and
PostgreSQL; added to an older read model), and the HTTP API and the console over real HTTP, their changes carried
to a real command handler and read model by a stand-in for the broker (`Pipeline`): added by any campaign role,
removed only by an org admin with a reason, each audited once."""
from __future__ import annotations

import re
import sqlite3
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from pydantic import TypeAdapter, ValidationError

from schemas import topics
from schemas.internal import OptOutChanged, OptOutListChanged
from schemas.times import rfc3339, utc_now
from services.api.app import BackgroundServer, create_app
from services.api.opt_outs import (OptOutBody, OptOutRemovalBody, cursor_of, normalised_destination,
                                   source_in_words)
from services.api.store import ApiStore
from services.command_handler import wire
from services.command_handler.application import open_app
from services.command_handler.domain.model import OptOutList
from services.command_handler.handlers import RecordHandler
from services.common import ids, records
from services.common.settings import Settings
from services.projections.projector import ReadModel, apply_opt_outs_isolating_poison

PASSWORD = "correct horse battery"
START = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)


def manual(**fields) -> dict:
    return {"type": "OptOutChanged", "opt_out_id": str(uuid.uuid4()), "channel": "sms", "destination": "+14155550100",
            "opted_out": True, "source": "manual", "occurred_at": utc_now(), "issued_by": "user:ann", **fields}


# ------------------------------------------------------------------ the record's rules

def test_a_manual_change_names_who_made_it_and_a_manual_removal_says_why():
    assert OptOutChanged.model_validate(manual()).issued_by == "user:ann"
    removal = OptOutChanged.model_validate(manual(opted_out=False, reason="asked by phone"))
    assert (removal.opted_out, removal.reason) == (False, "asked by phone")
    for refused in (manual(issued_by=None), manual(opted_out=False), manual(opted_out=False, reason=" \n\t"),
                    manual(opted_out=False, reason="x" * 1001)):
        with pytest.raises(ValidationError):
            OptOutChanged.model_validate(refused)


def test_the_providers_changes_need_no_author_nor_reason():
    for source, opted_out in (("sms_stop", True), ("sms_start", False), ("email_unsubscribe", True)):
        change = OptOutChanged.model_validate(manual(source=source, opted_out=opted_out, issued_by=None))
        assert (change.issued_by, change.reason) == (None, None)


def test_an_invalid_record_is_refused_where_the_handler_reads_it():
    with pytest.raises(records.InvalidRecord):
        records.decode(OptOutChanged, records.encode(OptOutChanged.model_construct(**manual(opted_out=False))))


# ------------------------------------------------------------------ the destination rule

def test_destinations_are_judged_and_normalised_by_the_contacts_rule():
    assert normalised_destination("sms", "+14155550100") == "+14155550100"
    assert normalised_destination("email", "Ada@Example.ORG") == "Ada@example.org"  # the domain, not the local part
    for channel, bad in (("sms", "14155550100"), ("sms", "+1 415 555 0100"), ("sms", "ada@example.org"),
                         ("email", "+14155550100"), ("email", "ada@example.test"), ("email", "")):
        with pytest.raises(ValueError):
            normalised_destination(channel, bad)


def test_the_request_bodies_hold_the_same_rule_and_a_removal_needs_a_reason():
    add, remove = TypeAdapter(OptOutBody), TypeAdapter(OptOutRemovalBody)
    assert add.validate_python({"channel": "email", "destination": "ada@EXAMPLE.org"}).destination == "ada@example.org"
    assert add.validate_python({"channel": "sms", "destination": "+14155550100"}).channel == "sms"
    assert remove.validate_python({"channel": "sms", "destination": "+14155550100", "reason": "asked"}).reason == "asked"
    for body in ({"channel": "sms", "destination": "ada@example.org"}, {"channel": "email", "destination": "+1415555"},
                 {"channel": "fax", "destination": "+14155550100"}):
        with pytest.raises(ValidationError):
            add.validate_python(body)
    for reason in (None, "", "   ", "\u3000\n", "a\x00b"):
        body = {"channel": "sms", "destination": "+14155550100", **({} if reason is None else {"reason": reason})}
        with pytest.raises(ValidationError):
            remove.validate_python(body)


def test_each_source_is_said_in_words():
    def said(source, opted_out=True, channel="sms", by=None):
        return source_in_words({"source": source, "opted_out": opted_out, "channel": channel, "issued_by": by})

    assert [said(s) for s in ("sms_stop", "sms_start", "twilio_21610", "email_unsubscribe", "email_spamreport")] == [
        "STOP", "START", "21610", "unsubscribe", "spam report"]
    assert said("manual", by="user:ann") == "added by hand by user:ann"
    assert said("manual", opted_out=False, by="user:olga") == "removed by user:olga"
    assert said("result:refused") == "21610" and said("test_message:refused") == "21610 (a test message)"
    assert said("result:spamreport", channel="email") == "spam report"
    assert said("result:unsubscribe", channel="email") == "unsubscribe"


# ------------------------------------------------------------------ the handler and the relay

def opt_out_list_records(app, after: int = 0) -> list[OptOutListChanged]:
    return [r.model for n in app.recorder.select_notifications(start=after + 1, limit=1000)
            for r in wire.to_records(app.mapper.to_domain_event(n)) if r.topic == topics.OPT_OUT_LIST]


def test_the_list_keeps_who_and_why_and_the_relay_publishes_each_change(app):
    handler = RecordHandler(app)
    added, removed = manual(), manual(opted_out=False, reason="asked by phone", issued_by="user:olga")
    for change in (added, added, removed):  # the same record twice: stored once
        assert handler.handle(topics.OPT_OUTS, records.encode(OptOutChanged.model_validate(change))) is None
    handler.handle(topics.OPT_OUTS, records.encode(OptOutChanged.model_validate(
        manual(source="sms_stop", issued_by=None, destination="+14155550101"))))
    assert app.suppressed("sms") == {"+14155550101"}
    published = opt_out_list_records(app)
    assert [(r.destination, r.opted_out, r.source, r.issued_by, r.reason, r.causation_id) for r in published] == [
        ("+14155550100", True, "manual", "user:ann", None, added["opt_out_id"]),
        ("+14155550100", False, "manual", "user:olga", "asked by phone", removed["opt_out_id"]),
        ("+14155550101", True, "sms_stop", None, None, published[2].causation_id)]
    assert [r.sequence for r in published] == sorted({r.sequence for r in published})  # the list's versions
    assert {r.channel for r in published} == {"sms"}
    # the same stored events give the same records (a republish dedupes on event_id)
    assert [r.event_id for r in opt_out_list_records(app)] == [r.event_id for r in published]
    assert len({r.event_id for r in published}) == 3


def test_events_stored_before_manual_changes_still_apply_and_publish():
    """An OptedOut stored by an earlier version has no issued_by: it still rebuilds the list and maps to a record."""
    list_id = ids.opt_out_list_id("email")
    created = OptOutList.Created(originator_id=list_id, originator_version=1, timestamp=START,
                                 originator_topic="services.command_handler.domain.model:OptOutList", channel="email")
    older = object.__new__(OptOutList.OptedOut)  # as the mapper rebuilds a stored event: its stored attributes only
    object.__setattr__(older, "__dict__", {"originator_id": list_id, "originator_version": 2, "timestamp": START,
                                           "destination": "ada@example.org", "source": "email_unsubscribe",
                                           "causation_id": "r1"})
    aggregate = older.mutate(created.mutate(None))
    assert aggregate.destinations == {"ada@example.org"}
    [record] = wire.to_records(older)
    assert (record.topic, record.key) == (topics.OPT_OUT_LIST, "email:ada@example.org")
    assert (record.model.issued_by, record.model.reason, record.model.sequence) == (None, None, 2)


# ------------------------------------------------------------------ the read model

@pytest.fixture
def model(read_model):
    """A fresh read model of each kind (conftest's `read_model`)."""
    return read_model


def change(destination: str, sequence: int, *, opted_out: bool = True, channel: str = "sms", source: str = "sms_stop",
           seconds: float | None = None, **fields) -> OptOutListChanged:
    return OptOutListChanged(event_id=str(uuid.uuid4()), channel=channel, destination=destination, opted_out=opted_out,
                             source=source, sequence=sequence,
                             occurred_at=rfc3339(START + timedelta(seconds=sequence if seconds is None else seconds)),
                             **fields)


def test_each_destination_shows_its_latest_change_whatever_the_order(model):
    stop, by_hand, removed = (change("+14155550100", 2), change("+14155550100", 5, source="manual", issued_by="user:a"),
                              change("+14155550100", 7, opted_out=False, source="manual", issued_by="user:o",
                                     reason="asked"))
    model.apply_opt_out_changes([removed, stop])
    model.apply_opt_out_changes([by_hand, stop])  # late and repeated: nothing changes
    assert model.opt_out("sms", "+14155550100") == {
        "channel": "sms", "destination": "+14155550100", "opted_out": False, "source": "manual", "issued_by": "user:o",
        "reason": "asked", "changed_at": removed.occurred_at}
    assert model.opt_out("email", "+14155550100") is None
    assert model.count_opt_outs("sms") == 0 and model.opt_out_page("sms")["items"] == []


def test_pages_go_newest_first_older_and_newer_without_gap_or_repeat(model):
    numbers = [f"+1415555{n:04d}" for n in range(23)]
    model.apply_opt_out_changes([change(d, n + 2, seconds=n // 3) for n, d in enumerate(numbers)])  # equal times too
    model.apply_opt_out_changes([change("ada@example.org", 2, channel="email", source="email_unsubscribe"),
                                 change(numbers[4], 40, opted_out=False, source="sms_start")])
    listed = [d for d in numbers if d != numbers[4]]
    newest_first = sorted(listed, key=lambda d: ((numbers.index(d)) // 3, d), reverse=True)
    assert model.count_opt_outs("sms") == 22 and model.count_opt_outs("email") == 1

    pages, page = [], model.opt_out_page("sms", limit=5)
    assert page["newer"] is None
    while True:
        pages.append([e["destination"] for e in page["items"]])
        if page["older"] is None:
            break
        page = model.opt_out_page("sms", after=page["older"], limit=5)
        assert page["newer"] is not None
    assert [d for p in pages for d in p] == newest_first and [len(p) for p in pages] == [5, 5, 5, 5, 2]
    back = model.opt_out_page("sms", before=page["newer"], limit=5)  # Newer from the last page
    assert [e["destination"] for e in back["items"]] == pages[-2] and back["older"] and back["newer"]
    further = model.opt_out_page("sms", before=back["newer"], limit=5)
    assert [e["destination"] for e in further["items"]] == pages[-3]


def test_a_search_finds_a_part_of_the_destination_in_any_case(model):
    model.apply_opt_out_changes([change("Ada.Lovelace@example.org", 2, channel="email", source="manual",
                                        issued_by="user:ann"),
                                 change("bob@example.org", 3, channel="email", source="email_spamreport"),
                                 change("100%_sure@example.org", 4, channel="email", source="email_unsubscribe")])
    found = lambda q: [e["destination"] for e in model.opt_out_page("email", search=q)["items"]]  # noqa: E731
    assert found("lovelace") == ["Ada.Lovelace@example.org"]
    assert found("EXAMPLE.ORG") == ["100%_sure@example.org", "bob@example.org", "Ada.Lovelace@example.org"]
    assert found("%") == ["100%_sure@example.org"] and found("_s") == ["100%_sure@example.org"]  # no wildcards
    assert found("nobody") == []


def test_a_change_the_database_cannot_store_is_skipped_alone(tmp_path):
    with ReadModel(str(tmp_path / "rm.db")) as model:
        poison = change("+14155550100", 2).model_copy(update={"sequence": 2 ** 70})  # past a 64-bit integer
        assert apply_opt_outs_isolating_poison(model, [poison, change("+14155550101", 3)]) == 1
        assert [e["destination"] for e in model.opt_out_page("sms")["items"]] == ["+14155550101"]


def test_a_read_model_made_before_the_opt_out_lists_gets_their_table_when_opened(tmp_path):
    path = tmp_path / "older.db"
    with ReadModel(str(path)):
        pass
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE opt_outs")  # as a read model of this schema version made before them
        db.execute("INSERT INTO read_model_meta (key, value) VALUES ('kept', 'yes')")
    with ReadModel(str(path)) as model:
        model.apply_opt_out_changes([change("+14155550100", 2)])
        assert model.count_opt_outs("sms") == 1
    with sqlite3.connect(path) as db:  # not rebuilt: the rest is as it was
        assert db.execute("SELECT value FROM read_model_meta WHERE key = 'kept'").fetchone() == ("yes",)


# ------------------------------------------------------------------ the HTTP API and the console

class Pipeline:
    """Stands in for the broker, the command handler's consumer, the relay and the projections: a record the API
    publishes is decoded as the handler decodes it and applied by a real command handler application, whose new
    stored events are mapped by the relay's mapping into the read model the API reads."""

    def __init__(self, app, model: ReadModel):
        self.app, self.model, self.position = app, model, 0
        self.published: list[tuple[str, str, OptOutChanged]] = []

    async def publish_record(self, topic: str, key: str, record) -> None:
        self.published.append((topic, key, record))
        assert topic == topics.OPT_OUTS and key == record.destination
        RecordHandler(self.app).handle(topic, records.encode(record))
        changes = opt_out_list_records(self.app, self.position)
        self.position = self.app.recorder.max_notification_id() or 0
        if changes:
            self.model.apply_opt_out_changes(changes)

    async def publish(self, commands) -> None:
        raise AssertionError("no command is published here")

    async def stop(self) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    data = tmp_path_factory.mktemp("opt-outs")
    settings = Settings(data_dir=data)
    handler_app = open_app(settings)
    with ReadModel(str(data / "read-model.db")) as model, ApiStore.open(settings) as store:
        pipeline = Pipeline(handler_app, model)
        with BackgroundServer(create_app(settings, read_model=model, store=store, publisher=pipeline,
                                         answer_wait_s=1)) as server:
            yield server, store, pipeline, model
    handler_app.close()


@pytest.fixture
def api(served):
    server, store, *_ = served

    def as_role(role: str, name: str | None = None) -> httpx.Client:
        token = store.create_token(name or f"{role}-{uuid.uuid4().hex[:6]}", role)[0]
        return httpx.Client(base_url=server.url, timeout=30, headers={"Authorization": f"Bearer {token}"})

    return as_role


def number() -> str:
    return f"+1415{uuid.uuid4().int % 10_000_000:07d}"


def test_a_campaign_role_adds_an_opt_out_by_hand_and_the_list_shows_who(api, served):
    _, store, pipeline, _ = served
    destination = number()
    with api("campaigner", "carl") as carl:
        added = carl.post("/opt-outs", json={"channel": "sms", "destination": destination})
        assert added.status_code == 202, added.text
        body = added.json()
        assert (body["state"], body["opted_out"], body["entry"]["source"], body["entry"]["issued_by"]) == (
            "applied", True, "manual", "carl")
        assert destination in pipeline.app.suppressed("sms")
        listed = carl.get("/opt-outs", params={"channel": "sms", "q": destination[-7:]}).json()
        assert [(e["destination"], e["issued_by"]) for e in listed["items"]] == [(destination, "carl")]
        email = carl.post("/opt-outs", json={"channel": "email", "destination": "Ada@EXAMPLE.org"}).json()
        assert email["destination"] == "Ada@example.org" and "Ada@example.org" in pipeline.app.suppressed("email")
        for bad in ({"channel": "sms", "destination": "0415 555 0100"}, {"channel": "email", "destination": "ada@"},
                    {"channel": "sms"}):
            assert carl.post("/opt-outs", json=bad).status_code == 422
    [entry] = [e for e in store.audit_log(subject=f"sms:{destination}")]
    assert (entry.actor, entry.action, entry.detail) == ("carl", "opt_out_added", "")


def test_only_an_org_admin_removes_and_only_with_a_reason(api, served):
    _, store, pipeline, _ = served
    destination = number()
    with api("admin", "adam") as adam, api("org_admin", "olga") as olga:
        assert adam.post("/opt-outs", json={"channel": "sms", "destination": destination}).status_code == 202
        refused = adam.post("/opt-outs/remove", json={"channel": "sms", "destination": destination, "reason": "asked"})
        assert refused.status_code == 403
        for body in ({"channel": "sms", "destination": destination}, {"channel": "sms", "destination": destination,
                                                                      "reason": "  "}):
            assert olga.post("/opt-outs/remove", json=body).status_code == 422
        assert destination in pipeline.app.suppressed("sms")
        removed = olga.post("/opt-outs/remove", json={"channel": "sms", "destination": destination,
                                                       "reason": "asked by phone to get news again"})
        assert removed.status_code == 202 and removed.json()["state"] == "applied", removed.text
        assert removed.json()["entry"]["opted_out"] is False and destination not in pipeline.app.suppressed("sms")
        again = olga.post("/opt-outs/remove", json={"channel": "sms", "destination": destination, "reason": "again"})
        assert again.status_code == 404
        assert olga.get("/opt-outs", params={"channel": "sms", "q": destination}).json()["items"] == []
    actions = [(e.actor, e.action, e.detail) for e in store.audit_log(subject=f"sms:{destination}")]
    assert actions == [("olga", "opt_out_removed", "asked by phone to get news again"),
                       ("adam", "opt_out_added", "")]


def test_a_retried_request_changes_and_audits_once(api, served):
    _, store, pipeline, _ = served
    destination, key = number(), str(uuid.uuid4())
    with api("campaigner") as someone:
        before = len(pipeline.published)
        answers = [someone.post("/opt-outs", json={"channel": "sms", "destination": destination},
                                headers={"Idempotency-Key": key}).json() for _ in range(2)]
    assert answers[0]["opt_out_id"] == answers[1]["opt_out_id"] and answers[1]["state"] == "applied"
    assert len(pipeline.published) == before + 1
    assert len(store.audit_log(subject=f"sms:{destination}")) == 1


def test_operations_reads_and_changes_no_opt_out(api):
    with api("operations") as oscar:
        assert oscar.get("/opt-outs", params={"channel": "sms"}).status_code == 403
        assert oscar.post("/opt-outs", json={"channel": "sms", "destination": number()}).status_code == 403


def form_token(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


class Person:
    """A browser signed in to the console: pages, and forms posted with the session's token and the form's key."""

    def __init__(self, served, role: str):
        server, store, *_ = served
        self.name = f"{role.replace('_', '')}-{uuid.uuid4().hex[:6]}"
        store.create_user(self.name, role, PASSWORD, created_by="cli:test")
        self.client = httpx.Client(base_url=server.url, timeout=30, follow_redirects=False)
        form = self.client.get("/console/sign-in")
        signed = self.client.post("/console/sign-in", data={"username": self.name, "password": PASSWORD,
                                                            "csrf_token": form_token(form.text)})
        assert signed.status_code == 303, signed.text

    def get(self, path: str, **params: str) -> httpx.Response:
        return self.client.get(path, params=params)

    def post_form(self, html: str, form_id: str, action: str, **fields: str) -> httpx.Response:
        """Post the form `form_id` of a page: its hidden fields as the page has them, and `fields`."""
        form = html.split(f'id="{form_id}"', 1)[1].split("</form>", 1)[0]
        hidden = dict(re.findall(r'<input type="hidden" name="([a-z_]+)" value="([^"]*)"', form))
        return self.client.post(action, data={**hidden, **fields})


def rows(html: str) -> list[str]:
    table = html.split('id="opt-outs-table"', 1)[1].split("</table>", 1)[0]
    return re.findall(r'<tr data-destination="([^"]+)"', table)


def test_the_console_lists_searches_adds_and_an_org_admin_removes(served):
    _, store, pipeline, _ = served
    carl, olga = Person(served, "campaigner"), Person(served, "org_admin")
    destination = number()
    page = carl.get("/console/opt-outs", channel="sms")
    assert page.status_code == 200 and "Search destination" in page.text and "Add an opt-out" in page.text
    assert "<script>" not in page.text and " style=" not in page.text
    added = carl.post_form(page.text, "add-opt-out", "/console/opt-outs", destination=f" {destination} ")
    assert added.status_code == 200 and f"{destination} is on the opt-out list" in added.text, added.text
    assert destination in rows(added.text) and "Remove" not in added.text.split('id="opt-outs-table"', 1)[1]
    assert f"added by hand by user:{carl.name}" in added.text
    assert rows(carl.get("/console/opt-outs", channel="sms", q=destination[-6:]).text) == [destination]
    assert rows(carl.get("/console/opt-outs", channel="sms", q="no such part").text) == []
    refused = carl.post_form(page.text, "add-opt-out", "/console/opt-outs", destination="not a number")
    assert refused.status_code == 422 and "Not added" in refused.text
    assert carl.get("/console/opt-outs/remove", channel="sms", destination=destination).status_code == 403

    listing = olga.get("/console/opt-outs", channel="sms", q=destination).text
    link = re.search(r'href="([^"]*/opt-outs/remove\?[^"]+)"', listing).group(1).replace("&amp;", "&")
    confirm = olga.client.get(link)
    assert confirm.status_code == 200 and "Reason" in confirm.text and "Remove opt-out" in confirm.text
    blank = olga.post_form(confirm.text, "remove-opt-out", "/console/opt-outs/remove", reason="  ")
    assert blank.status_code == 422 and destination in pipeline.app.suppressed("sms")
    removed = olga.post_form(confirm.text, "remove-opt-out", "/console/opt-outs/remove",
                             reason="asked at the front desk")
    assert removed.status_code == 200 and "is off the opt-out list" in removed.text, removed.text
    assert destination not in pipeline.app.suppressed("sms") and destination not in rows(removed.text)
    assert [(e.actor, e.action, e.detail) for e in store.audit_log(subject=f"sms:{destination}")] == [
        (f"user:{olga.name}", "opt_out_removed", "asked at the front desk"), (f"user:{carl.name}", "opt_out_added", "")]
    audit = olga.get("/console/audit").text
    assert "Opt-out added by hand" in audit and "Opt-out removed" in audit


def test_the_console_pages_older_and_newer(served):
    _, _, _, model = served
    email = [f"page-{n:02d}-{uuid.uuid4().hex[:4]}@example.org" for n in range(55)]
    model.apply_opt_out_changes([change(d, 10_000 + n, channel="email", source="email_unsubscribe",
                                        seconds=86_400 * 400 + n) for n, d in enumerate(email)])
    carl = Person(served, "campaigner")
    first = carl.get("/console/opt-outs", channel="email", q="page-").text
    assert rows(first) == email[::-1][:50] and "Newer</a>" not in first
    older = re.search(r'href="([^"]+)" rel="next">Older', first).group(1).replace("&amp;", "&")
    second = carl.client.get(older).text
    assert rows(second) == email[::-1][50:] and 'rel="next"' not in second
    newer = re.search(r'href="([^"]+)" rel="prev">Newer', second).group(1).replace("&amp;", "&")
    assert rows(carl.client.get(newer).text) == email[::-1][:50]
    assert cursor_of(("t", "a|b")) == "t|a|b"  # an address may hold a `|`: the time never does


# ------------------------------------------------------------------ the relay, after an upgrade

async def test_changes_stored_before_the_topic_existed_are_published_once(kafka_bootstrap, monkeypatch, tmp_path):
    from services.command_handler.checkpoint import Checkpoint
    from services.command_handler.relay import Relay
    from services.common import kafka
    from services.common.settings import get_settings
    from tests.test_relay_oversized import read_all

    for key, value in {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "OUTREACH_DATA_DIR": str(tmp_path),
                       "OUTREACH_EVENT_STORE": "sqlite", "OUTREACH_DEPLOYMENT": f"t{uuid.uuid4().hex[:8]}"}.items():
        monkeypatch.setenv(key, value)
    settings = get_settings()
    await kafka.ensure_topics(settings)
    ours = [number() for _ in range(3)]

    def published_ours(read) -> list[str]:
        return [r.key.decode() for r in read[topics.OPT_OUT_LIST] if r.key.decode().split(":", 1)[1] in ours]

    relay = Relay(settings)
    try:
        for destination in ours:  # stored by a handler of before, and published past by its relay
            relay.app.apply_opt_out(opt_out_id=str(uuid.uuid4()), channel="sms", destination=destination,
                                    opted_out=True, source="sms_stop")
        relay.checkpoint = Checkpoint(position=relay.app.recorder.max_notification_id())
        relay.checkpoints.save(relay.checkpoint)
        assert await relay.publish_once() == 0  # nothing new in the log: only the lists' stored changes go out
    finally:
        await relay.close()
    assert sorted(published_ours(await read_all(settings, topics.OPT_OUT_LIST))) == sorted(f"sms:{d}" for d in ours)
    again = Relay(settings)  # its mark is set: nothing again
    try:
        assert await again.publish_once() == 0
    finally:
        await again.close()
    assert len(published_ours(await read_all(settings, topics.OPT_OUT_LIST))) == 3
