"""In-process simulation engine: the real ServerApp logic and ClientApp, without Ray.

:class:`InProcessGrid` implements Flower's ``Grid`` interface and delivers each message to
the ``ClientApp`` in this process, one node at a time. The server code (``run_server``),
the strategy and the ClientApp are exactly those that ``flwr run .`` and a deployment use;
only the transport differs. That makes a run deterministic given its seed and removes the
10-20 s Ray start-up per run, which matters for benchmark matrices.
"""

from __future__ import annotations

import gc
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from runconfig.config import RunConfig, Scalar
from server.rounds import Payload, Reply, ReplyBlock, expand_replies
from server.transport import GridTransport, encode_payload

if TYPE_CHECKING:
    from .batched import TrainedBlock

__all__ = [
    "ENGINE_KEYS", "REFERENCES", "InProcessGrid", "InProcessTransport", "check_engine_keys",
    "check_names", "run_in_process", "validate",
]


# A fault model for tests: fault(partition_id, message) -> True drops the message (a lost
# node, seen by the server as a time-out); raising inside makes an error reply.
FaultFn = Callable[[int, Message], bool]

_SERVER_NODE_ID = 1
ENGINE_KEYS = frozenset({"num-clients", "engine", "reference"})
REFERENCES = ("none", "honest-only")
"""The engine's ``reference`` runs: ``"honest-only"`` never sends a train message to the
malicious clients (ground truth, :func:`client.malicious.malicious_partitions`), the
perfect filter: what FedAvg reaches on the honest clients' data alone, the ceiling of any
defense that removes the attackers' updates."""


def _set_task_identity(run_id: int) -> None:
    # Flower 1.41 stamps new instruction messages with the process's task identity, which
    # its own runtimes set; the in-process engine is that runtime here.
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = _SERVER_NODE_ID
    TaskIdentity.task_id = 0


class InProcessGrid(Grid):
    """A ``Grid`` whose nodes are ``ClientApp`` calls in this process.

    Parameters
    ----------
    client_app
        The ClientApp every node runs.
    run_config
        The flat run config given to every node's ``Context``.
    num_nodes
        Number of nodes; node ``i`` gets ``partition-id=i, num-partitions=num_nodes``.
    run_id
        Run id stamped on messages.
    fault
        Optional fault model: ``fault(partition_id, message) -> True`` drops the message.
    batched
        Answer a round's train payloads from one batched computation
        (:mod:`simulations.batched`, ``engine = "batched"``) instead of one ClientApp call
        per node; ``client_app`` must then be fedshield's (``client.app.app``), whose replies
        the batched ones reproduce. The batching is done by the grid's transport
        (:meth:`make_transport`, which :func:`server.app.run_server` uses), on tensors:
        the grid's own ``send_and_receive`` always calls the ClientApp.
    """

    # one ClientApp call after another: a round's exchange holds the sum of the
    # clients' training (server.loop's round profile reads this)
    clients_in_series = True

    def __init__(
        self,
        client_app: ClientApp,
        run_config: Mapping[str, Scalar],
        num_nodes: int,
        *,
        run_id: int = 1,
        fault: FaultFn | None = None,
        batched: bool = False,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num-clients must be >= 1, got {num_nodes}")
        self.client_app = client_app
        self._run_id = run_id
        self.fault = fault
        self.batched = batched
        # nodes whose message the fault model has seen already (the batched transport
        # asks it first, then hands what it does not batch to the ClientApp): not again
        self._fault_seen: set[int] = set()
        # node ids distinct from the server's and from partition ids, to catch mix-ups
        self.node_ids = [1000 + i for i in range(num_nodes)]
        self.contexts = {
            nid: Context(
                run_id=run_id,
                node_id=nid,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                # the engine's own keys (num-clients) are not the app's: nodes never see them
                run_config={k: v for k, v in run_config.items() if k not in ENGINE_KEYS},
            )
            for i, nid in enumerate(self.node_ids)
        }
        self._counter = itertools.count(1)
        self._inbox: dict[str, Message] = {}
        self.call_seconds: list[float] = []
        _set_task_identity(run_id)

    # Grid interface ------------------------------------------------------------------
    def set_run(self, run: Any) -> None:  # pragma: no cover - set by real runtimes only
        raise NotImplementedError("the in-process grid has a fixed run")

    @property
    def run(self) -> Any:
        return self._run_id

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"message to unknown node {msg.metadata.dst_node_id}")
            mid = f"m{next(self._counter)}"
            msg.metadata.__dict__["_message_id"] = mid
            self._inbox[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for mid in message_ids:
            msg = self._inbox.pop(mid, None)
            if msg is None:
                continue
            reply = self._deliver(msg)
            if reply is not None:
                replies.append(reply)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def make_transport(self) -> InProcessTransport:
        """The transport :func:`server.app.run_server` uses for this grid."""
        return InProcessTransport(self)

    # ---------------------------------------------------------------------------------
    def _deliver(self, msg: Message) -> Message | None:
        ctx = self.contexts[msg.metadata.dst_node_id]
        pid = int(ctx.node_config["partition-id"])
        t0 = time.perf_counter()
        try:
            if (self.fault is not None and msg.metadata.dst_node_id not in self._fault_seen
                    and self.fault(pid, msg)):
                return None
            reply = self.client_app(msg, ctx)
        except Exception as exc:
            # the reply carries what a deployment's would, the type and the message; the
            # traceback (file paths) goes to the debug log only
            logging.getLogger("fedshield.engine").debug(
                "the ClientApp of partition %d raised", pid, exc_info=True)
            reply = Message(Error(code=500, reason=f"{type(exc).__name__}: {exc}"),
                            reply_to=msg)
        finally:
            self.call_seconds.append(time.perf_counter() - t0)
        reply.metadata.__dict__["_message_id"] = f"r{next(self._counter)}"
        return reply


class InProcessTransport(GridTransport):
    """The in-process grid's :class:`~server.stages.Transport`.

    With ``batched`` off it is :class:`server.transport.GridTransport`: every payload is a
    Flower message to the ClientApp. With ``batched`` on, a round's train payloads are
    answered by :func:`simulations.batched.train_batched` from the payload's tensors, and
    the replies carry the trained tensors: no ``ArrayRecord`` is written or read, which at
    a thousand clients costs more than their training. Consecutive replies that are rows
    of one trained stack come as one :class:`~server.rounds.ReplyBlock`. The replies are
    those the ClientApp's messages would decode to (same arrays, metrics and error text),
    in the order of the payloads; payloads the batched training does not cover (other
    message types, features that are not batched) go to the ClientApp as messages.

    The fault model sees each train payload as the message it would have been (built only
    when a fault model is set).
    """

    grid: InProcessGrid

    def __init__(self, grid: InProcessGrid) -> None:
        super().__init__(grid)
        # the fault model's view of the last payload: (payload, its encoded content)
        self._encoded: tuple[Payload, RecordDict] | None = None

    def send(
        self, message_type: str, payloads: Mapping[int, Payload], *, timeout: float
    ) -> Sequence[Reply | ReplyBlock]:
        if not self.grid.batched or message_type != MessageType.TRAIN:
            return super().send(message_type, payloads, timeout=timeout)
        from .batched import TrainJob, train_batched

        grid = self.grid
        t0 = time.perf_counter()
        answered: dict[int, Reply | None] = {}  # None: dropped by the fault model
        nodes: list[int] = []
        jobs: list[TrainJob] = []
        read: dict[int, tuple[Any, int] | Exception] = {}  # per payload object: once

        def contents(payload: Payload) -> tuple[Any, int] | Exception:
            """The payload's arrays and round, or what reading them raised."""
            if id(payload) not in read:
                try:
                    read[id(payload)] = (payload.arrays["arrays"],
                                         int(payload.configs["config"]["server-round"]))
                except Exception as exc:
                    read[id(payload)] = exc
            return read[id(payload)]

        for node, payload in payloads.items():
            ctx = grid.contexts.get(node)
            if ctx is None:
                raise ValueError(f"message to unknown node {node}")
            try:
                if grid.fault is not None and grid.fault(
                        int(ctx.node_config["partition-id"]),
                        self._as_message(message_type, node, payload)):
                    answered[node] = None
                    continue
                got = contents(payload)
            except Exception as exc:  # the fault model (or building its message) raised
                got = exc
            if isinstance(got, Exception):  # what the ClientApp's error reply would say
                answered[node] = Reply(node, error=_client_error(got))
                continue
            nodes.append(node)
            jobs.append(TrainJob(ctx.run_config, ctx.node_config, got[0], got[1]))
        rows: dict[int, tuple[TrainedBlock, int]] = {}  # answered by a row of a block
        for node, res in zip(nodes, train_batched(jobs), strict=True):
            if res is None:  # not batched: the ClientApp answers it
                continue
            if isinstance(res, Exception):
                answered[node] = Reply(node, error=_client_error(res))
            elif isinstance(res, tuple):
                rows[node] = res
            else:
                answered[node] = Reply(node, arrays={"arrays": res.state},
                                       metrics={"metrics": dict(res.metrics)})
        done = len(answered) + len(rows)
        if done:  # the round's time, shared by the payloads answered together
            grid.call_seconds.extend([(time.perf_counter() - t0) / done] * done)
        rest = {n: p for n, p in payloads.items() if n not in answered and n not in rows}
        by_node: dict[int, Reply] = {}
        if rest:  # the fault model has seen these messages above: once per message
            grid._fault_seen = set(rest)
            try:
                by_node = {r.node_id: r for r in expand_replies(
                    super().send(message_type, rest, timeout=timeout))}
            finally:
                grid._fault_seen = set()
        # in the payloads' order; consecutive rows of one block go as one ReplyBlock
        out: list[Reply | ReplyBlock] = []
        run: list[tuple[int, int]] = []  # (node, row) of the current block
        block: TrainedBlock | None = None
        for node in payloads:
            row = rows.get(node)
            if run and (row is None or row[0] is not block):
                assert block is not None
                out.append(_reply_block(block, run))
                run = []
            if row is not None:
                block = row[0]
                run.append((node, row[1]))
                continue
            reply = answered[node] if node in answered else by_node.get(node)
            if reply is not None:
                out.append(reply)
        if run:
            assert block is not None
            out.append(_reply_block(block, run))
        return out

    def _as_message(self, message_type: str, node: int, payload: Payload) -> Message:
        if self._encoded is None or self._encoded[0] is not payload:  # once per payload
            self._encoded = (payload, encode_payload(payload))
        return Message(content=self._encoded[1], message_type=message_type, dst_node_id=node)


def _reply_block(block: TrainedBlock, run: Sequence[tuple[int, int]]) -> ReplyBlock:
    """The replies of the nodes of ``run``, ``(node, row of block)`` pairs, as one block."""
    rows = tuple(r for _, r in run)
    if rows == tuple(range(block.stack.k)):  # every row, in order: the columns as they are
        metrics: Mapping[str, Sequence[Any]] = block.metrics
    else:
        metrics = {k: [col[r] for r in rows] for k, col in block.metrics.items()}
    return ReplyBlock(tuple(n for n, _ in run), block.stack, rows, metrics)


def check_engine_keys(run_config: Mapping[str, Scalar]) -> tuple[str, str]:
    """The engine's ``engine`` and ``reference`` settings, checked (defaults when absent).

    Raises
    ------
    ValueError
        A value that is not one of :data:`runconfig.config.ENGINES` /
        :data:`REFERENCES`.
    """
    from runconfig.config import check_engine

    engine = check_engine(run_config.get("engine", "per-client"))
    reference = run_config.get("reference", "none")
    if not isinstance(reference, str) or reference not in REFERENCES:
        raise ValueError(
            f"reference must be one of {', '.join(REFERENCES)}, got {reference!r}: "
            "'honest-only' runs without the malicious clients (the ceiling of a defense "
            "that removes them)"
        )
    return engine, reference


def keep_freed_memory() -> bool:
    """Have glibc's ``malloc`` keep freed memory for reuse in this process; ``True`` if set.

    A batched round allocates tensors of K clients' parameters (tens of MiB at a thousand
    clients) and frees them; glibc returns such blocks to the kernel (``mmap`` above its
    threshold, heap trimming), so every round pays the page faults of fresh memory again:
    on the 2-core test box that doubled the time of stacking a thousand updates (a float32
    to float64 copy: 25-30 ms fresh, 10-14 ms into reused memory). Raising the ``mmap``
    threshold and the trim threshold to 1 GiB keeps the memory in the heap: the process's
    resident size stays at its peak instead of shrinking between rounds. Process-wide, for
    the rest of the process; a no-op (``False``) where the C library is not glibc.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        ok = int(libc.mallopt(m_mmap_threshold, 1 << 30)) == 1
        return int(libc.mallopt(m_trim_threshold, 1 << 30)) == 1 and ok
    except (OSError, AttributeError):
        return False


def _honest_only(malicious: frozenset[int], fault: FaultFn | None) -> FaultFn:
    """A fault model that drops every train message to a ``malicious`` partition, then
    applies ``fault`` to the rest."""

    def drop(pid: int, message: Message) -> bool:
        if pid in malicious and message.metadata.message_type == MessageType.TRAIN:
            return True
        return fault(pid, message) if fault is not None else False

    return drop


def _client_error(exc: BaseException) -> str:
    """The error text of the reply a ClientApp that raised ``exc`` sends, as decoded."""
    return f"client error 500: {type(exc).__name__}: {exc}"


def check_names(cfg: RunConfig) -> None:
    """Every component ``cfg`` names exists and takes the given parameters; loads no data.

    The checks that need a registry, made once here for the engine, the bench and the CLI
    (the checks of values and of several keys together are made by
    :meth:`runconfig.config.RunConfig.from_flat`).

    Raises
    ------
    KeyError
        An unknown dataset, partitioner, model, rule, pre-aggregation step or attack (the
        message names the closest valid one).
    TypeError
        An unknown or missing parameter of one of them.
    ValueError
        A parameter out of range; central DP with a rule it does not cover; an omniscient
        attack with no adversary to mount it; a rule that needs a root dataset (FLTrust)
        without ``root-dataset``, or ``root-dataset`` for a rule that takes none.
    FileNotFoundError
        An ``npz:PATH`` dataset or a ``file(path=PATH)`` root dataset whose file does not
        exist.
    """
    from pathlib import Path

    from aggregation.registry import unknown_name_message
    from client.app import train_settings
    from client.malicious import is_client_side_attack
    from server.fltrust import check_root_dataset
    from server.privacy import CentralDP
    from server.run import build_rule

    from .adversary import all_attack_names
    from .datasets import DATASETS
    from .models import MODELS
    from .partition import PARTITIONERS

    train_settings(cfg)  # the optimizer's name and the training hyperparameters
    DATASETS.get(cfg.dataset.split(":", 1)[0])
    if cfg.dataset.startswith("npz:") and not Path(cfg.dataset[4:]).expanduser().is_file():
        raise FileNotFoundError(f"dataset {cfg.dataset!r}: no such file {cfg.dataset[4:]!r}")
    PARTITIONERS.build(cfg.partitioner.name, **cfg.partitioner.params)
    MODELS.build(cfg.model.name, **cfg.model.params)
    check_root_dataset(cfg, build_rule(cfg))
    root = cfg.root_dataset
    if root is not None and root.name == "file" and not Path(
            str(root.params["path"])).expanduser().is_file():
        raise FileNotFoundError(f"root-dataset {root}: no such file {root.params['path']!r}")
    if cfg.central_dp:
        CentralDP.from_params(cfg.central_dp, rule=cfg.rule.name,
                              clients_per_round=cfg.clients_per_round)
    if cfg.num_malicious > 0:
        attack = cfg.attack.name
        if attack not in all_attack_names():
            raise KeyError(unknown_name_message("attack", attack, all_attack_names()))
        if not is_client_side_attack(attack) and not cfg.adversary:
            raise ValueError(
                f"attack {attack!r} is mounted by the simulation adversary, but adversary is "
                "empty: the run would be attack-free. Set adversary="
                "'simulations.adversary:build_adversary'"
            )
        if not is_client_side_attack(attack) and cfg.secagg:
            raise ValueError(
                f"attack {attack!r} crafts updates from the other clients' updates, which "
                "secure aggregation hides from the server: the run would be attack-free. Use "
                "a client-side attack (e.g. sign_flip, label_flip) with secagg"
            )


def validate(run_config: Mapping[str, Scalar] | RunConfig, num_clients: int) -> RunConfig:
    """Check the settings that depend on the number of clients before round 1.

    Everything that can be checked from the config alone is checked by
    :meth:`runconfig.config.RunConfig.from_flat`; in a simulation the engine also knows
    ``N`` and can read the data: without this, a setting only the clients read (more
    malicious clients than clients, an unknown attack parameter or a value the attack
    refuses on this data, a partition that cannot be made or is empty, PGD on inputs
    outside its box) would turn every reply into an error and every round into a skip.

    Returns
    -------
    RunConfig
        The parsed config.
    """
    import torch

    from aggregation.registry import make_generator
    from client.app import PGD_BOX, dp_sgd_options, pgd_options
    from client.local_dp import local_dp_update
    from client.malicious import is_client_side_attack, malicious_partitions
    from client.train import resolve_device
    from server.privacy import CentralDP
    from server.run import build_rule, check_defense_runs, server_device

    from .task import build_task

    cfg = run_config if isinstance(run_config, RunConfig) else RunConfig.from_flat(run_config)
    if num_clients < 1:
        raise ValueError(f"num-clients must be >= 1, got {num_clients}")
    check_names(cfg)
    malicious_partitions(num_clients, cfg.num_malicious, cfg.seed)
    task = build_task(cfg.flat)
    parts = task.partition_indices(num_clients)
    empty = [i for i, idx in enumerate(parts) if idx.numel() == 0]
    if empty:
        raise ValueError(
            f"{len(empty)} of {num_clients} partitions are empty (partition ids "
            f"{empty[:10]}{' ...' if len(empty) > 10 else ''}; partitioner "
            f"{cfg.partitioner.name} {dict(cfg.partitioner.params)}): their clients can never "
            "train, so every round that samples them gets error replies. Give every client "
            "data: lower num-clients, or change the partitioner's parameters (dirichlet: "
            "raise min_size or alpha)")
    if cfg.dp_sgd:
        dp_sgd_options(cfg)
    if cfg.adversarial_training:
        pgd_options(cfg)
        x = task.dataset.x_train
        lo, hi = PGD_BOX
        if float(x.min()) < lo or float(x.max()) > hi:
            raise ValueError(
                f"adversarial-training projects its inputs on [{lo}, {hi}], but dataset "
                f"{cfg.dataset!r} has training inputs in [{float(x.min()):.4g}, "
                f"{float(x.max()):.4g}]: every client would refuse to train. Scale the data "
                "into [0, 1] or drop adversarial-training")
    if cfg.num_malicious > 0 and is_client_side_attack(cfg.attack.name):
        _try_client_attack(cfg, task, parts, num_clients)
    if cfg.root_dataset is not None:  # the server's root dataset fits the task (FLTrust)
        task.root_data(cfg.root_dataset)
    if cfg.clients_per_round > num_clients:
        raise ValueError(
            f"clients-per-round={cfg.clients_per_round} exceeds num-clients={num_clients}: "
            "every round would wait node-wait-timeout for nodes that do not exist; lower "
            "clients-per-round"
        )
    if cfg.min_clients > num_clients and not cfg.central_dp:
        raise ValueError(
            f"min-clients={cfg.min_clients} exceeds num-clients={num_clients}: every round "
            "would wait node-wait-timeout and then be skipped; lower min-clients"
        )
    resolve_device(cfg.device)  # the clients run here: device=cuda needs CUDA here
    server_device(cfg.server_device)
    if cfg.central_dp:
        CentralDP.from_params(
            cfg.central_dp, rule=cfg.rule.name, clients_per_round=cfg.clients_per_round,
        ).check_nodes(num_clients)
    else:
        check_defense_runs(cfg, build_rule(cfg), cfg.clients_per_round or num_clients)
    if cfg.local_dp:
        p = dict(cfg.local_dp)
        local_dp_update(torch.zeros(2), float(p.pop("clipping_norm")), **p,
                        generator=make_generator(0))
    return cfg


def _try_client_attack(cfg: RunConfig, task: Any, parts: Sequence[Any],
                       num_clients: int) -> None:
    """Run the client-side attack once, as its first attacker would in the attack's first
    round, on a few of that client's examples and a small update: a parameter value the
    attack refuses (a label-flip mode, a trigger on flat inputs) is refused before round 1
    instead of turning every attacker's reply into an error."""
    import torch

    from client.malicious import BACKDOORS, malicious_partitions, reported_examples
    from client.steps import finish_state, prepare_client
    from server.rounds import MAX_NUM_EXAMPLES

    attack, params = cfg.attack.name, dict(cfg.attack.params)
    ds = task.dataset
    if attack in BACKDOORS and len(ds.input_shape) < 2:
        raise ValueError(
            f"attack {attack!r} stamps a trigger on images, but dataset {cfg.dataset!r} has "
            f"flat inputs {tuple(ds.input_shape)}: use a dataset of (C, H, W) images (digits, "
            "mnist, cifar10) or another attack")
    attackers = sorted(malicious_partitions(num_clients, cfg.num_malicious, cfg.seed))
    pid = attackers[0]
    node = {"partition-id": pid, "num-partitions": num_clients}
    idx = parts[pid][:8]
    r = cfg.attack_start_round
    global_state = task.build_model().state_dict()
    trained = {k: v + 1e-3 if v.is_floating_point() else v for k, v in global_state.items()}
    largest = max(int(parts[p].numel()) for p in attackers)
    try:
        client = prepare_client(cfg, node, r, ds.x_train[idx], ds.y_train[idx],
                                num_classes=task.num_classes)
        reported = reported_examples(client.role, largest, r)
        benign = torch.cat([v.reshape(-1) for v in trained.values() if v.is_floating_point()])
        finish_state(cfg, client, r, global_state, trained, benign=benign)
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise ValueError(
            f"attack {attack!r} (attack-params {params}) fails when a client runs it, so "
            f"every attacker's reply would be an error: {type(exc).__name__}: {exc}") from exc
    if reported > MAX_NUM_EXAMPLES:
        raise ValueError(
            f"attack {attack!r} (attack-params {params}) makes an attacker with {largest} "
            f"examples report {reported}, above the {MAX_NUM_EXAMPLES} the server accepts: "
            "every such reply would be refused as invalid; lower factor")


def run_in_process(
    run_config: Mapping[str, Scalar],
    *,
    num_clients: int | None = None,
    fault: FaultFn | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    components: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """Run one federation in this process; return the per-round metrics rows.

    ``run_config`` is the flat config plus the engine's keys: ``num-clients`` (unless
    ``num_clients`` is given), ``engine`` (``"per-client"``, the default: one ClientApp
    call per node; ``"batched"``: a round's clients trained as one computation, see
    :mod:`simulations.batched`) and ``reference`` (``"none"``, the default, or
    ``"honest-only"``, see :data:`REFERENCES`: the malicious clients' train messages are
    dropped, on top of ``fault``); ``components`` are extra round components.
    """
    from client.app import app as client_app
    from client.malicious import malicious_partitions
    from server.app import run_server

    n = int(num_clients if num_clients is not None else run_config["num-clients"])
    engine, reference = check_engine_keys(run_config)
    app_config = {k: v for k, v in run_config.items() if k not in ENGINE_KEYS}
    cfg = validate(app_config, n)
    if reference == "honest-only":
        fault = _honest_only(
            malicious_partitions(n, cfg.num_malicious, cfg.seed), fault)
    if engine == "batched" and keep_freed_memory():
        logging.getLogger("fedshield.engine").debug(
            "batched engine: glibc keeps freed memory for reuse (mallopt)")
    if engine == "batched" and cfg.secagg:
        logging.getLogger("fedshield.engine").warning(
            "batched engine: with secagg the clients train inside the secure-aggregation "
            "protocol's messages, which the batched engine does not take: every client is "
            "trained one by one by the ClientApp, as with engine=per-client")
    grid = InProcessGrid(client_app, app_config, n, fault=fault, batched=engine == "batched")
    # After round 1 everything the run keeps (modules, datasets, caches) exists: frozen out
    # of the garbage collector's reach, so that its full collections, which a round's
    # thousands of short-lived objects set off every few rounds, do not walk those hundreds
    # of thousands of objects again (measured at 1000 clients: 0.2-0.4 s rounds every few
    # rounds without it). Only when nothing else froze objects, and undone at the end.
    own_freeze = gc.get_freeze_count() == 0
    frozen = False

    def published(row: dict[str, Any]) -> None:
        nonlocal frozen
        if own_freeze and not frozen and row.get("round", 0) >= 1:  # the first trained round
            gc.collect()  # round 1's cyclic garbage is not frozen with the rest
            gc.freeze()
            frozen = True
        if on_round is not None:
            on_round(row)

    try:
        rows = run_server(grid, cfg, on_round=published, components=components)
    finally:
        if own_freeze:
            gc.unfreeze()
    if reference != "none":  # reports tell a reference run from a defense
        for row in rows:
            row["reference"] = reference
    return rows
