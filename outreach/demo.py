"""`outreach up --demo`: a sample SMS and a sample email campaign run at the same time, with live progress,
then a final summary. Everything goes through `outreach.commands` like any upstream system."""
from __future__ import annotations

import asyncio
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from outreach import client
from services.common.settings import Settings
from services.projections.views import ReadViews, settled

SHOWN_STATUSES = ("queued", "sending", "sent", "delivered", "failed", "opted_out")
console = Console()


def sample_sms_contacts(size: int) -> list[dict]:
    """Mostly deliverable numbers, and a few of the simulator's refusals so failure reasons show."""
    refusals = ["+15005550001", "+15005550002", "+15005550004"]
    contacts = [{"row": i + 2, "destination": f"+1{200 + i % 800}5550100", "variables": {"first_name": f"Ada{i}"}}
                for i in range(max(size - len(refusals), 1))]
    contacts[800:] = [{"row": c["row"], "destination": f"+1{200 + i % 800}{556 + i // 800:03d}0100",
                       "variables": c["variables"]} for i, c in enumerate(contacts[800:], start=800)]
    contacts += [{"row": len(contacts) + 2 + i, "destination": d, "variables": {"first_name": "Test"}}
                 for i, d in enumerate(refusals)]
    return contacts


def sample_email_contacts(size: int) -> list[dict]:
    kinds = ["success"] * 8 + ["ooto", "bounce"]
    return [{"row": i + 2, "destination": f"{kinds[i % len(kinds)]}+{i}@simulator.amazonses.com",
             "variables": {"first_name": f"Grace{i}"}} for i in range(size)]


def progress_table(read_model: ReadViews, campaigns: dict[str, str]) -> Table:
    table = Table(title="Outreach demo: live progress")
    table.add_column("campaign", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("total", justify="right")
    for status in SHOWN_STATUSES:
        table.add_column(status.replace("_", " "), justify="right", no_wrap=True)
    for campaign_id, label in campaigns.items():
        row = read_model.campaign(campaign_id)
        if row is None:
            table.add_row(label, "…")
            continue
        counts = row["counts"]
        table.add_row(label, row["status"], str(counts["total"]), *(str(counts.get(s, 0)) for s in SHOWN_STATUSES))
    return table


async def _run(settings: Settings, size: int) -> bool:
    async with client.CommandClient(settings) as commands:
        sms = await client.create_campaign_from_rows(
            name="Demo SMS", channel="sms", client=commands, contacts=sample_sms_contacts(size),
            template={"body": "Hi {{first_name}}, your appointment is tomorrow. Reply STOP to opt out."})
        email = await client.create_campaign_from_rows(
            name="Demo email", channel="email", client=commands, contacts=sample_email_contacts(size),
            template={"subject": "Hello {{first_name}}", "html": "<p>Hi {{first_name}}, news inside.</p>",
                      "from_email": "news@example.org", "from_name": "Outreach demo", "attachments": []})
        campaigns = {}
        for answers, label in ((sms, "Demo SMS"), (email, "Demo email")):
            rejected = client.rejection(answers)
            if rejected:
                console.print(f"[red]{label} was refused: {rejected['reason']} {rejected['detail']}")
                return False
            campaigns[answers[0]["campaign_id"]] = label
            ready = next(a for a in answers if a["type"] == "CampaignReady")
            summary = ready.get("summary") or {}
            console.print(f"{label}: {ready['message_count']} messages ready; preview: {summary.get('preview')!r}")
        for campaign_id, label in campaigns.items():
            answer = await commands.send(client.make_command("RunCampaign", campaign_id, disclaimer=dict(
                client.ALL_DISCLAIMER_FLAGS)))
            rejected = client.rejection(answer)
            if rejected:
                console.print(f"[red]{label} did not run: {rejected['reason']} {rejected['detail']}")
                return False
            console.print(f"{label}: run {answer[0]['run_no']} started with {answer[0]['message_count']} messages")

    read_model = ReadViews.open(settings)
    try:
        deadline = time.monotonic() + 300
        with Live(progress_table(read_model, campaigns), console=console, refresh_per_second=4) as live:
            while time.monotonic() < deadline:
                live.update(progress_table(read_model, campaigns))
                rows = [read_model.campaign(c) for c in campaigns]
                if all(r and settled(r) and r["counts"]["total"] > 0 for r in rows):
                    break
                await asyncio.sleep(0.25)
        rows = {c: read_model.campaign(c) for c in campaigns}
        console.print("\n[bold]Final summary[/bold]")
        for campaign_id, label in campaigns.items():
            row = rows[campaign_id]
            failed = read_model.messages(campaign_id, status="failed")
            reasons: dict[str, int] = {}
            for m in failed:
                reasons[m["reason"]] = reasons.get(m["reason"], 0) + 1
            counts = {k: v for k, v in row["counts"].items() if v and k != "total"}
            console.print(f"  {label} ({campaign_id}): [bold]{row['status']}[/bold], {row['counts']['total']} messages "
                          f"{counts}" + (f"; failure reasons {reasons}" if reasons else ""))
        return all(r and settled(r) for r in rows.values())
    finally:
        read_model.close()


def run_demo(settings: Settings, size: int = 200) -> bool:
    """Runs the demo campaigns to their end; True when both reached a final status (and their counts with it)."""
    return asyncio.run(_run(settings, size))
