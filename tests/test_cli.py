"""The CLI: CSV import rules, AddContacts chunking, and refusals that send nothing."""
import json
import uuid

import httpx
import pytest
from typer.testing import CliRunner

from outreach import api_client
from outreach.cli import app
from outreach.client import add_contacts_commands
from schemas.commands import parse_command
from services.common import jsoncodec
from services.common.contacts_csv import MAX_CHUNK_BYTES, CsvError, chunk_contacts, parse_contacts_csv, read_contacts_csv
from services.projections.projector import ReadModel

runner = CliRunner()


# ------------------------------------------------------------------ CSV

def test_header_detected_when_destination_cell_is_not_plausible():
    parsed = parse_contacts_csv("name,phone\nAnn,+15555550100\nBob,+15555550101\n")
    assert parsed.has_header and parsed.destination_column == "phone"
    assert parsed.contacts == [
        {"row": 2, "destination": "+15555550100", "variables": {"name": "Ann"}},
        {"row": 3, "destination": "+15555550101", "variables": {"name": "Bob"}},
    ]


def test_no_header_when_first_line_holds_a_destination():
    parsed = parse_contacts_csv("+15555550100,Ann\n+15555550101,Bob\n")
    assert not parsed.has_header and parsed.destination_index == 0
    assert [c["row"] for c in parsed.contacts] == [1, 2]
    assert parsed.contacts[0]["variables"] == {"column_2": "Ann"}

    emails = parse_contacts_csv("Ann,ann@example.com\n")
    assert not emails.has_header and emails.destination_index == 1
    assert emails.contacts == [{"row": 1, "destination": "ann@example.com", "variables": {"column_1": "Ann"}}]


def test_invalid_first_destination_without_header_words_is_taken_as_a_header():
    # The rule is about plausibility only: a first line whose destination cell has no '+'/'@' is a header.
    parsed = parse_contacts_csv("5555550100,Ann\n+15555550101,Bob\n")
    assert parsed.has_header and [c["row"] for c in parsed.contacts] == [2]


def test_destination_column_option():
    text = "First Name,Mobile,Email\nAnn,+15555550100,ann@example.com\n"
    by_name = parse_contacts_csv(text, "Email")
    assert by_name.has_header and by_name.contacts[0]["destination"] == "ann@example.com"
    assert by_name.contacts[0]["variables"] == {"First Name": "Ann", "Mobile": "+15555550100"}
    assert parse_contacts_csv(text, "email").contacts[0]["destination"] == "ann@example.com"  # case-insensitive
    assert parse_contacts_csv(text).contacts[0]["destination"] == "+15555550100"  # "Mobile" by its name
    by_number = parse_contacts_csv("Ann,+15555550100\n", "2")
    assert not by_number.has_header and by_number.contacts[0]["destination"] == "+15555550100"
    with pytest.raises(CsvError):
        parse_contacts_csv(text, "phone")


def test_row_is_the_physical_line_number():
    text = (
        "name,phone,note\r\n"
        "Ann,+15555550100,hi\r\n"
        "\r\n"  # blank line 3: skipped, still counted
        'Bob,+15555550101,"two\r\nlines"\r\n'  # a record on lines 4-5
        "Cy,,\r\n"  # line 6: missing destination, sent as given (the handler reports it)
        "Di,+15555550103\r\n"  # line 7: short row
    )
    parsed = parse_contacts_csv(text)
    assert [(c["row"], c["destination"]) for c in parsed.contacts] == [
        (2, "+15555550100"), (4, "+15555550101"), (6, ""), (7, "+15555550103")]
    assert parsed.contacts[1]["variables"] == {"name": "Bob", "note": "two\r\nlines"}
    assert parsed.contacts[2]["variables"] == {"name": "Cy"}  # empty cells are left out


def test_bom_and_empty_file(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes("\ufeffphone,name\n+15555550100,Ann\n".encode())
    parsed = read_contacts_csv(path)
    assert parsed.columns == ["phone", "name"] and parsed.contacts[0]["row"] == 2
    assert parse_contacts_csv("").contacts == []


# ------------------------------------------------------------------ chunking

def contacts(n, variable_bytes=10):
    return [{"row": i + 2, "destination": f"+1555{i:07d}", "variables": {"v": "x" * variable_bytes}}
            for i in range(n)]


def test_chunks_hold_at_most_1000_contacts():
    cid = str(uuid.uuid4())
    commands = add_contacts_commands(cid, contacts(2500), "alice")
    assert [len(c["contacts"]) for c in commands] == [1000, 1000, 500]
    assert [c["chunk_no"] for c in commands] == [0, 1, 2]
    assert [c["last_chunk"] for c in commands] == [False, False, True]
    assert len({c["command_id"] for c in commands}) == 3
    rows = [contact["row"] for c in commands for contact in c["contacts"]]
    assert rows == list(range(2, 2502))
    for command in commands:
        parsed = parse_command(jsoncodec.dumps(command))  # valid on the wire
        assert parsed.campaign_id == cid and parsed.issued_by == "alice"


def test_chunks_stay_under_900_kib():
    commands = add_contacts_commands(str(uuid.uuid4()), contacts(1000, variable_bytes=3000), "alice")
    sizes = [len(jsoncodec.dumps(c)) for c in commands]
    assert len(commands) > 3 and all(size <= MAX_CHUNK_BYTES for size in sizes)
    assert max(sizes) > MAX_CHUNK_BYTES - 4000  # filled, not split needlessly
    assert sum(len(c["contacts"]) for c in commands) == 1000
    assert [c["last_chunk"] for c in commands].count(True) == 1 and commands[-1]["last_chunk"]


def test_chunking_edge_cases():
    assert list(chunk_contacts([], 100)) == [[]]  # an empty import still sends its last chunk
    assert add_contacts_commands(str(uuid.uuid4()), [], "a")[0]["last_chunk"] is True
    assert [len(c) for c in chunk_contacts(contacts(5), 100, max_contacts=2)] == [2, 2, 1]
    with pytest.raises(CsvError):
        list(chunk_contacts(contacts(1, variable_bytes=MAX_CHUNK_BYTES), 100))


# ------------------------------------------------------------------ refusals send nothing

@pytest.fixture
def fake_api(monkeypatch):
    """The CLI signed in to a fake API (httpx.MockTransport) that knows no campaign; `requests` records every
    request it gets."""
    requests: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        if request.method == "GET" and request.url.path.startswith("/campaigns/"):
            return httpx.Response(404, json={"detail": "no campaign"})
        return httpx.Response(500, json={"detail": "the fake API expected no such request"})

    monkeypatch.setenv("OUTREACH_API_URL", "http://api.invalid")
    monkeypatch.setenv("OUTREACH_API_TOKEN", "t0ken")
    monkeypatch.delenv("OUTREACH_READ_MODEL_URL", raising=False)
    monkeypatch.setattr(api_client, "TRANSPORT", httpx.MockTransport(handle))
    return requests


def test_run_without_disclaimer_refuses_and_sends_nothing(fake_api):
    campaign_id = str(uuid.uuid4())
    result = runner.invoke(app, ["campaign", "run", campaign_id])
    assert result.exit_code == 2, result.output
    assert "disclaimer" in result.output and "nothing was published" in result.output
    assert [(r.method, r.url.path) for r in fake_api] == [("GET", f"/campaigns/{campaign_id}")]  # the summary only


def test_run_summary_from_the_read_model_then_refusal(fake_api, tmp_path, monkeypatch):
    """With OUTREACH_READ_MODEL_URL (an operator's look at a read model) the summary is read there."""
    campaign_id = str(uuid.uuid4())
    summary = {"name": "Spring", "channel": "sms", "message_count": 2, "preview": "Hi Ann, spring sale",
               "encoding": "GSM-7", "segments": 1, "segments_total": 2, "rows_missing_variables": [3],
               "missing_variables_count": 1, "from_email": None, "from_name": None, "attachments": []}
    with ReadModel(tmp_path / "data" / "read-model.db") as model:
        model.apply_batch([
            {"type": "CampaignCreated", "event_id": str(uuid.uuid4()), "campaign_id": campaign_id, "sequence": 10,
             "occurred_at": "2024-05-01T12:00:00.000000Z", "causation_id": str(uuid.uuid4()), "name": "Spring",
             "channel": "sms", "template": {"body": "Hi {{name}}, spring sale"}, "created_by": "alice"},
            {"type": "CampaignReady", "event_id": str(uuid.uuid4()), "campaign_id": campaign_id, "sequence": 21,
             "occurred_at": "2024-05-01T12:00:00.000000Z", "causation_id": str(uuid.uuid4()), "message_count": 2,
             "summary": summary},
        ], [])
    monkeypatch.setenv("OUTREACH_READ_MODEL_URL", str(tmp_path / "data" / "read-model.db"))
    result = runner.invoke(app, ["campaign", "run", campaign_id, "--json"])
    assert result.exit_code == 2, result.output
    out = json.loads(result.output)
    assert out["run"] is False and out["summary"]["summary"]["preview"] == "Hi Ann, spring sale"
    assert out["summary"]["source"] == "read-model"

    text = runner.invoke(app, ["campaign", "run", campaign_id])
    assert text.exit_code == 2
    for expected in ("Spring", "Hi Ann, spring sale", "GSM-7", "1 row(s): 3"):
        assert expected in text.output
    assert fake_api == []


def test_stop_and_delete_need_confirmation(fake_api):
    campaign_id = str(uuid.uuid4())
    assert runner.invoke(app, ["campaign", "stop", campaign_id], input="n\n").exit_code == 2
    assert runner.invoke(app, ["campaign", "delete", campaign_id]).exit_code == 2  # no input: not confirmed
    assert fake_api == []
