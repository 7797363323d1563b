"""Cost of secure aggregation next to a plain mean: one table, one run.

For each ``n`` and ``d`` it times one aggregation with every party in this process
(:func:`secagg.run_local`: the clients' work summed, plus the server's) and counts the bytes
one client sends and receives (protocol payload only: keys, shares, the masked vector; no
transport framing, no model download). ``plain`` is the float32 upload and the server's
weighted mean of the ``(n, d)`` stack. Training is not included: the column is the
overhead a round pays on top of it.

    python benchmarks/secagg.py                     # n = 10 20 50 100, d = 1e5 1e6
    python benchmarks/secagg.py --n 10 20 --d 100000
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from pathlib import Path

# run as a script, this file's folder leads sys.path and the file's name shadows the package
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from secagg import Msg, SecAggParams, run_local  # noqa: E402

VARIANTS: dict[str, dict[str, object]] = {
    "secure, all neighbours": {"neighbours": "all"},
    "secure, log n neighbours": {"neighbours": "log"},
    "hybrid PQ, log n": {"neighbours": "log", "key_agreement": "hybrid"},
}


def _size(m: Msg) -> int:
    return sum(len(b) for b in m.blobs.values()) + (0 if m.vector is None else m.vector.nbytes)


def plain(n: int, d: int, seed: int) -> tuple[float, int]:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    w = torch.arange(1, n + 1, dtype=torch.float64)
    t0 = time.perf_counter()
    _ = (w[:, None] * x).sum(0) / w.sum()
    return time.perf_counter() - t0, 4 * d


def secure(n: int, d: int, params: SecAggParams, seed: int) -> tuple[float, int]:
    rng = np.random.default_rng(seed)
    inputs = {1000 + i: (rng.normal(0, 0.1, d), int(rng.integers(1, 500))) for i in range(n)}
    sent: dict[int, int] = {}

    def count(stage: str, requests: Mapping[int, Msg], replies: Mapping[int, Msg]) -> None:
        for node, m in replies.items():
            sent[node] = sent.get(node, 0) + _size(m) + _size(requests[node])

    t0 = time.perf_counter()
    run_local(params, inputs, on_stage=count)
    return time.perf_counter() - t0, max(sent.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10, 20, 50, 100])
    ap.add_argument("--d", type=int, nargs="+", default=[100_000, 1_000_000])
    args = ap.parse_args()
    print(f"{'n':>4} {'d':>8}  {'variant':<26} {'seconds':>9} {'x plain':>8} {'KB/client':>10}")
    for d in args.d:
        for n in args.n:
            base_t, base_b = plain(n, d, 0)
            print(f"{n:>4} {d:>8}  {'plain mean':<26} {base_t:>9.3f} {1.0:>8.1f} {base_b / 1e3:>10.0f}")
            for name, kw in VARIANTS.items():
                t, b = secure(n, d, SecAggParams(**kw), 0)  # type: ignore[arg-type]
                print(f"{n:>4} {d:>8}  {name:<26} {t:>9.3f} {t / base_t:>8.1f} {b / 1e3:>10.0f}")


if __name__ == "__main__":
    main()
