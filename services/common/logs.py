"""One logging configuration for every process: text or JSON lines on stderr, each carrying the campaign,
message and command ids of what the process is handling when it logs.

- `configure(service)`: `logging.config.dictConfig` from `OUTREACH_LOG_LEVEL`, `OUTREACH_LOG_FORMAT` (text or
  json) and `OUTREACH_LOG_LEVELS` (services/common/settings.py, LogSettings). Every service entry point calls
  it (services/common/runtime.py, the API, the simulator, the CLI's broker and `up`); uvicorn's loggers
  propagate to it (the API passes `log_config=None`).
- `context(campaign_id=..., message_id=..., command_id=...)`: the ids every line logged inside the `with`
  carries (in this task or thread: a ContextVar, copied into tasks and `asyncio.to_thread`); `bind(...)`
  sets them until the enclosing `context` ends. Set where a command, a campaign's record or a message is
  handled, so the log calls themselves name nothing.
- `IdsFilter` adds `service`, `instance` and the ids to each record; the text formatter appends
  ` campaign=… message=… command=…` (only those known); the JSON one writes them as fields.

A text line:  2026-12-05 13:32:08,123 outreach.sender.twilio WARNING Twilio gave no answer … campaign=… message=…
A JSON line:  {"time": "2026-12-05T13:32:08.123Z", "level": "INFO", "logger": "services.command_handler.application",
               "message": "DeleteCampaign rejected: unknown_campaign: ...", "service": "command-handler",
               "instance": "0", "campaign_id": "…", "command_id": "…"}
"""
from __future__ import annotations

import logging
import logging.config
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any, NamedTuple

from pydantic import ValidationError
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.orjson import OrjsonFormatter

from schemas.ids import is_wire_uuid
from services.common import jsoncodec
from services.common.settings import LogSettings

TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"  # tests and operators read `line[:23]` as the time
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(service)s %(instance)s"
JSON_NAMES = {"asctime": "time", "levelname": "level", "name": "logger"}
# Record attributes that are not fields: the standard ones, and uvicorn's `extra` copy of a message with
# terminal colours in it.
JSON_LEFT_OUT = [*RESERVED_ATTRS, "color_message"]
# Chatty at INFO (aiokafka: every group join and fetch reset; httpx: every request of the CLI): their warnings
# and errors still show. OUTREACH_LOG_LEVELS overrides any of them.
QUIET_LOGGERS = ("aiokafka", "httpx", "httpcore")
# Except the group coordinator: a few lines per rebalance, saying which partitions this process now reads
# ("Setting newly assigned partitions ..."), what an operator (and the scale-out tests) look for.
GROUP_COORDINATOR_LOGGER = "aiokafka.consumer.group_coordinator"
# uvicorn's own loggers, propagating to the root handler instead of uvicorn's default configuration.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
# FastStream passes its own `message_id` ("offset-timestamp" of a record) in its lines' `extra`: kept
# under this name, so `message_id` is always one of ours.
FASTSTREAM_MESSAGE_ID = "faststream_message_id"


class LogIds(NamedTuple):
    campaign_id: str | None = None
    message_id: str | None = None
    command_id: str | None = None


_NO_IDS = LogIds()
_IDS: ContextVar[LogIds] = ContextVar("outreach_log_ids", default=_NO_IDS)


class context:  # noqa: N801  (used like a function: `with logs.context(campaign_id=...)`)
    """Within the `with`, lines logged in this task or thread carry these ids (the others are kept); on leaving,
    the ids before it are back (also those `bind` set inside). A class, not @contextmanager: it is cheap
    enough to enter per message."""
    __slots__ = ("_ids", "_token")

    def __init__(self, **ids: str | None):
        self._ids = ids

    def __enter__(self) -> LogIds:
        current = _IDS.get()
        ids = current._replace(**self._ids) if self._ids else current
        self._token = _IDS.set(ids)
        return ids

    def __exit__(self, *exc: object) -> None:
        _IDS.reset(self._token)


def bind(**ids: str | None) -> None:
    """Set ids for the rest of the enclosing `context` (or of the task, when it runs in a task of its own)."""
    _IDS.set(_IDS.get()._replace(**ids))


def current() -> LogIds:
    return _IDS.get()


def ids_of(value: object) -> dict[str, str]:
    """The campaign, message and command ids a decoded record names, for `context(**ids_of(value))`; values
    that are not the contract's lowercase UUIDs are left out (a poison record's fields go to no log field)."""
    if not isinstance(value, Mapping):
        return {}
    return {name: value[name] for name in LogIds._fields if is_wire_uuid(value.get(name))}


def ids_in_json(raw: bytes | None) -> dict[str, str]:
    """`ids_of` a record's raw value, {} when it is not JSON: for the lines about a record that failed (its
    handler decoded it once already; decoding it again is only worth it on that rare path)."""
    try:
        return ids_of(jsoncodec.loads(raw or b"null"))
    except jsoncodec.JSONDecodeError:
        return {}


def key_id(key: bytes | None) -> str | None:
    """A record key that is a campaign id (most topics are keyed by it), else None."""
    if not key or len(key) != 36:
        return None
    text = key.decode("ascii", "replace")
    return text if is_wire_uuid(text) else None


class IdsFilter(logging.Filter):
    """Adds `service`, `instance` and the context's ids to every record the handler writes (never drops one)."""

    def __init__(self, service: str = "outreach", instance: str = "0"):
        super().__init__()
        self.service, self.instance = service, instance

    def filter(self, record: logging.LogRecord) -> bool:
        record.service, record.instance = self.service, self.instance
        if record.name.endswith("faststream") and "message_id" in record.__dict__:
            setattr(record, FASTSTREAM_MESSAGE_ID, record.__dict__.pop("message_id"))
        ids = _IDS.get()
        if ids is not _NO_IDS:
            for name, value in zip(LogIds._fields, ids):
                if value is not None:
                    setattr(record, name, value)
        return True


class TextFormatter(logging.Formatter):
    """The usual line, then ` campaign=… message=… command=…` for the ids the record carries."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802  (logging's name)
        line = super().formatMessage(record)
        for label, name in (("campaign", "campaign_id"), ("message", "message_id"), ("command", "command_id")):
            value = getattr(record, name, None)
            if value is not None:
                line += f" {label}={value}"
        return line


class JsonFormatter(OrjsonFormatter):
    """One JSON object a line (python-json-logger, encoded by orjson): time (ISO 8601, UTC), level, logger,
    message, service, instance, then the ids and any `extra` the call gave; `exc_info` holds a traceback."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def log_settings() -> tuple[LogSettings, ValidationError | None]:
    """The logging settings from the environment; the defaults when they are refused (the caller's reading
    of all settings then exits naming the refused value, logged with these defaults)."""
    try:
        return LogSettings(), None
    except ValidationError as exc:
        return LogSettings.model_construct(), exc


def logging_config(service: str, settings: LogSettings, *, default_level: str | None = None,
                   stream: IO[str] | None = None) -> dict[str, Any]:
    """The `dictConfig` of a process. `default_level` replaces the INFO default when OUTREACH_LOG_LEVEL is
    not set (the CLI's foreground commands: WARNING, their own output is the report)."""
    level = settings.log_level
    if default_level is not None and "log_level" not in settings.model_fields_set:
        level = default_level
    quiet = max(logging.WARNING, logging.getLevelName(level))
    loggers: dict[str, Any] = {name: {"level": logging.getLevelName(quiet)} for name in QUIET_LOGGERS}
    loggers[GROUP_COORDINATOR_LOGGER] = {"level": level}
    for name in UVICORN_LOGGERS:
        loggers[name] = {"level": level, "handlers": [], "propagate": True}
    for name, override in settings.log_levels.items():
        loggers.setdefault(name, {})["level"] = override
    formatter: dict[str, Any]
    if settings.log_format == "json":
        formatter = {"()": JsonFormatter, "fmt": JSON_FIELDS, "rename_fields": JSON_NAMES,
                     "reserved_attrs": JSON_LEFT_OUT}
    else:
        formatter = {"()": TextFormatter, "format": TEXT_FORMAT}
    handler: dict[str, Any] = {"class": "logging.StreamHandler", "formatter": "line", "filters": ["ids"],
                               "stream": stream if stream is not None else "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,  # module-level loggers made at import keep working
        "filters": {"ids": {"()": IdsFilter, "service": service, "instance": settings.instance_name or "0"}},
        "formatters": {"line": formatter},
        "handlers": {"stderr": handler},
        "loggers": loggers,
        "root": {"level": level, "handlers": ["stderr"]},
    }


def configure(service: str, settings: LogSettings | None = None, *, default_level: str | None = None,
              stream: IO[str] | None = None) -> LogSettings:
    """Configure this process's logging (replacing any earlier configuration); returns the settings used."""
    if settings is None:
        settings, _ = log_settings()
    logging.config.dictConfig(logging_config(service, settings, default_level=default_level, stream=stream))
    logging.captureWarnings(True)  # Python warnings (deprecations...) as log lines in the same format
    return settings
