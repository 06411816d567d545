from __future__ import annotations

import math

import pytest

from proxy.errors import BadRequest
from proxy.keepalive import format_keep_alive, parse_keep_alive


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


@pytest.mark.parametrize("value", ["abc", "5 minutes", "", "m5", True, False, [], {"x": 1}, "nan", float("nan"), "5mm"])
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
