"""The benchmark scripts: bad arguments refused with a clear message before measuring; the\naggregation benchmark's reading of the memory it may use."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


CASES = [
    ("simulation", ["--rounds", "0"], "--rounds must be at least 1, got 0"),
    ("simulation", ["--repeats", "0"], "--repeats must be at least 1, got 0"),
    ("simulation", ["--threads", "0"], "--threads must be at least 1, got 0"),
    ("simulation", ["--n", "10", "0"], "--n takes client counts of at least 1, got [10, 0]"),
    ("simulation", ["--models", "resnet"], "invalid choice: 'resnet'"),
    ("simulation", ["--device", "cuda:7"], "--device cuda:7: this torch has no CUDA device"),
    ("aggregation", ["--repeats", "0"], "--repeats and --threads must be at least 1"),
    ("aggregation", ["--n", "0"], "--n and --d take sizes of at least 1, got [0]"),
    ("aggregation", ["--d", "0.5"], "--n and --d take sizes of at least 1"),
    ("aggregation", ["--cap", "-1"], "--cap is in seconds, at least 0, got -1.0"),
]


@pytest.mark.parametrize(("name", "argv", "message"), CASES)
def test_bad_arguments_are_refused_before_measuring(
    name: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
) -> None:
    import torch

    if "cuda" in " ".join(argv) and torch.cuda.is_available():
        pytest.skip("CUDA is present: --device cuda is not refused here")
    with pytest.raises(SystemExit) as exc:
        _script(name).main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""  # nothing measured, nothing printed


def test_available_memory_is_bounded_by_the_cgroup(tmp_path: Path) -> None:
    """A container's ``/proc/meminfo`` may show the host's memory: the cgroup's limit
    minus its usage bounds it, the inactive page cache counting as free."""
    bench = _script("aggregation")
    host = bench._meminfo("MemAvailable")
    assert bench.available_memory(tmp_path / "none") == (host or None)  # no cgroup files
    gib = 1 << 30
    (tmp_path / "memory.max").write_text(f"{8 * gib}\n")
    (tmp_path / "memory.current").write_text(f"{6 * gib}\n")
    (tmp_path / "memory.stat").write_text(f"anon {5 * gib}\ninactive_file {gib}\n")
    assert bench.available_memory(tmp_path) == min(3 * gib, host or 3 * gib)
    (tmp_path / "memory.current").write_text(f"{9 * gib}\n")  # over the limit: none left
    (tmp_path / "memory.stat").write_text("anon 1\n")
    assert bench.available_memory(tmp_path) == 0
    (tmp_path / "memory.max").write_text("max\n")  # no limit: the host's figure
    assert bench.available_memory(tmp_path) == (host or None)
