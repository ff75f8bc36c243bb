"""Method comparison at a matched adapter budget, with the learning rate chosen on validation, never on test.

``neat-compare --config offline_compare/digits [--gpus 0 0 0 0]`` (or ``python -m neat_vision.studies.compare``;
``--config`` takes paths or shipped configs' names, see `neat_vision.engine.options.find_config`). A compare
file is a study file (see `neat_vision.studies.study`) whose grid is written per method::

    base_config: ../demo.yaml
    overrides: {epochs: 12, param_budget: 18432}
    methods:                      # label -> fixed options + a learning-rate grid
      lp:   {method: linear, lr: [3.0e-3, 1.0e-2, 3.0e-2]}
      neat: {method: neat, neat_act: relu, lr: [1.0e-3, 3.0e-3, 1.0e-2]}
    seeds: [0, 1, 2]
    selection_seeds: [0]          # optional: the lr grid runs on these seeds only
    output: runs/compare/digits

Each (method, lr, seed) is a normal training run (the study runner: resumable, spread over GPUs). ``lr`` sets
the method's learning rates: the head's and the update's (``lr_neat``), or for ``full`` the backbone's. For
each method the learning rate with the best mean last-epoch validation top-1 over seeds is selected (ties, as on
a small validation split that saturates, go to the lower mean validation loss); the
report gives that method's test top-1 (last-epoch model) as mean ± std over the seeds at that rate, in
``compare.md``, ``compare.csv`` and ``compare.png``. With ``selection_seeds`` the grid runs on those seeds only
(their per-lr results are kept in ``selection.csv``), the rate is chosen there on validation, and the other seeds
run at the chosen rate only: fewer runs, the same rule. A chosen rate at either end of its grid is marked
``(edge)`` in the report and warned about: widen that method's grid (finished runs are reused).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from neat_vision.atomic import atomic_write, atomic_write_text
from neat_vision.engine.options import ConfigFileError, find_config
from neat_vision.errors import FolderInUse, Preempted, exit_code
from neat_vision.studies.study import Study, StudyError, report, run_study, study_from

LR_OPTIONS = {"full": ("lr_backbone", "lr_head"), "linear": ("lr_head",)}
DEFAULT_LR_OPTIONS = ("lr_neat", "lr_head")


def study_file(compare: dict[str, Any], path: Path) -> dict[str, Any]:
    """The study description of a compare file: one grid axis ``variant`` = method x learning rate."""
    data = dict(compare)
    data.pop("title", None)
    methods = data.pop("methods", None)
    if not isinstance(methods, dict) or not methods:
        raise StudyError(f"{path}: 'methods' must map labels to {{method: ..., lr: [...]}}, got {methods!r}")
    variants = []
    for label, spec in methods.items():
        spec = dict(spec)
        lrs = spec.pop("lr", None)
        if "method" not in spec or not isinstance(lrs, list) or not lrs:
            raise StudyError(f"{path}: methods.{label} needs 'method' and a non-empty 'lr' list, got {spec!r}")
        for lr in lrs:
            options = {key: float(lr) for key in LR_OPTIONS.get(spec["method"], DEFAULT_LR_OPTIONS)}
            if spec["method"] in LR_OPTIONS:  # linear and full have no update: no budget to match
                options["param_budget"] = None
            variants.append({"label": f"{label}@{float(lr):g}", **spec, **options})
    data["grid"] = {"variant": variants}
    base = data.get("base_config")
    if base is not None and not Path(base).is_absolute():
        data["base_config"] = str((path.parent / base).resolve())
    return data


def _seed_list(value: Any, key: str, path: Path) -> list[int]:
    seeds = [value] if isinstance(value, int) else value
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds):
        raise StudyError(f"{path}: {key}={value!r} is not allowed: an integer or a non-empty list of integers")
    return seeds


def _grids(compare: dict[str, Any]) -> dict[str, list[float]]:
    return {label: sorted(float(lr) for lr in spec.get("lr", [])) for label, spec in compare["methods"].items()}


def _mark_edges(table: list[dict[str, Any]], grids: dict[str, list[float]]) -> None:
    for row in table:
        grid, lr = grids.get(row["method"], []), float(row["lr"])
        row["at_edge"] = len(grid) > 1 and lr in (grid[0], grid[-1])


def _mean_loss(rows: list[dict[str, Any]]) -> float:
    losses = [r.get("val_loss") for r in rows]
    if any(v in (None, "") for v in losses):  # runs from before final.json held the validation loss
        return math.inf
    return statistics.mean(float(v) for v in losses)


def select(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: the learning rate with the best mean validation top-1 (ties: lower mean validation loss), and
    test mean/std there."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get("test_top1") in (None, ""):
            continue
        method, lr = row["variant"].rsplit("@", 1)
        runs[method][lr].append(row)
    table = []
    for method, by_lr in runs.items():
        val_means = {lr: statistics.mean(float(r["val_top1"]) for r in rs) for lr, rs in by_lr.items()}
        loss_means = {lr: _mean_loss(rs) for lr, rs in by_lr.items()}
        # ties on top-1 (a small validation split saturates) go to the lower validation loss
        best_lr = max(val_means, key=lambda lr: (val_means[lr], -loss_means[lr]))
        chosen = by_lr[best_lr]
        tests = [float(r["test_top1"]) for r in chosen]
        table.append(
            {
                "method": method,
                "lr": best_lr,
                "val_top1_mean": val_means[best_lr],
                "test_top1_mean": statistics.mean(tests),
                "test_top1_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                "seeds": len(tests),
                "trainable_params": int(float(chosen[0]["trainable_params"])),
                "update_params": int(float(chosen[0].get("neat_params") or 0)),
                "lr_val_means": {lr: round(v, 2) for lr, v in sorted(val_means.items(), key=lambda kv: float(kv[0]))},
            }
        )
    return table


def _markdown(title: str, table: list[dict[str, Any]]) -> str:
    lines = [
        f"### {title}",
        "",
        "| method | update params | trainable params | lr (chosen on val) | val top-1 | test top-1 (mean ± std) "
        "| seeds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lr = f"{r['lr']} (edge)" if r.get("at_edge") else r["lr"]
        lines.append(
            f"| {r['method']} | {r['update_params']:,} | {r['trainable_params']:,} | {lr} | "
            f"{r['val_top1_mean']:.2f} | {r['test_top1_mean']:.2f} ± {r['test_top1_std']:.2f} | {r['seeds']} |"
        )
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (title, table) in zip(axes[0], results.items()):
        names = [r["method"] for r in table]
        ax.bar(names, [r["test_top1_mean"] for r in table], yerr=[r["test_top1_std"] for r in table], capsize=4)
        low = min(r["test_top1_mean"] - r["test_top1_std"] for r in table)
        ax.set_ylim(max(0.0, low - 5), 100)
        ax.set_title(title)
        ax.set_ylabel("test top-1 (%)")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def _study(
    compare: dict[str, Any],
    path: Path,
    *,
    gpus: Sequence[int] | None,
    executor: str | None,
    seeds: list[int] | None = None,
    lrs: dict[str, str] | None = None,
) -> Study:
    """The study of ``compare``, optionally on other ``seeds`` and with each method's grid cut to one rate."""
    data = dict(compare)
    if seeds is not None:
        data["seeds"] = seeds
    if lrs is not None:
        data["methods"] = {label: {**spec, "lr": [float(lrs[label])]} for label, spec in data["methods"].items()}
    return study_from(study_file(data, path), path, gpus=gpus, executor=executor)


def _finished_rows(study: Study, run: bool) -> tuple[int, list[dict[str, Any]]]:
    """Run the study (or only rebuild its report); its finished rows."""
    code = 0
    if run:
        code = run_study(study)
    else:
        report(study)
    results_csv = study.output / "results.csv"
    return code, list(csv.DictReader(results_csv.open())) if results_csv.is_file() else []


def compare_one(
    path: Path, *, gpus: Sequence[int] | None, report_only: bool, executor: str | None
) -> tuple[int, Study, str, list[dict[str, Any]]]:
    """Run one compare file; its exit code, study, title and selected table (`select`)."""
    compare = yaml.safe_load(path.read_text())
    if not isinstance(compare, dict):
        raise StudyError(f"{path}: a compare file must be a YAML mapping")
    title = compare.pop("title", path.stem)
    selection_seeds = compare.pop("selection_seeds", None)
    study_file(compare, path)  # validates 'methods' before anything runs
    grids = _grids(compare)
    if selection_seeds is None:
        study = _study(compare, path, gpus=gpus, executor=executor)
        code, rows = _finished_rows(study, not report_only)
        table = select(rows)
    else:
        seeds = _seed_list(compare.get("seeds", [0]), "seeds", path)
        selection_seeds = _seed_list(selection_seeds, "selection_seeds", path)
        if not set(selection_seeds) <= set(seeds):
            raise StudyError(f"{path}: selection_seeds={selection_seeds} must be among seeds={seeds}")
        grid_study = _study(compare, path, gpus=gpus, executor=executor, seeds=selection_seeds)
        code, grid_rows = _finished_rows(grid_study, not report_only)
        if (grid_study.output / "results.csv").is_file():
            (grid_study.output / "results.csv").replace(grid_study.output / "selection.csv")
        chosen = {row["method"]: row for row in select(grid_rows)}
        table = []
        if chosen:
            compare["methods"] = {label: spec for label, spec in compare["methods"].items() if label in chosen}
            lrs = {label: row["lr"] for label, row in chosen.items()}
            study = _study(compare, path, gpus=gpus, executor=executor, lrs=lrs)
            more, rows = _finished_rows(study, not report_only)
            code |= more
            for row in select(rows):  # one rate per method here; the grid's validation means come from stage 1
                row["lr_val_means"] = chosen[row["method"]]["lr_val_means"]
                table.append(row)
        else:
            study = grid_study
    _mark_edges(table, grids)
    for row in table:
        if row["at_edge"]:
            print(
                f"[compare] warning: {title}: {row['method']} chose lr {row['lr']}, an end of its grid "
                f"{grids[row['method']]}; widen the grid (finished runs are reused)",
                flush=True,
            )
    return code, study, title, table


def run_compare(
    configs: Sequence[str],
    *,
    gpus: Sequence[int] | None,
    report_only: bool,
    output: str | None,
    executor: str | None = None,
) -> int:
    """Run (or only report) each compare file; write the combined report next to the first one's output."""
    results, code, out_dir = {}, 0, None
    for config in configs:
        try:
            path = find_config(config).resolve()
        except ConfigFileError as err:
            raise StudyError(str(err).replace("config file", "compare file", 1)) from None
        more, study, title, table = compare_one(path, gpus=gpus, report_only=report_only, executor=executor)
        code |= more
        if table:
            results[title] = table
        out_dir = out_dir or study.output.parent
    if not results:
        print("[compare] no finished runs")
        return code or 1
    out = Path(output) if output else out_dir
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(_markdown(title, table) + "\n" for title, table in results.items())
    atomic_write_text(out / "compare.md", text)
    table_text = io.StringIO()
    writer = csv.DictWriter(table_text, fieldnames=["dataset", *next(iter(results.values()))[0]])
    writer.writeheader()
    for title, table in results.items():
        for row in table:
            writer.writerow({"dataset": title, **row})
    atomic_write_text(out / "compare.csv", table_text.getvalue())
    _plot(results, out / "compare.png")
    print(text, end="")
    print(f"[compare] wrote {out / 'compare.md'}, compare.csv, compare.png")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neat-compare", description=__doc__.splitlines()[0])
    parser.add_argument(
        "-c", "--config", nargs="+", required=True,
        help="compare YAML file(s), or shipped configs' names (offline_compare/digits, ...)",
    )  # fmt: skip
    parser.add_argument("--gpus", type=int, nargs="+", default=None, help="device ids (repeat one for parallel runs)")
    parser.add_argument("--output", default=None, help="folder of the combined report")
    parser.add_argument("--executor", default=None, help="local, slurm or submitit-local (see neat_vision.studies)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs")
    args = parser.parse_args(argv)
    try:
        return run_compare(
            args.config, gpus=args.gpus, report_only=args.report_only, output=args.output, executor=args.executor
        )
    except StudyError as err:
        parser.error(str(err))
    except (FolderInUse, Preempted) as err:
        return exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
