"""Checkpoints: the run's exact state after a finished round, written atomically.

A restarted server with ``resume=true`` continues after the last finished round with the
same global model, rule state (e.g. centered-clipping momentum) and component states
(e.g. the central-DP accountant): the resumed run is bit-identical to an uninterrupted one
with the same seed. A checkpoint is one folder::

    model.safetensors  every entry of the model's state dict; the aggregated (floating)
                       entries in float64, exactly the server's global model
    state.pt           {"rule_state", "components", "run_config"} (torch.save, read back
                       with weights_only=True)
    meta.json          {"format", "round", "sha256": {file: hex digest}}, written last

It is written into a temporary ``.ckpt-*`` folder next to it and renamed into place, so a
crash leaves the previous checkpoint intact; :func:`remove_temporaries` deletes what a
crash left behind. :func:`load_checkpoint` refuses, with one :class:`ValueError` that
names the file and the fix, any checkpoint that is not exactly what :func:`save_checkpoint`
wrote for this model: nothing is used from a partial one.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = [
    "FORMAT",
    "Checkpoint",
    "check_like",
    "load_checkpoint",
    "refuse_used_out_dir",
    "remove_temporaries",
    "save_checkpoint",
]

log = logging.getLogger("fedshield.server")

FORMAT = 2
"""Version of the folder layout; 1 (no ``format`` in ``meta.json``) stored float32."""
TMP_PREFIX = ".ckpt-"
_MODEL, _STATE, _META = "model.safetensors", "state.pt", "meta.json"
_EXTRA_KEYS = ("rule_state", "components", "run_config")
# what a run leaves in its out-dir (server.metrics_log writes the first two)
_RUN_FILES = ("metrics.jsonl", "audit.jsonl")


@dataclass(frozen=True)
class Checkpoint:
    """A finished round: its number, the model and the run's other state.

    Attributes
    ----------
    server_round
        The last finished round (``>= 1``); a resume starts at the next one.
    model
        Every entry of the model's state dict; floating entries in float64 (the exact
        global model, ``ModelSpec.flatten`` gives it back as ``(d,)``).
    extra
        ``{"rule_state": ..., "components": {name: state}, "run_config": {key: value}}``.
    """

    server_round: int
    model: dict[str, Tensor]
    extra: dict[str, Any]


def _fix(directory: Path) -> str:
    return (f"delete {directory} to restart this run from round 1 (resume=true), or choose "
            "another out-dir")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_round(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"the round must be an integer >= 1, got {value!r}")
    return value


def save_checkpoint(directory: str | Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``directory`` atomically (a crash leaves the previous one intact).

    Raises
    ------
    ValueError
        If ``ckpt.server_round`` is not an integer ``>= 1`` or ``ckpt.extra`` lacks one of
        ``rule_state``, ``components``, ``run_config``.
    """
    directory = Path(directory)
    _check_round(ckpt.server_round)
    missing = [k for k in _EXTRA_KEYS if k not in ckpt.extra]
    if missing:
        raise ValueError(f"a checkpoint's extra state needs {list(_EXTRA_KEYS)}, missing {missing}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=directory.parent))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in ckpt.model.items()},
                  tmp / _MODEL)
        torch.save(ckpt.extra, tmp / _STATE)
        _check_restorable(tmp / _STATE, ckpt.extra)
        meta = {"format": FORMAT, "round": ckpt.server_round,
                "sha256": {name: _sha256(tmp / name) for name in (_MODEL, _STATE)}}
        (tmp / _META).write_text(json.dumps(meta))
        for name in (_MODEL, _STATE, _META):
            _fsync(tmp / name)
        old = directory.with_name(directory.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        if os.name == "posix":  # the renames reach the disk too (folders open only there)
            _fsync(directory.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_restorable(path: Path, extra: Mapping[str, Any]) -> None:
    """Refuse now, not at the resume, a state that ``weights_only`` loading cannot restore."""
    try:
        torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # the unpickler's many kinds, as in _read
        parts = {"rule_state": extra["rule_state"],
                 **{f"component {k!r}": v for k, v in extra["components"].items()}}
        bad = []
        for what, state in parts.items():
            buf = io.BytesIO()
            torch.save(state, buf)
            buf.seek(0)
            try:
                torch.load(buf, weights_only=True)
            except Exception:  # any failure names the culprit
                bad.append(what)
        raise ValueError(
            f"the state of {', '.join(bad) or 'the run'} cannot be checkpointed: it does not "
            f"load back with torch.load(weights_only=True) ({type(exc).__name__}: {exc}). A "
            "state must be made of tensors, numbers, strings, None, lists, tuples and dicts"
        ) from None


def remove_temporaries(directory: str | Path) -> None:
    """Delete what a crash during :func:`save_checkpoint` left next to ``directory``.

    The ``.ckpt-*`` folders of an unfinished save are removed. A crash between the two
    renames leaves only ``<directory>.old``, the previous checkpoint, which is renamed
    back; when both exist, ``.old`` is stale and removed.
    """
    directory = Path(directory)
    parent = directory.parent
    if not parent.is_dir():
        return
    for tmp in parent.glob(TMP_PREFIX + "*"):
        if tmp.is_dir() and not tmp.is_symlink():
            log.info("removing %s, left by a checkpoint save that did not finish", tmp)
            shutil.rmtree(tmp)
    old = directory.with_name(directory.name + ".old")
    if old.is_dir() and not old.is_symlink():
        if directory.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, directory)


def refuse_used_out_dir(out_dir: str | Path) -> None:
    """Refuse to start a new run (``resume=false``) in a folder that holds a run.

    Raises
    ------
    ValueError
        If ``out_dir`` holds non-empty metrics or audit files, or a checkpoint.
    """
    out = Path(out_dir)
    used = [name for name in _RUN_FILES
            if (out / name).is_file() and (out / name).read_text().strip()]
    used += [name for name in ("checkpoint", "checkpoint.old") if (out / name).exists()]
    if used:
        raise ValueError(
            f"out-dir {out} already holds a run ({', '.join(used)}) and resume=false would "
            "overwrite it: set resume=true to continue that run, choose another out-dir, or "
            "delete the folder"
        )


def load_checkpoint(
    directory: str | Path, model_state: Mapping[str, Tensor] | None = None
) -> Checkpoint | None:
    """Load and check the checkpoint in ``directory``; ``None`` when there is none.

    Parameters
    ----------
    directory
        The checkpoint folder (``<out-dir>/checkpoint``).
    model_state
        The model's state dict: when given, the checkpoint must hold exactly its entries,
        each of its shape, floating entries in float64 and finite, the others of its dtype.

    Raises
    ------
    ValueError
        Naming the file and the fix, if anything is missing, unreadable, altered since it
        was written (SHA-256), of an older format, or does not fit ``model_state``.
    """
    directory = Path(directory)
    if not directory.exists():
        old = directory.with_name(directory.name + ".old")
        if not old.exists():
            return None
        directory = old  # crash between the two renames: the previous one is intact
    if not directory.is_dir():
        raise ValueError(f"checkpoint {directory} is not a folder: {_fix(directory)}")
    rnd = _read_meta(directory)
    model = _read(directory / _MODEL, load_file)
    extra = _read(directory / _STATE, lambda p: torch.load(p, weights_only=True,
                                                           map_location="cpu"))
    if not isinstance(extra, dict) or any(k not in extra for k in _EXTRA_KEYS):
        raise ValueError(
            f"checkpoint file {directory / _STATE} must hold a dict with keys "
            f"{list(_EXTRA_KEYS)}, got {_describe(extra)}: {_fix(directory)}"
        )
    for key in ("components", "run_config"):
        if not isinstance(extra[key], dict) or not all(isinstance(k, str) for k in extra[key]):
            raise ValueError(
                f"checkpoint file {directory / _STATE}: {key!r} must be a dict with string "
                f"keys, got {_describe(extra[key])}: {_fix(directory)}"
            )
    if model_state is not None:
        why = _model_mismatch(model, model_state)
        if why is not None:
            raise ValueError(f"checkpoint file {directory / _MODEL} {why}: {_fix(directory)}")
    return Checkpoint(rnd, model, dict(extra))


def _read_meta(directory: Path) -> int:
    path = directory / _META
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(
            f"checkpoint file {path} is missing or not JSON ({type(exc).__name__}: {exc}); "
            f"the save did not finish: {_fix(directory)}"
        ) from None
    if not isinstance(meta, dict):
        raise ValueError(f"checkpoint file {path} must hold a JSON object, got "
                         f"{_describe(meta)}: {_fix(directory)}")
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"checkpoint file {path} has format {meta.get('format', 1)!r}, this version reads "
            f"format {FORMAT} (format 1 stored the model in float32, so a resume would not "
            f"be exact): {_fix(directory)}"
        )
    try:
        rnd = _check_round(meta.get("round"))
    except ValueError as exc:
        raise ValueError(f"checkpoint file {path}: {exc}: {_fix(directory)}") from None
    sums = meta.get("sha256")
    for name in (_MODEL, _STATE):
        want = sums.get(name) if isinstance(sums, dict) else None
        if not isinstance(want, str):
            raise ValueError(f"checkpoint file {path} has no SHA-256 of {name}: "
                             f"{_fix(directory)}")
        file = directory / name
        if not file.is_file():
            raise ValueError(f"checkpoint file {file} is missing: {_fix(directory)}")
        if _sha256(file) != want:
            raise ValueError(
                f"checkpoint file {file} does not match the SHA-256 in {_META} (truncated or "
                f"changed after it was written): {_fix(directory)}"
            )
    return rnd


def _read(path: Path, reader: Any) -> Any:
    try:
        return reader(path)
    # the readers raise many kinds (SafetensorError, UnpicklingError, RuntimeError,
    # EOFError, zipfile errors) on a damaged file: each becomes the one error below
    except Exception as exc:
        raise ValueError(
            f"checkpoint file {path} is unreadable ({type(exc).__name__}: {exc}): "
            f"{_fix(path.parent)}"
        ) from None


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))[:8]}"
    return type(value).__name__


def _model_mismatch(saved: Mapping[str, Tensor], model: Mapping[str, Tensor]) -> str | None:
    """Why ``saved`` is not a checkpoint of ``model``, or ``None``."""
    missing = [k for k in model if k not in saved]
    if missing:
        return f"lacks the model's tensors {missing[:5]}"
    extra = [k for k in saved if k not in model]
    if extra:
        return f"holds tensors the model does not have {extra[:5]}"
    for k, ref in model.items():
        t = saved[k]
        if tuple(t.shape) != tuple(ref.shape):
            return f"has {k!r} of shape {tuple(t.shape)}, the model's is {tuple(ref.shape)}"
        want = torch.float64 if ref.is_floating_point() else ref.dtype
        if t.dtype != want:
            return f"has {k!r} of dtype {t.dtype}, expected {want}"
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"has NaN or Inf in {k!r}"
    return None


def check_like(value: object, template: object, what: str) -> None:
    """Check that ``value`` has the structure of ``template`` (e.g. a rule's first state).

    Tensors must match in shape and dtype (and be finite; a template with 0 rows, a table
    that grows such as a per-client history, takes any number of rows), dicts in keys, lists and tuples
    in length, other values in type; numbers may differ in value.

    Raises
    ------
    ValueError
        Naming the first place where they differ (``what`` prefixes it).

    Examples
    --------
    >>> check_like(torch.zeros(3), torch.ones(3), "rule state")
    >>> check_like(torch.zeros(2), torch.ones(3), "rule state")
    Traceback (most recent call last):
    ...
    ValueError: rule state: a tensor of shape (2,), expected (3,)
    >>> check_like(torch.zeros(4, 3), torch.zeros(0, 3), "history")
    >>> check_like(torch.zeros(4, 2), torch.zeros(0, 3), "history")
    Traceback (most recent call last):
    ...
    ValueError: history: a tensor of shape (4, 2), expected (k, 3)
    """
    if isinstance(template, Tensor):
        if not isinstance(value, Tensor):
            raise ValueError(f"{what}: {type(value).__name__}, expected a tensor")
        # a template with no rows is a table that grows (per-client histories, keyed by
        # client id): any number of rows, the same shape otherwise
        growing = template.dim() >= 1 and template.shape[0] == 0
        same = (value.dim() == template.dim() and value.shape[1:] == template.shape[1:]
                if growing else tuple(value.shape) == tuple(template.shape))
        if not same:
            expected = ("(k, " + ", ".join(str(s) for s in template.shape[1:]) + ")"
                        if growing else str(tuple(template.shape)))
            raise ValueError(f"{what}: a tensor of shape {tuple(value.shape)}, expected "
                             f"{expected}")
        if value.dtype != template.dtype:
            raise ValueError(f"{what}: a tensor of dtype {value.dtype}, expected {template.dtype}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{what}: a tensor with NaN or Inf")
    elif isinstance(template, dict):
        if not isinstance(value, dict) or set(value) != set(template):
            raise ValueError(f"{what}: {_describe(value)}, expected {_describe(template)}")
        for k, v in template.items():
            check_like(value[k], v, f"{what}[{k!r}]")
    elif isinstance(template, (list, tuple)):
        if not isinstance(value, type(template)) or len(value) != len(template):
            raise ValueError(f"{what}: {type(value).__name__}, expected a "
                             f"{type(template).__name__} of length {len(template)}")
        for i, (v, t) in enumerate(zip(value, template, strict=True)):
            check_like(v, t, f"{what}[{i}]")
    elif template is None:
        if value is not None:
            raise ValueError(f"{what}: {type(value).__name__}, expected None")
    elif isinstance(template, float) and isinstance(value, float):
        if not math.isfinite(value) and math.isfinite(template):
            raise ValueError(f"{what}: {value}, expected a finite number")
    elif type(value) is not type(template):
        raise ValueError(f"{what}: {type(value).__name__}, expected {type(template).__name__}")
