"""``key=value`` run-config overrides: one reader for ``fedshield run``, ``--set`` and the
deploy tools' ``--run-config``."""

from __future__ import annotations

import pytest

from runconfig.overrides import parse_override, parse_overrides, split_overrides


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("num-server-rounds=3", ("num-server-rounds", 3)),
        ("learning-rate=0.1", ("learning-rate", 0.1)),
        ("learning-rate=1e-3", ("learning-rate", 0.001)),
        ("round-timeout=inf", ("round-timeout", float("inf"))),  # TOML
        ("learning-rate=.5", ("learning-rate", 0.5)),  # Python literal
        ("resume=true", ("resume", True)),
        ("resume=False", ("resume", False)),
        ("aggregator=krum", ("aggregator", "krum")),
        ('aggregator="3"', ("aggregator", "3")),  # quoted: a string, not a number
        ("aggregator-params=f=2, m=5", ("aggregator-params", "f=2, m=5")),
        ("out-dir='C:\\new'", ("out-dir", "C:\\new")),  # TOML literal: no escapes
        ('out-dir="a\\tb"', ("out-dir", "a\tb")),  # TOML basic string: escapes
        ("model-params=hidden=[64]", ("model-params", "hidden=[64]")),
        ("dataset=[1, 2]", ("dataset", "[1, 2]")),  # not a scalar: kept as text
        ("seed=2024-01-01", ("seed", "2024-01-01")),  # a TOML date is not a scalar
        ("x.y-z_1 = 2", ("x.y-z_1", 2)),
    ],
)
def test_parse_override(text: str, want: tuple[str, object]) -> None:
    got = parse_override(text)
    assert got == want and type(got[1]) is type(want[1])


def test_a_value_is_one_value_never_more_keys() -> None:
    # a newline could smuggle a second TOML key; the value stays text
    assert parse_override("a=3\nb = 4") == ("a", "3\nb = 4")


@pytest.mark.parametrize(
    ("text", "match"),
    [("krum", "not key=value"), ("=3", "not key=value"), ("a b=3", "must be letters")],
)
def test_bad_overrides_are_refused(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_override(text)


def test_parse_overrides_honours_quotes() -> None:
    text = "num-server-rounds=3  out-dir='/tmp/a b' aggregator-params=\"f=2, m=5\" resume=true"
    assert parse_overrides(text) == {
        "num-server-rounds": 3, "out-dir": "/tmp/a b", "aggregator-params": "f=2, m=5",
        "resume": True,
    }
    assert split_overrides(" a=1\tb='x y' ") == ["a=1", "b='x y'"]
    assert parse_overrides("") == {}


@pytest.mark.parametrize(
    ("text", "match"),
    [("a=1 a=2", "twice"), ("a='x", "unclosed"), ("a=1 junk", "not key=value")],
)
def test_parse_overrides_refuses_bad_text(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_overrides(text)
