"""Run provenance: versions, git commit and device recorded next to every run's results."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from server import provenance
from server.provenance import git_state, package_version, run_provenance, write_provenance

REPO = Path(__file__).resolve().parents[2]
KEYS = ["fedshield", "flwr", "torch", "opacus", "git-commit", "git-dirty", "python",
        "platform", "device"]

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org",
         "-c", "commit.gpgsign=false", *args],
        cwd=cwd, capture_output=True, text=True, check=True,
    ).stdout.strip()


@pytest.fixture
def isolated_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path`` where git never looks above it (it may lie inside someone's checkout)."""
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    return tmp_path


def test_versions_are_the_installed_ones_and_the_device_is_passed_through() -> None:
    record = run_provenance("cuda:1")
    assert list(record) == KEYS
    assert record["torch"] == torch.__version__
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert record["fedshield"] == pyproject["project"]["version"], (
        "installed fedshield metadata differs from pyproject.toml: reinstall with "
        "`pip install -e .`"
    )
    assert record["python"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert record["platform"] == platform.platform()
    assert record["device"] == "cuda:1"
    assert package_version("no-such-distribution-fedshield") is None


def test_provenance_imports_neither_opacus_nor_torch() -> None:
    """Versions come from metadata: importing opacus would cost ~4 s per run."""
    code = ("import sys; from server.provenance import run_provenance; r = run_provenance('cpu'); "
            "print(r['opacus'] is not None, 'opacus' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True, timeout=60).stdout.split()
    assert out == ["True", "False", "False"]


@needs_git
def test_commit_of_this_checkout() -> None:
    probe = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                           text=True, check=False)
    if probe.returncode != 0:
        pytest.skip("the tests do not run from a git checkout")
    record = run_provenance("cpu")
    assert record["git-commit"] is not None
    assert re.fullmatch(r"[0-9a-f]{40}", record["git-commit"])
    assert record["git-commit"] == probe.stdout.strip()
    assert record["git-dirty"] in ("true", "false")


@needs_git
def test_commit_and_dirty_flag_of_a_fresh_repository(isolated_tmp: Path) -> None:
    repo = isolated_tmp / "repo"
    pkg = repo / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "mod.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text(".venv/\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "first")
    head = _git(repo, "rev-parse", "HEAD")
    assert git_state(pkg) == (head, False)
    (pkg / "mod.py").write_text("x = 2\n")
    assert git_state(pkg) == (head, True)
    _git(repo, "commit", "-q", "-am", "second")
    second = _git(repo, "rev-parse", "HEAD")
    assert second != head and git_state(pkg) == (second, False)
    (pkg / "new.py").write_text("")  # an untracked module changes what runs
    assert git_state(pkg) == (second, True)
    # an installed copy in an ignored virtual environment is not the checkout's code
    installed = repo / ".venv" / "lib" / "site-packages" / "server"
    installed.mkdir(parents=True)
    assert git_state(installed) == (None, None)


def test_no_commit_outside_a_git_tree(isolated_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provenance, "_SOURCE_DIR", isolated_tmp)
    record = run_provenance("cpu")
    assert record["git-commit"] is None and record["git-dirty"] is None
    assert record["torch"] == torch.__version__


def test_no_commit_when_git_is_missing_or_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert git_state(REPO) == (None, None)
    hanging = tmp_path / "hanging-bin"
    hanging.mkdir()
    fake = hanging / "git"
    fake.write_text("#!/bin/sh\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{hanging}{os.pathsep}/bin{os.pathsep}/usr/bin")
    monkeypatch.setattr(provenance, "_GIT_TIMEOUT_S", 0.2)
    assert git_state(REPO) == (None, None)


def test_write_provenance_writes_one_complete_json_file(tmp_path: Path) -> None:
    out = tmp_path / "résultats" / "run 1"  # created, non-ASCII and with a space
    path = write_provenance(out, "cpu")
    assert path == out / "provenance.json"
    assert json.loads(path.read_text(encoding="utf-8")) == run_provenance("cpu")
    path.write_text("stale")
    assert write_provenance(out, "cuda:0") == path
    assert json.loads(path.read_text(encoding="utf-8"))["device"] == "cuda:0"
    assert sorted(p.name for p in out.iterdir()) == ["provenance.json"]  # no temp files


def test_empty_device_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="device"):
        write_provenance(tmp_path, "")
    assert list(tmp_path.iterdir()) == []
