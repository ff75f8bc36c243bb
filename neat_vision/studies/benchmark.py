"""A whole VTAB-1k or FGVC table in one command: tune on val, train on train+val over seeds, report test.

``neat-benchmark --suite vtab1k --data-dir <root> --config vtab1k/neat.yaml vtab1k/lora.yaml --grid lr=1e-3,3e-3
--seeds 0 1 2`` (or ``python -m neat_vision.studies.benchmark``). For each method config (one table row) and task:

1. **tune**: every grid point on the ``tune`` split protocol (train800 -> val200; FGVC train -> val), one seed
   (``--tune-seed``); the point with the best last-epoch validation top-1 is chosen (ties: lower validation loss).
   Test is never read here.
2. **final**: the chosen point on the ``final`` protocol (train800val200; FGVC train+val) for every ``--seeds``;
   the last epoch's test top-1 counts.

Both stages are studies (`neat_vision.studies.study`): resumable (finished runs are kept and skipped), on the
study executors (``local`` with ``--gpus``, ``submitit-local``, ``slurm`` with ``--slurm '{timeout_min: ...}'``);
all tasks of a stage are one study, so its runs fill every GPU slot. The table (``benchmark.csv``, ``.md``,
``.png`` under ``--output``): one row per method, a column per task (mean test top-1 over seeds), each group's
mean, ``mean`` = the mean of the tasks (VTAB-1k: of the 19 tasks) and ``mean_of_groups`` = the mean of the three
group means (papers report either), the trainable parameters (mean over tasks: heads differ) and V-PETL's PPT,
``mean * exp(-log10(P / 1e7 + 1))``. ``selection.csv`` lists each task's chosen point and its validation top-1.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from neat_vision.atomic import atomic_write, atomic_write_text
from neat_vision.data.benchmarks import FGVC_SETS, VTAB1K_GROUPS, suite_tasks
from neat_vision.engine.options import ConfigFileError, find_config
from neat_vision.errors import FolderInUse, Preempted, exit_code
from neat_vision.run_lock import folder_lock
from neat_vision.studies.runs import Point, Study, StudyError, fmt, read_result, study_from
from neat_vision.studies.study import run_study

__all__ = ["GROUPS", "choose", "main", "parse_grid", "ppt", "run_benchmark", "table_rows"]

GROUPS: dict[str, dict[str, list[str]]] = {
    "vtab1k": {group: list(tasks) for group, tasks in VTAB1K_GROUPS.items()},
    "fgvc": {"fgvc": list(FGVC_SETS)},
}


def ppt(accuracy: float, params: float) -> float:
    """V-PETL Bench's performance-per-parameter score: ``accuracy * exp(-log10(params / 1e7 + 1))``."""
    return accuracy * math.exp(-math.log10(params / 1e7 + 1))


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``KEY=V1,V2`` items (YAML values) as a study grid."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise StudyError(f"--grid {item!r}: expected KEY=VALUE[,VALUE...] such as lr=1e-3,3e-3")
        grid[key.strip().replace("-", "_")] = [yaml.safe_load(v) for v in values.split(",")]
    return grid


def _task_axis(suite: str, root: Path, tasks: Sequence[str], protocol: str, chosen: Mapping[str, dict] | None = None):
    return [
        {"label": task, "dataset": suite, "data_dir": str(root / task), "split_protocol": protocol}
        | (dict(chosen[task]) if chosen else {})
        for task in tasks
    ]


def _study(config: Path, output: Path, grid: dict[str, list], seeds: Sequence[int], how: dict[str, Any]) -> Study:
    data = {"base_config": str(config), "overrides": dict(how["sets"]), "grid": grid, "seeds": list(seeds)}
    data |= {"output": str(output), "executor": how["executor"]}
    if how["slurm"]:
        data["slurm"] = how["slurm"]
    return study_from(data, config, gpus=how["gpus"], train_command=how["train_command"])


def choose(study: Study) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Per task, the grid options of the point with the best last-epoch val top-1 (ties: lower val loss).

    Reads only the validation figures of each run's ``final.json``. Returns (task -> options, selection rows);
    tasks with an unfinished point are left out."""
    by_task: dict[str, list[tuple[Point, dict[str, Any]]]] = {}
    unfinished: set[str] = set()
    for point in study.points():
        task = point.labels["task"]
        result = read_result(study, point)
        if result is None:
            unfinished.add(task)
        else:
            by_task.setdefault(task, []).append((point, result))
    chosen, rows = {}, []
    for task, runs in by_task.items():
        if task in unfinished:
            continue
        point, result = max(runs, key=lambda pr: (pr[1]["val_top1"], -pr[1]["val_loss"]))
        options = {k: v for k, v in point.options.items() if k not in ("dataset", "data_dir", "split_protocol")}
        chosen[task] = options
        grid = {k: v for k, v in point.labels.items() if k != "task"}
        rows.append({"task": task, **{k: fmt(v) for k, v in grid.items()}, "val_top1": result["val_top1"]})
    return chosen, rows


def table_rows(suite: str, tasks: Sequence[str], method: str, study: Study) -> dict[str, Any] | None:
    """The method's table row from the final study's runs (``None`` until every task has a finished run)."""
    test: dict[str, list[float]] = {}
    params: list[float] = []
    for point in study.points():
        result = read_result(study, point)
        if result is not None:
            test.setdefault(point.labels["task"], []).append(result["test_top1"])
            params.append(result["trainable_params"])
    if not all(t in test for t in tasks):
        return None
    row: dict[str, Any] = {"method": method}
    row |= {t: statistics.fmean(test[t]) for t in tasks}
    group_means = []
    for group, members in GROUPS[suite].items():
        present = [t for t in members if t in tasks]
        if present and len(GROUPS[suite]) > 1:
            row[f"mean_{group}"] = statistics.fmean(row[t] for t in present)
            group_means.append(row[f"mean_{group}"])
    row["mean"] = statistics.fmean(row[t] for t in tasks)
    if group_means:
        row["mean_of_groups"] = statistics.fmean(group_means)
    row["seeds"] = min(len(v) for v in test.values())
    row["trainable_params"] = statistics.fmean(params)
    row["ppt"] = ppt(row["mean"], row["trainable_params"])
    return row


def _write_table(out: Path, rows: list[dict[str, Any]], tasks: Sequence[str], selection: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "benchmark.csv", text.getvalue())
    sel_columns = list(dict.fromkeys(k for row in selection for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=sel_columns or ["method", "task"])
    writer.writeheader()
    writer.writerows(selection)
    atomic_write_text(out / "selection.csv", text.getvalue())

    def cell(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    markdown = "\n".join(lines) + "\n"
    atomic_write_text(out / "benchmark.md", markdown)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(tasks) + 2), 4))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        ax.bar([x + i * width for x in range(len(tasks))], [row[t] for t in tasks], width, label=row["method"])
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))], tasks, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(out / "benchmark.png", lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return markdown


def run_benchmark(
    suite: str,
    data_dir: str | Path,
    configs: Sequence[str],
    *,
    output: str | Path,
    grid: dict[str, list[Any]] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    tune_seed: int = 0,
    tasks: Sequence[str] | None = None,
    sets: Mapping[str, Any] | None = None,
    executor: str = "local",
    gpus: Sequence[int] | None = None,
    slurm: Mapping[str, Any] | None = None,
    train_command: Sequence[str] | None = None,
) -> int:
    """Tune, select on validation, run the final protocol over ``seeds`` and write the table; the exit code."""
    known = suite_tasks(suite)
    tasks = list(tasks) if tasks else list(known)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise StudyError(f"--tasks {unknown} are not {suite} tasks: {', '.join(known)}")
    root, out = Path(data_dir), Path(output)
    missing = [t for t in tasks if not (root / t).is_dir()]
    if missing:
        raise StudyError(f"--data-dir {root} lacks the task folder(s) {', '.join(missing)} (or pass --tasks)")
    how = {"sets": dict(sets or {}), "executor": executor, "gpus": gpus, "train_command": train_command}
    how["slurm"] = dict(slurm or {}) or ({"timeout_min": 24 * 60} if executor != "local" else {})
    code, rows, selection = 0, [], []
    with folder_lock(out, "benchmark"):
        for config_name in configs:
            try:
                config = find_config(config_name).resolve()
            except ConfigFileError as err:
                raise StudyError(str(err)) from None
            method = config.stem
            tune_grid = {"task": _task_axis(suite, root, tasks, "tune"), **(grid or {})}
            tune = _study(config, out / method / "tune", tune_grid, [tune_seed], how)
            print(f"[benchmark] {method}: tuning {len(tune.points())} run(s) on {suite} (val only)", flush=True)
            code |= run_study(tune)
            chosen, picked = choose(tune)
            selection += [{"method": method, **r} for r in picked]
            ready = [t for t in tasks if t in chosen]
            if not ready:
                continue
            final = _study(config, out / method / "final", {"task": _task_axis(suite, root, ready, "final", chosen)},
                           seeds, how)  # fmt: skip
            print(f"[benchmark] {method}: final protocol, {len(final.points())} run(s)", flush=True)
            code |= run_study(final)
            row = table_rows(suite, tasks, method, final)
            if row is None:
                print(f"[benchmark] {method}: not every task finished; rerun to complete the row", flush=True)
                code |= 1
            else:
                rows.append(row)
        if rows:
            markdown = _write_table(out, rows, tasks, selection)
            print(markdown, end="")
            print(f"[benchmark] wrote {out / 'benchmark.md'}, benchmark.csv, benchmark.png, selection.csv")
    return code


def _mapping(text: str) -> dict[str, Any]:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{timeout_min: 600}}', got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neat-benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", required=True, choices=sorted(GROUPS), help="vtab1k (19 tasks) or fgvc (5 sets)")
    parser.add_argument("--data-dir", required=True, help="folder holding one folder per task (its name)")
    parser.add_argument("-c", "--config", nargs="+", required=True, help="method config(s): a table row each")
    parser.add_argument("--grid", nargs="*", default=[], help="tuning grid, KEY=V1,V2 (any train.py option)")
    parser.add_argument("--set", nargs="*", default=[], help="options for every run, KEY=VALUE")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the final protocol")
    parser.add_argument("--tune-seed", type=int, default=0, help="seed of the tuning runs")
    parser.add_argument("--tasks", nargs="+", default=None, help="a subset of the suite's tasks")
    parser.add_argument("--output", required=True, help="benchmark folder (the runs and the table)")
    parser.add_argument("--executor", default="local", help="local, submitit-local or slurm")
    parser.add_argument("--gpus", type=int, nargs="+", default=None, help="device ids (executor local)")
    parser.add_argument("--slurm", type=_mapping, default=None, help="study slurm mapping, e.g. '{timeout_min: 600}'")
    args = parser.parse_args(argv)
    try:
        sets = {k: v[0] for k, v in parse_grid(args.set).items()}
        return run_benchmark(
            args.suite, args.data_dir, args.config, output=args.output, grid=parse_grid(args.grid), seeds=args.seeds,
            tune_seed=args.tune_seed, tasks=args.tasks, sets=sets, executor=args.executor, gpus=args.gpus,
            slurm=args.slurm,
        )  # fmt: skip
    except StudyError as err:
        parser.error(str(err))
    except (FolderInUse, Preempted) as err:
        return exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
