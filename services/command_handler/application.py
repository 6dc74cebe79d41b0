"""The command handler's use cases: load the aggregates, call the domain method that decides (it checks
its own guards and raises `Rejected`), then one save() of every aggregate touched. Commands arrive as
the typed `schemas.commands` union, provider results as `schemas.internal.SenderResult` (handlers.py).

Only this application writes to the event store. Each use case commits its message moves, the campaign's
derived status, the channel lock and the command's stored answer in one transaction; a racing writer
loses on optimistic concurrency and the use case is decided again on fresh state.
"""
from __future__ import annotations

import bisect
import functools
import heapq
import itertools
import logging
import threading
import uuid
import weakref
import zlib
from array import array
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from eventsourcing.application import AggregateNotFoundError, Application, Cache, Repository
from eventsourcing.persistence import (
    Compressor, IntegrityError, InterfaceError, JSONTranscoder, Mapper, OperationalError, ProgrammingError,
    StoredEvent, Transcoding,
)
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import get_topic, retry

from schemas.commands import (
    AddContacts, Command, CommandHeader, CreateCampaign, DeleteCampaign, RetryFailedMessages, RunCampaign,
    SendTestMessage, StopCampaign, UpdateTemplate,
)
from schemas import topics
from schemas.destinations import validate_destination
from schemas.internal import SenderResult
from services.common import ids, jsoncodec
from services.common.templating import render, render_email
from services.common.fence import HandoffFence, open_fence
from services.common.retry import retrying
from services.common.settings import Settings
from services.command_handler import wire
from services.command_handler.domain import contacts as contact_rules
from services.command_handler.domain import rules
from services.command_handler.domain.model import (
    Campaign, ChannelLock, CommandLog, DestinationSet, MessageBlock, OptOutList, Rejected, TestSendQuota,
)
from services.command_handler.domain.rules import Move

log = logging.getLogger(__name__)

CONFLICT_RETRIES = 20
# A claim's work record (WorkClaimed: ids and a template digest, then its items) in encoded bytes: under the
# contract's 1 MiB record limit with room for the envelope, whatever the items' characters.
WORK_RECORD_BUDGET = topics.MAX_RECORD_BYTES - 16 * 1024
OPEN_ATTEMPTS = 10
# Memory (docs/design.md, "Stored events": snapshots and caches): what the handler keeps does not grow with a
# campaign. The aggregate cache holds at most CACHED_AGGREGATES aggregates, its message blocks at most
# CACHED_MESSAGES messages in all (about 0.4 KB each); the message indexes (message_id -> block, 12 bytes a
# message) at most INDEXED_MESSAGES messages, the campaign used last always kept.
CACHED_AGGREGATES = 1000
CACHED_MESSAGES = 32_000
INDEXED_MESSAGES = 1_000_000
# A snapshot after every this many events of an aggregate (eventsourcing's `snapshotting_intervals`): a block
# is loaded from its snapshot and at most 9 later events, a campaign from at most 49.
SNAPSHOT_INTERVALS = {Campaign: 50, MessageBlock: 10, OptOutList: 100, ChannelLock: 100, TestSendQuota: 50}

T = TypeVar("T")


class PostgresRecorder(PostgresApplicationRecorder):
    """eventsourcing's PostgreSQL recorder, except for a save of more than BIG_SAVE_BYTES of events (the run,
    stop or retry of a big campaign): the library sends all its events as one array of composites in one
    statement in psycopg's pipeline mode, which never completed for several MB (the server waits in
    ClientRead, the client in poll; psycopg issue 685's kind) while holding the events table's exclusive lock,
    and took about four times the events' size in memory on the way. Such a save inserts its events row by
    row (`executemany`, the state as binary) in one transaction, after the same table lock and NOTIFY, and
    answers the notification ids in order; a conflict is an IntegrityError as before."""

    BIG_SAVE_BYTES = 1024 * 1024

    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        if sum(len(e.state) for e in stored_events) <= self.BIG_SAVE_BYTES:
            return super().insert_events(stored_events, **kwargs)
        return self._insert_rows(stored_events, **kwargs)

    @functools.cached_property
    def _insert_row_statement(self) -> Any:
        from psycopg import sql

        return sql.SQL("INSERT INTO {schema}.{table} (originator_id, originator_version, topic, state) "
                       "VALUES (%s, %s, %s, %b) RETURNING notification_id").format(
            schema=sql.Identifier(self.datastore.schema), table=sql.Identifier(self.events_table_name))

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def _insert_rows(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        with self.datastore.get_connection() as conn, conn.transaction(), conn.cursor() as curs:
            self._insert_events(curs, stored_events, **kwargs)
            self._lock_table(curs)
            self._notify_channel(curs)
            curs.executemany(self._insert_row_statement, [
                (e.originator_id, e.originator_version, e.topic, e.state) for e in stored_events], returning=True)
            notification_ids: list[int] = []
            while True:
                notification_ids += [row["notification_id"] for row in curs.fetchall()]
                if not curs.nextset():
                    break
            return notification_ids


class LargeEventCompressor(Compressor):
    """zlib for a stored event of at least COMPRESS_FROM bytes, the rest as they are. A block's event lists a
    change per message (about 64 bytes each, 1,000 to a block) and compresses about 15 to 1 at level 1, in
    under a millisecond: the run of a 300,000-message campaign holds and saves about 1 MB, not 19 MB.

    Reading tells the two apart by the first byte: the transcoder's JSON starts with `{`, zlib's stream with
    0x78, so events stored before this compressor (or small ones) read as they are."""

    COMPRESS_FROM = 1024
    LEVEL = 1  # level 6 is 3x slower for 1 % smaller blocks

    def compress(self, data: bytes) -> bytes:
        return zlib.compress(data, self.LEVEL) if len(data) >= self.COMPRESS_FROM else data

    def decompress(self, data: bytes) -> bytes:
        return zlib.decompress(data) if data[:1] == b"\x78" else data


def _provenance(command: Command | None) -> dict[str, str]:
    return {name: value for name in wire.PROVENANCE_FIELDS if (value := getattr(command, name, None))}


def _mark_provenance(campaign: Campaign, command_id: str, provenance: dict[str, str]) -> None:
    """Put the command's provenance (`_provenance`) on the campaign's new events answering it, so the relay's
    mapping (wire._campaign_records) publishes it and the history keeps it. Attributes beside the event's own:
    stored and read back with it (the mapper keeps the whole state), never applied (eventsourcing applies only
    the decorated method's parameters)."""
    if not provenance:
        return
    for event in campaign.pending_events:
        if getattr(event, "causation_id", None) == command_id:
            for name, value in provenance.items():
                object.__setattr__(event, name, value)  # events are frozen; this one is not saved yet


def store_env(settings: Settings) -> dict[str, str]:
    """eventsourcing's persistence settings from ours (SQLite file by default, PostgreSQL by setting)."""
    env = {
        "AGGREGATE_CACHE_MAXSIZE": "5000",
        # The cache hands out its own objects (no deepcopy per load: blocks are big); a failed use case
        # evicts what it touched, so a half-decided aggregate never survives in the cache.
        "DEEPCOPY_FROM_AGGREGATE_CACHE": "n",
        "COMPRESSOR_TOPIC": get_topic(LargeEventCompressor),
    }
    if settings.event_store == "postgres":
        url = urlparse(settings.postgres_dsn)
        env.update({
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": url.path.lstrip("/") or "postgres",
            "POSTGRES_HOST": url.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(url.port or 5432),
            "POSTGRES_USER": unquote(url.username or "postgres"),
            "POSTGRES_PASSWORD": unquote(url.password or ""),
            "APPLICATION_RECORDER_TOPIC": get_topic(PostgresRecorder),
        })
    else:
        path = settings.event_store_sqlite_path
        path.parent.mkdir(parents=True, exist_ok=True)
        env.update({"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(path),
                    "SQLITE_LOCK_TIMEOUT": "30"})
    return env


def open_app(settings: Settings, attempts: int = OPEN_ATTEMPTS) -> "OutreachApp":
    """The application, retrying while another process creates the same tables in a fresh database
    (PostgreSQL's CREATE TABLE IF NOT EXISTS races between processes: e.g. DuplicateTable)."""
    for attempt in retrying(on=(IntegrityError, OperationalError, ProgrammingError), timeout_s=None,
                            attempts=attempts):
        with attempt:
            return OutreachApp(settings)
    raise AssertionError("unreachable")


def now() -> datetime:
    return datetime.now(timezone.utc)


class SetAsList(Transcoding):
    """Sets in stored state (an opt-out list's destinations in its snapshot) as JSON lists."""
    type = set
    name = "set"

    def encode(self, obj: set) -> list:
        return list(obj)

    def decode(self, data: list) -> set:
        return set(data)


class DestinationSetAsRuns(Transcoding):
    """A campaign's open-contacts destinations in a snapshot (model.DestinationSet)."""
    type = DestinationSet
    name = "destination_set"

    def encode(self, obj: DestinationSet) -> list:
        return obj.to_json()

    def decode(self, data: list) -> DestinationSet:
        return DestinationSet.from_json(data)


class EncodedEvent:
    """A block's event already in its stored form, the domain event let go: a run, stop or retry of a big
    campaign keeps about 4 bytes a message (compressed, LargeEventCompressor) until its one save, not the
    event's lists (about 200). Saved like any event (`OutreachMapper` passes it through); no snapshot is taken
    at its version (the next multiple of the interval takes one)."""

    __slots__ = ("stored", "originator_id", "originator_version")

    def __init__(self, stored: StoredEvent):
        self.stored = stored
        self.originator_id = stored.originator_id
        self.originator_version = stored.originator_version


class OutreachMapper(Mapper):
    def to_stored_event(self, domain_event: Any) -> StoredEvent:
        if isinstance(domain_event, EncodedEvent):
            return domain_event.stored
        return super().to_stored_event(domain_event)


class BoundedAggregateCache(Cache):
    """The repository's cache, least recently used first out, bounded twice: at most `max_entries`
    aggregates, and message blocks of at most `max_messages` messages in all (an aggregate's
    `cache_weight`), so a 300,000-message campaign keeps as many blocks in memory as a 30,000 one.

    Always truthy (the repository skips a falsy cache)."""

    def __init__(self, max_entries: int = CACHED_AGGREGATES, max_messages: int = CACHED_MESSAGES):
        super().__init__()
        self.max_entries = max_entries
        self.max_messages = max_messages
        self.cache: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self.messages = 0
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.cache)

    def get(self, key: Any, *, evict: bool = False) -> Any:
        with self._lock:
            if evict:
                value, weight = self.cache.pop(key)
                self.messages -= weight
                return value
            value, _ = self.cache[key]
            self.cache.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        if value is None:
            return
        weight = getattr(value, "cache_weight", 0)
        with self._lock:
            previous = self.cache.pop(key, None)
            if previous is not None:
                self.messages -= previous[1]
            self.cache[key] = (value, weight)
            self.messages += weight
            if len(self.cache) > self.max_entries or self.messages > self.max_messages:
                self._shrink(keep=key)

    def _shrink(self, keep: Any) -> None:
        for key in list(self.cache):  # oldest first
            over_entries = len(self.cache) > self.max_entries
            over_messages = self.messages > self.max_messages
            if not (over_entries or over_messages):
                return
            if key == keep:
                continue
            weight = self.cache[key][1]
            if over_entries or weight:
                del self.cache[key]
                self.messages -= weight


class MessageIndex:
    """message_id -> (block position, index in the block) for one campaign, in about 12 bytes a message (a
    dict of the ids took about 190): the rows in block order, and sorted keys made of the first 44 bits of
    each message id and the message's number. A lookup bisects the keys and confirms each candidate by
    making its id from the row (ids.message_id), so it answers exactly what a dict of the ids would."""

    NUMBER_BITS = 20  # message numbers below 2**20 (a campaign has at most 300,000 messages)

    def __init__(self, campaign_id: str, blocks_rows: Iterable[Sequence[int]]):
        self.campaign_id = campaign_id
        self.rows = array("I")
        self.starts = array("I")  # the number of each block's first message
        runs = []
        for rows in blocks_rows:
            start = len(self.rows)
            self.starts.append(start)
            self.rows.extend(rows)
            runs.append(array("Q", sorted((self._prefix(ids.message_id(campaign_id, row)) << self.NUMBER_BITS)
                                          | (start + i) for i, row in enumerate(rows))))
        if len(self.rows) >= 1 << self.NUMBER_BITS:
            raise ValueError(f"{len(self.rows)} messages: more than a message index numbers")
        self.keys = array("Q", heapq.merge(*runs))

    @staticmethod
    def _prefix(message_id: str) -> int:
        return int(message_id[:8] + message_id[9:12], 16)

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, message_id: str, default: Any = None) -> tuple[int, int] | Any:
        if not isinstance(message_id, str) or len(message_id) != 36:
            return default
        try:
            prefix = self._prefix(message_id)
        except ValueError:
            return default
        keys, mask = self.keys, (1 << self.NUMBER_BITS) - 1
        i = bisect.bisect_left(keys, prefix << self.NUMBER_BITS)
        while i < len(keys) and keys[i] >> self.NUMBER_BITS == prefix:
            number = keys[i] & mask
            if ids.message_id(self.campaign_id, self.rows[number]) == message_id:
                position = bisect.bisect_right(self.starts, number) - 1
                return position, number - self.starts[position]
            i += 1
        return default

    def __contains__(self, message_id: object) -> bool:
        return self.get(message_id) is not None  # type: ignore[arg-type]

    def __getitem__(self, message_id: str) -> tuple[int, int]:
        ref = self.get(message_id)
        if ref is None:
            raise KeyError(message_id)
        return ref


class OutreachApp(Application):
    name = "outreach"
    # eventsourcing's snapshotting: after a save, a snapshot of each aggregate whose new version is a multiple
    # of its interval (table `snapshots` beside the events; aggregates stored before have none until then).
    snapshotting_intervals = SNAPSHOT_INTERVALS

    def __init__(self, settings: Settings, env: dict[str, str] | None = None):
        super().__init__(env={**store_env(settings), **(env or {})})
        self.settings = settings
        self._touched: set[uuid.UUID] = set()
        # The aggregates the use case being decided holds: loading one again gives the same object, whatever
        # the bounded cache dropped meanwhile. None outside a use case.
        self._in_use: weakref.WeakValueDictionary[uuid.UUID, Any] | None = None
        self._saving: dict[uuid.UUID, Any] = {}
        self._indexes: OrderedDict[str, MessageIndex] = OrderedDict()  # campaign_id -> its message index

    def construct_repository(self) -> Repository:
        repository = super().construct_repository()
        if repository.cache is not None:
            repository.cache = BoundedAggregateCache(CACHED_AGGREGATES, CACHED_MESSAGES)
        return repository

    def construct_mapper(self) -> Mapper:
        return self.factory.mapper(transcoder=self.construct_transcoder(), mapper_class=OutreachMapper)

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        transcoder.register(SetAsList())
        transcoder.register(DestinationSetAsRuns())

    # ----- snapshots ----------------------------------------------------------------------------
    def save(self, *objs: Any, **kwargs: Any) -> Any:
        self._saving = {obj.id: obj for obj in objs if hasattr(obj, "collect_events")}
        try:
            return super().save(*objs, **kwargs)
        finally:
            self._saving = {}

    def take_snapshot(self, aggregate_id: uuid.UUID, version: int | None = None, projector_func: Any = None) -> None:
        """eventsourcing calls this after a save for each aggregate whose version reached a multiple of its
        interval. The aggregate just saved is that recorded state: it is snapshotted as it is, without reading
        its events again (else, e.g. a save of two events of which the first reached it, the library's way).
        A campaign whose contacts are still open is not snapshotted: it is loaded and saved once per chunk
        (it stays cached) and its destinations would make each snapshot megabytes. A snapshot that fails is
        logged, never raised: the use case is stored already, and a conflict raised from here would have it
        decided a second time."""
        try:
            aggregate = self._saving.get(aggregate_id)
            if isinstance(aggregate, Campaign) and not aggregate.contacts_closed:
                return
            if aggregate is not None and version is not None and aggregate.version == version \
                    and not aggregate.pending_events:
                self.snapshots.put([type(aggregate).Snapshot.take(aggregate)])
            elif projector_func is None:
                super().take_snapshot(aggregate_id, version)
            else:
                super().take_snapshot(aggregate_id, version, projector_func)
        except Exception:
            log.warning("no snapshot of %s at version %s", aggregate_id, version, exc_info=True)

    @functools.cached_property
    def fence(self) -> HandoffFence:
        """The hand-off fence (the relay opens claims there, the use cases that take a claim back close
        them); opened on first use, so a reader of the store (`outreach replay`) never makes one."""
        return open_fence(self.settings)

    def close(self) -> None:
        super().close()
        if "fence" in self.__dict__:
            self.fence.close_connection()

    # ----- loading ------------------------------------------------------------------------------
    def _load(self, aggregate_id: uuid.UUID, *, hold: bool = True) -> Any | None:
        """The aggregate, fast-forwarded from the store; within a use case the same object as long as the use
        case holds it (`hold=False`: not remembered, for blocks read once in a pass over a campaign)."""
        self._touched.add(aggregate_id)
        if self._in_use is not None and (held := self._in_use.get(aggregate_id)) is not None:
            return held
        try:
            aggregate = self.repository.get(aggregate_id)
        except AggregateNotFoundError:
            return None
        if hold and self._in_use is not None:
            self._in_use[aggregate_id] = aggregate
        return aggregate

    def _encoded_events(self, block: MessageBlock) -> list[EncodedEvent]:
        """The block's new events, taken out of it in their stored form (see EncodedEvent)."""
        return [EncodedEvent(self.mapper.to_stored_event(e)) for e in block.collect_events()]

    def _each_block(self, campaign: Campaign) -> Iterator[tuple[int, MessageBlock]]:
        """Every block of the campaign with its position, loaded one at a time: a pass over a 300,000-message
        campaign holds the block in hand (and those the use case holds), not all 300."""
        campaign_id = str(campaign.id)
        for position, block_no in enumerate(campaign.block_nos):
            yield position, self._load(ids.block_id(campaign_id, block_no), hold=False)

    def _campaign(self, campaign_id: str) -> Campaign:
        campaign = self._load(uuid.UUID(campaign_id))
        if campaign is None or campaign.deleted:
            raise Rejected("unknown_campaign", f"no campaign {campaign_id}")
        return campaign

    def _block_at(self, campaign: Campaign, position: int, *, hold: bool = True) -> MessageBlock:
        return self._load(ids.block_id(str(campaign.id), campaign.block_nos[position]), hold=hold)

    def _lock(self, channel: str) -> ChannelLock:
        return self._load(ids.channel_lock_id(channel)) or ChannelLock(channel)

    def _refs(self, campaign: Campaign) -> MessageIndex:
        """message_id -> (block position, index), built once per campaign (contacts never change after Run);
        the indexes of at most INDEXED_MESSAGES messages are kept, least recently used dropped first."""
        campaign_id = str(campaign.id)
        index = self._indexes.get(campaign_id)
        if index is not None and len(index) == campaign.message_count:
            self._indexes.move_to_end(campaign_id)
            return index
        index = MessageIndex(campaign_id, (block.rows for _, block in self._each_block(campaign)))
        self._indexes[campaign_id] = index
        self._indexes.move_to_end(campaign_id)
        while len(self._indexes) > 1 and sum(map(len, self._indexes.values())) > INDEXED_MESSAGES:
            self._indexes.popitem(last=False)
        return index

    def _run(self, decide: Callable[[], list[Any]]) -> list[Any]:
        """Runs a use case until it saves without conflict; evicts what a failed attempt touched.

        `decide` returns the aggregates to save, and may add the events of blocks it let go of, already in
        their stored form (`_encoded_events`: a pass over every block of a big campaign)."""
        try:
            for attempt in range(CONFLICT_RETRIES):
                self._touched = set()
                self._in_use = weakref.WeakValueDictionary()
                try:
                    to_save = decide()
                    if to_save:
                        self.save(*to_save)
                    return to_save
                except IntegrityError:
                    self._evict()
                    log.info("optimistic concurrency conflict, deciding again (attempt %d)", attempt + 1)
                except BaseException:
                    self._evict()
                    raise
            raise RuntimeError("use case kept conflicting")
        finally:
            self._in_use = None

    def _evict(self) -> None:
        cache = self.repository.cache
        for aggregate_id in self._touched:
            try:
                cache.get(aggregate_id, evict=True)
            except KeyError:
                pass
        if self._in_use is not None:
            self._in_use = weakref.WeakValueDictionary()

    # ----- commands -----------------------------------------------------------------------------
    def handle_command(self, command: Command | None, header: CommandHeader, invalid_detail: str | None = None) -> None:
        """Answers one command exactly once: a repeated command_id gets its stored answer again.

        `command` is the parsed command, or None with `invalid_detail` when it failed validation (`header`
        then still says what to answer).
        """
        command_id, campaign_id, command_type = header.command_id, header.campaign_id, header.type

        def decide() -> list[Any]:
            previous = self._load(ids.command_log_id(command_id))
            if previous is not None:
                previous.repeat(records=previous.records)
                return [previous]
            provenance = _provenance(command)
            try:
                if command is None:
                    raise Rejected("invalid_command", invalid_detail or "invalid command")
                changed = self._decide(command)
                _refuse_unpublishable(changed)
            except Rejected as rejection:
                self._evict()
                log.info("%s rejected: %s", command_type, rejection)
                return self._reject(command_id, campaign_id, command_type, rejection, provenance)
            campaign = next(a for a in changed if isinstance(a, Campaign))
            _mark_provenance(campaign, command_id, provenance)
            answer = wire.campaign_answer_records(campaign.pending_events, command_id)
            return [*changed, CommandLog(command_id=command_id, campaign_id=campaign_id,
                                         records=[r.as_dict() for r in answer], publish=False)]

        self._run(decide)

    def _reject(self, command_id: str, campaign_id: str, command_type: str, rejection: Rejected,
                provenance: dict[str, str] | None = None) -> list[Any]:
        campaign = self._load(uuid.UUID(campaign_id))
        if campaign is None:
            record = wire.rejection_for_unknown_campaign(
                command_id=command_id, campaign_id=campaign_id, command_type=command_type,
                reason=rejection.reason, detail=rejection.detail, occurred_at=now())
            record.value.update(provenance or {})
            return [CommandLog(command_id=command_id, campaign_id=campaign_id, records=[record.as_dict()],
                               publish=True)]
        campaign.record_rejection(command_id=command_id, command_type=command_type, reason=rejection.reason,
                                  detail=rejection.detail)
        _mark_provenance(campaign, command_id, provenance or {})
        answer = wire.campaign_answer_records(campaign.pending_events, command_id)
        return [campaign, CommandLog(command_id=command_id, campaign_id=campaign_id,
                                     records=[r.as_dict() for r in answer], publish=False)]

    def _decide(self, command: Command) -> list[Any]:
        """The use case of one command: every aggregate it changed (not saved yet)."""
        return self._USE_CASES[type(command)](self, command)

    def _create_campaign(self, cmd: CreateCampaign) -> list[Any]:
        if self._load(uuid.UUID(cmd.campaign_id)) is not None:
            raise Rejected("campaign_exists", "campaign ids are never reused")
        campaign = Campaign(campaign_id=uuid.UUID(cmd.campaign_id), name=cmd.name, description=cmd.description,
                            channel=cmd.channel, template=cmd.template.model_dump(mode="json"),
                            created_by=cmd.issued_by, causation_id=cmd.command_id)
        return [campaign]

    def _add_contacts(self, cmd: AddContacts) -> list[Any]:
        campaign = self._campaign(cmd.campaign_id)
        if campaign.chunk_applied(cmd.chunk_no):
            campaign.repeat_contacts_answer(cmd.chunk_no, cmd.command_id)
            return [campaign]
        campaign.check_can_add_contacts(cmd.chunk_no, [c.row for c in cmd.contacts])  # before the screening
        # (v1.1) The import's own region, else the setting: the rule every importer's check applies too.
        valid, invalid_rows = contact_rules.screen_chunk(
            campaign.channel, [(c.row, c.destination, dict(c.variables)) for c in cmd.contacts],
            campaign.destinations, cmd.default_region or self.settings.default_region)
        to_save: list[Any] = [campaign]
        new_blocks = []
        if valid:
            new_blocks.append(MessageBlock(
                campaign_id=cmd.campaign_id, block_no=cmd.chunk_no, channel=campaign.channel,
                rows=[r for r, _, _ in valid], destinations=[d for _, d, _ in valid],
                variables=[v for _, _, v in valid], causation_id=cmd.command_id))
            to_save += new_blocks
        # For the run summary: every block, read once (the campaign's one at a time, then this chunk's).
        blocks = itertools.chain((b for _, b in self._each_block(campaign)), new_blocks) if cmd.last_chunk else []
        campaign.add_contacts(chunk_no=cmd.chunk_no, valid_rows=[r for r, _, _ in valid],
                              destinations=[d for _, d, _ in valid],
                              invalid_rows=[[row, reason] for row, reason in invalid_rows],
                              last_chunk=cmd.last_chunk, blocks=blocks, causation_id=cmd.command_id)
        return to_save

    def _update_template(self, cmd: UpdateTemplate) -> list[Any]:
        campaign = self._campaign(cmd.campaign_id)
        campaign.check_can_update_template(cmd.template)  # before the blocks are loaded
        # For the run summary: every block, read once.
        blocks = (b for _, b in self._each_block(campaign)) if campaign.contacts_closed else []
        campaign.update_template(cmd.template, blocks, cmd.command_id)
        return [campaign]

    def _run_campaign(self, cmd: RunCampaign) -> list[Any]:
        """Two passes over the blocks, one block in hand at a time: the first counts what each waiting message
        becomes (queued, or opted out when its destination is), the run starts, the second moves them; each
        block's event is taken out of it, so the blocks need not stay in memory until the one save."""
        campaign = self._campaign(cmd.campaign_id)
        disclaimer = cmd.disclaimer.model_dump(mode="json")
        campaign.check_can_run(disclaimer)  # before the blocks are loaded and every message's move worked out
        lock = self._lock(campaign.channel)
        lock.check_free_for(cmd.campaign_id)  # (the last reason) before the blocks are loaded too
        suppressed_destinations = self.suppressed(campaign.channel)

        def opting_out(block: MessageBlock) -> tuple[int, array]:
            waiting = block.indexes_in("waiting")
            return len(waiting), array("H", [i for i in waiting if block.destinations[i] in suppressed_destinations])

        planned = {position: opting_out(block) for position, block in self._each_block(campaign)}
        suppressed = sum(len(out) for _, out in planned.values())
        queued = sum(waiting for waiting, _ in planned.values()) - suppressed
        campaign.start_run(accepted_by=cmd.issued_by, disclaimer=disclaimer,
                           queued=queued, suppressed=suppressed, causation_id=cmd.command_id)
        lock.take(cmd.campaign_id, hold=campaign.holds_channel)
        events: list[Any] = []
        for position, block in self._each_block(campaign):
            if opting_out(block) != planned[position]:
                raise IntegrityError(f"block {block.id} changed while the run was decided")  # decided again
            out = set(planned[position][1])
            block.move([(index, Move(status="opted_out" if index in out else "queued"))
                        for index in block.indexes_in("waiting")], run_no=campaign.run_no, causation_id=cmd.command_id)
            events += self._encoded_events(block)
        return [campaign, *events, *([lock] if lock.pending_events else [])]

    def _stop_campaign(self, cmd: StopCampaign) -> list[Any]:
        """Like the run: the queued messages counted block by block, the stop, then each block's cancellations."""
        campaign = self._campaign(cmd.campaign_id)
        campaign.check_running()  # the stop's guards, before the blocks are loaded
        campaign.check_stop_confirmed(cmd.confirmed)
        queued = {position: n for position, block in self._each_block(campaign)
                  if (n := len(block.indexes_in("queued")))}
        campaign.stop(stopped_by=cmd.issued_by, confirmed=cmd.confirmed, cancelled=sum(queued.values()),
                      causation_id=cmd.command_id)
        events: list[Any] = []
        for position, n in queued.items():
            block = self._block_at(campaign, position, hold=False)
            indexes = block.indexes_in("queued")
            if len(indexes) != n:
                raise IntegrityError(f"block {block.id} changed while the stop was decided")  # decided again
            block.move([(i, Move(status="cancelled")) for i in indexes], run_no=None, causation_id=cmd.command_id)
            events += self._encoded_events(block)
        lock = self._lock(campaign.channel)
        lock.release(cmd.campaign_id)
        return [campaign, *events, lock]

    def _retry_failed(self, cmd: RetryFailedMessages) -> list[Any]:
        """Like the run: the retryable messages chosen block by block, the retry, then each block's moves."""
        campaign = self._campaign(cmd.campaign_id)
        campaign.check_retryable()  # before the blocks are loaded
        named = cmd.message_ids is not None
        unknown: list[str] = []
        if named:
            refs = self._refs(campaign)
            unknown = [m for m in cmd.message_ids if m not in refs]
            wanted: dict[int, list[int]] = defaultdict(list)
            for m in dict.fromkeys(cmd.message_ids):
                if (ref := refs.get(m)) is not None:
                    wanted[ref[0]].append(ref[1])
            positions: Iterable[int] = wanted
        else:
            positions = range(len(campaign.block_nos))

        def retryable(block: MessageBlock, indexes: Iterable[int]) -> array:
            return array("H", [i for i in indexes if rules.is_retryable(
                block.state(i), named=named, include_cancelled=cmd.include_cancelled)])

        selected: dict[int, array] = {}
        moved_from: dict[str, int] = defaultdict(int)
        for position in positions:
            block = self._block_at(campaign, position, hold=False)
            chosen = retryable(block, wanted[position] if named else range(len(block.rows)))
            if chosen:
                selected[position] = chosen
                for i in chosen:
                    moved_from[block.status[i]] += 1
        campaign.start_retry(moved_from=dict(moved_from), unknown_message_ids=unknown, causation_id=cmd.command_id)
        lock = self._lock(campaign.channel)
        lock.take(cmd.campaign_id, hold=True)
        events: list[Any] = []
        for position, indexes in selected.items():
            block = self._block_at(campaign, position, hold=False)
            if retryable(block, indexes) != indexes:
                raise IntegrityError(f"block {block.id} changed while the retry was decided")  # decided again
            block.move([(i, Move(status="queued", reason=None, accepted=False)) for i in indexes],
                       run_no=campaign.run_no, causation_id=cmd.command_id)
            events += self._encoded_events(block)
        return [campaign, *events, lock]

    def _delete_campaign(self, cmd: DeleteCampaign) -> list[Any]:
        campaign = self._campaign(cmd.campaign_id)
        campaign.delete(cmd.command_id)
        return [campaign]

    def _send_test_message(self, cmd: SendTestMessage) -> list[Any]:
        """A test message (our addition): in any status but deleted, whoever holds the channel. In the contract's
        order of reasons: the destination and the row are judged with the campaign's channel (invalid_command),
        then the issuer's hourly quota (test_send_limit); an opted-out destination is answered opted_out at once
        (counted, nothing sent); else it is queued for the sender (the relay opens its fence row and sends it the
        work). No message, count, status or lock of the campaign changes."""
        campaign = self._campaign(cmd.campaign_id)
        destination, problem = validate_destination(campaign.channel, cmd.destination, self.settings.default_region)
        if destination is None:
            raise Rejected("invalid_command", f"destination is {problem} for an {campaign.channel} campaign")
        row, variables = self._test_contact(campaign, cmd.row)
        variables.update(cmd.variables or {})
        quota = self._load(ids.quota_id_of_test_sends(cmd.issued_by)) or TestSendQuota(cmd.issued_by)
        quota.use(now().timestamp())
        message_id = ids.message_id_of_test_send(cmd.command_id)
        if destination in self.suppressed(campaign.channel):
            campaign.complete_test_message(message_id=message_id, outcome="opted_out", reason=None, provider_code=None,
                                           provider_message_id=None, causation_id=cmd.command_id,
                                           destination=destination, requested_by=cmd.issued_by)
        else:
            campaign.queue_test_message(message_id=message_id, destination=destination, requested_by=cmd.issued_by,
                                        row=row, variables=variables,
                                        preview=_preview(campaign.channel, campaign.template, variables),
                                        causation_id=cmd.command_id)
        return [campaign, quota]

    def _test_contact(self, campaign: Campaign, row: int | None) -> tuple[int | None, dict[str, str]]:
        """The contact a test message is rendered with: the one of `row`, else the campaign's first valid one
        (None and no variables while it has none)."""
        if row is None:
            if not campaign.block_nos:
                return None, {}
            block = self._block_at(campaign, 0)
            return block.rows[0], dict(block.variables[0])
        ref = self._refs(campaign).get(ids.message_id(str(campaign.id), row)) if campaign.block_nos else None
        campaign.check_test_contact(row, found=ref is not None)
        return row, dict(self._block_at(campaign, ref[0]).variables[ref[1]])

    # Each command's use case.
    _USE_CASES: dict[type, Callable[[Any, Any], list[Any]]] = {
        CreateCampaign: _create_campaign, AddContacts: _add_contacts, UpdateTemplate: _update_template,
        RunCampaign: _run_campaign, StopCampaign: _stop_campaign, RetryFailedMessages: _retry_failed,
        DeleteCampaign: _delete_campaign, SendTestMessage: _send_test_message,
    }

    def apply_test_result(self, *, result_id: str, campaign_id: str, command_id: str, message_id: str,
                          outcome: str, provider_code: str | None, provider_message_id: str | None) -> None:
        """What the sender did with a test message: recorded once on its campaign (TestMessageCompleted, answering
        its command), a no_answer amended by a later definite outcome. A provider that says the destination opted
        out (21610) puts it on the channel's opt-out list, as it would for a campaign message."""

        def decide() -> list[Any]:
            campaign = self._load(uuid.UUID(campaign_id))
            if campaign is None or campaign.deleted or ids.message_id_of_test_send(command_id) != message_id:
                return []
            public, reason = rules.outcome_of_test_message(outcome, provider_code, campaign.channel)
            if not campaign.complete_test_message(message_id=message_id, outcome=public, reason=reason,
                                                  provider_code=provider_code,
                                                  provider_message_id=provider_message_id, causation_id=command_id):
                return []
            to_save: list[Any] = [campaign]
            if public == "opted_out":
                opt_outs = self._opt_out_list(campaign.channel)
                opt_outs.opt_out(campaign.test_messages[message_id]["destination"], f"result:{outcome}",
                                 result_id)
                to_save += [opt_outs] if opt_outs.pending_events else []
            return to_save

        self._run(decide)

    def suppressed(self, channel: str) -> set[str]:
        """Opted-out destinations of a channel: never sent to until they opt back in."""
        opt_outs = self._load(ids.opt_out_list_id(channel))
        return opt_outs.destinations if opt_outs is not None else set()

    def _opt_out_list(self, channel: str) -> OptOutList:
        return self._load(ids.opt_out_list_id(channel)) or OptOutList(channel)

    def apply_opt_out(self, *, opt_out_id: str, channel: str, destination: str, opted_out: bool,
                      source: str, issued_by: str | None = None, reason: str | None = None) -> None:
        """SMS STOP/START, 21610, email unsubscribe or spam report, or a change by hand (`manual`: who made it, and a
        removal's reason, kept on the list's event): the channel's opt-out list changes."""

        def decide() -> list[Any]:
            opt_outs = self._opt_out_list(channel)
            if opted_out:
                opt_outs.opt_out(destination, source, opt_out_id, issued_by=issued_by)
            else:
                opt_outs.opt_in(destination, source, opt_out_id, issued_by=issued_by, reason=reason)
            return [opt_outs] if opt_outs.pending_events else []

        self._run(decide)

    def apply_hold(self, *, hold_id: str, campaign_id: str, provider: str, held: bool, reason: str) -> None:
        """A sender's breaker held (or released) the campaign's provider. A hold also returns the claimed
        messages nobody handed off to the queue (contract v1.1): the fence closes them first, so no sender
        can still hand one off, and tells which they are."""

        def decide() -> list[Any]:
            campaign = self._load(uuid.UUID(campaign_id))
            if campaign is None:
                return []
            campaign.record_hold(provider=provider, held=held, reason=reason, causation_id=hold_id)
            to_save: list[Any] = []
            if held:
                returned = self.fence.close_open_of_campaign(campaign_id, closed_by=hold_id)
                refs = self._refs(campaign) if returned else {}
                per_block: dict[int, list[tuple[int, None]]] = defaultdict(list)
                for message_id in returned:
                    if (ref := refs.get(message_id)) is not None:
                        per_block[ref[0]].append((ref[1], None))
                claiming = campaign.holds_channel
                to_save = self._move_messages(campaign, per_block, hold_id,
                                              lambda state, _: rules.hold_move(state, claiming=claiming))
            return to_save or ([campaign] if campaign.pending_events else [])

        self._run(decide)

    # ----- claims -------------------------------------------------------------------------------
    def claim(self, *, claim_id: str, campaign_id: str, max_messages: int) -> int:
        """Moves up to max_messages queued messages to sending in one save; returns how many."""
        claimed = 0

        def decide() -> list[Any]:
            nonlocal claimed
            campaign = self._load(uuid.UUID(campaign_id))
            if campaign is None or not campaign.accepts_claim(claim_id) or campaign.is_held:
                return []  # held: unanswered (the senders pause claiming until CampaignSendingResumed)
            block_count = len(campaign.block_nos) if campaign.holds_channel else 0
            suppressed_destinations = self.suppressed(campaign.channel)
            items: list[dict] = []
            touched: list[MessageBlock] = []
            suppressed = 0
            budget = WORK_RECORD_BUDGET
            cursor = campaign.claim_cursor
            for position in range(campaign.claim_cursor, block_count):
                block = self._block_at(campaign, position)
                moves = []
                for index in block.indexes_in("queued"):
                    if len(items) >= max_messages or budget <= 0:
                        break
                    destination = block.destinations[index]
                    if destination in suppressed_destinations:
                        moves.append((index, Move(status="opted_out")))
                        suppressed += 1
                        continue
                    item = {
                        "message_id": ids.message_id(campaign_id, block.rows[index]),
                        "row": block.rows[index],
                        "destination": destination,
                        "variables": block.variables[index],
                        "attempt": block.attempt[index],
                    }
                    size = len(jsoncodec.dumps(item)) + 1  # the item as the work record encodes it, and a comma
                    if items and size > budget:
                        budget = 0  # full: this message and the rest wait for the next claim
                        break
                    budget -= size
                    items.append(item)
                    moves.append((index, Move(status="sending", accepted=False)))
                if moves:
                    block.move(moves, run_no=None, causation_id=claim_id)
                    touched.append(block)
                if len(items) >= max_messages or budget <= 0:
                    break
                cursor = position + 1
            released = campaign.record_claim(claim_id=claim_id, items=items, suppressed=suppressed,
                                             cursor=cursor, causation_id=claim_id)
            claimed = len(items)
            to_save: list[Any] = [campaign, *touched]
            if released:
                lock = self._lock(campaign.channel)
                lock.release(campaign_id)
                to_save.append(lock)
            return to_save

        self._run(decide)
        return claimed

    # ----- provider results and timers ----------------------------------------------------------
    def apply_results(self, *, result_id: str, campaign_id: str, results: Sequence[SenderResult]) -> None:
        """Provider outcomes for many messages of one campaign, applied in one save."""

        def decide() -> list[Any]:
            campaign = self._load(uuid.UUID(campaign_id))
            if campaign is None:
                return []
            refs = self._refs(campaign)
            per_block: dict[int, list[tuple[int, SenderResult]]] = defaultdict(list)
            test_destinations: list[tuple[str, SenderResult]] = []  # receipts of test messages that opt out
            for result in self._current_submissions(results):
                ref = refs.get(result.message_id)
                if ref is None:
                    test = campaign.test_messages.get(result.message_id)
                    if test is None:
                        log.warning("result for unknown message %s of campaign %s", result.message_id, campaign_id)
                    elif rules.opts_out_destination(result, campaign.channel):
                        test_destinations.append((test["destination"], result))
                    continue  # a test message's receipt changes no message: only an opt-out is kept
                per_block[ref[0]].append((ref[1], result))
            to_save = self._move_messages(campaign, per_block, result_id,
                                          lambda state, r: rules.result_move(state, r, campaign.channel))
            opting_out = [(position, index, r) for position, block_results in per_block.items()
                          for index, r in block_results if rules.opts_out_destination(r, campaign.channel)]
            if not opting_out and not test_destinations:
                return to_save
            opt_outs = self._opt_out_list(campaign.channel)
            for position, index, r in opting_out:
                block = self._block_at(campaign, position)
                # Only for a message the provider had: a result about one never claimed is not believed.
                if block.status[index] not in rules.NEVER_HANDED_OFF:
                    opt_outs.opt_out(block.destinations[index], f"result:{r.outcome}", result_id)
            for destination, r in test_destinations:
                opt_outs.opt_out(destination, f"result:{r.outcome}", result_id)
            return to_save + ([opt_outs] if opt_outs.pending_events else [])

        self._run(decide)

    def _current_submissions(self, results: Sequence[SenderResult]) -> list[SenderResult]:
        """The results about each message's latest submission, every one with its number: a receipt that came
        without it (before the sender's own result, or from a provider that does not echo it) gets the
        fence's count of hand-offs; one about an earlier submission (a late receipt of an earlier run, after
        a retry handed the message off again) is dropped. Messages without a fence row keep their results."""
        submissions = self.fence.submissions([r.message_id for r in results])
        current = []
        for result in results:
            made = submissions.get(result.message_id)
            if made is not None and result.attempt is not None and result.attempt < made:
                log.info("result %s of submission %d of message %s ignored: it was handed off %d times",
                         result.outcome, result.attempt, result.message_id, made)
                continue
            if made and result.attempt is None:
                result = result.model_copy(update={"attempt": made})
            current.append(result)
        return current

    def apply_expiry(self, *, expiry_id: str, campaign_id: str, message_id: str, kind: str,
                     since_sequence: int) -> None:
        """A timer fired; it changes the message only if nothing happened to it since the timer started."""

        def decide() -> list[Any]:
            campaign = self._load(uuid.UUID(campaign_id))
            if campaign is None:
                return []
            ref = self._refs(campaign).get(message_id)
            block = self._block_at(campaign, ref[0]) if ref is not None else None
            if block is None or block.changed_since(ref[1], since_sequence):
                return []
            # Still `sending` at the Sending limit: a message the fence never granted to a sender did not reach
            # a provider (closed now, so none can take it any more) and is queued again, not timed out.
            was_open, submissions = False, None
            if kind == "sending" and block.status[ref[1]] == "sending":
                was_open, submissions = self.fence.close_if_open(message_id, closed_by=expiry_id)
            per_block = {ref[0]: [(ref[1], kind)]}
            claiming = campaign.holds_channel
            return self._move_messages(
                campaign, per_block, expiry_id,
                lambda state, k: rules.expiry_move(state, k, campaign.channel, handed_off=not was_open,
                                                   submissions=submissions, claiming=claiming))

        self._run(decide)

    def _move_messages(self, campaign: Campaign, per_block: dict[int, list[tuple[int, T]]], causation_id: str,
                       decide_move: Callable[[rules.MessageState, T], Move | None]) -> list[Any]:
        """Applies to each (message index, what happened) of each block position the move `decide_move`
        decides, then the campaign's progress, in one list of aggregates to save."""
        delta: dict[str, int] = defaultdict(int)
        awaiting_delta = 0
        accepted = setup_error = False
        requeued_from: int | None = None
        touched = []
        for position, block_results in per_block.items():
            block = self._block_at(campaign, position)
            states: dict[int, rules.MessageState] = {}
            moves = []
            for index, happened in block_results:
                state = states.get(index) or block.state(index)
                move = decide_move(state, happened)
                if move is None:
                    continue
                after = rules.MessageState(move.status, move.reason,
                                           move.attempt if move.attempt is not None else state.attempt,
                                           state.accepted if move.accepted is None else move.accepted)
                awaiting_delta += rules.awaiting_acceptance(after) - rules.awaiting_acceptance(state)
                accepted = accepted or (after.accepted and not state.accepted and move.reason != "setup_error")
                setup_error = setup_error or move.reason == "setup_error"
                states[index] = after
                moves.append((index, move))
                if move.status == "queued":
                    requeued_from = position if requeued_from is None else min(requeued_from, position)
            if moves:
                for status, n in block.move(moves, run_no=None, causation_id=causation_id).items():
                    delta[status] += n
                touched.append(block)
        if not touched:
            return []
        setup_failed = campaign.setup_fails(refused_credentials=setup_error, accepted_now=accepted)
        events: list[Any] = []  # of the other blocks the setup error moves
        if setup_failed:
            awaiting_delta += self._fail_unaccepted(campaign, delta, touched, causation_id, events)
        released = campaign.record_progress(delta=dict(delta), awaiting_delta=awaiting_delta,
                                            causation_id=causation_id, accepted=accepted,
                                            setup_failed=setup_failed, requeued_from=requeued_from)
        to_save: list[Any] = [campaign, *touched, *events]
        if released:
            lock = self._lock(campaign.channel)
            lock.release(str(campaign.id))
            to_save.append(lock)
        return to_save

    def _fail_unaccepted(self, campaign: Campaign, delta: dict[str, int], touched: list[MessageBlock],
                         causation_id: str, events: list[Any]) -> int:
        """The provider refused the credentials before accepting anything: every message of the run not yet
        accepted fails `setup_error` (contract). Returns the change of messages awaiting acceptance; the
        blocks in `touched` keep their new events, the others' are added to `events` (one block in hand)."""
        awaiting_delta = 0
        held = {block.id for block in touched}
        for _, block in self._each_block(campaign):
            moves = []
            for index, status in enumerate(block.status):
                if rules.fails_on_setup_error(status, block.accepted[index]):
                    awaiting_delta -= rules.awaiting_acceptance(block.state(index))
                    moves.append((index, Move(status="failed", reason="setup_error", accepted=False)))
            if moves:
                for status, n in block.move(moves, run_no=None, causation_id=causation_id).items():
                    delta[status] += n
                if block.id not in held:
                    events += self._encoded_events(block)
        return awaiting_delta

    # ----- reading (CLI, tests) -----------------------------------------------------------------
    def campaign_view(self, campaign_id: str) -> dict | None:
        campaign = self._load(uuid.UUID(campaign_id))
        if campaign is None:
            return None
        return {"campaign_id": campaign_id, "name": campaign.name, "channel": campaign.channel,
                "status": campaign.status, "stopped": campaign.stopped, "holds_channel": campaign.holds_channel,
                "run_no": campaign.run_no, "counts": {"total": campaign.message_count, **campaign.counts}}


def _preview(channel: str, template: dict, variables: dict[str, str]) -> str:
    """What a test message says, in short: the rendered SMS text, or the rendered email subject."""
    if channel == "sms":
        return render(template.get("body", ""), variables)
    return render_email(template.get("subject", ""), "", variables)[0]


def _refuse_unpublishable(changed: Iterable[Any]) -> None:
    """Rejected (invalid_command) if a campaign event a command would store could not be published: a record
    over the contract's 1 MiB limit would halt the relay, for every campaign, once stored. Checked on the
    campaign events, which carry what a client wrote (name, description, template); message records are
    bounded by the contacts chunk limit."""
    for aggregate in changed:
        if not isinstance(aggregate, Campaign):
            continue
        for stored in aggregate.pending_events:
            for record in wire.to_records(stored):
                size = len(record.encoded())
                if size > topics.MAX_RECORD_BYTES:
                    raise Rejected("invalid_command", f"its {record.value.get('type', 'event')} would be {size} "
                                                      f"bytes, more than the {topics.MAX_RECORD_BYTES} a record may be")
