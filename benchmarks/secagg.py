"""Cost of secure aggregation next to a plain round: one table, one run.

For each ``n`` and ``d`` and each variant it measures, with every party in this process:

- **client s**: the slowest client's work in the round, stage by stage (the clients of a
  round work in parallel, so a round waits for the slowest at every stage): local
  training, serialising its upload, and (secure variants) its protocol steps;
- **server s**: the server's work (plain: deserialising the ``n`` uploads and the weighted
  mean; secure: every protocol step, unmasking included);
- **round s** = client s + server s: the round's compute on the critical path (no network);
- **x plain**: round s over the plain round's; **x plain (no train)**: the same without the
  training time (the overhead on what the server and the wire do), both reported because
  training cost depends on the model and the data;
- **KB/client**: the bytes one client sends and receives (protocol payload: keys, shares,
  the masked vector; plain: the float32 upload; no model download, no transport framing).

Training is the project's local training (``client/train.py``: SGD, 2 local epochs, batch
32, the run config's defaults) of an MLP ``64 -> h -> 10`` with ``h`` chosen so that it has
about ``d`` parameters, on ``ceil(1797 / n)`` examples (a ``digits`` partition; synthetic
values of that shape). Variants: plain mean; secure mean with all neighbours (SecAgg);
with ``2 ceil(log2 n)`` neighbours (SecAgg+); the hybrid X25519 + ML-KEM-768 variant with
log n neighbours; grouped robust secure aggregation (``G = max(2, n // 10)`` groups with
all neighbours inside a group, then the coordinate-wise median of the ``G`` group means).

    python benchmarks/secagg.py                              # n = 10 20 50 100, d = 1e5 1e6
    python benchmarks/secagg.py --n 100 --d 100000 1000000   # the target's row
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path

# run as a script, this file's folder leads sys.path and the file's name shadows the package
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from client.train import TrainSettings, local_train  # noqa: E402
from secagg import STAGES, Msg, SecAggParams, run_local  # noqa: E402

VARIANTS: dict[str, dict[str, object]] = {
    "secure, all neighbours": {"neighbours": "all"},
    "secure, log n neighbours": {"neighbours": "log"},
    "hybrid PQ, log n": {"neighbours": "log", "key_agreement": "hybrid"},
    "grouped robust (median)": {"neighbours": "all", "groups": True},
}
DIGITS = 1797


def _size(m: Msg) -> int:
    return sum(len(b) for b in m.blobs.values()) + (0 if m.vector is None else m.vector.nbytes)


def train_seconds(n: int, d: int, seed: int) -> float:
    """One client's local training of a ``d``-parameter MLP on its ``digits``-sized partition."""
    h = max(1, round((d - 10) / 75))  # 64 h + h + 10 h + 10 parameters
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, h), nn.ReLU(), nn.Linear(h, 10))
    m = math.ceil(DIGITS / n)
    x = torch.randn(m, 64, generator=g)
    y = torch.randint(0, 10, (m,), generator=g)
    settings = TrainSettings(epochs=2, batch_size=32, lr=0.3)
    best = math.inf
    for _ in range(3):  # the first call pays torch's one-off set-up: the best of three
        t0 = time.perf_counter()
        local_train(model, x, y, settings, device=torch.device("cpu"), generator=g)
        best = min(best, time.perf_counter() - t0)
    return best


def serialise_seconds(d: int, seed: int) -> tuple[float, float]:
    """``(client, server)`` seconds to turn a float32 update into bytes and back."""
    u = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    blob = u.numpy().tobytes()
    t1 = time.perf_counter()
    _ = torch.from_numpy(np.frombuffer(blob, dtype=np.float32).copy())
    return t1 - t0, time.perf_counter() - t1


def plain(n: int, d: int, seed: int, train: float) -> tuple[float, float, int]:
    """``(client s, server s, bytes)`` of a plain round."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    w = torch.arange(1, n + 1, dtype=torch.float32)
    ser, deser = serialise_seconds(d, seed)
    t0 = time.perf_counter()
    _ = (w[:, None] * x).sum(0) / w.sum()
    return train + ser, n * deser + time.perf_counter() - t0, 4 * d


def secure(n: int, d: int, params: SecAggParams, seed: int, train: float, *, groups: int = 0
           ) -> tuple[float, float, int]:
    """``(client s, server s, bytes)`` of a secure round (grouped: ``groups`` sessions)."""
    rng = np.random.default_rng(seed)
    inputs = {1000 + i: (rng.normal(0, 0.1, d), int(rng.integers(1, 500))) for i in range(n)}
    nodes = sorted(inputs)
    parts = [nodes[g::groups] for g in range(groups)] if groups else [nodes]
    sent: dict[int, int] = {}

    def count(stage: str, requests: Mapping[int, Msg], replies: Mapping[int, Msg]) -> None:
        for node, m in replies.items():
            sent[node] = sent.get(node, 0) + _size(m) + _size(requests[node])

    stage_client = dict.fromkeys(STAGES, 0.0)
    server = 0.0
    means = []
    for g, part in enumerate(parts):
        times: dict[str, dict[str, float]] = {}
        res = run_local(params, {k: inputs[k] for k in part}, session=f"1/{g}", on_stage=count,
                        times=times)
        means.append(torch.from_numpy(res.mean()))
        for stage, t in times.items():  # groups run in parallel; the server serves each
            stage_client[stage] = max(stage_client[stage], t["client-max"])
            server += t["server"]
    if groups:
        t0 = time.perf_counter()
        _ = torch.stack(means).median(dim=0).values
        server += time.perf_counter() - t0
    ser, deser = serialise_seconds(d, seed)  # the masked vectors travel as bytes too
    return train + ser + sum(stage_client.values()), server + n * deser, max(sent.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10, 20, 50, 100])
    ap.add_argument("--d", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                    metavar="VARIANT", help=f"a subset of: {'; '.join(VARIANTS)}")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one core per party, as on a client device; stable timings
    print(f"{'n':>4} {'d':>8}  {'variant':<25} {'client s':>9} {'server s':>9} {'round s':>8} "
          f"{'x plain':>7} {'x plain (no train)':>18} {'KB/client':>9}", flush=True)
    for d in args.d:
        for n in args.n:
            train = train_seconds(n, d, 0)
            c, s, b = plain(n, d, 0, train)
            base, base_nt = c + s, c + s - train
            print(f"{n:>4} {d:>8}  {'plain mean':<25} {c:>9.3f} {s:>9.3f} {base:>8.3f} "
                  f"{1.0:>7.1f} {1.0:>18.1f} {b / 1e3:>9.0f}   (training {train:.3f} s)", flush=True)
            for name in args.variants:
                kw = dict(VARIANTS[name])
                groups = max(2, n // 10) if kw.pop("groups", False) else 0
                c, s, b = secure(n, d, SecAggParams(**kw), 0, train,  # type: ignore[arg-type]
                                 groups=groups)
                r = c + s
                print(f"{n:>4} {d:>8}  {name:<25} {c:>9.3f} {s:>9.3f} {r:>8.3f} "
                      f"{r / base:>7.1f} {(r - train) / base_nt:>18.1f} {b / 1e3:>9.0f}",
                      flush=True)


if __name__ == "__main__":
    main()
