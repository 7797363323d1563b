"""Simulation speed: a round's n clients trained by four paths, side by side in one run.

For each model (digits MLP and CNN) and each n (clients per round, every client sampled)
it prints the steady-state seconds per round of:

- **plain loop**: a per-client PyTorch loop, what ByzFL's and FLPoison's benchmarks do:
  for each client, load the global weights into one model, ``torch.optim.SGD``, its
  epochs of shuffled batches, its update; then the mean update. No messages, no server;
- **per-client engine**: ``run_in_process`` with ``engine = "per-client"``, the ClientApp
  called once per node (the whole round: messages, server aggregation, evaluation);
- **batched engine**: ``run_in_process`` with ``engine = "batched"`` (the same round, its
  training answered by :mod:`simulations.batched`);
- **batched, hashed**: the same with ``batch-order = "hashed"``: each client's batch order
  from a hash computed for all clients at once (:mod:`client.order`) instead of a
  ``torch.Generator`` per client;
- **batched core**: :func:`client.functional.local_train_stacked` on all n clients (from
  the global model expanded n times, as the engine starts them) and the mean update, the
  training alone (no messages, no server), as the plain loop.

Training is the same everywhere: digits, iid partition over n clients, 2 local epochs,
batch 32, SGD with lr 0.3 (the run config's defaults), on ``--device`` (default the CPU;
the engines' server aggregates there too). Engine figures are whole
rounds after the first (the first pays the imports and caches): the wall time from one
round's published metrics row to the next's; the loops are timed over ``--rounds`` rounds
after one warm-up round. Every path runs with the allocator setting the batched engine
makes (:func:`simulations.engine.keep_freed_memory`, glibc keeps freed memory), set first. The ratios are
the plain loop's seconds per round divided by the other path's (its rounds per second
over the plain loop's). Each row is measured in a fresh process (``--in-process``: all
in this one); with ``--repeats R`` every path is measured R times, one after another, and
the row gives the median seconds and the median of the R paired ratios (the box's speed
drifts between minutes more than a round's does between rounds).

    python benchmarks/simulation.py                      # n = 10 100 1000, mlp and cnn
    python benchmarks/simulation.py --n 100 --models mlp --threads 2
    python benchmarks/simulation.py --n 10 100 1000 --rounds 5 --repeats 3
    python benchmarks/simulation.py --n 100 1000 --models cnn --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# run as a script, this file's folder leads sys.path; the packages live one level up
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from aggregation.registry import derive_seed, make_generator  # noqa: E402
from client.functional import local_train_stacked  # noqa: E402
from client.train import TrainSettings  # noqa: E402
from simulations.config import resolve_config  # noqa: E402
from simulations.engine import keep_freed_memory, run_in_process  # noqa: E402
from simulations.models import MODELS  # noqa: E402
from simulations.task import build_task  # noqa: E402

TARGET = (1000, 20.0)  # at n = 1000: at least 20x the plain loop's rounds per second


def _config(model: str, n: int, rounds: int, device: str = "cpu") -> dict[str, Any]:
    return dict(resolve_config(None, [
        "dataset=digits", f"model={model}", f"num-clients={n}", "clients-per-round=0",
        "min-clients=1", "local-epochs=2", "batch-size=32", f"device={device}", "seed=0",
        f"server-device={device}",
        f"num-server-rounds={rounds}", "aggregator=mean",
    ]))


def _engine_seconds(flat: dict[str, Any], engine: str, batch_order: str = "generator") -> float:
    """The best whole round after the first: wall time from one round's published row to
    the next's (sampling, training, aggregation, evaluation, the metrics and audit)."""
    stamps: dict[int, float] = {}
    run_in_process({**flat, "engine": engine, "batch-order": batch_order},
                   on_round=lambda row: stamps.__setitem__(int(row["round"]),
                                                           time.perf_counter()))
    return min(stamps[r] - stamps[r - 1] for r in stamps if r >= 2)


def _settings(flat: dict[str, Any]) -> TrainSettings:
    return TrainSettings(epochs=int(flat["local-epochs"]), batch_size=int(flat["batch-size"]),
                         lr=float(flat["learning-rate"]))


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _plain_round(model: nn.Module, data: Sequence[tuple[Tensor, Tensor]],
                 st: TrainSettings, r: int) -> None:
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    g = _flat(model)
    total = torch.zeros_like(g)
    for i, (x, y) in enumerate(data):
        model.load_state_dict(global_state)
        opt = torch.optim.SGD(model.parameters(), lr=st.lr)
        gen = make_generator(derive_seed(0, "bench", i, r))
        for _ in range(st.epochs):
            for idx in torch.split(torch.randperm(x.shape[0], generator=gen), st.batch_size):
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()  # type: ignore[no-untyped-call]
                opt.step()
        total += _flat(model) - g
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(g + total / len(data), model.parameters())


def _batched_round(model: nn.Module, data: Sequence[tuple[Tensor, Tensor]],
                   st: TrainSettings, r: int) -> None:
    gens = [make_generator(derive_seed(0, "bench", i, r)) for i in range(len(data))]
    start = {name: p.detach().unsqueeze(0).expand(len(data), *p.shape)  # as the engine starts
             for name, p in model.named_parameters()}
    params, _ = local_train_stacked(model, start, data, st, generators=gens)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name].mean(0))


def _loop_seconds(step: Callable[[nn.Module, Sequence[tuple[Tensor, Tensor]],
                                  TrainSettings, int], None],
                  flat: dict[str, Any], n: int, rounds: int) -> float:
    device = torch.device(str(flat["device"]))
    task = build_task(flat)
    model = task.build_model().to(device)
    data = []
    for i in range(n):
        x, y = task.train_data({"partition-id": i, "num-partitions": n})
        data.append((x.to(device), y.to(device)))
    st = _settings(flat)
    step(model, data, st, 0)  # warm-up
    best = float("inf")
    for r in range(1, rounds + 1):
        _sync(device)
        t0 = time.perf_counter()
        step(model, data, st, r)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (a CUDA kernel returns before it is done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=MODELS.names())
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (best is printed)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default="cpu",
                   help="where every path trains and the engines' server aggregates: cpu, "
                        "cuda, cuda:1, ... (data and models moved there; the clients' batch "
                        "orders are drawn on the CPU, as in a run)")
    p.add_argument("--skip-per-client-engine-above", type=int, default=1000,
                   help="skip the per-client engine for larger n (it is the slowest path)")
    p.add_argument("--in-process", action="store_true",
                   help="measure every row in this process (default: each row in a fresh "
                        "process, so that one row's runs leave nothing behind for the next)")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure every path this many times, one after another; print the "
                        "median seconds and the median of each repeat's ratios")
    args = p.parse_args(argv)
    for name in ("rounds", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if min(args.n) < 1:
        p.error(f"--n takes client counts of at least 1, got {args.n}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch has no CUDA device "
                f"(torch {torch.__version__}); run with --device cpu")
    torch.set_num_threads(args.threads)
    freed = keep_freed_memory()  # what the batched engine sets: the same for every path
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, "
          f"load {os.getloadavg()[0]:.1f}, glibc keeps freed memory: {freed}, "
          f"device {_device_name(device)}")
    print(f"# seconds per round (best of {args.rounds} rounds; median of {args.repeats} "
          f"repeats); x = plain loop / path (median of the repeats' ratios)")
    head = ("model", "n", "plain loop", "per-client engine", "batched engine",
            "batched, hashed", "batched core", "x engine", "x hashed", "x core")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for model in args.models:
        for n in args.n:
            if not args.in_process and (len(args.models), len(args.n)) != (1, 1):
                _row_in_fresh_process(model, n, argv if argv is not None else sys.argv[1:])
                continue
            flat = _config(model, n, 1 + args.rounds, args.device)
            runs = [_measure(flat, n, args) for _ in range(args.repeats)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            x = {k: statistics.median(r["plain"] / r[k] for r in runs)
                 for k in ("batched", "hashed", "core")}
            print(f"| {model} | {n} | {med['plain']:.4f} | {med['per_client']:.4f} | "
                  f"{med['batched']:.4f} | {med['hashed']:.4f} | {med['core']:.4f} | "
                  f"{_ratio(x['batched'], n)} | {_ratio(x['hashed'], n)} | {x['core']:.1f} |",
                  flush=True)


def _row_in_fresh_process(model: str, n: int, argv: Sequence[str]) -> None:
    """Print the row of ``model`` at ``n`` measured by a fresh run of this script."""
    import subprocess

    rest: list[str] = []
    skip = False
    for a in argv:  # every option but the grid of rows
        if a in ("--n", "--models"):
            skip = True
        elif a.startswith("--"):
            skip = False
        if not skip:
            rest.append(a)
    done = subprocess.run(
        [sys.executable, __file__, *rest, "--n", str(n), "--models", model],
        capture_output=True, text=True)
    if done.returncode != 0:  # the row's own error, not only its exit status
        sys.stderr.write(done.stderr)
        raise SystemExit(f"the row {model} n={n} failed (exit status {done.returncode}); "
                         "its error output is above")
    print(done.stdout.strip().splitlines()[-1], flush=True)


def _measure(flat: dict[str, Any], n: int, args: argparse.Namespace) -> dict[str, float]:
    """Every path once, one after another (seconds per round, best of ``args.rounds``)."""
    return {
        "plain": _loop_seconds(_plain_round, flat, n, args.rounds),
        "core": _loop_seconds(_batched_round, flat, n, args.rounds),
        "batched": _engine_seconds(flat, "batched"),
        "hashed": _engine_seconds(flat, "batched", "hashed"),
        "per_client": (_engine_seconds(flat, "per-client")
                       if n <= args.skip_per_client_engine_above else float("nan")),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _ratio(x: float, n: int) -> str:
    """The ratio ``x``, marked ``!`` where it misses the target at the target's n."""
    return f"{x:.1f}{' !' if n == TARGET[0] and x < TARGET[1] else ''}"


if __name__ == "__main__":
    main()
