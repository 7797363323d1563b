"""Functional local training (client/functional.py) against ``local_train``, the reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from client.functional import (
    client_batches,
    cross_entropy_loss,
    local_train_stacked,
    make_schedule,
    stack_parameters,
    unsupported_features,
)
from client.train import TrainSettings, local_train
from simulations.models import build_model

CPU = torch.device("cpu")
SHAPE = (1, 8, 8)


def _model(name: str) -> nn.Module:
    return build_model(name, SHAPE, 10, generator=torch.Generator().manual_seed(1))


def _data(sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.rand(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g))
            for n in sizes]


def _gens(k: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + i) for i in range(k)]


SETTINGS = {
    "sgd": TrainSettings(epochs=1, batch_size=8, lr=0.1),
    "sgd-momentum-wd": TrainSettings(epochs=2, batch_size=8, lr=0.1, momentum=0.9,
                                     weight_decay=1e-3),
    "adam-wd": TrainSettings(epochs=2, batch_size=8, lr=0.01, optimizer="adam",
                             weight_decay=1e-3),
    "three-epochs-batch-5": TrainSettings(epochs=3, batch_size=5, lr=0.05),
}


def _views(model: nn.Module, k: int) -> dict[str, torch.Tensor]:
    """``model`` expanded K times (stride 0, no copies), as the batched engine starts."""
    return {n: p.detach().unsqueeze(0).expand(k, *p.shape) for n, p in model.named_parameters()}


@pytest.mark.parametrize("start", ["copies", "views"])
@pytest.mark.parametrize("model_name", ["mlp", "cnn", "logreg"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_k_clients_train_as_k_runs_of_local_train(
        model_name: str, setting: str, start: str) -> None:
    """Unequal sizes (one client a single example, one smaller than a batch) train as
    separate ``local_train`` runs do: parameters and train loss within float tolerance;
    from K copies, and from one model expanded K times (the first step then runs on
    unbatched parameters)."""
    st = SETTINGS[setting]
    sizes = [20, 7, 33, 1, 16]
    data = _data(sizes)
    model = _model(model_name)
    begin = (stack_parameters(model, len(sizes)) if start == "copies"
             else _views(model, len(sizes)))
    params, loss = local_train_stacked(model, begin, data, st, generators=_gens(len(sizes)))
    for i, ((x, y), gen) in enumerate(zip(data, _gens(len(sizes)), strict=True)):
        ref = _model(model_name)
        before = {k: v.detach().clone() for k, v in ref.named_parameters()}
        out = local_train(ref, x, y, st, device=CPU, generator=gen)
        for k, v in ref.named_parameters():
            step = (v.detach() - before[k]).norm()
            # measured: 4e-8 absolute (SGD), 4e-5 (Adam on the CNN, which amplifies ulps)
            assert float((params[k][i] - v.detach()).norm()) <= 1e-4 * float(step) + 1e-6, (i, k)
        assert float(loss[i]) == pytest.approx(out["train-loss"], rel=1e-5)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("n", [16, 13, 1])
def test_one_client_is_bit_identical_to_local_train(setting: str, n: int) -> None:
    """K = 1 (no padding) runs the same float operations as ``local_train`` on the CPU."""
    st = SETTINGS[setting]
    ((x, y),) = _data([n])
    model = _model("mlp")
    params, _ = local_train_stacked(model, stack_parameters(model, 1), [(x, y)], st,
                                    generators=_gens(1))
    ref = _model("mlp")
    local_train(ref, x, y, st, device=CPU, generator=_gens(1)[0])
    for k, v in ref.named_parameters():
        assert torch.equal(params[k][0], v.detach()), k


def test_a_client_trains_the_same_whoever_shares_its_batch() -> None:
    st = SETTINGS["sgd-momentum-wd"]
    data = _data([30, 3, 11])
    model = _model("mlp")
    together, _ = local_train_stacked(model, stack_parameters(model, 3), data, st,
                                      generators=_gens(3))
    alone, _ = local_train_stacked(model, stack_parameters(model, 1), data[1:2], st,
                                   generators=_gens(2)[1:])
    for k in together:
        torch.testing.assert_close(together[k][1], alone[k][0], rtol=1e-5, atol=1e-7)


def test_different_starting_parameters_per_client_are_kept_apart() -> None:
    model = _model("logreg")
    params = stack_parameters(model, 2)
    params = {k: v.clone() for k, v in params.items()}
    params["1.bias"][1] += 1.0  # client 1 starts elsewhere
    before = {k: v.clone() for k, v in params.items()}
    st = TrainSettings(epochs=1, batch_size=4, lr=0.1)
    data = _data([8, 8])
    out, _ = local_train_stacked(model, params, data, st, generators=_gens(2))
    ref = _model("logreg")
    bias = ref.get_parameter("1.bias")
    with torch.no_grad():
        bias.add_(1.0)
    local_train(ref, *data[1], st, device=CPU, generator=_gens(2)[1])
    torch.testing.assert_close(out["1.bias"][1], bias.detach(), rtol=1e-5, atol=1e-7)
    assert all(torch.equal(params[k], before[k]) for k in params)  # inputs untouched


def test_client_batches_draws_what_local_train_draws() -> None:
    st = TrainSettings(epochs=3, batch_size=4)
    ((x, y),) = _data([10])
    g_ref, g = _gens(1)[0], _gens(1)[0]
    local_train(_model("logreg"), x, y, st, device=CPU, generator=g_ref)
    out = client_batches(10, st, generator=g)
    assert [len(b) for b in out] == [4, 4, 2] * 3
    for e in range(3):  # each epoch is a permutation of the client's rows
        assert sorted(torch.cat(out[3 * e: 3 * e + 3]).tolist()) == list(range(10))
    assert torch.equal(g.get_state(), g_ref.get_state())  # the generator ends where it did


def test_the_schedule_uses_the_batches_client_batches_draws() -> None:
    """make_schedule draws its rows as lists (faster); they are client_batches' rows."""
    st = TrainSettings(epochs=2, batch_size=4)
    sizes = [3, 9, 5]
    plan = make_schedule(sizes, st, _gens(3))
    offsets = [0, 3, 12]
    want = {k: [(b + offsets[k]).tolist() for b in client_batches(n, st, generator=g)]
            for k, (n, g) in enumerate(zip(sizes, _gens(3), strict=True))}
    got: dict[int, list[list[int]]] = {k: [] for k in range(3)}
    for rows, w in zip(plan.rows, plan.weights, strict=True):
        for j, k in enumerate(plan.order[: rows.shape[0]].tolist()):
            got[k].append(rows[j][w[j] > 0].tolist())
    assert got == want


def test_schedule_steps_a_prefix_and_weighs_only_real_rows() -> None:
    st = TrainSettings(epochs=2, batch_size=4)
    sizes = [3, 9, 5]
    plan = make_schedule(sizes, st, _gens(3))
    assert plan.order.tolist() == [1, 2, 0]  # 6, 4 and 2 steps
    assert [r.shape[0] for r in plan.rows] == [3, 3, 2, 2, 1, 1]
    offsets = {0: (0, 3), 1: (3, 12), 2: (12, 17)}
    seen: dict[int, list[int]] = {k: [] for k in range(3)}
    for rows, w, counts in zip(plan.rows, plan.weights, plan.counts, strict=True):
        torch.testing.assert_close(w.sum(1), torch.ones(rows.shape[0]))
        assert torch.equal((w > 0).sum(1).double(), counts)
        for j, k in enumerate(plan.order[: rows.shape[0]].tolist()):
            real = rows[j][w[j] > 0]
            lo, hi = offsets[k]
            assert bool(((real >= lo) & (real < hi)).all())
            seen[k] += real.tolist()
    for k, (lo, hi) in offsets.items():  # every row twice (two epochs), no fake rows
        assert sorted(seen[k]) == sorted(list(range(lo, hi)) * 2)
    assert [t.tolist() for t in plan.last_epoch] == [
        [False, False, False], [False, False, True], [False, True], [True, True], [True],
        [True]]


def test_unsupported_features_are_named() -> None:
    assert unsupported_features(_model("mlp")) == []
    assert unsupported_features(build_model("mlp", SHAPE, 10, dropout=0.1)) == ["dropout"]
    assert unsupported_features(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64))) == ["buffers"]


def test_bad_inputs_are_refused() -> None:
    model = _model("logreg")
    st = TrainSettings()
    with pytest.raises(ValueError, match="expected"):
        local_train_stacked(model, stack_parameters(model, 2), _data([3]), st,
                            generators=_gens(1))
    with pytest.raises(ValueError, match="empty partition"):
        local_train_stacked(model, stack_parameters(model, 1),
                            [(torch.zeros(0, *SHAPE), torch.zeros(0, dtype=torch.int64))], st,
                            generators=_gens(1))
    with pytest.raises(ValueError, match="rows but y has"):
        local_train_stacked(model, stack_parameters(model, 1),
                            [(torch.zeros(3, *SHAPE), torch.zeros(2, dtype=torch.int64))], st,
                            generators=_gens(1))
    with pytest.raises(ValueError, match="k >= 1"):
        stack_parameters(model, 0)


@pytest.mark.parametrize("start", ["copies", "views"])
def test_pgd_adversarial_training_matches_local_train_with_the_pgd_loss(start: str) -> None:
    """From K copies, and from one model expanded K times (PGD's first-step input gradients
    then come from the unbatched model)."""
    from client.adversarial import pgd_adversarial_loss
    from client.functional import pgd_perturb

    st = SETTINGS["sgd-momentum-wd"]
    sizes = [12, 5, 9]
    data = _data(sizes)
    pgd_gens = [torch.Generator().manual_seed(7 + i) for i in range(3)]
    model = _model("mlp")
    begin = stack_parameters(model, 3) if start == "copies" else _views(model, 3)
    params, _ = local_train_stacked(model, begin, data, st, generators=_gens(3),
                                    perturb=pgd_perturb(0.1, 0.03, 3, pgd_gens))
    for i, ((x, y), gen) in enumerate(zip(data, _gens(3), strict=True)):
        g = torch.Generator().manual_seed(7 + i)
        ref = _model("mlp")

        def loss(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor,
                 g: torch.Generator = g) -> torch.Tensor:
            return pgd_adversarial_loss(m, xb, yb, eps=0.1, alpha=0.03, steps=3, generator=g)

        local_train(ref, x, y, st, device=CPU, generator=gen, loss_fn=loss)
        for k, v in ref.named_parameters():
            torch.testing.assert_close(params[k][i], v.detach(), rtol=1e-5, atol=1e-6)


def test_pgd_from_one_expanded_model_takes_input_gradients_from_it_unbatched(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """PGD's inner steps on clients that start from one model (the first training step)
    evaluate the loss with that model's parameters unbatched; from K copies, batched."""
    from torch._C._functorch import get_unwrapped, is_batchedtensor

    import client.functional as cf

    seen: list[bool] = []
    call = cf.functional_call

    def recording(m: nn.Module, p: dict[str, torch.Tensor], args: object) -> torch.Tensor:
        seen.append(is_batchedtensor(get_unwrapped(next(iter(p.values())))))
        return call(m, p, args)  # type: ignore[arg-type]

    monkeypatch.setattr(cf, "functional_call", recording)
    model = _model("mlp")
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 4, *SHAPE, generator=g), torch.randint(0, 10, (3, 4), generator=g)
    w = torch.full((3, 4), 0.25)
    perturb = cf.pgd_perturb(0.1, 0.03, 2, [torch.Generator().manual_seed(i) for i in range(3)])
    from_views = perturb(model, _views(model, 3), x, y, w, [0, 1, 2])
    assert seen == [False, False]
    seen.clear()
    perturb = cf.pgd_perturb(0.1, 0.03, 2, [torch.Generator().manual_seed(i) for i in range(3)])
    from_copies = perturb(model, stack_parameters(model, 3), x, y, w, [0, 1, 2])
    assert seen == [True, True]
    # the same perturbation up to sign flips of near-zero input gradients (none here)
    torch.testing.assert_close(from_views, from_copies, rtol=0, atol=1e-6)


def test_pgd_perturb_refuses_inputs_outside_the_box() -> None:
    from client.functional import pgd_perturb

    model = _model("logreg")
    x, y = torch.full((4, *SHAPE), 2.0), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="outside the clamp box"):
        local_train_stacked(model, stack_parameters(model, 1), [(x, y)], TrainSettings(),
                            generators=_gens(1), perturb=pgd_perturb(0.1, 0.03, 2, _gens(1)))


@pytest.mark.parametrize("sizes", [[7, 3, 12], [9, 9, 9]])  # reordered / used as they are
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_one_expanded_model_takes_unbatched_parameters_at_the_first_step_only(
        model_name: str, setting: str, sizes: list[int]) -> None:
    """The batched engine starts all K clients from views of one model (stride 0, no
    copies): the first step's loss sees the one model's parameters (not batched), later
    steps each client's own; K copies are batched throughout. Both agree within float
    tolerance (the first step's products sum in another order)."""
    from torch._C._functorch import get_unwrapped, is_batchedtensor, is_functorch_wrapped_tensor

    seen: list[bool] = []

    def loss(m: nn.Module, p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             w: torch.Tensor) -> torch.Tensor:  # the parameter under grad's wrapper: vmapped?
        first = next(iter(p.values()))
        if is_functorch_wrapped_tensor(first):  # not the one plain probe of which to train
            seen.append(is_batchedtensor(get_unwrapped(first)))
        return cross_entropy_loss(m, p, x, y, w)

    model = _model(model_name)
    data = _data(sizes)
    st = SETTINGS[setting]
    copies, loss_c = local_train_stacked(model, stack_parameters(model, 3), data, st,
                                         generators=_gens(3), loss=loss)
    assert seen and all(seen)
    seen.clear()
    viewed, loss_v = local_train_stacked(model, _views(model, 3), data, st,
                                         generators=_gens(3), loss=loss)
    assert seen[0] is False and all(seen[1:]) and len(seen) > 1
    start = dict(model.named_parameters())
    for k in copies:  # as against local_train: Adam on the CNN amplifies ulps (1e-5 of a step)
        step = float((copies[k] - start[k].detach()).norm())
        assert float((viewed[k] - copies[k]).norm()) <= 1e-4 * step + 1e-6, k
    torch.testing.assert_close(loss_v, loss_c, rtol=1e-6, atol=0.0)


class _Partial(nn.Module):
    """A linear model with a parameter its forward pass does not use (a custom task's model
    may have one) and, with ``freeze``, a frozen feature layer (``requires_grad=False``)."""

    def __init__(self, freeze: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.feat = nn.Linear(64, 16)
        self.head = nn.Linear(16, 10)
        self.unused = nn.Parameter(torch.ones(3))
        self.feat.requires_grad_(not freeze)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.feat(x.flatten(1))))


PARTIAL_SETTINGS = {
    **SETTINGS,
    "sgd-momentum": TrainSettings(epochs=2, batch_size=4, lr=0.1, momentum=0.9),
    "sgd-wd": TrainSettings(epochs=2, batch_size=4, lr=0.1, weight_decay=0.05),
    "adam": TrainSettings(epochs=2, batch_size=4, lr=0.01, optimizer="adam"),
    "adam-wd-large": TrainSettings(epochs=2, batch_size=4, lr=0.01, optimizer="adam",
                                   weight_decay=0.05),
}


@pytest.mark.parametrize("start", ["copies", "views"])
@pytest.mark.parametrize("freeze", [False, True])
@pytest.mark.parametrize("setting", list(PARTIAL_SETTINGS))
def test_frozen_and_unused_parameters_are_not_stepped_as_in_local_train(
        setting: str, freeze: bool, start: str) -> None:
    """``torch.optim`` skips a parameter whose ``.grad`` is None (frozen, or unused by the
    loss): no weight decay, momentum or Adam step moves it. ``vmap`` returns zeros for
    such a parameter, which weight decay and Adam would move: the stacked training must
    skip it too, and train the rest as ``local_train`` does. From views, the first step's
    data-independent gradients used to come back expanded and broke momentum's in-place
    buffer."""
    data = _data([10, 4, 9])
    st = PARTIAL_SETTINGS[setting]
    model = _Partial(freeze)
    begin = stack_parameters(model, 3) if start == "copies" else _views(model, 3)
    params, _ = local_train_stacked(model, begin, data, st, generators=_gens(3))
    fixed = {"unused"} | ({"feat.weight", "feat.bias"} if freeze else set())
    for i, ((x, y), gen) in enumerate(zip(data, _gens(3), strict=True)):
        ref = _Partial(freeze)
        before = {k: v.detach().clone() for k, v in ref.named_parameters()}
        local_train(ref, x, y, st, device=CPU, generator=gen)
        for k, v in ref.named_parameters():
            if k in fixed:  # the reference does not move it: neither does the stacked run
                assert torch.equal(v.detach(), before[k]), (k, "local_train moved it")
                assert torch.equal(params[k][i], before[k]), (i, k)
                continue
            step = float((v.detach() - before[k]).norm())
            assert step > 0, k
            assert float((params[k][i] - v.detach()).norm()) <= 1e-4 * step + 1e-6, (i, k)


def test_a_model_with_nothing_to_train_is_refused() -> None:
    model = _Partial(freeze=True)
    model.head.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter to train"):
        local_train_stacked(model, stack_parameters(model, 2), _data([3, 4]), TrainSettings(),
                            generators=_gens(2))


DEVICES = ["cpu", pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("start", ["copies", "views"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_stacked_training_on_each_device_matches_local_train_there(
    device: str, model_name: str, start: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batched path on the accelerator (CUDA where the machine has one) trains as
    ``local_train`` on the same device; its results stay there, in the model's dtype.
    cuDNN's TF32 is off (its 10-bit products differ between convolution algorithms)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    dev = torch.device(device)
    st = SETTINGS["sgd-momentum-wd"]
    sizes = [9, 3, 17]
    data = _data(sizes)
    model = _model(model_name)
    begin = (stack_parameters(model, len(sizes), device=dev) if start == "copies" else
             _views(model.to(dev), len(sizes)))  # views: the first step unbatched, on dev
    params, loss = local_train_stacked(model, begin, data, st, generators=_gens(len(sizes)),
                                       device=dev)
    model.to("cpu")
    assert all(p.device.type == dev.type and p.dtype == torch.float32 for p in params.values())
    assert loss.device.type == dev.type and loss.shape == (len(sizes),)
    for i, ((x, y), gen) in enumerate(zip(data, _gens(len(sizes)), strict=True)):
        ref = _model(model_name)
        start = {k: v.detach().clone() for k, v in ref.named_parameters()}
        out = local_train(ref, x, y, st, device=dev, generator=gen)
        for k, v in ref.named_parameters():
            step = (v.detach().cpu() - start[k]).norm()
            got = params[k][i].cpu()
            # CUDA kernels sum in other orders than the CPU's; tolerance as on the CPU
            assert float((got - v.detach().cpu()).norm()) <= 1e-4 * float(step) + 1e-5, (i, k)
        assert float(loss[i]) == pytest.approx(out["train-loss"], rel=1e-4)
