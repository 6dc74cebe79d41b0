"""The simulator kernel (services/common/simulation.py): every outcome of the contract's table, table-driven."""
from __future__ import annotations

import pytest

from services.common.simulation import (
    MAX_DEFERRALS,
    Receipt,
    Submission,
    email_call_submission,
    email_counts_attempts,
    email_events,
    sms_counts_attempts,
    sms_receipts,
    sms_submission,
    smtp_reply,
)

LATE = 42.0


def kinds(subs: list[Submission]) -> list[tuple[str, int, str | None]]:
    return [(s.kind, s.http_status, s.provider_code) for s in subs]


def events(receipts: list[Receipt]) -> list[tuple[str, str | None]]:
    return [(r.event, r.provider_code) for r in receipts]


ACC = ("accepted", 201, None)
E503 = ("presend_error", 503, "503")
NONE = ("no_answer", 0, None)

# ------------------------------------------------------------------ SMS submissions (attempts 1..4)

SMS_SUBMISSIONS = [
    ("+15005550001", [("refused", 400, "21211")] * 4),
    ("+15005550002", [("refused", 400, "21612")] * 4),
    ("+15005550003", [("refused", 400, "21408")] * 4),
    ("+15005550004", [("refused", 400, "21610")] * 4),
    ("+15005550009", [("refused", 400, "21614")] * 4),
    ("+15005550005", [ACC] * 4),  # not one of Twilio's test numbers: an ordinary number
    ("+12125550100", [ACC] * 4),
    ("+12125550101", [ACC] * 4),
    ("+12125550102", [ACC] * 4),
    ("+12125550103", [ACC] * 4),
    ("+12125550104", [E503, E503, ACC, ACC]),
    ("+19995550104", [E503, E503, ACC, ACC]),  # any area code
    ("+12125550105", [E503] * 4),
    ("+12125550106", [NONE] * 4),
    ("+12125550107", [ACC] * 4),
    ("+12125550108", [ACC] * 4),
    ("+12125550109", [ACC] * 4),
    ("+11125550105", [ACC] * 4),  # area code starting 1: not NXX, so not the fictional range
    ("+121255501055", [ACC] * 4),  # one digit too many
    ("+447700900123", [ACC] * 4),
]


@pytest.mark.parametrize(("destination", "expected"), SMS_SUBMISSIONS)
def test_sms_submission(destination, expected):
    assert kinds([sms_submission(destination, attempt) for attempt in (1, 2, 3, 4)]) == expected


def test_sms_refusal_has_twilio_message():
    assert "not a valid phone number" in sms_submission("+15005550001", 1).message


# ------------------------------------------------------------------ SMS receipts

SMS_RECEIPTS = [
    ("+12125550100", [("sent", None), ("delivered", None)]),
    ("+12125550101", [("sent", None)]),
    ("+12125550102", [("sent", None), ("undelivered", "30003")]),
    ("+12125550103", [("sent", None), ("failed", "30007")]),
    ("+12125550104", [("sent", None), ("delivered", None)]),
    ("+12125550105", []),
    ("+12125550106", []),
    ("+12125550107", [("sent", None), ("delivered", None)]),
    ("+12125550108", [("sent", None), ("delivered", None)]),
    ("+447700900123", [("sent", None), ("delivered", None)]),
    ("+15005550001", []),
    ("+15005550004", []),
]


@pytest.mark.parametrize(("destination", "expected"), SMS_RECEIPTS)
def test_sms_receipts(destination, expected):
    receipts = sms_receipts(destination, LATE)
    assert events(receipts) == expected
    assert [r.after_s for r in receipts] == sorted(r.after_s for r in receipts)
    if receipts:
        assert 0 < receipts[0].after_s <= 1.0  # `sent` within a second
    if len(receipts) == 2 and not destination.endswith("7"):
        assert 0 < receipts[1].after_s - receipts[0].after_s <= 1.0  # the receipt within a second


def test_sms_late_receipt_follows_sent_by_late_receipt_s():
    sent, delivered = sms_receipts("+13105550107", LATE)
    assert delivered.after_s - sent.after_s == pytest.approx(LATE)
    sent, delivered = sms_receipts("+13105550107", 0.1)
    assert delivered.after_s - sent.after_s == pytest.approx(0.1)


def test_sms_counts_attempts_only_where_the_answer_depends_on_it():
    assert sms_counts_attempts("+12125550104")
    assert not any(sms_counts_attempts(d) for d in ("+12125550100", "+12125550105", "+15005550001", "+4477009"))


# ------------------------------------------------------------------ email submissions (whole call)

EA = ("accepted", 202, None)

EMAIL_SUBMISSIONS = [
    (["a@example.com"], [EA] * 4),
    (["success@simulator.amazonses.com", "bounce@simulator.amazonses.com"], [EA] * 4),
    (["a+fail503x2@example.com"], [E503, E503, EA, EA]),
    (["A+FAIL503X2@example.com"], [E503, E503, EA, EA]),
    (["a+fail503@example.com"], [E503] * 4),
    (["a+noanswer@example.com"], [NONE] * 4),
    (["ok@example.com", "a+fail503@example.com", "ok2@example.com"], [E503] * 4),  # the whole call
    (["ok@example.com", "a+fail503x2@example.com"], [E503, E503, EA, EA]),
    (["ok@example.com", "a+noanswer@example.com"], [NONE] * 4),
    (["a+noanswer@example.com", "b+fail503x2@example.com"], [E503, E503, NONE, NONE]),  # 503 wins
    (["a+noanswer@example.com", "b+fail503@example.com"], [E503] * 4),
    (["a+fail503@example.com", "b+fail503x2@example.com"], [E503] * 4),
    (["fail503@example.com", "noanswer@example.com", "x+fail503x@example.com"], [EA] * 4),  # suffixes only
    ([], [EA] * 4),
]


@pytest.mark.parametrize(("destinations", "expected"), EMAIL_SUBMISSIONS)
def test_email_call_submission(destinations, expected):
    assert kinds([email_call_submission(destinations, attempt) for attempt in (1, 2, 3, 4)]) == expected


def test_email_counts_attempts():
    assert email_counts_attempts("a+fail503x2@example.com")
    assert email_counts_attempts("a+defer@example.com")  # its SMTP reply depends on the attempt
    assert not any(email_counts_attempts(d) for d in (
        "a@example.com", "a+fail503@example.com", "a+noanswer@example.com", "a+deferforever@example.com"))


# ------------------------------------------------------------------ email events

P = ("processed", None)
D = ("delivered", None)
DEF = ("deferred", None)

EMAIL_EVENTS = [
    ("success@simulator.amazonses.com", [P, D]),
    ("success+x@simulator.amazonses.com", [P, D]),
    ("SUCCESS+Label.2@simulator.amazonses.com", [P, D]),
    ("ooto@simulator.amazonses.com", [P, D]),
    ("bounce@simulator.amazonses.com", [P, ("bounce", "550")]),
    ("bounce+campaign7@simulator.amazonses.com", [P, ("bounce", "550")]),
    ("suppressionlist@simulator.amazonses.com", [P, ("bounce", "550")]),
    ("complaint@simulator.amazonses.com", [P, D, ("spamreport", None)]),
    ("complaint+y@simulator.amazonses.com", [P, D, ("spamreport", None)]),
    ("bounce@example.com", [P, D]),  # only the simulator's domain has mailboxes
    ("someone@example.com", [P, D]),
    ("someone+defer@example.com", [P, DEF, DEF, D]),
    ("bounce+defer@simulator.amazonses.com", [P, DEF, DEF, D]),  # suffix first
    ("a+fail503x2@example.com", [P, D]),  # once accepted, delivered
    ("a+deferx@example.com", [P, D]),
]


@pytest.mark.parametrize(("destination", "expected"), EMAIL_EVENTS)
def test_email_events(destination, expected):
    receipts = email_events(destination, 1.0, 3600.0)
    assert events(receipts) == expected
    assert [r.after_s for r in receipts] == sorted(r.after_s for r in receipts)
    assert all(0 < r.after_s for r in receipts)


def test_bounce_has_reason_with_code():
    bounce = email_events("bounce@simulator.amazonses.com", 1, 10)[-1]
    assert bounce.reason.startswith("550")


def test_defer_spacing():
    _, d1, d2, delivered = email_events("x+defer@example.com", 2.5, 3600)
    assert d2.after_s - d1.after_s == pytest.approx(2.5)
    assert delivered.after_s - d2.after_s == pytest.approx(2.5)


@pytest.mark.parametrize(("interval", "window", "count"), [
    (1.0, 10.0, 10),  # deferrals at 0, 1, ..., 9 s after the first: the window ends at 10
    (0.1, 1.0, 10),
    (0.3, 1.0, 4),  # 0, 0.3, 0.6, 0.9
    (5.0, 1.0, 1),  # interval longer than the window: just the first deferral
    (1.0, 259200.0, MAX_DEFERRALS),  # capped; stretched so the last is near the window's end
])
def test_deferforever(interval, window, count):
    receipts = email_events("x+deferforever@example.com", interval, window)
    assert receipts[0].event == "processed"
    deferrals = receipts[1:]
    assert [r.event for r in deferrals] == ["deferred"] * count  # no final event
    first = deferrals[0].after_s
    assert deferrals[-1].after_s - first < window
    if count == MAX_DEFERRALS:
        assert deferrals[-1].after_s - first > window * 0.99
    else:
        gaps = {round(b.after_s - a.after_s, 9) for a, b in zip(deferrals, deferrals[1:])}
        assert gaps <= {round(interval, 9)}


# ------------------------------------------------------------------ SMTP view

SMTP = [
    ("a@example.com", [250, 250, 250]),
    ("success@simulator.amazonses.com", [250, 250, 250]),
    ("complaint@simulator.amazonses.com", [250, 250, 250]),
    ("bounce@simulator.amazonses.com", [550, 550, 550]),
    ("suppressionlist+z@simulator.amazonses.com", [550, 550, 550]),
    ("a+defer@example.com", [451, 451, 250]),
    ("a+deferforever@example.com", [451, 451, 451]),
]


@pytest.mark.parametrize(("destination", "codes"), SMTP)
def test_smtp_reply(destination, codes):
    replies = [smtp_reply(destination, attempt) for attempt in (1, 2, 3)]
    assert [code for code, _ in replies] == codes
    assert all(text for _, text in replies)


def test_values_are_frozen():
    with pytest.raises(AttributeError):
        sms_submission("+12125550100", 1).kind = "refused"  # type: ignore[misc]
