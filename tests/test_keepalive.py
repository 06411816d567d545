from __future__ import annotations

import math

import pytest

from proxy.errors import BadRequest
from proxy.keepalive import format_keep_alive, keep_alive_of, parse_duration, parse_keep_alive


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (300, 300.0),
        (42.5, 42.5),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("0s", 0.0),
        ("300", 300.0),
        ("42.5", 42.5),
        (0, 0.0),
        ("0", 0.0),
        ("1.5h", 5400.0),
        ("250ms", 0.25),
        ("2h45m10s", 9910.0),
        (None, None),
    ],
)
def test_accepted_forms(value: object, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", [-1, "-1", "-1m", -0.5, "-5s"])
def test_negative_means_forever(value: object) -> None:
    assert parse_keep_alive(value) == math.inf


@pytest.mark.parametrize(
    "value", ["X5m", "X0", "+-5m", "abc", "5 minutes", "", "m5", True, False, [], {"x": 1}, "nan", float("nan"), "5mm"]
)
def test_rejected_forms_name_the_field(value: object) -> None:
    with pytest.raises(BadRequest) as info:
        parse_keep_alive(value, "options.keep_alive")
    assert "options.keep_alive" in info.value.message and "duration" in info.value.message
    assert info.value.param == "options.keep_alive"


def test_format() -> None:
    assert format_keep_alive(300) == "5m"
    assert format_keep_alive(5400) == "1h30m"
    assert format_keep_alive(0) == "0s"
    assert format_keep_alive(math.inf) == "-1"
    assert format_keep_alive(0.25) == "0.25s"
    assert format_keep_alive(3661) == "1h1m1s"
    assert format_keep_alive(None) == ""  # absent: nothing to show


def test_a_rejected_value_names_keep_alive_by_default() -> None:
    with pytest.raises(BadRequest) as info:
        parse_keep_alive("soon")
    assert info.value.param == "keep_alive"
    assert info.value.message.startswith("invalid keep_alive 'soon': expected a number of seconds")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),  # Go allows a bare 0, and no other number without a unit
        ("-0", 0.0),
        ("+5m", 300.0),
        ("-1.5h", -5400.0),
        ("+.5s", 0.5),
        ("1.s", 1.0),
        ("1h2m3s4ms5us6ns", 3723.004005006),
        ("2µs", 2e-6),
        (" 5m ", 300.0),
        ("5", None),
        ("", None),
        ("-", None),
        ("1h 30m", None),
        ("5d", None),
        ("m", None),
    ],
)
def test_parse_duration_is_gos(text: str, seconds: float | None) -> None:
    parsed = parse_duration(text)
    if seconds is None:
        assert parsed is None
    else:
        assert parsed is not None and math.isclose(parsed, seconds, rel_tol=1e-12)


def test_keep_alive_is_taken_from_the_body_or_its_options() -> None:
    body = {"model": "m", "keep_alive": "5m", "options": {"keep_alive": 10, "temperature": 0}}
    assert keep_alive_of(body) == 300.0  # the top level wins
    assert body == {"model": "m", "options": {"temperature": 0}}  # both are taken out
    body = {"model": "m", "options": {"keep_alive": "1m"}}
    assert keep_alive_of(body) == 60.0 and body == {"model": "m", "options": {}}
    body = {"model": "m"}
    assert keep_alive_of(body) is None and body == {"model": "m"}
    assert keep_alive_of({"options": "not an object", "keep_alive": -1}) == math.inf
    with pytest.raises(BadRequest) as info:
        keep_alive_of({"options": {"keep_alive": "soon"}})
    assert info.value.param == "options.keep_alive"
    with pytest.raises(BadRequest) as info:
        keep_alive_of({"keep_alive": "soon", "options": {"keep_alive": 1}})
    assert info.value.param == "keep_alive"
