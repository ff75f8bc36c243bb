"""Training loss, mixup/cutmix and the training randomness of one micro-batch, timm's parts where they exist.

The loss is chosen as timm's ``train.py`` chooses it: ``SoftTargetCrossEntropy`` under mixup/cutmix (``Mixup``
smooths the targets itself), ``LabelSmoothingCrossEntropy`` with ``--smoothing``, ``BinaryCrossEntropy`` with
``--bce-loss``, else cross-entropy. Evaluation always uses plain cross-entropy.

Every random draw of a training forward (mixup/cutmix, dropout, drop path, LoRA dropout) comes from generators
seeded by ``(seed, epoch, batch)``, where ``batch`` is the micro-batch's index in the epoch across all processes
(`batch_seed`). A run resumed anywhere therefore draws what the uninterrupted run drew, and one process with
``grad_accum = k * n`` matches ``n`` processes with ``grad_accum = k`` sample for sample (the training sampler
hands each process whole batches of one epoch order). The process's own generator states are left as they were.
"""

from __future__ import annotations

import argparse
import contextlib
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import Tensor

__all__ = ["batch_seed", "build_mixup", "build_train_loss", "mixup_active", "seeded_batch"]


def mixup_active(args: argparse.Namespace) -> bool:
    """Whether mixup or cutmix is on (timm: ``mixup > 0 or cutmix > 0``)."""
    return getattr(args, "mixup", 0) > 0 or getattr(args, "cutmix", 0) > 0


def build_mixup(args: argparse.Namespace, num_classes: int) -> Mixup | None:
    """timm's ``Mixup`` for the options (``None`` when off); it smooths the targets with ``smoothing``."""
    if not mixup_active(args):
        return None
    return Mixup(
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob,
        mode=args.mixup_mode,
        label_smoothing=args.smoothing,
        num_classes=num_classes,
    )


def build_train_loss(args: argparse.Namespace) -> Callable[[Tensor, Tensor], Tensor]:
    """The training loss timm's ``train.py`` would use for these options (mean over the batch)."""
    smoothing, bce = getattr(args, "smoothing", 0.0), getattr(args, "bce_loss", False)
    if mixup_active(args):
        return BinaryCrossEntropy(target_threshold=None) if bce else SoftTargetCrossEntropy()
    if smoothing:
        return BinaryCrossEntropy(smoothing=smoothing) if bce else LabelSmoothingCrossEntropy(smoothing=smoothing)
    return BinaryCrossEntropy() if bce else F.cross_entropy


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """The seed of micro-batch ``batch`` (its index in the epoch over all processes) of ``epoch``."""
    return int(np.random.SeedSequence((seed, epoch, batch, 0x7A1B)).generate_state(1)[0])


@contextlib.contextmanager
def seeded_batch(seed: int, device: torch.device) -> Iterator[None]:
    """For the block, torch (CPU and ``device``), numpy and Python draw from ``seed``; their states are restored."""
    devices = [device] if device.type == "cuda" else []
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices, **({"device_type": device.type} if devices else {})):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
