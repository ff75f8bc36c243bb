"""A study's runs as submitit jobs: one Slurm job array, or the same jobs through submitit's local executor.

`neat_vision.studies.runs` builds every point's ``neat-train ... --resume auto`` command and reads its
``final.json``; this module only hands those commands to submitit (``executor: slurm`` -> ``SlurmExecutor``,
``executor: submitit-local`` -> ``LocalExecutor``: the same path, another executor class), waits with
progress lines, and says which runs failed. A job that reaches its time limit or is preempted is requeued
by submitit (``submitit.helpers.Checkpointable``) and its run continues from its last checkpoint.

The jobs belong to the scheduler, not to the study process: a stop signal to the study (SIGTERM, SIGUSR1,
SIGUSR2) ends its wait and leaves them running (exit 4); a rerun does not submit a point whose run is still
going (its folder's lock is held) but waits for it. Ctrl-C cancels them.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cloudpickle
import submitit

from neat_vision.errors import PREEMPT_SIGNALS
from neat_vision.run_lock import is_locked
from neat_vision.studies.runs import (
    PARAMETERS,
    CtrlC,
    Point,
    Progress,
    Study,
    StudyError,
    log_path,
    point_command,
    read_result,
)

CLUSTERS = {"slurm": "slurm", "submitit-local": "local"}  # study executor -> submitit's cluster name
POLL_S = {"slurm": 10.0, "local": 1.0}


def _ignore_preemption_signal() -> None:
    # submitit's timeout/preemption signal (USR2) is for the job process, which requeues and then stops
    # the run; the run must not die of it first
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


# Jobs need only this module's job class: pickled by value, a job starts its command without importing
# neat_vision (torch, timm: seconds per job).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class PointJob(submitit.helpers.Checkpointable):
    """One study run as a submitit job: the training command, its output appended to ``log``.

    Requeued with the same command on timeout or preemption; ``--resume auto`` makes it continue.
    """

    def __init__(self, command: Sequence[str], log: str | os.PathLike) -> None:
        self.command = list(command)
        self.log = str(log)

    def __call__(self) -> int:
        with open(self.log, "a") as out:
            out.write(f"$ {shlex.join(self.command)}\n")
            out.flush()
            proc = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_ignore_preemption_signal
            )
            try:
                return proc.wait()
            finally:
                if proc.poll() is None:  # requeued or cancelled: stop the run, its checkpoints stay
                    proc.terminate()
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()


def make_executor(study: Study) -> submitit.AutoExecutor:
    """The submitit executor of ``study.executor`` with the ``slurm`` mapping applied, every name checked."""
    cluster = CLUSTERS[study.executor]
    opts = study.slurm
    folder = Path(opts["folder"]) if "folder" in opts else study.output / "submitit" / "%j"
    extra = {f"{cluster}_max_num_timeout": opts["max_num_timeout"]} if "max_num_timeout" in opts else {}
    try:
        executor = submitit.AutoExecutor(folder, cluster=cluster, **extra)
    except RuntimeError as err:
        raise StudyError(
            f"study executor={study.executor!r} cannot start here: {err} "
            "(executor submitit-local runs the same jobs on this machine)"
        ) from None
    executor.update_parameters(
        name=f"study-{study.file.stem}", **{PARAMETERS[k]: v for k, v in opts.items() if k in PARAMETERS}
    )
    for key, value in (opts.get("parameters") or {}).items():
        try:
            executor.update_parameters(**{key: value})
        except (NameError, AssertionError, ValueError, TypeError) as err:
            raise StudyError(
                f"study slurm.parameters.{key}={value!r} is not allowed: {str(err).splitlines()[0]}"
            ) from None
    return executor


class JobArray:
    """Submits the pending points as one submitit job array and waits for them, printing progress."""

    def __init__(self, study: Study, pending: list[Point]) -> None:
        self.study = study
        self.pending = list(pending)
        self.executor = make_executor(study)
        self.cluster = CLUSTERS[study.executor]
        limit = study.slurm.get("array_parallelism")
        at_once = len(pending) if self.cluster == "local" or limit is None else min(limit, len(pending))
        self.progress = Progress(study, len(pending), at_once)
        # points whose run is still going from an earlier submission (its folder's lock is held): waited for
        self.attached = [p for p in self.pending if is_locked(study.output / p.name)]
        self.signal: int | None = None  # the stop signal received (the jobs were left running)
        self.stop_note = ""

    def describe(self) -> str:
        if self.cluster == "local":
            text = "as submitit local jobs (all at once)"
        else:
            limit = self.study.slurm.get("array_parallelism")
            text = "as a Slurm job array" + (f" (at most {limit} at once)" if limit else "")
        if self.attached:
            names = ", ".join(p.name for p in self.attached)
            text += f"; {len(self.attached)} still running from an earlier submission, waited for: {names}"
        return text

    def _outcome(self, job: submitit.Job) -> tuple[int | None, str | None]:
        try:
            return job.result(), None
        except Exception as err:  # the job ended without returning: cancelled, killed, out of requeues
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            return None, f"job {job.job_id}: {first}; submitit log {job.paths.stderr}"

    def run(self) -> list[str]:
        """Submit, wait for every job, return the names of the runs that failed.

        Ctrl-C (SIGINT) cancels the jobs not yet done (submitit-local: waits up to 30 s for them to stop) and
        raises `KeyboardInterrupt`; a Ctrl-C that Python dropped is raised at the next turn (`CtrlC`). SIGTERM,
        SIGUSR1 or SIGUSR2 (in the main thread) end the wait and leave the jobs running; ``self.signal`` then
        names it and ``self.stop_note`` says which jobs go on.
        """
        to_submit = [p for p in self.pending if p not in self.attached]
        work = [PointJob(point_command(self.study, p, absolute=True), log_path(self.study, p)) for p in to_submit]
        if not work and not self.attached:
            return []
        left: dict[int, submitit.Job] = {}
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, self._on_signal) for sig in PREEMPT_SIGNALS}
        try:
            with CtrlC() as ctrl_c:
                try:
                    self._wait(to_submit, work, left, ctrl_c)
                except KeyboardInterrupt:
                    self._cancel(left)
                    raise
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
        return self.progress.failed

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signum

    def _left_running(self, left: dict[int, submitit.Job], waiting: list[Point]) -> None:
        ids = ", ".join(str(job.job_id) for job in left.values())
        parts = [f"{len(left)} job(s) left running ({ids})"] if left else []
        if waiting:
            parts.append(f"{len(waiting)} earlier run(s) still going")
        self.stop_note = (
            f"{' and '.join(parts) or 'no job was running'}: they checkpoint on their own preemption; rerun the "
            "study to wait for them and collect their results (Ctrl-C in a study cancels its jobs)"
        )
        print(f"[study] received {signal.Signals(self.signal).name}: {self.stop_note}", flush=True)

    def _wait(self, points: list[Point], work: list[PointJob], left: dict[int, submitit.Job], ctrl_c: CtrlC) -> None:
        """Submit ``work`` (one job per point of ``points``), wait for its jobs and the attached runs; ``left``
        holds the jobs not done (what a Ctrl-C cancels)."""
        submitted = time.monotonic()
        jobs = self.executor.submit_array(work) if work else []
        left.update(enumerate(jobs))
        if jobs:
            ids = jobs[0].job_id if len(jobs) == 1 else f"{jobs[0].job_id} .. {jobs[-1].job_id}"
            print(f"[study] submitted {len(jobs)} job(s): {ids}; submitit files in {self.executor.folder}", flush=True)
        waiting = list(self.attached)
        states: dict[int, str] = {}
        running_since: dict[int, float] = {}
        finished = 0
        while left or waiting:
            ctrl_c.check()
            if self.signal is not None:
                self._left_running(left, waiting)
                return
            for point in list(waiting):
                if not is_locked(self.study.output / point.name):
                    waiting.remove(point)
                    finished += 1
                    why = None if read_result(self.study, point) else "the earlier run ended without final.json"
                    self.progress.finish(finished, point, 0 if why is None else None, time.monotonic() - submitted, why)
            for i, job in list(left.items()):
                point = points[i]
                if job.done():
                    del left[i]
                    finished += 1
                    code, why = self._outcome(job)
                    took = time.monotonic() - running_since.get(i, submitted)
                    self.progress.finish(finished, point, code, took, why)
                    continue
                state = job.state
                if state != states.get(i):
                    states[i] = state
                    print(f"[study] {point.name}: {state} (job {job.job_id})", flush=True)
                if state == "RUNNING":
                    running_since.setdefault(i, time.monotonic())
            if left or waiting:
                time.sleep(POLL_S[self.cluster])
        ctrl_c.check()

    def _cancel(self, left: dict[int, submitit.Job]) -> None:
        for job in left.values():
            job.cancel(check=False)
        deadline = time.monotonic() + 30
        while self.cluster == "local" and time.monotonic() < deadline:  # our own children: let them stop
            if all(job.done() for job in left.values()):
                break
            time.sleep(0.2)
        print(f"[study] interrupted: cancelled {len(left)} job(s)", flush=True)
