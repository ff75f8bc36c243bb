"""Sensitivity studies: a grid of normal training runs, resumable, on this machine or as Slurm jobs.

``python -m neat_vision.studies.study --config configs/studies/depth.yaml``. A study file holds:

- ``base_config``: the training config every run starts from, a path relative to the study file; it may
  name the point's options in braces (``../sin/{dataset}.yaml``) and may itself be a grid axis;
- ``overrides``: options fixed for the whole study (keys are the training script's option names);
- ``grid``: ``option: [values]`` axes, crossed; an entry may be a mapping that sets several options at once
  (``{neat_act: sin, lr_neat: 1.0e-3}``; an optional ``label`` key names it);
- ``seeds`` (default ``[0]``), ``output`` (the study folder), ``gpus`` (device ids: one run per GPU at a
  time through ``CUDA_VISIBLE_DEVICES``; default: one run after another), ``train_command`` (default: this
  repository's ``train.py`` with the current Python);
- ``executor``: ``local`` (default: this process starts the runs), ``slurm`` (one submitit job array on a
  Slurm cluster, see `neat_vision.studies.slurm`) or ``submitit-local`` (the same jobs through submitit's local
  executor, to try a cluster study on this machine); ``slurm``: the jobs' resources (``SLURM_KEYS``).

Each run gets ``<output>/points/<name>.yaml`` (``base:`` plus its options) and trains with
``train_command --config <that> --output <output> --experiment <name> --resume auto`` into
``<output>/<name>/``; a run whose ``final.json`` exists is skipped, an interrupted one resumes. The study
then writes ``results.csv``, ``results.md``, ``plot_<axis>.png`` and TensorBoard hparams in ``tb_hparams/``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
STUDY_KEYS = ("base_config", "overrides", "grid", "seeds", "output", "gpus", "train_command", "executor", "slurm")
EXECUTORS = {
    "local": "this process runs them (the default)",
    "slurm": "a submitit job array on a Slurm cluster",
    "submitit-local": "the same submitit jobs on this machine, all at once",
}
RUNNER_OPTIONS = ("seed", "output", "experiment", "resume", "config", "base")  # the runner sets these
METRICS = (("best_val_top1", "best val top-1"), ("test_top1", "test top-1"))
RESULT_KEYS = ("trainable_params", "neat_params", "val_top1", "val_loss", "best_val_top1", "test_top1", "wall_time_s")


def _whole(low: int) -> Callable[[Any], bool]:
    return lambda v: type(v) is int and v >= low


# slurm: key -> (check, what is allowed); submitit applies them to every job (see neat_vision.studies.slurm)
SLURM_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "timeout_min": (_whole(1), "the time limit of one run in minutes, an integer >= 1 (required off local)"),
    "partition": (lambda v: isinstance(v, str) and bool(v), "a Slurm partition name"),
    "gpus_per_node": (_whole(0), "GPUs per run, an integer >= 0"),
    "cpus_per_task": (_whole(1), "CPU cores per run, an integer >= 1"),
    "mem_gb": (lambda v: type(v) in (int, float) and v > 0, "memory per run in GB, a number > 0"),
    "array_parallelism": (_whole(1), "how many runs of the array may run at once, an integer >= 1"),
    "max_num_timeout": (_whole(0), "how often a run that reaches its time limit is requeued, an integer >= 0"),
    "folder": (lambda v: isinstance(v, str) and bool(v), "submitit's folder for job files and logs"),
    "parameters": (
        lambda v: isinstance(v, Mapping) and all(isinstance(k, str) for k in v),
        "a mapping of further submitit parameters (update_parameters names: slurm_account, slurm_qos, ...)",
    ),
}
# submitit parameters that the keys above set, and those that would start a run more than once
SLURM_SET = {
    "timeout_min": "timeout_min",
    "slurm_time": "timeout_min",
    "slurm_partition": "partition",
    "gpus_per_node": "gpus_per_node",
    "slurm_gpus_per_node": "gpus_per_node",
    "cpus_per_task": "cpus_per_task",
    "slurm_cpus_per_task": "cpus_per_task",
    "mem_gb": "mem_gb",
    "slurm_mem": "mem_gb",
    "slurm_array_parallelism": "array_parallelism",
}
ONE_TASK = ("nodes", "tasks_per_node", "slurm_nodes", "slurm_ntasks_per_node", "slurm_ntasks")


class StudyError(ValueError):
    """A study file holds an unknown key or a value that is not allowed."""


def _fail(key: str, value: Any, allowed: str) -> None:
    raise StudyError(f"study {key}={value!r} is not allowed: {allowed}")


def _fmt(value: Any) -> str:
    """A short display form: ``0.001``, ``q+v+mlp``, a config file's stem."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(_fmt(v) for v in value)
    if isinstance(value, Path):
        return os.path.relpath(value)
    return str(value)


@dataclass(frozen=True)
class Axis:
    """One grid axis: the options each entry sets and the entry's label."""

    name: str
    entries: tuple[dict[str, Any], ...]
    labels: tuple[Any, ...]


@dataclass(frozen=True)
class Point:
    """One training run: its folder name, axis labels, options set on top of the overrides, base config, seed."""

    name: str
    labels: dict[str, Any]
    options: dict[str, Any]
    base: Path
    seed: int


@dataclass(frozen=True)
class Study:
    """A validated study file (see the module docstring)."""

    file: Path
    overrides: dict[str, Any]
    axes: tuple[Axis, ...]
    seeds: tuple[int, ...]
    output: Path
    gpus: tuple[int, ...] | None
    train_command: tuple[str, ...]
    executor: str = "local"
    slurm: dict[str, Any] = field(default_factory=dict)

    @property
    def default_command(self) -> bool:
        return self.train_command == _default_command()

    def points(self) -> list[Point]:
        """Every run: the grid points (axes crossed) times the seeds."""
        points, names = [], set()
        for combo in itertools.product(*(range(len(a.entries)) for a in self.axes)):
            options: dict[str, Any] = {}
            labels = {}
            for axis, i in zip(self.axes, combo):
                options.update(axis.entries[i])
                labels[axis.name] = axis.labels[i]
            merged = {**self.overrides, **options}
            template = merged.pop("base_config", None)
            if template is None:
                raise StudyError(f"study point {labels} has no base_config: set it at the top or on the grid")
            try:
                base = (self.file.parent / template.format(**{k: _fmt(v) for k, v in merged.items()})).resolve()
            except (KeyError, IndexError, ValueError) as err:
                raise StudyError(
                    f"study base_config={template!r} names an option this point does not set: {err}"
                ) from None
            stem = "__".join(f"{k}={_slug(_fmt(v))}" for k, v in labels.items()) or "run"
            if stem in names:
                raise StudyError(f"two grid points are both named {stem!r}: give mapping entries a distinct label")
            names.add(stem)
            points += [Point(f"{stem}__seed={s}", labels, options, base, s) for s in self.seeds]
        return points

    def run_options(self, point: Point) -> dict[str, Any]:
        """The training options of a point (overrides, grid, seed), ``base_config`` left out."""
        options = {**self.overrides, **point.options, "seed": point.seed}
        options.pop("base_config", None)
        return options


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._+=,-]+", "-", text).strip("-") or "x"
    return slug if len(slug) <= 60 else f"{slug[:50]}-{hashlib.sha1(slug.encode()).hexdigest()[:8]}"


def _default_command() -> tuple[str, ...]:
    return (sys.executable, str(REPO / "train.py"))


def _options(value: Any, key: str) -> dict[str, Any]:
    """A mapping of training options (runner options refused)."""
    if not isinstance(value, Mapping):
        _fail(key, value, "a mapping of option: value")
    for k, v in value.items():
        if not isinstance(k, str) or k in RUNNER_OPTIONS:
            _fail(f"{key}.{k}", v, f"options other than {', '.join(RUNNER_OPTIONS)} (the runner sets those)")
        if k == "base_config" and not isinstance(v, str):
            _fail(f"{key}.base_config", v, "a path to a training config, relative to the study file")
    return dict(value)


def _axis(name: str, values: Any) -> Axis:
    if not isinstance(values, list) or not values:
        _fail(f"grid.{name}", values, "a non-empty list of values (or of mappings setting several options)")
    entries, labels = [], []
    for value in values:
        if isinstance(value, Mapping):
            entry = dict(value)
            label = entry.pop("label", None)
            if not entry:
                _fail(f"grid.{name}", value, "a mapping with at least one option")
            entry = _options(entry, f"grid.{name}")
            if label is None:
                label = entry[name] if name in entry else ",".join(f"{k}={_fmt(v)}" for k, v in entry.items())
        else:
            entry = _options({name: value}, "grid")
            label = entry[name]
        if name == "base_config" and label == entry.get(name):
            label = Path(label).stem
        entries.append(entry)
        labels.append(label)
    return Axis(name, tuple(entries), tuple(labels))


def _slurm(value: Any, executor: str) -> dict[str, Any]:
    """The validated ``slurm`` mapping (submitit checks the names inside ``parameters`` when it starts)."""
    if not isinstance(value, Mapping):
        _fail("slurm", value, f"a mapping with keys {', '.join(SLURM_KEYS)}")
    unknown = sorted(set(value) - set(SLURM_KEYS))
    if unknown:
        raise StudyError(f"unknown slurm key(s) {unknown}: allowed keys are {', '.join(SLURM_KEYS)}")
    for key, v in value.items():
        check, allowed = SLURM_KEYS[key]
        if not check(v):
            _fail(f"slurm.{key}", v, allowed)
    for key, v in (value.get("parameters") or {}).items():
        if key in SLURM_SET:
            _fail(f"slurm.parameters.{key}", v, f"set by the study: use slurm.{SLURM_SET[key]}")
        if key in ONE_TASK:
            _fail(f"slurm.parameters.{key}", v, "one process per run (a multi-GPU run: train_command: torchrun ...)")
    if executor != "local" and "timeout_min" not in value:
        _fail("slurm.timeout_min", None, f"required with executor {executor}: {SLURM_KEYS['timeout_min'][1]}")
    return dict(value)


def load_study(
    path: str | os.PathLike,
    *,
    output: str | None = None,
    gpus: Sequence[int] | None = None,
    train_command: str | Sequence[str] | None = None,
    executor: str | None = None,
) -> Study:
    """Read and validate a study file; the keyword arguments override its keys."""
    file = Path(path).resolve()
    if not file.is_file():
        raise StudyError(f"study file {path} not found")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, Mapping):
        _fail("file", str(path), "a YAML mapping")
    unknown = sorted(set(data) - set(STUDY_KEYS))
    if unknown:
        raise StudyError(f"unknown study key(s) {unknown}: allowed keys are {', '.join(STUDY_KEYS)}")
    overrides = _options(data.get("overrides") or {}, "overrides")
    if data.get("base_config") is not None:
        overrides = {**_options({"base_config": data["base_config"]}, "file"), **overrides}
    grid = data.get("grid") or {}
    if not isinstance(grid, Mapping):
        _fail("grid", grid, "a mapping of option: [values]")
    axes = tuple(_axis(str(name), values) for name, values in grid.items())
    seeds = data.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds):
        _fail("seeds", seeds, "an integer or a non-empty list of integers")
    out = output if output is not None else data.get("output")
    if not isinstance(out, str) or not out:
        _fail("output", out, "a folder path (relative to the working directory)")
    gpu_ids = gpus if gpus is not None else data.get("gpus")
    if gpu_ids is not None:
        gpu_ids = [gpu_ids] if isinstance(gpu_ids, int) else gpu_ids
        if not isinstance(gpu_ids, (list, tuple)) or not gpu_ids or not all(isinstance(g, int) for g in gpu_ids):
            _fail("gpus", gpu_ids, "a list of device ids such as [0, 1], or none for one run after another")
    engine = executor if executor is not None else data.get("executor", "local")
    if engine not in EXECUTORS:
        _fail("executor", engine, "; ".join(f"{k} ({v})" for k, v in EXECUTORS.items()))
    if engine != "local" and gpu_ids is not None:
        _fail("gpus", gpu_ids, f"only with executor local (executor {engine} takes slurm.gpus_per_node)")
    slurm = _slurm(data.get("slurm") or {}, engine)
    command = train_command if train_command is not None else data.get("train_command")
    command = shlex.split(command) if isinstance(command, str) else command
    if command is not None and (not isinstance(command, (list, tuple)) or not command):
        _fail("train_command", command, "a command (string or list) that accepts train.py's options")
    return Study(
        file=file,
        overrides=overrides,
        axes=axes,
        seeds=tuple(dict.fromkeys(seeds)),
        output=Path(out),
        gpus=None if gpu_ids is None else tuple(gpu_ids),
        train_command=tuple(str(c) for c in command) if command else _default_command(),
        executor=engine,
        slurm=slurm,
    )


def write_point_config(study: Study, point: Point) -> Path:
    """``<output>/points/<name>.yaml``: ``base:`` (relative path) plus the point's options."""
    folder = study.output / "points"
    folder.mkdir(parents=True, exist_ok=True)
    config = {"base": os.path.relpath(point.base, folder.resolve()), **study.run_options(point)}
    path = folder / f"{point.name}.yaml"
    text = yaml.safe_dump(config, sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def read_result(study: Study, point: Point) -> dict[str, Any] | None:
    """The run's ``final.json``, or ``None`` when it has not finished."""
    file = study.output / point.name / "final.json"
    if not file.is_file():
        return None
    return json.loads(file.read_text())


def point_command(study: Study, point: Point, *, absolute: bool = False) -> list[str]:
    """Write the point's config and return its training command (absolute paths for jobs run elsewhere)."""
    config, output = write_point_config(study, point), study.output
    if absolute:
        config, output = config.resolve(), output.resolve()
    cmd = [*study.train_command, "--config", str(config), "--output", str(output)]
    return cmd + ["--experiment", point.name, "--resume", "auto"]


def log_path(study: Study, point: Point) -> Path:
    """``<output>/logs/<name>.log``: the run's output, appended to on every attempt."""
    logs = study.output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return logs / f"{point.name}.log"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def _metric_text(result: Mapping[str, Any]) -> str:
    parts = [f"{label} {result[key]:.2f}" for key, label in METRICS if isinstance(result.get(key), (int, float))]
    return ", ".join(parts)


class Progress:
    """Outcome lines with an ETA, shared by the local runner and the submitit jobs (`neat_vision.studies.slurm`)."""

    def __init__(self, study: Study, total: int, slots: int) -> None:
        self.study = study
        self.total = total
        self.slots = max(1, slots)
        self.durations: list[float] = []
        self.failed: list[str] = []

    def _eta(self) -> str:
        left = self.total - len(self.durations) - len(self.failed)
        if not self.durations or left <= 0:
            return ""
        mean = sum(self.durations) / len(self.durations)
        return f" | {left} left, ETA {_duration(mean * math.ceil(left / self.slots))}"

    def finish(self, index: int, point: Point, code: int | None, took: float, why: str | None = None) -> None:
        """Record a run that ended with exit ``code`` (``None``: it never exited, ``why`` says what happened)."""
        result = read_result(self.study, point)
        if code == 0 and result is not None:
            self.durations.append(took)
            msg = f"done in {_duration(took)}: {_metric_text(result)}"
        else:
            self.failed.append(point.name)
            why = why or (f"exit code {code}" if code else "no final.json")
            log = log_path(self.study, point)
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:]) if log.is_file() else ""
            msg = f"FAILED ({why}) after {_duration(took)}; log {log}:\n{tail}"
        print(f"[study] {index}/{self.total} {point.name} {msg}{self._eta()}", flush=True)


class _Runner:
    """Runs pending points on worker slots (one per GPU, or one slot), printing progress with an ETA."""

    def __init__(self, study: Study, pending: list[Point]) -> None:
        self.study = study
        self.queue = list(pending)
        self.slots = study.gpus or (None,)
        self.progress = Progress(study, len(pending), len(self.slots))
        self.started = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.procs: set[subprocess.Popen] = set()

    def describe(self) -> str:
        return "one after another" if self.study.gpus is None else f"on GPUs {', '.join(map(str, self.study.gpus))}"

    def _launch(self, point: Point, gpu: int | None) -> int:
        cmd = point_command(self.study, point)
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        with open(log_path(self.study, point), "a") as out:
            out.write(f"$ {shlex.join(cmd)}\n")
            out.flush()
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            with self.lock:
                self.procs.add(proc)
            code = proc.wait()
            with self.lock:
                self.procs.discard(proc)
        return code

    def _worker(self, gpu: int | None) -> None:
        while not self.stop.is_set():
            with self.lock:
                if not self.queue:
                    return
                point = self.queue.pop(0)
                self.started += 1
                index = self.started
            where = "" if gpu is None else f" on GPU {gpu}"
            print(f"[study] {index}/{self.progress.total} start {point.name}{where}", flush=True)
            start = time.monotonic()
            code = self._launch(point, gpu)
            with self.lock:
                self.progress.finish(index, point, code, time.monotonic() - start)

    def run(self) -> list[str]:
        """Run every pending point; return the names of those that failed."""
        threads = [threading.Thread(target=self._worker, args=(g,), daemon=True) for g in self.slots]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.5)
        except KeyboardInterrupt:
            self.stop.set()
            with self.lock:
                for proc in self.procs:
                    proc.terminate()
            raise
        return self.progress.failed


def _rows(study: Study, points: list[Point]) -> tuple[list[str], list[dict[str, Any]]]:
    """``results.csv``'s columns and rows: run, axes, the other options the grid/rules set, seed, results."""
    axes = [a.name for a in study.axes]
    extra = list(dict.fromkeys(k for p in points for k in p.options if k not in axes))
    rows = []
    for point in points:
        result = read_result(study, point)
        if result is None:
            continue
        row: dict[str, Any] = {"run": point.name}
        row.update({a: _fmt(point.labels[a]) for a in axes})
        row.update({k: _fmt(point.base if k == "base_config" else point.options.get(k, "")) for k in extra})
        row["seed"] = point.seed
        row.update({k: result.get(k) for k in RESULT_KEYS})
        rows.append(row)
    return ["run", *axes, *extra, "seed", *RESULT_KEYS], rows


def _stats(values: list[float]) -> tuple[float, float] | None:
    values = [float(v) for v in values if isinstance(v, (int, float))]
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def _groups(study: Study, rows: list[dict[str, Any]]) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    """Rows by grid point (the axis labels), in grid order."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for combo in itertools.product(*(a.labels for a in study.axes)):
        groups[tuple(_fmt(v) for v in combo)] = []
    for row in rows:
        groups[tuple(row[a.name] for a in study.axes)].append(row)
    return {k: v for k, v in groups.items() if v}


def _markdown(study: Study, rows: list[dict[str, Any]]) -> str:
    def cell(stats: tuple[float, float] | None, n: int) -> str:
        if stats is None:
            return "-"
        return f"{stats[0]:.2f}" if n == 1 else f"{stats[0]:.2f} ± {stats[1]:.2f}"

    head = [a.name for a in study.axes] + ["seeds", "trainable params", *(label for _, label in METRICS), "time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, group in _groups(study, rows).items():
        n = len(group)
        params = sorted({r["trainable_params"] for r in group if r["trainable_params"] is not None})
        metrics = [cell(_stats([r[m] for r in group]), n) for m, _ in METRICS]
        times = _stats([r["wall_time_s"] for r in group])
        when = _duration(times[0]) if times else "-"
        count = "/".join(f"{p:,}" for p in params) or "-"
        lines.append("| " + " | ".join([*key, str(n), count, *metrics, when]) + " |")
    return "\n".join(lines) + "\n"


def _numeric(labels: Sequence[str]) -> list[float] | None:
    try:
        return [float(v) for v in labels]
    except ValueError:
        return None


def _plots(study: Study, rows: list[dict[str, Any]]) -> list[Path]:
    """``plot_<axis>.png`` per axis with several values: metric vs that axis, a line per other-axes point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(study, rows)
    files = []
    for i, axis in enumerate(study.axes):
        xs = list(dict.fromkeys(_fmt(v) for v in axis.labels))
        if len(xs) < 2:
            continue
        numeric = _numeric(xs)
        positions = numeric or list(range(len(xs)))
        style = "-o" if numeric else "o"  # categories get no connecting line
        others = list(dict.fromkeys(key[:i] + key[i + 1 :] for key in groups))
        fig, panels = plt.subplots(1, len(METRICS), figsize=(5.5 * len(METRICS), 4), squeeze=False)
        for panel, (metric, label) in zip(panels[0], METRICS):
            for other in others:
                pts = []
                for x, pos in zip(xs, positions):
                    group = groups.get(other[:i] + (x,) + other[i:], [])
                    stats = _stats([r[metric] for r in group])
                    if stats is not None:
                        pts.append((pos, *stats))
                if not pts:
                    continue
                names = [a.name for j, a in enumerate(study.axes) if j != i]
                line = ", ".join(f"{n}={v}" for n, v in zip(names, other)) or None
                px, mean, std = zip(*pts)
                panel.errorbar(px, mean, yerr=std, fmt=style, capsize=3, label=line)
            panel.set_xlabel(axis.name)
            panel.set_ylabel(f"{label} (mean ± std over seeds)")
            panel.set_xticks(positions, xs)
            if not numeric:
                panel.set_xlim(-0.5, len(xs) - 0.5)
            panel.grid(alpha=0.3)
            if len(others) > 1:
                panel.legend(fontsize=8)
        fig.suptitle(f"{study.file.stem}: {axis.name} sweep")
        fig.tight_layout()
        path = study.output / f"plot_{axis.name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        files.append(path)
    return files


def _tensorboard(study: Study, points: list[Point]) -> Path:
    """One hparams entry per finished run in ``<output>/tb_hparams`` (rewritten from scratch)."""
    from torch.utils.tensorboard import SummaryWriter

    folder = study.output / "tb_hparams"
    shutil.rmtree(folder, ignore_errors=True)
    with SummaryWriter(log_dir=str(folder)) as writer:
        for point in points:
            result = read_result(study, point)
            if result is None:
                continue
            hparams: dict[str, Any] = {}
            for key, value in {**point.labels, **point.options, "seed": point.seed}.items():
                hparams[key] = value if isinstance(value, (int, float, str, bool)) else _fmt(value)
            metrics = {f"hparam/{k}": float(result[k]) for k in RESULT_KEYS if isinstance(result.get(k), (int, float))}
            writer.add_hparams(hparams, metrics, run_name=point.name)
    return folder


def report(study: Study) -> dict[str, Any]:
    """Write ``results.csv``, ``results.md``, the plots and the TensorBoard hparams from finished runs."""
    points = study.points()
    columns, rows = _rows(study, points)
    study.output.mkdir(parents=True, exist_ok=True)
    with open(study.output / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    if not rows:
        return {"runs": 0, "csv": study.output / "results.csv"}
    table = _markdown(study, rows)
    (study.output / "results.md").write_text(f"# {study.file.stem}\n\n{table}")
    return {
        "runs": len(rows),
        "csv": study.output / "results.csv",
        "markdown": study.output / "results.md",
        "table": table,
        "plots": _plots(study, rows),
        "tensorboard": _tensorboard(study, points),
    }


def _check_with_engine(study: Study, points: list[Point]) -> None:
    """With the real training script, validate every point's config before running anything."""
    from neat_vision.engine.args import ConfigFileError, load_config

    for point in points:
        try:
            load_config(write_point_config(study, point))
        except ConfigFileError as err:
            raise StudyError(f"run {point.name}: {err}") from err


def _runner(study: Study, pending: list[Point]) -> Any:
    """The study's executor, set up (and, for submitit, checked) before any run starts."""
    if study.executor == "local":
        return _Runner(study, pending)
    try:
        from neat_vision.studies import slurm as cluster
    except ModuleNotFoundError as err:
        raise StudyError(
            f"study executor={study.executor!r} needs submitit ({err}): pip install 'neat-vision[cluster]'"
        ) from None
    return cluster.JobArray(study, pending)


def run_study(study: Study, *, dry_run: bool = False) -> int:
    """Run the study's unfinished points, then report; return 0, or 1 when some run failed."""
    if study.default_command and not Path(study.train_command[1]).is_file():
        raise StudyError(f"no training script at {study.train_command[1]}: pass --train-command")
    points = study.points()
    if study.default_command:
        _check_with_engine(study, points)
    pending = [p for p in points if read_result(study, p) is None]
    runner = _runner(study, pending)
    print(
        f"[study] {study.file.name}: {len(points)} runs, {len(points) - len(pending)} finished, "
        f"{len(pending)} to run {runner.describe()} -> {study.output}",
        flush=True,
    )
    if dry_run:
        for point in pending:
            print(f"  {shlex.join(point_command(study, point))}")
        return 0
    failed = runner.run()
    out = report(study)
    if out["runs"]:
        print(f"[study] {out['runs']} finished runs -> {out['csv']}, {out['markdown']}, {len(out['plots'])} plot(s)")
        print(out["table"], end="")
    if failed:
        print(f"[study] {len(failed)} run(s) failed: {', '.join(failed)} (rerun the study to retry them)")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="neat-study",
        description="Run a grid of training runs and tabulate/plot the results.",
    )
    parser.add_argument("-c", "--config", required=True, help="study YAML (see configs/studies/)")
    parser.add_argument("--output", default=None, help="study folder (overrides the file's output)")
    parser.add_argument("--gpus", type=int, nargs="+", default=None, help="device ids to spread the runs over")
    parser.add_argument("--train-command", default=None, help="training command (default: python train.py)")
    parser.add_argument(
        "--executor", default=None, help=f"where the runs go (overrides the file's executor): {', '.join(EXECUTORS)}"
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs still to do and exit")
    parser.add_argument("--report-only", action="store_true", help="rebuild the tables and plots, run nothing")
    args = parser.parse_args(argv)
    try:
        study = load_study(
            args.config,
            output=args.output,
            gpus=args.gpus,
            train_command=args.train_command,
            executor=args.executor,
        )
        if args.report_only:
            out = report(study)
            print(out.get("table", "no finished runs\n"), end="")
            return 0
        return run_study(study, dry_run=args.dry_run)
    except StudyError as err:
        parser.error(str(err))


if __name__ == "__main__":
    sys.exit(main())
