"""The run config: the flat ``key -> scalar`` mapping of ``flwr run``, parsed once.

Flower hands every app a flat run config (``[tool.flwr.app.config]`` in ``pyproject.toml``,
overridden by ``flwr run --run-config``). :meth:`RunConfig.from_flat` turns it, once per
run, into a frozen, typed :class:`RunConfig`: each key's type is checked, every component
spec is parsed with the one grammar of :mod:`runconfig.spec`, and every check that involves
several keys is made here, in :meth:`RunConfig._check`, and nowhere else. Checks that need a
component's registry (is ``krum`` a rule? does it take ``f``?) are made by that registry's
``build``, when the component is built before round 1.

:data:`APP_KEYS` is the single list of the app's keys and defaults; ``pyproject.toml``
repeats it for Flower (a test keeps the two identical).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .spec import Spec, parse_params, parse_spec, parse_specs

__all__ = ["APP_KEYS", "ATTACK_KNOWLEDGE", "BATCH_ORDERS", "ENGINES", "RunConfig", "Scalar", "check_engine",
           "config_value"]

Scalar = bool | int | float | str

# Keys of the Flower app and their defaults: identical to [tool.flwr.app.config].
APP_KEYS: dict[str, Scalar] = {
    # federation
    "num-server-rounds": 20,
    "clients-per-round": 0,
    "min-clients": 2,
    "round-timeout": 600.0,
    "node-wait-timeout": 120.0,
    "server-device": "cpu",
    # defense
    "aggregator": "mean",
    "aggregator-params": "",
    "pre-aggregation": "",
    "root-dataset": "",
    # task
    "task": "simulations.task:build_task",
    "dataset": "digits",
    "partitioner": "iid",
    "partitioner-params": "",
    "model": "mlp",
    "model-params": "",
    # local training
    "local-epochs": 2,
    "batch-size": 32,
    "learning-rate": 0.3,
    "optimizer": "sgd",
    "momentum": 0.0,
    "weight-decay": 0.0,
    "batch-order": "generator",
    "device": "auto",
    # privacy and robustness defenses ("" = off; else key=value parameters)
    "central-dp": "",
    "dp-sgd": "",
    "local-dp": "",
    "adversarial-training": "",
    "secagg": "",
    # extra per-round evaluation of the global model
    "eval-evasion": "",
    "eval-membership": False,
    # threat model
    "num-malicious": 0,
    "attack": "sign_flip",
    "attack-params": "",
    "attack-start-round": 1,
    "attack-knowledge": "omniscient",
    "adversary": "simulations.adversary:build_adversary",
    # bookkeeping
    "seed": 0,
    "out-dir": "",
    "resume": False,
}

ATTACK_KNOWLEDGE = ("omniscient", "own-data")
BATCH_ORDERS = ("generator", "hashed")
"""How a client's batch order is drawn (``batch-order``, :mod:`client.order`)."""
# How the in-process engine runs a round's clients (its key ``engine``, not an app key: a
# deployment's clients are separate processes): one ClientApp call per node, or all the
# sampled clients trained as one batched computation (simulations/batched.py).
ENGINES = ("per-client", "batched")


def check_engine(value: object) -> str:
    """The in-process engine's ``engine`` setting, checked: one of :data:`ENGINES`.

    Raises
    ------
    ValueError
        Any other value.

    Examples
    --------
    >>> check_engine("batched")
    'batched'
    """
    if not isinstance(value, str) or value not in ENGINES:
        raise ValueError(
            f"engine must be one of {', '.join(ENGINES)}, got {value!r}: 'per-client' calls "
            "the ClientApp once per node, 'batched' trains a round's clients as one computation"
        )
    return value
# the sources of a server's root dataset (FLTrust) and the parameter each takes
ROOT_DATASETS = {"held-out": "size", "file": "path"}
DP_SGD_KEYS = (
    "noise_multiplier", "max_grad_norm", "delta", "target_epsilon", "max_epsilon", "accountant",
)
LOCAL_DP_KEYS = ("clipping_norm", "noise_std", "epsilon", "delta", "method")
ADVERSARIAL_KEYS = ("eps", "alpha", "steps")
SECAGG_KEYS = (
    "threshold", "neighbours", "clip", "bits", "key_agreement", "max_weight", "groups",
    "group_rounds", "noise_seed",
)
# where a client's distributed DP noise comes from (secagg with central-dp): ``secret``, the
# node's OS CSPRNG (a server cannot regenerate it); ``run``, derived from the run seed, round
# and node (reproducible from the saved config, but the server can remove the noise)
NOISE_SEEDS = ("secret", "run")

_KINDS: dict[type, tuple[type, ...]] = {
    bool: (bool,),
    int: (int,),
    float: (int, float),
    str: (str,),
}


def config_value(config: Mapping[str, Any], key: str, kind: type[Any]) -> Any:
    """Read ``config[key]`` as ``kind`` (bool, int, float or str), refusing a wrong type.

    Raises
    ------
    KeyError
        If the key is absent.
    TypeError
        If the value has the wrong type (an int is accepted for a float, a bool is never
        accepted for a number).
    ValueError
        If a float is NaN or infinite.
    """
    if key not in config:
        raise KeyError(
            f"run config has no key {key!r}; add it to [tool.flwr.app.config] in "
            f"pyproject.toml or pass it with --run-config \"{key}=...\""
        )
    value = config[key]
    ok = isinstance(value, _KINDS[kind]) and not (kind is not bool and isinstance(value, bool))
    if not ok:
        raise TypeError(
            f"run config key {key!r} must be {kind.__name__}, got "
            f"{type(value).__name__} {value!r}"
        )
    if kind is float and not math.isfinite(value):
        raise ValueError(f"run config key {key!r} must be a finite number, got {value!r}")
    return kind(value)


def _options(cfg: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    params = parse_params(config_value(cfg, key, str), what=key)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise TypeError(f"{key} got unknown parameter(s) {unknown}; valid: {', '.join(allowed)}")
    return params


def _root_dataset(text: str) -> Spec | None:
    """The ``root-dataset`` spec (``None`` when empty), its source and parameter checked.

    Whether the file exists and fits the task is checked by the server, which holds it
    (clients parse the same run config without the file).
    """
    if not text.strip():
        return None
    spec = parse_spec(text, what="root-dataset")
    if spec.name not in ROOT_DATASETS:
        raise ValueError(
            f"root-dataset source {spec.name!r} is unknown; valid: 'held-out(size=N)' (N "
            "training examples kept by the server) or 'file(path=PATH)' (an .npz file)"
        )
    param = ROOT_DATASETS[spec.name]
    if set(spec.params) != {param}:
        raise TypeError(
            f"root-dataset {spec.name} takes exactly one parameter, {param}, got "
            f"{sorted(spec.params) or 'none'}: e.g. "
            + ("'held-out(size=100)'" if spec.name == "held-out" else "'file(path=root.npz)'")
        )
    value = spec.params[param]
    if spec.name == "held-out" and (isinstance(value, bool) or not isinstance(value, int)
                                    or value < 1):
        raise ValueError(f"root-dataset held-out needs an int size >= 1, got size={value!r}")
    if spec.name == "file" and (not isinstance(value, str) or not value.strip()):
        raise ValueError(f"root-dataset file needs a path, got path={value!r}")
    return spec


def _spec(cfg: Mapping[str, Any], name_key: str, params_key: str) -> Spec:
    name = config_value(cfg, name_key, str).strip()
    if not name:
        raise ValueError(f"run config key {name_key!r} is empty; name a registered component")
    return Spec(name, parse_params(config_value(cfg, params_key, str), what=params_key))


@dataclass(frozen=True)
class RunConfig:
    """The whole run config, typed and checked; see the module docstring.

    ``flat`` keeps the mapping it was parsed from: it is what a run saves and what resume
    compares.
    """

    num_rounds: int
    clients_per_round: int
    min_clients: int
    round_timeout: float
    node_wait_timeout: float
    server_device: str
    rule: Spec
    pre_aggregation: tuple[Spec, ...]
    root_dataset: Spec | None
    task: str
    dataset: str
    partitioner: Spec
    model: Spec
    local_epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    momentum: float
    weight_decay: float
    batch_order: str
    device: str
    central_dp: Mapping[str, Any]
    dp_sgd: Mapping[str, Any]
    local_dp: Mapping[str, Any]
    adversarial_training: Mapping[str, Any]
    secagg: Mapping[str, Any]
    eval_evasion: tuple[Spec, ...]
    eval_membership: bool
    num_malicious: int
    attack: Spec
    attack_start_round: int
    attack_knowledge: str
    adversary: str
    seed: int
    out_dir: str
    resume: bool
    flat: Mapping[str, Scalar] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_flat(cls, cfg: Mapping[str, Any]) -> RunConfig:
        """Parse and check a flat run config (every key of :data:`APP_KEYS`, no other).

        Raises
        ------
        KeyError
            A missing or unknown key (with the closest valid key).
        TypeError
            A value of the wrong type, or an unknown option in a ``key=value`` setting.
        ValueError
            A value out of range, an unparsable spec, or settings that contradict each
            other (the message names the keys and the fix).
        """
        unknown = sorted(set(cfg) - set(APP_KEYS))
        if unknown:
            import difflib

            hints = ", ".join(
                f"{k!r}" + "".join(f" (did you mean {c!r}?)"
                                   for c in difflib.get_close_matches(k, list(APP_KEYS), n=1))
                for k in unknown
            )
            raise KeyError(f"unknown run-config key(s) {hints}; valid keys: {', '.join(APP_KEYS)}")

        def get(key: str) -> Any:
            return config_value(cfg, key, type(APP_KEYS[key]))

        out = cls(
            num_rounds=get("num-server-rounds"),
            clients_per_round=get("clients-per-round"),
            min_clients=get("min-clients"),
            round_timeout=get("round-timeout"),
            node_wait_timeout=get("node-wait-timeout"),
            server_device=get("server-device"),
            rule=_spec(cfg, "aggregator", "aggregator-params"),
            pre_aggregation=tuple(parse_specs(get("pre-aggregation"), what="pre-aggregation step")),
            root_dataset=_root_dataset(get("root-dataset")),
            task=get("task"),
            dataset=get("dataset"),
            partitioner=_spec(cfg, "partitioner", "partitioner-params"),
            model=_spec(cfg, "model", "model-params"),
            local_epochs=get("local-epochs"),
            batch_size=get("batch-size"),
            learning_rate=get("learning-rate"),
            optimizer=get("optimizer"),
            momentum=get("momentum"),
            weight_decay=get("weight-decay"),
            batch_order=get("batch-order"),
            device=get("device"),
            central_dp=parse_params(get("central-dp"), what="central-dp"),
            dp_sgd=_options(cfg, "dp-sgd", DP_SGD_KEYS),
            local_dp=_options(cfg, "local-dp", LOCAL_DP_KEYS),
            adversarial_training=_options(cfg, "adversarial-training", ADVERSARIAL_KEYS),
            secagg=_options(cfg, "secagg", SECAGG_KEYS),
            eval_evasion=tuple(parse_specs(get("eval-evasion"), what="eval-evasion attack")),
            eval_membership=get("eval-membership"),
            num_malicious=get("num-malicious"),
            attack=_spec(cfg, "attack", "attack-params"),
            attack_start_round=get("attack-start-round"),
            attack_knowledge=get("attack-knowledge"),
            adversary=get("adversary"),
            seed=get("seed"),
            out_dir=get("out-dir"),
            resume=get("resume"),
            flat={k: cfg[k] for k in APP_KEYS},
        )
        out._check()
        return out

    def _check(self) -> None:
        """Every check on one key's range and on several keys together."""
        if self.num_rounds < 1:
            raise ValueError(f"num-server-rounds must be >= 1, got {self.num_rounds}")
        if not self.round_timeout > 0:
            raise ValueError(f"round-timeout must be > 0 seconds, got {self.round_timeout}")
        if self.node_wait_timeout < 0:
            raise ValueError(f"node-wait-timeout must be >= 0, got {self.node_wait_timeout}")
        if self.clients_per_round < 0:
            raise ValueError(f"clients-per-round must be >= 0, got {self.clients_per_round}")
        if self.min_clients < 0:
            raise ValueError(f"min-clients must be >= 0, got {self.min_clients}")
        if self.batch_order not in BATCH_ORDERS:
            raise ValueError(
                f"batch-order must be one of {', '.join(BATCH_ORDERS)}, got "
                f"{self.batch_order!r}: 'generator' draws each client's order from its own "
                "torch.Generator, 'hashed' from a hash (fast for thousands of clients)")
        if self.batch_order == "hashed" and self.dp_sgd:
            raise ValueError(
                "batch-order='hashed' shuffles each epoch, but dp-sgd samples its batches "
                "(Poisson sampling, which its privacy accounting assumes) from a generator: "
                "use batch-order='generator' with dp-sgd")
        if self.resume and not self.out_dir:
            raise ValueError(
                "resume=true needs out-dir: the folder whose checkpoint the run continues "
                "(an empty out-dir gives every run a new folder)"
            )
        if self.num_malicious < 0:
            raise ValueError(f"num-malicious must be >= 0, got {self.num_malicious}")
        if self.attack_start_round < 1:
            raise ValueError(
                f"attack-start-round must be >= 1 (rounds count from 1; 1 attacks from the "
                f"start), got {self.attack_start_round}")
        if self.attack_knowledge not in ATTACK_KNOWLEDGE:
            raise ValueError(
                f"attack-knowledge must be one of {', '.join(ATTACK_KNOWLEDGE)}, got "
                f"{self.attack_knowledge!r}"
            )
        if self.central_dp:
            self._check_central_dp()
        elif self.clients_per_round and self.clients_per_round < self.min_clients:
            raise ValueError(
                f"clients-per-round={self.clients_per_round} is below min-clients="
                f"{self.min_clients}: every round would be skipped; raise clients-per-round or "
                "lower min-clients"
            )
        if self.local_dp:
            if "clipping_norm" not in self.local_dp:
                raise ValueError(
                    "local-dp needs clipping_norm, e.g. \"clipping_norm=1.0, epsilon=2.0, "
                    "delta=1e-5\""
                )
            if ("noise_std" in self.local_dp) == ("epsilon" in self.local_dp):
                raise ValueError("local-dp needs exactly one of noise_std or epsilon (with delta)")
        if self.dp_sgd and ("noise_multiplier" in self.dp_sgd) == ("target_epsilon" in self.dp_sgd):
            raise ValueError("dp-sgd needs exactly one of noise_multiplier or target_epsilon")
        if self.secagg:
            self._check_secagg()

    def _check_secagg(self) -> None:
        groups = self.secagg.get("groups", 0)
        noise_seed = self.secagg.get("noise_seed", "secret")
        if noise_seed not in NOISE_SEEDS:
            raise ValueError(
                f"secagg noise_seed must be one of {list(NOISE_SEEDS)}, got {noise_seed!r}: "
                "'secret' (default) draws each client's distributed DP noise from its own "
                "CSPRNG; 'run' derives it from the run seed (reproducible, but the server can "
                "regenerate and subtract it)")
        if "noise_seed" in self.secagg and not self.central_dp:
            raise ValueError(
                "secagg noise_seed is for distributed DP (secagg with central-dp), which this "
                "run does not use: drop noise_seed or set central-dp")
        if self.central_dp:  # distributed DP (docs/secagg.md): refuse what it cannot do
            given = sorted(set(self.secagg) & {"clip", "max_weight"})
            if given:
                raise ValueError(
                    f"secagg {given} with central-dp: under distributed DP central-dp's "
                    "clipping_norm is the clipping bound and every client weighs 1; drop "
                    f"{given} from secagg")
            if groups:
                raise ValueError(
                    "secagg groups with central-dp: the noise is calibrated for the unweighted "
                    "mean of clipped updates, not for a rule over group means; drop groups")
            if str(self.central_dp.get("adaptive", False)).lower() == "true":
                raise ValueError(
                    "central-dp adaptive=true with secagg: adaptive clipping needs a noised "
                    "count of clipped clients, which distributed DP does not aggregate; use a "
                    "fixed clipping_norm")
        if self.min_clients < 2:
            raise ValueError(
                f"secagg needs min-clients >= 2 (the sum of one update is that update), got "
                f"min-clients={self.min_clients}")
        if not groups and (self.rule.name != "mean" or self.rule.params or self.pre_aggregation):
            raise ValueError(
                "secagg reveals only the sum of the updates, so "
                f"aggregator={self.rule.name!r} (params {dict(self.rule.params)}, "
                f"pre-aggregation {[s.name for s in self.pre_aggregation]}) cannot see the "
                "individual updates it needs. Use aggregator='mean' with no parameters or "
                "pre-aggregation, or grouped secure aggregation (secagg 'groups=G'), where the "
                "rule runs on G securely computed group means")
        if groups and self.clients_per_round and self.clients_per_round < 2 * groups:
            raise ValueError(
                f"secagg groups={groups} with clients-per-round={self.clients_per_round}: every "
                "group needs at least 2 clients; lower groups or sample more clients")

    def _check_central_dp(self) -> None:
        if self.pre_aggregation:
            raise ValueError(
                "central-dp clips every update itself (clipping_norm) and releases a round even "
                "when nobody replies; pre-aggregation steps cannot run on an empty round: drop "
                f"pre-aggregation={[s.name for s in self.pre_aggregation]} and set clipping_norm"
            )
        if self.rule.params:
            raise ValueError(
                f"central-dp replaces aggregator={self.rule.name!r} by DP-FedAvg (the unweighted "
                "mean of clipped updates), which takes no aggregator-params; got "
                f"{dict(self.rule.params)}: set aggregator='mean' and aggregator-params=''"
            )
        if self.clients_per_round < 1:
            raise ValueError(
                "central DP needs clients-per-round >= 1 (the expected number m of clients per "
                "round, which calibrates the noise z*C/m); set clients-per-round"
            )

    # -- derived settings, in one place -----------------------------------------------
    @property
    def sampling(self) -> str:
        """How nodes are sampled: ``"fixed"`` (seeded sample of m), ``"poisson"``, ``"all"``."""
        if self.central_dp:
            mode = str(self.central_dp.get("sampling", "poisson"))
            return {"poisson": "poisson", "fixed": "fixed", "none": "all"}.get(mode, mode)
        return "fixed"

    @property
    def round_min_clients(self) -> int:
        """Fewer valid replies than this skip a round; central DP releases every round."""
        return 0 if self.central_dp else self.min_clients

    def replace(self, **changes: Scalar) -> RunConfig:
        """A new config with flat keys changed (``replace(**{"num-server-rounds": 5})``)."""
        return RunConfig.from_flat({**self.flat, **changes})

    def as_flat(self) -> dict[str, Scalar]:
        """The flat mapping, as Flower and the saved ``config.toml`` carry it."""
        return dict(self.flat)

