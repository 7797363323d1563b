"""What produced a run: package versions, the git commit, Python, platform and device.

Every run's output folder gets a ``provenance.json`` so a result can be traced to the code
and the libraries that made it::

    {"fedshield": "0.1.0", "flwr": "1.41.0", "torch": "2.13.0+cpu", "opacus": "1.6.0",
     "git-commit": "2e5902e...", "git-dirty": "false", "python": "3.11.7",
     "platform": "Linux-6.8.0-x86_64-with-glibc2.36", "device": "cpu"}

Versions come from the installed distributions' metadata (``importlib.metadata``), so
nothing heavy is imported: importing ``opacus`` alone costs about 4 s.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path

__all__ = ["PACKAGES", "git_state", "package_version", "run_provenance", "write_provenance"]

PACKAGES: tuple[str, ...] = ("fedshield", "flwr", "torch", "opacus")
"""The distributions whose versions every run records."""

PROVENANCE_FILE = "provenance.json"

# the folder whose git checkout (if any) is recorded: the installed ``server`` package
_SOURCE_DIR = Path(__file__).resolve().parent
_GIT_TIMEOUT_S = 5.0
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # SHA-1 or SHA-256 object names


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name``; ``None`` when it is not installed.

    Examples
    --------
    >>> package_version("no-such-distribution-fedshield") is None
    True
    """
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(directory: Path, *args: str) -> subprocess.CompletedProcess[str] | None:
    """``git args`` run in ``directory``; ``None`` when git is missing or hangs."""
    try:
        return subprocess.run(
            ["git", *args],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None


def git_state(directory: Path) -> tuple[str | None, bool | None]:
    """The commit checked out where ``directory`` lies, and whether the tree is dirty.

    A directory that git ignores (a virtual environment inside a checkout, where an
    installed copy of the package lives) is not part of that checkout's commit.

    Parameters
    ----------
    directory
        A folder of the source tree, e.g. the package's own.

    Returns
    -------
    tuple
        ``(commit, dirty)``: the full object name of ``HEAD`` and whether tracked files
        differ from it or untracked files exist; ``(None, None)`` when ``directory`` is not
        in a git work tree, is ignored by it, or git is missing or does not answer within
        5 s.
    """
    head = _git(directory, "rev-parse", "HEAD")
    if head is None or head.returncode != 0:
        return None, None
    commit = head.stdout.strip()
    if not _COMMIT.fullmatch(commit):
        return None, None
    ignored = _git(directory, "check-ignore", "-q", ".")
    if ignored is None or ignored.returncode == 0:  # 0: ignored; 1: not ignored
        return None, None
    status = _git(directory, "status", "--porcelain")
    dirty = None if status is None or status.returncode != 0 else bool(status.stdout.strip())
    return commit, dirty


def run_provenance(device: str) -> dict[str, str | None]:
    """The provenance of a run on ``device``.

    Parameters
    ----------
    device
        The device the run computes on, as torch names it (``"cpu"``, ``"cuda:0"``).

    Returns
    -------
    dict
        ``fedshield``, ``flwr``, ``torch``, ``opacus``: installed versions (``None`` when
        not installed); ``git-commit``: the checkout's ``HEAD`` or ``None`` when the
        package does not run from a git checkout; ``git-dirty``: ``"true"`` or
        ``"false"`` (``None`` with no commit); ``python``, ``platform`` and ``device``.

    Raises
    ------
    ValueError
        If ``device`` is empty.
    """
    if not device:
        raise ValueError("run_provenance needs the run's device, e.g. 'cpu' or 'cuda:0'")
    out: dict[str, str | None] = {name: package_version(name) for name in PACKAGES}
    commit, dirty = git_state(_SOURCE_DIR)
    out["git-commit"] = commit
    out["git-dirty"] = None if dirty is None else str(dirty).lower()
    out["python"] = platform.python_version()
    out["platform"] = platform.platform()
    out["device"] = device
    return out


def write_provenance(out_dir: str | Path, device: str) -> Path:
    """Write :func:`run_provenance` to ``out_dir/provenance.json`` atomically.

    A crash while writing leaves the previous file (or none), never a partial one.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    ValueError
        If ``device`` is empty.
    OSError
        If ``out_dir`` cannot be created or written.
    """
    record = run_provenance(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / PROVENANCE_FILE
    fd, tmp = tempfile.mkstemp(prefix=".provenance-", suffix=".json", dir=out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
