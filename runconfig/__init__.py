"""The run configuration, shared by the server, the clients and the tools around them.

No Flower and no maths here: the one grammar for component specs
(:mod:`runconfig.spec`), ``key=value`` overrides of run-config keys
(:mod:`runconfig.overrides`), importing objects named ``module:attribute``
(:func:`resolve_object`), and the typed, validated run config (:mod:`runconfig.config`).
"""

from __future__ import annotations

from .objects import resolve_object
from .overrides import parse_override, parse_overrides
from .spec import Spec, format_params, parse_params, parse_spec, parse_specs, split_top_level

__all__ = [
    "Spec",
    "format_params",
    "parse_override",
    "parse_overrides",
    "parse_params",
    "parse_spec",
    "parse_specs",
    "resolve_object",
    "split_top_level",
]
