"""Sensitivity studies: a grid of normal training runs, resumable, on this machine or as Slurm jobs.

``neat-study --config studies/depth`` (or ``python -m neat_vision.studies.study``; ``--config`` takes a study
file's path or a shipped study's name, see `neat_vision.engine.options.find_config`). A study file holds:

- ``base_config``: the training config every run starts from, a path relative to the study file; it may
  name the point's options in braces (``../sin/{dataset}.yaml``) and may itself be a grid axis;
- ``overrides``: options fixed for the whole study (keys are the training script's option names);
- ``grid``: ``option: [values]`` axes, crossed; an entry may be a mapping that sets several options at once
  (``{neat_act: sin, lr_neat: 1.0e-3}``; an optional ``label`` key names it);
- ``seeds`` (default ``[0]``), ``output`` (the study folder, relative to the working directory), ``gpus``
  (device ids, one parallel slot each: a slot starts its runs with ``CUDA_VISIBLE_DEVICES`` naming its GPU; an
  id repeated shares that GPU; an id this machine lacks, or any without CUDA, is a CPU slot whose runs see no
  GPU; default: one run after another), ``train_command`` (default: ``python -m neat_vision.engine`` with the
  current Python, i.e. ``neat-train``; no checkout needed);
- ``executor``: ``local`` (default: this process starts the runs), ``slurm`` (one submitit job array on a
  Slurm cluster, see `neat_vision.studies.slurm`) or ``submitit-local`` (the same jobs through submitit's local
  executor, to try a cluster study on this machine); ``slurm``: the jobs' resources (``SLURM_KEYS``).

Each run gets ``<output>/points/<name>.yaml`` (``base:`` plus its options) and trains with
``train_command --config <that> --output <output> --experiment <name> --resume auto`` into
``<output>/<name>/``; a run whose ``final.json`` exists is skipped, an interrupted one resumes. The study
then writes ``results.csv``, ``results.md``, ``plot_<axis>.png`` and TensorBoard hparams in ``tb_hparams/``.

A running study holds the lock of its folder (`neat_vision.run_lock`): a second study on it exits 2 naming
the first. The local runner forwards SIGTERM, SIGUSR1 and SIGUSR2 to its running runs, which checkpoint and
exit 4, starts no further run, and exits 4 itself; rerunning the study resumes them.
Ctrl-C (SIGINT) while a study waits stops its runs (the local runner terminates them and waits up to 60 s;
submitit jobs are cancelled) and ends it with KeyboardInterrupt; a rerun resumes them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import itertools
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neat_vision.atomic import atomic_write, atomic_write_text
from neat_vision.errors import EXIT_PREEMPTED, PREEMPT_SIGNALS, FolderInUse, Preempted, exit_code
from neat_vision.run_lock import folder_lock
from neat_vision.studies.runs import (
    EXECUTORS,
    METRICS,
    RESULT_KEYS,
    SLURM_KEYS,
    SLURM_SET,
    Axis,
    CtrlC,
    Point,
    Progress,
    Study,
    StudyError,
    default_command,
    duration,
    fmt,
    load_study,
    log_path,
    point_command,
    read_result,
    study_from,
    write_point_config,
)

__all__ = [
    "EXECUTORS",
    "SLURM_KEYS",
    "SLURM_SET",
    "Axis",
    "Point",
    "Progress",
    "Study",
    "StudyError",
    "default_command",
    "load_study",
    "log_path",
    "main",
    "point_command",
    "read_result",
    "report",
    "run_study",
    "study_from",
    "write_point_config",
]


@dataclass(frozen=True)
class Slot:
    """Where the local runner starts a run: ``CUDA_VISIBLE_DEVICES`` set to ``visible`` (one GPU), or to
    nothing (``visible=''``: the run sees no GPU and trains on the CPU); ``None``: the environment as it is."""

    index: int
    gpu: int | None
    visible: str | None

    def where(self) -> str:
        """`` on GPU 1``, `` on GPU 0 (CUDA_VISIBLE_DEVICES=2)``, `` in slot 3 (CPU)``, or ``''`` (no slots)."""
        if self.visible is None:
            return ""
        if not self.visible:
            return f" in slot {self.index} (CPU)"
        mapped = "" if self.visible == str(self.gpu) else f" (CUDA_VISIBLE_DEVICES={self.visible})"
        return f" on GPU {self.gpu}{mapped}"


def visible_gpus() -> list[str]:
    """The GPUs this process can use, as ``CUDA_VISIBLE_DEVICES`` entries: device id ``i`` is entry ``i``."""
    import torch

    count = torch.cuda.device_count()
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return [str(i) for i in range(count)]
    return [entry.strip() for entry in mask.split(",")][:count]


def slots(gpus: Sequence[int] | None) -> list[Slot]:
    """The local runner's slots: one per entry of ``gpus`` (a repeated id shares that GPU), each starting its
    runs with ``CUDA_VISIBLE_DEVICES`` naming that GPU; an id this machine lacks (no CUDA here, or fewer GPUs)
    is a CPU slot whose runs see no GPU. Device ids count the GPUs this process sees (``CUDA_VISIBLE_DEVICES``
    of the study, when set, maps them). No ``gpus``: one slot, the environment as it is."""
    if gpus is None:
        return [Slot(0, None, None)]
    visible = visible_gpus()
    return [Slot(i, g, visible[g] if 0 <= g < len(visible) else "") for i, g in enumerate(gpus)]


class _Runner:
    """Runs pending points on worker slots (one per GPU id, or one slot), printing progress with an ETA."""

    def __init__(self, study: Study, pending: list[Point]) -> None:
        self.study = study
        self.queue = list(pending)
        self.slots = slots(study.gpus)
        self.progress = Progress(study, len(pending), len(self.slots))
        self.started = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.procs: set[subprocess.Popen] = set()
        self.signal: int | None = None  # the stop signal received (forwarded to the running children)

    def describe(self) -> str:
        if self.study.gpus is None:
            return "one after another"
        on_gpu = [s.gpu for s in self.slots if s.visible]
        on_cpu = [s.gpu for s in self.slots if not s.visible]
        parts = [f"on GPUs {', '.join(map(str, on_gpu))}"] if on_gpu else []
        if on_cpu:
            count = len(visible_gpus())
            why = f"this process sees GPU id(s) {', '.join(map(str, range(count)))} only" if count else "no CUDA GPU"
            missing = ", ".join(map(str, sorted(set(on_cpu))))
            parts.append(f"in {len(on_cpu)} CPU slot(s) (GPU id(s) {missing}: {why})")
        return " and ".join(parts)

    def _launch(self, point: Point, slot: Slot) -> int | None:
        cmd = point_command(self.study, point)
        env = dict(os.environ)
        if slot.visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot.visible
        with open(log_path(self.study, point), "a") as out:
            out.write(f"$ {shlex.join(cmd)}\n")
            out.flush()
            with self.lock:  # a stop signal forwards to every child started (under this lock) before it
                if self.stop.is_set():
                    return None
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
                self.procs.add(proc)
            code = proc.wait()
            with self.lock:
                self.procs.discard(proc)
        return code

    def _worker(self, slot: Slot) -> None:
        while not self.stop.is_set():
            with self.lock:
                if not self.queue:
                    return
                point = self.queue.pop(0)
                self.started += 1
                index = self.started
            print(f"[study] {index}/{self.progress.total} start {point.name}{slot.where()}", flush=True)
            start = time.monotonic()
            code = self._launch(point, slot)
            if code is None:  # stopped before it started
                return
            if code == EXIT_PREEMPTED and self.signal is not None:
                print(f"[study] {index}/{self.progress.total} {point.name} preempted: checkpointed", flush=True)
                return
            with self.lock:
                self.progress.finish(index, point, code, time.monotonic() - start)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signum
            self.stop.set()

    def run(self) -> list[str]:
        """Run every pending point; return the names of those that failed.

        SIGTERM, SIGUSR1 or SIGUSR2 (in the main thread) start no further run and are forwarded to the running
        ones, which checkpoint and exit 4; ``self.signal`` then names it. Ctrl-C (SIGINT) starts no further run,
        terminates the running ones (SIGTERM: a neat-train run checkpoints and exits 4), waits up to 60 s for
        them to end and raises `KeyboardInterrupt`; a Ctrl-C that Python dropped is raised at the next turn of
        the wait (`CtrlC`).
        """
        threads = [threading.Thread(target=self._worker, args=(s,), daemon=True) for s in self.slots]
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, self._on_signal) for sig in PREEMPT_SIGNALS}
        forwarded = False
        try:
            with CtrlC() as ctrl_c:
                try:
                    for t in threads:
                        t.start()
                    for t in threads:
                        while t.is_alive():
                            ctrl_c.check()
                            t.join(0.5)
                            if self.signal is not None and not forwarded:
                                forwarded = True
                                name = signal.Signals(self.signal).name
                                print(
                                    f"[study] received {name}: forwarded to the running runs; they checkpoint",
                                    flush=True,
                                )
                                with self.lock:
                                    for proc in self.procs:
                                        proc.send_signal(self.signal)
                    ctrl_c.check()
                except KeyboardInterrupt:
                    self._interrupted()
                    raise
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
        return self.progress.failed

    def _interrupted(self) -> None:
        """Ctrl-C: start nothing more, terminate the running runs and wait (60 s at most) for them to end."""
        self.stop.set()
        with self.lock:
            running = list(self.procs)
            for proc in running:
                proc.terminate()
        deadline = time.monotonic() + 60
        for proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        still = sum(proc.poll() is None for proc in running)
        print(
            f"[study] interrupted: stopped {len(running) - still} run(s)"
            + (f", {still} still stopping" if still else ""),
            flush=True,
        )


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
        row.update({a: fmt(point.labels[a]) for a in axes})
        row.update({k: fmt(point.base if k == "base_config" else point.options.get(k, "")) for k in extra})
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
        groups[tuple(fmt(v) for v in combo)] = []
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
        when = duration(times[0]) if times else "-"
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
        xs = list(dict.fromkeys(fmt(v) for v in axis.labels))
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
        atomic_write(path, functools.partial(fig.savefig, dpi=120, format="png"))
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
                hparams[key] = value if isinstance(value, (int, float, str, bool)) else fmt(value)
            metrics = {f"hparam/{k}": float(result[k]) for k in RESULT_KEYS if isinstance(result.get(k), (int, float))}
            writer.add_hparams(hparams, metrics, run_name=point.name)
    return folder


def report(study: Study) -> dict[str, Any]:
    """Write ``results.csv``, ``results.md``, the plots and the TensorBoard hparams from finished runs."""
    points = study.points()
    columns, rows = _rows(study, points)
    study.output.mkdir(parents=True, exist_ok=True)
    table_text = io.StringIO()
    writer = csv.DictWriter(table_text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(study.output / "results.csv", table_text.getvalue())
    if not rows:
        return {"runs": 0, "csv": study.output / "results.csv"}
    table = _markdown(study, rows)
    atomic_write_text(study.output / "results.md", f"# {study.file.stem}\n\n{table}")
    return {
        "runs": len(rows),
        "csv": study.output / "results.csv",
        "markdown": study.output / "results.md",
        "table": table,
        "plots": _plots(study, rows),
        "tensorboard": _tensorboard(study, points),
    }


def _check_with_engine(study: Study, points: list[Point]) -> None:
    """With the default training command (this installation's engine), validate every point's config before
    running anything."""
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
    """Run the study's unfinished points, then report; return 0, or 1 when some run failed.

    Holds the lock of the study folder (`FolderInUse` when another process does); `Preempted` after a stop
    signal (SIGTERM, SIGUSR1, SIGUSR2) was forwarded to the running runs and they ended."""
    with contextlib.nullcontext() if dry_run else folder_lock(study.output, "study"):
        return _run_study(study, dry_run=dry_run)


def _run_study(study: Study, *, dry_run: bool) -> int:
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
    stopped = getattr(runner, "signal", None)
    if stopped is not None:
        note = getattr(runner, "stop_note", "") or (
            "the runs in progress were forwarded it and checkpointed; rerun the study to resume them"
        )
        raise Preempted(f"study {study.output} stopped by {signal.Signals(stopped).name}: {note}")
    if failed:
        print(f"[study] {len(failed)} run(s) failed: {', '.join(failed)} (rerun the study to retry them)")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="neat-study",
        description="Run a grid of training runs and tabulate/plot the results.",
    )
    parser.add_argument(
        "-c", "--config", required=True,
        help="study YAML file, or a shipped study's name (studies/depth, studies/demo_depth, ...)",
    )  # fmt: skip
    parser.add_argument("--output", default=None, help="study folder (overrides the file's output)")
    parser.add_argument("--gpus", type=int, nargs="+", default=None, help="device ids to spread the runs over")
    parser.add_argument(
        "--train-command", default=None, help="training command (default: python -m neat_vision.engine, = neat-train)"
    )
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
    except (FolderInUse, Preempted) as err:
        return exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
