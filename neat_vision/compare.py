"""Method comparison at a matched adapter budget, with the learning rate chosen on validation, never on test.

``python -m neat_vision.compare --config configs/offline_compare/digits.yaml [--gpus 0 0 0 0]``. A compare
file is a study file (see `neat_vision.study`) whose grid is written per method::

    base_config: ../demo.yaml
    overrides: {epochs: 12, param_budget: 18432}
    methods:                      # label -> fixed options + a learning-rate grid
      lp:   {method: linear, lr: [3.0e-3, 1.0e-2, 3.0e-2]}
      neat: {method: neat, neat_act: relu, lr: [1.0e-3, 3.0e-3, 1.0e-2]}
    seeds: [0, 1, 2]
    output: runs/compare/digits

Each (method, lr, seed) is a normal training run (the study runner: resumable, spread over GPUs). ``lr`` sets
the method's learning rates: the head's and the update's (``lr_neat``), or for ``full`` the backbone's. For
each method the learning rate with the best mean last-epoch validation top-1 over seeds is selected; the
report gives that method's test top-1 (last-epoch model) as mean ± std over the seeds at that rate, in
``compare.md``, ``compare.csv`` and ``compare.png``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from neat_vision.study import StudyError, load_study, run_study

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


def select(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: the learning rate with the best mean validation top-1, and test mean/std there."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get("test_top1") in (None, ""):
            continue
        method, lr = row["variant"].rsplit("@", 1)
        runs[method][lr].append(row)
    table = []
    for method, by_lr in runs.items():
        val_means = {lr: statistics.mean(float(r["val_top1"]) for r in rs) for lr, rs in by_lr.items()}
        best_lr = max(val_means, key=val_means.get)
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
        lines.append(
            f"| {r['method']} | {r['update_params']:,} | {r['trainable_params']:,} | {r['lr']} | "
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
        path = Path(config).resolve()
        compare = yaml.safe_load(path.read_text())
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=path.parent, delete=False) as tmp:
            yaml.safe_dump(study_file(compare, path), tmp)
        try:
            study = load_study(tmp.name, gpus=gpus, executor=executor)
        finally:
            Path(tmp.name).unlink()
        if not report_only:
            code |= run_study(study)
        results_csv = study.output / "results.csv"
        rows = list(csv.DictReader(results_csv.open())) if results_csv.is_file() else []
        table = select(rows)
        if table:
            results[compare.get("title", path.stem)] = table
        out_dir = out_dir or study.output.parent
    if not results:
        print("[compare] no finished runs")
        return code or 1
    out = Path(output) if output else out_dir
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(_markdown(title, table) + "\n" for title, table in results.items())
    (out / "compare.md").write_text(text)
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["dataset", *next(iter(results.values()))[0]])
        writer.writeheader()
        for title, table in results.items():
            for row in table:
                writer.writerow({"dataset": title, **row})
    _plot(results, out / "compare.png")
    print(text, end="")
    print(f"[compare] wrote {out / 'compare.md'}, compare.csv, compare.png")
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neat_vision.compare", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", nargs="+", required=True, help="compare YAML file(s)")
    parser.add_argument("--gpus", type=int, nargs="+", default=None, help="device ids (repeat one for parallel runs)")
    parser.add_argument("--output", default=None, help="folder of the combined report")
    parser.add_argument("--executor", default=None, help="local, slurm or submitit-local (see neat_vision.study)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from finished runs")
    args = parser.parse_args(argv)
    try:
        return run_compare(
            args.config, gpus=args.gpus, report_only=args.report_only, output=args.output, executor=args.executor
        )
    except StudyError as err:
        parser.error(str(err))


if __name__ == "__main__":
    sys.exit(main())
