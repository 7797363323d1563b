#!/usr/bin/env bash
# The GPU measurements of the README's "On a GPU" section in one go, on a machine with
# CUDA and fedshield's requirements installed:
#
#     bash benchmarks/gpu.sh [OUT_DIR]        # default results/gpu
#
# Each step runs under its own time limit (seconds, below) and writes its output to
# OUT_DIR/<step>.txt as it goes (OUT_DIR relative to where the script is called), so a step that runs out of time leaves what it measured.
# In order: the CUDA tests (stacked training against local_train, the batched engine
# against the ClientApp, the aggregation rules and attacks against the CPU), the
# aggregation benchmark at n = 1000, d = 1e6 (every rule) and d = 1e7 (the Krum family),
# fedshield's rules alone (Flower's are NumPy: the CPU table has them; peak memory at
# d = 1e6 only: each probe draws its inputs again in a fresh process), then the
# simulation benchmark with the CNN at n = 100 and 1000. PYTHON picks the interpreter.
set -u -o pipefail
PY=${PYTHON:-python}
OUT_DIR=$(realpath -m "${1:-results/gpu}")  # as given from where it was called
LIMIT_TESTS=${LIMIT_TESTS:-300}
LIMIT_AGGREGATION=${LIMIT_AGGREGATION:-180}
LIMIT_SIMULATION=${LIMIT_SIMULATION:-300}
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT_DIR" || exit 1

"$PY" - <<'PYEOF' 2>&1 | tee "$OUT_DIR/machine.txt" || exit 1
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device for torch {torch.__version__}: this script measures the GPU")
import flwr, opacus  # noqa: E401,F401 - fedshield's requirements, before any long step
import client.app, server.app  # noqa: E401,F401
print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda}),"
      f" flwr {flwr.__version__}, Python {sys.version.split()[0]}")
PYEOF

status=0
step() {  # step NAME LIMIT COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout -k 30 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit status $rc$([ "$rc" = 124 ] && echo ' (out of time)')"
    [ "$rc" = 0 ] || status=1
}

step cuda-tests "$LIMIT_TESTS" "$PY" -m pytest -q -p no:cacheprovider -k cuda tests
step aggregation-1e6 "$LIMIT_AGGREGATION" "$PY" benchmarks/aggregation.py --device cuda \
    --n 1000 --d 1e6 --no-flower --no-server
step aggregation-1e7 "$LIMIT_AGGREGATION" "$PY" benchmarks/aggregation.py --device cuda \
    --n 1000 --d 1e7 --rules krum multi_krum bulyan --no-flower --no-server --no-memory
step simulation-cnn "$LIMIT_SIMULATION" "$PY" benchmarks/simulation.py --device cuda \
    --models cnn --n 100 1000 --rounds 5 --repeats 3 --skip-per-client-engine-above 100
exit "$status"
