"""A study's runs as submitit jobs: one Slurm job array, or the same jobs through submitit's local executor.

`neat_vision.studies.runs` builds every point's ``neat-train ... --resume auto`` command and reads its
``final.json``; this module only hands those commands to submitit (``executor: slurm`` -> ``SlurmExecutor``,
``executor: submitit-local`` -> ``LocalExecutor``: the same path, another executor class), waits with
progress lines, and says which runs failed. A job that reaches its time limit or is preempted is requeued
by submitit (``submitit.helpers.Checkpointable``) and its run continues from its last checkpoint.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import cloudpickle
import submitit

from neat_vision.studies.runs import PARAMETERS, CtrlC, Point, Progress, Study, StudyError, log_path, point_command

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

    def describe(self) -> str:
        if self.cluster == "local":
            return "as submitit local jobs (all at once)"
        limit = self.study.slurm.get("array_parallelism")
        return "as a Slurm job array" + (f" (at most {limit} at once)" if limit else "")

    def _outcome(self, job: submitit.Job) -> tuple[int | None, str | None]:
        try:
            return job.result(), None
        except Exception as err:  # the job ended without returning: cancelled, killed, out of requeues
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            return None, f"job {job.job_id}: {first}; submitit log {job.paths.stderr}"

    def run(self) -> list[str]:
        """Submit, wait for every job, return the names of the runs that failed.

        Ctrl-C (SIGINT) cancels the jobs not yet done (submitit-local: waits up to 30 s for them to stop) and
        raises `KeyboardInterrupt`; a Ctrl-C that Python dropped is raised at the next turn (`CtrlC`).
        """
        work = [PointJob(point_command(self.study, p, absolute=True), log_path(self.study, p)) for p in self.pending]
        if not work:
            return []
        left: dict[int, submitit.Job] = {}
        with CtrlC() as ctrl_c:
            try:
                self._wait(work, left, ctrl_c)
            except KeyboardInterrupt:
                self._cancel(left)
                raise
        return self.progress.failed

    def _wait(self, work: list[PointJob], left: dict[int, submitit.Job], ctrl_c: CtrlC) -> None:
        """Submit ``work`` and wait for its jobs; ``left`` holds those not done (what a Ctrl-C cancels)."""
        submitted = time.monotonic()
        jobs = self.executor.submit_array(work)
        left.update(enumerate(jobs))
        ids = jobs[0].job_id if len(jobs) == 1 else f"{jobs[0].job_id} .. {jobs[-1].job_id}"
        print(f"[study] submitted {len(jobs)} job(s): {ids}; submitit files in {self.executor.folder}", flush=True)
        states: dict[int, str] = {}
        running_since: dict[int, float] = {}
        finished = 0
        while left:
            ctrl_c.check()
            for i, job in list(left.items()):
                point = self.pending[i]
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
            if left:
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
