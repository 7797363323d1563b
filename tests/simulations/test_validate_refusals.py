"""Settings that only the clients read are refused before round 1, with the clients' reason.

Without these checks each of these runs would start, every client would reply with an
error, and every round would be skipped as "only 0 valid replies": the reason only in the
rejection lines of the log. ``simulations.engine.validate`` makes the refusal up front, for
both engines (``run_in_process`` calls it).
"""

from __future__ import annotations

import pytest

from runconfig.config import RunConfig
from simulations.config import resolve_config
from simulations.engine import ENGINE_KEYS, validate

BASE = ["dataset=digits", "model=logreg", "num-server-rounds=1", "device=cpu"]


def _app(*overrides: str) -> dict[str, object]:
    flat = resolve_config(None, [*BASE, *overrides])
    return {k: v for k, v in flat.items() if k not in ENGINE_KEYS}

REFUSED = {
    "pgd-eps-negative": (["adversarial-training=eps=-0.1"], "eps must be a finite number >= 0"),
    "pgd-steps-0": (["adversarial-training=eps=0.1, steps=0"], "steps must be an int >= 1"),
    "pgd-alpha-0": (["adversarial-training=eps=0.1, alpha=0.0"], "alpha .* > 0"),
    "pgd-eps-0-default-alpha": (["adversarial-training=eps=0.0"], "alpha .* > 0"),
    "pgd-data-outside-the-box": (["dataset=synthetic", "adversarial-training=eps=0.1"],
                                 r"projects its inputs on \[0.0, 1.0\].*synthetic"),
    "dp-sgd-accountant": (["dp-sgd=noise_multiplier=1.0, accountant='foo'"],
                          "unknown accountant 'foo'"),
    "dp-sgd-max-grad-norm": (["dp-sgd=noise_multiplier=1.0, max_grad_norm=-1.0"],
                             "max_grad_norm must be a finite number > 0"),
    "dp-sgd-noise-0": (["dp-sgd=noise_multiplier=0.0"], "noise_multiplier must be"),
    "dp-sgd-delta": (["dp-sgd=noise_multiplier=1.0, delta=2.0"], "delta"),
    "label-flip-mode": (["num-malicious=1", "attack=label_flip", "attack-params=mode='bogus'"],
                        "label_flip.*fails when a client runs it.*unknown mode 'bogus'"),
    "backdoor-on-flat-inputs": (["num-malicious=1", "attack=backdoor", "dataset=synthetic"],
                                "backdoor.* stamps a trigger on images.*flat inputs.*use a dataset of"),
    "inflated-count-above-the-servers-cap": (
        ["num-malicious=1", "attack=inflate_examples", "attack-params=factor=1e12"],
        r"report \d+, above the 1099511627776 the server accepts"),
    "attack-start-round-0": (["num-malicious=1", "attack=sign_flip", "attack-start-round=0"],
                             "attack-start-round must be >= 1"),
    "empty-partitions": (["partitioner=dirichlet", "partitioner-params=alpha=0.01, min_size=0"],
                         r"partitions are empty .*min_size"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_setting_every_client_would_fail_on_is_refused_before_round_1(case: str) -> None:
    overrides, message = REFUSED[case]
    flat = _app(*overrides)
    with pytest.raises(ValueError, match=message):
        validate(flat, 16)


@pytest.mark.parametrize("overrides", [
    ["adversarial-training=eps=0.1, alpha=0.02, steps=2"],
    ["adversarial-training=eps=0.0, alpha=0.01"],
    ["dp-sgd=target_epsilon=3.0, max_epsilon=4.0, accountant='prv', delta=1e-6"],
    ["num-malicious=2", "attack=label_flip", "attack-params=mode='all_to_one', target=3"],
    ["num-malicious=2", "attack=backdoor", "attack-params=boost=5.0, max_norm=2.0"],
    ["num-malicious=2", "attack=neurotoxin", "attack-start-round=3"],
    ["num-malicious=2", "attack=inflate_examples", "attack-params=factor=10.0"],
    ["partitioner=dirichlet", "partitioner-params=alpha=0.3"],
], ids=["pgd", "pgd-eps-0", "dp-sgd", "label-flip", "backdoor", "neurotoxin", "inflate",
        "dirichlet"])
def test_good_settings_pass(overrides: list[str]) -> None:
    flat = _app(*overrides)
    assert isinstance(validate(flat, 16), RunConfig)
