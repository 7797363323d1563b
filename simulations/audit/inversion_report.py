"""Outputs of the gradient-inversion audit: the CSV and markdown tables, the config, and one
image grid per attack (originals above their reconstructions under each defense).

:func:`write_inversion_report` writes everything :func:`simulations.audit.inversion.
run_inversion_audit` leaves in its output folder.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

__all__ = ["CSV_FIELDS", "GridBlock", "markdown_table", "save_grid", "write_csv",
           "write_inversion_report"]

CSV_FIELDS = ("attack", "defense", "batch_size", "psnr", "ssim", "label_acc", "trials")
"""The columns of ``inversion.csv``, one row per (attack, defense, batch size)."""


@dataclass(frozen=True, eq=False)
class GridBlock:
    """One victim batch of an image grid.

    Attributes
    ----------
    title
        Row label of the originals, e.g. ``"B=2"``.
    originals
        ``(B, C, H, W)`` the victim's inputs in ``[0, 1]``.
    reconstructions
        ``(defense label, PSNR in dB, (B, C, H, W) images matched to the originals)`` per
        defense.
    """

    title: str
    originals: Tensor
    reconstructions: tuple[tuple[str, float, Tensor], ...]


def write_inversion_report(
    out_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any],
    grids: Mapping[str, Sequence[GridBlock]],
) -> None:
    """Write ``inversion.csv``, ``inversion.md``, ``inversion_config.json`` and one
    ``inversion_<attack>.png`` per entry of ``grids`` into ``out_dir`` (created).

    Parameters
    ----------
    rows
        The audit's rows (keys :data:`CSV_FIELDS`).
    config
        The audit's arguments, saved as JSON so the audit can be rerun.
    grids
        ``{attack: blocks}``, one block per batch size (first trial).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "inversion.csv", rows)
    (out / "inversion.md").write_text(markdown_table(rows))
    (out / "inversion_config.json").write_text(json.dumps(config, indent=2) + "\n")
    for attack, blocks in grids.items():
        save_grid(out / f"inversion_{attack}.png", attack, blocks)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """The audit rows as CSV with the columns :data:`CSV_FIELDS`."""
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_FIELDS))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in CSV_FIELDS})


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The audit rows as a GitHub markdown table (PSNR in dB)."""
    lines = [
        "| attack | defense | B | PSNR (dB) | SSIM | label acc |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['attack']} | {r['defense']} | {r['batch_size']} | {r['psnr']:.2f} | "
            f"{r['ssim']:.3f} | {r['label_acc']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def save_grid(path: Path, attack: str, blocks: Sequence[GridBlock]) -> None:
    """One PNG: per block, the originals, then one row per defense with its PSNR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = max(int(b.originals.shape[0]) for b in blocks)
    nrows = sum(1 + len(b.reconstructions) for b in blocks)
    fig, axes = plt.subplots(nrows, ncols + 1, figsize=(1.1 * ncols + 2.6, 1.1 * nrows + 0.4),
                             squeeze=False, gridspec_kw={"width_ratios": [2.4] + [1] * ncols})
    row = 0
    for block in blocks:
        b = int(block.originals.shape[0])
        lines = [(f"{block.title}\noriginal", block.originals)] + [
            (label.replace("(", "\n").replace(", ", "\n").rstrip(")") + f"\n{p:.1f} dB", x)
            for label, p, x in block.reconstructions
        ]
        for text, images in lines:
            axes[row, 0].axis("off")
            axes[row, 0].text(1.0, 0.5, text, ha="right", va="center", fontsize=7,
                              transform=axes[row, 0].transAxes)
            for col in range(ncols):
                ax = axes[row, col + 1]
                ax.set_xticks([])
                ax.set_yticks([])
                if col < b:
                    ax.imshow(_to_display(images[col]), cmap="gray", vmin=0.0, vmax=1.0)
                else:
                    ax.axis("off")
            row += 1
    fig.suptitle(f"gradient inversion: {attack}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _to_display(img: Tensor) -> np.ndarray[Any, Any]:
    arr = img.detach().float().clamp(0, 1).cpu().numpy()
    out: np.ndarray[Any, Any] = arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))
    return out
