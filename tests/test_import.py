"""Import (contract v1.1), without a broker: the default region's normalisation (schemas/phone.py) in the
destination rule, the setting and the AddContacts field, the command handler applying it, the importers' check
before publishing (services/common/import_check.py), missing variables at create and template update, and a CSV
exported by the API imported again unchanged."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from outreach import client
from outreach.cli import app as cli_app
from schemas.commands import MAX_CHUNK_BYTES, parse_command
from schemas.destinations import validate_destination
from schemas.phone import check_region, normalise_phone
from services.api.contacts_upload import StreamedCsv
from services.api.export import csv_blocks
from services.command_handler.application import OutreachApp
from services.common import jsoncodec, templating
from services.common.contacts_csv import parse_contacts_csv, unneutralise
from services.common.import_check import ImportCheck, import_region
from services.common.runtime import EXIT_CONFIG, settings_or_exit
from services.common.settings import Settings
from tests.handler_driver import Driver

# ------------------------------------------------------------------ the rule: normalisation with a default region

NORMALISED = [
    # (cell, region, destination): national and formatted numbers become E.164
    ("+1 (415) 555-0142", "US", "+14155550142"),
    (" +14155550141 ", "US", "+14155550141"),
    ("(415) 555-0142", "US", "+14155550142"),
    ("415.555.0142", "US", "+14155550142"),
    ("1-415-555-0142", "US", "+14155550142"),
    ("020 7946 0958", "GB", "+442079460958"),
    ("06 12 34 56 78", "FR", "+33612345678"),
    ("+33 6 12 34 56 78", "US", "+33612345678"),  # an international number whatever the region
    ("011 44 20 7946 0958", "US", "+442079460958"),  # the region's international prefix
    # well-formed but unallocated: parse and format only, so still valid (the simulator's and Twilio's ranges)
    ("(202) 555-0103", "US", "+12025550103"),
    ("500-555-0006", "US", "+15005550006"),
]


@pytest.mark.parametrize("cell,region,expected", NORMALISED)
def test_a_default_region_normalises_national_and_formatted_numbers(cell, region, expected):
    assert validate_destination("sms", cell, region) == (expected, None)
    assert validate_destination("sms", cell) == (None, "invalid_e164")  # without a region: the strict rule


@pytest.mark.parametrize("cell", ["+4401234567", "+15005550006", "+12", "+999123"])
def test_a_cell_already_in_e164_is_kept_as_given_with_any_region(cell):
    # phonenumbers would rewrite +4401234567 (GB's national 0) or refuse +12: a region changes nothing valid
    for region in (None, "US", "GB", "FR"):
        assert validate_destination("sms", cell, region) == (cell, None)


@pytest.mark.parametrize("cell", [
    "12",  # too short (formatting it would make up +112)
    "555-0142",  # a local number without its area code
    "41555501421",  # too long for the US
    "415-555-0142 ext. 12",  # an extension: an SMS cannot reach it
    "abc", "+", "(415) 555-0142 / (415) 555-0143", "+999 1234", "1" * 300,
])
def test_what_is_not_a_possible_number_stays_invalid_with_a_region(cell):
    assert validate_destination("sms", cell, "US") == (None, "invalid_e164")


def test_missing_and_email_destinations_ignore_the_region():
    assert validate_destination("sms", "  ", "US") == (None, "missing_destination")
    assert validate_destination("sms", None, "US") == (None, "missing_destination")
    assert validate_destination("email", "Ada@Example.COM", "US") == ("Ada@example.com", None)
    assert validate_destination("email", "(415) 555-0142", "US") == (None, "invalid_email")


def test_regions_are_the_ones_phonenumbers_knows():
    assert check_region("US") == "US" and normalise_phone("(415) 555-0142", "US") == "+14155550142"
    for bad in ("us", "XX", "USA", "", None, 1):
        with pytest.raises(ValueError):
            check_region(bad)


# ------------------------------------------------------------------ the setting and the command's field

def test_the_setting_takes_any_case_and_refuses_an_unknown_region(monkeypatch):
    assert Settings().default_region is None
    assert Settings(default_region=" gb ").default_region == "GB"
    monkeypatch.setenv("OUTREACH_DEFAULT_REGION", "us")
    assert Settings().default_region == "US"
    monkeypatch.setenv("OUTREACH_DEFAULT_REGION", "")
    assert Settings().default_region is None  # empty is unset
    monkeypatch.setenv("OUTREACH_DEFAULT_REGION", "Narnia")
    with pytest.raises(ValidationError, match="OUTREACH_DEFAULT_REGION: 'NARNIA' is not a region"):
        Settings()


def test_a_service_refuses_an_unknown_region_with_its_configuration_exit_code(monkeypatch, caplog):
    monkeypatch.setenv("OUTREACH_DEFAULT_REGION", "XX")
    with pytest.raises(SystemExit) as exited:
        settings_or_exit()
    assert exited.value.code == EXIT_CONFIG
    assert "OUTREACH_DEFAULT_REGION: 'XX' is not a region phonenumbers knows" in caplog.text


@pytest.mark.parametrize("argv", [["-m", "services.command_handler"], ["-m", "services.api"],
                                  ["-m", "outreach.cli", "up"]])
def test_every_process_refuses_an_unknown_region_before_starting_anything(argv, tmp_path):
    env = {**os.environ, "OUTREACH_DEFAULT_REGION": "Atlantis", "OUTREACH_DATA_DIR": str(tmp_path),
           "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"}
    done = subprocess.run([sys.executable, *argv], cwd=Path(__file__).parents[1], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == EXIT_CONFIG, done.stderr[-3000:]
    assert "the configuration is refused: OUTREACH_DEFAULT_REGION: 'ATLANTIS' is not a region" in done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.iterdir())  # nothing started, nothing written


def test_an_import_region_is_its_own_option_else_the_setting():
    assert import_region(None, None) is None
    assert import_region(None, "US") == "US"
    assert import_region(" gb", "US") == "GB"
    assert import_region("", "US") == "US"
    with pytest.raises(ValueError, match="'ZZ'"):
        import_region("zz", "US")


def add_contacts(**payload) -> bytes:
    return jsoncodec.dumps({"type": "AddContacts", "command_id": str(uuid.uuid4()), "campaign_id": str(uuid.uuid4()),
                            "issued_by": "alice", "issued_at": "2026-01-05T09:00:00Z", "chunk_no": 0, "contacts": [],
                            "last_chunk": True, **payload})


def test_add_contacts_may_carry_a_default_region():
    assert parse_command(add_contacts()).default_region is None
    assert parse_command(add_contacts(default_region=None)).default_region is None
    assert parse_command(add_contacts(default_region="US")).default_region == "US"
    for bad in ("us", "XX", "USA", 1, True):
        with pytest.raises(ValidationError, match="default_region"):
            parse_command(add_contacts(default_region=bad))


# ------------------------------------------------------------------ the command handler applies it

def handler(default_region: str | None = None) -> Driver:
    settings = Settings(default_region=default_region)
    return Driver(OutreachApp(settings, env={"PERSISTENCE_MODULE": "eventsourcing.popo"}))


CONTACTS = [
    {"row": 2, "destination": "(415) 555-0142", "variables": {"name": "Ada"}},
    {"row": 3, "destination": "+14155550142", "variables": {"name": "Dup"}},  # the same number, once normalised
    {"row": 4, "destination": " +1 415 555 0143 ", "variables": {}},
    {"row": 5, "destination": "555-0142", "variables": {"name": "Local"}},
    {"row": 6, "destination": "", "variables": {"name": "Empty"}},
    {"row": 7, "destination": "+4401234567", "variables": {"name": "Kept"}},
]


def import_into(d: Driver, **add) -> tuple[str, list[dict]]:
    campaign_id = str(uuid.uuid4())
    d.send("CreateCampaign", campaign_id, name="c", channel="sms", template={"body": "Hi {{name}}"})
    return campaign_id, d.send("AddContacts", campaign_id, chunk_no=0, contacts=CONTACTS, last_chunk=True, **add)


def stored_destinations(d: Driver) -> dict[int, str]:
    return {r["value"]["row"]: r["value"]["destination"] for r in d.last
            if r["value"].get("type") == "MessageStatusChanged"}


@pytest.mark.parametrize("setting,field", [(None, "US"), ("US", None), ("GB", "US")])
def test_the_handler_normalises_with_the_commands_region_else_its_setting(setting, field):
    d = handler(setting)
    _, answer = import_into(d, **({} if field is None else {"default_region": field}))
    added, ready = answer[0], answer[1]
    assert (added["valid"], added["invalid"]) == (3, 3)
    assert {r["row"]: r["reason"] for r in added["invalid_rows"]} == {
        3: "duplicate_destination", 5: "invalid_e164", 6: "missing_destination"}
    # stored (and sent) as E.164; a cell already in E.164 as given
    assert stored_destinations(d) == {2: "+14155550142", 4: "+14155550143", 7: "+4401234567"}
    assert ready["type"] == "CampaignReady" and ready["message_count"] == 3
    # the run summary names the missing variable and its rows
    assert ready["summary"]["missing_variables"] == [{"variable": "name", "count": 1, "first_rows": [4]}]


def test_without_a_region_the_handler_keeps_the_strict_rule():
    d = handler(None)
    _, [added, *_] = import_into(d)
    assert (added["valid"], added["invalid"]) == (2, 4)
    assert {r["row"]: r["reason"] for r in added["invalid_rows"]} == {
        2: "invalid_e164", 4: "invalid_e164", 5: "invalid_e164", 6: "missing_destination"}


def test_an_unknown_region_in_the_command_is_invalid_command():
    d = handler(None)
    campaign_id = str(uuid.uuid4())
    d.send("CreateCampaign", campaign_id, name="c", channel="sms", template={"body": "Hi"})
    [rejected] = d.send("AddContacts", campaign_id, chunk_no=0, contacts=CONTACTS, last_chunk=True,
                        default_region="XX")
    assert rejected["type"] == "CommandRejected" and rejected["reason"] == "invalid_command"
    assert "default_region" in rejected["detail"]


def test_a_template_update_reports_the_variables_its_contacts_miss():
    d = handler("US")
    campaign_id, _ = import_into(d)
    [updated, *_] = d.send("UpdateTemplate", campaign_id, template={"body": "{{name}}, {{city}} {{ name }}"})
    assert updated["type"] == "TemplateUpdated"
    summary = updated["summary"]
    assert summary["missing_variables"] == [{"variable": "name", "count": 1, "first_rows": [4]},
                                            {"variable": "city", "count": 3, "first_rows": [2, 4, 7]}]
    assert summary["missing_variables_count"] == 3 and summary["rows_missing_variables"] == [2, 4, 7]


def test_the_missing_variables_report_is_bounded():
    names = [f"v{i}" for i in range(60)] + ["x" * 300]
    report = templating.MissingVariables("".join(f"{{{{{n}}}}}" for n in ["x" * 300, *names]))
    for row in range(2, 12):
        assert report.add(row, {"v0": "set"})
    out = report.report()
    assert len(out) == 50 and report.rows == 10
    assert out[0]["variable"] == "x" * 199 + "…" and out[0]["count"] == 10 and out[0]["first_rows"] == [2, 3, 4, 5, 6]
    assert "v0" not in {m["variable"] for m in out}


# ------------------------------------------------------------------ the importers' check

def test_the_check_judges_rows_with_the_handlers_rules_and_reports_missing_variables():
    text = ("phone,name,city\n(415) 555-0142,Ada,\n+14155550142,Dup,x\n12,Bad,x\n,Empty,x\n"
            "415.555.0143,,Lyon\n'+14155550144,Quoted,Nice\n")
    contacts = parse_contacts_csv(text).contacts
    check = ImportCheck("sms", {"body": "Hi {{name}} from {{city}}"}, "US").add_all(contacts)
    assert check.as_dict() == {
        "contacts": 6, "valid": 3, "invalid": 3, "default_region": "US",
        "invalid_reasons": {"duplicate_destination": {"count": 1, "first_rows": [3]},
                            "invalid_e164": {"count": 1, "first_rows": [4]},
                            "missing_destination": {"count": 1, "first_rows": [5]}},
        # only the rows that become messages: the duplicate and the invalid rows are not counted
        "missing_variables": [{"variable": "name", "count": 1, "first_rows": [6]},
                              {"variable": "city", "count": 1, "first_rows": [2]}]}
    assert check.refusal() is None
    # the handler, given the same chunk and region, finds the same
    d = handler(None)
    campaign_id = str(uuid.uuid4())
    d.send("CreateCampaign", campaign_id, name="c", channel="sms", template={"body": "Hi {{name}} from {{city}}"})
    added, ready, _ = d.send("AddContacts", campaign_id, chunk_no=0, contacts=contacts, last_chunk=True,
                             default_region="US")
    assert (added["valid"], added["invalid"]) == (check.valid, check.invalid)
    assert ready["summary"]["missing_variables"] == check.missing_variables


def test_an_import_without_a_valid_row_is_refused_with_the_reasons_and_a_hint():
    empty = ImportCheck("sms", {"body": "Hi"}).add_all([])
    assert "has no contact" in empty.refusal() and "nothing was published" in empty.refusal()
    national = parse_contacts_csv("phone\n(415) 555-0142\n" + "".join(f"{i}\n" for i in range(10, 17))).contacts
    strict = ImportCheck("sms", {"body": "Hi"}).add_all(national)
    assert strict.valid == 0 and strict.invalid == 8
    message = strict.refusal("--default-region REGION")
    assert message.startswith("no valid contact among the CSV's 8 contacts: invalid_e164: 8 (rows 2, 3, 4, 5, 6, ...)")
    assert "--default-region REGION" in message and "OUTREACH_DEFAULT_REGION" in message
    assert ImportCheck("sms", {"body": "Hi"}, "US").add_all(national).refusal() is None  # row 2 is valid then
    emails = ImportCheck("email", None).add_all([{"row": 2, "destination": "nope", "variables": {}}])
    assert emails.refusal() == ("no valid contact among the CSV's 1 contacts: invalid_email: 1 (row 2); "
                                "nothing was published")


def test_the_cli_refuses_an_import_without_a_valid_row_before_connecting(tmp_path, monkeypatch):
    # No broker answers here: a CLI that tried to publish would wait and fail with 1, not refuse with 2.
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    monkeypatch.delenv("OUTREACH_DEFAULT_REGION", raising=False)
    runner = CliRunner()
    invalid = tmp_path / "invalid.csv"
    invalid.write_text("phone,name\n(415) 555-0142,Ada\n12,Bad\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("phone,name\n")
    base = ["campaign", "create", "--name", "x", "--channel", "sms", "--template-body", "Hi {{name}}"]

    result = runner.invoke(cli_app, [*base[:2], str(invalid), *base[2:], "--json"])
    assert result.exit_code == 2, result.output
    out = json.loads(result.output)
    assert "no valid contact" in out["error"] and "--default-region" in out["error"]
    assert out["check"]["valid"] == 0 and out["check"]["invalid_reasons"]["invalid_e164"]["first_rows"] == [2, 3]
    result = runner.invoke(cli_app, [*base[:2], str(empty), *base[2:]])
    assert result.exit_code == 2 and "has no contact" in result.output
    result = runner.invoke(cli_app, [*base[:2], str(invalid), *base[2:], "--default-region", "atlantis"])
    assert result.exit_code == 2 and "--default-region" in result.output
    monkeypatch.setenv("OUTREACH_DEFAULT_REGION", "XX")
    result = runner.invoke(cli_app, [*base[:2], str(invalid), *base[2:]])
    assert result.exit_code == 2 and "OUTREACH_DEFAULT_REGION" in result.output


def test_every_chunk_carries_the_imports_region_and_still_fits_the_limit():
    contacts = [{"row": i + 2, "destination": "(415) 555-0142", "variables": {"note": "x" * 900}} for i in range(2500)]
    commands = client.add_contacts_commands(str(uuid.uuid4()), contacts, "alice", default_region="US")
    assert [c["default_region"] for c in commands] == ["US"] * len(commands)
    assert all(len(jsoncodec.dumps(c)) <= MAX_CHUNK_BYTES for c in commands)
    assert sum(len(c["contacts"]) for c in commands) == 2500
    assert "default_region" not in client.add_contacts_commands(str(uuid.uuid4()), contacts[:1], "alice")[0]


# ------------------------------------------------------------------ CSV: the export's apostrophe, and a round trip

@pytest.mark.parametrize("cell,expected", [
    ("'+14155550142", "+14155550142"), ("'=SUM(A1)", "=SUM(A1)"), ("'-5", "-5"), ("'@home", "@home"),
    ("'tis", "'tis"), ("'", "'"), ("''+1", "''+1"), ("'\tx", "'\tx"), ("+1", "+1"), ("", ""),
])
def test_the_apostrophe_is_dropped_only_before_a_formula_character(cell, expected):
    assert unneutralise(cell) == expected


MESSAGES = [
    {"row": 2, "message_id": "m-2", "destination": "+14155550142", "status": "delivered", "attempt": 1, "run_no": 1,
     "variables": {"first_name": "Ada", "city": "=HYPERLINK(\"http://evil\")", "status": "vip", "row": "r2"}},
    {"row": 3, "message_id": "m-3", "destination": "+14155550143", "status": "failed", "reason": "undeliverable",
     "provider_code": "30005", "variables": {"first_name": "-Bob", "note": "'tis, @home"}},
    {"row": 5, "message_id": "m-5", "destination": "+442079460958", "status": "waiting", "variables": {}},
]


def test_a_csv_exported_by_the_api_imports_again_unchanged():
    exported = "".join(csv_blocks(lambda: iter(MESSAGES)))
    assert ",'+14155550142," in exported and "variable_status" in exported  # what the export writes
    parsed = parse_contacts_csv(exported)
    assert parsed.exported and parsed.has_header and parsed.destination_column == "destination"
    assert [(c["destination"], c["variables"]) for c in parsed.contacts] == [
        (m["destination"], m["variables"]) for m in MESSAGES]
    # the API's streamed reading gives the same contacts, and maps only the variables
    streamed = StreamedCsv(io.BytesIO(exported.encode()))
    layout = streamed.inspect(envelope_bytes=300)
    assert [c for chunk in streamed.chunks(envelope_bytes=300) for c in chunk] == parsed.contacts
    assert layout.variables == {"first_name": "first_name", "variable_row": "row", "city": "city",
                                "variable_status": "status", "note": "note"}
    # exported again, the same file (the new campaign's rows are its own line numbers)
    again = [{**m, "row": c["row"], "variables": c["variables"]} for m, c in zip(MESSAGES, parsed.contacts)]
    assert [c["row"] for c in parsed.contacts] == [2, 3, 4]
    assert "".join(csv_blocks(lambda: iter(again))).splitlines()[0] == exported.splitlines()[0]
    # and the check finds every row valid, without a default region
    assert ImportCheck("sms", {"body": "Hi {{first_name}}"}).add_all(parsed.contacts).as_dict()["valid"] == 3
