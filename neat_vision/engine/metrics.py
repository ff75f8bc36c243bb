"""Top-k accuracy from exact counts (summed over ranks) and evaluation."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from neat_vision.engine.distributed import DistEnv, all_reduce_sum

__all__ = ["evaluate", "topk_correct"]


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of samples whose label is among the top ``k`` logits, per ``k``; ``logits (N, C)``, ``target (N,)``.

    ``k`` larger than ``C`` counts as ``C`` (every sample is correct).
    """
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == target[:, None]
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    env: DistEnv,
    autocast: Callable[[], contextlib.AbstractContextManager],
    limit: int | None = None,
) -> dict[str, float]:
    """Mean loss, top-1 and top-5 (percent) over ``loader`` (all ranks' shards), and the sample count."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss, top1, top5, count
    for images, targets in itertools.islice(loader, limit):
        images = images.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        with autocast():
            logits = model(images)
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        sums[1:3] += topk_correct(logits, targets).double()
        sums[3] += len(targets)
    model.train(was_training)
    loss, top1, top5, count = all_reduce_sum(sums, env).tolist()
    if count == 0:
        raise ValueError("evaluation saw no samples (empty split, or limit_eval_batches too small)")
    return {"loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "count": int(count)}
