"""Learning-rate schedules stepped once per optimizer step: the paper's linear one, or any of timm's.

``linear`` (the paper's, and the authors' ``get_linear_schedule_with_warmup``): warmup from 0, then linear decay
to 0, set every optimizer step. The others are timm's (``create_scheduler_v2``: cosine, tanh, step, multistep,
plateau, poly, wsd; ``none`` keeps the LR constant after the warmup): set once per epoch, as timm's ``train.py``
does, or every optimizer step with ``--sched-on-updates``. Both kinds answer the same calls: ``step()`` after every
optimizer step, ``end_epoch(epoch, metric)`` when an epoch ends, ``lrs_at(step)`` (the LRs that optimizer step used),
``state_dict()``. Layer-decay groups carry ``lr_scale``; the LR of such a group is the schedule's LR times it.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

from timm.scheduler import PlateauLRScheduler, create_scheduler_v2
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["LinearWarmupDecay", "PaperSchedule", "TimmSchedule", "WarmupConstant", "build_scheduler"]

TIMM_DEFAULT_WARMUP_LR = 1e-5


class LinearWarmupDecay:
    """LR factor at optimizer step ``t``: ``t / warmup`` during warmup, then linear decay to 0 at ``total``.

    The schedule of ``transformers.get_linear_schedule_with_warmup`` (the authors' scripts), as a picklable
    object so ``LambdaLR.state_dict`` saves it.
    """

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))


class WarmupConstant:
    """LR factor: ``t / warmup`` during warmup, then 1 (``--sched none``)."""

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return step / self.warmup_steps if step < self.warmup_steps else 1.0


class PaperSchedule(LambdaLR):
    """A ``LambdaLR`` per optimizer step (``linear`` or ``none``), with the calls `TimmSchedule` answers."""

    def end_epoch(self, epoch: int, metric: float | None) -> None:
        """Nothing: set per optimizer step."""

    def lrs_at(self, step: int) -> list[float]:
        """The LR of each group at optimizer step ``step`` (0-based)."""
        return [base * factor(step) for base, factor in zip(self.base_lrs, self.lr_lambdas)]


class TimmSchedule:
    """A timm scheduler driven as timm's ``train.py`` drives it, counting optimizer steps itself.

    ``step()`` after each optimizer step (``step_update(num_updates)``: sets the LR with ``--sched-on-updates``);
    ``end_epoch(epoch, metric)`` after epoch ``epoch`` (1-based: ``step(epoch, metric)``, the next epoch's LR). Its
    state (the update count, and plateau's counters, which timm does not save) is in ``state_dict``.
    """

    def __init__(self, scheduler: Any, optimizer: Optimizer, steps_per_epoch: int, on_updates: bool) -> None:
        self.scheduler, self.optimizer = scheduler, optimizer
        self.steps_per_epoch, self.on_updates = steps_per_epoch, on_updates
        self.num_updates = 0

    def step(self) -> None:
        self.num_updates += 1
        self.scheduler.step_update(self.num_updates)

    def end_epoch(self, epoch: int, metric: float | None) -> None:
        if isinstance(self.scheduler, PlateauLRScheduler) and metric is None:
            return  # no validation this epoch: plateau has nothing to compare
        self.scheduler.step(epoch, metric)

    def lrs_at(self, step: int) -> list[float]:
        """The LR of each group at optimizer step ``step`` (0-based; plateau: its current LRs)."""
        if isinstance(self.scheduler, PlateauLRScheduler):
            return [g["lr"] for g in self.optimizer.param_groups]
        t = step if self.on_updates else step // self.steps_per_epoch
        values = self.scheduler._get_lr(t)
        return [v * g.get("lr_scale", 1.0) for v, g in zip(values, self.optimizer.param_groups)]

    def state_dict(self) -> dict[str, Any]:
        state = {"num_updates": self.num_updates, "timm": self.scheduler.state_dict()}
        if isinstance(self.scheduler, PlateauLRScheduler):
            state["plateau"] = self.scheduler.lr_scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = state["num_updates"]
        self.scheduler.load_state_dict(state["timm"])
        if "plateau" in state:
            self.scheduler.lr_scheduler.load_state_dict(state["plateau"])


def build_scheduler(
    optimizer: Optimizer,
    warmup_steps: int,
    total_steps: int,
    args: argparse.Namespace | None = None,
    steps_per_epoch: int = 1,
) -> PaperSchedule | TimmSchedule:
    """The schedule ``args.sched`` names (``linear`` without ``args``), stepped per optimizer step."""
    sched = "linear" if args is None else args.sched
    if sched == "linear":
        return _paper(optimizer, LinearWarmupDecay(warmup_steps, total_steps))
    if sched == "none":
        return _paper(optimizer, WarmupConstant(warmup_steps))
    on_updates = bool(args.sched_on_updates)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "PlateauLRScheduler is deprecated", FutureWarning)  # we save its state
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=sched,
            num_epochs=args.epochs,
            decay_epochs=args.decay_epochs,
            decay_milestones=list(args.decay_milestones),
            patience_epochs=args.patience_epochs,
            decay_rate=args.decay_rate,
            min_lr=args.min_lr,
            warmup_lr=TIMM_DEFAULT_WARMUP_LR if args.warmup_lr is None else args.warmup_lr,
            warmup_epochs=args.warmup_epochs,
            plateau_mode="max",
            step_on_epochs=not on_updates,
            updates_per_epoch=steps_per_epoch,
        )
    return TimmSchedule(scheduler, optimizer, steps_per_epoch, on_updates)


def _paper(optimizer: Optimizer, factor: Any) -> PaperSchedule:
    for group in optimizer.param_groups:  # LambdaLR scales the groups' own LRs: apply the layer scale to them
        if "lr_scale" in group and "initial_lr" not in group:
            group["lr"] = group["lr"] * group["lr_scale"]
    return PaperSchedule(optimizer, factor)
