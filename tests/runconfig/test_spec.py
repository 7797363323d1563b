"""The one grammar for component specs: name(key=value, ...)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runconfig.spec import (
    Spec,
    format_params,
    parse_params,
    parse_spec,
    parse_specs,
    split_top_level,
)


def test_spec_with_and_without_parameters() -> None:
    assert parse_spec("krum(f=2)") == Spec("krum", {"f": 2})
    assert parse_spec("  median ") == Spec("median", {})
    assert parse_spec("alie(z=20.0, mode='x')") == Spec("alie", {"z": 20.0, "mode": "x"})
    assert parse_spec("npz:/data/x.npz") == Spec("npz:/data/x.npz", {})
    assert parse_spec("bucketing(s=2, sizes=(1, 2))").params == {"s": 2, "sizes": (1, 2)}


@pytest.mark.parametrize("bad", ["", "krum(f=2", "2krum", "krum(f)", "krum(f=1, f=2)", "a b"])
def test_malformed_specs_are_refused_with_the_grammar(bad: str) -> None:
    with pytest.raises(ValueError, match="name|key=value|twice|unbalanced"):
        parse_spec(bad, what="rule")


def test_lists_split_outside_parentheses_and_quotes() -> None:
    assert split_top_level("sign_flip(scale=4, x=1), alie", ",") == ["sign_flip(scale=4, x=1)", "alie"]
    assert split_top_level("a(s='x;y'); b", ";") == ["a(s='x;y')", "b"]
    assert [str(s) for s in parse_specs("norm_clip(max_norm=5); bucketing(s=2)")] == [
        "norm_clip(max_norm=5)", "bucketing(s=2)"]
    assert [str(s) for s in parse_specs("krum(f=1)+bucketing", sep="+")] == ["krum(f=1)", "bucketing"]
    assert parse_specs(" ") == []
    with pytest.raises(ValueError, match="empty item"):
        parse_specs("a;;b")
    with pytest.raises(ValueError, match="unbalanced"):
        split_top_level("a(b", ",")


def test_bare_words_are_strings_and_literals_are_typed() -> None:
    assert parse_params("a=1 b=2.5 c=True d=None e=word f='q w'") == {
        "a": 1, "b": 2.5, "c": True, "d": None, "e": "word", "f": "q w"}


_values = st.one_of(
    st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(), st.none(), st.text(alphabet="abcxyz _-", max_size=8),
)


@given(st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True), _values, max_size=5))
def test_format_and_parse_round_trip(params: dict[str, object]) -> None:
    assert parse_params(format_params(params)) == params
    spec = Spec("rule", params)
    assert parse_spec(str(spec)) == spec
