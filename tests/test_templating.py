import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.templating import (
    GSM7_BASIC,
    GSM7_EXTENSION,
    missing_variables,
    placeholders,
    render,
    render_email,
    sms_encoding,
    sms_segments,
    sms_septets,
)

GSM_BASIC_SORTED = "".join(sorted(GSM7_BASIC))
GSM_EXT_SORTED = "".join(sorted(GSM7_EXTENSION))


# ---------------------------------------------------------------------------------------------
# placeholders / render / missing_variables
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, names",
    [
        ("", []),
        ("no placeholders", []),
        ("Hi {{name}}", ["name"]),
        ("Hi {{ name }}", ["name"]),
        ("Hi {{\tname\t}}", ["name"]),
        ("{{a}}{{b}} {{a}}", ["a", "b"]),
        ("{{First Name}}", ["First Name"]),
        ("{{ first-name.x }}", ["first-name.x"]),
        ("{{}} {{ }}", []),
        ("{name} {{name} {name}}", []),
        ("{{{name}}}", ["name"]),
        ("{{na\nme}}", []),
        ("{{ é }}", ["é"]),
        ("{{a}} and {{b}} and {{ c }}", ["a", "b", "c"]),
    ],
)
def test_placeholders(text, names):
    assert placeholders(text) == names


@pytest.mark.parametrize(
    "text, variables, expected",
    [
        ("Hi {{name}}!", {"name": "Ann"}, "Hi Ann!"),
        ("Hi {{ name }}!", {"name": "Ann"}, "Hi Ann!"),
        ("Hi {{name}}!", {}, "Hi {{name}}!"),
        ("Hi {{ name }}!", {}, "Hi {{ name }}!"),
        ("Hi {{ name }}!", {"name": ""}, "Hi {{ name }}!"),
        ("Hi {{name}}!", {"name": None}, "Hi {{name}}!"),
        ("Hi {{name}}!", None, "Hi {{name}}!"),
        ("Hi {{Name}}!", {"name": "Ann"}, "Hi {{Name}}!"),  # case-sensitive
        ("{{a}}{{a}}", {"a": "x"}, "xx"),
        ("{{a}} {{b}}", {"a": "{{b}}", "b": "B"}, "{{b}} B"),  # one pass, no re-expansion
        ("{{a}}", {"a": "\\1 \\g<0>"}, "\\1 \\g<0>"),  # no regex-replacement escapes
        ("{{a}}", {"a": " "}, " "),  # whitespace is a value
        ("{{n}}", {"n": 7}, "7"),
        ("{{First Name}}", {"First Name": "Bo"}, "Bo"),
        ("{{{name}}}", {"name": "Ann"}, "{Ann}"),
        ("€ {{x}} 😀", {"x": "ü"}, "€ ü 😀"),
    ],
)
def test_render(text, variables, expected):
    assert render(text, variables) == expected


@pytest.mark.parametrize(
    "text, variables, expected",
    [
        ("{{a}} {{ b }} {{c}} {{a}}", {"a": "1", "b": ""}, ["b", "c"]),
        ("{{a}}", {"a": "1"}, []),
        ("plain", {}, []),
        ("{{a}}", None, ["a"]),
    ],
)
def test_missing_variables(text, variables, expected):
    assert missing_variables(text, variables) == expected


def test_render_email_escapes_html_values_only():
    subject, html = render_email(
        "Hello {{name}} & co",
        "<p>Hi {{ name }}, {{missing}}</p>",
        {"name": "<Tom & \"Jerry\">"},
    )
    assert subject == "Hello <Tom & \"Jerry\"> & co"
    assert html == "<p>Hi &lt;Tom &amp; &quot;Jerry&quot;&gt;, {{missing}}</p>"


# Text made of template-ish pieces so hypothesis hits the interesting cases often.
template_text = st.lists(
    st.one_of(
        st.text(max_size=8),
        st.sampled_from(["{{", "}}", "{", "}", " ", "\n", "{{a}}", "{{ b }}", "{{c d}}"]),
        st.text(alphabet="ab cd{}", max_size=6).map(lambda s: "{{" + s + "}}"),
    ),
    max_size=12,
).map("".join)
variables_st = st.dictionaries(st.sampled_from(["a", "b", "c d", "x"]), st.text(max_size=5), max_size=4)


@given(template_text, variables_st)
def test_render_never_raises_and_is_consistent(text, variables):
    out = render(text, variables)
    assert isinstance(out, str)
    subject, html = render_email(text, text, variables)
    assert subject == out
    assert isinstance(html, str)
    # Nothing to fill: the text is unchanged.
    assert render(text, {}) == text
    missing = missing_variables(text, variables)
    assert set(missing) <= set(placeholders(text))
    # Every placeholder either gets a value or is reported missing.
    for name in placeholders(text):
        assert (name in missing) == (not variables.get(name))


@given(st.text(), st.dictionaries(st.text(), st.text()))
def test_render_arbitrary_input_never_raises(text, variables):
    render(text, variables)
    render_email(text, text, variables)
    missing_variables(text, variables)


@given(st.from_regex(r"[A-Za-z_][A-Za-z0-9_ ]{0,10}[A-Za-z0-9_]", fullmatch=True), st.text(min_size=1),
       st.sampled_from(["", " ", "  ", "\t"]))
def test_any_name_renders(name, value, pad):
    template = "x{{" + pad + name + pad + "}}y"
    assert placeholders(template) == [name]
    assert render(template, {name: value}) == f"x{value}y"
    assert render(template, {}) == template


# ---------------------------------------------------------------------------------------------
# SMS encoding and segments
# ---------------------------------------------------------------------------------------------
def test_gsm_tables():
    assert len(GSM7_BASIC) == 127  # 128 codes minus the escape
    assert len(GSM7_EXTENSION) == 10
    assert "\x1b" not in GSM7_BASIC
    assert GSM7_BASIC.isdisjoint(GSM7_EXTENSION)


@pytest.mark.parametrize(
    "text, encoding",
    [
        ("", "GSM-7"),
        ("Hello, world!", "GSM-7"),
        ("@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ", "GSM-7"),
        ("¡¿ÄÖÑÜ§äöñüà¤", "GSM-7"),
        (GSM_EXT_SORTED, "GSM-7"),
        ("€10 [a] {b} ~c~ ^ | \\", "GSM-7"),
        ("ç", "UCS-2"),  # only capital Ç is GSM-7
        ("á", "UCS-2"),
        ("`", "UCS-2"),
        ("Hi 😀", "UCS-2"),
        ("\x1b", "UCS-2"),
        ("\t", "UCS-2"),
        ("Привет", "UCS-2"),
        ("你好", "UCS-2"),
    ],
)
def test_sms_encoding(text, encoding):
    assert sms_encoding(text) == encoding


@pytest.mark.parametrize(
    "text, segments",
    [
        ("", 1),
        ("a", 1),
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 306, 2),
        ("a" * 307, 3),
        ("a" * 459, 3),
        ("a" * 460, 4),
        ("a" * 1600, 11),
        ("€" * 80, 1),  # 160 septets
        ("€" * 80 + "a", 2),  # 161 septets
        ("a" * 159 + "€", 2),  # 161 septets
        ("€" * 153, 2),  # 306 septets
        ("€" * 154, 3),
        ("é" * 160, 1),  # é is basic GSM-7
        ("á" * 70, 1),
        ("á" * 71, 2),
        ("á" * 134, 2),
        ("á" * 135, 3),
        ("😀" * 35, 1),  # 70 UTF-16 units
        ("😀" * 35 + "a", 2),
        ("a" * 159 + "á", 3),  # one UCS-2 char makes the whole text UCS-2: 160 units
        ("\ud800", 1),  # a lone surrogate counts, no exception
    ],
)
def test_sms_segments(text, segments):
    assert sms_segments(text) == segments


def test_septets():
    assert sms_septets("abc") == 3
    assert sms_septets("a€[") == 5
    assert sms_septets("\f") == 2


def _reference_segments(text: str) -> int:
    if all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text):
        n = sum(2 if c in GSM7_EXTENSION else 1 for c in text)
        return 1 if n <= 160 else math.ceil(n / 153)
    n = len(text.encode("utf-16-le", "surrogatepass")) // 2
    return 1 if n <= 70 else math.ceil(n / 67)


gsm_text = st.text(alphabet=GSM_BASIC_SORTED + GSM_EXT_SORTED, max_size=1700)


@given(st.one_of(gsm_text, st.text(max_size=1700)))
def test_segments_match_reference(text):
    assert sms_segments(text) == _reference_segments(text)
    assert sms_segments(text) >= 1


@given(st.one_of(gsm_text, st.text(max_size=800)), st.one_of(gsm_text, st.text(max_size=800)))
def test_segments_monotone_in_length(a, b):
    # Appending never lowers the count, even when it switches the text to UCS-2 (a UCS-2 segment
    # holds fewer characters than a GSM-7 one, even one full of 2-septet characters).
    assert sms_segments(a + b) >= sms_segments(a)


@given(gsm_text, gsm_text)
def test_gsm_segments_monotone(a, b):
    assert sms_segments(a + b) >= sms_segments(a)


@given(st.text(max_size=800), st.text(max_size=800))
def test_ucs2_segments_monotone(a, b):
    # Force UCS-2 on both sides with a non-GSM character.
    a, b = "á" + a, b
    assert sms_segments(a + b) >= sms_segments(a)
