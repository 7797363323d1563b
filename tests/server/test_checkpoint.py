"""Checkpoints: a resume is bit-identical, a damaged checkpoint is refused whole, a used
out-dir is never overwritten, and no row of a round that does not run again is lost."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from simulations.config import resolve_config
from simulations.engine import run_in_process

pytestmark = pytest.mark.slow

BASE = ["num-clients=6", "model=logreg", "local-epochs=1", "seed=3"]
STATEFUL = ["aggregator=centered_clipping", "aggregator-params=tau=1.0", "num-malicious=1",
            "attack=gaussian"]
CENTRAL_DP = ["clients-per-round=4",
              "central-dp=noise_multiplier=1.0, clipping_norm=1.0, sampling=poisson"]
# timings: every key ending in -seconds (_seconds in the audit)
TIMES = ("-seconds", "_seconds")


def _run(out: Path, rounds: int, *extra: str, resume: bool = False) -> list[dict[str, Any]]:
    return run_in_process(resolve_config(None, [
        *BASE, *extra, f"num-server-rounds={rounds}", f"out-dir={out}",
        f"resume={str(resume).lower()}",
    ]))


def _exact(rows: list[dict[str, Any]]) -> str:
    """The rows without their timings, as text: equal text is equal bits (NaN included)."""
    return json.dumps([{k: v for k, v in r.items() if not k.endswith(TIMES)} for r in rows],
                      sort_keys=True)


def _file_rows(out: Path, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / name).read_text().splitlines()]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("extra", [STATEFUL, CENTRAL_DP], ids=["centered_clipping", "central_dp"])
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(
    tmp_path: Path, extra: list[str]
) -> None:
    full = _run(tmp_path / "full", 5, *extra)
    _run(tmp_path / "resumed", 2, *extra)
    rest = _run(tmp_path / "resumed", 5, *extra, resume=True)
    assert [r["round"] for r in rest] == [3, 4, 5]
    assert _exact(rest) == _exact(full[3:])  # accuracy, loss, update norm, epsilon, ...
    assert _exact(_file_rows(tmp_path / "resumed")) == _exact(_file_rows(tmp_path / "full"))
    # the audit's update norms: a float32 checkpoint moved them by ~3e-9 (relative)
    audits = [_file_rows(tmp_path / d, "audit.jsonl") for d in ("resumed", "full")]
    assert [_exact(a) for a in audits][0] == [_exact(a) for a in audits][1]
    a = load_checkpoint(tmp_path / "full" / "checkpoint")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint")
    assert a is not None and b is not None and a.server_round == b.server_round == 5
    assert a.model.keys() == b.model.keys()
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)  # the final model
    assert all(v.dtype == torch.float64 for v in a.model.values() if v.is_floating_point())
    rule_a, rule_b = a.extra["rule_state"], b.extra["rule_state"]
    assert (rule_a is None and rule_b is None) or torch.equal(rule_a, rule_b)
    assert a.extra["components"] == b.extra["components"]  # the DP accountant too


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An out-dir after 2 of the rounds of a stateful run (rows 0-2, checkpoint of 2)."""
    out = tmp_path_factory.mktemp("interrupted")
    _run(out, 2, *STATEFUL)
    return out


@pytest.fixture()
def out(tmp_path: Path, interrupted: Path) -> Path:
    """A copy of ``interrupted`` for one test to change."""
    return Path(shutil.copytree(interrupted, tmp_path / "out"))


def _rehash(ckpt: Path) -> None:
    """Make meta.json's SHA-256 match the (changed) files, as a forger would."""
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["sha256"] = {n: hashlib.sha256((ckpt / n).read_bytes()).hexdigest()
                      for n in ("model.safetensors", "state.pt")}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _set_meta(**fields: Any) -> Callable[[Path], None]:
    def change(ckpt: Path) -> None:
        meta = json.loads((ckpt / "meta.json").read_text())
        meta.update(fields)
        (ckpt / "meta.json").write_text(json.dumps(meta))
    return change


def _meta_without(key: str) -> Callable[[Path], None]:
    def change(ckpt: Path) -> None:
        meta = json.loads((ckpt / "meta.json").read_text())
        del meta[key]
        (ckpt / "meta.json").write_text(json.dumps(meta))
    return change


def _write(name: str, data: bytes, *, rehash: bool) -> Callable[[Path], None]:
    def change(ckpt: Path) -> None:
        (ckpt / name).write_bytes(data)
        if rehash:
            _rehash(ckpt)
    return change


def _truncate(name: str, *, rehash: bool) -> Callable[[Path], None]:
    def change(ckpt: Path) -> None:
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[: len(data) // 2])
        if rehash:
            _rehash(ckpt)
    return change


def _tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def change(ckpt: Path) -> None:
        tensors = load_file(ckpt / "model.safetensors")
        edit(tensors)
        save_file(tensors, ckpt / "model.safetensors")
        _rehash(ckpt)
    return change


def _state(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def change(ckpt: Path) -> None:
        extra = torch.load(ckpt / "state.pt", weights_only=True)
        torch.save(edit(extra), ckpt / "state.pt")
        _rehash(ckpt)
    return change


def _first(t: dict[str, torch.Tensor]) -> str:
    return sorted(t)[0]


def _drop_first(t: dict[str, torch.Tensor]) -> None:
    del t[_first(t)]


def _add_tensor(t: dict[str, torch.Tensor]) -> None:
    t["stowaway"] = torch.zeros(3, dtype=torch.float64)


def _reshape_first(t: dict[str, torch.Tensor]) -> None:
    t[_first(t)] = torch.zeros(t[_first(t)].numel() + 1, dtype=torch.float64)


def _as_float32(t: dict[str, torch.Tensor]) -> None:
    t[_first(t)] = t[_first(t)].float()


def _nan(t: dict[str, torch.Tensor]) -> None:
    t[_first(t)].view(-1)[0] = float("nan")


def _without_component(extra: dict[str, Any]) -> dict[str, Any]:
    return {**extra, "components": {k: v for k, v in extra["components"].items()
                                    if k != "metrics"}}


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # name: (change, file named in the message, what the message says)
    "truncated safetensors": (_truncate("model.safetensors", rehash=False),
                              "model.safetensors", "does not match the SHA-256"),
    "truncated safetensors, rehashed": (_truncate("model.safetensors", rehash=True),
                                        "model.safetensors", "unreadable"),
    "garbage safetensors": (_write("model.safetensors", b"garbage" * 20, rehash=True),
                            "model.safetensors", "unreadable"),
    "garbage state.pt": (_write("state.pt", b"\x80\x04garbage", rehash=True),
                         "state.pt", "unreadable"),
    "truncated state.pt": (_truncate("state.pt", rehash=False), "state.pt", "SHA-256"),
    "state.pt not a dict": (_state(lambda e: [1, 2]), "state.pt", "must hold a dict"),
    "state.pt without the run config": (
        _state(lambda e: {k: v for k, v in e.items() if k != "run_config"}), "state.pt",
        "must hold a dict"),
    "components not a dict": (_state(lambda e: {**e, "components": [1]}), "state.pt",
                              "'components' must be a dict"),
    "missing meta.json": (lambda c: (c / "meta.json").unlink(), "meta.json",
                          "missing or not JSON"),
    "garbage meta.json": (_write("meta.json", b"{round: 2", rehash=False), "meta.json",
                          "missing or not JSON"),
    "meta.json a list": (_write("meta.json", b"[2]", rehash=False), "meta.json",
                         "JSON object"),
    "negative round": (_set_meta(round=-1), "meta.json", "integer >= 1, got -1"),
    "round 0": (_set_meta(round=0), "meta.json", "integer >= 1, got 0"),
    "fractional round": (_set_meta(round=2.5), "meta.json", "integer >= 1, got 2.5"),
    "round as text": (_set_meta(round="2"), "meta.json", "integer >= 1, got '2'"),
    "round as bool": (_set_meta(round=True), "meta.json", "integer >= 1, got True"),
    "no round": (_meta_without("round"), "meta.json", "integer >= 1, got None"),
    "older format": (_meta_without("format"), "meta.json", "format 1"),
    "no checksums": (_meta_without("sha256"), "meta.json", "no SHA-256"),
    "missing safetensors": (lambda c: (c / "model.safetensors").unlink(),
                            "model.safetensors", "is missing"),
    "missing tensor": (_tensors(_drop_first), "model.safetensors", "lacks the model's tensors"),
    "extra tensor": (_tensors(_add_tensor), "model.safetensors", "does not have"),
    "wrong shape": (_tensors(_reshape_first), "model.safetensors", "of shape"),
    "float32 tensor": (_tensors(_as_float32), "model.safetensors",
                       "dtype torch.float32, expected torch.float64"),
    "NaN tensor": (_tensors(_nan), "model.safetensors", "NaN or Inf"),
    "missing component state": (_state(_without_component), "checkpoint",
                                r"no state for components \['metrics'\]"),
    "wrong rule state": (_state(lambda e: {**e, "rule_state": torch.zeros(3)}), "checkpoint",
                         "does not fit the rule"),
    "no rule state": (_state(lambda e: {**e, "rule_state": None}), "checkpoint",
                      "does not fit the rule"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_damaged_checkpoint_is_refused_whole_with_one_clear_error(out: Path, name: str) -> None:
    change, file, says = CORRUPTIONS[name]
    change(out / "checkpoint")
    before = _snapshot(out)
    with pytest.raises(ValueError, match=says) as err:
        _run(out, 4, *STATEFUL, resume=True)
    message = str(err.value)
    assert str(out / "checkpoint") in message and file in message
    assert "delete" in message  # the fix
    assert err.value.__cause__ is None  # one error, not a chain of library tracebacks
    assert _snapshot(out) == before  # nothing written, nothing deleted


def test_a_checkpoint_that_is_a_file_is_refused(out: Path) -> None:
    shutil.rmtree(out / "checkpoint")
    (out / "checkpoint").write_text("not a folder")
    with pytest.raises(ValueError, match="is not a folder"):
        _run(out, 4, *STATEFUL, resume=True)


def test_a_new_run_into_a_used_out_dir_is_refused_before_round_1(out: Path) -> None:
    before = _snapshot(out)
    with pytest.raises(ValueError, match="resume=true.*another out-dir.*delete the folder"):
        _run(out, 2, *STATEFUL)
    assert _snapshot(out) == before
    shutil.rmtree(out / "checkpoint")  # the metrics alone make it a used folder
    with pytest.raises(ValueError, match=r"holds a run \(metrics.jsonl, audit.jsonl\)"):
        _run(out, 2, *STATEFUL)


def test_a_folder_without_results_is_not_a_used_one(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("seed = 3\n")  # what `fedshield run` writes first
    (tmp_path / "metrics.jsonl").write_text("")
    assert [r["round"] for r in _run(tmp_path, 1, *STATEFUL)] == [0, 1]


def test_a_refused_resume_deletes_no_rows(out: Path) -> None:
    before = _snapshot(out)
    with pytest.raises(ValueError, match="differs from the checkpoint's"):
        _run(out, 4, *STATEFUL, "seed=7", resume=True)
    assert _snapshot(out) == before


def test_a_resume_reruns_only_the_round_after_the_checkpoint(out: Path, tmp_path: Path) -> None:
    # a crash after round 3 was published, before its checkpoint: rows 0-3, checkpoint of 2
    at_2 = Path(shutil.copytree(out / "checkpoint", tmp_path / "at-2"))
    _run(out, 3, *STATEFUL, resume=True)
    shutil.rmtree(out / "checkpoint")
    shutil.copytree(at_2, out / "checkpoint")
    rows_0_3 = (out / "metrics.jsonl").read_text()
    audit_1_3 = (out / "audit.jsonl").read_text()
    assert _run(out, 2, *STATEFUL, resume=True) == []  # nothing to run: no row is dropped
    assert (out / "metrics.jsonl").read_text() == rows_0_3
    assert (out / "audit.jsonl").read_text() == audit_1_3
    rest = _run(out, 4, *STATEFUL, resume=True)
    assert [r["round"] for r in rest] == [3, 4]
    assert [r["round"] for r in _file_rows(out)] == [0, 1, 2, 3, 4]
    assert [r["round"] for r in _file_rows(out, "audit.jsonl")] == [1, 2, 3, 4]
    # the rerun round 3 is the round 3 it replaces, bit for bit
    assert _exact(_file_rows(out)[:4]) == _exact([json.loads(x) for x in rows_0_3.splitlines()])


def test_temporaries_of_a_crashed_save_are_removed_on_the_next_start(out: Path) -> None:
    leftover = out / ".ckpt-crashed"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a model")
    (out / "checkpoint.old").mkdir()  # stale: the new checkpoint is in place
    _run(out, 3, *STATEFUL, resume=True)
    assert not leftover.exists() and not (out / "checkpoint.old").exists()


def test_a_crash_between_the_two_renames_resumes_from_the_previous_checkpoint(
    out: Path, tmp_path: Path
) -> None:
    os.replace(out / "checkpoint", out / "checkpoint.old")
    rest = _run(out, 4, *STATEFUL, resume=True)
    assert [r["round"] for r in rest] == [3, 4]
    expected = _run(tmp_path / "full", 4, *STATEFUL)
    assert _exact(rest) == _exact(expected[3:])
    assert not (out / "checkpoint.old").exists()


def test_a_save_that_fails_leaves_no_temporary_and_the_previous_checkpoint(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _snapshot(out / "checkpoint")
    ckpt = load_checkpoint(out / "checkpoint")
    assert ckpt is not None

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(out / "checkpoint", Checkpoint(3, ckpt.model, ckpt.extra))
    assert not list(out.glob(".ckpt-*"))
    assert _snapshot(out / "checkpoint") == before


@pytest.mark.parametrize("rnd", [0, -1, 1.5, True])
def test_save_refuses_a_round_below_1(tmp_path: Path, rnd: Any) -> None:
    with pytest.raises(ValueError, match="integer >= 1"):
        save_checkpoint(tmp_path / "checkpoint", Checkpoint(
            rnd, {"w": torch.zeros(2, dtype=torch.float64)},
            {"rule_state": None, "components": {}, "run_config": {}}))
    assert list(tmp_path.iterdir()) == []


class Opaque:
    """A component state that weights_only loading cannot restore."""


def test_a_state_that_cannot_be_restored_is_refused_when_saved(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="state of component 'odd' cannot be checkpointed"):
        save_checkpoint(tmp_path / "checkpoint", Checkpoint(
            1, {"w": torch.zeros(2, dtype=torch.float64)},
            {"rule_state": None, "components": {"fine": {"n": 1}, "odd": Opaque()},
             "run_config": {}}))
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_from_before_a_later_key_resumes_at_its_old_value() -> None:
    """A run config saved before ``batch-order`` existed ran with its default: resuming it
    with the default goes on; with another value it is refused, naming the key."""
    from server.run import LATER_KEYS, check_resumable

    saved = {"seed": 0, "num-server-rounds": 5}
    check_resumable({**saved, **LATER_KEYS}, saved, Path("old"))
    with pytest.raises(ValueError, match="batch-order: 'generator' -> 'hashed'"):
        check_resumable({**saved, "batch-order": "hashed"}, saved, Path("old"))
