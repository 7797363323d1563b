"""Robust aggregation for federated learning: pure torch maths over ``(n, d)`` update stacks.

``n`` clients, ``f`` Byzantine, ``d`` parameters; an *update* is local weights minus the
global weights the client received, one client per row. Every rule is a small function in
:mod:`aggregation.rules` (pre-aggregation steps in :mod:`aggregation.pre`), registered by
the one decorator line above it (:func:`~aggregation.catalog.register_rule`, which also
declares its guarantees and whether central DP covers it) and reached through :func:`get` /
:func:`get_pre`; :func:`compose` puts steps in front of a rule, named ``rule+step``. No
Flower, no global RNG; output keeps the input's dtype and device. The tables below document
the registered rules; adding a rule needs no edit here.

Rules (``aggregation.get(name, **params)``)

| rule                | reference                     | precondition      | weights       |
|---------------------|-------------------------------|-------------------|---------------|
| `mean`              | McMahan et al., 2017 (FedAvg) | n >= 1            | yes (default) |
| `median`            | Yin et al., 2018              | n >= 1            | no            |
| `trimmed_mean`      | Yin et al., 2018              | n > 2f            | no            |
| `krum`              | Blanchard et al., 2017        | n >= 2f + 3       | no            |
| `multi_krum`        | Blanchard et al., 2017        | n >= 2f + 3,      | `use_weights` |
|                     |                               | 1 <= m <= n - f   |               |
| `bulyan`            | El Mhamdi et al., 2018        | n >= 4f + 3       | no            |
| `geometric_median`  | Pillutla et al., 2022 (RFA)   | nu > 0            | `use_weights` |
| `centered_clipping` | Karimireddy, He & Jaggi, 2021 | tau > 0; stateful | `use_weights` |
| `flame`             | Nguyen et al., 2022 (FLAME)   | n >= 2; generator | no            |
| `dnc`               | Shejwalkar & Houmansadr, 2021 | n > floor(c f);   | no            |
|                     |                               | generator         |               |
| `signguard`         | Xu et al., 2022 (SignGuard)   | 0 <= lower <= 1   | no            |
|                     |                               | <= upper; gen.    |               |
| `foolsgold`         | Fung et al., 2020 (FoolsGold) | clients; stateful | no            |
| `fldetector`        | Zhang et al., 2022            | clients; gen.;    | no            |
|                     | (FLDetector)                  | stateful          |               |

| rule                | equivariant to     | guarantee with at most f Byzantine clients        |
|---------------------|--------------------|---------------------------------------------------|
| `mean`              | translation, scale | none: one client moves it arbitrarily;            |
|                     |                    | `max_weight_ratio=r` caps each weight at r x the  |
|                     |                    | median weight (reported counts can be forged)     |
| `median`            | translation, scale | each coordinate within the honest range if n > 2f |
| `trimmed_mean`      | translation, scale | each coordinate within the honest range           |
| `krum`              | translation, scale | result within sqrt(n - f - 2) x (honest diameter) |
|                     |                    | of an honest update                               |
| `multi_krum`        | translation, scale | each selected update obeys Krum's bound           |
| `bulyan`            | translation, scale | iterated Krum picks n - 2f updates, each within   |
|                     |                    | Krum's bound; per coordinate the n - 4f values    |
|                     |                    | nearest their median are averaged                 |
| `geometric_median`  | translation        | breakdown point 1/2                               |
| `centered_clipping` | none (*)           | a Byzantine update of any norm moves the centre   |
|                     |                    | by at most p_i x tau per iteration                |
| `flame`             | scale              | removes updates outside the HDBSCAN cluster of    |
|                     |                    | n//2+1 (cosine); clipped to the median norm       |
| `dnc`               | translation, scale | removes the floor(c f) largest SVD outlier scores |
|                     |                    | per iteration (built against min-max / min-sum)   |
| `signguard`         | scale              | norm within [lower, upper] x median and in the    |
|                     |                    | largest sign-statistics cluster; clipped          |
| `foolsgold`         | scale (**)         | clients whose summed update histories are         |
|                     |                    | parallel (sybils) get weight ~0; no magnitude     |
|                     |                    | bound (add norm_clip)                             |
| `fldetector`        | scale (**)         | removes the cluster of high scores (distance to   |
|                     |                    | the L-BFGS prediction from each client's history) |
|                     |                    | when the gap statistic sees two; then `base`      |

(*) translation equivariant only when the state (the centre) is translated too. (**) with
the state scaled too. ``clients``: the rule keys a history by client and needs
``clients=`` ``(n,)`` int64 stable ids on every call (a client absent from a round keeps
its history; no step that mixes rows may precede it); ``gen.``: it needs a
``generator=``. Rules
marked "no" for weights validate and then ignore them; ``use_weights=True`` makes the
others use them (``mean`` uses them unless ``use_weights=False``).

Pre-aggregation steps (``aggregation.get_pre(name, **params)``, then :func:`compose`)

| step        | reference                     | parameters | effect                              |
|-------------|-------------------------------|------------|-------------------------------------|
| `norm_clip` | Abadi et al., 2016            | max_norm   | each update clipped to max_norm     |
| `bucketing` | Karimireddy et al., ICLR 2022 | s = 2      | random buckets of s averaged,       |
|             |                               |            | n' = ceil(n / s); needs a generator |
| `nnm`       | Allouah et al., AISTATS 2023  | f          | each update -> mean of its n - f    |
|             |                               |            | nearest neighbours, itself included |

Every precondition raises ``ValueError`` with the rule, the values and the fix, e.g.
``krum needs n >= 2f + 3, got n=5, f=2: lower f or sample more clients``; bad input
(not a floating 2-D tensor, NaN/Inf, weights of the wrong shape, negative or all zero)
raises ``ValueError``; an unknown name ``KeyError`` with the closest match; an unknown or
missing hyperparameter ``TypeError``. Robust rules ignore weights unless constructed with
``use_weights=True`` (client-reported example counts are attacker-controlled). Means are
computed as convex combinations and norms without squaring overflow, so an update near the
dtype's maximum cannot turn an aggregate into Inf/NaN; Krum-type distances are computed on
median-centred updates, which keeps them accurate for 1e-5-scale updates.

Examples
--------
>>> import aggregation, torch
>>> x = torch.tensor([[0.0, 1.0], [0.1, 1.1], [0.2, 0.9], [-0.1, 1.0], [9e9, -9e9]])
>>> aggregation.get("median")(x).update
tensor([0.1000, 1.0000])
>>> aggregation.get("krum", f=1)(x).kept
tensor([0])
"""

from __future__ import annotations

from . import detection as _detection  # noqa: F401  (registers flame, dnc, signguard)
from . import history as _history  # noqa: F401  (registers foolsgold, fldetector)
from . import pre as _pre  # noqa: F401  (registers the pre-aggregation steps)
from . import rules as _rules  # noqa: F401  (registers the rules)
from . import trust as _trust  # noqa: F401  (registers fltrust)
from ._checks import checked
from ._types import AggregationResult, Aggregator, PreAggregator, PreAggResult, PreconditionError
from .catalog import (
    PRE_AGGREGATORS,
    RULES,
    central_dp_refusal,
    dp_compatible_steps,
    get,
    get_pre,
    names,
    pre_names,
)
from .compose import compose
from .registry import Registry, check_params, derive_seed, make_generator

__all__ = [
    "PRE_AGGREGATORS",
    "RULES",
    "AggregationResult",
    "Aggregator",
    "PreAggResult",
    "PreAggregator",
    "PreconditionError",
    "Registry",
    "central_dp_refusal",
    "check_params",
    "checked",
    "compose",
    "derive_seed",
    "dp_compatible_steps",
    "get",
    "get_pre",
    "make_generator",
    "names",
    "pre_names",
]
