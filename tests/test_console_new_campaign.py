"""The console's New campaign and Edit template (issue 14).

Pure parts first: the column mapping, the check of a file against the handler's rules (the same counts and
reasons as the importers' ImportCheck, the same contacts as the API's StreamedCsv), the variable profile's
missing variables (the handler's own report), the template form, the email preview, the import report of a
campaign's events; and editor.js's rules, run by node, agreeing with services/common/templating.py.

Then on a whole stack (every service a process, the API among them) over real HTTP with a console session:
a CSV with invalid rows (a bad number, a duplicate, an empty destination) uploaded, its columns mapped, the
check's counts and reasons and its invalid rows downloaded, a template with a missing variable flagged, the
campaign created as user:NAME and Ready, the import report from the handler's answer with its download; Edit
of the Ready campaign, refused once it has run; an email campaign with sender and attachments."""
from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from outreach.up import SERVICES
from services.api.console.csv_mapping import (DESTINATION, SKIP, VARIABLE, ColumnMapping, MappingProblems,
                                              VariableProfile, check_import, import_report, joined_invalid_rows,
                                              read_mapping, resolve, sample_csv)
from services.api.console.template_form import preview_html, read_template_form, sms_rules
from services.api.contacts_upload import StreamedCsv
from services.api.store import ApiStore
from services.common import templating
from services.common.contacts_csv import add_contacts_envelope_bytes
from services.common.import_check import ImportCheck
from services.common.settings import Settings
from tests.conftest import wait_until
from tests.e2e_fixtures import stack_token
from tests.e2e_stack import stack_environment

EDITOR_JS = Path(__file__).resolve().parents[1] / "services" / "api" / "console" / "static" / "editor.js"

SMS_CSV = (
    "phone,first_name,city,notes\n"
    "+14155550100,Ann,Paris,a\n"
    "+14155550101,,Rome,b\n"  # no first name: {{first_name}} stays literal here
    "12345,Bad,Oslo,c\n"  # invalid_e164
    "+14155550100,Dup,Lima,d\n"  # duplicate_destination (row 2's)
    ",Empty,Nice,e\n"  # missing_destination
    "+14155550102,Cy,,f\n"
)


def _file(text: str) -> io.BytesIO:
    return io.BytesIO(text.encode())


def _choices(**roles: str) -> dict[str, str]:
    return roles


# ------------------------------------------------------------------ the column mapping

def test_the_columns_are_proposed_as_the_importers_would_read_them():
    sample = sample_csv(_file(SMS_CSV))
    columns = sample.columns()
    assert [(c.label, c.role, c.variable) for c in columns] == [
        ("phone", DESTINATION, "phone"), ("first_name", VARIABLE, "first_name"), ("city", VARIABLE, "city"),
        ("notes", VARIABLE, "notes")]
    assert sample.layout.has_header and sample.preview(2) == [(2, ["+14155550100", "Ann", "Paris", "a"]),
                                                               (3, ["+14155550101", "", "Rome", "b"])]
    headerless = sample_csv(_file("Ann,+14155550100\nBob,+14155550101\n"))
    assert not headerless.layout.has_header
    assert [(c.label, c.name, c.role) for c in headerless.columns()] == [
        ("Column 1", "column_1", VARIABLE), ("Column 2", "column_2", DESTINATION)]


def test_a_mapping_needs_exactly_one_destination_and_distinct_usable_names():
    columns = sample_csv(_file(SMS_CSV)).columns()
    mapping = read_mapping({"role_0": DESTINATION, "role_1": VARIABLE, "variable_1": " name ", "role_2": SKIP,
                            "role_3": VARIABLE, "variable_3": "note"}, columns)
    assert mapping == ColumnMapping(0, {1: "name", 3: "note"})
    with pytest.raises(MappingProblems) as none:
        read_mapping({"role_0": SKIP}, columns)
    assert none.value.problems == ["choose exactly one Destination column (chosen: none)"]
    with pytest.raises(MappingProblems) as two:
        read_mapping({"role_0": DESTINATION, "role_1": DESTINATION}, columns)
    assert "chosen: phone, first_name" in str(two.value)
    with pytest.raises(MappingProblems) as names:
        read_mapping({"role_1": VARIABLE, "variable_1": "x", "role_2": VARIABLE, "variable_2": "x",
                      "role_3": VARIABLE, "variable_3": "{bad}"}, columns)
    assert names.value.problems == ["first_name and city are both named 'x': give each variable its own name",
                                    "notes: the variable name '{bad}' has a brace or a line break, so no "
                                    "{{placeholder}} could name it"]
    twin = sample_csv(_file("phone,x,x\n+14155550100,1,2\n")).columns()
    with pytest.raises(MappingProblems, match="more than one column is named 'x'"):
        read_mapping({"role_1": VARIABLE, "variable_1": "first", "role_2": SKIP}, twin)
    assert read_mapping({"role_1": SKIP, "role_2": SKIP}, twin).variables == {}  # unmapped twins are fine


def test_the_chosen_columns_become_the_api_create_form_fields():
    sample = sample_csv(_file(SMS_CSV))
    resolved = resolve(sample, ColumnMapping(0, {1: "name"}))
    assert resolved.to_json() == {"destination_column": "phone", "variables": {"first_name": "name"}}
    # Without a header, columns go by number; a destination whose first cell holds no + or @ makes the first
    # line a header again (the kernel's rule), and the names follow it.
    headerless = sample_csv(_file("Ann,+14155550100,x\nBob,+14155550101,y\n"))
    assert resolve(headerless, ColumnMapping(1, {0: "name"})).to_json() == {
        "destination_column": "2", "variables": {"column_1": "name"}}
    flipped = resolve(headerless, ColumnMapping(2, {0: "name"}))
    assert flipped.layout.has_header and flipped.variables == {"Ann": "name"}


def test_the_check_counts_what_the_importers_count_and_keeps_the_invalid_rows_cells():
    sample = sample_csv(_file(SMS_CSV))
    resolved = resolve(sample, ColumnMapping(0, {1: "first_name", 2: "city"}))
    invalid = io.StringIO()
    preview = check_import(_file(SMS_CSV), resolved, "sms", None, invalid, width=sample.width)
    # The importers' check (what the CLI and the API run before publishing) on the API's own reading of the file.
    upload = StreamedCsv(_file(SMS_CSV), resolved.destination_column, resolved.variables)
    api_check = ImportCheck("sms")
    upload.inspect(add_contacts_envelope_bytes("c", "user:x"), api_check)
    assert (preview.contacts, preview.valid, preview.invalid) == (api_check.contacts, api_check.valid,
                                                                  api_check.invalid) == (6, 3, 3)
    assert preview.invalid_reasons == api_check.invalid_reasons == {
        "invalid_e164": {"count": 1, "first_rows": [4]}, "duplicate_destination": {"count": 1, "first_rows": [5]},
        "missing_destination": {"count": 1, "first_rows": [6]}}
    assert list(csv.reader(io.StringIO(invalid.getvalue()))) == [
        ["row", "reason", "phone", "first_name", "city", "notes"], ["4", "invalid_e164", "12345", "Bad", "Oslo", "c"],
        ["5", "duplicate_destination", "'+14155550100", "Dup", "Lima", "d"],  # the export's formula guard
        ["6", "missing_destination", "", "Empty", "Nice", "e"]]
    profile = preview.profile
    assert (profile.contacts, profile.present, profile.first_rows) == (3, {"first_name": 2, "city": 2}, [2, 3, 7])
    assert profile.sample == {"row": 2, "destination": "+14155550100",
                              "variables": {"first_name": "Ann", "city": "Paris"}}


def test_the_check_reads_national_numbers_with_the_default_region():
    text = "phone,name\n(415) 555-0100,Ann\n415 555 0100,Twice\n"
    resolved = resolve(sample_csv(_file(text)), ColumnMapping(0, {1: "name"}))
    preview = check_import(_file(text), resolved, "sms", "US")
    assert (preview.valid, preview.invalid_reasons) == (1, {"duplicate_destination": {"count": 1, "first_rows": [3]}})


@pytest.mark.parametrize("channel, template", [
    ("sms", {"body": "Hi {{first_name}} of {{ city }}, {{ unknown }} {{first_name}}"}),
    ("sms", {"body": "No placeholder"}),
    ("email", {"subject": "For {{city}}", "html": "<p>{{first_name}} {{zip}}</p>", "from_email": "a@example.com"}),
])
def test_the_profiles_missing_variables_are_the_handlers_report(channel, template):
    text = SMS_CSV if channel == "sms" else SMS_CSV.replace("phone", "email").replace("+1415555010", "p@x.co").replace(
        "12345", "nope")
    resolved = resolve(sample_csv(_file(text)), ColumnMapping(0, {1: "first_name", 2: "city"}))
    profile = check_import(_file(text), resolved, channel, None).profile
    handler = ImportCheck(channel, template)
    StreamedCsv(_file(text), resolved.destination_column, resolved.variables).inspect(
        add_contacts_envelope_bytes("c", "user:x"), handler)
    ours = profile.missing(templating.template_texts(channel, template))
    assert [{k: v for k, v in m.items() if k != "mapped"} for m in ours] == handler.missing_variables
    assert all(m["mapped"] == (m["variable"] in ("first_name", "city")) for m in ours)
    restored = VariableProfile.from_json(json.loads(json.dumps(profile.to_json())))
    assert restored.missing(templating.template_texts(channel, template)) == ours


# ------------------------------------------------------------------ the template form and the previews

def test_the_template_form_makes_the_contracts_template_or_says_why_not():
    sms = read_template_form("sms", {"body": "Hi {{name}}\r\nbye"})
    assert sms.template == {"body": "Hi {{name}}\nbye"} and not sms.problems
    assert read_template_form("sms", {"body": ""}).problems == ["Message text: must not be empty"]
    email = read_template_form("email", {"subject": "S", "html": "<p>x</p>", "from_email": "news@example.com",
                                         "from_name": "News", "reply_to": ""},
                               [{"filename": "terms.pdf", "content_type": "application/pdf", "size_bytes": "1200",
                                 "status": "complete"}, {"filename": "", "content_type": "", "size_bytes": "",
                                                         "status": "complete"}])
    assert email.template == {"subject": "S", "html": "<p>x</p>", "from_email": "news@example.com",
                              "from_name": "News", "attachments": [{"filename": "terms.pdf",
                                                                    "content_type": "application/pdf",
                                                                    "size_bytes": 1200, "status": "complete"}]}
    wrong = read_template_form("email", {"subject": "", "html": "x", "from_email": "nobody"})
    assert wrong.problems[0] == "Subject: must not be empty" and wrong.problems[1].startswith("From email:")
    too_big = read_template_form("email", {"subject": "S", "html": "x", "from_email": "a@example.com"},
                                 [{"filename": "big.zip", "size_bytes": str(21 * 1024 * 1024), "status": "complete"}])
    assert too_big.problems == ["Template: attachments total 22020096 bytes, more than the 20971520 allowed"]


def test_the_email_preview_keeps_text_and_structure_only():
    html = ('<html><head><style>p{color:red}</style></head><body><p style="color:red" onclick="x()" align="center">'
            'Dear &lt;b&gt; Ann &amp; co</p><img src="http://tracker.example/p.png" alt="Logo"><script>alert(1)'
            '</script><a href="http://example.com">link</a><br/>end</body></html>')
    assert preview_html(html) == '<p align="center">Dear &lt;b&gt; Ann &amp; co</p>[image: Logo]<a>link</a><br>end'


def test_the_import_report_counts_each_chunk_once_from_the_handlers_answers():
    events = [
        {"type": "CampaignCreated"},
        {"type": "ContactsAdded", "chunk_no": 0, "valid": 2, "invalid": 1,
         "invalid_rows": [{"row": 4, "reason": "invalid_e164"}]},
        {"type": "ContactsAdded", "chunk_no": 0, "valid": 2, "invalid": 1,  # the same chunk sent again
         "invalid_rows": [{"row": 4, "reason": "invalid_e164"}]},
        {"type": "ContactsAdded", "chunk_no": 1, "valid": 1, "invalid": 2,
         "invalid_rows": [{"row": 9, "reason": "duplicate_destination"}, {"row": 7, "reason": "invalid_e164"}]},
        {"type": "CampaignReady"},
    ]
    report = import_report(events, expected_chunks=2)
    assert (report.valid, report.invalid, report.rows, report.chunks, report.finished) == (3, 3, 6, 2, True)
    assert report.reasons == {"invalid_e164": {"count": 2, "first_rows": [4, 7]},
                              "duplicate_destination": {"count": 1, "first_rows": [9]}}
    stored = io.StringIO("row,reason,phone,name\r\n4,invalid_e164,12345,Bad\r\n9,duplicate_destination,'+1,Dup\r\n")
    assert list(joined_invalid_rows(report.invalid_rows, stored)) == [
        ["row", "reason", "phone", "name"], ["4", "invalid_e164", "12345", "Bad"], ["7", "invalid_e164"],
        ["9", "duplicate_destination", "'+1", "Dup"]]
    assert not import_report(events[:2], expected_chunks=2).finished


# ------------------------------------------------------------------ editor.js agrees with the Python rules

TEXTS = [
    "", "Hello", "x" * 160, "x" * 161, "x" * 306, "x" * 307, "€" * 80, "€" * 81, "[]" * 40, "{{name}}" * 20,
    "é" * 160, "ç" * 70, "ç" * 71, "Ç" * 161, "😀" * 35, "😀" * 36, "a😀", "x" * 134 + "😀", "Ω" * 200,
    "line\nbreak\r\n\f", "tab\there", "Hi {{ first_name }}, {{city}}{{ city }} {{ }} {{a b}} {{x\ny}}",
    "{{\u00a0nb}} {{\u0085x}} {{\x1cy}} {{\ufeffz}} {{ \u3000w}} {{😀}} {{{{inner}}}}", "{{ name\t}} {{\tname}}",
]


def _node() -> str:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed (Debian's nodejs, which npm brings): editor.js cannot be run here")
    return node


def _run_editor_js(script: str, payload) -> object:
    program = ("const editor = require(process.argv[1]); const input = JSON.parse(require('fs').readFileSync(0, "
               "'utf8')); " + script)
    done = subprocess.run([_node(), "-e", program, str(EDITOR_JS)], input=json.dumps(payload), capture_output=True,
                          text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def test_editor_js_counts_encoding_and_segments_as_the_project_does():
    rules = sms_rules()
    out = _run_editor_js("console.log(JSON.stringify(input.texts.map(t => [editor.smsEncoding(t, input.rules), "
                         "editor.smsLength(t, input.rules), editor.smsSegments(t, input.rules)])))",
                         {"texts": TEXTS, "rules": rules})
    from services.api.console.template_form import SmsMeter
    expected = [[templating.sms_encoding(t), SmsMeter.of(t).length, templating.sms_segments(t)] for t in TEXTS]
    assert out == expected
    described = _run_editor_js("console.log(JSON.stringify(input.texts.map(t => editor.describe(t, input.rules))))",
                               {"texts": TEXTS, "rules": rules})
    assert described == [SmsMeter.of(t).describe() for t in TEXTS]


def test_editor_js_finds_and_renders_placeholders_as_the_project_does():
    variables = {"first_name": "Ann <&\"'>", "city": "", "a b": "AB", "name": "N", "nb": "no-break"}
    out = _run_editor_js("console.log(JSON.stringify(input.texts.map(t => [editor.placeholders(t), "
                         "editor.render(t, input.variables, false), editor.render(t, input.variables, true)])))",
                         {"texts": TEXTS, "variables": variables})
    expected = [[templating.placeholders(t), templating.render(t, variables),
                 templating.render_email("", t, variables)[1]] for t in TEXTS]
    assert out == expected


def test_editor_js_flags_the_missing_variables_as_the_profile_does():
    resolved = resolve(sample_csv(_file(SMS_CSV)), ColumnMapping(0, {1: "first_name", 2: "city"}))
    profile = check_import(_file(SMS_CSV), resolved, "sms", None).profile.to_json()
    texts = ["Hi {{first_name}} in {{city}} {{zip}}", "none", "{{ city }}"]
    out = _run_editor_js("console.log(JSON.stringify(input.texts.map(t => editor.missingVariables(t, input.profile))))",
                         {"texts": texts, "profile": profile})
    assert out == [VariableProfile.from_json(profile).missing(t) for t in texts]


# ------------------------------------------------------------------ on a whole stack

PASSWORD = "new campaign pass phrase"
STACK_SERVICES = tuple(SERVICES)  # the API too


@pytest.fixture(scope="module")
def env(stack_bootstrap, tmp_path_factory):
    return stack_environment(stack_bootstrap, tmp_path_factory.mktemp("console-new-campaign"))


def _store(env) -> ApiStore:
    return ApiStore.open(Settings(data_dir=env["OUTREACH_DATA_DIR"], event_store=env["OUTREACH_EVENT_STORE"],
                                  postgres_dsn=env["OUTREACH_POSTGRES_DSN"]))


@pytest.fixture(scope="module")
def accounts(env, stack):
    with _store(env) as store:
        for name, role in (("carla", "campaigner"), ("cody", "campaigner"), ("otto", "operations")):
            store.create_user(name, role, PASSWORD, created_by="cli:test")
    return env


@pytest.fixture(scope="module")
def api_url(env, stack) -> str:
    url = f"http://127.0.0.1:{env['OUTREACH_API_PORT']}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, 90, 0.2, message="the API did not start")
    return url


@pytest.fixture(scope="module")
def api(env, api_url):
    with httpx.Client(base_url=api_url, timeout=60,
                      headers={"Authorization": f"Bearer {stack_token(env, 'reader', 'campaigner')}"}) as client:
        yield client


def _token(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


def _console(api_url: str, username: str) -> tuple[httpx.Client, str]:
    client = httpx.Client(base_url=api_url, timeout=120, follow_redirects=False)
    form = client.get("/console/sign-in")
    signed = client.post("/console/sign-in", data={"username": username, "password": PASSWORD,
                                                   "csrf_token": _token(form.text)})
    assert signed.status_code == 303, signed.text
    return client, _token(client.get("/console/").text)


@pytest.fixture
def carla(accounts, api_url):
    client, token = _console(api_url, "carla")
    with closing(client):
        yield client, token


def _upload(client: httpx.Client, token: str, text: str, name: str, channel: str = "sms") -> str:
    answer = client.post("/console/campaigns/new", data={"csrf_token": token, "name": name, "channel": channel,
                                                         "description": "from the test"},
                         files={"contacts": ("people.csv", text.encode(), "text/csv")})
    assert answer.status_code == 303, answer.text
    location = answer.headers["location"]
    assert re.fullmatch(r"/console/campaigns/new/[A-Za-z0-9_-]{24}/columns", location)
    return location.removesuffix("/columns")


def _report(client: httpx.Client, campaign_id: str) -> str:
    def finished() -> str | None:
        page = client.get(f"/console/campaigns/{campaign_id}/import-report")
        assert page.status_code == 200, page.text
        return page.text if 'id="import-done"' in page.text else None

    return wait_until(finished, 60, 0.3, message="the import was never finished")


def _ready(api: httpx.Client, campaign_id: str) -> dict:
    def ready() -> dict | None:
        answer = api.get(f"/campaigns/{campaign_id}")
        return answer.json() if answer.status_code == 200 and answer.json()["status"] == "ready" else None

    return wait_until(ready, 60, 0.2, message="never ready in the read model")


def _cells(html: str, element_id: str) -> str:
    found = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', html)
    assert found, element_id
    return found.group(1).strip()


@pytest.mark.e2e
@pytest.mark.postgres
def test_a_csv_with_invalid_rows_becomes_a_ready_campaign_issued_by_the_person(carla, api, env):
    client, token = carla
    base = _upload(client, token, SMS_CSV, "Spring SMS")

    columns = client.get(f"{base}/columns")
    assert columns.status_code == 200
    for label in ("phone", "first_name", "city", "notes"):  # each column's select, labelled by its name
        assert re.search(rf'<label for="role_\d">{label}</label>', columns.text)
    assert 'aria-label="Variable name for first_name"' in columns.text and "+14155550100" in columns.text

    refused = client.post(f"{base}/columns", data={"csrf_token": token, "role_0": "skip", "role_1": "variable"})
    assert refused.status_code == 422 and "choose exactly one Destination column" in refused.text
    mapped = client.post(f"{base}/columns", data={
        "csrf_token": token, "role_0": "destination", "role_1": "variable", "variable_1": "first_name",
        "role_2": "variable", "variable_2": "city", "role_3": "skip"})
    assert mapped.status_code == 303 and mapped.headers["location"] == f"{base}/template"

    editor = client.get(f"{base}/template")
    assert editor.status_code == 200
    assert _cells(editor.text, "valid-count") == "3 valid" and _cells(editor.text, "invalid-count") == "3 invalid"
    for reason in ("invalid_e164", "duplicate_destination", "missing_destination"):
        assert f'data-reason="{reason}"' in editor.text
    checked = client.get(f"{base}/invalid-rows.csv")
    assert checked.status_code == 200 and checked.headers["content-disposition"].startswith("attachment")
    assert [r[:3] for r in csv.reader(io.StringIO(checked.text))][1:] == [
        ["4", "invalid_e164", "12345"], ["5", "duplicate_destination", "'+14155550100"],
        ["6", "missing_destination", ""]]

    # The no-script preview: the first contact's message, its encoding and segments, the missing variables.
    body = "Hi {{first_name}}, news for {{city}} {{zip}}"
    preview = client.post(f"{base}/template", data={"csrf_token": token, "body": body, "action": "preview"})
    assert preview.status_code == 200
    assert ">Hi Ann, news for Paris {{zip}}</p>" in preview.text
    # Braces are GSM-7 extension characters: a placeholder left as written costs two septets for each.
    assert "For the first contact: GSM-7, 34 characters, 1 segment." in " ".join(preview.text.split())
    assert "<code>{{first_name}}</code>: empty for 1 of 3 contacts (row 3)" in preview.text
    assert "<code>{{zip}}</code>: no column is mapped to it: stays as written in all 3 messages" in preview.text
    # Missing variables are flagged before anything is created: "Create anyway" must be ticked.
    flagged = client.post(f"{base}/template", data={"csrf_token": token, "body": body, "action": "create",
                                                    "consent_confirmed": "true"})
    assert flagged.status_code == 422 and "tick “Create anyway”" in flagged.text
    no_consent = client.post(f"{base}/template", data={"csrf_token": token, "body": "Hi {{city}}",
                                                       "action": "create", "accept_missing": "true"})
    assert no_consent.status_code == 422 and "Confirm that the contacts consented" in no_consent.text

    created = client.post(f"{base}/template", data={"csrf_token": token, "body": body, "action": "create",
                                                    "consent_confirmed": "true", "accept_missing": "true"})
    assert created.status_code == 303, created.text
    campaign_id = re.fullmatch(r"/console/campaigns/([0-9a-f-]{36})/import-report", created.headers["location"])[1]
    assert client.get(f"{base}/template").status_code == 404  # the upload is gone once the campaign is made

    report = _report(client, campaign_id)
    assert (_cells(report, "rows-imported"), _cells(report, "valid-rows"), _cells(report, "invalid-rows")) == (
        "6", "3", "3")
    assert f'href="/console/campaigns/{campaign_id}"' in report and "Edit the template" in report
    download = client.get(f"/console/campaigns/{campaign_id}/invalid-rows.csv")
    assert download.status_code == 200 and download.headers["content-type"].startswith("text/csv")
    assert list(csv.reader(io.StringIO(download.text))) == [
        ["row", "reason", "phone", "first_name", "city", "notes"], ["4", "invalid_e164", "12345", "Bad", "Oslo", "c"],
        ["5", "duplicate_destination", "'+14155550100", "Dup", "Lima", "d"],
        ["6", "missing_destination", "", "Empty", "Nice", "e"]]

    campaign = _ready(api, campaign_id)
    assert campaign["name"] == "Spring SMS" and campaign["description"] == "from the test"
    assert campaign["created_by"] == "user:carla" and campaign["template"] == {"body": body}
    assert campaign["message_count"] == 3
    first = api.get(f"/campaigns/{campaign_id}/messages").json()["items"][0]
    assert first["variables"] == {"first_name": "Ann", "city": "Paris"}  # notes not imported
    history = api.get(f"/campaigns/{campaign_id}/history", params={"include_messages": "false"}).json()
    assert history[0]["type"] == "CampaignCreated" and history[0]["created_by"] == "user:carla"


@pytest.mark.e2e
@pytest.mark.postgres
def test_an_upload_is_its_owners_and_operations_has_no_new_campaign(carla, api_url):
    client, token = carla
    base = _upload(client, token, SMS_CSV, "Mine")
    other, _ = _console(api_url, "cody")
    with closing(other):
        assert other.get(f"{base}/columns").status_code == 404
    operations, _ = _console(api_url, "otto")
    with closing(operations):
        assert operations.get("/console/campaigns/new").status_code == 403
    refused = client.post("/console/campaigns/new", data={"csrf_token": token, "name": "", "channel": "fax"},
                          files={"contacts": ("empty.csv", b"", "text/csv")})
    assert refused.status_code == 422
    assert "Give the campaign a name." in refused.text and "Choose the channel" in refused.text
    empty = client.post("/console/campaigns/new", data={"csrf_token": token, "name": "Empty", "channel": "sms"},
                        files={"contacts": ("empty.csv", b"\n\n", "text/csv")})
    assert empty.status_code == 422 and "no line with a value" in empty.text
    cancelled = client.post(f"{base}/cancel", data={"csrf_token": token})
    assert cancelled.status_code == 303 and client.get(f"{base}/columns").status_code == 404


def _create_sms(client: httpx.Client, token: str, name: str, text: str, body: str) -> str:
    base = _upload(client, token, text, name)
    mapped = client.post(f"{base}/columns", data={"csrf_token": token, "role_0": "destination",
                                                  "role_1": "variable", "variable_1": "name"})
    assert mapped.status_code == 303, mapped.text
    created = client.post(f"{base}/template", data={"csrf_token": token, "body": body, "action": "create",
                                                    "consent_confirmed": "true"})
    assert created.status_code == 303, created.text
    return created.headers["location"].split("/")[3]


@pytest.mark.e2e
@pytest.mark.postgres
def test_edit_changes_a_ready_campaigns_template_and_nothing_once_it_ran(carla, api):
    client, token = carla
    campaign_id = _create_sms(client, token, "To edit", "phone,name\n+12025550100,Ann\n+12035550100,Bob\n",
                              "Hello {{name}}")
    _ready(api, campaign_id)
    page = client.get(f"/console/campaigns/{campaign_id}/edit")
    assert page.status_code == 200 and "Hello {{name}}</textarea>" in page.text
    assert "2 messages (locked)" in page.text and 'data-variable="name"' in page.text
    unmapped = client.post(f"/console/campaigns/{campaign_id}/edit", data={
        "csrf_token": token, "body": "Hi {{nickname}}", "action": "save"})
    assert unmapped.status_code == 422 and "tick “Save anyway”" in unmapped.text
    saved = client.post(f"/console/campaigns/{campaign_id}/edit", data={
        "csrf_token": token, "body": "Hi {{name}} 👋", "action": "save"})
    assert saved.status_code == 303 and saved.headers["location"] == f"/console/campaigns/{campaign_id}"
    edited = wait_until(lambda: (c := api.get(f"/campaigns/{campaign_id}").json())["template"] == {
        "body": "Hi {{name}} 👋"} and c, 30, 0.2, message="the template never changed")
    assert edited["status"] == "ready" and edited["summary"]["encoding"] == "UCS-2"
    history = api.get(f"/campaigns/{campaign_id}/history", params={"include_messages": "false"}).json()
    updated = [e for e in history if e["type"] == "TemplateUpdated"]
    assert len(updated) == 1 and updated[0]["issued_via"] == "api"

    run = api.post(f"/campaigns/{campaign_id}/run", json={"disclaimer": {
        "consent": True, "content_compliance": True, "opt_out": True, "data_responsibility": True}})
    assert run.status_code == 202, run.text
    wait_until(lambda: api.get(f"/campaigns/{campaign_id}").json()["status"] != "ready", 30, 0.2)
    refused = client.get(f"/console/campaigns/{campaign_id}/edit")
    assert refused.status_code == 409 and "Only a Ready campaign can be edited" in refused.text
    assert client.post(f"/console/campaigns/{campaign_id}/edit", data={
        "csrf_token": token, "body": "Too late", "action": "save"}).status_code == 409


@pytest.mark.e2e
@pytest.mark.postgres
def test_an_email_campaign_with_its_sender_and_attachments(carla, api):
    client, token = carla
    text = "email,first_name\nann@example.com,Ann\nnot-an-address,X\n"
    base = _upload(client, token, text, "Spring email", channel="email")
    assert client.post(f"{base}/columns", data={"csrf_token": token, "role_0": "destination", "role_1": "variable",
                                                "variable_1": "first_name"}).status_code == 303
    fields = {"csrf_token": token, "subject": "News for {{first_name}}", "html": "<p>Dear {{first_name}}</p>",
              "from_email": "news@example.com", "from_name": "News", "reply_to": "help@example.com",
              "attachment_filename": ["terms.pdf", ""], "attachment_content_type": ["application/pdf", ""],
              "attachment_size_bytes": ["1200", ""], "attachment_status": ["complete", "complete"],
              "consent_confirmed": "true"}
    preview = client.post(f"{base}/template", data={**fields, "action": "preview"})
    assert preview.status_code == 200 and 'id="email-preview-subject">News for Ann<' in preview.text
    assert "&lt;p&gt;Dear Ann&lt;/p&gt;" in preview.text  # the frame's srcdoc, as an attribute
    created = client.post(f"{base}/template", data={**fields, "action": "create"})
    assert created.status_code == 303, created.text
    campaign_id = created.headers["location"].split("/")[3]
    report = _report(client, campaign_id)
    assert _cells(report, "valid-rows") == "1" and 'data-reason="invalid_email"' in report
    campaign = _ready(api, campaign_id)
    assert campaign["template"] == {"subject": "News for {{first_name}}", "html": "<p>Dear {{first_name}}</p>",
                                    "from_email": "news@example.com", "from_name": "News",
                                    "reply_to": "help@example.com",
                                    "attachments": [{"filename": "terms.pdf", "content_type": "application/pdf",
                                                     "size_bytes": 1200, "status": "complete"}]}
    assert campaign["summary"]["attachments"] == ["terms.pdf"]


@pytest.mark.e2e
@pytest.mark.postgres
def test_a_campaign_made_through_the_api_has_its_import_report_and_editor_too(carla, api):
    client, token = carla
    created = api.post("/campaigns", files={"contacts": ("api.csv", b"phone,name\n+12045550100,Ann\n+12045550101,\n"
                                                                    b"oops,Bad\n", "text/csv")},
                       data={"name": "From the API", "channel": "sms", "template": json.dumps({"body": "Hi"}),
                             "consent_confirmed": "true"})
    assert created.status_code == 202, created.text
    campaign_id = created.json()["campaign_id"]
    _ready(api, campaign_id)
    report = _report(client, campaign_id)
    assert (_cells(report, "valid-rows"), _cells(report, "invalid-rows")) == ("2", "1")
    rows = list(csv.reader(io.StringIO(client.get(f"/console/campaigns/{campaign_id}/invalid-rows.csv").text)))
    assert rows == [["row", "reason"], ["4", "invalid_e164"]]  # no cells: the console never saw the file
    # The editor learns the variables from the messages: `name` is empty in one of the two.
    flagged = client.post(f"/console/campaigns/{campaign_id}/edit", data={
        "csrf_token": token, "body": "Hi {{name}}", "action": "preview"})
    assert flagged.status_code == 200 and 'data-variable="name"' in flagged.text
    assert "<code>{{name}}</code>: empty for 1 of 2 contacts (row 3)" in flagged.text
