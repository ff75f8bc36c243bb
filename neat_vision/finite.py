"""Non-finite guards of the training loops: gradients before a step, weights after it, checkpoints before trust.

The flags are device tensors (no host sync), so a loop can fold them into a reduction it does anyway;
the max-abs (infinity) norm is used because it cannot overflow for finite values and NaN propagates through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["checkpoint_nonfinite", "nonfinite_flag", "nonfinite_names"]


@torch.no_grad()
def nonfinite_flag(tensors: Iterable[Tensor | None], device: torch.device | str) -> Tensor:
    """A float64 scalar on ``device``: 1.0 when any of ``tensors`` (``None`` skipped) has a NaN or inf, else 0.0."""
    by_device: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        if t is not None and t.is_floating_point():
            by_device.setdefault((t.device, t.dtype), []).append(t.detach())
    flag = torch.zeros((), dtype=torch.float64, device=device)
    for group in by_device.values():
        peak = torch.stack(torch._foreach_norm(group, float("inf"))).max()
        flag = torch.maximum(flag, (~torch.isfinite(peak)).to(device=device, dtype=torch.float64))
    return flag


def nonfinite_names(named: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> list[str]:
    """Names of the floating tensors that hold a NaN or inf."""
    items = named.items() if isinstance(named, Mapping) else named
    return [n for n, t in items if isinstance(t, Tensor) and t.is_floating_point() and not torch.isfinite(t).all()]


def _tensors(obj: Any, prefix: str) -> Iterable[tuple[str, Tensor]]:
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}.{i}")


def checkpoint_nonfinite(path: Path, keys: Iterable[str]) -> list[str] | None:
    """Read the checkpoint at ``path`` and name its non-finite tensors under ``keys`` (``None``: unreadable)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 (any failure to read means the file cannot be called good)
        return None
    return nonfinite_names(list(_tensors({k: state.get(k) for k in keys}, "")))
