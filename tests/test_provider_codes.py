import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.events import FAILURE_REASONS, MESSAGE_STATUSES
from services.command_handler.domain import provider_codes
from services.command_handler.domain.provider_codes import (
    OUTCOMES,
    SENDGRID_DROP_REASONS,
    SENDGRID_TYPES,
    SMTP_CODES,
    TWILIO_CODES,
    UnknownOutcome,
    classify,
)

# ---------------------------------------------------------------------------------------------
# SMS / Twilio
# ---------------------------------------------------------------------------------------------
CONTRACT_TWILIO = [
    ("21211", ("failed", "invalid_destination")),
    ("21614", ("failed", "invalid_destination")),
    ("21612", ("failed", "undeliverable")),
    ("30003", ("failed", "undeliverable")),
    ("30005", ("failed", "undeliverable")),
    ("21408", ("failed", "blocked")),
    ("30007", ("failed", "carrier_rejected")),
    ("21610", ("opted_out", None)),
    ("20003", ("failed", "setup_error")),
]


@pytest.mark.parametrize("outcome", ["refused", "undelivered", "failed"])
@pytest.mark.parametrize("code, expected", CONTRACT_TWILIO)
def test_contract_twilio_codes(outcome, code, expected):
    assert classify(outcome, code, "sms") == expected


@pytest.mark.parametrize(
    "outcome, code, expected",
    [
        ("refused", "30004", ("failed", "blocked")),
        ("undelivered", "30008", ("failed", "unknown")),
        ("undelivered", "30006", ("failed", "undeliverable")),  # other 30xxx
        ("failed", "30034", ("failed", "undeliverable")),
        ("refused", "21606", ("failed", "unknown")),  # unknown code
        ("refused", "99999", ("failed", "unknown")),
        ("refused", "3000", ("failed", "unknown")),  # not five digits
        ("refused", "300031", ("failed", "unknown")),
        ("refused", 21211, ("failed", "invalid_destination")),  # int code tolerated
        ("refused", " 21211 ", ("failed", "invalid_destination")),
        ("refused", None, ("failed", "unknown")),
        ("refused", "", ("failed", "unknown")),
        ("undelivered", None, ("failed", "undeliverable")),
        ("failed", None, ("failed", "unknown")),
        ("accepted", None, ("sending", None)),
        ("presend_error", "503", ("sending", None)),
        ("no_answer", None, ("sending", None)),
        ("sent", None, ("sent", None)),
        ("delivered", None, ("delivered", None)),
        ("opted_out", None, ("opted_out", None)),
    ],
)
def test_sms(outcome, code, expected):
    assert classify(outcome, code, "sms") == expected


# ---------------------------------------------------------------------------------------------
# Email / SMTP / SendGrid
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "outcome, code, expected",
    [
        # SMTP
        ("refused", "550", ("failed", "bounced")),
        ("refused", "550 5.1.1 User unknown", ("failed", "bounced")),
        ("refused", "554", ("failed", "bounced")),
        ("refused", "5.7.1", ("failed", "bounced")),
        ("refused", "451", ("retrying", None)),
        ("refused", "421 try later", ("retrying", None)),
        ("failed", "452", ("retrying", None)),
        ("refused", "4.2.2", ("retrying", None)),
        ("bounced", "550", ("failed", "bounced")),
        ("refused", "535", ("failed", "setup_error")),
        ("refused", "535 5.7.8 Authentication failed", ("failed", "setup_error")),
        ("refused", "530", ("failed", "setup_error")),
        ("refused", "534", ("failed", "setup_error")),
        # SendGrid HTTP answers to bad credentials
        ("refused", "401", ("failed", "setup_error")),
        ("refused", "403", ("failed", "setup_error")),
        # not SMTP codes
        ("refused", "250", ("failed", "unknown")),
        ("refused", "5500", ("failed", "unknown")),
        ("refused", "5.1", ("failed", "unknown")),
        # SendGrid event types
        ("bounced", "bounce", ("failed", "bounced")),
        ("bounced", "Bounce", ("failed", "bounced")),
        ("bounced", "blocked", ("failed", "blocked")),
        ("failed", "dropped", ("failed", "unknown")),
        ("failed", "dropped: Unsubscribed Address", ("opted_out", None)),
        ("failed", "dropped:Spam Reporting Address", ("opted_out", None)),
        ("failed", "dropped Bounced Address", ("failed", "bounced")),
        ("failed", "dropped: Invalid", ("failed", "invalid_destination")),
        ("failed", "dropped: Spam Content (if spam checker app enabled)", ("failed", "blocked")),
        ("failed", "dropped: Invalid SMTPAPI header", ("failed", "unknown")),
        ("failed", "dropped: Spam Content", ("failed", "blocked")),
        ("failed", "dropped: Recipient List over Package Quota", ("failed", "unknown")),
        ("failed", "something else", ("failed", "unknown")),
        # defaults without a code
        ("bounced", None, ("failed", "bounced")),
        ("refused", None, ("failed", "unknown")),
        ("failed", None, ("failed", "unknown")),
        ("undelivered", None, ("failed", "undeliverable")),
        # fixed outcomes
        ("accepted", "250", ("sending", None)),
        ("presend_error", "503", ("sending", None)),
        ("no_answer", None, ("sending", None)),
        ("deferred", "451", ("retrying", None)),
        ("deferred", None, ("retrying", None)),
        ("delivered", None, ("delivered", None)),
        ("opted_out", "unsubscribe", ("opted_out", None)),
        ("opted_out", "spamreport", ("opted_out", None)),
    ],
)
def test_email(outcome, code, expected):
    assert classify(outcome, code, "email") == expected


@pytest.mark.parametrize("channel", ["sms", "email"])
def test_presend_final_is_provider_error(channel):
    assert classify("presend_error", "503", channel, final=True) == ("failed", "provider_error")
    assert classify("presend_error", None, channel, final=False) == ("sending", None)


@pytest.mark.parametrize(
    "outcome, channel",
    [("sent", "email"), ("deferred", "sms"), ("bounced", "sms"), ("exploded", "sms"), ("", "email"),
     ("Delivered", "sms")],
)
def test_outcome_not_for_channel(outcome, channel):
    with pytest.raises(UnknownOutcome):
        classify(outcome, None, channel)


def test_unknown_channel():
    with pytest.raises(ValueError):
        classify("delivered", None, "fax")


@given(st.sampled_from(sorted(OUTCOMES)), st.one_of(st.none(), st.text(max_size=40), st.integers()),
       st.sampled_from(["sms", "email"]), st.booleans())
def test_always_a_contract_status_and_reason(outcome, code, channel, final):
    try:
        status, reason = classify(outcome, code, channel, final=final)
    except UnknownOutcome:
        assert (outcome, channel) in {("sent", "email"), ("deferred", "sms"), ("bounced", "sms")}
        return
    assert status in MESSAGE_STATUSES
    assert status not in {"waiting", "queued", "cancelled", "assumed_delivered"}  # never from a provider
    if status == "failed":
        assert reason in FAILURE_REASONS
        assert reason not in {"timed_out", "expired"}  # those come from timers
    else:
        assert reason is None


# ---------------------------------------------------------------------------------------------
# The docstring table is the code's table.
# ---------------------------------------------------------------------------------------------
def _doc_rows(section: str) -> list[list[str]]:
    doc = provider_codes.__doc__
    body = doc.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in body.splitlines():
        if line.startswith("|") and not line.startswith("|---") and not line.startswith("| code"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _as_pair(status: str, reason: str):
    return status, (reason or None)


def test_docstring_twilio_table_matches_code():
    documented = {}
    for code, status, reason, _ in _doc_rows("SMS: Twilio error codes"):
        if re.fullmatch(r"\d{5}", code):
            documented[code] = _as_pair(status, reason)
        elif code == "other 30xxx":
            assert _as_pair(status, reason) == provider_codes.TWILIO_30XXX_DEFAULT
        else:
            assert code == "anything else" and _as_pair(status, reason) == ("failed", "unknown")
    assert documented == TWILIO_CODES
    for code, expected in CONTRACT_TWILIO:
        assert documented[code] == expected


def test_docstring_smtp_table_matches_code():
    documented = {}
    for codes, status, reason, _ in _doc_rows("Email: SMTP reply codes"):
        if codes == "other 4xx":
            assert _as_pair(status, reason) == provider_codes.SMTP_CLASS["4"]
        elif codes == "other 5xx":
            assert _as_pair(status, reason) == provider_codes.SMTP_CLASS["5"]
        else:
            for code in codes.split(", "):
                documented[code] = _as_pair(status, reason)
    assert documented == SMTP_CODES


def test_docstring_sendgrid_table_matches_code():
    types, drops = {}, {}
    for code, status, reason, _ in _doc_rows("Email: SendGrid event types"):
        pair = _as_pair(status, reason)
        names = re.findall(r"`([^`]+)`", code)
        if code.startswith("`dropped` + anything else"):
            assert pair == ("failed", "unknown")
        elif code.startswith("`dropped` +"):
            for name in names[1:]:
                drops[name.lower()] = pair
        else:
            types[names[0]] = pair
    assert types == SENDGRID_TYPES
    assert drops == SENDGRID_DROP_REASONS
