"""The docstring examples run, and the table in ``help(aggregation)`` lists every rule."""

from __future__ import annotations

import doctest
import importlib
import re

import pytest

import aggregation

MODULES = ["aggregation", "aggregation.rules", "aggregation.pre", "aggregation.catalog",
           "aggregation.detection", "aggregation.history",
           "aggregation.compose", "aggregation.registry", "aggregation._checks"]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_module_table_names_only_registered_rules_and_steps() -> None:
    """The table in ``help(aggregation)`` documents; it must not name what is gone."""
    doc = aggregation.__doc__ or ""
    documented = set(re.findall(r"^\| `(\w+)`", doc, flags=re.MULTILINE))
    assert documented, "the table is parsed"
    assert documented <= set(aggregation.names()) | set(aggregation.pre_names())


@pytest.mark.parametrize("name", aggregation.names())
def test_every_rule_docstring_cites_and_explains(name: str) -> None:
    """Numpy-style docstring with a citation, the shapes, what is raised and an example."""
    doc = aggregation.RULES.get(name).fn.__doc__ or ""
    assert re.search(r"\[[A-Z][^\]]*\d{4}\]", doc.splitlines()[0]), "first line cites a paper"
    for section in ("Parameters", "Returns", "Raises", "Examples"):
        assert f"{section}\n    ----" in doc
    assert "(d,)" in doc and "(n, d)" in doc
