"""`outreach dlq list|show|replay`: the records parked in `outreach.commands.dlq`, and re-publishing one.

A parked record keeps its value (cut to 64 KiB), its key, and headers saying why and whence
(`services.common.kafka.park`: `x-error`, `x-source-topic`, `x-source-offset` "PARTITION:OFFSET",
`x-consumer`). A record is named by its DLQ offset (the DLQ has one partition; `PARTITION:OFFSET` otherwise).

`replay OFFSET [--from-file PATH]` publishes the record again to its source topic, as parked or with the body
of PATH (the correction). A command is first checked with the command handler's own rules (its envelope, which
decides parking, then the contract's schema), so a body that would be parked or refused again is refused here
and nothing is published. The replayed command carries `replayed_by`, the operator (the local account running
this tool, USER@HOST: operator commands are local, like `--as` nothing on the command line can name someone
else), which the handler copies onto every campaign event answering it, so the campaign's history names who
replayed it. A replayed command is idempotent: its command_id is answered once, and replaying it again only
gets the stored answer again. Records of other topics are published as they are (no field is added to an
internal record); every replayed record carries the headers `x-replayed-by` and `x-replayed-from`.

Operator commands stay local: the broker is KAFKA_BOOTSTRAP_SERVERS, else the one `outreach up` recorded in
its stack file.
"""
from __future__ import annotations

import asyncio
import getpass
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Optional

import typer
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from outreach import config
from schemas import topics
from schemas.commands import parse_command, validation_detail
from schemas.times import rfc3339
from services.common import jsoncodec, kafka
from services.common.settings import Settings

app = typer.Typer(no_args_is_help=True, help="Inspect the records parked in outreach.commands.dlq and replay one.")

EXIT_FAILED = 1
EXIT_REFUSED = 2
READ_TIMEOUT_S = 15.0
ANSWER_TIMEOUT_S = 30.0


class DlqError(RuntimeError):
    """Nothing to show or replay (no such offset, a body the handler would refuse...): said as is, exit `code`
    (2: refused, nothing published)."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------ where the broker is

def operator_broker_settings() -> Settings:
    """The operator settings (outreach.config), with the broker `outreach up` recorded in its stack file when
    KAFKA_BOOTSTRAP_SERVERS is not set (and the stack file names the data folder in use)."""
    settings = config.operator_settings()
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return settings
    try:
        stack = json.loads(config.stack_path().read_text())
    except (OSError, ValueError):
        return settings
    bootstrap = stack.get("kafka_bootstrap_servers") if isinstance(stack, dict) else None
    if isinstance(bootstrap, str) and bootstrap and Path(str(stack.get("data_dir"))) == Path(settings.data_dir):
        return settings.model_copy(update={"kafka_bootstrap_servers": bootstrap})
    return settings


def operator_name() -> str:
    """Who replays: the local account and host this operator command runs as."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


# ------------------------------------------------------------------ reading the DLQ

@dataclass
class Parked:
    partition: int
    offset: int
    key: str | None
    value: bytes
    headers: dict[str, str]
    timestamp_ms: int

    @property
    def ref(self) -> str:
        return str(self.offset) if self.partition == 0 else f"{self.partition}:{self.offset}"

    def summary(self) -> dict[str, Any]:
        return {"offset": self.offset, "partition": self.partition, "key": self.key, "size": len(self.value),
                "time": rfc3339(datetime.fromtimestamp(self.timestamp_ms / 1000, UTC)),
                "error": self.headers.get("x-error"), "source_topic": self.headers.get("x-source-topic"),
                "source_offset": self.headers.get("x-source-offset"), "consumer": self.headers.get("x-consumer")}

    def as_dict(self) -> dict[str, Any]:
        """The summary, every header, and the value: its JSON when it parses, else its text (bytes replaced)."""
        try:
            value: Any = jsoncodec.loads(self.value)
            form = "json"
        except jsoncodec.JSONDecodeError:
            value, form = self.value.decode("utf-8", "replace"), "text"
        return {**self.summary(), "headers": self.headers, "value_format": form, "value": value}


def _parked(record: Any) -> Parked:
    headers = {k: (v or b"").decode("utf-8", "replace") for k, v in record.headers or ()}
    key = record.key.decode("utf-8", "replace") if record.key is not None else None
    return Parked(record.partition, record.offset, key, record.value or b"", headers, record.timestamp)


def parse_ref(ref: str) -> tuple[int, int]:
    """`OFFSET` (partition 0) or `PARTITION:OFFSET` -> (partition, offset); typer.BadParameter if malformed."""
    partition, _, offset = ref.rpartition(":")
    if not offset.isdigit() or (partition and not partition.isdigit()):
        raise typer.BadParameter(f"{ref!r} is not a DLQ offset (a whole number, or PARTITION:OFFSET)")
    return int(partition or 0), int(offset)


async def _dlq_consumer(settings: Settings) -> tuple[AIOKafkaConsumer, list[TopicPartition]]:
    await kafka.ensure_topics(settings, timeout_s=READ_TIMEOUT_S)  # a lookup of a missing topic would create it
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None,
                                enable_auto_commit=False, fetch_max_wait_ms=50)
    await consumer.start()
    tps = [TopicPartition(topics.COMMANDS_DLQ, p) for p in sorted(consumer.partitions_for_topic(topics.COMMANDS_DLQ)
                                                                  or {0})]
    return consumer, tps


async def read_parked(settings: Settings, only: tuple[int, int] | None = None) -> list[Parked]:
    """Every parked record up to the DLQ's end (read without a consumer group: nothing is committed), or only
    the one at (partition, offset)."""
    consumer, tps = await _dlq_consumer(settings)
    try:
        if only is not None:
            tps = [tp for tp in tps if tp.partition == only[0]]
            if not tps:
                return []
        ends = await kafka.end_offsets(consumer, tps)
        starts = await consumer.beginning_offsets(tps)
        out: list[Parked] = []
        pending = {tp for tp in tps if ends[tp] > starts[tp]}
        for tp in pending:
            first = starts[tp] if only is None else only[1]
            if only is not None and not starts[tp] <= first < ends[tp]:
                return []
            consumer.seek(tp, first)
        deadline = time.monotonic() + READ_TIMEOUT_S
        while pending:
            if time.monotonic() > deadline:
                raise DlqError(f"the broker at {settings.kafka_bootstrap_servers} stopped delivering the DLQ's records")
            batches = await consumer.getmany(*pending, timeout_ms=200)
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        break
                    if only is None:
                        out.append(_parked(record))
                    elif record.offset == only[1]:
                        return [_parked(record)]
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        return out
    finally:
        await consumer.stop()


async def find(settings: Settings, ref: str) -> Parked:
    partition, offset = parse_ref(ref)
    found = await read_parked(settings, (partition, offset))
    if not found:
        raise DlqError(f"no record at offset {ref} of {topics.COMMANDS_DLQ} (outreach dlq list shows them)")
    return found[0]


# ------------------------------------------------------------------ replaying

@dataclass
class Replay:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    command_id: str | None  # a command's: its answer is waited for


def plan_replay(parked: Parked, body: bytes | None, operator: str) -> Replay:
    """What to publish again, checked as the consumer would check it; DlqError (nothing published) if it would
    be parked or refused again."""
    source = parked.headers.get("x-source-topic")
    if source not in topics.ALL_TOPICS or source == topics.COMMANDS_DLQ:
        raise DlqError(f"record {parked.ref} names no source topic to replay to (x-source-topic: {source!r})",
                       EXIT_REFUSED)
    value = parked.value if body is None else body
    headers = [("x-replayed-by", operator.encode()),
               ("x-replayed-from", f"{topics.COMMANDS_DLQ}:{parked.partition}:{parked.offset}".encode())]
    if source != topics.COMMANDS:
        return Replay(source, parked.key.encode() if parked.key is not None else None, value, headers, None)
    from services.command_handler.handlers import envelope_error  # the handler's own rule for parking

    where = "the file's body" if body is not None else "the parked value"
    try:
        command = jsoncodec.loads(value)
    except jsoncodec.JSONDecodeError as exc:
        raise DlqError(f"{where} is not JSON ({exc}): it would be parked again; correct it with --from-file",
                       EXIT_REFUSED)
    if error := envelope_error(command):
        raise DlqError(f"{where} would be parked again ({error}); correct it with --from-file", EXIT_REFUSED)
    command["replayed_by"] = operator
    encoded = jsoncodec.dumps(command)
    try:
        parse_command(encoded)
    except ValidationError as exc:
        raise DlqError(f"{where} would be rejected as invalid_command ({validation_detail(exc)}); correct it "
                       "with --from-file", EXIT_REFUSED)
    return Replay(topics.COMMANDS, command["campaign_id"].encode(), encoded, headers, command["command_id"])


async def publish_and_wait(settings: Settings, replay: Replay, wait_s: float) -> list[dict[str, Any]]:
    """Publish the record (acks=all); for a command, its answer events (by causation_id) within `wait_s`, read
    from the campaign events' ends as they were before publishing."""
    watcher = None
    if replay.command_id is not None and wait_s > 0:
        watcher = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None,
                                   enable_auto_commit=False, fetch_max_wait_ms=50)
        await watcher.start()
        tps = [TopicPartition(topics.CAMPAIGN_EVENTS, p)
               for p in sorted(watcher.partitions_for_topic(topics.CAMPAIGN_EVENTS) or ())]
        await kafka.end_offsets(watcher, tps)  # assigned, at the ends
    try:
        producer = kafka.make_producer(settings)
        await producer.start()
        try:
            await producer.send_and_wait(replay.topic, replay.value, key=replay.key, headers=replay.headers)
        finally:
            await producer.stop()
        if watcher is None:
            return []
        answer: list[dict[str, Any]] = []
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for records in (await watcher.getmany(timeout_ms=200)).values():
                for record in records:
                    try:
                        event = jsoncodec.loads(record.value or b"")
                    except jsoncodec.JSONDecodeError:
                        continue
                    if isinstance(event, dict) and event.get("causation_id") == replay.command_id:
                        answer.append(event)
            if answer and not _more_coming(answer):
                return answer
        return answer
    finally:
        if watcher is not None:
            await watcher.stop()


def _more_coming(answer: list[dict[str, Any]]) -> bool:
    # An AddContacts' last chunk is answered by ContactsAdded then CampaignReady: wait for the second.
    return answer[-1].get("type") == "ContactsAdded" and not any(e.get("type") == "CampaignReady" for e in answer)


# ------------------------------------------------------------------ the commands

def _emit(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def _fail(message: str, code: int, as_json: bool) -> None:
    if as_json:
        _emit({"error": message})
    else:
        typer.echo(message, err=True)
    raise typer.Exit(code)


def _run(coroutine: Any, as_json: bool) -> Any:
    try:
        return asyncio.run(coroutine)
    except DlqError as exc:
        _fail(str(exc), exc.code, as_json)
    except (TimeoutError, OSError) as exc:
        _fail(f"the broker does not answer ({exc}); is the stack running (outreach up)?", EXIT_FAILED, as_json)


JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON instead of text.")
RefArg = typer.Argument(..., metavar="OFFSET", help="The record's DLQ offset (as `outreach dlq list` shows it).")


@app.command("list")
def list_parked(as_json: bool = JsonOpt) -> None:
    """Every parked record: offset, key, error, source (topic and offset), who parked it, size, time."""
    settings = operator_broker_settings()
    parked = _run(read_parked(settings), as_json)
    if as_json:
        _emit([p.summary() for p in parked])
        return
    if not parked:
        typer.echo(f"{topics.COMMANDS_DLQ} is empty.")
        return
    typer.echo(f"{topics.COMMANDS_DLQ}: {len(parked)} record(s)")
    for p in parked:  # a line each, its error below it: errors are long, and copied whole
        s = p.summary()
        typer.echo(f"offset {p.ref}  {s['time'][:19]}Z  from {s['source_topic']} {s['source_offset']} "
                   f"({s['consumer']})  {s['size']} bytes  key {s['key']}")
        typer.echo(f"    {s['error']}")


@app.command("show")
def show(ref: str = RefArg, as_json: bool = JsonOpt) -> None:
    """One parked record: its headers and its value (pretty JSON when it parses)."""
    record = _run(find(operator_broker_settings(), ref), as_json).as_dict()
    if as_json:
        _emit(record)
        return
    for name in ("offset", "partition", "time", "key", "size"):
        typer.echo(f"{name + ':':<8} {record[name]}")
    typer.echo("headers:")
    for name, value in record["headers"].items():
        typer.echo(f"  {name}: {value}")
    typer.echo(f"value ({record['value_format']}):")
    typer.echo(json.dumps(record["value"], indent=2, ensure_ascii=False)
               if record["value_format"] == "json" else record["value"])


@app.command("replay")
def replay(
    ref: str = RefArg,
    from_file: Optional[Path] = typer.Option(None, "--from-file", exists=True, dir_okay=False, readable=True,
                                             help="Publish this file's body (the corrected record) instead."),
    timeout: float = typer.Option(ANSWER_TIMEOUT_S, "--timeout", min=0,
                                  help="Seconds to wait for a command's answer (0: do not wait)."),
    as_json: bool = JsonOpt,
) -> None:
    """Publish a parked record again to its source topic, as parked or corrected (--from-file).

    A command is checked with the handler's rules first, carries replayed_by (you, USER@HOST), and its answer is
    waited for; replaying a command_id again only repeats its stored answer."""
    settings = operator_broker_settings()
    operator = operator_name()

    async def go() -> tuple[Replay, list[dict[str, Any]]]:
        parked = await find(settings, ref)
        planned = plan_replay(parked, from_file.read_bytes() if from_file else None, operator)
        return planned, await publish_and_wait(settings, planned, timeout)

    planned, answer = _run(go(), as_json)
    rejected = any(e.get("type") == "CommandRejected" for e in answer)
    result = {"replayed": ref, "topic": planned.topic, "replayed_by": operator, "command_id": planned.command_id,
              "answered": bool(answer), "rejected": rejected, "events": answer}
    if as_json:
        _emit(result)
    else:
        typer.echo(f"Replayed DLQ record {ref} to {planned.topic} as {operator}"
                   + (f" (command {planned.command_id})" if planned.command_id else "") + ".")
        for event in answer:
            what = f"{event.get('reason')}: {event.get('detail')}" if event.get("type") == "CommandRejected" else ""
            typer.echo(f"  {event.get('type')} {event.get('campaign_id')} {what}".rstrip())
        if planned.command_id and timeout and not answer:
            typer.echo(f"No answer within {timeout:g} s (is the command handler running?)", err=True)
    if planned.command_id and timeout and (rejected or not answer):
        raise typer.Exit(EXIT_FAILED)
