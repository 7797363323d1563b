"""Defenses that remember each client: FoolsGold and FLDetector.

A sybil attacker or a client that switches to poisoning shows itself over several rounds:
FoolsGold [Fung et al., RAID 2020] compares the *histories* of the clients' updates (sybils
pushing one goal keep similar histories, honest non-IID clients do not); FLDetector
[Zhang et al., KDD 2022] predicts each client's update from its history and the global
model's trajectory and flags the clients whose updates stop matching the prediction.

Both key their history by a stable client identity: their function declares a
keyword-only ``clients`` (``(n,)`` int64, one id per row), so :class:`~aggregation.catalog.Rule`
requires ``clients=`` on every call (the server passes the node ids). A client absent from
a round keeps its history. Their state is explicit (:class:`~aggregation.catalog.Rule`'s
``state=`` in, ``result.state`` out) and made of plain tensors in a ``dict`` with fixed
keys, whose first dimension grows with the number of clients seen, so a checkpoint stores
it exactly (``torch.save`` / ``torch.load(weights_only=True)``). A state is never mutated:
every call returns a new one. The state may live on another device than the updates (a
resumed run loads it on the CPU): it is moved to the updates' device.

Neither has a weighted form (client-reported example counts are attacker-controlled) and
neither is covered by central DP (each registration says why).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._checks import check_inputs, check_int, check_real, convex_mean, finite_update, row_norms
from ._types import AggregationResult, PreconditionError
from .catalog import ALL, RULES, integer, real, register_rule

__all__ = ["fldetector", "foolsgold", "gap_says_clusters", "lbfgs_hvp", "two_means_split"]

SCALE = frozenset({"scale"})
State = dict[str, Tensor]


# ---------------------------------------------------------------------------------------
# shared pieces: the per-client tables of a state


def _check_state(rule: str, state: object, template: Mapping[str, tuple[int | None, ...]],
                 d: int, device: torch.device) -> State:
    """``state`` checked against ``template`` (key -> shape, ``None``: the number of clients
    ``k``, ``-1``: ``d``) and moved to ``device``."""
    if not isinstance(state, dict) or set(state) != set(template):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{rule}: state must be a dict with keys {sorted(template)}, got {got}: pass the "
            f"state of the previous round's result, or None to start afresh"
        )
    k: int | None = None
    out: State = {}
    for key, shape in template.items():
        value = state[key]
        if not isinstance(value, Tensor):
            raise ValueError(f"{rule}: state[{key!r}] must be a tensor, got "
                             f"{type(value).__name__}")
        want = []
        for dim, size in enumerate(shape):
            if size is None:
                k = value.shape[0] if k is None and value.dim() > dim else k
                want.append(k)
            else:
                want.append(d if size == -1 else size)
        if list(value.shape) != want:
            raise ValueError(
                f"{rule}: state[{key!r}] has shape {tuple(value.shape)}, expected "
                f"{tuple(want)} (k clients seen, d={d} parameters): the state belongs to "
                "another model or was altered"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{rule}: state[{key!r}] has NaN or Inf entries")
        out[key] = value.to(device)
    return out


def _slots(known: Tensor, clients: Tensor) -> tuple[Tensor, Tensor]:
    """Each client's row in the table of ``known`` ids, new clients appended in order.

    Returns
    -------
    tuple
        ``(ids, rows)``: ``(k',)`` int64 every id after this round (``known`` first),
        ``(n,)`` int64 the row of each of ``clients``.
    """
    position = {c: i for i, c in enumerate(known.tolist())}
    ids = list(position)
    rows = []
    for c in clients.tolist():
        if c not in position:
            position[c] = len(ids)
            ids.append(c)
        rows.append(position[c])
    device = clients.device
    return (torch.tensor(ids, dtype=torch.int64, device=device),
            torch.tensor(rows, dtype=torch.int64, device=device))


def _grown(table: Tensor, k: int) -> Tensor:
    """A copy of ``table`` ``(k0, ...)`` with zero rows appended up to ``k`` rows."""
    extra = table.new_zeros((k - table.shape[0], *table.shape[1:]))
    return torch.cat([table, extra])


def _unit_rows(x: Tensor) -> Tensor:
    """Rows of ``(n, d)`` scaled to norm 1 (zero rows stay zero), float64."""
    norms = row_norms(x)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return (x / safe[:, None]).to(torch.float64)


# ---------------------------------------------------------------------------------------
# FoolsGold


def _foolsgold_init(d: int, dtype: torch.dtype, device: torch.device | str) -> State:
    return {"clients": torch.zeros(0, dtype=torch.int64, device=device),
            "history": torch.zeros(0, d, dtype=dtype, device=device)}


_FOOLSGOLD_STATE: dict[str, tuple[int | None, ...]] = {"clients": (None,), "history": (None, -1)}


@register_rule(
    "foolsgold", params={"kappa": real(0.0, strict=True)},
    state=("state", _foolsgold_init), equivariances=SCALE,
    properties=frozenset({"permutation_invariant", "within_bounds"}),
    why_not_dp="FoolsGold weighs each client by how much its history resembles the "
               "others': one client changes every weight, so there is no sensitivity "
               "bound C/m")
def foolsgold(updates: Tensor, weights: Tensor | None = None, *, clients: Tensor,
              state: State | None = None, kappa: float = 1.0) -> AggregationResult:
    r"""FoolsGold [Fung et al., RAID 2020]: down-weight clients whose histories look alike.

    Each client ``i`` (by id) keeps the sum of all its updates, ``h_i`` (this round's
    included); a client absent from a round keeps its ``h_i``. Over this round's clients:

    1. ``cs_ij = cos(h_i, h_j)`` and ``v_i = max(0, max_{j != i} cs_ij)``.
    2. Pardoning: ``cs_ij <- cs_ij v_i / v_j`` where ``v_i < v_j`` (an honest client that
       merely resembles a sybil is not punished as hard as the sybil).
    3. ``a_i = clip(1 - max_{j != i} cs_ij, 0, 1)``, ``a_i <- a_i / max_j a_j``, then
       ``a_i = 0.99`` where ``a_i = 1``.
    4. Logit: ``w_i = clip(kappa (ln(a_i / (1 - a_i)) + 0.5), 0, 1)``.

    .. math:: y = \sum_i w_i x_i \Big/ \sum_i w_i

    Sybils sending the same (or nearly the same) update have ``cs_ij`` near 1 and get
    weight near 0; a client alone in its direction gets weight 1. The paper's optional
    feature-importance weighting of the output layer is not applied (it needs the model's
    structure). A single client gets weight 1. With the history in the state, the rule is
    permutation invariant when ``clients`` is permuted with the rows, and scale
    equivariant when the state is scaled too.

    Parameters
    ----------
    updates
        ``(n, d)``.
    weights
        Ignored (validated by the rule object; no weighted form).
    clients
        ``(n,)`` int64 unique client ids, one per row.
    state
        ``{"clients": (k,) int64, "history": (k, d)}`` from the previous round, or
        ``None`` (no history yet).
    kappa
        Confidence ``kappa > 0`` of the logit (the paper: 1).

    Returns
    -------
    AggregationResult
        ``update`` ``(d,)``; ``kept`` the clients with weight ``> 0``; ``state`` the new
        histories (this round's clients added, new clients appended); ``info``:
        ``"weights"`` ``(n,)`` the ``w_i`` (not normalised) and ``"max_similarity"``
        ``(n,)`` the ``v_i``.

    Raises
    ------
    ValueError
        Bad input or state, ``clients`` missing or malformed, or (``PreconditionError``,
        the round is skipped) every history parallel to another's, which leaves no
        client to trust; or a history that overflowed.

    Examples
    --------
    >>> honest = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    >>> sybils = torch.tensor([[1.0, 1.0, -1.0], [1.0, 1.0, -1.0]])
    >>> res = foolsgold(torch.cat([honest, sybils]), clients=torch.arange(5))
    >>> res.info["weights"].tolist(), res.kept.tolist()
    ([1.0, 1.0, 1.0, 0.0, 0.0], [0, 1, 2])
    >>> res.state["history"].shape
    torch.Size([5, 3])
    """
    updates, _ = check_inputs("foolsgold", updates, None)
    kappa = check_real("foolsgold", "kappa", kappa, minimum=0.0, strict=True)
    n, d = updates.shape
    if state is None:
        state = _foolsgold_init(d, updates.dtype, updates.device)
    st = _check_state("foolsgold", state, _FOOLSGOLD_STATE, d, updates.device)
    ids, rows = _slots(st["clients"], clients.to(updates.device))
    history = _grown(st["history"], ids.numel())
    history[rows] = history[rows] + updates.to(history.dtype)  # (n, d)
    h = history[rows]
    if not bool(torch.isfinite(h).all()):
        raise PreconditionError(
            "foolsgold: a client's history of updates overflowed (its updates sit near the "
            f"largest {h.dtype} value): add norm_clip before foolsgold; the round is skipped"
        )
    w, v = foolsgold_weights(h, kappa)
    if not bool((w > 0).any()):
        raise PreconditionError(
            f"foolsgold: all n={n} clients' histories are parallel to another client's, so "
            "every client looks like a sybil and none can be trusted: the round is skipped"
        )
    kept = (w > 0).nonzero().flatten()
    update = convex_mean(updates[kept], (w[kept] / w[kept].sum()).to(updates.dtype))
    return AggregationResult(
        update=finite_update("foolsgold", update),
        kept=kept,
        state={"clients": ids, "history": history},
        info={"weights": w.to(updates.dtype), "max_similarity": v.to(updates.dtype)},
    )


def foolsgold_weights(history: Tensor, kappa: float = 1.0) -> tuple[Tensor, Tensor]:
    """FoolsGold's weights of the clients whose summed histories are the rows of ``(n, d)``.

    Steps 1-4 of :func:`foolsgold`, in float64. A row of zeros (a client whose updates
    summed to zero) is similar to nobody.

    Returns
    -------
    tuple
        ``(w, v)``: ``(n,)`` float64 weights in ``[0, 1]`` (all zero when every history
        is parallel to another's) and ``(n,)`` the maximum similarities ``v_i``.
    """
    n = history.shape[0]
    if n == 1:
        one = torch.ones(1, dtype=torch.float64, device=history.device)
        return one, torch.zeros_like(one)
    unit = _unit_rows(history)
    cs = unit @ unit.T  # (n, n)
    off = ~torch.eye(n, dtype=torch.bool, device=history.device)
    masked = torch.where(off, cs, torch.full_like(cs, -math.inf))
    v = masked.amax(dim=1).clamp(min=0.0)  # (n,)
    # pardoning: row i scaled by v_i / v_j where v_i < v_j (then v_j > 0)
    ratio = v[:, None] / torch.where(v > 0, v, torch.ones_like(v))[None, :]
    cs = torch.where(v[:, None] < v[None, :], cs * ratio, cs)
    masked = torch.where(off, cs, torch.full_like(cs, -math.inf))
    alpha = (1.0 - masked.amax(dim=1)).clamp(0.0, 1.0)
    top = alpha.max()
    if not bool(top > 0):
        return torch.zeros_like(alpha), v
    alpha = alpha / top
    alpha = torch.where(alpha == 1.0, torch.full_like(alpha, 0.99), alpha)
    logit = kappa * (torch.log(alpha) - torch.log1p(-alpha) + 0.5)  # -inf at alpha = 0
    return logit.clamp(0.0, 1.0), v


# ---------------------------------------------------------------------------------------
# FLDetector: L-BFGS Hessian-vector products and the gap statistic


def lbfgs_hvp(s: Tensor, y: Tensor, v: Tensor) -> Tensor:
    r"""L-BFGS approximation ``B v`` of a Hessian-vector product from ``m`` pairs.

    The compact form of Byrd, Nocedal & Schnabel (1994), as FLDetector uses it: with the
    pairs as rows of ``S``, ``Y`` ``(m, d)`` (oldest first), ``sigma = y_m^T s_m /
    s_m^T s_m``, ``L`` the strictly lower triangle of ``S Y^T`` and ``D`` its diagonal,

    .. math:: B = \sigma I - \begin{bmatrix} \sigma S^\top & Y^\top \end{bmatrix}
              \begin{bmatrix} \sigma S S^\top & L \\ L^\top & -D \end{bmatrix}^{-1}
              \begin{bmatrix} \sigma S \\ Y \end{bmatrix}

    The middle matrix is inverted with a pseudo-inverse (pairs may be collinear).

    Parameters
    ----------
    s, y
        ``(m, d)`` model differences and update differences, ``s_m != 0``.
    v
        ``(c, d)`` vectors.

    Returns
    -------
    Tensor
        ``(c, d)`` float64, the rows ``B v_j``.

    Examples
    --------
    >>> s = torch.eye(3, dtype=torch.float64)
    >>> lbfgs_hvp(s, 2.0 * s, torch.tensor([[1.0, -1.0, 0.5]], dtype=torch.float64))
    tensor([[ 2., -2.,  1.]], dtype=torch.float64)
    """
    s, y, v = s.to(torch.float64), y.to(torch.float64), v.to(torch.float64)
    sty = s @ y.T  # (m, m): s_i^T y_j
    sigma = (y[-1] @ s[-1]) / (s[-1] @ s[-1])
    lower = torch.tril(sty, diagonal=-1)
    middle = torch.cat([torch.cat([sigma * (s @ s.T), lower], dim=1),
                        torch.cat([lower.T, -torch.diag(torch.diagonal(sty))], dim=1)])
    p = torch.cat([sigma * (s @ v.T), y @ v.T])  # (2m, c)
    q = torch.linalg.pinv(middle) @ p  # (2m, c)
    out: Tensor = sigma * v - q.T @ torch.cat([sigma * s, y])
    return out


def two_means_split(z: Tensor) -> tuple[Tensor, Tensor]:
    """Exact 2-means of the 1-D points of ``(B, m)`` rows (``m >= 2``): for each row, the
    smallest within-cluster sum of squares over the ``m - 1`` splits of its sorted values,
    and the threshold (the smallest value of the upper cluster).

    Returns
    -------
    tuple
        ``(wss, threshold)``, both ``(B,)`` float64.
    """
    z = torch.sort(z.to(torch.float64), dim=1).values
    m = z.shape[1]
    c1, c2 = torch.cumsum(z, dim=1), torch.cumsum(z * z, dim=1)
    left = torch.arange(1, m, dtype=torch.float64, device=z.device)  # sizes of the left part
    s_l, q_l = c1[:, :-1], c2[:, :-1]
    s_r, q_r = c1[:, -1:] - s_l, c2[:, -1:] - q_l
    wss = (q_l - s_l * s_l / left) + (q_r - s_r * s_r / (m - left))  # (B, m - 1)
    best = torch.argmin(wss, dim=1)
    pick = best[:, None]
    return (wss.gather(1, pick).squeeze(1).clamp(min=0.0),
            z[:, 1:].gather(1, pick).squeeze(1))


def _wss1(z: Tensor) -> Tensor:
    return (z - z.mean(dim=1, keepdim=True)).square().sum(dim=1)


def gap_says_clusters(scores: Tensor, *, draws: int,
                      generator: torch.Generator) -> tuple[bool, float]:
    r"""Whether the gap statistic [Tibshirani, Walther & Hastie, 2001] picks more than one
    cluster for the 1-D ``scores`` ``(m,)``, ``m >= 3``.

    The scores are rescaled to ``[0, 1]``; ``W_k`` is the within-cluster sum of squares of
    the best ``k``-means (exact in 1-D); the reference is ``draws`` samples of ``m``
    uniform points on ``[0, 1]``. With ``Gap(k) = mean_b log W_k^{*b} - log W_k`` and
    ``s_2 = std_b(log W_2^{*b}) sqrt(1 + 1/draws)``, the statistic picks the smallest
    ``k`` with ``Gap(k) >= Gap(k + 1) - s_{k+1}``; it picks ``k > 1`` exactly when
    ``Gap(1) < Gap(2) - s_2``, which is all FLDetector needs. Scores that are all equal
    form one cluster.

    Returns
    -------
    tuple
        ``(more_than_one, gap2_minus_gap1)``.
    """
    z = scores.to(torch.float64)
    lo, hi = z.min(), z.max()
    if not bool(hi - lo > 1e-12 * hi.abs().clamp(min=1e-300)):
        return False, 0.0
    z = ((z - lo) / (hi - lo))[None, :]  # (1, m)
    ref = torch.rand((draws, z.shape[1]), generator=generator, device=generator.device,
                     dtype=torch.float64).to(z.device)
    log_w1, log_w1_ref = torch.log(_wss1(z))[0], torch.log(_wss1(ref))
    log_w2, log_w2_ref = torch.log(two_means_split(z)[0])[0], torch.log(two_means_split(ref)[0])
    gap1 = log_w1_ref.mean() - log_w1
    gap2 = log_w2_ref.mean() - log_w2  # +Inf when the scores take two values only
    s2 = log_w2_ref.std(unbiased=False) * math.sqrt(1.0 + 1.0 / draws)
    return bool(gap1 < gap2 - s2), float(gap2 - gap1)


def _fldetector_init(d: int, dtype: torch.dtype, device: torch.device | str, *,
                     window: int = 10) -> State:
    def zeros(*shape: int, kind: torch.dtype = dtype) -> Tensor:
        return torch.zeros(shape, dtype=kind, device=device)
    return {"clients": zeros(0, kind=torch.int64), "last": zeros(0, d),
            "anchor": zeros(0, d), "distances": zeros(0, window),
            "filled": zeros(0, kind=torch.int64), "position": zeros(d),
            "previous": zeros(d), "s": zeros(window, d), "y": zeros(window, d),
            "pairs": zeros(kind=torch.int64), "rounds": zeros(kind=torch.int64)}


def _base_rule(component: str, param: str, value: Any) -> str:
    """The name of a registered rule FLDetector may average the kept clients with."""
    if not isinstance(value, str):
        raise TypeError(f"{component}: {param} must be a rule name (str), got {value!r}")
    factory = RULES.get(value)  # KeyError with the close match
    rule = factory() if not any(
        p.default is p.empty for p in factory.__signature__.parameters.values()) else None
    fit = (rule is not None and not rule.stateful and not rule.random
           and not rule.needs_clients and not rule.needs_reference
           and ALL <= rule.properties)
    if not fit:
        raise ValueError(
            f"{component}: {param}={value!r} cannot follow the detection: it must be a "
            "stateless, deterministic rule without required hyperparameters that is "
            "permutation invariant, unanimous and within bounds (e.g. 'mean', 'median')"
        )
    return value


def _fldetector_state(window: int) -> dict[str, tuple[int | None, ...]]:
    return {"clients": (None,), "last": (None, -1), "anchor": (None, -1),
            "distances": (None, window), "filled": (None,), "position": (-1,),
            "previous": (-1,), "s": (window, -1), "y": (window, -1), "pairs": (),
            "rounds": ()}


@register_rule(
    "fldetector", params={"window": integer(1), "draws": integer(2), "base": _base_rule},
    state=("state", _fldetector_init), equivariances=SCALE, properties=ALL,
    why_not_dp="FLDetector removes the clients whose scores cluster apart from the others', "
               "so one client changes who is averaged: no sensitivity bound C/m")
def fldetector(updates: Tensor, weights: Tensor | None = None, *, clients: Tensor,
               generator: torch.Generator, state: State | None = None, window: int = 10,
               draws: int = 20, base: str = "mean") -> AggregationResult:
    r"""FLDetector [Zhang et al., KDD 2022]: flag clients inconsistent with their history.

    The global model's trajectory is derived from the state: the aggregate this rule
    returned in round ``t`` is the global model change ``w_{t+1} - w_t`` (so the rule
    assumes its aggregate is applied as is). After each round it keeps the pair
    ``s = g_{t-1}``, ``y = g_t - g_{t-1}`` of the last ``window`` ``N`` rounds' aggregates
    ``g``, and for each client (by id) its last update ``x_i`` and the global model it was
    computed at. In round ``t``, for each client seen before, with ``u_i`` the global model
    change since its last update:

    1. Prediction: ``\hat x_i = x_i^{last} + \hat H u_i``, ``\hat H`` the L-BFGS
       approximation from the stored pairs (:func:`lbfgs_hvp`).
    2. Distance ``e_i = ||\hat x_i - x_i||``, normalised by its mean over these clients
       (the paper divides by the sum over all ``n``; the mean does not depend on how many
       clients were sampled).
    3. Suspicious score: the mean of a client's last ``N`` normalised distances.
    4. Once this round's clients with ``N`` distances number at least 3, the gap
       statistic on their scores (:func:`gap_says_clusters`, ``draws`` uniform reference
       samples from ``generator``) decides whether an attack is under way; if so, the
       cluster of the higher scores in the exact 2-means split (:func:`two_means_split`)
       is flagged and removed for this round.

    The others are aggregated with the rule ``base``. The paper restarts training when it
    detects an attack; here the flagged clients are removed from the round and reported
    (their histories still advance, so a client that stops attacking is cleared after
    ``N`` rounds).

    Parameters
    ----------
    updates
        ``(n, d)``.
    weights
        Ignored (validated by the rule object; no weighted form).
    clients
        ``(n,)`` int64 unique client ids, one per row.
    generator
        Source of the gap statistic's reference samples.
    state
        The previous round's state (a dict of tensors, see the module docstring), or
        ``None``.
    window
        ``N >= 1``, the number of L-BFGS pairs and of distances averaged into a score (the
        paper: 10).
    draws
        ``B >= 2``, the gap statistic's reference samples.
    base
        Name of the rule that aggregates the kept clients (stateless, deterministic,
        no required hyperparameters; ``"mean"`` or ``"median"``).

    Returns
    -------
    AggregationResult
        ``update`` ``(d,)``; ``kept`` the clients not flagged and kept by ``base``;
        ``state`` the new state; ``info``: ``"scores"`` ``(n,)`` float64 (0 where not
        scored), ``"scored"`` and ``"flagged"`` ``(n,)`` bool, ``"attack"`` (0-d, 1.0
        when the gap statistic found more than one cluster) and ``"gap"`` (0-d,
        ``Gap(2) - Gap(1)``).

    Raises
    ------
    ValueError
        Bad input or state, ``clients`` missing or malformed, a bad hyperparameter.

    Examples
    --------
    >>> from aggregation.registry import make_generator
    >>> g = make_generator(0)
    >>> x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    >>> res = fldetector(x, clients=torch.arange(6), generator=g, window=2)
    >>> torch.allclose(res.update, x.mean(dim=0)), res.info["attack"].item()
    (True, 0.0)
    >>> sorted(res.state)[:3]
    ['anchor', 'clients', 'distances']
    """
    updates, _ = check_inputs("fldetector", updates, None)
    window = check_int("fldetector", "window", window, minimum=1)
    draws = check_int("fldetector", "draws", draws, minimum=2)
    base = _base_rule("fldetector", "base", base)
    n, d = updates.shape
    device = updates.device
    if state is None:
        state = _fldetector_init(d, updates.dtype, device, window=window)
    st = _check_state("fldetector", state, _fldetector_state(window), d, device)
    ids, rows = _slots(st["clients"], clients.to(device))
    k_old, k = st["clients"].numel(), ids.numel()
    last, anchor = _grown(st["last"], k), _grown(st["anchor"], k)
    distances, filled = _grown(st["distances"], k), _grown(st["filled"], k)
    known = rows < k_old  # (n,) clients with a last update
    pairs = int(st["pairs"])
    x = updates.to(torch.float64)
    if pairs > 0 and bool(known.any()) and bool((st["s"][-1] != 0).any()):
        r = rows[known]
        change = (st["position"][None, :] - anchor[r]).to(torch.float64)  # (m, d)
        predicted = last[r].to(torch.float64) + lbfgs_hvp(
            st["s"][window - pairs:], st["y"][window - pairs:], change)
        err = row_norms(predicted - x[known])  # (m,)
        mean_err = err.mean()
        err = err / mean_err if bool(mean_err > 0) else torch.zeros_like(err)
        distances[r] = torch.cat([distances[r, 1:], err.to(distances.dtype)[:, None]], dim=1)
        filled[r] = (filled[r] + 1).clamp(max=window)
    scored = filled[rows] == window  # (n,)
    scores = torch.where(scored, distances[rows].to(torch.float64).mean(dim=1),
                         torch.zeros(n, dtype=torch.float64, device=device))
    flagged = torch.zeros(n, dtype=torch.bool, device=device)
    attack, gap = False, 0.0
    if int(scored.sum()) >= 3:
        attack, gap = gap_says_clusters(scores[scored], draws=draws, generator=generator)
        if attack:
            threshold = two_means_split(scores[scored][None, :])[1][0]
            flagged = scored & (scores >= threshold)
    candidates = (~flagged).nonzero().flatten()
    res = RULES.build(base)(updates[candidates])
    kept = candidates[res.kept]
    update = finite_update("fldetector", res.update)
    new = {"clients": ids, "last": last, "anchor": anchor, "distances": distances,
           "filled": filled}
    new["last"][rows] = updates.to(last.dtype)
    new["anchor"][rows] = st["position"].expand(n, d).to(anchor.dtype)
    s, y, previous = st["s"], st["y"], st["previous"]
    if int(st["rounds"]) >= 1:  # (s, y) = (g_{t-1}, g_t - g_{t-1})
        s = torch.cat([s[1:], previous[None, :]])
        y = torch.cat([y[1:], (update.to(y.dtype) - previous)[None, :]])
        pairs = min(pairs + 1, window)
    new.update({
        "position": st["position"] + update.to(st["position"].dtype),
        "previous": update.to(previous.dtype).clone(), "s": s, "y": y,
        "pairs": torch.tensor(pairs, dtype=torch.int64, device=device),
        "rounds": st["rounds"] + 1,
    })
    return AggregationResult(
        update=update, kept=kept, state=new,
        info={"scores": scores, "scored": scored, "flagged": flagged,
              "attack": torch.tensor(float(attack), dtype=torch.float64, device=device),
              "gap": torch.tensor(gap, dtype=torch.float64, device=device)},
    )
