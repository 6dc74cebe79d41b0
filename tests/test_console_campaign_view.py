"""The console's campaign view (issue 14): the read model's keyset pages and failure-reason counts on SQLite and
PostgreSQL, the page's plain rules, and, on a whole stack over real HTTP with a signed-in person, the live counts
(the page at load and the Server-Sent Events stream), the filters by status and reason, the recipient search,
keyset pages forward and back, the CSV export of a filter, one message's history, a retry of one failed message
issued as `user:NAME`, the campaign's history naming who acted, the campaign as of a time, and who may see it."""
from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs

import httpx
import pytest

from outreach.up import SERVICES
from schemas import topics
from schemas.times import rfc3339
from services.api.console.campaign_view import Filter, as_of_moment, event_words, issued_by, matching_count, \
    page_links
from services.api.console.routes import ConsoleRefused
from services.api.store import ApiStore
from services.common import ids
from services.common.settings import Settings
from services.projections.projector import ReadModel
from services.projections.schema import ADDED_INDEXES
from tests.conftest import async_wait_until
from tests.e2e_fixtures import api_client, stack_token
from tests.e2e_stack import stack_environment
from tests.e2e_support import ALL_TRUE, sms_contacts

START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
SIZE = 230
REASONS = ("invalid_destination", "carrier_rejected", "timed_out")


def at(seconds: float) -> str:
    return rfc3339(START + timedelta(seconds=seconds))


# ------------------------------------------------------------------ the read model (SQLite and PostgreSQL)

@pytest.fixture
def model(read_model):
    """A fresh read model of each kind (conftest's `read_model`)."""
    return read_model


def latest_status(row: int) -> tuple[str, str | None]:
    """Row `row`'s final status: every 10th failed (three reasons in turn), every 7th opted out, else delivered."""
    if row % 10 == 0:
        return "failed", REASONS[(row // 10) % len(REASONS)]
    if row % 7 == 0:
        return "opted_out", None
    return "delivered", None


def status_record(cid: str, row: int, sequence: int, status: str, previous: str | None, seconds: float,
                  reason: str | None = None, **extra) -> dict:
    return {"type": "MessageStatusChanged", "event_id": ids.record_event_id(cid, sequence, row),
            "message_id": ids.message_id(cid, row), "campaign_id": cid, "channel": "sms", "row": row,
            "run_no": None if status == "waiting" else 1, "status": status, "previous_status": previous,
            "reason": reason, "provider_code": None, "attempt": None if status == "waiting" else 1,
            "occurred_at": at(seconds), "causation_id": None, "sequence": sequence, **extra}


def destination(row: int) -> str:
    return f"+1202555{row:04d}"


def load_campaign(model: ReadModel, cid: str) -> None:
    """A run of SIZE messages (rows 2..SIZE+1): all waiting at 60 s, each final at 100 + row seconds."""
    event = lambda sequence, type_, seconds, **body: {  # noqa: E731
        "type": type_, "event_id": ids.record_event_id(cid, sequence, 0), "campaign_id": cid, "sequence": sequence,
        "occurred_at": at(seconds), "causation_id": str(uuid.uuid4()), **body}
    model.apply_batch([
        event(10, "CampaignCreated", 0, name="Keyset", description=None, channel="sms", template={"body": "Hi"},
              created_by="user:ann"),
        event(20, "CampaignStatusChanged", 60, status="ready", previous_status="created", stopped=False,
              counts={"total": SIZE, "waiting": SIZE})], [])
    records = []
    for row in range(2, SIZE + 2):
        records.append(status_record(cid, row, 100, "waiting", None, 60, destination=destination(row),
                                     variables={"first_name": f"Name{row}"}))
        status, reason = latest_status(row)
        records.append(status_record(cid, row, 400, status, "sending", 100 + row, reason))
    model.apply_batch([], records)


def walk_forward(model: ReadModel, cid: str, limit: int, **filters) -> list[list[int]]:
    pages, after = [], None
    while True:
        found = model.message_page(cid, limit=limit, after=after, **filters)
        pages.append([m["row"] for m in found["items"]])
        assert (found["previous"] is None) == (after is None)  # only the first page has nothing before it
        if found["next"] is None:
            return pages
        assert found["next"] == found["items"][-1]["row"]
        after = found["next"]


def walk_back(model: ReadModel, cid: str, limit: int, last_row: int, **filters) -> list[list[int]]:
    pages, before = [], last_row + 1
    while True:
        found = model.message_page(cid, limit=limit, before=before, **filters)
        pages.append([m["row"] for m in found["items"]])
        assert found["next"] is not None or before == last_row + 1
        if found["previous"] is None:
            return pages[::-1]
        before = found["previous"]


FILTERS = [{}, {"status": "failed"}, {"reason": "carrier_rejected"}, {"status": "failed", "reason": "timed_out"},
           {"recipient": "555001"}, {"status": "opted_out", "recipient": "5550"}, {"status": "queued"}]


def expected_rows(filters: dict) -> list[int]:
    rows = []
    for row in range(2, SIZE + 2):
        status, reason = latest_status(row)
        if filters.get("status") not in (None, status) or filters.get("reason") not in (None, reason):
            continue
        if filters.get("recipient") and filters["recipient"] not in destination(row):
            continue
        rows.append(row)
    return rows


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()) or "all")
def test_keyset_pages_are_disjoint_complete_and_the_same_forward_and_back(model, filters):
    cid = str(uuid.uuid4())
    load_campaign(model, cid)
    load_campaign(model, str(uuid.uuid4()))  # another campaign's messages never show
    expected = expected_rows(filters)
    forward = walk_forward(model, cid, 7, **filters)
    flat = [row for page in forward for row in page]
    assert flat == expected  # in row order, none twice, none left out
    assert all(len(page) == 7 for page in forward[:-1])
    if expected:  # back from the end: the same rows, the short page first
        back = walk_back(model, cid, 7, expected[-1], **filters)
        assert [row for page in back for row in page] == expected and all(len(page) == 7 for page in back[1:])
    else:
        assert forward == [[]]
    found = model.message_page(cid, limit=7, **filters)
    for message in found["items"]:  # whole messages, as `messages()` gives them
        assert message in model.messages(cid, status=filters.get("status"), reason=filters.get("reason"))


def test_pages_backward_from_the_end_meet_the_first_page(model):
    cid = str(uuid.uuid4())
    load_campaign(model, cid)
    back = walk_back(model, cid, 50, SIZE + 1)
    assert [row for page in back for row in page] == list(range(2, SIZE + 2))
    assert [len(page) for page in back] == [30, 50, 50, 50, 50]  # the short page is the first one going back
    first = model.message_page(cid, limit=50)
    assert first["previous"] is None and first["next"] == 51


def test_a_page_whose_rows_no_longer_match_points_back_to_those_that_do(model):
    cid = str(uuid.uuid4())
    load_campaign(model, cid)
    past_the_end = model.message_page(cid, status="failed", after=SIZE + 1)
    assert past_the_end["items"] == [] and past_the_end["next"] is None
    back = model.message_page(cid, status="failed", before=past_the_end["previous"])
    assert [m["row"] for m in back["items"]] == expected_rows({"status": "failed"})[-50:]
    before_the_start = model.message_page(cid, status="failed", before=2)
    assert before_the_start["items"] == [] and before_the_start["previous"] is None
    assert model.message_page(cid, status="failed", after=before_the_start["next"])["items"][0]["row"] == 10
    with pytest.raises(ValueError):
        model.message_page(cid, after=3, before=9)


def test_keyset_pages_as_of_a_time(model):
    cid = str(uuid.uuid4())
    load_campaign(model, cid)
    moment = at(100 + 120)  # rows up to 120 final by then, the others still waiting
    waiting = model.message_page(cid, status="waiting", as_of=moment, limit=40)
    assert [m["row"] for m in waiting["items"]] == list(range(121, 161))
    assert {m["status"] for m in waiting["items"]} == {"waiting"} and waiting["next"] == 160
    later = model.message_page(cid, status="waiting", as_of=moment, limit=40, after=waiting["next"])
    assert later["items"][0]["row"] == 161 and later["previous"] == 161
    failed_then = model.message_page(cid, status="failed", as_of=moment, limit=100)
    assert [m["row"] for m in failed_then["items"]] == [r for r in expected_rows({"status": "failed"}) if r <= 120]


def test_failure_reasons_are_counted_by_reason(model):
    cid = str(uuid.uuid4())
    load_campaign(model, cid)
    failed = expected_rows({"status": "failed"})
    assert model.failure_reasons(cid) == {reason: sum(1 for r in failed if latest_status(r)[1] == reason)
                                          for reason in sorted(REASONS)}
    assert sum(model.failure_reasons(cid).values()) == model.counts(cid)["failed"]
    assert model.failure_reasons(str(uuid.uuid4())) == {}


def test_the_recipient_search_is_a_case_insensitive_part_of_the_destination(model):
    cid = str(uuid.uuid4())
    load_campaign(model, cid)
    assert [m["row"] for m in model.message_page(cid, recipient="5550042")["items"]] == [42]
    assert model.message_page(cid, recipient="Name42")["items"] == []  # variables are not searched
    assert model.message_page(cid, recipient="%")["items"] == []  # a wildcard is a character
    exported = list(model.iter_messages(cid, status="failed", recipient="55501"))
    assert [m["row"] for m in exported] == [r for r in expected_rows({"status": "failed"}) if "55501" in
                                            destination(r)]


def test_a_read_model_made_before_the_reason_index_gets_it_when_opened(model):
    cid = str(uuid.uuid4())
    load_campaign(model, cid)
    with model._backend.transaction() as s:
        for name in ADDED_INDEXES:
            s.run(f"DROP INDEX {name}")
    location = model.location if model.dialect.name == "sqlite" else model._backend.dsn
    with ReadModel(location) as reopened:
        with reopened._backend.session() as s:
            assert all(reopened._backend.index_exists(s, name) for name in ADDED_INDEXES)
        assert reopened.fed_from_start and reopened.counts(cid)["total"] == SIZE  # not rebuilt: kept


def test_sqlite_pages_range_scan_an_index_without_sorting(tmp_path):
    with ReadModel(tmp_path / "read-model.db") as model:
        cid = str(uuid.uuid4())
        for filters, index in (({}, "messages_by_campaign_row"), ({"status": "failed"}, "messages_by_campaign_status"),
                               ({"reason": "timed_out"}, "messages_by_campaign_reason")):
            where, params = model._message_filter(cid, filters.get("status"), filters.get("reason"), None)
            for sql in (f"SELECT * FROM messages WHERE {where} AND row > ? ORDER BY row LIMIT ?",
                        f"SELECT * FROM messages WHERE {where} AND row < ? ORDER BY row DESC LIMIT ?"):
                plan = " | ".join(model.explain(sql, [*params, 100, 51]))
                assert index in plan and "TEMP B-TREE" not in plan, plan


# ------------------------------------------------------------------ the page's plain rules

def test_the_filter_takes_what_the_selects_offer_and_nothing_else():
    assert Filter.parse("", " ", "  ") == Filter() and not Filter().active
    assert Filter.parse("failed", "timed_out", " +1202 ") == Filter("failed", "timed_out", "+1202")
    for status, reason in (("sent_ish", None), (None, "meh")):
        with pytest.raises(ConsoleRefused) as refused:
            Filter.parse(status, reason, None)
        assert refused.value.status_code == 422


def test_page_links_keep_the_filter_and_carry_one_cursor():
    filter_ = Filter("failed", None, "+1 202")
    links = page_links("/console/campaigns/c", filter_, {"previous": 12, "next": 99}, at="2026-01-05T09:00")
    kept = {"status": ["failed"], "q": ["+1 202"], "at": ["2026-01-05T09:00"]}
    for name, cursor in (("next", {"after": ["99"]}), ("previous", {"before": ["12"]}), ("first", {})):
        path, _, query = links[name].partition("?")
        assert path == "/console/campaigns/c" and parse_qs(query) == {**kept, **cursor}
    assert page_links("/p", Filter(), {"previous": None, "next": None}) == {"first": None, "previous": None,
                                                                            "next": None}


def test_the_matching_count_comes_from_the_counts_shown_unless_a_search_needs_its_own():
    counts, reasons = {"total": 10, "failed": 4, "delivered": 6}, {"timed_out": 1, "bounced": 3}
    assert matching_count(Filter(), counts, reasons) == 10
    assert matching_count(Filter("failed"), counts, reasons) == 4
    assert matching_count(Filter(None, "bounced"), counts, reasons) == 3
    assert matching_count(Filter("failed", "timed_out"), counts, reasons) == 1
    assert matching_count(Filter("delivered", "timed_out"), counts, reasons) == 0
    assert matching_count(Filter(None, None, "+1"), counts, reasons) is None


def test_an_as_of_time_is_a_utc_datetime_local_value():
    assert as_of_moment("2026-01-05T09:00") == "2026-01-05T09:00:00.000000Z"
    assert as_of_moment("2026-01-05T09:00:07.5") == "2026-01-05T09:00:07.500000Z"
    for wrong in ("yesterday", "2026-01-05", "2026-13-05T09:00", "2026-01-05T09:00Z"):
        with pytest.raises(ConsoleRefused):
            as_of_moment(wrong)


def test_the_history_names_who_acted_by_the_field_each_event_has():
    assert issued_by({"type": "CampaignRunStarted", "accepted_by": "user:ann"}) == "user:ann"
    assert issued_by({"type": "CampaignStopped", "stopped_by": "user:bob"}) == "user:bob"
    assert issued_by({"type": "CampaignCreated", "created_by": "grace"}) == "grace"
    assert issued_by({"type": "RetryStarted", "issued_by": "user:cy"}) == "user:cy"
    assert issued_by({"type": "RetryStarted"}) is None
    assert event_words({"type": "CommandRejected", "command_type": "RunCampaign", "reason": "channel_busy",
                        "detail": "held by x"}) == "RunCampaign refused, channel_busy: held by x"
    assert event_words({"type": "CampaignStatusChanged", "status": "complete", "previous_status": "in_progress",
                        "stopped": True, "counts": {"total": 3, "delivered": 2, "cancelled": 1}}) == \
        "In Progress → Complete (stopped); Delivered 2, Cancelled 1"


# ------------------------------------------------------------------ on a whole stack, over HTTP, signed in

STACK_SERVICES = tuple(SERVICES)  # the API too: the console is its pages
TAIL_TOPICS = (topics.COMMANDS, topics.CAMPAIGN_EVENTS)
PASSWORD = "correct horse battery"
DELIVERED = 120
FAILING = {  # destination: (status, reason), as the simulator answers them (services/common/simulation.py)
    "+13205550102": ("failed", "undeliverable"),
    "+13215550102": ("failed", "undeliverable"),
    "+13225550103": ("failed", "carrier_rejected"),
    "+15005550001": ("failed", "invalid_destination"),
    "+13235550106": ("failed", "timed_out"),  # never answered: Sending beyond the 5 s limit of this stack
}
TOTAL = DELIVERED + len(FAILING)


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    return stack_environment(stack_bootstrap, tmp_path_factory.mktemp("console-view-data"),
                             OUTREACH_SENDING_TIMEOUT_S="5")


@pytest.fixture(scope="module")
def people(env) -> None:
    """Console accounts in the stack's own store (PostgreSQL here: what the API reads)."""
    with ApiStore.open(Settings(data_dir=env["OUTREACH_DATA_DIR"], event_store=env["OUTREACH_EVENT_STORE"],
                                postgres_dsn=env["OUTREACH_POSTGRES_DSN"])) as store:
        store.create_user("ann", "campaigner", PASSWORD, created_by="cli:test")
        store.create_user("otto", "operations", PASSWORD, created_by="cli:test")


@pytest.fixture
async def api(env, stack):
    async with api_client(env, stack_token(env, "grace", "campaigner")) as client:
        yield client


async def signed_in(env, username: str) -> httpx.AsyncClient:
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{env['OUTREACH_API_PORT']}", timeout=60)
    form = await client.get("/console/sign-in")
    answer = await client.post("/console/sign-in", data={"username": username, "password": PASSWORD,
                                                         "csrf_token": token_in(form.text)})
    assert answer.status_code == 303 and answer.headers["location"] == "/console/", answer.text
    return client


def token_in(html: str, name: str = "csrf_token") -> str:
    found = re.search(rf'name="{name}" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


def count_in(html: str, status: str, attribute: str = "data-count") -> int:
    found = re.search(rf'{attribute}="{status}">(\d+)<', html)
    assert found, f"no {attribute}={status}"
    return int(found.group(1))


def table_rows(html: str) -> list[tuple[str, str]]:
    """(message id, status) of each row of the messages table, in order."""
    return re.findall(r'<tr data-message-id="([0-9a-f-]{36})" data-status="([a-z_]+)">', html)


def link(html: str, element_id: str) -> str | None:
    found = re.search(rf'<a href="([^"]+)"[^>]* id="{element_id}"', html)
    return found.group(1).replace("&amp;", "&") if found else None


async def progress_events(console: httpx.AsyncClient, campaign_id: str, into: list[dict]) -> None:
    async with console.stream("GET", f"/console/campaigns/{campaign_id}/progress", timeout=180) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        event, data = None, []
        async for line in response.aiter_lines():
            if line == "":
                if event == "progress" and data:
                    into.append(json.loads("\n".join(data)))
                event, data = None, []
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())


def contacts_csv() -> bytes:
    lines = ["phone,first_name\n"]
    lines += [f"{c['destination']},{c['variables']['name']}\n" for c in sms_contacts(DELIVERED)]
    lines += [f"{destination},Failing{n}\n" for n, destination in enumerate(FAILING)]
    return "".join(lines).encode()


async def ready_campaign(api: httpx.AsyncClient) -> tuple[str, str]:
    """A Ready campaign made through the API (a token's upload); (its id, when it became ready)."""
    created = await api.post("/campaigns", files={"contacts": ("people.csv", contacts_csv(), "text/csv")}, data={
        "name": "Console view", "channel": "sms", "template": json.dumps({"body": "Hi {{first_name}}"}),
        "consent_confirmed": "true"})
    assert created.status_code == 202, created.text
    campaign_id = created.json()["campaign_id"]

    async def ready() -> dict | None:
        response = await api.get(f"/campaigns/{campaign_id}")
        campaign = response.json() if response.status_code == 200 else None
        return campaign if campaign and campaign["status"] == "ready" and \
            campaign["counts"]["waiting"] == TOTAL else None

    campaign = await async_wait_until(ready, 60, 0.2, message="never ready in the read model")
    return campaign_id, campaign["updated_at"]


@pytest.mark.e2e
@pytest.mark.postgres
async def test_the_campaign_view_of_a_run_seen_by_a_signed_in_person(env, stack, people, api, tail):
    console = await signed_in(env, "ann")
    try:
        await walk_through_the_view(env, console, api, tail)
    finally:
        await console.aclose()


async def walk_through_the_view(env, console: httpx.AsyncClient, api: httpx.AsyncClient, tail) -> None:
    campaign_id, ready_at = await ready_campaign(api)
    view = f"/console/campaigns/{campaign_id}"

    # Before the run: the counts at load, the live stream's first event, no Stop or Retry to offer.
    before = await console.get(view)
    assert before.status_code == 200 and "Content-Security-Policy" in before.headers
    assert count_in(before.text, "total") == TOTAL and count_in(before.text, "waiting") == TOTAL
    assert 'data-action="run"' in before.text and 'data-action="stop"' not in before.text
    assert f'data-progress-url="{view}/progress"' in before.text and 'src="/console/static/campaign_view.js"' in \
        before.text
    updates: list[dict] = []
    watcher = asyncio.create_task(progress_events(console, campaign_id, updates))
    await async_wait_until(lambda: updates, 30, message="no first progress event")
    assert updates[0]["status"] == "ready" and updates[0]["counts"]["waiting"] == TOTAL

    # Run it through the console's Run Campaign confirmation (campaigns.py), as ann.
    run_form = await console.get(f"{view}/run")
    assert run_form.status_code == 200, run_form.text
    run = await console.post(f"{view}/run", data={
        "csrf_token": token_in(run_form.text), "form_key": token_in(run_form.text, "form_key"),
        **{flag: "true" for flag in ALL_TRUE}})
    assert run.status_code == 303, run.text

    # The live counts move while it runs, and the stream ends once the campaign is final.
    await asyncio.wait_for(watcher, 180)
    final = updates[-1]
    assert final["final"] and final["status"] == "complete_with_errors", final
    assert final["counts"]["delivered"] == DELIVERED and final["counts"]["failed"] == len(FAILING)
    assert final["reasons"] == {"undeliverable": 2, "carrier_rejected": 1, "invalid_destination": 1,
                                "timed_out": 1}
    assert any(u["status"] == "in_progress" for u in updates) and len(updates) >= 3, updates
    done = [u["done"] for u in updates]
    assert done == sorted(done) and all(a != b for a, b in zip(updates, updates[1:]))

    # The page at load, after the run: counts by status and by reason; Retry failed offered, Stop not.
    after = (await console.get(view)).text
    assert count_in(after, "delivered") == DELIVERED and count_in(after, "failed") == len(FAILING)
    assert count_in(after, "undeliverable", "data-reason-count") == 2
    assert count_in(after, "timed_out", "data-reason-count") == 1 and 'data-final="true"' in after
    assert f'href="{view}/retry" data-action="retry"' in after and 'data-action="stop"' not in after

    # Filters: by status, by reason, both; the search of a recipient.
    failed = (await console.get(view, params={"status": "failed"})).text
    assert len(table_rows(failed)) == len(FAILING) and {s for _, s in table_rows(failed)} == {"failed"}
    assert "of 5 messages matching the filter" in failed
    undeliverable = (await console.get(view, params={"reason": "undeliverable"})).text
    assert len(table_rows(undeliverable)) == 2 and undeliverable.count(">Undeliverable</td>") == 2
    timed_out = (await console.get(view, params={"status": "failed", "reason": "timed_out"})).text
    [(timed_out_id, _)] = table_rows(timed_out)
    assert "+13235550106" in timed_out
    searched = (await console.get(view, params={"q": "5550106"})).text
    assert [mid for mid, _ in table_rows(searched)] == [timed_out_id]
    assert table_rows((await console.get(view, params={"status": "delivered", "reason": "timed_out"})).text) == []

    # Keyset pages: Next page to the end, then Previous page back; disjoint, complete, the same pages.
    pages, address = [], view
    while address is not None:
        html = (await console.get(address)).text
        pages.append([mid for mid, _ in table_rows(html)])
        assert (link(html, "previous-page") is None) == (len(pages) == 1)
        address = link(html, "next-page")
        assert address is None or "after=" in address and "offset" not in address
    assert [len(p) for p in pages] == [50, 50, TOTAL - 100]
    every = [mid for page in pages for mid in page]
    assert len(set(every)) == TOTAL == len(every)
    assert set(every) == {ids.message_id(campaign_id, row) for row in range(2, TOTAL + 2)}
    back, address = [], link(html, "previous-page")
    while address is not None:
        html = (await console.get(address)).text
        back.insert(0, [mid for mid, _ in table_rows(html)])
        address = link(html, "previous-page")
    assert back == pages[:-1]
    filtered_next = link((await console.get(view, params={"status": "delivered"})).text, "next-page")
    assert "status=delivered" in filtered_next and "after=" in filtered_next  # the filter goes with the page

    # Export: the filter's messages, and all of them.
    export = await console.get(f"{view}/messages/export.csv", params={"status": "failed"})
    assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(export.text)))
    assert len(table) == len(FAILING) and {r["status"] for r in table} == {"failed"}
    assert {r["destination"].lstrip("'") for r in table} == set(FAILING)  # '+1...: the export's formula guard
    everything = list(csv.DictReader(io.StringIO((await console.get(f"{view}/messages/export.csv")).text)))
    assert len(everything) == TOTAL
    assert 'id="export-filtered"' in failed and f'href="{view}/messages/export.csv?status=failed"' in failed

    # One message's history, and its retry (timed out: retried only so), issued as user:ann.
    message_page = (await console.get(f"{view}/messages/{timed_out_id}")).text
    assert 'id="retry-message"' in message_page and "Timed out" in message_page
    assert re.search(r"<th scope=\"row\">Sending</th>", message_page)
    assert re.search(r"<th scope=\"row\">Failed</th>", message_page)
    confirm = await console.get(f"{view}/messages/{timed_out_id}/retry")
    assert 'id="timed-out-warning"' in confirm.text
    unguarded = await console.post(f"{view}/messages/{timed_out_id}/retry", data={})
    assert unguarded.status_code == 403  # no CSRF token: nothing issued
    retried = await console.post(f"{view}/messages/{timed_out_id}/retry", data={
        "csrf_token": token_in(confirm.text), "form_key": token_in(confirm.text, "form_key")})
    assert retried.status_code == 200 and 'id="retry-done"' in retried.text, retried.text
    retry_commands = [c for c in tail.values(topics.COMMANDS) if isinstance(c, dict)
                      and c.get("type") == "RetryFailedMessages" and c.get("campaign_id") == campaign_id]
    assert [(c["issued_by"], c["issued_via"], c["message_ids"]) for c in retry_commands] == [
        ("user:ann", "api", [timed_out_id])]

    # The campaign's history names who acted; the campaign as of when it was ready.
    async def history_with_the_retry() -> str | None:
        html = (await console.get(f"{view}/history")).text
        return html if 'data-event-type="RetryStarted"' in html else None

    history = await async_wait_until(history_with_the_retry, 30, 0.2, message="no RetryStarted in the history")
    run_row = re.search(r'<tr data-event-type="CampaignRunStarted".*?</tr>', history, re.S).group()
    assert "<td data-issued-by>user:ann</td>" in run_row and "<td>api</td>" in run_row
    retry_row = re.search(r'<tr data-event-type="RetryStarted".*?</tr>', history, re.S).group()
    assert "<td>api</td>" in retry_row and "1 queued again" in retry_row
    created_row = re.search(r'<tr data-event-type="CampaignCreated".*?</tr>', history, re.S).group()
    assert "<td data-issued-by>grace</td>" in created_row  # the token's principal
    moment = datetime.fromisoformat(ready_at.replace("Z", "+00:00")).strftime("%Y-%m-%dT%H:%M:%S.%f")
    then = await console.get(f"{view}/as-of", params={"at": moment})
    assert then.status_code == 200 and "data-campaign-status>Ready<" in then.text
    assert count_in(then.text, "waiting") == TOTAL and {s for _, s in table_rows(then.text)} == {"waiting"}
    assert "after=" in link(then.text, "next-page") and "at=" in link(then.text, "next-page")


@pytest.mark.e2e
@pytest.mark.postgres
async def test_the_view_is_for_campaign_roles_only(env, stack, people, api):
    campaign_id, _ = await ready_campaign(api)
    operations = await signed_in(env, "otto")
    ann = await signed_in(env, "ann")
    try:
        for path in ("", "/history", "/progress", "/messages/export.csv", "/as-of"):
            refused = await operations.get(f"/console/campaigns/{campaign_id}{path}")
            assert refused.status_code == 403, (path, refused.status_code)
        assert (await ann.get(f"/console/campaigns/{uuid.uuid4()}")).status_code == 404
        assert (await ann.get(f"/console/campaigns/{campaign_id}/messages/{uuid.uuid4()}")).status_code == 404
        assert (await ann.get(f"/console/campaigns/{campaign_id}", params={"status": "lost"})).status_code == 422
        async with httpx.AsyncClient(base_url=str(ann.base_url)) as nobody:
            anonymous = await nobody.get(f"/console/campaigns/{campaign_id}")
        assert anonymous.status_code == 303 and anonymous.headers["location"] == "/console/sign-in"
    finally:
        await operations.aclose()
        await ann.aclose()
