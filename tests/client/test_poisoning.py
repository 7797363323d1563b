"""Client-side poisoning: label maps, trigger stamping, DBA parts, exact poisoned counts."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch
from torch import Tensor

from aggregation.registry import make_generator
from client import poisoning as P
from client.poisoning import Trigger

# --------------------------------------------------------------------------- label flipping


def test_reverse_and_all_to_one() -> None:
    y = torch.tensor([0, 1, 2, 3, 4, 4, 0], dtype=torch.int64)
    before = y.clone()
    torch.testing.assert_close(P.label_flip(y, 5), 4 - y)
    torch.testing.assert_close(P.label_flip(y, 5, mode="all_to_one", target=3),
                               torch.full_like(y, 3))
    assert torch.equal(y, before)


def test_label_flip_keeps_dtype_and_device() -> None:
    y = torch.tensor([0, 1, 1], dtype=torch.int32)
    out = P.label_flip(y, 2)
    assert out.dtype == torch.int32 and out.device == y.device
    assert out.tolist() == [1, 0, 0]


@pytest.mark.parametrize("num_classes", [2, 3, 10])
def test_random_map_is_a_seeded_derangement(num_classes: int) -> None:
    y = torch.arange(num_classes).repeat(7)
    for seed in range(20):
        pi = P.label_flip_map(num_classes, mode="random", generator=make_generator(seed))
        assert sorted(pi.tolist()) == list(range(num_classes))  # a permutation
        assert all(pi[i] != i for i in range(num_classes))  # no fixed point
        out = P.label_flip(y, num_classes, mode="random", generator=make_generator(seed))
        torch.testing.assert_close(out, pi[y])
        assert bool((out != y).all())
        # class counts are permuted, not changed
        assert Counter(out.tolist()) == Counter(y.tolist())
    a = P.label_flip_map(10, mode="random", generator=make_generator(1))
    b = P.label_flip_map(10, mode="random", generator=make_generator(1))
    c = P.label_flip_map(10, mode="random", generator=make_generator(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_derangement_is_uniform() -> None:
    # L = 3 has exactly two derangements, (1, 2, 0) and (2, 0, 1)
    counts = Counter(
        tuple(P.label_flip_map(3, mode="random", generator=make_generator(s)).tolist())
        for s in range(400)
    )
    assert set(counts) == {(1, 2, 0), (2, 0, 1)}
    assert abs(counts[(1, 2, 0)] - 200) < 4 * 10  # 4 binomial standard deviations


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        ((torch.tensor([0, 5]), 5), {}, ValueError, r"\[0, 5\)"),
        ((torch.tensor([-1, 0]), 5), {}, ValueError, r"\[0, 5\)"),
        ((torch.tensor([0.0, 1.0]), 5), {}, ValueError, "integer"),
        ((torch.tensor([[0, 1]]), 5), {}, ValueError, "1-D"),
        ((torch.tensor([0, 1]), 1), {}, ValueError, ">= 2"),
        ((torch.tensor([0, 1]), 5), {"mode": "all_to_one", "target": 5}, ValueError, "target"),
        ((torch.tensor([0, 1]), 5), {"mode": "random"}, ValueError, "generator"),
        ((torch.tensor([0, 1]), 5), {"mode": "shuffle"}, ValueError, "unknown mode"),
    ],
)
def test_label_flip_errors(args: tuple[Any, ...], kwargs: dict[str, Any],
                           exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        P.label_flip(*args, **kwargs)


# --------------------------------------------------------------------------- triggers


def images(b: int = 4, c: int = 3, h: int = 6, w: int = 7, seed: int = 0) -> Tensor:
    # values in [0, 0.5) so stamping 1.0 changes every stamped pixel
    return 0.5 * torch.rand(b, c, h, w, generator=make_generator(seed))


@pytest.mark.parametrize(
    ("corner", "expected"),
    [
        ("top_left", {(1, 1), (1, 2), (2, 1), (2, 2)}),
        ("top_right", {(1, 4), (1, 5), (2, 4), (2, 5)}),
        ("bottom_left", {(3, 1), (3, 2), (4, 1), (4, 2)}),
        ("bottom_right", {(3, 4), (3, 5), (4, 4), (4, 5)}),
    ],
)
def test_trigger_positions_by_corner(corner: Any, expected: set[tuple[int, int]]) -> None:
    t = Trigger.square(2, corner=corner, margin=1, value=1.0)
    mask = t.mask(6, 7)
    assert {(int(r), int(c)) for r, c in mask.nonzero().tolist()} == expected


def test_stamping_changes_exactly_the_pattern_pixels() -> None:
    x = images()
    before = x.clone()
    for t in (Trigger.square(3, value=1.0), Trigger.checker(3, value=1.0)):
        out = t.apply(x)
        assert torch.equal(x, before)  # input untouched
        changed = out != x  # (B, C, H, W)
        expected = t.mask(6, 7).expand_as(changed)
        assert torch.equal(changed, expected)
        assert bool((out[changed] == 1.0).all())
    assert int(Trigger.checker(3).mask(6, 7).sum()) == 5  # ceil(9 / 2)


def test_trigger_value_none_uses_the_input_max_and_channels_subset() -> None:
    x = images()
    t = Trigger.square(2, corner="top_left", margin=0, channels=(1,))
    out = t.apply(x)
    changed = out != x
    assert bool(changed[:, 1, :2, :2].all())
    assert int(changed.sum()) == 4 * 4  # 4 pixels in channel 1, for 4 images
    assert bool((out[changed] == x.max()).all())


def test_trigger_flat_and_three_d_inputs_match_four_d() -> None:
    x = images(c=1)
    t = Trigger.square(2, value=1.0)
    four = t.apply(x)
    flat = t.apply(x.reshape(4, -1), image_shape=(1, 6, 7))
    torch.testing.assert_close(flat, four.reshape(4, -1))
    torch.testing.assert_close(t.apply(x.reshape(4, -1), image_shape=(6, 7)), flat)
    torch.testing.assert_close(t.apply(x[:, 0]), four[:, 0])


def test_trigger_errors() -> None:
    with pytest.raises(ValueError, match="smaller trigger"):
        Trigger.square(6, margin=1).apply(images())
    with pytest.raises(ValueError, match="image_shape"):
        Trigger.square(2).apply(torch.zeros(2, 42))
    with pytest.raises(ValueError, match="does not match"):
        Trigger.square(2).apply(torch.zeros(2, 42), image_shape=(1, 6, 6))
    with pytest.raises(ValueError, match="channels"):
        Trigger((((0, 0),)), channels=(3,)).apply(images(c=3))
    with pytest.raises(ValueError, match="duplicates"):
        Trigger(((0, 0), (0, 0)))
    with pytest.raises(ValueError, match="non-empty"):
        Trigger(())
    with pytest.raises(ValueError, match="corner"):
        Trigger(((0, 0),), corner="middle")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- DBA


@pytest.mark.parametrize(("size", "parts"), [(4, 4), (3, 4), (4, 3), (2, 1), (5, 25)])
def test_split_parts_are_disjoint_and_cover_the_global_trigger(size: int, parts: int) -> None:
    glob = Trigger.square(size, value=1.0)
    pieces = P.split_trigger(glob, parts)
    assert len(pieces) == parts
    masks = torch.stack([p.mask(9, 9) for p in pieces])
    assert torch.equal(masks.any(dim=0), glob.mask(9, 9))  # union == global
    assert int(masks.sum()) == size * size  # pairwise disjoint
    sizes = [len(p.pixels) for p in pieces]
    assert max(sizes) - min(sizes) <= 1


def test_dba_four_parts_are_rows_and_attackers_cycle() -> None:
    glob = Trigger.square(4, value=1.0)
    local = P.distributed_triggers(glob, 6, num_parts=4)
    assert len(local) == 6
    for i, t in enumerate(local):
        assert t == local[i % 4]
        assert {r for r, _ in t.pixels} == {i % 4}  # part k is row k from the corner
    union = torch.stack([t.mask(8, 8) for t in local]).any(dim=0)
    assert torch.equal(union, glob.mask(8, 8))
    with pytest.raises(ValueError, match="cannot split"):
        P.split_trigger(Trigger.square(2), 5)


# --------------------------------------------------------------------------- backdoor


@pytest.mark.parametrize(("n", "fraction"), [(10, 0.25), (10, 0.35), (7, 0.5), (100, 0.1),
                                             (5, 0.0), (5, 1.0), (3, 0.5)])
def test_backdoor_poisons_an_exact_count(n: int, fraction: float) -> None:
    x = images(b=n, c=1)
    y = torch.arange(n) % 3
    t = Trigger.square(2, value=1.0)
    x2, y2, idx = P.backdoor_poison(x, y, trigger=t, target=2, fraction=fraction,
                                    generator=make_generator(0))
    k = math.floor(fraction * n + 0.5)
    assert idx.numel() == k and idx.dtype == torch.int64
    assert idx.tolist() == sorted(set(idx.tolist()))
    rest = torch.ones(n, dtype=torch.bool)
    rest[idx] = False
    assert bool((y2[idx] == 2).all())
    assert torch.equal(y2[rest], y[rest]) and torch.equal(x2[rest], x[rest])
    torch.testing.assert_close(x2[idx], t.apply(x[idx]))
    assert torch.equal(y, torch.arange(n) % 3)  # inputs untouched


def test_backdoor_is_seeded_and_uniform() -> None:
    x, y = images(b=10, c=1), torch.zeros(10, dtype=torch.int64)
    t = Trigger.square(2, value=1.0)

    def pick(seed: int) -> list[int]:
        return P.backdoor_poison(x, y, trigger=t, target=1, fraction=0.3,
                                 generator=make_generator(seed))[2].tolist()

    assert pick(1) == pick(1)
    hits = Counter(i for s in range(500) for i in pick(s))
    # each index is chosen with probability 0.3: 150 of 500, std ~10.2
    assert all(abs(hits[i] - 150) < 45 for i in range(10))


def test_backdoor_exclude_target() -> None:
    x = images(b=10, c=1)
    y = torch.tensor([1, 1, 1, 1, 1, 0, 2, 0, 2, 0])
    for seed in range(10):
        _, _, idx = P.backdoor_poison(x, y, trigger=Trigger.square(2), target=1,
                                      fraction=0.5, generator=make_generator(seed),
                                      exclude_target=True)
        assert idx.numel() == 5 and bool((y[idx] != 1).all())
    with pytest.raises(ValueError, match="only 5 have a label != target"):
        P.backdoor_poison(x, y, trigger=Trigger.square(2), target=1, fraction=0.6,
                          generator=make_generator(0), exclude_target=True)


def test_backdoor_value_none_uses_the_whole_x_max() -> None:
    x = images(b=6, c=1)
    x[0, 0, 0, 0] = 3.0
    y = torch.zeros(6, dtype=torch.int64)
    x2, _, idx = P.backdoor_poison(x, y, trigger=Trigger.square(2), target=1, fraction=0.5,
                                   generator=make_generator(0))
    stamped = Trigger.square(2).mask(6, 7)
    assert bool((x2[idx][:, 0][:, stamped] == 3.0).all())


@pytest.mark.parametrize("fraction", [-0.1, 1.5, math.nan])
def test_backdoor_fraction_range(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        P.backdoor_poison(images(), torch.zeros(4, dtype=torch.int64),
                          trigger=Trigger.square(2), target=0, fraction=fraction,
                          generator=make_generator(0))


# --------------------------------------------------------------------------- own update


def test_boost_and_inflate() -> None:
    d = torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(P.boost_update(d, 10.0), 10.0 * d)
    assert P.inflate_examples(120, 10.0) == 1200
    assert P.inflate_examples(3, 1.5) == 5  # 4.5 rounds half up
    assert P.inflate_examples(7, 1.0) == 7
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="factor"):
            P.boost_update(d, bad)
    with pytest.raises(ValueError, match=">= 1"):
        P.inflate_examples(10, 0.5)
    with pytest.raises(ValueError, match="true_count"):
        P.inflate_examples(0, 2.0)
    with pytest.raises(ValueError, match="NaN"):
        P.boost_update(torch.tensor([math.nan]), 2.0)


def test_update_poisoning_registry() -> None:
    assert P.update_poisoning_names() == ["gaussian", "sign_flip"]
    with pytest.raises(KeyError, match="did you mean 'sign_flip'"):
        P.get_update_poisoning("sign_flp")
    with pytest.raises(TypeError, match="valid parameters: norm, std"):
        P.get_update_poisoning("gaussian", sigma=1.0)
    with pytest.raises(ValueError, match="not both"):
        P.get_update_poisoning("gaussian", norm=1.0, std=1.0)
    with pytest.raises(ValueError, match="scale"):
        P.get_update_poisoning("sign_flip", scale=-1.0)


def test_sign_flip_update() -> None:
    d = torch.tensor([1.0, -2.0], dtype=torch.float64)
    out = P.get_update_poisoning("sign_flip")(d, generator=make_generator(0))
    torch.testing.assert_close(out, -10.0 * d)
    assert out.dtype == torch.float64


def test_gaussian_update_norms_and_determinism() -> None:
    d = torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=torch.float32)
    same_norm = P.get_update_poisoning("gaussian")
    v = same_norm(d, generator=make_generator(0))
    assert v.dtype == torch.float32 and v.shape == d.shape
    assert float(torch.linalg.vector_norm(v)) == pytest.approx(5.0, rel=1e-6)
    assert torch.equal(v, same_norm(d, generator=make_generator(0)))
    assert not torch.equal(v, same_norm(d, generator=make_generator(1)))
    fixed = P.get_update_poisoning("gaussian", norm=2.5)(d, generator=make_generator(0))
    assert float(torch.linalg.vector_norm(fixed)) == pytest.approx(2.5, rel=1e-6)
    # same direction for the same seed, whatever the norm
    torch.testing.assert_close(fixed / 2.5, v / 5.0)


def test_gaussian_update_statistics() -> None:
    d = torch.zeros(20000)
    noise = P.get_update_poisoning("gaussian", std=0.3)(d, generator=make_generator(2))
    assert abs(float(noise.mean())) < 5 * 0.3 / math.sqrt(20000)
    assert abs(float(noise.std()) - 0.3) < 0.01
    # random directions are isotropic: the mean of 400 unit directions is near 0
    unit = P.get_update_poisoning("gaussian", norm=1.0)
    dirs = torch.stack([unit(torch.ones(5), generator=make_generator(s)) for s in range(400)])
    assert float(torch.linalg.vector_norm(dirs.mean(dim=0))) < 5 / math.sqrt(400)


def test_update_poisoning_input_checks() -> None:
    poison = P.get_update_poisoning("sign_flip")
    with pytest.raises(ValueError, match=r"\(d,\)"):
        poison(torch.zeros(2, 3), generator=make_generator(0))
    with pytest.raises(ValueError, match="NaN"):
        poison(torch.tensor([math.inf]), generator=make_generator(0))
    with pytest.raises(TypeError, match="Generator"):
        poison(torch.zeros(3), generator=None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- model replacement


def test_model_replacement_replaces_the_fedavg_model() -> None:
    """[Bagdasaryan et al., 2020, Eq. 3]: with gamma = n / eta and honest updates that
    cancel out, FedAvg's new global model is the attacker's model X."""
    g = make_generator(0)
    n, eta = 10, 0.5
    global_model = torch.randn(6, generator=g, dtype=torch.float64)
    backdoored = torch.randn(6, generator=g, dtype=torch.float64)  # X
    honest = torch.randn(n - 1, 6, generator=g, dtype=torch.float64)
    honest -= honest.mean(dim=0)  # sum to zero: the model has converged
    sent = P.model_replacement(backdoored - global_model, scale=n / eta)
    new_global = global_model + eta / n * (honest.sum(dim=0) + sent)
    torch.testing.assert_close(new_global, backdoored, rtol=1e-12, atol=1e-12)
    # unconstrained, it is the backdoor attack's boost with boost = n / eta
    assert torch.equal(sent, P.boost_update(backdoored - global_model, n / eta))


@pytest.mark.parametrize("bound", [0.5, 3.0, 1e3])
def test_model_replacement_scales_up_to_the_norm_bound_and_no_further(bound: float) -> None:
    import aggregation

    u = torch.tensor([0.3, -0.4, 1.2], dtype=torch.float64)  # norm 1.3
    sent = P.model_replacement(u, scale=20.0, max_norm=bound)
    expected = min(20.0, bound / 1.3)
    torch.testing.assert_close(sent, expected * u, rtol=1e-12, atol=0.0)
    assert float(torch.linalg.vector_norm(sent)) <= bound * (1 + 1e-12)
    # the server's norm clipping at the same bound leaves it as sent
    clipped = aggregation.get_pre("norm_clip", max_norm=bound)(sent[None]).updates[0]
    torch.testing.assert_close(clipped, sent, rtol=1e-12, atol=1e-12)


def test_model_replacement_checks_its_inputs() -> None:
    u = torch.ones(3)
    assert P.model_replacement(u, scale=4.0).dtype == torch.float32
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="scale"):
            P.model_replacement(u, scale=bad)
    with pytest.raises(ValueError, match="max_norm"):
        P.model_replacement(u, scale=4.0, max_norm=-1.0)
    with pytest.raises(ValueError, match="NaN"):
        P.model_replacement(torch.tensor([math.nan]), scale=4.0)


# --------------------------------------------------------------------------- Neurotoxin


@pytest.mark.parametrize(("d", "top_k", "excluded"), [(10, 0.05, 1), (10, 0.1, 1),
                                                      (10, 0.25, 3), (200, 0.05, 10),
                                                      (7, 0.0, 0)])
def test_neurotoxin_mask_excludes_the_top_k_benign_coordinates(d: int, top_k: float,
                                                               excluded: int) -> None:
    benign = torch.randn(d, generator=make_generator(d), dtype=torch.float64)
    mask = P.neurotoxin_mask(benign, top_k=top_k)
    assert mask.dtype == torch.bool and int((~mask).sum()) == excluded == math.ceil(top_k * d)
    if excluded:  # every excluded |b_j| is at least every kept one
        assert float(benign.abs()[~mask].min()) >= float(benign.abs()[mask].max())


def test_neurotoxin_mask_breaks_ties_by_index() -> None:
    mask = P.neurotoxin_mask(torch.tensor([1.0, -2.0, 2.0, 2.0, 0.0]), top_k=0.4)
    assert mask.tolist() == [True, False, False, True, True]


def test_neurotoxin_projects_off_the_coordinates_benign_clients_use_most() -> None:
    g = make_generator(1)
    d = 500
    benign = torch.randn(d, generator=g, dtype=torch.float64)
    update = torch.randn(d, generator=g, dtype=torch.float64)
    sent = P.neurotoxin(update, benign, top_k=0.1)
    mask = P.neurotoxin_mask(benign, top_k=0.1)
    assert torch.equal(sent[mask], update[mask])
    assert bool((sent[~mask] == 0).all())
    # durability: benign rounds that rewrite the coordinates they use (here: reset them)
    # erase the plain backdoor's part there, and nothing of Neurotoxin's
    def benign_rounds(w: Tensor) -> Tensor:
        return torch.where(mask, w, torch.zeros_like(w))

    assert torch.equal(benign_rounds(sent), sent)
    lost = torch.linalg.vector_norm(update - benign_rounds(update))
    assert float(lost) > 0.2 * float(torch.linalg.vector_norm(update))


def test_neurotoxin_without_history_sends_the_update_and_keeps_dtype() -> None:
    update = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float32)
    sent = P.neurotoxin(update, None)
    assert torch.equal(sent, update) and sent is not update
    out = P.neurotoxin(update, torch.tensor([0.0, 9.0, 0.0], dtype=torch.float64), top_k=0.3)
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 0.0, 3.0]


def test_neurotoxin_checks_its_inputs() -> None:
    u = torch.ones(4)
    with pytest.raises(ValueError, match=r"update's shape \(4,\), got \(3,\)"):
        P.neurotoxin(u, torch.ones(3))
    for bad in (1.0, -0.1, math.nan, True):
        with pytest.raises(ValueError, match="top_k must be a fraction"):
            P.neurotoxin(u, torch.ones(4), top_k=bad)
    with pytest.raises(ValueError, match="NaN"):
        P.neurotoxin(u, torch.tensor([1.0, math.nan, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"\(d,\)"):
        P.neurotoxin(torch.ones(2, 2), torch.ones(2, 2))


# --------------------------------------------------------------------------- the backdoor family


def test_backdoor_family_params_and_defaults() -> None:
    assert P.DATA_ATTACKS.build("neurotoxin").params == {
        "target": 0, "fraction": 0.5, "size": 2, "pattern": "square", "boost": 1.0,
        "max_norm": None, "top_k": 0.05}
    assert P.DATA_ATTACKS.build("backdoor", boost=10.0, max_norm=2.0).params == {
        "target": 0, "fraction": 0.5, "size": 2, "pattern": "square", "boost": 10.0,
        "max_norm": 2.0}
    assert P.DATA_ATTACKS.build("dba", max_norm=1.5).params["max_norm"] == 1.5


@pytest.mark.parametrize("name", ["backdoor", "dba", "neurotoxin"])
@pytest.mark.parametrize(("params", "error", "match"), [
    ({"boost": 0.0}, ValueError, "boost must be finite and > 0, got 0.0"),
    ({"boost": -10.0}, ValueError, "boost must be finite and > 0"),
    ({"boost": math.inf}, ValueError, "boost must be finite"),
    ({"boost": "10"}, TypeError, "boost must be a number"),
    ({"max_norm": 0.0}, ValueError, "max_norm must be finite and > 0"),
    ({"max_norm": math.nan}, ValueError, "max_norm must be finite"),
])
def test_backdoor_family_refuses_bad_params(name: str, params: dict[str, Any],
                                            error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=f"^{name}: {match}"):
        P.DATA_ATTACKS.build(name, **params)


@pytest.mark.parametrize("top_k", [1.0, -0.1, math.nan, True])
def test_neurotoxin_refuses_a_bad_top_k_and_only_it_takes_one(top_k: float) -> None:
    with pytest.raises(ValueError, match=r"^neurotoxin: top_k must be a fraction in \[0, 1\)"):
        P.DATA_ATTACKS.build("neurotoxin", top_k=top_k)
    with pytest.raises(TypeError, match="top_k"):
        P.DATA_ATTACKS.build("backdoor", top_k=0.1)


def _role(attack: str, start_round: int = 1, **params: Any) -> Any:
    from client.malicious import MaliciousRole

    return MaliciousRole(attack, params, start_round)


def test_finish_backdoor_update_with_defaults_is_the_update_times_one() -> None:
    from client.malicious import finish_backdoor_update

    u = torch.randn(50, generator=make_generator(3))
    for attack in ("backdoor", "dba"):
        sent = finish_backdoor_update(_role(attack), u, 1, benign=None)
        assert torch.equal(sent, u * 1.0) and sent.dtype == u.dtype
        boosted = finish_backdoor_update(_role(attack, boost=7), u, 1, benign=None)
        assert torch.equal(boosted, u * 7.0)
    for role, rnd in ((_role("label_flip"), 1), (_role("backdoor", 3, boost=7.0), 2)):
        assert finish_backdoor_update(role, u, rnd, benign=None) is u  # not a backdoor / not yet


def test_finish_backdoor_update_constrain_and_scale_norm() -> None:
    from client.malicious import finish_backdoor_update

    u = torch.randn(200, generator=make_generator(4), dtype=torch.float64)
    norm = float(torch.linalg.vector_norm(u))
    # boosted norm 10 |u| > bound: scaled to the bound exactly
    sent = finish_backdoor_update(_role("backdoor", boost=10.0, max_norm=3 * norm), u, 1,
                                  benign=None)
    assert float(torch.linalg.vector_norm(sent)) == pytest.approx(3 * norm, rel=1e-12)
    torch.testing.assert_close(sent, 3.0 * u, rtol=1e-12, atol=0.0)
    # bound above the boosted norm: the plain boost
    loose = finish_backdoor_update(_role("backdoor", boost=10.0, max_norm=11 * norm), u, 1,
                                   benign=None)
    assert torch.equal(loose, u * 10.0)


def test_finish_backdoor_update_neurotoxin_projects_then_boosts(
        caplog: pytest.LogCaptureFixture) -> None:
    from client.malicious import finish_backdoor_update

    g = make_generator(5)
    u = torch.randn(40, generator=g)
    benign = torch.randn(40, generator=g)
    role = _role("neurotoxin", boost=4.0, top_k=0.1)
    sent = finish_backdoor_update(role, u, 2, benign=benign)
    top = torch.argsort(benign.abs(), descending=True)[:4]  # ceil(0.1 * 40)
    keep = torch.ones(40, dtype=torch.bool)
    keep[top] = False
    assert bool((sent[top] == 0).all())
    assert torch.equal(sent[keep], u[keep] * 4.0)
    with caplog.at_level("INFO", logger="fedshield.client"):
        first = finish_backdoor_update(role, u, 1, benign=None)
    assert torch.equal(first, u * 4.0)
    assert "neurotoxin has no earlier global model" in caplog.text
    with pytest.raises(ValueError, match="update's shape"):
        finish_backdoor_update(role, u, 2, benign=benign[:5])
