"""A study read into its runs: the study file validated, each point's config, command, log and result, and the
progress lines every executor prints. The local runner (`neat_vision.studies.study`) and the submitit jobs
(`neat_vision.studies.slurm`) both import this module; slurm never imports study (no import cycle).

The study file's keys are described in `neat_vision.studies.study`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from neat_vision.atomic import atomic_write_text
from neat_vision.engine.options import ConfigFileError, find_config

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
# the one table of slurm keys that are submitit parameters: study key -> the submitit parameter names that set
# it, the first being the one the study passes (`neat_vision.studies.slurm`); all are refused in slurm.parameters
SUBMITIT_NAMES: dict[str, tuple[str, ...]] = {
    "timeout_min": ("timeout_min", "slurm_time"),
    "partition": ("slurm_partition",),
    "gpus_per_node": ("gpus_per_node", "slurm_gpus_per_node"),
    "cpus_per_task": ("cpus_per_task", "slurm_cpus_per_task"),
    "mem_gb": ("mem_gb", "slurm_mem"),
    "array_parallelism": ("slurm_array_parallelism",),
}
PARAMETERS = {key: names[0] for key, names in SUBMITIT_NAMES.items()}  # study key -> update_parameters name
SLURM_SET = {name: key for key, names in SUBMITIT_NAMES.items() for name in names}  # submitit name -> study key
# submitit parameters that would start a run more than once
ONE_TASK = ("nodes", "tasks_per_node", "slurm_nodes", "slurm_ntasks_per_node", "slurm_ntasks")


class StudyError(ValueError):
    """A study file holds an unknown key or a value that is not allowed."""


def _fail(key: str, value: Any, allowed: str) -> None:
    raise StudyError(f"study {key}={value!r} is not allowed: {allowed}")


def fmt(value: Any) -> str:
    """A short display form: ``0.001``, ``q+v+mlp``, a config file's stem."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(fmt(v) for v in value)
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
    """A validated study file (its keys: `neat_vision.studies.study`)."""

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
        return self.train_command == default_command()

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
                base = (self.file.parent / template.format(**{k: fmt(v) for k, v in merged.items()})).resolve()
            except (KeyError, IndexError, ValueError) as err:
                raise StudyError(
                    f"study base_config={template!r} names an option this point does not set: {err}"
                ) from None
            stem = "__".join(f"{k}={_slug(fmt(v))}" for k, v in labels.items()) or "run"
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


def default_command() -> tuple[str, ...]:
    """The training command of a study that names none: the engine of this installation with this Python
    (``python -m neat_vision.engine``: ``neat-train``, no checkout needed)."""
    return (sys.executable, "-m", "neat_vision.engine")


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
                label = entry[name] if name in entry else ",".join(f"{k}={fmt(v)}" for k, v in entry.items())
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
    """Read and validate a study file (a path, or a shipped study's name such as ``studies/depth``: see
    `neat_vision.engine.options.find_config`); the keyword arguments override its keys."""
    try:
        file = find_config(path).resolve()
    except ConfigFileError as err:
        raise StudyError(str(err).replace("config file", "study file", 1)) from None
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise StudyError(f"study file {path} cannot be read: {str(err).splitlines()[0]}") from None
    if not isinstance(data, Mapping):
        _fail("file", str(path), "a YAML mapping")
    return study_from(data, file, output=output, gpus=gpus, train_command=train_command, executor=executor)


def study_from(
    data: Mapping[str, Any],
    file: Path,
    *,
    output: str | None = None,
    gpus: Sequence[int] | None = None,
    train_command: str | Sequence[str] | None = None,
    executor: str | None = None,
) -> Study:
    """Validate a study's mapping, read from ``file`` (its relative ``base_config`` paths are relative to
    ``file``'s folder); the keyword arguments override its keys."""
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
        _fail("train_command", command, "a command (string or list) that accepts neat-train's options")
    return Study(
        file=file,
        overrides=overrides,
        axes=axes,
        seeds=tuple(dict.fromkeys(seeds)),
        output=Path(out),
        gpus=None if gpu_ids is None else tuple(gpu_ids),
        train_command=tuple(str(c) for c in command) if command else default_command(),
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
        atomic_write_text(path, text)
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


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def _metric_text(result: Mapping[str, Any]) -> str:
    parts = [f"{label} {result[key]:.2f}" for key, label in METRICS if isinstance(result.get(key), (int, float))]
    return ", ".join(parts)


class CtrlC:
    """Ctrl-C while a study waits for its runs, never lost: SIGINT raises `KeyboardInterrupt` as usual and is also
    remembered, and `check` (called at every turn of the wait loop) raises it again.

    Python runs a signal's handler in the main thread wherever that thread is; when it is inside a finalizer
    (``__del__``, a weakref callback: the cyclic garbage collector runs them at any allocation), the
    `KeyboardInterrupt` is printed as "Exception ignored in ..." and dropped, and the study would wait on for its
    runs as if no Ctrl-C had come. Installed in the main thread only, and only over Python's default SIGINT
    handler (an ignored or custom SIGINT stays as it is); the previous handler is restored on exit.
    """

    def __init__(self) -> None:
        self.pressed = False
        self._previous: Any = None

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.pressed = True
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise `KeyboardInterrupt` if SIGINT came (again, if the first one was dropped)."""
        if self.pressed:
            raise KeyboardInterrupt


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
        return f" | {left} left, ETA {duration(mean * math.ceil(left / self.slots))}"

    def finish(self, index: int, point: Point, code: int | None, took: float, why: str | None = None) -> None:
        """Record a run that ended with exit ``code`` (``None``: it never exited, ``why`` says what happened)."""
        result = read_result(self.study, point)
        if code == 0 and result is not None:
            self.durations.append(took)
            msg = f"done in {duration(took)}: {_metric_text(result)}"
        else:
            self.failed.append(point.name)
            why = why or (f"exit code {code}" if code else "no final.json")
            log = log_path(self.study, point)
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:]) if log.is_file() else ""
            msg = f"FAILED ({why}) after {duration(took)}; log {log}:\n{tail}"
        print(f"[study] {index}/{self.total} {point.name} {msg}{self._eta()}", flush=True)
