"""Topic names: the public ones are fixed by the wire contract, the internal ones are ours (docs/design.md)."""

COMMANDS = "outreach.commands"
CAMPAIGN_EVENTS = "outreach.campaign-events"
MESSAGE_STATUS = "outreach.message-status"
COMMANDS_DLQ = "outreach.commands.dlq"

CLAIM_REQUESTS = "outreach.internal.claim-requests"
SENDER_WORK = "outreach.internal.sender-work"
SENDER_RESULTS = "outreach.internal.sender-results"
EXPIRIES = "outreach.internal.expiries"
OPT_OUTS = "outreach.internal.opt-outs"
# The command handler's opt-out lists as they change (relay -> projections): what the read model's opt_outs shows.
OPT_OUT_LIST = "outreach.internal.opt-out-list"
CHANNEL_SETTINGS = "outreach.internal.channel-settings"
# Every service instance's heartbeat (`outreach status` finds the instances of every host by it).
HEARTBEATS = "outreach.internal.heartbeats"

PUBLIC_TOPICS = (COMMANDS, CAMPAIGN_EVENTS, MESSAGE_STATUS, COMMANDS_DLQ)
INTERNAL_TOPICS = (CLAIM_REQUESTS, SENDER_WORK, SENDER_RESULTS, EXPIRIES, OPT_OUTS, CHANNEL_SETTINGS, HEARTBEATS,
                   OPT_OUT_LIST)
ALL_TOPICS = PUBLIC_TOPICS + INTERNAL_TOPICS
# Topics that carry a single stream of operator records: one partition keeps them in arrival order.
SINGLE_PARTITION_TOPICS = (COMMANDS_DLQ, HEARTBEATS)
# Heartbeats only matter for a while: kept an hour (where the broker deletes old records), not for ever.
HEARTBEAT_RETENTION_MS = 3_600_000

MAX_RECORD_BYTES = 1024 * 1024
