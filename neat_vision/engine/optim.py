"""AdamW over named parameter groups, and the linear warmup + linear decay schedule per optimizer step."""

from __future__ import annotations

import argparse

from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from neat_vision.adapter import adapter_parameters

__all__ = ["LinearWarmupDecay", "build_optimizer", "build_scheduler", "param_groups"]


def param_groups(model: nn.Module, args: argparse.Namespace) -> list[dict]:
    """Trainable parameters in named groups, each with its LR and weight decay.

    ``neat``: the update tensors (``lr_neat``, ``weight_decay``); ``head``: the classifier (``lr_head``,
    ``weight_decay_head``); ``backbone``: any other trainable weight, e.g. with ``--method full``
    (``lr_backbone``, default ``lr_neat``; ``weight_decay``). Empty groups are left out.
    """
    update_ids = {id(p) for p in adapter_parameters(model)}
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    members: dict[str, list[nn.Parameter]] = {"neat": [], "head": [], "backbone": []}
    for p in model.parameters():
        if p.requires_grad:
            kind = "neat" if id(p) in update_ids else "head" if id(p) in head_ids else "backbone"
            members[kind].append(p)
    wd_head = args.weight_decay if args.weight_decay_head is None else args.weight_decay_head
    lr_backbone = args.lr_neat if args.lr_backbone is None else args.lr_backbone
    settings = {
        "neat": (args.lr_neat, args.weight_decay),
        "head": (args.lr_head, wd_head),
        "backbone": (lr_backbone, args.weight_decay),
    }
    groups = [
        {"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, params in members.items()
        if params
    ]
    if not groups:
        raise ValueError(f"method={args.method!r} left no trainable parameter in {args.model}")
    return groups


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> Optimizer:
    """``torch.optim.AdamW`` over ``param_groups``; group names stay in ``optimizer.param_groups``."""
    # fused on CUDA: one kernel for all tensors; NEAT has many small ones (the step is CPU-bound otherwise)
    fused = all(p.is_cuda for p in model.parameters() if p.requires_grad)
    return AdamW(param_groups(model, args), fused=fused or None)


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


def build_scheduler(optimizer: Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """``torch.optim.lr_scheduler.LambdaLR`` with ``LinearWarmupDecay``; call ``step()`` per optimizer step."""
    return LambdaLR(optimizer, LinearWarmupDecay(warmup_steps, total_steps))
