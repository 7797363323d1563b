"""Aggregation at the hardware limit: fedshield's rules next to Flower's, side by side.

For every rule, ``n`` clients and ``d`` parameters it times, in this one process and on
the same float32 inputs, fedshield's rule (``aggregation.get(...)`` on the ``(n, d)``
stack) and Flower's implementations of the same rule: the helpers of its current
strategies (``flwr.serverapp.strategy``, on the ``RecordDict`` replies a strategy
receives) and its legacy functions (``flwr.server.strategy.aggregate``, on lists of
NumPy arrays). It prints the best time of ``--repeats`` calls, the ratio of Flower's
fastest implementation of the same rule to ours, the peak memory of one call (each in a
fresh process: the peak resident set, ``VmHWM``, reset just before the call, minus the
resident set before it, so torch's allocations count), and the fraction of the
memory-bandwidth bound reached: the time to read the stack once at the rate of a large
copy measured in the same run, divided by our time. Then the server's whole aggregation
path (decode the replies' ``ArrayRecord`` s, validate, stack, rule, new model) at
``n = 100``, ``d = 1e6``.

    python benchmarks/aggregation.py --quick     # a subset, in under a minute
    python benchmarks/aggregation.py --device cuda --n 1000 --d 1e6 1e7 --no-flower   # ours on a GPU
    nohup python benchmarks/aggregation.py > results/bench-aggregation.txt &   # the grid

``f = n // 10`` Byzantine clients (rows shifted away from the honest ones); Multi-Krum
averages ``m = n - f`` updates weighted by example counts, as Flower's does. Cells that
would not fit in memory are skipped and say so; a Flower call estimated to run longer
than ``--cap`` seconds (its legacy Krum and Bulyan compute the ``n^2`` distances one
``np.linalg.norm`` at a time) is not run: its estimate is printed with ``~``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# run as a script, this file's folder leads sys.path; the packages live one level up
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import aggregation  # noqa: E402

RULES = ("median", "trimmed_mean", "krum", "multi_krum", "bulyan", "mean")
TARGETS = {"krum": 3.0, "multi_krum": 3.0, "median": 3.0, "trimmed_mean": 3.0, "bulyan": 20.0}
TARGET_CELL = (100, 1_000_000)  # (n, d) where the targets apply
GIB = 1 << 30
DEVICE = torch.device("cpu")
"""Where fedshield's rules and the server path run (``--device``); Flower's are NumPy, CPU."""


def _sync() -> None:
    """Wait for the device's queued work (a CUDA kernel returns before it is done)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


# --- the machine -------------------------------------------------------------------------

def _meminfo(key: str) -> int:
    """A ``/proc/meminfo`` entry in bytes (0 where there is none)."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return 0
    m = re.search(rf"^{key}:\s+(\d+) kB", text, flags=re.MULTILINE)
    return int(m.group(1)) * 1024 if m else 0


def available_memory(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process can still allocate: ``MemAvailable``, or less where a cgroup
    limits the process (a container's ``/proc/meminfo`` may show the host's); ``None``
    if neither is known. The cgroup's usage counts its page cache; the inactive part of
    it, which the kernel reclaims first, counts as available."""
    avail = _meminfo("MemAvailable") or None
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines()
                        if line.count(" ") == 1)
            used -= int(stat.get("inactive_file", 0))
            left = max(int(limit) - used, 0)
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    return avail


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, numpy {np.__version__}, "
            f"{_meminfo('MemTotal') / GIB:.0f} GiB RAM")


def copy_bandwidth(nbytes: int = GIB, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by the best of ``repeats`` large copies on
    :data:`DEVICE`."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    best = math.inf
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


# --- inputs --------------------------------------------------------------------------------

def make_updates(n: int, d: int, seed: int = 0, device: torch.device | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, d)`` float32 updates of scale 1e-3, the first ``n // 10`` shifted away, and
    ``(n,)`` example counts (on the CPU).

    ``device``: draw the updates there (a generator of that device: other values than the
    CPU's from the same seed) instead of on the CPU and copying them; at n = 1000,
    d = 1e7 the CPU draws 40 GB on one thread for more than a minute.
    """
    device = device or torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(50, 150, (n,), generator=g).to(torch.float32)
    if device.type != "cpu":
        g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, generator=g, device=device)
    x.mul_(1e-3)
    x[: n // 10] += 5e-3
    return x, counts


def flower_contents(x: torch.Tensor, counts: torch.Tensor) -> list[Any]:
    """The replies' contents a current Flower strategy aggregates (one array per client)."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    rows = x.numpy()
    return [RecordDict({"arrays": ArrayRecord([rows[i]]),
                        "metrics": MetricRecord({"num-examples": int(counts[i])})})
            for i in range(x.shape[0])]


def flower_results(x: torch.Tensor, counts: torch.Tensor) -> list[tuple[list[np.ndarray], int]]:
    """What Flower's legacy functions take: ``(arrays, num_examples)`` per client (views)."""
    rows = x.numpy()
    return [([rows[i]], int(counts[i])) for i in range(x.shape[0])]


# --- the implementations -------------------------------------------------------------------

@dataclass(frozen=True)
class Impl:
    """One implementation of a rule: how to build its input and run it."""

    label: str  # "fedshield", "flower", "flower-legacy"
    same_rule: bool  # computes the same rule as ours (the ratio is against these)
    inputs: str  # "tensor", "contents" or "results"
    run: Callable[[Any, torch.Tensor, int], object]  # (input, counts, f) -> result
    note: str = ""
    # extra memory beyond the inputs, in stacks (for the fits-in-memory check)
    working_stacks: float = 1.0
    # number of np.linalg.norm calls on d-vectors, if it computes distances one by one
    pairwise_norms: Callable[[int, int], int] | None = None


def _ours(rule: str) -> Callable[[Any, torch.Tensor, int], object]:
    def run(x: torch.Tensor, counts: torch.Tensor, f: int) -> object:
        if rule == "mean":
            return aggregation.get("mean")(x, counts).update
        if rule == "median":
            return aggregation.get("median")(x).update
        if rule == "multi_krum":
            return aggregation.get("multi_krum", f=f, use_weights=True)(x, counts).update
        return aggregation.get(rule, f=f)(x).update
    return run


def _flower(rule: str) -> Callable[[Any, torch.Tensor, int], object]:
    """Flower's current strategy: its helpers, and what ``aggregate_train`` does around them."""
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
    from flwr.serverapp.strategy.multikrum import select_multikrum
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    def layers(contents: list[Any]) -> list[np.ndarray]:  # FedMedian / FedTrimmedAvg, one key
        key = next(iter(contents[0]["arrays"].keys()))
        return [c["arrays"][key].numpy() for c in contents]

    def run(contents: list[Any], counts: torch.Tensor, f: int) -> object:
        n = len(contents)
        if rule == "mean":
            return aggregate_arrayrecords(contents, "num-examples")
        if rule == "median":
            return Array(np.asarray(np.median(np.stack(layers(contents)), axis=0)))
        if rule == "trimmed_mean":
            return Array(np.asarray(trim_mean(np.stack(layers(contents)), (f + 0.5) / n)))
        if rule in ("krum", "multi_krum"):
            m = 1 if rule == "krum" else n - f
            return aggregate_arrayrecords(select_multikrum(contents, f, m), "num-examples")
        # Bulyan.aggregate_train: theta picked at once by Multi-Krum score, then the
        # coordinate-wise phase
        theta, beta = n - 2 * f, n - 4 * f
        selected = select_multikrum(contents, f, theta)
        keys = list(selected[0]["arrays"].keys())
        arrays = [c["arrays"].to_numpy_ndarrays() for c in selected]
        median = [np.median(a, axis=0) for a in zip(*arrays, strict=True)]
        closest = aggregate_n_closest_weights(median, arrays, beta)
        return ArrayRecord(dict(zip(keys, (Array(np.asarray(a)) for a in closest), strict=True)))
    return run


def _flower_legacy(rule: str) -> Callable[[Any, torch.Tensor, int], object]:
    from flwr.server.strategy import aggregate as legacy

    def run(results: list[tuple[list[np.ndarray], int]], counts: torch.Tensor, f: int) -> object:
        n = len(results)
        if rule == "mean":
            return legacy.aggregate(results)
        if rule == "median":
            return legacy.aggregate_median(results)
        if rule == "trimmed_mean":
            return legacy.aggregate_trimmed_avg(results, (f + 0.5) / n)
        if rule == "krum":
            return legacy.aggregate_krum(results, f, 0)
        if rule == "multi_krum":
            return legacy.aggregate_krum(results, f, n - f)
        # aggregate_bulyan removes the picks from the list it is given
        return legacy.aggregate_bulyan(list(results), f, legacy.aggregate_krum, to_keep=0)
    return run


def _norms_krum(n: int, f: int) -> int:
    return n * n


def _norms_bulyan(n: int, f: int) -> int:
    return sum((n - t) ** 2 for t in range(n - 2 * f))


def implementations(rule: str) -> list[Impl]:
    ours = Impl("fedshield", True, "tensor", _ours(rule), working_stacks=0.5)
    current = Impl("flower", rule != "bulyan", "contents", _flower(rule), working_stacks=3.0,
                   note="picks theta at once by Multi-Krum (not iterated Krum)"
                   if rule == "bulyan" else "")
    legacy = Impl("flower-legacy", True, "results", _flower_legacy(rule), working_stacks=2.0,
                  pairwise_norms=_norms_krum if rule in ("krum", "multi_krum")
                  else _norms_bulyan if rule == "bulyan" else None)
    return [ours, current, legacy]


def build_input(impl: Impl, x: torch.Tensor, counts: torch.Tensor) -> Any:
    if impl.inputs == "tensor":
        return x.to(DEVICE)
    if impl.inputs == "contents":
        return flower_contents(x, counts)
    return flower_results(x, counts)


def norm_seconds(d: int) -> float:
    """Seconds of one ``np.linalg.norm(a - b)`` on d-vectors (what Flower's legacy loops do)."""
    a = np.ones(d, dtype=np.float32)
    b = np.zeros(d, dtype=np.float32)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        np.linalg.norm(a - b)
        best = min(best, time.perf_counter() - t0)
    return best


def _bound(impl: Impl, data: Any, counts: torch.Tensor, f: int) -> Callable[[], object]:
    """One call of ``impl`` on ``data`` (holding the input only while the caller does),
    finished on the device when it returns."""
    if impl.inputs != "tensor":
        return lambda: impl.run(data, counts, f)
    on_device = counts.to(DEVICE)

    def call() -> object:
        out = impl.run(data, on_device, f)
        _sync()
        return out
    return call


def best_time(fn: Callable[[], object], repeats: int, long_call: float = 20.0) -> float:
    """Best wall time of ``repeats`` calls (a single call when one takes over ``long_call``)."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if best > long_call:
            break
    return best


# --- peak memory, one fresh process per measurement -------------------------------------

def _vm(key: str) -> int:
    m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(m.group(1)) * 1024 if m else 0


def _peak_of(fn: Callable[[], object]) -> int:
    """Bytes the resident set grew to above its size before ``fn`` (``VmHWM`` reset first)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    before = _vm("VmRSS")
    fn()
    return max(0, _vm("VmHWM") - before)


def _cuda_peak_of(fn: Callable[[], object]) -> int:
    """Bytes the CUDA allocator's allocations grew to above their size before ``fn`` (where
    the rule's inputs and the server's float64 stack live with ``--device cuda``)."""
    torch.cuda.synchronize(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    before = torch.cuda.memory_allocated(DEVICE)
    fn()
    torch.cuda.synchronize(DEVICE)
    return max(0, torch.cuda.max_memory_allocated(DEVICE) - before)


def probe(kind: str, rule: str, n: int, d: int) -> None:
    """Child process: build the inputs, run one call, print its peak extra memory (JSON).

    A first call on ``d = 1000`` loads what every later call reuses (thread pools, BLAS
    buffers), so the figure is what each round costs, not the process's first call.
    """
    f = n // 10
    if kind == "server":
        server_path(server_fixture(n, 1000), rule, f)
        fixture = server_fixture(n, d)
        peak = (_cuda_peak_of(lambda: server_path(fixture, rule, f)) if DEVICE.type == "cuda"
                else _peak_of(lambda: server_path(fixture, rule, f)))
    else:
        impl = next(i for i in implementations(rule) if i.label == kind)
        where = DEVICE if impl.inputs == "tensor" else torch.device("cpu")
        small, small_counts = make_updates(n, 1000, device=where)
        _bound(impl, build_input(impl, small, small_counts), small_counts, f)()
        x, counts = make_updates(n, d, device=where)
        data = build_input(impl, x, counts)
        del x  # Flower's contents hold their own copy; the other inputs keep x alive
        call = _bound(impl, data, counts, f)
        on_device = impl.inputs == "tensor" and DEVICE.type == "cuda"
        peak = _cuda_peak_of(call) if on_device else _peak_of(call)
    print(json.dumps({"peak_extra": peak}))


def measure_peak(kind: str, rule: str, n: int, d: int) -> int | None:
    """Peak extra bytes of one call, measured in a fresh process; ``None`` if it failed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", str(DEVICE),
           "--probe", kind, rule, str(n), str(d)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=True)
        return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_extra"])
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError) as exc:
        err = getattr(exc, "stderr", None) or ""  # the probe's own error, not only its status
        if isinstance(err, bytes):  # TimeoutExpired keeps bytes even with text=True
            err = err.decode(errors="replace")
        tail = "\n    ".join(str(err).strip().splitlines()[-5:])
        print(f"  (memory probe {kind} {rule} n={n} d={d} failed: {exc}"
              f"{':' + chr(10) + '    ' + tail if tail else ''})", file=sys.stderr)
        return None


# --- the server's whole aggregation path ---------------------------------------------------

@dataclass
class ServerFixture:
    global_state: dict[str, torch.Tensor]
    records: list[Any]  # one ArrayRecord per client, as the transport receives it
    counts: list[int]


def server_fixture(n: int, d: int) -> ServerFixture:
    from flwr.app import ArrayRecord

    sizes = [d // 2, d // 4, d // 8]
    sizes.append(d - sum(sizes))
    g = torch.Generator().manual_seed(1)
    global_state = {f"layer{i}.weight": torch.randn(s, generator=g) for i, s in enumerate(sizes)}
    x, counts = make_updates(n, d)
    records = []
    for i in range(n):
        parts = torch.split(x[i], sizes)
        records.append(ArrayRecord({k: v + u for (k, v), u in
                                    zip(global_state.items(), parts, strict=True)}))
    return ServerFixture(global_state, records, [int(c) for c in counts])


def server_path(fx: ServerFixture, rule: str, f: int) -> dict[str, float]:
    """decode -> validate -> stack -> rule -> new model; seconds per stage."""
    from server.rounds import (
        ModelSpec,
        Reply,
        decode_train_reply,
        stack_updates,
        validate_replies,
    )

    spec = ModelSpec.from_state(fx.global_state)
    seconds: dict[str, float] = {}
    _sync()
    t0 = time.perf_counter()
    replies = [
        decode_train_reply(Reply(i, arrays={"arrays": rec.to_torch_state_dict()},
                                 metrics={"metrics": {"num-examples": c, "partition-id": i}}))
        for i, (rec, c) in enumerate(zip(fx.records, fx.counts, strict=True))
    ]
    t1 = time.perf_counter()
    accepted, _ = validate_replies(replies, spec)
    t2 = time.perf_counter()
    g = spec.flatten(fx.global_state).to(DEVICE)  # the server's aggregation device
    updates, weights = stack_updates(accepted, g, spec)
    _sync()
    t3 = time.perf_counter()
    agg = aggregation.get(rule, f=f) if rule not in ("mean", "median") else aggregation.get(rule)
    result = agg(updates, weights)
    _sync()
    t4 = time.perf_counter()
    new_model = spec.unflatten(g + result.update)
    _sync()
    t5 = time.perf_counter()
    assert len(new_model) == len(fx.global_state)
    seconds.update(decode=t1 - t0, validate=t2 - t1, stack=t3 - t2, rule=t4 - t3,
                   new_model=t5 - t4, total=t5 - t0)
    return seconds


# --- the table -------------------------------------------------------------------------------

def _device_name() -> str:
    if DEVICE.type == "cuda":
        return f"{DEVICE} ({torch.cuda.get_device_name(DEVICE)}, "\
               f"{torch.cuda.get_device_properties(DEVICE).total_memory / GIB:.0f} GiB)"
    return str(DEVICE)


def _fmt_s(t: float | None, estimated: bool = False) -> str:
    if t is None:
        return "-"
    return f"{'~' if estimated else ''}{t:.3f}" if t < 100 else f"{'~' if estimated else ''}{t:.0f}"


def run_grid(rules: Sequence[str], ns: Sequence[int], ds: Sequence[int], repeats: int,
             cap: float, memory: Sequence[str], bandwidth: float,
             rows_out: list[dict[str, Any]], flower: bool = True) -> None:
    """Time every rule and implementation per (n, d) cell; probe the memory of ``memory``;
    without ``flower``, fedshield's rules alone (their inputs drawn on :data:`DEVICE`)."""
    header = (f"| {'rule':12} | {'n':>4} | {'d':>5} | {'fedshield s':>11} | {'flower s':>9} | "
              f"{'legacy s':>9} | {'ratio':>7} | {'peak/stack ours':>15} | "
              f"{'flower':>6} | {'legacy':>6} | {'bw bound':>8} | {'load':>4} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|", flush=True)
    for n in ns:
        f = n // 10
        for d in ds:
            stack = 4 * n * d
            found = available_memory()
            avail = 16 * GIB if found is None else found
            on_host = flower or DEVICE.type == "cpu"  # else the inputs live on the device
            if not on_host:  # drawn on the device: the stack and a rule's work must fit there
                torch.cuda.empty_cache()
                free = torch.cuda.mem_get_info(DEVICE)[0]
                if 1.5 * stack > 0.9 * free:
                    print(f"| {'(all rules)':12} | {n:>4} | {d:>5.0e} | skipped: a "
                          f"{stack / GIB:.1f} GiB stack and its work do not fit in "
                          f"{free / GIB:.1f} GiB free on {DEVICE} |", flush=True)
                    continue
            if on_host and 1.5 * stack > 0.8 * avail:
                print(f"| {'(all rules)':12} | {n:>4} | {d:>5.0e} | skipped: a "
                      f"{stack / GIB:.1f} GiB stack does not fit in {avail / GIB:.1f} GiB "
                      "available |", flush=True)
                continue
            x, counts = make_updates(n, d, device=None if flower else DEVICE)
            t_norm = norm_seconds(d)
            cell: list[dict[str, Any]] = []
            for rule in rules:
                if rule == "bulyan" and n < 4 * f + 3:
                    continue
                row: dict[str, Any] = {"rule": rule, "n": n, "d": d, "f": f,
                                       "load": os.getloadavg()[0]}
                for impl in implementations(rule):
                    if not flower and impl.label != "fedshield":
                        row[impl.label] = {"skipped": "--no-flower", "off": True}
                        continue
                    # this process holds the tensor, plus Flower's serialised contents
                    held = stack * (2 if impl.inputs == "contents" else 1)
                    need = held + impl.working_stacks * stack
                    if on_host and need > 0.8 * avail:
                        row[impl.label] = {"skipped": f"needs ~{need / GIB:.1f} GiB"}
                        continue
                    if impl.inputs == "tensor" and DEVICE.type == "cuda":
                        torch.cuda.empty_cache()  # the allocator's cached blocks count as free
                        free = torch.cuda.mem_get_info(DEVICE)[0]
                        # the stack itself is there already when it was drawn there
                        need = (int(not x.is_cuda) + impl.working_stacks) * stack
                        if need > 0.9 * free:
                            row[impl.label] = {"skipped": f"needs ~{need / GIB:.1f} GiB on "
                                               f"{DEVICE}, {free / GIB:.1f} GiB free"}
                            continue
                    if impl.pairwise_norms is not None:
                        est = impl.pairwise_norms(n, f) * t_norm
                        if est > cap:
                            row[impl.label] = {"seconds": est, "estimated": True}
                            continue
                    small, small_counts = make_updates(n, 1000, device=x.device)
                    _bound(impl, build_input(impl, small, small_counts), small_counts, f)()  # warm
                    secs = best_time(_bound(impl, build_input(impl, x, counts), counts, f),
                                     repeats)
                    row[impl.label] = {"seconds": secs, "estimated": False}
                ours = row["fedshield"].get("seconds")  # None: skipped (device memory)
                same = [row[i.label]["seconds"] for i in implementations(rule)[1:]
                        if i.same_rule and "seconds" in row[i.label]]
                anyf = [row[i.label]["seconds"] for i in implementations(rule)[1:]
                        if "seconds" in row[i.label]]
                row["ratio"] = min(same) / ours if same and ours else None
                row["ratio_any_flower"] = min(anyf) / ours if anyf and ours else None
                row["bandwidth_fraction"] = stack / bandwidth / ours if ours else None
                cell.append(row)
            del x
            for row in cell:  # each probe alone in its own process, this one holding no stack
                for label, entry in row.items():
                    if label in memory and isinstance(entry, dict) and \
                            entry.get("estimated") is False:
                        peak = measure_peak(label, row["rule"], n, d)
                        if peak is not None:
                            entry["peak_over_stack"] = (stack + peak) / stack
                rows_out.append(row)
                _print_row(row)


def _cell(entry: dict[str, Any]) -> str:
    if entry.get("off"):
        return "-"
    if "skipped" in entry:
        return "n/f"
    return _fmt_s(entry["seconds"], entry["estimated"])


def _peak(entry: dict[str, Any]) -> str:
    p = entry.get("peak_over_stack")
    return "-" if p is None else f"{p:.2f}x"


def _print_row(row: dict[str, Any]) -> None:
    ratio = row["ratio"]
    flag = ""
    if ratio is not None and row["rule"] in TARGETS and (row["n"], row["d"]) == TARGET_CELL:
        flag = " " if ratio >= TARGETS[row["rule"]] else "!"
    text = "-" if ratio is None else f"{ratio:.1f}x{flag}"
    print(f"| {row['rule']:12} | {row['n']:>4} | {row['d']:>5.0e} | "
          f"{_cell(row['fedshield']):>11} | {_cell(row['flower']):>9} | "
          f"{_cell(row['flower-legacy']):>9} | {text:>7} | {_peak(row['fedshield']):>15} | "
          f"{_peak(row['flower']):>6} | {_peak(row['flower-legacy']):>6} | "
          f"{_percent(row['bandwidth_fraction']):>8} | {row['load']:>4.1f} |", flush=True)


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def run_server(rules: Sequence[str], n: int, d: int, repeats: int, memory: bool,
               rows_out: list[dict[str, Any]]) -> None:
    """Time the server's aggregation path stage by stage; probe its memory if asked."""
    fx = server_fixture(n, d)
    f = n // 10
    print(f"\nServer path at n={n}, d={d:.0e} (ArrayRecord -> decode_train_reply -> "
          "validate_replies -> stack_updates (float64) -> rule -> new model), best of "
          f"{repeats}, seconds:")
    print("| rule         | decode | validate | stack | rule  | new model | total | peak/stack |")
    print("|--------------|--------|----------|-------|-------|-----------|-------|------------|")
    for rule in rules:
        best: dict[str, float] | None = None
        for _ in range(repeats):
            s = server_path(fx, rule, f)
            best = s if best is None or s["total"] < best["total"] else best
        assert best is not None
        peak = measure_peak("server", rule, n, d) if memory else None
        # relative to the float32 stack the replies amount to
        ratio = "-" if peak is None else f"{(4 * n * d + peak) / (4 * n * d):.2f}x"
        print(f"| {rule:12} | {best['decode']:6.3f} | {best['validate']:8.3f} | "
              f"{best['stack']:5.3f} | {best['rule']:5.3f} | {best['new_model']:9.3f} | "
              f"{best['total']:5.3f} | {ratio:>10} |", flush=True)
        rows_out.append({"server_path": rule, "n": n, "d": d, **best,
                         "peak_extra": peak})


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a subset, in under a minute")
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    p.add_argument("--n", nargs="+", type=int, default=[10, 100, 1000])
    p.add_argument("--d", nargs="+", type=float, default=[1e5, 1e6, 1e7])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int,
                   help="threads for torch and for NumPy's BLAS alike (default: as found); "
                        "1 compares single-threaded code, which a loaded machine skews less")
    p.add_argument("--cap", type=float, default=600.0,
                   help="seconds: Flower calls estimated to take longer are not run")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--no-server", action="store_true", help="skip the server path")
    p.add_argument("--no-flower", action="store_true",
                   help="fedshield's rules alone, inputs drawn on --device (Flower's NumPy "
                        "implementations run on the CPU for minutes a cell at n = 1000)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--device", default="cpu",
                   help="where fedshield's rules and the server path run: cpu, cuda, cuda:1, "
                        "... (Flower's implementations are NumPy: always the CPU)")
    p.add_argument("--probe", nargs=4, metavar=("KIND", "RULE", "N", "D"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or (args.threads is not None and args.threads < 1):
        p.error(f"--repeats and --threads must be at least 1, got {args.repeats} and "
                f"{args.threads}")
    if min(args.n) < 1 or min(args.d) < 1:
        p.error(f"--n and --d take sizes of at least 1, got {args.n} and {args.d}")
    if args.cap < 0:
        p.error(f"--cap is in seconds, at least 0, got {args.cap}")
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch has no CUDA device "
                f"(torch {torch.__version__}); run with --device cpu")
    if args.probe:
        kind, rule, n, d = args.probe
        probe(kind, rule, int(n), int(float(d)))
        return 0
    if args.threads:
        from threadpoolctl import threadpool_limits  # scikit-learn's dependency

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads, user_api="blas")  # NumPy's, for Flower's code
    ns, ds, repeats, cap = args.n, [int(d) for d in args.d], args.repeats, args.cap
    server_n, server_d, server_rules = 100, 1_000_000, [r for r in args.rules if r != "mean"]
    memory = [] if args.no_memory else ["fedshield", "flower", "flower-legacy"]
    server_memory = not args.no_memory
    if args.quick:
        ns, ds, repeats, cap = [100], [100_000], 2, 5.0
        memory = memory[:1]
        server_n, server_d, server_rules, server_memory = 100, 100_000, ["krum"], False
    rows: list[dict[str, Any]] = []
    bandwidth = copy_bandwidth()
    print(f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the start "
          "(the 'load' column: when each row was timed)")
    print(f"fedshield's rules and the server path on {_device_name()}; Flower's "
          "implementations (NumPy) on the CPU")
    print(f"Copy bandwidth: {bandwidth / 1e9:.1f} GB/s on {DEVICE} (read + write, best of 5 "
          "copies of 1 GiB); 'bw bound' = (stack bytes / bandwidth) / fedshield's time")
    print(f"Best of {repeats} calls, float32, f = n // 10; ratio = Flower's fastest "
          "implementation of the same rule / fedshield ('!' below the issue's target); "
          "peak = (stack + peak extra bytes of one call) / stack, each in a fresh process")
    print(f"Flower calls estimated over {cap:g} s are not run (~estimate); "
          "n/f = does not fit in memory\n")
    if args.no_flower:
        memory = [m for m in memory if m == "fedshield"]
    run_grid(args.rules, ns, ds, repeats, cap, memory, bandwidth, rows, flower=not args.no_flower)
    if not args.no_server:
        run_server(server_rules, server_n, server_d, repeats, server_memory, rows)
    bulyan_rows = [r for r in rows if r.get("rule") == "bulyan" and r.get("ratio_any_flower")]
    if bulyan_rows:
        print("\nFlower's current Bulyan picks its theta updates at once by Multi-Krum score, "
              "a different (cheaper, weaker) selection than the paper's iterated Krum that "
              "ours and Flower's legacy function compute; against it the ratios are: " +
              ", ".join(f"n={r['n']} d={r['d']:.0e}: {r['ratio_any_flower']:.1f}x"
                        for r in bulyan_rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
