"""The ``fedshield`` command line: ``run``, ``demo``, ``bench``, ``audit``.

``fedshield run --config FILE.toml key=value ... --out DIR`` runs one federation in process
and writes ``DIR/config.toml`` (the fully resolved config: re-running it reproduces the
run), ``DIR/metrics.jsonl`` (one line per round) and ``DIR/audit.jsonl`` (who was kept
and rejected each round, and why).

``fedshield bench`` runs a scenario (:mod:`simulations.scenario`, run by
:mod:`simulations.bench`). Every part of a scenario can be given or overridden on the
command line::

    fedshield bench quick --out results/quick
    fedshield bench --dataset npz:PATH --attacks alie,ipm --defenses mean,krum,median \\
        --clients 25 --malicious 5 --rounds 30 --seeds 0,1 --partition iid

The flags override the TOML: a list flag replaces that axis, and a name in it that names
an entry of the scenario selects that entry (``fedshield bench bucketing-mnist --defenses
krum,krum+bucketing`` runs two of its defenses); other names are shorthands. ``--set
key=value`` (repeatable) sets fixed keys; ``--clients`` and ``--rounds`` set
``num-clients`` and ``num-server-rounds``.

``fedshield audit inversion --defense "dp_sgd(noise_multiplier=0.1, max_grad_norm=1.0)"``
inverts one client's update under each defense (:mod:`simulations.audit.inversion`).
Components are named in the one spec grammar ``name(key=value, ...)``
(:mod:`runconfig.spec`).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runconfig.spec import parse_params, parse_spec, split_top_level

from . import __version__
from .bench import DONE, RayCluster, default_jobs, run_bench
from .config import Scalar, load_config, parse_override, save_config
from .scenario import (
    Scenario,
    check_cells,
    parse_entry,
    parse_scenario,
    read_scenario_data,
    shipped_scenarios,
)

__all__ = ["add_bench_arguments", "build_parser", "main", "ray_cluster", "scenario_from_args"]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("flwr", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_one(cfg: dict[str, Scalar], out: Path, *, quiet: bool = False) -> list[dict[str, Any]]:
    """Run one federation with ``cfg``, writing its config and metrics under ``out``."""
    from .engine import run_in_process

    out.mkdir(parents=True, exist_ok=True)
    cfg = {**cfg, "out-dir": str(out)}
    save_config(cfg, out / "config.toml")

    def progress(row: dict[str, Any]) -> None:
        if not quiet:
            print(
                f"  round {row['round']:>3}  accuracy {row['accuracy']:.4f}  loss {row['loss']:.4f}"
                + ("  (skipped)" if row.get("skipped") else ""),
                flush=True,
            )

    return run_in_process(cfg, on_round=progress)


def check_paths(config: str | None, out: Path) -> None:
    """Refuse a ``--config`` that is not a file and an ``--out`` that is not a folder."""
    if config is not None and not Path(config).is_file():
        what = "a folder" if Path(config).is_dir() else "missing"
        raise ValueError(f"--config {config} is {what}: name a TOML file of run-config keys")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: name a folder (it is created if missing)")


def _run_folder(flag: str | None, out_dir: str) -> Path:
    """Where ``fedshield run`` writes: ``--out``, else the config's ``out-dir``, else
    ``results/run``; a config's ``out-dir`` that ``--out`` replaces is said, not dropped."""
    if flag is None:
        return Path(out_dir or "results/run")
    if out_dir and Path(out_dir) != Path(flag):
        print(f"--out {flag} replaces the config's out-dir={out_dir}", file=sys.stderr)
    return Path(flag)


def _cmd_run(args: argparse.Namespace) -> int:
    check_paths(args.config, Path(args.out) if args.out else Path("."))
    cfg = load_config(args.config, args.overrides)
    out = _run_folder(args.out, str(cfg.get("out-dir", "")))
    check_paths(None, out)
    t0 = time.perf_counter()
    rows = run_one(cfg, out)
    if not rows:
        print(f"nothing to run: every round up to {cfg['num-server-rounds']} is in {out}")
        return 0
    final = rows[-1]
    print(
        f"final round {final['round']}: accuracy {final['accuracy']:.4f} "
        f"({time.perf_counter() - t0:.1f} s); results in {out}"
    )
    trained = [r for r in rows if r["round"] > 0]
    if trained and all(r.get("skipped") for r in trained):
        reasons = sorted({str(r.get("skipped_reason") or r.get("stopped")) for r in trained})
        print(f"fedshield: warning: every round was skipped: {'; '.join(reasons)}", file=sys.stderr)
        return 1
    return 0


DEMO_CELLS: tuple[tuple[str, str, dict[str, Scalar]], ...] = (
    ("FedAvg, no attack", "mean", {"num-malicious": 0}),
    ("FedAvg (mean)", "mean", {}),
    ("median", "median", {}),
    ("trimmed_mean", "trimmed_mean", {}),
    ("krum", "krum", {}),
)


def _cmd_demo(args: argparse.Namespace) -> int:
    """Digits, 10 clients of which 3 send sign-flipped updates: FedAvg vs robust rules."""
    out = Path(args.out)
    check_paths(None, out)
    base = load_config(
        None,
        [
            "dataset=digits", "num-clients=10", "num-malicious=3", "attack=sign_flip",
            "attack-params=scale=4.0", f"num-server-rounds={args.rounds}", f"seed={args.seed}",
            *args.overrides,
        ],
    )
    print(
        f"fedshield demo: {base['dataset']}, {base['num-clients']} clients, "
        f"{base['num-malicious']} malicious ({base['attack']}), {base['num-server-rounds']} rounds"
    )
    results: list[tuple[str, list[dict[str, Any]]]] = []
    t0 = time.perf_counter()
    for label, rule, extra in DEMO_CELLS:
        cfg = {**base, "aggregator": rule, **extra}
        slug = label.lower().replace(",", "").replace(" ", "-")
        print(f"- {label} ({'no attack' if cfg['num-malicious'] == 0 else 'under attack'})")
        # the demo owns these folders: a new demo replaces the last one's runs
        shutil.rmtree(out / slug, ignore_errors=True)
        rows = run_one(cfg, out / slug, quiet=True)
        print(f"  final accuracy {rows[-1]['accuracy']:.4f}")
        results.append((label, rows))
    table = ["| defense | attack | final accuracy |", "|---|---|---|"]
    for (label, _rule, extra), (_, rows) in zip(DEMO_CELLS, results, strict=True):
        attack = "none" if extra.get("num-malicious") == 0 else f"{base['attack']} x{base['num-malicious']}"
        table.append(f"| {label} | {attack} | {rows[-1]['accuracy']:.3f} |")
    text = "\n".join(table)
    print()
    print(text)
    (out / "summary.md").write_text(text + "\n")
    plot = out / "accuracy.png"
    _plot_curves(results, plot, title=f"digits, {base['num-malicious']}/{base['num-clients']} sign-flip clients")
    print(f"\nplot: {plot}   ({time.perf_counter() - t0:.1f} s)")
    return 0


def _plot_curves(results: Sequence[tuple[str, list[dict[str, Any]]]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, rows in results:
        ax.plot([r["round"] for r in rows], [r["accuracy"] for r in rows], label=label, marker=".")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# fedshield bench


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``fedshield bench`` (read by :func:`scenario_from_args`)."""
    p.add_argument(
        "scenario", nargs="?",
        help="scenario TOML file or the name of a shipped scenario (see --list)",
    )
    p.add_argument("--out", help="output folder (default results/bench/<name>)")
    p.add_argument("--dataset", "--datasets", dest="dataset", metavar="LIST",
                   help="datasets, comma-separated (digits, mnist, npz:PATH, ...)")
    p.add_argument("--partition", "--partitions", dest="partition", metavar="LIST",
                   help="partitions, e.g. 'iid,dirichlet(alpha=0.5)'")
    p.add_argument("--attacks", "--attack", dest="attacks", metavar="LIST",
                   help="attacks, e.g. 'none,alie,ipm(epsilon=10)'")
    p.add_argument("--defenses", "--defense", dest="defenses", metavar="LIST",
                   help="defenses, rule first then pre-aggregation steps, e.g. "
                   "'mean,krum,median+bucketing(s=2)'")
    p.add_argument("--malicious", metavar="LIST", help="values of f (num-malicious), e.g. 3,5")
    p.add_argument("--seeds", "--seed", dest="seeds", metavar="LIST", help="seeds, e.g. 0,1,2")
    p.add_argument("--clients", type=int, metavar="N", help="num-clients")
    p.add_argument("--rounds", type=int, metavar="N", help="num-server-rounds")
    p.add_argument("--set", action="append", metavar="key=value",
                   help="a fixed run-config key (repeatable)")
    p.add_argument("--name", help="scenario name (default: the TOML's)")
    p.add_argument("--jobs", type=int, default=None,
                   help=f"worker processes (default {default_jobs()}; 0: in this process)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="run each cell as a task on the Ray cluster at ADDRESS (HOST:PORT of a "
                   "head started with `ray start --head`, ray://HOST:PORT, or auto) instead of "
                   "local worker processes; --out must be visible to every node")
    p.add_argument("--ray-cpus", type=float, default=None, metavar="N",
                   help="with --ray: CPUs each cell reserves, also its torch threads (default 1)")
    p.add_argument("--ray-gpus", type=float, default=None, metavar="N",
                   help="with --ray: GPUs each cell reserves, a fraction below 1 shares a GPU "
                   "(0.25: four cells per GPU) or a whole number (default 0)")
    p.add_argument("--force", action="store_true",
                   help="run even if --out holds a different scenario")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--no-plots", action="store_true", help="skip heatmap.png and curves.png")
    p.add_argument("--dry-run", action="store_true", help="list the cells and exit")
    p.add_argument("--list", action="store_true", help="list the shipped scenarios and exit")


def _select(axis: str, current: Sequence[Any], flag: str) -> list[Any]:
    """A CLI list for ``axis``: names of existing entries select them, others are shorthands."""
    by_name: dict[str, Any] = {}
    for raw in current:
        by_name[parse_entry(axis, raw).name] = raw
    return [by_name.get(item, item) for item in split_top_level(flag, ",")]


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    """The scenario of a ``fedshield bench`` command line: the TOML, then the flags."""
    if args.scenario:
        data, origin = read_scenario_data(args.scenario)
        data = json.loads(json.dumps(data))  # deep copy
    else:
        data, origin = {"name": "bench"}, "command line"
    fixed: dict[str, Any] = dict(data.get("fixed", {}))
    matrix: dict[str, Any] = dict(data.get("matrix", {}))
    for axis, flag in (("dataset", args.dataset), ("partition", args.partition),
                       ("attack", args.attacks), ("defense", args.defenses)):
        if flag is not None:
            matrix[axis] = _select(axis, matrix.get(axis, []), flag)
    if args.malicious is not None:
        matrix["malicious"] = [int(v) for v in split_top_level(args.malicious, ",")]
        fixed.pop("num-malicious", None)
    if args.seeds is not None:
        matrix["seed"] = [int(v) for v in split_top_level(args.seeds, ",")]
        fixed.pop("seed", None)
    if args.clients is not None:
        fixed["num-clients"] = args.clients
    if args.rounds is not None:
        fixed["num-server-rounds"] = args.rounds
    for text in args.set or ():
        key, value = parse_override(text)
        if key == "seed":
            matrix["seed"] = [value]
            fixed.pop("seed", None)
        elif key == "num-malicious":
            matrix["malicious"] = [value]
            fixed.pop("num-malicious", None)
        else:
            fixed[key] = value
    if args.name is not None:
        data["name"] = args.name
    data["fixed"], data["matrix"] = fixed, matrix
    return parse_scenario(data, origin=origin)


def ray_cluster(args: argparse.Namespace) -> RayCluster | None:
    """The ``--ray`` options as a :class:`~simulations.bench.RayCluster`, or ``None``."""
    if args.ray is None:
        given = [f for f, v in (("--ray-cpus", args.ray_cpus), ("--ray-gpus", args.ray_gpus))
                 if v is not None]
        if given:
            verb, them = ("set", "them") if len(given) > 1 else ("sets", "it")
            raise ValueError(f"{' and '.join(given)} {verb} what each cell reserves on a Ray "
                             f"cluster: add --ray ADDRESS, or drop {them}")
        return None
    if args.jobs is not None:
        raise ValueError("--jobs sets the local pool's workers; with --ray the cluster runs "
                         "as many cells at once as its resources hold: drop --jobs")
    return RayCluster(
        args.ray,
        cpus=1.0 if args.ray_cpus is None else args.ray_cpus,
        gpus=0.0 if args.ray_gpus is None else args.ray_gpus,
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.list:
        for name, desc in shipped_scenarios().items():
            print(f"{name:20s} {desc}")
        return 0
    scenario = scenario_from_args(args)
    out = Path(args.out) if args.out else Path("results") / "bench" / scenario.name
    check_paths(None, out)
    cluster = ray_cluster(args)
    if args.dry_run:
        cells = scenario.cells()
        check_cells(cells)
        for cell in cells:
            print(f"{cell.cell_id}  {cell.coords.label()}")
        print(f"{len(cells)} cells -> {out}")
        return 0
    t0 = time.perf_counter()
    try:
        result = run_bench(
            scenario, out, jobs=args.jobs, force=args.force, quiet=args.quiet,
            plots=not args.no_plots, ray=cluster,
        )
    except KeyboardInterrupt:
        done = sum(1 for p in (out / "cells").glob(f"*/{DONE}"))
        print(
            f"\ninterrupted: {done} cell folder(s) in {out} are done; rerun the same command "
            "to resume",
            file=sys.stderr,
        )
        return 130
    print()
    print(result.markdown, end="")
    failed = result.failed
    print(f"\n{len(result.records)} cells in {time.perf_counter() - t0:.1f} s; results in {out}")
    if failed:
        print(
            f"{len(failed)} cell(s) failed (see {out / 'failures.jsonl'}); rerun to retry them",
            file=sys.stderr,
        )
    return result.exit_code


# ---------------------------------------------------------------------------------------
# fedshield audit


DEFAULT_AUDIT_DEFENSES = (
    "none",
    "clipping(max_norm=1.0)",
    "pruning(fraction=0.9)",
    "local_dp(clipping_norm=1.0, noise_std=0.01)",
    "dp_sgd(noise_multiplier=0.1, max_grad_norm=1.0)",
    "secagg_sum(k=4)",
)


def _cmd_audit_inversion(args: argparse.Namespace) -> int:
    """Gradient inversion against one client's update under each defense."""
    from .audit.inversion import run_inversion_audit

    attack_params: dict[str, dict[str, Any]] = {}
    for text in args.attack_param:
        spec = parse_spec(text, what="--attack-param")
        attack_params.setdefault(spec.name, {}).update(spec.params)
    defenses = [parse_spec(d, what="--defense") for d in (args.defense or DEFAULT_AUDIT_DEFENSES)]
    out = Path(args.out)
    check_paths(None, out)
    t0 = time.perf_counter()
    rows = run_inversion_audit(
        args.model,
        args.dataset,
        attacks=args.attack or ("dlg", "idlg", "cosine"),
        defenses=[(d.name, d.params) for d in defenses],
        batch_sizes=args.batch_size or (1,),
        seed=args.seed,
        iterations=args.iterations,
        out_dir=out,
        trials=args.trials,
        lr=args.lr,
        model_params=parse_params(" ".join(args.model_param), what="--model-param"),
        attack_params=attack_params,
    )
    md = out / "inversion.md"
    print(md.read_text() if md.exists() else json.dumps(rows, indent=1))
    print(f"{len(rows)} rows in {time.perf_counter() - t0:.1f} s; image grids and CSV in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``fedshield`` parser: ``run``, ``demo``, ``bench``, ``audit inversion``."""
    parser = argparse.ArgumentParser(prog="fedshield", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"fedshield {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every round")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run one federation in process")
    p.add_argument("--config", help="TOML file of run-config keys")
    p.add_argument("--out", default=None,
                   help="output folder (default: the config's out-dir, else results/run)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("demo", help="digits: FedAvg vs robust rules under sign-flip clients")
    p.add_argument("--out", default="results/demo")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "bench",
        help="run a matrix of attacks x defenses and report which defense holds",
        description="Run a matrix of federations (datasets x partitions x attacks x defenses "
        "x f x seeds) and report which defense holds under which attack.",
    )
    add_bench_arguments(p)
    p.set_defaults(func=_cmd_bench)

    audit = sub.add_parser("audit", help="privacy audits").add_subparsers(dest="audit", required=True)
    p = audit.add_parser(
        "inversion",
        help="gradient inversion (DLG, iDLG, Geiping et al.) against one client's update",
        description="Reconstruct a client's batch from its update as a curious server would, "
        "for each defense, and report PSNR/SSIM and label recovery with image grids.",
    )
    p.add_argument("--model", default="mlp")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--attack", action="append", help="dlg, idlg, cosine (repeatable; default all)")
    p.add_argument("--defense", action="append", metavar="'NAME(k=v, ...)'",
                   help="a defense and its parameters, e.g. "
                   "--defense 'dp_sgd(noise_multiplier=0.1, max_grad_norm=1.0)' (repeatable); "
                   "default: " + "; ".join(DEFAULT_AUDIT_DEFENSES))
    p.add_argument("--batch-size", action="append", type=int, help="repeatable; default 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--trials", type=int, default=1, help="victim batches per cell")
    p.add_argument("--lr", type=float, default=0.1, help="the victim's learning rate")
    p.add_argument("--model-param", action="append", default=[], metavar="k=v",
                   help="a model hyperparameter (repeatable), e.g. --model-param 'hidden=[64]'")
    p.add_argument("--attack-param", action="append", default=[], metavar="'ATTACK(k=v, ...)'",
                   help="an attack's parameters (repeatable), e.g. "
                   "--attack-param 'cosine(tv_weight=0.001)'")
    p.add_argument("--out", default="results/audit-inversion")
    p.set_defaults(func=_cmd_audit_inversion)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedshield`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except (KeyError, TypeError, ValueError, OSError) as exc:
        # one line that says what is wrong and how to fix it; --debug shows the traceback
        if args.debug:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        if isinstance(exc, OSError) and exc.filename is not None:
            msg = f"{exc.strerror or type(exc).__name__}: {exc.filename}"
        text = " ".join(str(msg).split())
        print(f"fedshield: error: {text} (run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
