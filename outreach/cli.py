"""The `outreach` command line (Typer + rich).

    outreach login --url URL --token TOKEN        sign in: the campaign commands' API and bearer token
    outreach campaign create CSV --name N --channel sms|email (--template-body T | --template-file F)
    outreach campaign run ID --accept-disclaimer
    outreach campaign stop ID --yes | retry ID | delete ID --yes
    outreach campaign show ID [--watch] | events ID [--no-messages] [--as-of TIME] | list
    outreach up | replay | token | user ...       operator commands: local, on the stack's data folder
    outreach status [--json] | dlq list|show|replay   operator: every instance's health; parked records
    outreach broker | simulator

The campaign commands are a client of the HTTP API (outreach/api_client.py): `OUTREACH_API_URL` and
`OUTREACH_API_TOKEN`, else the config file `outreach login` writes (outreach/config.py), so they work from any
folder or machine and the audit trail names the token's principal. `show`, `events` and `list` read a read
model directly only when `OUTREACH_READ_MODEL_URL` is set (an operator pointing at one). Operator commands
(`up`, `replay`, `token`) stay local and find the stack's data folder without the current folder
(`OUTREACH_DATA_DIR`, else the stack file `outreach up` writes). Every campaign command takes `--json` for
machine-readable output. Exit codes: 0 done, 1 rejected / no answer / error, 2 refused or not confirmed
(nothing published) or bad usage (a malformed id included, refused before anything is contacted).
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from outreach import config
from outreach.api_client import ApiClient, ApiError, ApiUnreachable
from outreach.dlq import app as dlq_app
from outreach.replay import replay as replay_command
from outreach.tokens import app as token_app
from outreach.users import app as user_app
from schemas.events import FINAL_MESSAGE_STATUSES, MESSAGE_STATUSES
from schemas.ids import is_wire_uuid
from schemas.times import rfc3339
from services.common.contacts_csv import DESTINATION_NAMES, CsvError, read_contacts_csv
from services.common.import_check import ImportCheck, import_region
from services.common.settings import get_settings
from services.projections.views import ReadViews, settled

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Outreach: SMS and email campaigns on Kafka.")
campaign_app = typer.Typer(no_args_is_help=True, help="Create, run, stop, retry, delete and watch campaigns "
                                                      "(through the HTTP API: sign in with `outreach login`).")
app.add_typer(campaign_app, name="campaign")
app.add_typer(token_app, name="token")
app.add_typer(user_app, name="user")
app.add_typer(dlq_app, name="dlq")

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

EXIT_FAILED = 1
EXIT_REFUSED = 2
INVALID_ROWS_SHOWN = 5
DEFAULT_TIMEOUT_S = 30.0


class ChannelChoice(str, Enum):
    sms = "sms"
    email = "email"


def _check_id(value: str) -> str:
    """A campaign id in the contract's form (lowercase 8-4-4-4-12), else exit 2 before contacting anything."""
    if not is_wire_uuid(value):
        raise typer.BadParameter(f"{value!r} is not a campaign id (a lowercase UUID such as "
                                 "0b6c7a9e-5f1d-4c2b-9a8e-3d4f5a6b7c8d)")
    return value


def _check_message_ids(values: Optional[list[str]]) -> Optional[list[str]]:
    for value in values or ():
        if not is_wire_uuid(value):
            raise typer.BadParameter(f"{value!r} is not a message id (a lowercase UUID)")
    return values


JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON instead of text.")
TimeoutOpt = typer.Option(DEFAULT_TIMEOUT_S, "--timeout", min=0.1, help="Seconds to wait for each answer.")
YesOpt = typer.Option(False, "--yes", "-y", help="Confirm without asking.")
CampaignIdArg = typer.Argument(..., metavar="ID", callback=_check_id, help="The campaign id (a lowercase UUID).")


# ------------------------------------------------------------------ helpers

def _emit_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def _fail(message: str, code: int = EXIT_FAILED, *, as_json: bool = False, extra: dict | None = None) -> NoReturn:
    if as_json:
        _emit_json({"error": message, **(extra or {})})
    else:
        err.print(f"[red]{escape(message)}[/red]", soft_wrap=True)
    raise typer.Exit(code)


def _api(as_json: bool) -> ApiClient:
    """The client of the API this CLI is signed in to; exit 1 naming what is missing."""
    try:
        return ApiClient.from_config()
    except config.ConfigError as exc:
        _fail(str(exc), as_json=as_json)


def _api_call(as_json: bool, call, *args: Any, **kwargs: Any) -> Any:
    """`call(...)`; an unreachable API or an error answer (401, 403, 5xx...) becomes exit 1 saying which, a request
    the API refused before publishing anything (413, 422 without a handler's rejection) exit 2."""
    try:
        return call(*args, **kwargs)
    except ApiUnreachable as exc:
        _fail(str(exc), as_json=as_json)
    except ApiError as exc:
        hint = {401: " (the token is unknown or revoked: `outreach login` with a valid one)",
                403: " (the token's role may not do this)",
                413: "; nothing was published", 422: "; nothing was published"}.get(exc.status, "")
        code = EXIT_REFUSED if exc.status in (413, 422) else EXIT_FAILED
        _fail(f"{exc}{hint}", code, as_json=as_json, extra={"status": exc.status, "body": exc.body})


def _answer(api: ApiClient, accepted: dict[str, Any], timeout: float, as_json: bool,
            command_id: str | None = None, key: str = "events") -> list[dict[str, Any]]:
    """A command route's answer events (`accepted[key]`): given at once, or waited for (`GET /commands/ID?wait=`)
    while pending (a create is pending with its CreateCampaign answered and its last chunk not yet)."""
    if accepted.get("state") != "pending" or accepted.get(key):
        return accepted.get(key) or []
    command_id = command_id or accepted["command_id"]
    events = _api_call(as_json, api.wait_answer, accepted, command_id, timeout)
    if not events:
        _fail(f"no answer to {accepted.get('command_type')} {command_id} within {timeout:g} s; it was published and "
              f"its answer will be at GET /commands/{command_id} (are the command handler and the projections "
              "running?)", as_json=as_json, extra={"command_id": command_id, "campaign_id": accepted.get("campaign_id")})
    return events


def rejection(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The CommandRejected among answer events, if any."""
    return next((e for e in events if e.get("type") == "CommandRejected"), None)


class _ApiReads:
    """The read-model views the CLI uses, over the API (same names as services.projections.views.ReadViews)."""

    def __init__(self, api: ApiClient, as_json: bool):
        self.api = api
        self.as_json = as_json

    def __enter__(self) -> _ApiReads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.api.close()

    def _call(self, call, *args: Any, **kwargs: Any) -> Any:
        return _api_call(self.as_json, call, *args, **kwargs)

    def campaign(self, campaign_id: str) -> dict[str, Any] | None:
        return self._call(self.api.campaign, campaign_id)

    def campaigns(self) -> list[dict[str, Any]]:
        return self._call(self.api.list_campaigns)

    def iter_history(self, campaign_id: str, include_messages: bool = True) -> Iterator[dict[str, Any]]:
        return iter(self._call(self.api.history, campaign_id, include_messages=include_messages) or [])

    def as_of_campaign(self, campaign_id: str, moment: datetime) -> dict[str, Any] | None:
        return self._call(self.api.campaign, campaign_id, as_of=rfc3339(moment))

    def iter_as_of_messages(self, campaign_id: str, moment: datetime) -> Iterator[dict[str, Any]]:
        return self._call(lambda: list(self.api.iter_messages(campaign_id, as_of=rfc3339(moment))))


def _reads(as_json: bool) -> ReadViews | _ApiReads | None:
    """Where `show`, `events`, `list` and `run`'s summary read: the read model named by OUTREACH_READ_MODEL_URL
    (an operator's direct look; None if it has not been written yet), else the API."""
    if os.environ.get("OUTREACH_READ_MODEL_URL"):
        return ReadViews.open_existing(get_settings())
    return _ApiReads(_api(as_json), as_json)


def _describe_event(event: dict[str, Any]) -> str:
    kind = event.get("type")
    if kind == "CommandRejected":
        detail = f": {event.get('detail')}" if event.get("detail") else ""
        return f"{event.get('command_type')} rejected, {event.get('reason')}{detail}"
    if kind == "CampaignCreated":
        return f"{event.get('name')!r} ({event.get('channel')}) created by {event.get('created_by')}"
    if kind == "ContactsAdded":
        return f"chunk {event.get('chunk_no')}: {event.get('valid')} valid, {event.get('invalid')} invalid"
    if kind == "CampaignReady":
        return f"ready, {event.get('message_count')} messages"
    if kind == "TemplateUpdated":
        return "template updated"
    if kind == "CampaignRunStarted":
        return (f"run {event.get('run_no')} accepted by {event.get('accepted_by')}: {event.get('message_count')} "
                f"queued, {event.get('suppressed_count')} suppressed")
    if kind == "CampaignStopped":
        return f"stopped by {event.get('stopped_by')}: {event.get('cancelled_count')} cancelled"
    if kind == "RetryStarted":
        return f"retry as run {event.get('run_no')}: {event.get('message_count')} re-queued"
    if kind == "CampaignDeleted":
        return "deleted"
    if kind == "CampaignStatusChanged":
        counts = event.get("counts") or {}
        shown = ", ".join(f"{k} {v}" for k, v in counts.items() if v and k != "total")
        stopped = " (stopped)" if event.get("stopped") else ""
        return f"{event.get('previous_status')} -> {event.get('status')}{stopped}; total {counts.get('total', 0)}" + (
            f": {shown}" if shown else "")
    rest = {k: v for k, v in event.items()
            if k not in ("type", "event_id", "campaign_id", "sequence", "occurred_at", "causation_id")}
    return json.dumps(rest, default=str)[:200]


def _print_answer(events: list[dict[str, Any]], as_json: bool, **extra: Any) -> None:
    """Print answer events; a rejection exits 1."""
    rejected = rejection(events)
    if as_json:
        _emit_json({**extra, "rejected": rejected is not None, "events": events})
    else:
        for event in events:
            style = "red" if event.get("type") == "CommandRejected" else "green"
            console.print(f"[{style}]{event.get('type')}[/{style}]  {_describe_event(event)}")
    if rejected is not None:
        raise typer.Exit(EXIT_FAILED)


def _confirm(question: str) -> bool:
    try:
        return typer.confirm(question, default=False)
    except typer.Abort:  # no terminal / end of input
        return False


def _confirmed_or_exit(yes: bool, question: str, refusal: str, as_json: bool) -> None:
    """Go on with --yes or a yes to `question`; else exit 2 saying `refusal` (nothing was published)."""
    if not yes and not _confirm(question):
        _fail(f"{refusal} (confirm with --yes); nothing was published", EXIT_REFUSED, as_json=as_json)


# ------------------------------------------------------------------ broker

@app.command()
def broker() -> None:
    """Run the embedded broker (tansu, memory storage) at KAFKA_BOOTSTRAP_SERVERS until Ctrl-C / SIGTERM."""
    from services.common import logs
    from services.common.embedded_broker import run_forever

    logs.configure("broker")
    bootstrap = get_settings().kafka_bootstrap_servers
    console.print(f"embedded broker on {bootstrap} (memory only: everything is lost when it stops)", soft_wrap=True)
    raise typer.Exit(run_forever(bootstrap))


@app.command()
def simulator() -> None:
    """Run the provider simulator alone (Twilio and SendGrid APIs, signed callbacks) at
    OUTREACH_SIMULATOR_HOST:OUTREACH_SIMULATOR_PORT until Ctrl-C / SIGTERM."""
    from services.simulator.app import main as simulator_main

    simulator_main()


@app.command()
def up(
    demo: bool = typer.Option(False, "--demo", help="Run a sample SMS and a sample email campaign together."),
    exit_after_demo: bool = typer.Option(
        False, "--exit-after-demo", help="Stop everything after the demo's final summary (for tests and CI)."),
    demo_size: int = typer.Option(200, "--demo-size", min=1, max=10_000, help="Messages per demo campaign."),
    instances: list[str] = typer.Option(
        [], "--instances", metavar="SERVICE=N",
        help="Run N instances of a service (repeatable), e.g. --instances sender=2. Scalable: command-handler, relay "
             "(one publishes, the others stand by), sender, timeout-sweeper, projections, webhooks and api (sharing "
             "their port; with OUTREACH_EVENT_STORE=postgres for the API)."),
) -> None:
    """Run the embedded broker and every service in the foreground; Ctrl-C stops them all.

    With OUTREACH_EXTERNAL_KAFKA=true no broker is started: KAFKA_BOOTSTRAP_SERVERS is used as given.
    """
    from outreach.up import parse_instances, run_up
    from services.common import logs

    try:
        counts = parse_instances(instances)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--instances") from None
    # Its own lines (the embedded broker's, the supervisor's) in the services' format; WARNING unless
    # OUTREACH_LOG_LEVEL says otherwise: the report it prints is what a newcomer reads.
    logs.configure("up", default_level="WARNING")
    raise typer.Exit(run_up(demo=demo, exit_after_summary=exit_after_demo, demo_size=demo_size, instances=counts))


# ------------------------------------------------------------------ sign-in

@app.command()
def login(
    url: Optional[str] = typer.Option(None, "--url", help="The HTTP API, e.g. http://127.0.0.1:8080 (asked if not "
                                                          "given)."),
    token: Optional[str] = typer.Option(None, "--token", help="A bearer token (`outreach token create`, or POST "
                                                              "/tokens); asked without echo if not given."),
    check: bool = typer.Option(True, "--check/--no-check", help="Check that the API accepts the token first."),
) -> None:
    """Sign in: store the API's URL and a bearer token in the config file (mode 0600) the campaign commands use.

    The file is $XDG_CONFIG_HOME/outreach/config.toml (default ~/.config/outreach/config.toml; OUTREACH_CONFIG
    names another). OUTREACH_API_URL and OUTREACH_API_TOKEN, when set, win over it.
    """
    if url is None:
        url = typer.prompt("API URL", default=f"http://{get_settings().api_host}:{get_settings().api_port}")
    if token is None:
        token = typer.prompt("Token", hide_input=True)
    url, token = url.strip().rstrip("/"), token.strip()
    if not url.startswith(("http://", "https://")):
        _fail(f"--url {url!r}: give an http:// or https:// URL", EXIT_REFUSED)
    if not token:
        _fail("--token: empty", EXIT_REFUSED)
    if check:
        with ApiClient(config.ApiTarget(url, token, "login")) as api:
            _api_call(False, api.whoami_check)
    path = config.write_config(url, token)
    console.print(f"signed in to {url}; saved in {path}", soft_wrap=True)


# ------------------------------------------------------------------ campaign create

CREATE_HELP = "\n\n".join((
    "Create a campaign from a CSV of contacts and import them.",
    "The CSV is UTF-8 and comma-separated. The header row is optional: the first line is taken as a header "
    "when its destination cell is not a plausible destination (contains neither '+' nor '@').",
    "The destination column is --destination-column (a header name or a 1-based number), else a header named "
    f"{', '.join(DESTINATION_NAMES[:-1])} or {DESTINATION_NAMES[-1]}, else the first column whose "
    "first cell has a '+' or '@', else column 1. Other columns become template variables named by the header "
    "(column_N without one). Each contact's row is its physical line number (the header is line 1).",
    "SMS: --template-body TEXT (or --template-file with JSON {\"body\": ...} or plain text). Email: "
    "--template-file PATH, a JSON object {subject, html, from_email, from_name, reply_to?, attachments}.",
    "SMS destinations are E.164 (+14155550142). With --default-region (or OUTREACH_DEFAULT_REGION) national and "
    "formatted numbers such as (415) 555-0142 are read as E.164 of that region. A cell like '+1415... (the "
    "API export's formula guard) loses its apostrophe, and a CSV exported by the API imports unchanged.",
    "The file is checked with the command handler's rules before anything is published: with no valid contact "
    "nothing is published and the exit code is 2. Placeholders of the template that some contacts have no value "
    "for are listed with their rows (they would stay literal).",
    "Prints the campaign id and the valid/invalid summary; exits 1 if a command is rejected.",
))


def _load_template(channel: str, body: str | None, path: Path | None) -> dict[str, Any]:
    if body is not None and path is not None:
        _fail("give either --template-body or --template-file, not both", EXIT_REFUSED)
    if body is not None:
        if channel != "sms":
            _fail("an email template needs --template-file (JSON with subject, html, from_email, ...)", EXIT_REFUSED)
        return {"body": body}
    if path is None:
        _fail("a template is needed: --template-body TEXT (SMS) or --template-file PATH", EXIT_REFUSED)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        _fail(f"cannot read {path}: {exc}", EXIT_REFUSED)
    try:
        template = json.loads(text)
    except json.JSONDecodeError as exc:
        if channel == "sms":
            return {"body": text.rstrip("\r\n")}
        _fail(f"{path} is not JSON: {exc}", EXIT_REFUSED)
    if not isinstance(template, dict):
        _fail(f"{path}: the template must be a JSON object", EXIT_REFUSED)
    return template



@campaign_app.command("create", help=CREATE_HELP)
def create(
    csv_path: Path = typer.Argument(..., metavar="CSV", exists=True, dir_okay=False, readable=True,
                                    help="Contacts CSV."),
    name: str = typer.Option(..., "--name", help="Campaign name."),
    channel: ChannelChoice = typer.Option(..., "--channel", help="sms or email (fixed at creation)."),
    template_body: Optional[str] = typer.Option(None, "--template-body", help="SMS text with {{variables}}."),
    template_file: Optional[Path] = typer.Option(None, "--template-file", dir_okay=False,
                                                 help="JSON of the template (email: subject, html, from_email, ...)."),
    destination_column: Optional[str] = typer.Option(None, "--destination-column", metavar="NAME",
                                                     help="Header name (or 1-based number) of the destination column."),
    description: Optional[str] = typer.Option(None, "--description", help="Free text."),
    default_region: Optional[str] = typer.Option(
        None, "--default-region", metavar="REGION",
        help="ISO 3166 region (e.g. US) national SMS numbers are read with (default: $OUTREACH_DEFAULT_REGION)."),
    as_json: bool = JsonOpt,
    timeout: float = TimeoutOpt,
) -> None:
    template = _load_template(channel.value, template_body, template_file)
    try:
        settings = get_settings()
    except ValueError as exc:  # pydantic's ValidationError: a setting no service accepts either
        _fail(f"{exc}", EXIT_REFUSED, as_json=as_json)
    try:
        region = import_region(default_region, settings.default_region)
    except ValueError as exc:
        _fail(f"--default-region: {exc}", EXIT_REFUSED, as_json=as_json)
    try:
        parsed = read_contacts_csv(csv_path, destination_column)
    except CsvError as exc:
        _fail(f"cannot import {csv_path}: {exc}", EXIT_REFUSED, as_json=as_json)
    check = ImportCheck(channel.value, template, region).add_all(parsed.contacts)  # the handler's rules
    if (refusal := check.refusal("--default-region REGION")) is not None:
        _fail(f"cannot import {csv_path}: {refusal}", EXIT_REFUSED, as_json=as_json, extra={"check": check.as_dict()})
    if not as_json:
        header = f"header on line 1, destination column {parsed.destination_column!r}" if parsed.has_header \
            else f"no header, destination in column {parsed.destination_index + 1}"
        console.print(f"{csv_path}: {len(parsed.contacts)} contacts ({header})")

    with _api(as_json) as api:
        accepted = _api_call(as_json, api.create, csv_path, name=name, channel=channel.value, template=template,
                             description=description, destination_column=destination_column, default_region=region)
        if accepted.get("state") == "rejected":
            events = accepted.get("events") or []
        else:
            events = list(_answer(api, accepted, timeout, as_json))
            if rejection(events) is None:
                last_chunk = (accepted.get("contacts_command_ids") or [None])[-1]
                events += _answer(api, accepted, timeout, as_json, command_id=last_chunk, key="contacts_events")
    campaign_id = accepted.get("campaign_id")
    api_check = accepted.get("check") or check.as_dict()
    ready = next((e for e in events if e.get("type") == "CampaignReady"), None)
    # The counts are the pre-publication check's (the handler's rules, on every row); the handler's ContactsAdded
    # are in the events.
    summary = {"campaign_id": campaign_id, "valid": api_check["valid"], "invalid": api_check["invalid"],
               "invalid_reasons": api_check["invalid_reasons"], "ready": ready is not None,
               "message_count": ready.get("message_count") if ready else None}
    rejected = rejection(events)
    if as_json:
        _emit_json({**summary, "missing_variables": api_check.get("missing_variables", check.missing_variables),
                    "default_region": api_check.get("default_region", region), "rejected": rejected,
                    "events": events})
        if rejected:
            raise typer.Exit(EXIT_FAILED)
        return
    if rejected:
        detail = f": {rejected.get('detail')}" if rejected.get("detail") else ""
        _fail(f"{rejected.get('command_type')} rejected: {rejected.get('reason')}{detail}")
    region = api_check.get("default_region", region)
    console.print(f"campaign [bold]{campaign_id}[/bold]")
    console.print(f"valid contacts: [green]{summary['valid']}[/green], invalid: "
                  f"[{'red' if summary['invalid'] else 'green'}]{summary['invalid']}[/]"
                  + (f" (numbers read with the default region {region})" if region else ""))
    for reason, info in summary["invalid_reasons"].items():
        more = ", ..." if info["count"] > len(info["first_rows"]) else ""
        console.print(f"  {reason}: {info['count']} (rows {', '.join(map(str, info['first_rows']))}{more})")
    for missing in api_check.get("missing_variables", check.missing_variables):
        more = ", ..." if missing["count"] > len(missing["first_rows"]) else ""
        console.print(f"[yellow]missing variable {escape(missing['variable'])!r}[/yellow]: no value in "
                      f"{missing['count']} contact(s) (rows {', '.join(map(str, missing['first_rows']))}{more}); "
                      "the placeholder would stay literal", soft_wrap=True)
    if summary["ready"]:
        console.print(f"ready: {summary['message_count']} messages. Next: outreach campaign run {campaign_id} "
                      "--accept-disclaimer", soft_wrap=True)


# ------------------------------------------------------------------ campaign run

DISCLAIMER = (
    "By running this campaign you confirm that: the recipients consented to receive it; its content is "
    "lawful and appropriate; it includes an opt-out (SMS) / unsubscribe (email) and opted-out contacts are "
    "excluded; you are responsible for the uploaded data."
)


def _run_summary(campaign_id: str, as_json: bool) -> dict[str, Any]:
    """What `run` shows: the campaign's run summary from the API (or the read model an operator names)."""
    found: dict[str, Any] = {"campaign_id": campaign_id, "source": None, "status": None, "summary": None}
    reads = _reads(as_json)
    if reads is None:
        return found
    with reads:
        campaign = reads.campaign(campaign_id)
    if campaign is not None:
        found.update(source="api" if isinstance(reads, _ApiReads) else "read-model", status=campaign["status"],
                     summary=campaign.get("summary"), name=campaign.get("name"), channel=campaign.get("channel"))
    return found


def _print_run_summary(found: dict[str, Any]) -> None:
    summary = found.get("summary")
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_row("Campaign", found["campaign_id"])
    if not summary:
        table.add_row("Summary", "[yellow]not available (unknown campaign, or contacts not imported yet)[/yellow]")
        if found.get("name"):
            table.add_row("Name", str(found["name"]))
        console.print(table)
        return
    table.add_row("Name", str(summary.get("name")))
    table.add_row("Channel", str(summary.get("channel")))
    if found.get("status"):
        table.add_row("Status", str(found["status"]))
    table.add_row("Messages", str(summary.get("message_count")))
    if summary.get("channel") == "sms":
        table.add_row("Preview", str(summary.get("preview")))
        table.add_row("Encoding", f"{summary.get('encoding')}, up to {summary.get('segments')} segment(s) per message,"
                                  f" {summary.get('segments_total')} in all")
    else:
        table.add_row("Subject", str(summary.get("preview")))
        sender = summary.get("from_email") or ""
        if summary.get("from_name"):
            sender = f"{summary['from_name']} <{sender}>"
        table.add_row("From", sender)
        table.add_row("Attachments", ", ".join(summary.get("attachments") or []) or "none")
    missing = summary.get("missing_variables_count") or 0
    if missing:
        rows = summary.get("rows_missing_variables") or []
        more = ", ..." if missing > len(rows) else ""
        table.add_row("Missing variables", f"[yellow]{missing} row(s): {', '.join(map(str, rows))}{more}[/yellow] "
                                           "(placeholders stay literal)")
    else:
        table.add_row("Missing variables", "none")
    console.print(table)



def _command(as_json: bool, timeout: float, route: str, campaign_id: str, *args: Any) -> list[dict[str, Any]]:
    """One command route of the API for the campaign; its answer events (a rejection included)."""
    with _api(as_json) as api:
        accepted = _api_call(as_json, getattr(api, route), campaign_id, *args)
        if accepted.get("state") == "rejected":
            return accepted.get("events") or []
        return _answer(api, accepted, timeout, as_json)


@campaign_app.command("run")
def run(
    campaign_id: str = CampaignIdArg,
    accept_disclaimer: bool = typer.Option(False, "--accept-disclaimer",
                                           help="Accept the run disclaimer (consent, content, opt-out, data)."),
    as_json: bool = JsonOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Show the run summary, then run the campaign (only with --accept-disclaimer; else exit 2, nothing sent)."""
    found = _run_summary(campaign_id, as_json)
    if not as_json:
        _print_run_summary(found)
        console.print(DISCLAIMER, soft_wrap=True)
    if not accept_disclaimer:
        message = "not run: the disclaimer was not accepted (add --accept-disclaimer); nothing was published"
        if as_json:
            _emit_json({"summary": found, "run": False, "error": message})
        else:
            err.print(f"[yellow]{message}[/yellow]", soft_wrap=True)
        raise typer.Exit(EXIT_REFUSED)
    events = _command(as_json, timeout, "run", campaign_id)
    _print_answer(events, as_json, summary=found, run=rejection(events) is None)


# ------------------------------------------------------------------ stop / retry / delete

@campaign_app.command("stop")
def stop(
    campaign_id: str = CampaignIdArg,
    yes: bool = YesOpt,
    as_json: bool = JsonOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Stop a running campaign: queued messages are cancelled, in-flight ones carry on."""
    _confirmed_or_exit(yes, f"Stop campaign {campaign_id}? Its queued messages will be cancelled", "not stopped",
                       as_json)
    _print_answer(_command(as_json, timeout, "stop", campaign_id), as_json)


@campaign_app.command("retry")
def retry(
    campaign_id: str = CampaignIdArg,
    message_ids: Optional[list[str]] = typer.Option(None, "--message-id", callback=_check_message_ids,
                                                    help="Retry only these messages (repeat the option)."),
    include_cancelled: bool = typer.Option(False, "--include-cancelled",
                                           help="Re-queue cancelled messages too (resume a stopped campaign)."),
    as_json: bool = JsonOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Re-queue failed messages (all but timed-out ones, unless named)."""
    _print_answer(_command(as_json, timeout, "retry", campaign_id, message_ids or None, include_cancelled), as_json)


@campaign_app.command("delete")
def delete(
    campaign_id: str = CampaignIdArg,
    yes: bool = YesOpt,
    as_json: bool = JsonOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Delete a campaign that is not running (its id is never reused)."""
    _confirmed_or_exit(yes, f"Delete campaign {campaign_id}?", "not deleted", as_json)
    _print_answer(_command(as_json, timeout, "delete", campaign_id), as_json)


# ------------------------------------------------------------------ show / events / list

def _counts_table(campaign: dict[str, Any]) -> Group:
    counts = campaign["counts"]
    heading = (f"[bold]{escape(str(campaign.get('name') or campaign['campaign_id']))}[/bold] "
               f"({campaign.get('channel') or '?'}) "
               f"{campaign['campaign_id']}: [bold]{campaign['status']}[/bold]"
               + _stopped_note(campaign))
    table = Table()
    table.add_column("status")
    table.add_column("messages", justify="right")
    for status in MESSAGE_STATUSES:
        if counts.get(status) or status in ("delivered", "failed", "queued", "sending"):
            table.add_row(status, str(counts.get(status, 0)))
    table.add_row("[bold]total[/bold]", f"[bold]{counts['total']}[/bold]")
    return Group(Text.from_markup(heading), table)


def _stopped_note(campaign: dict[str, Any]) -> str:
    if not campaign.get("stopped"):
        return ""
    who = f" by {campaign['stopped_by']}" if campaign.get("stopped_by") else ""
    when = f" at {campaign['stopped_at']}" if campaign.get("stopped_at") else ""
    return escape(f" (stopped{who}{when})")  # a principal's name is text, not markup


def _finished(counts: dict[str, int]) -> int:
    return sum(counts.get(status, 0) for status in FINAL_MESSAGE_STATUSES)


@campaign_app.command("show")
def show(
    campaign_id: str = CampaignIdArg,
    watch: bool = typer.Option(False, "--watch", "-w",
                               help="Refresh until the campaign is final and its counts have caught up."),
    interval: float = typer.Option(0.5, "--interval", min=0.1, help="Refresh interval of --watch, seconds."),
    as_json: bool = JsonOpt,
) -> None:
    """Status and message counts (from the API; from the read model when OUTREACH_READ_MODEL_URL is set)."""
    if not watch:
        model = _reads(as_json)
        campaign = model.campaign(campaign_id) if model else None
        if model:
            model.close()
        if campaign is None:
            _fail(f"unknown campaign {campaign_id} (or the projections service has not seen it yet)", as_json=as_json)
        if as_json:
            _emit_json(campaign)
        else:
            console.print(_counts_table(campaign))
        return
    campaign = _watch(campaign_id, interval, as_json)
    if as_json:
        _emit_json(campaign)


def _watch(campaign_id: str, interval: float, as_json: bool) -> dict[str, Any]:
    model: ReadViews | None = None
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn())
    task = progress.add_task("final", total=None)
    campaign: dict[str, Any] | None = None
    live = Live(console=console, refresh_per_second=4, transient=False, auto_refresh=False) if not as_json else None
    try:
        if live:
            live.start()
        while True:
            if model is None:
                model = _reads(as_json)
            campaign = model.campaign(campaign_id) if model else None
            if campaign is None:
                if live:
                    live.update(f"waiting for campaign {campaign_id} in the read model...", refresh=True)
            else:
                counts = campaign["counts"]
                progress.update(task, total=counts["total"] or None, completed=_finished(counts),
                                description=f"{campaign['status']}: final")
                if live:
                    live.update(Group(_counts_table(campaign), progress), refresh=True)
                if settled(campaign):
                    return campaign
            time.sleep(interval)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    finally:
        if live:
            live.stop()
            if not console.is_terminal:
                console.line()
        if model is not None:
            model.close()


def _parse_moment(text: str) -> datetime:
    """An RFC 3339 time with its offset (`2024-05-01T12:00:00Z`, `...+02:00`)."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an RFC 3339 time (e.g. 2024-05-01T12:00:00Z)")
    if moment.tzinfo is None:
        raise typer.BadParameter(f"{text!r} has no time zone (add Z or an offset such as +02:00)")
    try:
        return moment.astimezone(timezone.utc)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00: before the first UTC time there is
        raise typer.BadParameter(f"{text!r} is out of range")


def _describe_status(record: dict[str, Any]) -> str:
    change = f"{record.get('previous_status')} -> {record.get('status')}" if record.get("previous_status") \
        else f"{record.get('status')}"
    details = [f"{k} {record[k]}" for k in ("reason", "provider_code", "attempt", "run_no") if record.get(k)]
    contact = f" {record['destination']}" if record.get("destination") else ""
    return f"row {record.get('row')}{contact}: {change}" + (f" ({', '.join(details)})" if details else "")


@campaign_app.command("events")
def events(
    campaign_id: str = CampaignIdArg,
    messages: bool = typer.Option(True, "--messages/--no-messages",
                                  help="Include every message's status transitions (the full audit history)."),
    as_of: Optional[str] = typer.Option(None, "--as-of", metavar="TIME",
                                        help="Show the campaign and its messages as they stood at TIME (RFC 3339)."),
    as_json: bool = JsonOpt,
) -> None:
    """The campaign's full ordered history from the read model: who created, ran, retried and stopped it, the
    disclaimer accepted at each run, each message's transitions; or its state at a time (--as-of)."""
    moment = _parse_moment(as_of) if as_of is not None else None
    model = _reads(as_json)
    if model is None:
        _fail(f"no events of campaign {campaign_id} in the read model (is the projections service running?)",
              as_json=as_json)
    with model:
        if moment is not None:
            _print_as_of(model, campaign_id, moment, as_of, messages, as_json)
            return
        if as_json:  # a JSON array, streamed item by item (a 300,000-message campaign has 1.5M records)
            typer.echo("[")
            for n, item in enumerate(model.iter_history(campaign_id, include_messages=messages)):
                typer.echo(("  " if n == 0 else "  ,") + json.dumps(item, ensure_ascii=False, default=str))
            typer.echo("]")
            return
        shown = 0
        for item in model.iter_history(campaign_id, include_messages=messages):
            shown += 1
            if item.get("type") == "MessageStatusChanged":
                typer.echo(f"{item.get('occurred_at')}  {'message':<22} {_describe_status(item)}")
            else:
                what = _describe_event(item)
                if item.get("type") == "CampaignRunStarted":
                    accepted = [k for k, v in (item.get("disclaimer") or {}).items() if v]
                    what += f"; disclaimer accepted: {', '.join(accepted) or 'none'}"
                if item.get("replayed_by"):  # the command was replayed from the DLQ (outreach dlq replay)
                    what += f" (replayed from the DLQ by {item['replayed_by']})"
                typer.echo(f"{item.get('occurred_at')}  {str(item.get('type')):<22} {what}")
    if not shown:
        _fail(f"no events of campaign {campaign_id} in the read model")


def _print_as_of(model: ReadViews, campaign_id: str, moment: datetime, as_of: str, messages: bool,
                 as_json: bool) -> None:
    """The campaign and its messages as they stood; the messages are streamed page by page, so a campaign of
    300,000 is printed in bounded memory."""
    campaign = model.as_of_campaign(campaign_id, moment)
    if campaign is None:
        _fail(f"campaign {campaign_id} had no event at {as_of} (or the read model has not seen it)", as_json=as_json)
    stamp = rfc3339(moment)
    rows = model.iter_as_of_messages(campaign_id, moment) if messages else None
    if as_json:
        head = json.dumps({"as_of": stamp, "campaign": campaign}, indent=2, ensure_ascii=False, default=str)
        if rows is None:
            typer.echo(head)
            return
        typer.echo(head[:-2] + ',\n  "messages": [')  # the same object, with its messages streamed in
        for n, message in enumerate(rows):
            typer.echo(("    " if n == 0 else "    ,") + json.dumps(message, ensure_ascii=False, default=str))
        typer.echo("  ]\n}")
        return
    console.print(f"as of {stamp}:")
    console.print(_counts_table(campaign))
    for m in rows or ():
        details = [f"{label} {m[key]}" for label, key in (("reason", "reason"), ("code", "provider_code"),
                                                           ("attempt", "attempt"), ("run", "run_no")) if m[key]]
        typer.echo(f"row {m['row']} {m['destination'] or ''}: {m['status']}"
                   + (f" ({', '.join(details)})" if details else "") + f", since {m['updated_at']}")


@campaign_app.command("list")
def list_campaigns(as_json: bool = JsonOpt) -> None:
    """Every campaign (from the API; from the read model when OUTREACH_READ_MODEL_URL is set)."""
    model = _reads(as_json)
    campaigns = model.campaigns() if model else []
    if model:
        model.close()
    if as_json:
        _emit_json(campaigns)
        return
    table = Table()
    table.add_column("id", no_wrap=True, min_width=36)
    for column in ("name", "channel", "status", "total", "delivered", "failed"):
        table.add_column(column)
    for c in campaigns:
        table.add_row(c["campaign_id"], str(c.get("name")), str(c.get("channel")),
                      c["status"] + (" (stopped)" if c.get("stopped") else ""), str(c["counts"]["total"]),
                      str(c["counts"]["delivered"]), str(c["counts"]["failed"]))
    console.print(table)


app.command("replay")(replay_command)


@app.command("status")
def status(
    as_json: bool = JsonOpt,
    timeout: float = typer.Option(3.0, "--timeout", min=0.1, help="Seconds to wait for each instance's answer."),
) -> None:
    """Every instance's health, consumer and relay lag, breakers, pending timers and parked (DLQ) records.

    Read from each instance's /readyz and /metrics (instances found in the stack's data folder and by their
    heartbeats on the broker, from every host). An instance is ready, alive (not ready), unreachable (it beats,
    but does not answer from here), restarting (outreach up starts it again) or down. Exit 0 when every
    instance is ready, else 1."""
    from outreach.status import status as stack_status

    raise typer.Exit(stack_status(as_json, timeout))


def main() -> None:  # python -m outreach.cli
    app()


if __name__ == "__main__":
    sys.exit(main())
