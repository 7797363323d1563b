"""The batched engine mode answers a round's train messages as the ClientApp would.

For the same seeds, every client's reply from the batched computation equals the
ClientApp's (per-client path) within float tolerance, feature by feature; what is not
batched falls back to the ClientApp and the log says so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from flwr.app import Message

from client.app import app as client_app
from client.task import load_task
from runconfig.config import check_engine
from server.rounds import Payload, Reply, expand_replies
from simulations.config import resolve_config
from simulations.engine import ENGINE_KEYS, InProcessGrid, run_in_process, validate
from simulations.task import build_task

N = 6
BASE = ["dataset=digits", "seed=3", "device=cpu", "num-server-rounds=2"]


class _Failures(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "as one computation failed" in record.getMessage():
            self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def _batched_step_ran(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test here fails if the batched step itself failed: its clients then go to the
    ClientApp, and an equality test would compare the ClientApp with itself. A test that
    expects the failure asks for ``batched_failure_expected``."""
    failures = _Failures()
    logger = logging.getLogger("fedshield.engine")
    logger.addHandler(failures)
    try:
        yield
    finally:
        logger.removeHandler(failures)
    if "batched_failure_expected" not in request.fixturenames:
        assert not failures.messages, failures.messages


@pytest.fixture
def batched_failure_expected() -> bool:
    return True


def _config(*overrides: str) -> dict[str, Any]:
    cfg = resolve_config(None, [*BASE, f"num-clients={N}", *overrides])
    return {k: v for k, v in cfg.items() if k not in ENGINE_KEYS}


def _payload(state: dict[str, torch.Tensor], server_round: int) -> Payload:
    return Payload(arrays={"arrays": state}, configs={"config": {"server-round": server_round}})


def _round(cfg: dict[str, Any], *, batched: bool, server_round: int = 2) -> list[Reply]:
    """One round's train replies from all N nodes, in node order, through the transport
    ``run_server`` uses (batched: on tensors; per-client: Flower messages to the ClientApp)."""
    validate(cfg, N)
    model = build_task(cfg).build_model()
    grid = InProcessGrid(client_app, cfg, N, batched=batched)
    payload = _payload({k: v.detach() for k, v in model.state_dict().items()}, server_round)
    replies = expand_replies(grid.make_transport().send(
        "train", dict.fromkeys(grid.node_ids, payload), timeout=60.0))
    assert [r.node_id for r in replies] == grid.node_ids  # in the payloads' order
    return replies


def _updates(replies: list[Reply], cfg: dict[str, Any]) -> torch.Tensor:
    model = build_task(cfg).build_model()
    g = torch.cat([v.reshape(-1) for v in model.state_dict().values()])
    rows = []
    for r in replies:
        assert r.error is None, r.error
        state = r.arrays["arrays"]
        rows.append(torch.cat([v.reshape(-1) for v in state.values()]) - g)
    return torch.stack(rows)  # (n, d)


FEATURES = {
    "sgd": [],
    "sgd-momentum-weight-decay": ["momentum=0.9", "weight-decay=0.001"],
    "adam-weight-decay": ["optimizer=adam", "learning-rate=0.01", "weight-decay=0.001"],
    "epochs-and-batch": ["local-epochs=3", "batch-size=16"],
    "unequal-sizes": ["partitioner=dirichlet", "partitioner-params=alpha=0.3"],
    "cnn": ["model=cnn", "learning-rate=0.1"],
    "cnn-adam-unequal": ["model=cnn", "optimizer=adam", "learning-rate=0.01",
                         "partitioner=dirichlet", "partitioner-params=alpha=0.3"],
    "label-flip": ["num-malicious=2", "attack=label_flip"],
    "backdoor-boost": ["num-malicious=2", "attack=backdoor", "attack-params=boost=3.0"],
    "dba": ["num-malicious=2", "attack=dba"],
    "sign-flip": ["num-malicious=2", "attack=sign_flip", "attack-params=scale=2.0"],
    "gaussian": ["num-malicious=2", "attack=gaussian"],
    "inflate-examples": ["num-malicious=2", "attack=inflate_examples"],
    "attack-not-started": ["num-malicious=2", "attack=sign_flip", "attack-start-round=3"],
    "local-dp": ["local-dp=clipping_norm=0.5, noise_std=0.01"],
    "adversarial-training": ["adversarial-training=eps=0.1, alpha=0.03, steps=3"],
    "hashed-order": ["batch-order=hashed"],
    "hashed-order-adam-unequal": ["batch-order=hashed", "optimizer=adam", "learning-rate=0.01",
                                  "partitioner=dirichlet", "partitioner-params=alpha=0.3"],
    "hashed-order-backdoor-local-dp": ["batch-order=hashed", "num-malicious=2", "attack=backdoor",
                                       "local-dp=clipping_norm=0.5, noise_std=0.01"],
    "adversarial-training-cnn-unequal": [
        "adversarial-training=eps=0.1, steps=2", "model=cnn", "learning-rate=0.1",
        "partitioner=dirichlet", "partitioner-params=alpha=0.3"],
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_batched_replies_equal_the_client_apps(feature: str) -> None:
    cfg = _config(*FEATURES[feature])
    per_client = _round(cfg, batched=False)
    batched = _round(cfg, batched=True)
    u_p, u_b = _updates(per_client, cfg), _updates(batched, cfg)
    err = (u_b - u_p).norm(dim=1) / u_p.norm(dim=1)
    # measured (relative, worst client): 2e-7 for the MLP, 8e-7 CNN, 1.2e-5 CNN with Adam
    # (which divides by the square root of small moments; 3.7e-5 on Dirichlet(0.1)); with
    # PGD 3e-7, or up to 2e-3 here when a rounding difference flips the sign of a near-zero
    # input gradient (a whole alpha step on that pixel; other settings: up to 3.5e-2)
    assert float(err.max()) < (1e-2 if feature.startswith("adversarial") else 1e-4), err
    for p, b in zip(per_client, batched, strict=True):
        mp, mb = dict(p.metrics["metrics"]), dict(b.metrics["metrics"])
        assert list(mp) == list(mb)  # the same keys in the same order (the metrics file's)
        assert p.arrays.keys() == b.arrays.keys() == {"arrays"}
        assert p.metrics.keys() == b.metrics.keys() == {"metrics"}
        assert p.configs == b.configs == {}
        assert {k: (v.dtype, v.shape) for k, v in p.arrays["arrays"].items()} == \
            {k: (v.dtype, v.shape) for k, v in b.arrays["arrays"].items()}
        for k in ("num-examples", "partition-id", "num-partitions"):
            assert mp[k] == mb[k], k
        assert mb["train-loss"] == pytest.approx(mp["train-loss"], rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("feature", ["sgd-momentum-weight-decay", "cnn-adam-unequal",
                                     "sign-flip", "local-dp", "hashed-order"])
def test_batched_replies_equal_the_client_apps_on_cuda(
    feature: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both engines train on the GPU (``device=cuda``) and still agree; replies come back
    to the server on the CPU, as the ClientApp's do. cuDNN's TF32 is off here: its 10-bit
    products differ between any two convolution algorithms by about 1e-3."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cfg = {**_config(*FEATURES[feature]), "device": "cuda"}
    per_client = _round(cfg, batched=False)
    batched = _round(cfg, batched=True)
    for r in (*per_client, *batched):
        assert all(v.device.type == "cpu" for v in r.arrays["arrays"].values())
    u_p, u_b = _updates(per_client, cfg), _updates(batched, cfg)
    err = (u_b - u_p).norm(dim=1) / u_p.norm(dim=1)
    assert float(err.max()) < 1e-4, err


def test_the_batch_order_setting_changes_the_batches() -> None:
    """The hashed-order cases above compare engines under the hashed setting: both engines
    must actually use it (the updates differ from the generator's)."""
    cfg = _config()
    hashed = {**cfg, "batch-order": "hashed"}
    for batched in (False, True):
        u_g = _updates(_round(cfg, batched=batched), cfg)
        u_h = _updates(_round(hashed, batched=batched), hashed)
        assert not torch.allclose(u_g, u_h), batched


def test_the_sizes_differ_in_the_unequal_case() -> None:
    """The unequal-sizes cases above do exercise masked steps (different step counts)."""
    cfg = _config(*FEATURES["unequal-sizes"])
    task = build_task(cfg)
    sizes = [int(idx.numel()) for idx in task.partition_indices(N)]
    batch = int(cfg["batch-size"])
    assert len({-(-n // batch) for n in sizes}) > 1, sizes


FALLBACKS = {
    "dp-sgd": (["dp-sgd=noise_multiplier=0.5, max_grad_norm=1.0"], N, "dp-sgd"),
    "dropout": (["model-params=dropout=0.2"], N, "model with dropout"),
    "neurotoxin": (["num-malicious=2", "attack=neurotoxin"], 2, "attack 'neurotoxin'"),
}


@pytest.mark.parametrize("feature", list(FALLBACKS))
def test_what_is_not_batched_goes_to_the_client_app_and_is_logged(
    feature: str, caplog: pytest.LogCaptureFixture,
) -> None:
    overrides, count, name = FALLBACKS[feature]
    cfg = _config(*overrides)
    with caplog.at_level(logging.INFO, logger="fedshield.engine"):
        batched = _round(cfg, batched=True)
    lines = [r.getMessage() for r in caplog.records if "batched engine" in r.getMessage()]
    assert lines == [f"round 2: batched engine: {count} of {N} clients trained one by one by "
                     f"the ClientApp (not batched: {name}"
                     + (" (keeps state on its node))" if feature == "neurotoxin" else ")")]
    per_client = _round(cfg, batched=False)
    # the fallback is the ClientApp itself: its clients' replies are bit-identical
    u_p, u_b = _updates(per_client, cfg), _updates(batched, cfg)
    if feature == "neurotoxin":
        from client.malicious import malicious_partitions

        bad = sorted(malicious_partitions(N, 2, int(cfg["seed"])))
        assert torch.equal(u_b[bad], u_p[bad])
        err = (u_b - u_p).norm(dim=1) / u_p.norm(dim=1)
        assert float(err.max()) < 1e-3
    else:
        assert torch.equal(u_b, u_p)


CUSTOM = "task=tests.simulations.custom_tasks:"
CUSTOM_MODELS = {
    # torch.optim skips a parameter without .grad: no weight decay, momentum or Adam moves it
    "frozen-sgd-weight-decay-momentum": [CUSTOM + "frozen", "weight-decay=0.01", "momentum=0.9"],
    "frozen-adam": [CUSTOM + "frozen", "optimizer=adam", "learning-rate=0.01"],
    "unused-sgd-weight-decay": [CUSTOM + "unused", "weight-decay=0.01"],
    "unused-adam-weight-decay": [CUSTOM + "unused", "optimizer=adam", "learning-rate=0.01",
                                 "weight-decay=0.01"],
    # one tensor under two names: trained once, replied under both
    "tied": [CUSTOM + "tied"],
    "tied-adam-unequal": [CUSTOM + "tied", "optimizer=adam", "learning-rate=0.01",
                          "partitioner=dirichlet", "partitioner-params=alpha=0.3"],
}
NOT_TRAINED = {"frozen": ("feat.weight", "feat.bias"), "unused": ("aux.weight", "aux.bias")}


def _custom_updates(replies: list[Reply], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every entry's ``(n, *shape)`` updates against the task's initial model."""
    start = load_task(cfg).build_model().state_dict()
    for r in replies:
        assert r.error is None, r.error
    return {k: torch.stack([r.arrays["arrays"][k] - v for r in replies])
            for k, v in start.items()}


def _custom_round(cfg: dict[str, Any], *, batched: bool) -> list[Reply]:
    validate(cfg, N)
    model = load_task(cfg).build_model()
    grid = InProcessGrid(client_app, cfg, N, batched=batched)
    payload = _payload({k: v.detach() for k, v in model.state_dict().items()}, 2)
    return expand_replies(grid.make_transport().send(
        "train", dict.fromkeys(grid.node_ids, payload), timeout=60.0))


@pytest.mark.parametrize("case", list(CUSTOM_MODELS))
def test_custom_models_batched_replies_equal_the_client_apps(case: str) -> None:
    """A user's model (``task=``) with a frozen layer, a parameter the loss does not use,
    or tied weights: the batched engine trained the frozen and unused ones (weight decay,
    Adam) and replied the global value under a tied weight's second name."""
    cfg = _config(*CUSTOM_MODELS[case])
    u_p = _custom_updates(_custom_round(cfg, batched=False), cfg)
    u_b = _custom_updates(_custom_round(cfg, batched=True), cfg)
    for k in NOT_TRAINED.get(case.split("-")[0], ()):
        assert not u_p[k].any() and not u_b[k].any(), k  # not moved, by either engine
    flat_p = torch.cat([u.flatten(1) for u in u_p.values()], 1)
    flat_b = torch.cat([u.flatten(1) for u in u_b.values()], 1)
    err = (flat_b - flat_p).norm(dim=1) / flat_p.norm(dim=1)
    assert float(err.max()) < 1e-4, err
    if case.startswith("tied"):
        assert torch.equal(u_b["a.weight"], u_b["b.weight"])
        assert u_b["b.weight"].norm(dim=(1, 2)).min() > 0


def test_a_model_vmap_cannot_run_goes_to_the_client_app_and_is_logged(
    caplog: pytest.LogCaptureFixture, batched_failure_expected: bool,
) -> None:
    """A random operation in ``forward`` (dropout called as a function: no module to
    detect) fails inside vmap: the clients are trained by the ClientApp, bit for bit its
    replies, and the log says why. It used to fail every client with vmap's advice on
    flags the user cannot set."""
    cfg = _config(CUSTOM + "functional_dropout")
    with caplog.at_level(logging.INFO, logger="fedshield.engine"):
        batched = _custom_round(cfg, batched=True)
    lines = [r.getMessage() for r in caplog.records if "batched engine" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(
        f"round 2: batched engine: training {N} clients as one computation failed "
        "(RuntimeError: vmap: called random operation"), lines
    assert lines[0].endswith("they are trained one by one by the ClientApp")
    u_p = _custom_updates(_custom_round(cfg, batched=False), cfg)
    u_b = _custom_updates(batched, cfg)
    assert all(torch.equal(u_b[k], u_p[k]) for k in u_p)


def test_a_client_that_cannot_train_gets_the_client_apps_error() -> None:
    cfg = _config()
    replies = {}
    for batched in (False, True):
        grid = InProcessGrid(client_app, cfg, N, batched=batched)
        replies[batched] = expand_replies(grid.make_transport().send(
            "train", dict.fromkeys(grid.node_ids, _payload({"not-a-weight": torch.zeros(3)}, 1)),
            timeout=60.0))
    assert len(replies[True]) == N
    assert all(r.error is not None and "RuntimeError" in r.error for r in replies[True])
    # the same text as the ClientApp's error reply, as the server decodes it
    assert [r.error for r in replies[True]] == [r.error for r in replies[False]]


def test_a_payload_without_the_round_gets_an_error_reply_not_an_exception() -> None:
    cfg = _config()
    grid = InProcessGrid(client_app, cfg, N, batched=True)
    model = build_task(cfg).build_model()
    bad = Payload(arrays={"arrays": dict(model.state_dict())}, configs={"config": {}})
    replies = expand_replies(grid.make_transport().send(
        "train", dict.fromkeys(grid.node_ids, bad), timeout=60.0))
    assert [r.node_id for r in replies] == grid.node_ids
    assert all(r.error is not None and "server-round" in r.error for r in replies)


@pytest.mark.parametrize("overrides", [[], ["model-params=dropout=0.2"]])  # batched, or not
def test_faults_drop_messages_in_batched_mode_too(overrides: list[str]) -> None:
    """The fault model sees each train message once: also the messages the batched engine
    hands to the ClientApp (it used to see those twice)."""
    cfg = _config(*overrides)
    validate(cfg, N)
    model = build_task(cfg).build_model()
    seen: list[str] = []

    def fault(pid: int, msg: Message) -> bool:
        seen.append(msg.metadata.message_type)
        assert int(msg.content["config"]["server-round"]) == 1  # it sees the message
        return pid < 2

    grid = InProcessGrid(client_app, cfg, N, batched=True, fault=fault)
    replies = expand_replies(grid.make_transport().send(
        "train", dict.fromkeys(grid.node_ids, _payload(dict(model.state_dict()), 1)),
        timeout=60.0))
    assert sorted(int(r.metrics["metrics"]["partition-id"]) for r in replies) == [2, 3, 4, 5]
    assert seen == ["train"] * N
    assert not grid._inbox


def test_the_batched_transport_writes_no_flower_message(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of the transport: a batched round encodes no ArrayRecord (the per-client
    engine, for contrast, encodes one per payload and one per reply)."""
    import flwr.app

    cfg = _config()
    validate(cfg, N)
    state = dict(build_task(cfg).build_model().state_dict())
    made: list[int] = []
    real = flwr.app.ArrayRecord.__init__

    def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        made.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(flwr.app.ArrayRecord, "__init__", counting)
    for batched in (True, False):
        made.clear()
        grid = InProcessGrid(client_app, cfg, N, batched=batched)
        replies = expand_replies(grid.make_transport().send(
            "train", dict.fromkeys(grid.node_ids, _payload(state, 1)), timeout=60.0))
        assert len(replies) == N and all(r.error is None for r in replies)
        assert (len(made) == 0) if batched else (len(made) >= N + 1), (batched, len(made))


def test_whole_run_batched_gives_the_per_client_accuracy() -> None:
    """digits, 6 clients, 2 rounds: the engines agree on the pinned accuracy."""
    flat = resolve_config(None, [*BASE, f"num-clients={N}"])
    rows = {e: run_in_process({**flat, "engine": e}) for e in ("per-client", "batched")}
    acc = {e: [r["accuracy"] for r in rs] for e, rs in rows.items()}
    assert len(acc["batched"]) == 3
    assert acc["batched"] == pytest.approx(acc["per-client"], abs=2e-3)
    assert acc["batched"][-1] > 0.5  # it learns: round 0 is chance


def test_engine_setting_is_checked() -> None:
    assert check_engine("per-client") == "per-client"
    with pytest.raises(ValueError, match="engine must be one of per-client, batched"):
        check_engine("vmap")
    with pytest.raises(ValueError, match="engine must be one of"):
        run_in_process({**resolve_config(None, [*BASE, "num-clients=2"]), "engine": "fast"})


def test_a_bad_node_config_gets_the_client_apps_error() -> None:
    """With attackers, the role is looked up from the node config: a config without
    num-partitions must still get the data loader's clear refusal, as from the ClientApp."""
    cfg = _config("num-malicious=2", "attack=sign_flip")
    validate(cfg, N)
    state = dict(build_task(cfg).build_model().state_dict())
    errors = {}
    for batched in (False, True):
        grid = InProcessGrid(client_app, cfg, N, batched=batched)
        del grid.contexts[grid.node_ids[0]].node_config["num-partitions"]
        replies = expand_replies(grid.make_transport().send(
            "train", dict.fromkeys(grid.node_ids, _payload(state, 1)), timeout=60.0))
        errors[batched] = [r.error for r in replies]
    assert errors[True] == errors[False]
    assert errors[True][0] is not None and "needs partition-id and num-partitions" in errors[True][0]
    assert all(e is None for e in errors[True][1:])


@pytest.mark.parametrize(("attack", "bad"), [
    ([], 2),  # every client honest
    (["num-malicious=2", "attack=label_flip"], 2),  # the data attacker outside (2, 3 attack)
    (["num-malicious=2", "attack=label_flip"], 4),  # an honest one outside, between others
])
def test_one_client_outside_the_pgd_box_fails_alone_as_in_the_client_app(
        monkeypatch: pytest.MonkeyPatch, attack: list[str], bad: int) -> None:
    """PGD refuses inputs outside its [0, 1] box. One node's data outside it fails that node
    in the per-client engine; the batched engine used to fail every client of the batched
    step with it (its PGD checks a step's inputs together). ``validate`` refuses such a run
    before round 1, so only a direct grid user meets it: here through the grid. The other
    clients (data attackers, whose poisoned data the batched engine keeps apart, included)
    train as in the per-client engine."""
    from simulations.task import DatasetTask

    plain, concat = DatasetTask.train_data, DatasetTask.train_data_concat

    def train_data(self: DatasetTask, nc: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = plain(self, nc)
        return (x * 3 if nc.get("partition-id") == bad else x), y

    def train_data_concat(self: DatasetTask, ncs: Any) -> Any:
        x, y, sizes = concat(self, ncs)
        x = x.clone()
        lo = 0
        for nc, n in zip(ncs, sizes, strict=True):
            if nc.get("partition-id") == bad:
                x[lo:lo + n] *= 3
            lo += n
        return x, y, sizes

    monkeypatch.setattr(DatasetTask, "train_data", train_data)
    monkeypatch.setattr(DatasetTask, "train_data_concat", train_data_concat)
    cfg = _config("adversarial-training=eps=0.1, alpha=0.03, steps=2", *attack)
    model = build_task(cfg).build_model()
    g = torch.cat([v.reshape(-1) for v in model.state_dict().values()])
    payload = _payload({k: v.detach() for k, v in model.state_dict().items()}, 2)
    replies = {}
    for batched in (False, True):
        grid = InProcessGrid(client_app, cfg, N, batched=batched)
        replies[batched] = expand_replies(grid.make_transport().send(
            "train", dict.fromkeys(grid.node_ids, payload), timeout=60.0))
    for batched, got in replies.items():
        assert [i for i, r in enumerate(got) if r.error is not None] == [bad], batched
        assert "outside the clamp box [0.0, 1.0]" in str(got[bad].error)
    for i, (p, b) in enumerate(zip(replies[False], replies[True], strict=True)):
        if i == bad:
            continue
        u_p, u_b = (torch.cat([v.reshape(-1) for v in r.arrays["arrays"].values()]) - g
                    for r in (p, b))
        # PGD's tolerance in test_batched_replies_equal_the_client_apps
        assert float((u_b - u_p).norm() / u_p.norm()) < 1e-2, i
        assert p.metrics["metrics"]["num-examples"] == b.metrics["metrics"]["num-examples"]
