import re

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import destinations as contacts
from schemas.destinations import validate_destination
from services.command_handler.domain.contacts import screen_chunk

E164 = r"\+[1-9][0-9]{1,14}"


def library_verdict(cell: str) -> str | None:
    """The contract's definition, straight from email-validator."""
    try:
        return validate_email(cell, check_deliverability=False).normalized
    except EmailNotValidError:
        return None


# ---------------------------------------------------------------------------------------------
# validate_destination: SMS
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cell, expected",
    [
        ("+15005550006", ("+15005550006", None)),
        ("+12", ("+12", None)),
        ("+123456789012345", ("+123456789012345", None)),  # 15 digits
        ("+1234567890123456", (None, "invalid_e164")),  # 16 digits
        ("+1", (None, "invalid_e164")),
        ("+0123456", (None, "invalid_e164")),
        ("15005550006", (None, "invalid_e164")),
        ("+1 500 555 0006", (None, "invalid_e164")),
        ("+1-500-555-0006", (None, "invalid_e164")),
        (" +15005550006", (None, "invalid_e164")),  # no stripping
        ("+15005550006 ", (None, "invalid_e164")),
        ("+15005550006\n", (None, "invalid_e164")),
        ("+1500555000٦", (None, "invalid_e164")),  # Arabic-Indic digit: ASCII only
        ("+１５００５５５", (None, "invalid_e164")),  # full-width digits
        ("++15005550006", (None, "invalid_e164")),
        ("a@b.com", (None, "invalid_e164")),
        ("", (None, "missing_destination")),
        ("   ", (None, "missing_destination")),
        ("\t\n", (None, "missing_destination")),
        (None, (None, "missing_destination")),
        (15005550006, (None, "invalid_e164")),  # not a string
    ],
)
def test_validate_sms(cell, expected):
    assert validate_destination("sms", cell) == expected


@given(st.from_regex(E164, fullmatch=True))
def test_every_e164_string_is_accepted(cell):
    assert validate_destination("sms", cell) == (cell, None)


@given(st.text(max_size=20))
def test_sms_matches_contract_regex(cell):
    normalized, reason = validate_destination("sms", cell)
    if re.fullmatch(E164, cell, re.ASCII):
        assert (normalized, reason) == (cell, None)
    else:
        assert normalized is None
        assert reason == ("missing_destination" if not cell.strip() else "invalid_e164")


# ---------------------------------------------------------------------------------------------
# validate_destination: email
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cell, expected",
    [
        ("ann@example.com", ("ann@example.com", None)),
        ("Ann@Example.COM", ("Ann@example.com", None)),  # domain lowercased, local case kept
        ("success+x@simulator.amazonses.com", ("success+x@simulator.amazonses.com", None)),
        ("a.b-c_d+e@sub.domain.co.uk", ("a.b-c_d+e@sub.domain.co.uk", None)),
        ("Postmaster@Example.com", ("postmaster@example.com", None)),  # RFC 2142 role name
        ("Ü@bücher.de", ("Ü@bücher.de", None)),
        ("x@xn--bcher-kva.de", ("x@bücher.de", None)),  # IDNA decoded
        ("ann@example", (None, "invalid_email")),  # no dot
        ("ann@localhost", (None, "invalid_email")),
        ("ann@b.test", (None, "invalid_email")),  # special-use
        ("ann@b.invalid", (None, "invalid_email")),
        ("ann@@example.com", (None, "invalid_email")),
        ("ann.@example.com", (None, "invalid_email")),
        (".ann@example.com", (None, "invalid_email")),
        ("a..nn@example.com", (None, "invalid_email")),
        ("ann@-example.com", (None, "invalid_email")),
        ("ann@example..com", (None, "invalid_email")),
        ("ann@example.c0m1", (None, "invalid_email")),  # TLD must end with a letter
        ("ann example.com", (None, "invalid_email")),
        ("annexample.com", (None, "invalid_email")),
        ("@example.com", (None, "invalid_email")),
        ("ann@", (None, "invalid_email")),
        (" ann@example.com", (None, "invalid_email")),  # no stripping
        ("ann@example.com ", (None, "invalid_email")),
        ('"ann"@example.com', (None, "invalid_email")),  # quoted local part not allowed
        ("Ann <ann@example.com>", (None, "invalid_email")),  # display name not allowed
        ("ann@[127.0.0.1]", (None, "invalid_email")),  # domain literal not allowed
        ("a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 58 + ".com", (None, "invalid_email")),  # 255 chars
        ("", (None, "missing_destination")),
        (" ", (None, "missing_destination")),
        (None, (None, "missing_destination")),
        (12, (None, "invalid_email")),
    ],
)
def test_validate_email(cell, expected):
    assert validate_destination("email", cell) == expected


def test_unknown_channel():
    with pytest.raises(ValueError):
        validate_destination("fax", "+15005550006")


# The fast path must agree with email-validator exactly; build inputs around its edges.
_label = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?", fullmatch=True)
_tricky_label = st.sampled_from(["xn--bcher-kva", "xn--zz", "ab--cd", "-a", "a-", "", "test", "invalid",
                                 "local", "arpa", "onion", "localhost", "com", "COM", "1", "a" * 63,
                                 "a" * 64, "bücher", "例え"])
_domain = st.lists(st.one_of(_label, _tricky_label), min_size=1, max_size=5).map(".".join)
_local = st.one_of(
    st.from_regex(r"[a-zA-Z0-9_!#$%&'*+/=?^`{|}~.-]{1,20}", fullmatch=True),
    st.sampled_from(["info", "Info", "POSTMASTER", "a" * 64, "a" * 65, "a" * 200, '"a b"', "ü", "a\u0301",
                     "<a", "a b", ""]),
    st.text(max_size=6),
)
_address = st.one_of(
    st.builds(lambda l, d: f"{l}@{d}", _local, _domain),
    st.builds(lambda l, d, s: f"{l}@{d}{s}", _local, _domain, st.sampled_from(["@x.com", "<", ">", " ", "."])),
    st.text(max_size=30),
)


@settings(max_examples=800)
@given(_address)
def test_email_agrees_with_email_validator(cell):
    normalized, reason = validate_destination("email", cell)
    if not cell.strip():
        assert (normalized, reason) == (None, "missing_destination")
        return
    expected = library_verdict(cell)
    assert normalized == expected
    assert reason == (None if expected is not None else "invalid_email")


@pytest.mark.parametrize("extra", [0, 1])
def test_email_length_limit_on_fast_path(extra):
    domain = ".".join(["a" * 60, "b" * 60, "c" * 60, "d" * 40]) + ".com"  # 227 chars
    local = "x" * (254 - 1 - len(domain) + extra)
    cell = f"{local}@{domain}"
    assert len(cell) == 254 + extra
    assert validate_destination("email", cell)[0] == library_verdict(cell)
    assert (validate_destination("email", cell)[1] is None) == (extra == 0)


def test_email_length_limit_counts_unicode_domain():
    # xn-- domain: the normalized (Unicode) form is longer in UTF-8 than the ASCII one.
    label = "xn--bcher-kva"
    domain = ".".join([label] * 17) + ".de"
    for n in range(1, 60):
        cell = "x" * n + "@" + domain
        assert validate_destination("email", cell)[0] == library_verdict(cell), n


# ---------------------------------------------------------------------------------------------
# screen_chunk
# ---------------------------------------------------------------------------------------------
def test_screen_chunk_sms():
    known = frozenset({"+15005550006"})
    chunk = [
        (2, "+15005550006", {"name": "known"}),
        (3, "+15005550010", {"name": "a"}),
        (4, "+15005550010", {"name": "dup in chunk"}),
        (5, "", {}),
        (6, "15005550011", {}),
        (7, "+15005550011", {"name": "b"}),
        (8, None, {}),
    ]
    valid, invalid = screen_chunk("sms", chunk, set(known))
    assert valid == [(3, "+15005550010", {"name": "a"}), (7, "+15005550011", {"name": "b"})]
    assert invalid == [
        (2, "duplicate_destination"),
        (4, "duplicate_destination"),
        (5, "missing_destination"),
        (6, "invalid_e164"),
        (8, "missing_destination"),
    ]


def test_screen_chunk_email_compares_normalized():
    chunk = [
        (2, "ann@Example.com", {}),
        (3, "ann@example.COM", {}),
        (4, "Ann@example.com", {}),  # local part case is kept: another destination
        (5, "bob@x.org", {}),
        (6, "not-an-email", {}),
    ]
    valid, invalid = screen_chunk("email", chunk, {"bob@x.org"})
    assert valid == [(2, "ann@example.com", {}), (4, "Ann@example.com", {})]
    assert invalid == [(3, "duplicate_destination"), (5, "duplicate_destination"), (6, "invalid_email")]


def test_screen_chunk_does_not_mutate_known():
    known = {"+15005550006"}
    screen_chunk("sms", [(2, "+15005550010", {}), (3, "+15005550006", {})], known)
    assert known == {"+15005550006"}


def test_screen_chunk_invalid_row_does_not_shadow_a_later_valid_one():
    valid, invalid = screen_chunk("email", [(2, " a@b.com", {}), (3, "a@b.com", {})], set())
    assert valid == [(3, "a@b.com", {})]
    assert invalid == [(2, "invalid_email")]


@given(st.lists(st.tuples(st.sampled_from(["+15005550006", "+15005550010", "+1", "", "+4477009000"]),
                          st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2)),
                max_size=30),
       st.sets(st.sampled_from(["+15005550006", "+4477009000"])))
def test_screen_chunk_properties(cells, known):
    chunk = [(row, cell, variables) for row, (cell, variables) in enumerate(cells, start=2)]
    before = set(known)
    valid, invalid = screen_chunk("sms", chunk, known)
    assert known == before
    # Every row is accounted for exactly once, in input order within each list.
    assert sorted([r for r, _, _ in valid] + [r for r, _ in invalid]) == [r for r, _, _ in chunk]
    assert [r for r, _, _ in valid] == sorted(r for r, _, _ in valid)
    destinations = [d for _, d, _ in valid]
    assert len(destinations) == len(set(destinations))
    assert not set(destinations) & known
    # The first valid occurrence of a new destination is the one kept.
    first_rows = {}
    for row, cell, _ in chunk:
        if validate_destination("sms", cell)[0] is not None and cell not in known:
            first_rows.setdefault(cell, row)
    assert {d: r for r, d, _ in valid} == first_rows


# ---------------------------------------------------------------------------------------------
# full chunks (their timings are in bench/contacts_timings.py: a busy shared machine breaks a time bound)
# ---------------------------------------------------------------------------------------------
def test_full_sms_chunk_against_many_known_destinations():
    chunk = [(r, f"+1415555{r:04d}", {"name": "x"}) for r in range(2, 1002)]
    valid, _ = screen_chunk("sms", chunk, frozenset(f"+1415556{r:04d}" for r in range(300_000 // 100)))
    assert len(valid) == 1000


def test_full_email_chunk_over_realistic_domains():
    contacts._domain_verdict.cache_clear()
    domains = ["gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "icloud.com"] + [
        f"company{i}.example.com" for i in range(45)]
    chunk = [(r, f"first.last{r}@{domains[r % len(domains)]}", {}) for r in range(2, 1002)]
    valid, _ = screen_chunk("email", chunk, frozenset())
    assert len(valid) == 1000
