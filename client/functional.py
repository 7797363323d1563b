"""Local training written functionally (``torch.func``): one client, or K clients at once.

The model's parameters are a dict of tensors, not module state: :func:`local_train_stacked`
takes them stacked along a leading client axis, ``(K, *shape)`` per parameter, and trains
all K clients together. Each step is one ``vmap`` over the clients of
``grad_and_value(loss)`` (the loss evaluated with ``functional_call``), followed by the
optimizer's update written out on the stacked tensors, element for element what
``torch.optim.SGD`` / ``torch.optim.Adam`` do (their single-tensor code path). K = 1 is one
client.

What makes K clients train like K separate runs of :func:`client.train.local_train`:

- **The same batches.** :func:`client_batches` draws from the client's generator exactly
  what ``local_train`` draws (its dropout seed, then one permutation per epoch), so client
  ``k`` sees the same batches in the same order.
- **Masked steps, not fake data.** Clients with more data make more steps. At step ``s``
  only the clients that still have a batch step (the clients are sorted by their number of
  steps, so these are a prefix of the stack); the others' parameters and optimizer state
  are not touched. Within a step a client's batch may be shorter than the others' (the
  last batch of an epoch): its loss is the mean over its own samples, the rows that pad it
  to the longest batch weigh exactly zero.
- **The same parameters stepped.** ``torch.optim`` skips a parameter without ``.grad``: a
  frozen one (``requires_grad=False``) or one the loss does not use. ``vmap`` would give
  such a parameter a zero gradient, which weight decay and Adam still move; one plain
  backward pass of the first client's first batch finds them, and they enter the loss as
  constants and are never stepped.
- **No shared optimizer state.** Momentum and Adam's moments are stacked like the
  parameters; every client that steps at step ``s`` is at its own step ``s + 1``, so
  Adam's bias correction is one number per step.
- **One starting model, one first forward pass.** When the K starting points are one
  model expanded K times (stride 0 along the client axis, as the batched engine passes
  the global model), the first step's loss is evaluated with the parameters unbatched
  (``vmap(..., in_dims=None)``): the forward pass and the input gradients are one
  computation over every client's samples instead of K products with K equal copies;
  the parameter gradients are still each client's own (:func:`pgd_perturb`'s inner steps
  at that step likewise take the input gradients from the unbatched model). From K copies
  every step is batched. The two agree within float tolerance, not bit for bit (the first step's
  products sum in another order).

The results equal ``local_train``'s within float tolerance, not bit for bit: a batched
matrix product sums in another order than K separate ones, and a padded batch's mean is a
weighted sum. ``tests/client/test_functional.py`` measures the difference.

Not covered here (the batched engine trains such clients one by one): models with
dropout (its mask draws from the global RNG per client) or with buffers (BatchNorm
statistics), and DP-SGD.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from .adversarial import outside_box
from .order import BatchSource, draw_permutations, segments
from .train import TrainSettings

__all__ = [
    "ADAM_BETAS",
    "ADAM_EPS",
    "Schedule",
    "StackedData",
    "StackedLoss",
    "client_batches",
    "cross_entropy_loss",
    "local_train_stacked",
    "make_schedule",
    "pgd_perturb",
    "stack_parameters",
    "unsupported_features",
]

ADAM_BETAS = (0.9, 0.999)
"""``torch.optim.Adam``'s default ``(beta1, beta2)``, which :class:`TrainSettings` uses."""
ADAM_EPS = 1e-8
"""``torch.optim.Adam``'s default ``eps``."""

Params = dict[str, Tensor]
StackedLoss = Callable[[nn.Module, Params, Tensor, Tensor, Tensor], Tensor]
"""``loss(model, params, x, y, w) -> scalar`` for one client: ``x (B, ...)``, ``y (B,)``,
``w (B,)`` the weight of each sample (``1/b`` for the client's ``b`` real samples, 0 for
padding); vmapped over the clients."""


Perturb = Callable[[nn.Module, Params, Tensor, Tensor, Tensor, list[int]], Tensor]
"""``perturb(model, params, x, y, w, clients) -> x'`` for one step of the ``A`` clients
that step: ``params`` ``(A, ...)``, ``x (A, B, ...)``, ``y, w (A, B)``, ``clients`` their
indices in the caller's order; returns ``x' (A, B, ...)``."""


def pgd_perturb(
    eps: float, alpha: float, steps: int, generators: Sequence[torch.Generator], *,
    clamp: tuple[float, float] = (0.0, 1.0),
) -> Perturb:
    """PGD's inner maximisation [Madry et al., 2018] for K clients, as
    :func:`client.adversarial.pgd` does it for one (random start drawn from client ``k``'s
    ``generators[k]``, one draw of its real rows per step, then ``steps`` signed-gradient
    steps projected on the ``eps`` ball and the ``clamp`` box).

    Raises
    ------
    ValueError
        Inputs outside the clamp box (as ``pgd``), ``eps < 0``, ``alpha <= 0``, ``steps < 1``.
    """
    if not eps >= 0 or not alpha > 0 or steps < 1:
        raise ValueError(f"pgd needs eps >= 0, alpha > 0, steps >= 1, got {eps}, {alpha}, {steps}")
    lo, hi = clamp

    def input_loss(model: nn.Module, p: Params, x: Tensor, y: Tensor, real: Tensor) -> Tensor:
        logits = functional_call(model, p, (x,))
        return (nn.functional.cross_entropy(logits, y, reduction="none") * real).sum()

    def perturb(model: nn.Module, params: Params, x: Tensor, y: Tensor, w: Tensor,
                clients: list[int]) -> Tensor:
        if x.numel() and (float(x.min()) < lo or float(x.max()) > hi):
            raise outside_box(float(x.min()), float(x.max()), clamp)
        real = (w > 0).to(x.dtype)
        u = torch.zeros_like(x)
        for j, k in enumerate(clients):
            b = int((w[j] > 0).sum())
            g = generators[k]
            u[j, :b] = torch.rand((b, *x.shape[2:]), generator=g, dtype=x.dtype,
                                  device=g.device).to(x.device)

        def project(xa: Tensor) -> Tensor:
            return torch.minimum(torch.maximum(xa, x - eps), x + eps).clamp(lo, hi)

        x_adv = project(x + eps * (2 * u - 1))
        # the first training step of clients that start from one model (expanded K times):
        # the input gradients from the unbatched model, one computation for all clients
        common = _common_start(params)
        dx = vmap(grad(lambda p, xa, yy, r: input_loss(model, p, xa, yy, r), argnums=1),
                  in_dims=(0 if common is None else None, 0, 0, 0))
        at = params if common is None else common
        for _ in range(steps):
            x_adv = project(x_adv + alpha * dx(at, x_adv, y, real).sign())
        return x_adv.detach()

    return perturb


def cross_entropy_loss(model: nn.Module, params: Params, x: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """Cross-entropy averaged over the client's real samples: ``sum_i w_i CE(f(x_i), y_i)``."""
    logits = functional_call(model, params, (x,))
    return (nn.functional.cross_entropy(logits, y, reduction="none") * w).sum()


def unsupported_features(model: nn.Module) -> list[str]:
    """What in ``model`` the functional training does not reproduce; ``[]`` when none.

    ``"dropout"``: a dropout layer with ``p > 0`` (per-client masks come from the global
    RNG, seeded per client by ``local_train``); ``"buffers"``: floating-point buffers
    (e.g. BatchNorm statistics, which training updates outside the parameters).
    """
    out = []
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        out.append("dropout")
    if any(b.is_floating_point() for b in model.buffers()):
        out.append("buffers")
    return out


def stack_parameters(model: nn.Module, k: int, *, device: torch.device | None = None) -> Params:
    """``K`` copies of ``model``'s parameters, stacked: ``name -> (K, *shape)``.

    Examples
    --------
    >>> p = stack_parameters(nn.Linear(3, 2), 4)
    >>> p["weight"].shape, p["bias"].shape
    (torch.Size([4, 2, 3]), torch.Size([4, 2]))
    """
    if k < 1:
        raise ValueError(f"stack_parameters needs k >= 1 clients, got {k}")
    return {
        name: p.detach().to(device).unsqueeze(0).repeat(k, *([1] * p.dim()))
        for name, p in model.named_parameters()
    }


def client_batches(n: int, settings: TrainSettings, *, generator: BatchSource) -> list[Tensor]:
    """One client's batches over all its epochs, drawn exactly as ``local_train`` draws them.

    From a generator, ``local_train`` first draws the seed of its dropout RNG, then one
    permutation of ``range(n)`` per epoch; this draws the same, in the same order, so the
    generator ends where ``local_train`` leaves it. A :class:`~client.order.HashedOrder`
    gives the same permutations to both (:func:`client.order.draw_permutations`).

    Returns
    -------
    list of Tensor
        ``epochs * ceil(n / batch_size)`` index tensors into the client's data.

    Raises
    ------
    ValueError
        If ``n < 1`` (the same refusal as ``local_train``).
    """
    if n < 1:
        raise ValueError("cannot train on an empty partition: give this client some data")
    perms = draw_permutations([generator], [n], settings.epochs)
    return [b for perm in torch.split(perms, n) for b in torch.split(perm, settings.batch_size)]


@dataclass(frozen=True)
class StackedData:
    """K clients' data, concatenated: client ``k``'s examples are rows ``offset_k ..
    offset_k + sizes[k] - 1`` of ``x (N, ...)`` and ``y (N,)``, ``offset_k = sum(sizes[:k])``.

    Raises
    ------
    ValueError
        Rows of ``x`` and ``y`` that disagree, or sizes that do not sum to them.
    """

    x: Tensor
    y: Tensor
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0] or self.x.shape[0] != sum(self.sizes):
            raise ValueError(
                f"x has {self.x.shape[0]} rows, y {self.y.shape[0]}, the sizes sum to "
                f"{sum(self.sizes)}: they must agree"
            )


@dataclass(frozen=True)
class Schedule:
    """Which rows of the concatenated data every client trains on at every step.

    Attributes
    ----------
    order
        ``(K,)`` int64: position ``j`` of the stack holds client ``order[j]`` (clients sorted
        by number of steps, most first, so the clients that step form a prefix).
    rows
        Per step ``s``: ``(A_s, B_s)`` int64 rows of the concatenated data for the ``A_s``
        clients that step, padded to the longest batch ``B_s``.
    weights
        Per step: ``(A_s, B_s)`` float32, ``1/b`` on a client's ``b`` real rows, 0 on padding.
    counts
        Per step: ``(A_s,)`` float64, ``b`` of each client.
    last_epoch
        Per step: ``(A_s,)`` bool, whether the step is in that client's last epoch (the
        reported train loss averages those).
    identity
        Whether ``order`` is ``0..K-1`` (no client makes more steps than the one before it):
        the stack needs no reordering.
    """

    order: Tensor
    rows: tuple[Tensor, ...]
    weights: tuple[Tensor, ...]
    counts: tuple[Tensor, ...]
    last_epoch: tuple[Tensor, ...]
    identity: bool = False


def make_schedule(
    sizes: Sequence[int], settings: TrainSettings, generators: Sequence[BatchSource]
) -> Schedule:
    """The step plan of K clients with ``sizes[k]`` examples each, data concatenated in order.

    Client ``k``'s rows in the concatenated data are ``offset_k + i`` with ``offset_k =
    sum(sizes[:k])``; its batches are :func:`client_batches`' with ``generators[k]`` (the
    same draws, in the same order). Only the draws are made client by client; the plan is
    built with a few tensor operations per step, whatever K.
    """
    if len(sizes) != len(generators) or not sizes:
        raise ValueError(
            f"make_schedule needs one generator per client and at least one client, got "
            f"{len(sizes)} sizes and {len(generators)} generators"
        )
    if min(sizes) < 1:
        raise ValueError("cannot train on an empty partition: give this client some data")
    epochs, bs = settings.epochs, settings.batch_size
    drawn = draw_permutations(generators, sizes, epochs)
    k = len(sizes)
    n = torch.tensor(sizes, dtype=torch.int64)  # (K,)
    per_epoch = torch.div(n + bs - 1, bs, rounding_mode="floor")
    steps = per_epoch * epochs
    order = torch.sort(-steps, stable=True).indices  # most steps first, ties in client order
    pos = torch.empty_like(order)
    pos[order] = torch.arange(k)
    # every drawn index, client-major then epoch: its client, its place j in its epoch
    segment, j = segments(n, epochs)
    client, epoch = segment // epochs, segment % epochs
    offsets = torch.cumsum(n, 0) - n
    row = drawn + offsets[client]
    step = epoch * per_epoch[client] + torch.div(j, bs, rounding_mode="floor")
    col = j % bs
    by_step = torch.sort(step, stable=True).indices
    bounds = torch.bincount(step, minlength=int(steps.max())).cumsum(0).tolist()
    n_o, per_epoch_o, steps_o = n[order], per_epoch[order], steps[order]
    active_counts = (steps_o.unsqueeze(0) > torch.arange(len(bounds)).unsqueeze(1)).sum(1)
    rows, weights, counts, last = [], [], [], []
    lo = 0
    for s, (hi, a) in enumerate(zip(bounds, active_counts.tolist(), strict=True)):
        lens = torch.clamp(n_o[:a] - (s % per_epoch_o[:a]) * bs, max=bs)  # (A,)
        width = int(lens.max())
        idx = by_step[lo:hi]
        r = torch.zeros((a, width), dtype=torch.int64)
        r[pos[client[idx]], col[idx]] = row[idx]
        rows.append(r)
        real = torch.arange(width).unsqueeze(0) < lens.unsqueeze(1)  # (A, B)
        weights.append(real.float() / lens.unsqueeze(1).float())
        counts.append(lens.double())
        last.append(s >= (epochs - 1) * per_epoch_o[:a])
        lo = hi
    return Schedule(order, tuple(rows), tuple(weights), tuple(counts), tuple(last),
                    identity=bool(torch.equal(order, torch.arange(k))))


def local_train_stacked(
    model: nn.Module,
    params: Mapping[str, Tensor],
    data: Sequence[tuple[Tensor, Tensor]] | StackedData,
    settings: TrainSettings,
    *,
    generators: Sequence[BatchSource],
    device: torch.device | None = None,
    loss: StackedLoss = cross_entropy_loss,
    perturb: Perturb | None = None,
) -> tuple[Params, Tensor]:
    """Train K clients at once from stacked parameters; :func:`~client.train.local_train` x K.

    Parameters
    ----------
    model
        The architecture (its own parameters are not used, nor changed); in training mode.
    params
        ``name -> (K, *shape)``: client ``k``'s starting parameters at index ``k``
        (:func:`stack_parameters`), or one model expanded K times (every tensor with
        stride 0 along the client axis: the first step then runs on the unbatched
        parameters); not changed.
    data
        K pairs ``(x_k (N_k, ...), y_k (N_k,))``, ``N_k >= 1``; sizes may differ. Or the
        same concatenated (:class:`StackedData`).
    settings
        Epochs, batch size, optimizer (SGD with momentum and weight decay, or Adam).
    generators
        K batch-order sources (CPU generators or :class:`~client.order.HashedOrder`),
        client ``k``'s (as ``local_train``'s ``generator``).
    device
        Where to train; default the parameters' device.
    loss
        Per-client loss (:data:`StackedLoss`), vmapped over the clients.
    perturb
        Optional (:data:`Perturb`): replaces each step's inputs before the loss sees them
        (adversarial training, :func:`pgd_perturb`).

    Returns
    -------
    params : dict
        ``name -> (K, *shape)``, the trained parameters, on ``device``.
    train_loss : Tensor
        ``(K,)`` float64: mean loss over each client's last epoch (``local_train``'s
        ``train-loss``).

    Raises
    ------
    ValueError
        Parameters that disagree with the model or with K, empty data, or shapes of ``x`` and
        ``y`` that disagree.

    Examples
    --------
    >>> gen = [torch.Generator().manual_seed(i) for i in range(3)]
    >>> net = nn.Linear(4, 2)
    >>> data = [(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g))
    ...         for n, g in zip((5, 9, 2), gen)]
    >>> p, loss = local_train_stacked(net, stack_parameters(net, 3), data,
    ...                               TrainSettings(batch_size=4), generators=gen)
    >>> p["weight"].shape, loss.shape
    (torch.Size([3, 2, 4]), torch.Size([3]))
    """
    if isinstance(data, StackedData):
        sizes, x_all, y_all = list(data.sizes), data.x, data.y
    else:
        for i, (x, y) in enumerate(data):
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"client {i}: x has {x.shape[0]} rows but y has {y.shape[0]}")
        sizes = [int(x.shape[0]) for x, _ in data]
        x_all, y_all = torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])
    k = len(sizes)
    names = [n for n, _ in model.named_parameters()]
    if sorted(params) != sorted(names):
        raise ValueError(f"params has keys {sorted(params)}, the model's are {sorted(names)}")
    for name, p in model.named_parameters():
        if tuple(params[name].shape) != (k, *p.shape):
            raise ValueError(
                f"params[{name!r}] has shape {tuple(params[name].shape)}, expected "
                f"{(k, *p.shape)} (K={k} clients stacked on the model's {tuple(p.shape)})"
            )
    device = device if device is not None else next(iter(params.values())).device
    plan = make_schedule(sizes, settings, generators)
    order = plan.order.to(device)
    # the first step writes new tensors (_optimizer_step), so the caller's are never changed
    # and need no copy here; expanded views (one model for all K) are fine
    stacked = {n: params[n].to(device) for n in names}
    # one model expanded K times (every client starts from the global model): the first
    # step evaluates the loss with unbatched parameters, so the forward pass and the input
    # gradients are one computation over all clients' samples, not K products with K
    # equal copies; the parameter gradients stay per client
    common = _common_start(stacked)
    if not plan.identity and common is None:
        stacked = {n: t.index_select(0, order) for n, t in stacked.items()}
    x_all, y_all = x_all.to(device), y_all.to(device)
    # the parameters the loss differentiates: the others (frozen, or not used by the loss)
    # enter the loss as constants and are never stepped, as torch.optim skips a parameter
    # whose .grad is None (no weight decay, no momentum, no Adam moments for it)
    grad_loss = grad_and_value(lambda pt, pf, x, y, w: loss(model, {**pt, **pf}, x, y, w))
    step = vmap(grad_loss)
    trained: list[str] = []
    state: dict[str, Params] = {}
    total = torch.zeros(k, dtype=torch.float64, device=device)
    count = torch.zeros(k, dtype=torch.float64, device=device)
    for s, rows in enumerate(plan.rows):
        a = rows.shape[0]
        rows_d = rows.to(device)
        active = stacked if a == k else {n: t[:a] for n, t in stacked.items()}
        xb, yb, wb = x_all[rows_d], y_all[rows_d], plan.weights[s].to(device)
        if s == 0:
            trained = _trained_names(model, loss, {n: t[0] for n, t in active.items()},
                                     xb[0], yb[0], wb[0])
        if perturb is not None:  # e.g. PGD: the inputs the loss sees this step
            xb = perturb(model, active, xb, yb, wb, plan.order[:a].tolist())
        pt = {n: active[n] for n in trained}
        pf = {n: t for n, t in active.items() if n not in pt}
        if s == 0 and common is not None:
            grads, values = vmap(grad_loss, in_dims=(None, None, 0, 0, 0))(
                {n: common[n] for n in pt}, {n: common[n] for n in pf}, xb, yb, wb)
            # a gradient that does not depend on the clients' data comes back expanded:
            # dense, as the optimizer's state is updated in place
            grads = {n: g.contiguous() if g.stride(0) == 0 else g for n, g in grads.items()}
        else:
            grads, values = step(pt, pf, xb, yb, wb)
        if s == 0:  # every client steps at step 1: new tensors for all K
            stacked = {**_optimizer_step(settings, pt, grads, state, step=1),
                       **{n: t.clone(memory_format=torch.contiguous_format)
                          for n, t in pf.items()}}
        else:
            _optimizer_step(settings, pt, grads, state, step=s + 1)
        last = plan.last_epoch[s].to(device)
        counts = plan.counts[s].to(device)
        total[:a] += torch.where(last, values.detach().double() * counts, 0.0)
        count[:a] += torch.where(last, counts, 0.0)
    loss_k = total / count
    if plan.identity:
        return stacked, loss_k
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(k, device=device)
    out = {n: t.index_select(0, inverse) for n, t in stacked.items()}
    return out, loss_k.index_select(0, inverse)


def _trained_names(
    model: nn.Module, loss: StackedLoss, params: Params, x: Tensor, y: Tensor, w: Tensor
) -> list[str]:
    """The parameters that ``torch.optim`` would step in ``local_train``: those with
    ``requires_grad`` whose gradient exists (the loss uses them), found by one
    backward pass of one client's loss (``params`` unbatched, ``x, y, w`` its batch).

    A frozen parameter, or one the loss does not use, has no ``.grad`` there and the
    optimizer skips it: no weight decay, no momentum, no step. Under ``vmap`` its gradient
    would come back as zeros instead, which weight decay and Adam would still move.

    Raises
    ------
    ValueError
        If no parameter is left to train (all frozen or unused).
    """
    free = {n for n, p in model.named_parameters() if p.requires_grad}
    leaves = {n: t.detach().requires_grad_(n in free) for n, t in params.items()}
    wanted = [n for n in leaves if n in free]
    # leaves the model and the RNGs as they were: its buffers (a BatchNorm's statistics,
    # before the caller finds it unsupported) are copies, and a random operation in its
    # forward pass draws from a forked generator
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    cuda = [x.device] if x.device.type == "cuda" else []
    with torch.enable_grad(), torch.random.fork_rng(devices=cuda):
        value = loss(model, {**buffers, **leaves}, x, y, w)
        grads = (torch.autograd.grad(value, [leaves[n] for n in wanted], allow_unused=True)
                 if wanted and value.requires_grad else [None] * len(wanted))
    names = [n for n, g in zip(wanted, grads, strict=True) if g is not None]
    if not names:
        raise ValueError(
            "the model has no parameter to train: every parameter is frozen "
            "(requires_grad=False) or unused by the loss"
        )
    return names


def _common_start(params: Mapping[str, Tensor]) -> Params | None:
    """The one model's parameters when every ``(K, ...)`` tensor of ``params`` repeats a
    single model along its client axis without copies (``expand``: stride 0, as the
    batched engine passes the global model); ``None`` otherwise (copies may differ)."""
    out = {}
    for name, t in params.items():
        if t.dim() == 0 or t.stride(0) != 0:
            return None
        out[name] = t[0]
    return out


def _optimizer_step(
    settings: TrainSettings, params: Params, grads: Params, state: dict[str, Params], *,
    step: int,
) -> Params:
    """One step of ``torch.optim.SGD`` / ``Adam`` (single-tensor path) on the first ``A``
    rows of the stacked state; ``step`` counts from 1 and is every row's.

    Step 1 (every client steps) writes the new parameters to new tensors and returns them
    (``params`` may be views of the caller's, even one model expanded K times); later steps
    update ``params`` in place and return it. The arithmetic is the optimizer's either way.
    """
    lr, wd = settings.lr, settings.weight_decay
    out: Params = {}
    if settings.optimizer == "sgd":
        bufs = state.setdefault("momentum", {})
        for name, p in params.items():
            g = grads[name]  # a new tensor per step (vmap's gradient), not aliased
            if wd != 0:
                g = g.add(p, alpha=wd)
            if settings.momentum != 0:
                if step == 1:  # g is this step's own new tensor: the buffer needs no copy
                    bufs[name] = g.detach()
                    g = bufs[name]
                else:
                    g = bufs[name][: p.shape[0]].mul_(settings.momentum).add_(g, alpha=1)
            out[name] = torch.add(p, g, alpha=-lr) if step == 1 else p.add_(g, alpha=-lr)
        return out
    beta1, beta2 = ADAM_BETAS
    m_all, v_all = state.setdefault("exp_avg", {}), state.setdefault("exp_avg_sq", {})
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    for name, p in params.items():
        g = grads[name]
        if step == 1:
            m_all[name], v_all[name] = torch.zeros_like(g), torch.zeros_like(g)
        m, v = m_all[name][: p.shape[0]], v_all[name][: p.shape[0]]
        if wd != 0:
            g = g.add(p, alpha=wd)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(ADAM_EPS)
        out[name] = (torch.addcdiv(p, m, denom, value=-step_size) if step == 1
                     else p.addcdiv_(m, denom, value=-step_size))
    return out
