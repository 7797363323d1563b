"""Gradient inversion on digits: the undefended leak, DP-SGD's cure, label recovery."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from simulations.audit.defenses import ClientStep, Observation, make_defense
from simulations.audit.inversion import evaluate_reconstruction, run_inversion_audit
from simulations.audit.inversion_attacks import (
    INVERSION_ATTACKS,
    Reconstruction,
    invert,
    recover_labels,
    total_variation,
)
from simulations.audit.inversion_report import GridBlock, markdown_table, save_grid
from simulations.datasets import Dataset, load_dataset
from simulations.models import build_model

ITERATIONS = 100  # L-BFGS iterations / Adam steps: enough for > 30 dB at B = 1 on digits


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def mlp(digits: Dataset) -> nn.Module:
    return build_model("mlp", digits.input_shape, digits.num_classes,
                       generator=torch.Generator().manual_seed(1)).eval()


def _victim(digits: Dataset, b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randperm(digits.num_train, generator=torch.Generator().manual_seed(seed))[:b]
    return digits.x_train[idx], digits.y_train[idx]


def _attack(name: str, model: nn.Module, digits: Dataset, b: int, seed: int,
            defense: str = "none", **params: float) -> dict[str, Any]:
    x, y = _victim(digits, b, seed)
    obs = make_defense(defense, **params)(ClientStep(model, x, y, lr=0.1),
                                          generator=torch.Generator().manual_seed(100 + seed))
    rec = invert(name, model, obs, input_shape=digits.input_shape,
                 num_classes=digits.num_classes, iterations=ITERATIONS,
                 generator=torch.Generator().manual_seed(seed))
    return evaluate_reconstruction(x, y, rec)


def test_attack_registry() -> None:
    assert INVERSION_ATTACKS.names() == ["cosine", "dlg", "idlg"]
    with pytest.raises(KeyError, match="did you mean 'idlg'"):
        INVERSION_ATTACKS.get("idgl")


@pytest.mark.parametrize("attack", ["dlg", "idlg", "cosine"])
def test_undefended_single_example_leaks_above_30_db(attack: str, mlp: nn.Module,
                                                     digits: Dataset) -> None:
    scores = _attack(attack, mlp, digits, 1, seed=0)
    assert scores["psnr"] > 30  # measured: dlg ~117 dB, idlg ~155 dB, cosine ~73 dB
    assert scores["ssim"] > 0.99
    assert scores["label_acc"] == 1.0


@pytest.mark.parametrize("attack", ["dlg", "idlg", "cosine"])
def test_dp_sgd_pushes_the_attack_to_noise_level(attack: str, mlp: nn.Module,
                                                 digits: Dataset) -> None:
    # z = 0.1, C = 1; noise level on digits: a random other digit scores ~8.6 dB, the
    # mean digit ~11.4 dB. Mean over three victims (seeded).
    values = [float(_attack(attack, mlp, digits, 1, seed=s, defense="dp_sgd",
                            noise_multiplier=0.1, max_grad_norm=1.0)["psnr"])
              for s in range(3)]
    assert sum(values) / 3 < 10.0
    assert max(values) < 12.0


@pytest.mark.parametrize("model_name", ["logreg", "mlp", "cnn"])
def test_idlg_recovers_the_label_exactly_for_one_example(model_name: str,
                                                         digits: Dataset) -> None:
    model = build_model(model_name, digits.input_shape, digits.num_classes,
                        generator=torch.Generator().manual_seed(2)).eval()
    idx = torch.randperm(digits.num_train, generator=torch.Generator().manual_seed(3))[:30]
    for i in idx.tolist():
        x, y = digits.x_train[i:i + 1], digits.y_train[i:i + 1]
        obs = make_defense("none")(ClientStep(model, x, y), generator=torch.Generator())
        assert recover_labels(model, obs, digits.num_classes).tolist() == y.tolist()


def test_label_recovery_for_batches_with_repeated_labels(mlp: nn.Module,
                                                         digits: Dataset) -> None:
    # at initialisation predictions are near uniform, so the count estimate
    # M/K - s_c / lambda recovers the multiset exactly on these seeded batches of 8
    # (with repeats)
    for seed in range(5):
        x, y = _victim(digits, 8, seed)
        obs = make_defense("none")(ClientStep(mlp, x, y), generator=torch.Generator())
        got = recover_labels(mlp, obs, digits.num_classes)
        assert got.tolist() == sorted(y.tolist())
        # an unknown rescaling (update clipping) is fitted away
        scaled = Observation(tuple(1e-3 * g for g in obs.gradient), 8, 8)
        assert recover_labels(mlp, scaled, digits.num_classes).tolist() == got.tolist()


def test_label_recovery_by_hand_from_a_bias_gradient() -> None:
    model = build_model("logreg", (2,), 4, generator=torch.Generator().manual_seed(0))
    # s = B * db = P - n with B = 3 and uniform P_c = 3/4: labels {1, 1, 3}
    s = torch.tensor([0.75, 0.75 - 2, 0.75, 0.75 - 1])
    obs = Observation((torch.zeros(4, 2), s / 3), 3, 3)  # weights unused by the bias path
    assert recover_labels(model, obs, 4).tolist() == [1, 1, 3]


def test_label_recovery_without_a_final_linear_layer_is_refused() -> None:
    model = build_model("logreg", (4,), 5, generator=torch.Generator().manual_seed(0))
    obs = Observation((torch.zeros(5, 4), torch.zeros(5)), 1, 1)
    with pytest.raises(ValueError, match="final nn.Linear layer with 10 outputs"):
        recover_labels(model, obs, 10)


def test_secure_aggregation_makes_the_attacker_explain_k_b_examples(
        mlp: nn.Module, digits: Dataset) -> None:
    x, y = _victim(digits, 1, 0)
    step = ClientStep(mlp, x, y, pool_x=digits.x_train, pool_y=digits.y_train)
    obs = make_defense("secagg_sum", k=3)(step, generator=torch.Generator().manual_seed(0))
    rec = invert("idlg", mlp, obs, input_shape=digits.input_shape, num_classes=10,
                 iterations=5, generator=torch.Generator().manual_seed(0))
    assert rec.x.shape == (3, 1, 8, 8) and rec.y.shape == (3,)
    assert float(rec.x.min()) >= 0 and float(rec.x.max()) <= 1


def test_evaluation_is_invariant_to_the_order_of_reconstructions(digits: Dataset) -> None:
    x, y = _victim(digits, 4, 7)
    noisy = (x.double() + 0.05 * torch.randn(x.shape, generator=torch.Generator()
                                             .manual_seed(0), dtype=torch.float64)).clamp(0, 1)
    a = evaluate_reconstruction(x, y, Reconstruction(noisy, y, 0.0))
    perm = torch.tensor([2, 0, 3, 1])
    b = evaluate_reconstruction(x, y, Reconstruction(noisy[perm], y[perm], 0.0))
    assert a["psnr"] == pytest.approx(b["psnr"]) and a["ssim"] == pytest.approx(b["ssim"])
    assert a["label_acc"] == b["label_acc"] == 1.0
    assert torch.equal(perm[b["assignment"]], torch.arange(4))


def test_observation_that_does_not_fit_the_model_is_refused(mlp: nn.Module) -> None:
    obs = Observation((torch.ones(3),), 1, 1)
    with pytest.raises(ValueError, match="does not fit the model"):
        invert("dlg", mlp, obs, input_shape=(1, 8, 8), num_classes=10, iterations=1,
               generator=torch.Generator())
    with pytest.raises(TypeError, match="tv_weight"):
        invert("idlg", mlp, obs, input_shape=(1, 8, 8), num_classes=10, iterations=1,
               generator=torch.Generator(), tv_weight=0.1)


def test_total_variation_by_hand() -> None:
    x = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    # vertical diffs |1-0|, |1-1| -> mean 0.5; horizontal |1-0|, |1-1| -> mean 0.5
    assert float(total_variation(x)) == pytest.approx(1.0)


def test_report_writes_a_grid_and_markdown_rows(tmp_path: Path) -> None:
    ones = torch.ones(2, 1, 8, 8)
    block = GridBlock("B=2", ones, (("none", 99.0, ones), ("dp_sgd(noise_multiplier=1.0)",
                                                             5.0, ones * 0.5)))
    save_grid(tmp_path / "g.png", "idlg", [block, GridBlock("B=1", ones[:1], ())])
    png = (tmp_path / "g.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    row = {"attack": "idlg", "defense": "none", "batch_size": 2, "psnr": 99.0, "ssim": 1.0,
           "label_acc": 1.0, "trials": 1}
    assert markdown_table([row]).splitlines()[2] == "| idlg | none | 2 | 99.00 | 1.000 | 1.00 |"


def test_run_inversion_audit_writes_what_it_returns(tmp_path: Path, digits: Dataset) -> None:
    rows = run_inversion_audit(
        "logreg", digits, attacks=["idlg"],
        defenses=[("none", {}), ("dp_sgd", {"noise_multiplier": 1.0, "max_grad_norm": 1.0})],
        batch_sizes=[1, 2], seed=0, iterations=40, out_dir=tmp_path)
    assert [(r["defense"], r["batch_size"]) for r in rows] == [
        ("none", 1), ("dp_sgd(max_grad_norm=1.0, noise_multiplier=1.0)", 1),
        ("none", 2), ("dp_sgd(max_grad_norm=1.0, noise_multiplier=1.0)", 2)]
    by = {(r["defense"].split("(")[0], r["batch_size"]): r for r in rows}
    assert by[("none", 1)]["psnr"] > 30 and by[("none", 1)]["label_acc"] == 1.0
    assert by[("dp_sgd", 1)]["psnr"] < 10
    with (tmp_path / "inversion.csv").open() as fh:
        read = list(csv.DictReader(fh))
    assert [float(r["psnr"]) for r in read] == pytest.approx([r["psnr"] for r in rows])
    assert [r["defense"] for r in read] == [r["defense"] for r in rows]
    md = (tmp_path / "inversion.md").read_text().splitlines()
    assert len(md) == 2 + len(rows) and md[0].startswith("| attack | defense | B |")
    png = (tmp_path / "inversion_idlg.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((tmp_path / "inversion_config.json").read_text())
    assert config["batch_sizes"] == [1, 2] and config["iterations"] == 40


def test_run_inversion_audit_is_reproducible(digits: Dataset) -> None:
    def run() -> list[dict[str, object]]:
        return run_inversion_audit(
            "logreg", digits, attacks=["cosine"],
            defenses=[("local_dp", {"clipping_norm": 0.1, "noise_std": 0.01})],
            batch_sizes=[1], seed=3, iterations=10)

    assert run() == run()


def test_run_inversion_audit_refuses_bad_arguments(digits: Dataset) -> None:
    with pytest.raises(ValueError, match="batch_sizes"):
        run_inversion_audit("logreg", digits, batch_sizes=[0])
    with pytest.raises(KeyError, match="unknown defense"):
        run_inversion_audit("logreg", digits, defenses=[("dpsgd", {})])
    with pytest.raises(ValueError, match="same defense twice"):
        run_inversion_audit("logreg", digits, defenses=[("pruning", {"fraction": 0.5})] * 2)
    with pytest.raises(ValueError, match="distinct"):
        run_inversion_audit("logreg", digits, batch_sizes=[1, 1])
    with pytest.raises(ValueError, match="attacks not run"):
        run_inversion_audit("logreg", digits, attacks=["dlg"],
                            attack_params={"cosine": {"tv_weight": 0.0}})
