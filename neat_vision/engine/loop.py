"""The one training loop of ``train.py`` and the NLP runners: `TrainLoop` over a `Task`, written out, no callbacks.

A task (`engine.vision.VisionTask`, `nlp.loop.TextTask`) gives the model, the batches, the loss, the evaluation
and the checkpoint contents; the loop owns the rest. A task yields an epoch's steps from any position, so a run
resumed mid-epoch skips the done batches unloaded. With ``sum_gradients`` every micro-batch runs under DDP's
``no_sync``, one all-reduce sums the gradients (FSDP2 reduce-scatters sums itself) and they are divided by the
step's loss terms; without it DDP averages on the last micro-batch. One host sync per step sums the loss, its
term count and the non-finite flags of the gradients (before the step) and weights (after the previous one)
over ranks, so every rank stops alike: `Diverged` before a bad step is applied or bad weights are used, naming
the last checkpoint after reading it back. Rank 0 writes the checkpoints atomically (with every rank's RNG state
and the `Progress`), ``summary.csv``, TensorBoard and progress lines with an ETA.

Preemption: while `TrainLoop.run` trains (in the main thread), SIGTERM, SIGUSR1 and SIGUSR2 only set a flag
(repeats are ignored, the previous handlers come back afterwards). The flag rides in the step's host sync, so
every rank stops after the same optimizer step (the one in progress, or the next when the signal came after
that step's sync): the checkpoint is written as always (atomically) and `Preempted` raised (exit status 4).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from neat_vision.atomic import atomic_write
from neat_vision.engine.checkpoint import CHECKPOINT_TENSORS, rng_state, save_checkpoint, set_rng_state
from neat_vision.engine.distributed import DistEnv, all_gather_object, all_reduce_sum
from neat_vision.engine.progress import Progress as ProgressBar
from neat_vision.errors import PREEMPT_SIGNALS, Diverged, Preempted, ResumeError
from neat_vision.finite import checkpoint_nonfinite, nonfinite_flag, nonfinite_names

__all__ = [
    "PREEMPT_SIGNALS",
    "Diverged",
    "EpochEnd",
    "LoopSettings",
    "Preempted",
    "Progress",
    "Progression",
    "ResumeError",
    "Task",
    "TrainLoop",
]

logger = logging.getLogger("neat_vision.engine")


@dataclass
class Progress:
    """Where a run is (saved in every checkpoint): the next step, this epoch's loss so far, the finished epochs."""

    epoch: int = 0  # in progress, 0-based
    step_in_epoch: int = 0  # optimizer steps of that epoch done
    global_step: int = 0
    epoch_loss: float = 0.0  # loss sum of the epoch's steps so far
    epoch_terms: int = 0  # and its number of loss terms (samples, tokens)
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch (summary.csv)
    best: dict[str, Any] | None = None  # the history row of the best epoch (``select_metric``)
    elapsed_s: float = 0.0  # wall time of the earlier sessions


Progression = Progress  # the name train.py's loop used


@dataclass
class LoopSettings:
    """How the loop steps, checks and records. ``max_grad_norm=0`` and ``checkpoint_steps=0`` turn those off."""

    epochs: int
    checkpoint: Path  # the resume checkpoint, rewritten atomically
    summary: Path  # summary.csv
    tensorboard: Path | None = None  # event folder (None: no TensorBoard)
    best_checkpoint: Path | None = None  # a copy of the checkpoint of the best epoch
    checkpoint_tensors: tuple[str, ...] = CHECKPOINT_TENSORS  # the checkpoint parts that must be finite
    max_grad_norm: float = 0.0
    checkpoint_steps: int = 0
    stop_after_steps: int | None = None
    log_interval: int = 1  # steps between TensorBoard points
    progress_interval: int | None = None  # steps between progress lines (default: log_interval)
    select_metric: str | None = None  # the history column that picks the best epoch (rows without it never do)
    maximize: bool = True
    sum_gradients: bool = False
    unit: str = "samples"  # what a loss term is, for the rate in progress lines
    checkpoint_option: str = "checkpoint_steps"  # named when a run diverges before its first checkpoint
    advice: str = "Lower the learning rate or clip the gradients"  # what a diverged run should try
    resume_option: str = "--resume"  # how a preempted run continues


@dataclass
class EpochEnd:
    """What the loop knows when an epoch ends: its number (1-based), mean training loss, rate and wall time."""

    epoch: int
    step: int
    train_loss: float
    rate: float  # loss terms per second in this session's part of the epoch
    elapsed: Callable[[], float]  # the run's wall time so far, all sessions


class Task(Protocol):
    """What a runner gives the loop. ``net`` forwards (a DDP/compiled wrapper of ``model``, or ``model``)."""

    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None

    def steps_per_epoch(self) -> int:
        """Optimizer steps in an epoch."""

    def epoch_steps(self, epoch: int, start: int) -> Iterator[tuple[int, Iterable[Any]]]:
        """From step ``start`` of ``epoch``: per step, the number of this rank's micro-batches and the micro-batches."""

    def backward(self, micro: Any, n_micro: int) -> tuple[Tensor, int]:
        """Forward and backward one micro-batch; its detached loss sum and number of loss terms."""

    def end_epoch(self, end: EpochEnd) -> tuple[dict[str, Any], dict[str, float]]:
        """Evaluate; the epoch's history row and its TensorBoard scalars (tag -> value; read on rank 0)."""

    def on_best(self, row: dict[str, Any]) -> None:
        """The epoch of ``row`` is the best so far (called on every rank, before its checkpoint)."""

    def checkpoint(self, progress: Progress) -> dict[str, Any]:
        """The checkpoint without ``rng`` (called on every rank; what rank 0 returns is written)."""

    def restore(self) -> tuple[Path, dict[str, Any], Progress]:
        """Load the checkpoint to resume into the model, optimizer and schedule: its path, contents and progress."""

    # optional: ``after_step(step)`` after each optimizer step (1-based; an EMA update), ``after_save(progress)``
    # on rank 0 after each checkpoint is written (a checkpoint history)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _is_ddp(net: nn.Module) -> bool:
    """``net`` is DDP (possibly under ``torch.compile``): its gradient sync can be deferred with ``no_sync``."""
    return isinstance(getattr(net, "_orig_mod", net), DistributedDataParallel)


def write_summary(path: Path, history: list[dict[str, Any]]) -> None:
    """``summary.csv``: one row per epoch, the columns of every row in order of appearance (atomic)."""
    columns = list(dict.fromkeys(key for row in history for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text.getvalue()))


class TrainLoop:
    """Trains ``task`` for ``settings.epochs`` epochs; `resume` first to continue from its checkpoint.

    ``run()`` returns ``True`` when stopped by ``stop_after_steps``; ``close()`` closes TensorBoard (the task
    may write its last scalars to ``writer`` before). ``started`` is when the session began (``perf_counter``).
    """

    def __init__(self, task: Task, settings: LoopSettings, env: DistEnv, started: float | None = None) -> None:
        self.task, self.settings, self.env = task, settings, env
        self.progress = Progress()
        self.started = time.perf_counter() if started is None else started
        self.resumed = False
        self.saved_step: int | None = None
        self.writer: SummaryWriter | None = None
        self.trainable = [p for group in task.optimizer.param_groups for p in group["params"]]
        self.fsdp = any(isinstance(p, DTensor) for p in self.trainable)
        self.rate = 0.0
        # 1.0 when the last optimizer step left a non-finite trainable tensor; read at the next host sync
        self._weights_flag: Tensor | None = None
        self.signal: int | None = None  # the first stop signal this process received while training

    def elapsed(self) -> float:
        """Wall time of the run so far, over all its sessions."""
        return self.progress.elapsed_s + time.perf_counter() - self.started

    # ------------------------------------------------------------------ checkpoints

    def resume(self) -> None:
        """Restore the task's checkpoint, this rank's RNG state and the progress."""
        path, state, progress = self.task.restore()
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rngs) != self.env.world_size:
            raise ResumeError(
                f"{path} was written by {len(rngs)} process(es), this run has {self.env.world_size}: resume with "
                "the same number of processes (the data shards and each rank's random state depend on it)"
            )
        set_rng_state(rngs[self.env.rank])
        self.progress = progress
        self.saved_step = progress.global_step
        self.resumed = True
        p = progress
        logger.info(
            "resumed from %s: epoch %d, step %d (%d of the epoch)", path, p.epoch + 1, p.global_step, p.step_in_epoch
        )

    def save(self, best: bool = False) -> None:
        """Checkpoint (and copy to ``best_checkpoint`` when ``best``) after checking the weights are finite."""
        self._check_weights()
        rngs = all_gather_object(rng_state(), self.env)
        state = self.task.checkpoint(replace(self.progress, elapsed_s=self.elapsed()))  # a collective under FSDP
        self.saved_step = self.progress.global_step
        if not self.env.is_main:
            return
        state["rng"] = rngs  # one per rank
        s = self.settings
        save_checkpoint(state, s.checkpoint, copy_to=s.best_checkpoint if best else None)
        after_save = getattr(self.task, "after_save", None)
        if after_save is not None:
            after_save(self.progress)

    def _last_checkpoint_note(self) -> str:
        """What is on disk to fall back on, verified: the checkpoint is read back and its tensors checked."""
        path = self.settings.checkpoint
        if self.saved_step is None:
            return f"no checkpoint was written yet (see {self.settings.checkpoint_option})"
        if not self.env.is_main:
            return f"rank 0 reports on {path}"
        bad = checkpoint_nonfinite(path, self.settings.checkpoint_tensors)
        if bad is None:
            return f"the last checkpoint {path} cannot be read back: do not resume from it"
        if bad:
            return f"the last checkpoint {path} holds non-finite tensors ({', '.join(bad[:3])}): do not resume from it"
        return f"the last good checkpoint {path} (step {self.saved_step}) is intact and verified finite"

    # ------------------------------------------------------------------ non-finite checks

    def _weights_error(self) -> Diverged:
        p = self.progress
        named = ((n, _local(q)) for n, q in self.task.model.named_parameters() if q.requires_grad)
        names = nonfinite_names(named)
        which = f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""
        return Diverged(
            f"trainable weights{which} became non-finite in optimizer step {p.global_step} (epoch {p.epoch + 1}); "
            f"stopped before using or saving them; {self._last_checkpoint_note()}. {self.settings.advice}"
        )

    def _check_weights(self) -> None:
        """Stop (on every rank) when the last optimizer step made a trainable tensor non-finite."""
        flag, self._weights_flag = self._weights_flag, None
        if flag is not None and all_reduce_sum(flag.clone(), self.env).item():
            raise self._weights_error()

    # ------------------------------------------------------------------ the loop

    @contextlib.contextmanager
    def _stop_signals(self) -> Iterator[None]:
        """For the block, `PREEMPT_SIGNALS` set ``self.signal`` (the first one; repeats are ignored)."""
        if threading.current_thread() is not threading.main_thread():
            yield  # Python delivers signals to the main thread only
            return

        def handler(signum: int, frame: Any) -> None:
            if self.signal is None:
                self.signal = signum
                logger.warning(
                    "received %s: stopping after this optimizer step and its checkpoint", signal.Signals(signum).name
                )

        previous = {sig: signal.signal(sig, handler) for sig in PREEMPT_SIGNALS}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _preempt(self) -> Preempted:
        """Checkpoint (every rank takes part) and say so."""
        self.save()
        p = self.progress
        why = signal.Signals(self.signal).name if self.signal is not None else "a signal to another rank"
        logger.info("preempted (%s): checkpoint of step %d written", why, p.global_step)
        return Preempted(
            f"preempted by {why} after optimizer step {p.global_step} (epoch {p.epoch + 1}, step {p.step_in_epoch} of "
            f"it): checkpoint {self.settings.checkpoint} written; continue with {self.settings.resume_option}"
        )

    def run(self) -> bool:
        """Train the remaining epochs; ``True`` when stopped by ``stop_after_steps``; `Preempted` on a stop signal."""
        with self._stop_signals():
            stopped = self._run()
        if self.signal is not None:  # it came after the last optimizer step: the run ends as it would have
            logger.warning("%s came after the last optimizer step: finishing the run", signal.Signals(self.signal).name)
        return stopped

    def _run(self) -> bool:
        s, env = self.settings, self.env
        if env.is_main:
            if self.progress.history:  # the rows of the checkpointed epochs (a kill may have left more)
                write_summary(s.summary, self.progress.history)
            else:
                s.summary.unlink(missing_ok=True)
            if s.tensorboard is not None and self.writer is None:
                purge = self.progress.global_step if self.resumed else None
                self.writer = SummaryWriter(str(s.tensorboard), purge_step=purge)
        while self.progress.epoch < s.epochs:
            if self._train_epoch():
                return True
            self._end_epoch()
        return False

    def close(self) -> None:
        """Close TensorBoard."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _accumulate(self, n_micro: int, micro_batches: Iterable[Any]) -> Tensor:
        """Forward and backward the step's micro-batches; this rank's ``[loss sum, loss terms]`` (float64)."""
        net, env = self.task.net, self.env
        sums = torch.zeros(2, dtype=torch.float64, device=env.device)
        for i, micro in enumerate(micro_batches):
            defer = _is_ddp(net) and (self.settings.sum_gradients or i < n_micro - 1)
            with net.no_sync() if defer else contextlib.nullcontext():
                loss, terms = self.task.backward(micro, n_micro)
            sums[0] += loss.detach().double()
            sums[1] += terms
        return sums

    def _sum_gradients(self, stats: Tensor) -> Tensor:
        """Sum the gradients and ``stats`` over DDP ranks; a tensor without a gradient on every rank keeps none."""
        trainable, device = self.trainable, self.env.device
        present = torch.tensor([q.grad is not None for q in trainable], dtype=torch.float64, device=device)
        stats = all_reduce_sum(torch.cat([stats, present]), self.env)
        grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in trainable]
        flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]), self.env) if grads else None
        offset = 0
        for q, g, seen in zip(trainable, grads, stats[len(stats) - len(trainable) :].tolist()):
            q.grad = flat[offset : offset + g.numel()].view_as(q).clone() if seen else None
            offset += g.numel()
        return stats[: len(stats) - len(trainable)]

    def _reduce(self, sums: Tensor) -> list[float]:
        """Sync the gradients; ``[loss sum, loss terms, bad weights, stop signals, bad gradients]`` over all ranks
        (one host sync)."""
        task, env = self.task, self.env
        pending = self._weights_flag if self._weights_flag is not None else torch.zeros((), device=env.device)
        self._weights_flag = None
        stop = torch.full((1,), float(self.signal is not None), dtype=torch.float64, device=env.device)
        stats = torch.cat([sums, pending.double().view(1), stop])
        if task.scaler is not None:
            task.scaler.unscale_(task.optimizer)  # inf gradients are the scaler's business: it skips that step
        summed = self.settings.sum_gradients and env.distributed and not self.fsdp
        if summed:
            stats = self._sum_gradients(stats)  # the gradients are then the same on every rank, and so is their flag
        flag = torch.zeros((), dtype=torch.float64, device=env.device)
        if task.scaler is None:
            flag = nonfinite_flag((None if q.grad is None else _local(q.grad) for q in self.trainable), env.device)
        stats = torch.cat([stats, flag.view(1)])
        return (stats if summed else all_reduce_sum(stats, env)).tolist()

    def _optimizer_step(self, terms: int) -> None:
        """(Divide summed gradients by the loss terms,) clip, step, zero the gradients, advance the schedule."""
        task, s = self.task, self.settings
        if s.sum_gradients:
            for q in self.trainable:
                if q.grad is not None:
                    q.grad.div_(max(terms, 1))
        if s.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, s.max_grad_norm)
        if task.scaler is not None:
            task.scaler.step(task.optimizer)
            task.scaler.update()
        else:
            task.optimizer.step()
        task.optimizer.zero_grad(set_to_none=True)
        task.scheduler.step()

    def _train_epoch(self) -> bool:
        """Train from ``progress`` to the end of its epoch; ``True`` when stopped by ``stop_after_steps``."""
        task, s, env, p = self.task, self.settings, self.env, self.progress
        total = task.steps_per_epoch()
        interval = s.progress_interval or s.log_interval
        bar = ProgressBar(f"epoch {p.epoch + 1}/{s.epochs}", total, p.step_in_epoch, interval, env.is_main)
        task.net.train()
        logged = [0.0, 0]  # loss sum, terms since the last TensorBoard point
        start, seen = time.perf_counter(), 0
        try:
            for n_micro, micro_batches in task.epoch_steps(p.epoch, p.step_in_epoch):
                sums = self._accumulate(n_micro, micro_batches)
                loss_sum, terms_sum, bad_weights, stop, bad_grads = self._reduce(sums)
                terms = int(terms_sum)
                mean_loss = loss_sum / max(terms, 1)
                if bad_weights:
                    raise self._weights_error()
                if not math.isfinite(loss_sum) or bad_grads:
                    task.optimizer.zero_grad(set_to_none=True)
                    what = f"training loss ({mean_loss})" if not math.isfinite(loss_sum) else "gradients"
                    raise Diverged(
                        f"non-finite {what} at epoch {p.epoch + 1}, optimizer step {p.global_step + 1}: stopped "
                        f"before applying it; {self._last_checkpoint_note()}. {s.advice}"
                    )
                lrs = {str(g.get("name", i)): g["lr"] for i, g in enumerate(task.optimizer.param_groups)}
                self._optimizer_step(terms)
                self._weights_flag = nonfinite_flag((_local(q) for q in self.trainable), env.device)
                p.global_step += 1
                p.step_in_epoch += 1
                after_step = getattr(task, "after_step", None)
                if after_step is not None:
                    after_step(p.global_step)
                p.epoch_loss += loss_sum
                p.epoch_terms += terms
                seen += terms
                logged = [logged[0] + loss_sum, logged[1] + terms]
                rate = seen / max(time.perf_counter() - start, 1e-9)
                info = {"loss": f"{mean_loss:.4f}", "lr": f"{max(lrs.values()):.2e}", f"{s.unit}/s": f"{rate:.0f}"}
                bar.update(p.step_in_epoch, info)
                if self.writer is not None and p.global_step % s.log_interval == 0:
                    self.writer.add_scalar("train/loss", logged[0] / max(logged[1], 1), p.global_step)
                    for name, lr in lrs.items():
                        self.writer.add_scalar(f"lr/{name}", lr, p.global_step)
                    logged = [0.0, 0]
                if stop:
                    raise self._preempt()
                if s.stop_after_steps is not None and p.global_step >= s.stop_after_steps:
                    self.save()
                    logger.info("stopped after %d steps (stop_after_steps); continue with --resume", p.global_step)
                    return True
                if s.checkpoint_steps and p.global_step % s.checkpoint_steps == 0 and p.step_in_epoch < total:
                    self.save()
        finally:
            bar.close()
        self.rate = seen / max(time.perf_counter() - start, 1e-9)
        return False

    def _end_epoch(self) -> None:
        """Evaluate, record the epoch (history, summary.csv, TensorBoard), pick the best, checkpoint."""
        self._check_weights()  # before a non-finite model is evaluated or saved as the best
        s, p = self.settings, self.progress
        end = EpochEnd(p.epoch + 1, p.global_step, p.epoch_loss / max(p.epoch_terms, 1), self.rate, self.elapsed)
        row, scalars = self.task.end_epoch(end)
        p.history.append(row)
        improved = False
        metric = s.select_metric
        if metric is not None and row.get(metric) is not None:
            best = None if p.best is None else p.best[metric]
            improved = best is None or (row[metric] > best if s.maximize else row[metric] < best)
            if improved:
                p.best = row
                self.task.on_best(row)
        p.epoch, p.step_in_epoch, p.epoch_loss, p.epoch_terms = p.epoch + 1, 0, 0.0, 0
        if self.env.is_main:
            write_summary(s.summary, p.history)
            if self.writer is not None:
                for tag, value in scalars.items():
                    self.writer.add_scalar(tag, value, p.global_step)
        self.save(best=improved)
