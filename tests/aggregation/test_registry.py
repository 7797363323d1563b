"""The name registries: lookup, close matches, parameter checks, duplicates."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import aggregation
from aggregation import PRE_AGGREGATORS, RULES, Registry


def test_names_are_sorted_and_complete() -> None:
    assert aggregation.names() == sorted(aggregation.names())
    assert aggregation.names() == ["bulyan", "centered_clipping", "dnc", "flame",
                                   "fldetector", "fltrust", "foolsgold", "geometric_median",
                                   "krum", "mean", "median", "multi_krum", "signguard",
                                   "trimmed_mean"]
    assert aggregation.pre_names() == ["bucketing", "nnm", "norm_clip"]


@pytest.mark.parametrize(("typo", "close"), [("krun", "krum"), ("multikrum", "multi_krum"),
                                             ("trimmed-mean", "trimmed_mean")])
def test_unknown_rule_names_the_close_match_and_the_valid_names(typo: str, close: str) -> None:
    with pytest.raises(KeyError) as err:
        aggregation.get(typo, f=1)
    text = str(err.value)
    assert f"unknown aggregator {typo!r}" in text
    assert f"did you mean {close!r}" in text
    assert all(name in text for name in aggregation.names())


def test_unknown_step_names_the_close_match() -> None:
    with pytest.raises(KeyError, match="did you mean 'bucketing'") as err:
        aggregation.get_pre("buckets", s=2)
    assert "nnm" in str(err.value) and "norm_clip" in str(err.value)


def test_unknown_name_without_close_match() -> None:
    with pytest.raises(KeyError) as err:
        aggregation.get("zzzzzz")
    assert "did you mean" not in str(err.value)


def test_unknown_parameter_raises_with_close_match() -> None:
    with pytest.raises(TypeError, match=r"aggregator 'krum' got unknown parameter\(s\) 'ff' "
                                        r"\(did you mean 'f'\?\); valid parameters: f"):
        aggregation.get("krum", f=1, ff=2)
    with pytest.raises(TypeError, match="'use_weights'"):
        aggregation.get("median", use_weights=True)  # median has no weighted form
    with pytest.raises(TypeError, match="pre-aggregator 'nnm' got unknown parameter"):
        aggregation.get_pre("nnm", f=1, s=2)


def test_missing_parameter_raises() -> None:
    with pytest.raises(TypeError, match=r"aggregator 'krum' needs parameter\(s\) 'f'"):
        aggregation.get("krum")
    with pytest.raises(TypeError, match=r"needs parameter\(s\) 'tau'"):
        aggregation.get("centered_clipping", iters=3)


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="aggregator 'mean' is already registered"):
        RULES.register("mean")(RULES.get("median"))
    with pytest.raises(ValueError, match="pre-aggregator 'nnm' is already registered"):
        PRE_AGGREGATORS.register("nnm")(PRE_AGGREGATORS.get("norm_clip"))
    assert aggregation.names().count("mean") == 1


def test_registry_round_trip() -> None:
    reg: Registry[Callable[[], int]] = Registry("thing")
    reg.register("one")(lambda: 1)
    assert reg.get("one")() == 1 and "one" in reg and len(reg) == 1 and list(reg) == ["one"]
    with pytest.raises(ValueError, match="already registered"):
        reg.register("one")(lambda: 2)
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register(" one")


def test_get_returns_objects_holding_their_hyperparameters() -> None:
    rule = aggregation.get("multi_krum", f=2, m=3, use_weights=True)
    assert rule.name == "multi_krum" and not rule.stateful
    assert dict(rule.params) == {"f": 2, "m": 3} and rule.use_weights  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        rule.params["f"] = 5  # type: ignore[attr-defined]
    assert repr(rule) == "Rule('multi_krum', f=2, m=3, use_weights=True)"
    assert isinstance(rule, aggregation.Aggregator)
    step = aggregation.get_pre("bucketing", s=3)
    assert isinstance(step, aggregation.PreAggregator) and dict(step.params) == {"s": 3}  # type: ignore[attr-defined]
    assert aggregation.get("centered_clipping", tau=1.0).stateful


def test_seed_helpers_are_exported() -> None:
    a = aggregation.make_generator(aggregation.derive_seed(3, "round", 1))
    b = aggregation.make_generator(aggregation.derive_seed(3, "round", 1))
    c = aggregation.make_generator(aggregation.derive_seed(3, "round", 2))
    ra, rb, rc = (torch.randperm(20, generator=g) for g in (a, b, c))
    assert torch.equal(ra, rb) and not torch.equal(ra, rc)


def test_each_rule_and_step_is_registered_on_its_own_function() -> None:
    """One function, one registration line: the entry wraps the module-level function."""
    from aggregation import detection, history, pre, rules, trust

    for name in aggregation.names():
        module = {"dnc": detection, "flame": detection, "signguard": detection,
                  "foolsgold": history, "fldetector": history, "fltrust": trust}.get(name, rules)
        assert RULES.get(name).fn is getattr(module, name)
    for name in aggregation.pre_names():
        assert PRE_AGGREGATORS.get(name).fn is getattr(pre, name)


def test_registration_refuses_unchecked_or_stray_hyperparameters() -> None:
    from aggregation.catalog import integer, register_rule

    def newrule(updates: torch.Tensor, weights: torch.Tensor | None = None, *,
                f: int) -> aggregation.AggregationResult:
        raise AssertionError("never called")

    with pytest.raises(ValueError, match=r"declare a check for hyperparameter\(s\) \['f'\]"):
        register_rule("newrule", equivariances=frozenset(), properties=frozenset())(newrule)
    with pytest.raises(ValueError, match=r"checks given for \['g'\]"):
        register_rule("newrule", params={"f": integer(0), "g": integer(0)},
                      equivariances=frozenset(), properties=frozenset())(newrule)
    with pytest.raises(ValueError, match="why_not_dp is for components that are not"):
        register_rule("newrule", params={"f": integer(0)}, equivariances=frozenset(),
                      properties=frozenset(), dp_compatible=True, why_not_dp="x")(newrule)
    assert "newrule" not in RULES


def test_central_dp_coverage_is_declared_by_each_rule_and_step() -> None:
    """Only the mean (unweighted, after per-client clipping) is covered by central DP."""
    refusals = {name: aggregation.central_dp_refusal(name) for name in aggregation.names()}
    assert [name for name, why in refusals.items() if why is None] == ["mean"]
    for name, why in refusals.items():
        assert why is None or (why and "no sensitivity analysis" not in why), name
    assert aggregation.dp_compatible_steps() == ["norm_clip"]
    for name in aggregation.pre_names():
        traits = PRE_AGGREGATORS.get(name).traits
        assert traits is not None and traits.dp_compatible == (name == "norm_clip")
        assert traits.dp_compatible or traits.why_not_dp
    with pytest.raises(KeyError, match="did you mean 'krum'"):
        aggregation.central_dp_refusal("krun")


def test_factory_binds_checked_defaults_and_refuses_direct_misuse() -> None:
    factory = RULES.get("geometric_median")
    assert factory.hyperparameters == ["nu", "iters", "tol", "use_weights"]
    assert dict(factory(tol=0).params) == {"nu": 1e-6, "iters": 100, "tol": 0.0}
    with pytest.raises(TypeError, match="geometric_median: .*valid parameters: nu, iters"):
        factory(steps=3)


def _context_rule(*, random: bool = False, needs_clients: bool = False,
                  needs_reference: bool = False
                  ) -> tuple[aggregation.Aggregator, list[dict[str, object]]]:
    """A rule object around a function that records the context it receives, and the
    record."""
    from aggregation.catalog import Rule

    def fn(updates: torch.Tensor, weights: torch.Tensor | None = None,
           **context: object) -> aggregation.AggregationResult:
        seen.append(context)
        return aggregation.AggregationResult(updates[0], torch.tensor([0]))

    seen: list[dict[str, object]] = []
    rule = Rule("ctx", fn, {}, use_weights=False, equivariances=frozenset(),
                properties=frozenset(), random=random, needs_clients=needs_clients,
                needs_reference=needs_reference)
    return rule, seen


def test_register_rule_detects_the_context_a_function_declares() -> None:
    """generator / clients / reference are the round's context, not hyperparameters."""
    for name, random, clients, reference in [("krum", False, False, False),
                                             ("flame", True, False, False),
                                             ("foolsgold", False, True, False),
                                             ("fldetector", True, True, False)]:
        rule = aggregation.get(name, **({"f": 1} if name == "krum" else {}))
        assert (rule.random, rule.needs_clients, rule.needs_reference) == (  # type: ignore[attr-defined]
            random, clients, reference), name
        assert not {"generator", "clients", "reference"} & set(RULES.get(name).hyperparameters)


def test_a_rule_gets_only_the_context_it_declares_and_refuses_it_missing() -> None:
    x = torch.randn(4, 3, dtype=torch.float64)
    ids = torch.tensor([7, 3, 9, 1])
    ref = torch.zeros(3, dtype=torch.float64)
    g = aggregation.make_generator(0)
    plain, plain_seen = _context_rule()
    plain(x, generator=g, clients=ids, reference=ref)
    assert plain_seen == [{}]
    full, full_seen = _context_rule(random=True, needs_clients=True, needs_reference=True)
    full(x, generator=g, clients=ids, reference=ref)
    got = full_seen[0]
    assert isinstance(got["clients"], torch.Tensor)
    assert got["generator"] is g and torch.equal(got["clients"], ids) and got["reference"] is ref
    with pytest.raises(ValueError, match="^ctx draws random numbers: pass generator="):
        full(x, clients=ids, reference=ref)
    with pytest.raises(TypeError, match="ctx: generator must be a torch.Generator"):
        full(x, generator=0, clients=ids, reference=ref)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^ctx keys its history by client: pass "
                                         r"clients=\(n,\) int64 ids"):
        full(x, generator=g, reference=ref)
    with pytest.raises(ValueError, match="^ctx needs the server's reference update on its "
                                         r"root dataset: pass reference=\(d,\)"):
        full(x, generator=g, clients=ids)


@pytest.mark.parametrize(("reference", "match"), [
    (torch.zeros(4, dtype=torch.float64), r"shape \(d,\) = \(3,\)"),
    (torch.zeros(3, dtype=torch.float32), "dtype torch.float64"),
    (torch.tensor([0.0, float("nan"), 1.0], dtype=torch.float64), "NaN or Inf"),
    ([0.0, 0.0, 0.0], "must be a torch.Tensor"),
])
def test_reference_is_checked(reference: object, match: str) -> None:
    rule, _ = _context_rule(needs_reference=True)
    with pytest.raises(ValueError, match=match):
        rule(torch.ones(2, 3, dtype=torch.float64), reference=reference)  # type: ignore[arg-type]


def test_compose_passes_the_context_through_rowwise_steps_only() -> None:
    from aggregation.catalog import PreStep

    def keep(updates: torch.Tensor, weights: torch.Tensor | None = None
             ) -> aggregation.PreAggResult:
        eye = torch.eye(updates.shape[0], dtype=torch.bool)
        return aggregation.PreAggResult(updates, weights, eye)

    rowwise = PreStep("rowwise", keep, {}, random=False, equivariances=frozenset(),
                      preserves=frozenset(), rowwise=True)
    x = torch.randn(3, 2, dtype=torch.float64)
    ids, ref = torch.tensor([5, 6, 7]), torch.zeros(2, dtype=torch.float64)
    keyed, keyed_seen = _context_rule(needs_clients=True, needs_reference=True)
    aggregation.compose(keyed, [rowwise])(x, clients=ids, reference=ref)
    got = keyed_seen[0]
    assert isinstance(got["clients"], torch.Tensor)
    assert torch.equal(got["clients"], ids) and got["reference"] is ref
    # a step that mixes rows passes the reference but not the clients
    scored, scored_seen = _context_rule(needs_reference=True)
    mixed = aggregation.compose(scored, [aggregation.get_pre("bucketing", s=2)])
    mixed(x, generator=aggregation.make_generator(0), clients=ids, reference=ref)
    assert scored_seen[0]["reference"] is ref
    with pytest.raises(ValueError, match="ctx keys its history by client"):
        aggregation.compose(keyed, [rowwise, aggregation.get_pre("nnm", f=1)])
