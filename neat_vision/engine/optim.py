"""The optimizer: timm's ``create_optimizer_v2`` over named parameter groups (with timm's layer decay).

The groups keep each kind of trainable tensor at its own learning rate and weight decay (the adapter's update
tensors, the classifier, any other trained backbone tensor); ``--layer-decay`` splits each group further by
timm's layer scale (``param_groups_layer_decay``), the scale kept as ``lr_scale`` for the schedule.
"""

from __future__ import annotations

import argparse
from typing import Any

from timm.optim import create_optimizer_v2, param_groups_layer_decay
from torch import nn
from torch.optim import Optimizer

from neat_vision.adapter import adapter_parameters
from neat_vision.engine.schedule import LinearWarmupDecay, build_scheduler

__all__ = ["LinearWarmupDecay", "build_optimizer", "build_scheduler", "layer_scales", "param_groups"]


def layer_scales(model: nn.Module, layer_decay: float) -> dict[int, float]:
    """``id(parameter) -> LR scale`` of every trainable tensor, as timm's ``param_groups_layer_decay`` assigns."""
    groups = param_groups_layer_decay(model, layer_decay=layer_decay)
    return {id(p): group["lr_scale"] for group in groups for p in group["params"]}


def param_groups(model: nn.Module, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Trainable parameters in named groups, each with its LR and weight decay.

    ``neat``: the update tensors (``lr_neat``, ``weight_decay``); ``head``: the classifier (``lr_head``,
    ``weight_decay_head``); ``backbone``: any other trainable weight, e.g. with ``--method full``
    (``lr_backbone``, default ``lr_neat``; ``weight_decay``). Empty groups are left out. With ``layer_decay``
    each group is split by timm's layer scale (names ``<group>.<scale index>``, the scale in ``lr_scale``).
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
    scales = layer_scales(model, args.layer_decay) if getattr(args, "layer_decay", None) is not None else None
    groups = []
    for name, params in members.items():
        if not params:
            continue
        lr, wd = settings[name]
        if scales is None:
            groups.append({"name": name, "params": params, "lr": lr, "weight_decay": wd})
            continue
        by_scale: dict[float, list[nn.Parameter]] = {}
        for p in params:
            by_scale.setdefault(scales.get(id(p), 1.0), []).append(p)
        for i, scale in enumerate(sorted(by_scale)):
            group = {"name": f"{name}.{i}", "params": by_scale[scale], "lr": lr, "weight_decay": wd}
            groups.append(group | {"lr_scale": scale})
    if not groups:
        raise ValueError(f"method={args.method!r} left no trainable parameter in {args.model}")
    return groups


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> Optimizer:
    """timm's ``create_optimizer_v2(param_groups, opt, momentum, eps, betas)``; group names stay in
    ``optimizer.param_groups``. AdamW on CUDA runs fused (one kernel for NEAT's many small tensors)."""
    opt = getattr(args, "opt", "adamw").lower()
    kwargs: dict[str, Any] = {}
    if getattr(args, "opt_eps", None) is not None:
        kwargs["eps"] = args.opt_eps
    if getattr(args, "opt_betas", None) is not None:
        kwargs["betas"] = tuple(args.opt_betas)
    if opt == "adamw" and all(p.is_cuda for p in model.parameters() if p.requires_grad):
        kwargs["fused"] = True
    groups = param_groups(model, args)
    return create_optimizer_v2(
        groups, opt=opt, lr=args.lr_neat, weight_decay=args.weight_decay, momentum=getattr(args, "momentum", 0.9),
        **kwargs,
    )  # fmt: skip
