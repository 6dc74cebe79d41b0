"""The run summary: what the run modal shows before an operator accepts the disclaimer and runs
(`CampaignReady.summary`, `TemplateUpdated.summary`; schemas.events.RunSummary).

Made when the last contacts chunk is added and again when the template changes after that; pure.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from schemas.events import ROWS_MISSING_VARIABLES_LIMIT
from services.common import templating

if TYPE_CHECKING:
    from services.command_handler.domain.model import MessageBlock


def run_summary(name: str, channel: str, template: dict, blocks: Iterable[MessageBlock]) -> dict:
    """What the run modal shows: counts, a preview, SMS encoding and segments, rows missing variables and which
    variables they miss.

    `blocks` is read once, in order (the application loads a big campaign's blocks one at a time)."""
    message_count = 0
    missing_rows: list[int] = []
    missing = templating.MissingVariables(templating.template_texts(channel, template) or "")
    summary: dict[str, Any] = {"name": name, "channel": channel, "message_count": 0,
                               "from_email": None, "from_name": None, "attachments": [], "encoding": None,
                               "segments": None, "segments_total": None}
    if channel == "sms":
        text = template["body"]
        first = True
        encoding = "GSM-7"
        segments_max = segments_total = 0
        for block in blocks:
            message_count += len(block.rows)
            for row, variables in zip(block.rows, block.variables):
                rendered = templating.render(text, variables)
                if first:
                    summary["preview"] = rendered
                    first = False
                if missing.add(row, variables) and len(missing_rows) < ROWS_MISSING_VARIABLES_LIMIT:
                    missing_rows.append(row)
                if encoding == "GSM-7" and templating.sms_encoding(rendered) == "UCS-2":
                    encoding = "UCS-2"
                segments = templating.sms_segments(rendered)
                segments_max = max(segments_max, segments)
                segments_total += segments
        if first:
            summary["preview"] = text
        summary.update(encoding=encoding, segments=segments_max or templating.sms_segments(text),
                       segments_total=segments_total)
    else:
        variables0: dict | None = None  # the first block's first row's (a block always has rows)
        for block in blocks:
            if variables0 is None:
                variables0 = block.variables[0] if block.rows else {}
            message_count += len(block.rows)
            for row, variables in zip(block.rows, block.variables):
                if missing.add(row, variables) and len(missing_rows) < ROWS_MISSING_VARIABLES_LIMIT:
                    missing_rows.append(row)
        summary.update(preview=templating.render(template["subject"], variables0 or {}),
                       from_email=template.get("from_email"), from_name=template.get("from_name"),
                       attachments=[a["filename"] for a in template.get("attachments", [])])
    summary.update(message_count=message_count, rows_missing_variables=missing_rows,
                   missing_variables_count=missing.rows, missing_variables=missing.report())
    return summary
