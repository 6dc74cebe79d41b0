"""The read model's tables: their DDL, their columns, the schema version and the rebuild-from-start decision.

The read model is derived data: a database of another schema version is dropped and built again, and the
`fed_from_start` mark (false until a first batch is applied) tells the consumer to read the topics from the
beginning, whatever offsets its group committed for an earlier one.
"""
from __future__ import annotations

from services.projections.storage import Backend, Dialect, Session

SCHEMA_VERSION = "4"  # 3: message_events.occurred_at and row NOT NULL, history index ends in event_id; 4: stopped_at
TABLES = ("campaigns", "campaign_events", "messages", "message_events")
# Indexes added within a schema version: a read model made before one gets it when next opened (CREATE INDEX IF
# NOT EXISTS), not a rebuild from the topics. By reason: the console's failure-reason filter pages and counts.
ADDED_INDEXES = {
    "messages_by_campaign_reason": "CREATE INDEX IF NOT EXISTS messages_by_campaign_reason ON messages "
                                   "(campaign_id, reason, row)",
}


# Tables added within a schema version: a read model made before one gets it when next opened, not a rebuild from
# the topics (the projections read a topic new to their group from its beginning). Not in TABLES: `outreach replay`
# and the canonical dump are of the campaign tables.
# opt_outs: each destination's latest change on its channel's opt-out list (outreach.internal.opt-out-list), the
# one with the highest `sequence` (the list's version); opted_out 0 once removed. Newest first by changed_at.
ADDED_TABLES = {
    "opt_outs": lambda d: [
        f"""CREATE TABLE IF NOT EXISTS opt_outs (
            channel      {d.key_text} NOT NULL,
            destination  {d.key_text} NOT NULL,
            opted_out    {d.integer} NOT NULL,
            source       TEXT NOT NULL,
            issued_by    TEXT,
            reason       TEXT,
            changed_at   {d.key_text} NOT NULL,
            sequence     {d.integer} NOT NULL,
            event_id     {d.key_text} NOT NULL,
            PRIMARY KEY (channel, destination)
        )""",
        "CREATE INDEX IF NOT EXISTS opt_outs_newest ON opt_outs (channel, opted_out, changed_at, destination)",
    ],
}


def ddl(d: Dialect) -> list[str]:
    k, i = d.key_text, d.integer
    return [
        f"CREATE TABLE read_model_meta (key {k} PRIMARY KEY, value TEXT NOT NULL)",
        f"""CREATE TABLE campaigns (
            campaign_id     {k} PRIMARY KEY,
            name            TEXT,
            description     TEXT,
            channel         TEXT,
            status          TEXT NOT NULL DEFAULT 'created',
            previous_status TEXT,
            stopped         {i} NOT NULL DEFAULT 0,
            stopped_by      TEXT,
            stopped_at      {k},
            created_by      TEXT,
            created_at      {k},
            updated_at      {k},
            template        TEXT,
            summary         TEXT,
            reported_counts TEXT,
            message_count   {i},
            run_no          {i},
            last_sequence   {i} NOT NULL DEFAULT -1
        )""",  # template, summary (the latest RunSummary), reported_counts (of the latest status change): JSON
        f"""CREATE TABLE campaign_events (
            event_id     {k} PRIMARY KEY,
            campaign_id  {k} NOT NULL,
            sequence     {i} NOT NULL,
            type         TEXT NOT NULL,
            occurred_at  {k},
            causation_id {k},
            body         TEXT NOT NULL
        )""",  # body: the whole record as published (JSON)
        "CREATE INDEX campaign_events_by_campaign ON campaign_events (campaign_id, sequence)",
        "CREATE INDEX campaign_events_by_causation ON campaign_events (causation_id)",
        f"""CREATE TABLE messages (
            message_id      {k} PRIMARY KEY,
            campaign_id     {k} NOT NULL,
            row             {i},
            channel         TEXT,
            destination     TEXT,
            variables       TEXT,
            status          TEXT NOT NULL,
            previous_status TEXT,
            reason          TEXT,
            provider_code   TEXT,
            attempt         {i},
            run_no          {i},
            created_at      {k},
            updated_at      {k},
            last_sequence   {i} NOT NULL
        )""",  # variables: JSON; created_at: its `waiting` record's occurred_at, updated_at: its latest record's
        "CREATE INDEX messages_by_campaign_row ON messages (campaign_id, row)",
        "CREATE INDEX messages_by_campaign_status ON messages (campaign_id, status, row)",
        *ADDED_INDEXES.values(),
        f"""CREATE TABLE message_events (
            event_id        {k} PRIMARY KEY,
            message_id      {k} NOT NULL,
            campaign_id     {k} NOT NULL,
            row             {i} NOT NULL,
            channel         TEXT,
            run_no          {i},
            status          TEXT NOT NULL,
            previous_status TEXT,
            reason          TEXT,
            provider_code   TEXT,
            attempt         {i},
            occurred_at     {k} NOT NULL,
            causation_id    {k},
            sequence        {i} NOT NULL,
            extra           TEXT
        )""",  # extra: the record's other fields (JSON), e.g. destination and variables of a `waiting` record;
        # a record without occurred_at or row is stored with '' or 0 (and a null for it in extra, so it reads
        # back as published): the history's keyset pages then order and compare raw indexed columns.
        "CREATE INDEX message_events_by_message ON message_events (message_id, sequence)",
        "CREATE INDEX message_events_by_time ON message_events (campaign_id, occurred_at, row, sequence, event_id)",
        *(statement for statements in ADDED_TABLES.values() for statement in statements(d)),
    ]


# ------------------------------------------------------------------ columns

CAMPAIGN_COLUMNS = (
    "campaign_id", "name", "description", "channel", "status", "previous_status", "stopped", "stopped_by",
    "stopped_at", "created_by", "created_at", "updated_at", "template", "summary", "reported_counts",
    "message_count", "run_no", "last_sequence",
)
JSON_CAMPAIGN_COLUMNS = ("template", "summary", "reported_counts")
EVENT_COLUMNS = ("event_id", "campaign_id", "sequence", "type", "occurred_at", "causation_id", "body")
MESSAGE_COLUMNS = (
    "message_id", "campaign_id", "row", "channel", "destination", "variables", "status", "previous_status", "reason",
    "provider_code", "attempt", "run_no", "created_at", "updated_at", "last_sequence",
)
# The columns of a message that follow its record with the highest sequence (the others: its contact, its row).
MESSAGE_STATE_COLUMNS = (
    "status", "previous_status", "reason", "provider_code", "attempt", "run_no", "updated_at", "last_sequence",
)
STATUS_COLUMNS = (
    "event_id", "message_id", "campaign_id", "row", "channel", "run_no", "status", "previous_status", "reason",
    "provider_code", "attempt", "occurred_at", "causation_id", "sequence", "extra",
)
STATUS_RECORD_FIELDS = frozenset(STATUS_COLUMNS) - {"extra"} | {"type"}
OPT_OUT_COLUMNS = ("channel", "destination", "opted_out", "source", "issued_by", "reason", "changed_at", "sequence",
                   "event_id")
JSON_COLUMNS = {"campaigns": JSON_CAMPAIGN_COLUMNS, "campaign_events": ("body",), "messages": ("variables",),
                "message_events": ("extra",)}
TABLE_COLUMNS = {"campaigns": CAMPAIGN_COLUMNS, "campaign_events": EVENT_COLUMNS, "messages": MESSAGE_COLUMNS,
                 "message_events": STATUS_COLUMNS}
TABLE_KEYS = {"campaigns": "campaign_id", "campaign_events": "event_id", "messages": "message_id",
              "message_events": "event_id"}


# ------------------------------------------------------------------ version and the rebuild-from-start mark

def ensure_schema(backend: Backend) -> None:
    """Create the tables; a read model of another schema version is dropped and built again (it is derived
    data: the projections then consume the topics from the beginning)."""
    with backend.session() as s:  # the usual case, without waiting for the write lock
        if _schema_version(backend, s) == SCHEMA_VERSION:
            if all(backend.index_exists(s, name) for name in ADDED_INDEXES) \
                    and all(backend.table_exists(s, name) for name in ADDED_TABLES):
                return
    with backend.transaction() as s:
        if _schema_version(backend, s) == SCHEMA_VERSION:
            for name in ADDED_INDEXES:  # another process may have made some meanwhile
                s.run(ADDED_INDEXES[name])
            for statements in ADDED_TABLES.values():
                for statement in statements(backend.dialect):
                    s.run(statement)
            return
        for table in ("read_model_meta", *TABLES, *ADDED_TABLES):
            s.run(f"DROP TABLE IF EXISTS {table}")
        for statement in ddl(backend.dialect):
            s.run(statement)
        s.many("INSERT INTO read_model_meta (key, value) VALUES (?, ?)",
               [("schema_version", SCHEMA_VERSION), ("fed_from_start", "0")])


def _schema_version(backend: Backend, s: Session) -> str | None:
    if not backend.table_exists(s, "read_model_meta"):
        return None
    row = s.one("SELECT value FROM read_model_meta WHERE key = 'schema_version'")
    return row["value"] if row else None


def fed_from_start(s: Session) -> bool:
    """True once a first batch has been applied to this (version of the) read model."""
    row = s.one("SELECT value FROM read_model_meta WHERE key = 'fed_from_start'")
    return bool(row) and row["value"] == "1"


def mark_fed_from_start(s: Session) -> None:
    """Record, in the transaction of a batch, that the read model has been fed from the start."""
    s.run("UPDATE read_model_meta SET value = '1' WHERE key = 'fed_from_start'")
