"""The run's plan (sizes, steps, parameter groups) and ``--dry-run``: everything built, nothing trained."""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

from neat_vision.adapter import trainable_summary
from neat_vision.data import SyntheticImages, build_loader, build_transforms, dataset_info
from neat_vision.engine.data import augmentation_options, data_config
from neat_vision.engine.model import build_adapter, build_model, check_layers_reached
from neat_vision.engine.optim import param_groups

__all__ = ["Plan", "dry_run", "log_plan", "make_plan"]

logger = logging.getLogger("neat_vision.engine")


@dataclass
class Plan:
    """Sizes that follow from the data and the options."""

    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def make_plan(args: argparse.Namespace, train_batches: int) -> Plan:
    """The plan for ``train_batches`` full batches per epoch and process (before ``limit_train_batches``)."""
    batches = min(train_batches, args.limit_train_batches or train_batches)
    if batches < 1:
        raise ValueError(f"the train split gives no full batch of batch_size={args.batch_size} per process")
    steps = math.ceil(batches / args.grad_accum)
    return Plan(batches, steps, steps * args.epochs, round(args.warmup_epochs * steps))


def log_plan(
    args: argparse.Namespace,
    summary: dict[str, Any],
    groups: list[dict[str, Any]],
    sizes: dict[str, int],
    plan: Plan | None,
    world_size: int,
) -> None:
    """Log the model, parameter counts, data sizes, batch and optimizer plan (``?`` where unknown)."""
    unknown = "?"
    logger.info(
        "model %s | method %s | params: trainable %s (%s %s, head %s, other %s) of %s (%.3f%%), %d adapted layers",
        args.model,
        args.method,
        f"{summary['trainable']:,}",
        "updates" if args.method in ("linear", "full") else args.method,
        f"{summary['neat']:,}",
        f"{summary['head']:,}",
        f"{summary['other']:,}",
        f"{summary['total']:,}",
        summary["trainable_percent"],
        summary["adapted_layers"],
    )
    logger.info(
        "data %s | train/val/test %s | batch %d x accum %d x %d process(es) = %d",
        args.dataset,
        "/".join(unknown if sizes.get(s) is None else f"{sizes[s]:,}" for s in ("train", "val", "test")),
        args.batch_size,
        args.grad_accum,
        world_size,
        args.batch_size * args.grad_accum * world_size,
    )
    groups_text = ", ".join(
        f"{g['name']} lr {g.get('initial_lr', g['lr']):g}{_scale_text(g)} wd {g['weight_decay']:g}" for g in groups
    )
    opt, sched = getattr(args, "opt", "adamw"), getattr(args, "sched", "linear")
    if plan is None:
        logger.info("optimizer %s: %s | steps per epoch %s", opt, groups_text, unknown)
    else:
        logger.info(
            "optimizer %s: %s | %d epochs x %d steps = %d steps (warmup %d), %s schedule",
            opt,
            groups_text,
            args.epochs,
            plan.steps_per_epoch,
            plan.total_steps,
            plan.warmup_steps,
            sched,
        )


def _scale_text(group: dict[str, Any]) -> str:
    return f" x {group['lr_scale']:.3g}" if "lr_scale" in group else ""


def dry_run(args: argparse.Namespace) -> dict[str, Any]:
    """Build everything without data or weights, check it, log the plan and return it.

    The model is built on the meta device (no weights, no memory), every adapted layer is checked to be
    reached, sizes come from ``dataset_info`` and one synthetic image goes through each transform.
    """
    if args.dataset == "fractal":  # rendered on the fly (engine/data.py): sizes are per epoch
        evaluation = args.fractal_eval_batches * args.batch_size
        sizes = {"train": args.fractal_steps * args.batch_size, "val": evaluation, "test": evaluation}
        info = {"num_classes": args.fractal_classes, "split_sizes": sizes}
    elif args.dataset is not None:
        info = dataset_info(args.dataset)
    else:
        info = {"num_classes": None, "split_sizes": None}
    num_classes = args.num_classes or info["num_classes"]
    if num_classes is None:
        num_classes = 10
        logger.info("num_classes is known only from the data: 10 assumed (set --num-classes)")
    model = build_adapter(build_model(args, num_classes, meta=True), args)
    config = data_config(args, model)
    check_layers_reached(model, config["input_size"], "meta")
    summary = trainable_summary(model)
    groups = param_groups(model, args)
    sizes = info["split_sizes"] or {}
    plan = None
    if sizes:
        plan = make_plan(args, sizes["train"] // args.batch_size)
    log_plan(args, summary, groups, sizes, plan, 1)
    height = config["input_size"][1]
    shapes = {}
    for split in ("train", "val"):
        loader = build_loader(
            SyntheticImages(args.batch_size, num_classes, size=2 * height, seed=args.seed),
            build_transforms(config, split == "train", **augmentation_options(args)),
            args.batch_size,
            train=split == "train",
            num_workers=0,
            resumable=True,
        )
        loader.sampler.set_epoch(0)
        image, _ = loader.dataset[next(iter(loader.sampler))]  # one sample through the pipeline
        shapes[split] = [args.batch_size, *image.shape]
    logger.info("data config %s | batches %s", {k: config[k] for k in sorted(config)}, shapes)
    return {
        "num_classes": num_classes,
        "params": {k: summary[k] for k in ("trainable", "neat", "head", "other", "total")},
        "split_sizes": sizes or None,
        "plan": None if plan is None else asdict(plan),
        "data_config": config,
        "batch_shapes": shapes,
        "lr": {g["name"]: g["lr"] for g in groups},
    }
