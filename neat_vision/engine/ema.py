"""``--model-ema``: an exponential moving average of the trained tensors, by timm's ``ModelEmaV3``.

timm's EMA copies the whole model; with a frozen base only the trainable tensors (and BatchNorm's running
statistics, which training updates) move, so `TrainableEma` runs ``ModelEmaV3`` over a module that holds just
those, by reference: the copy costs the adapter's size, not the backbone's. ``applied(model)`` puts the
average into the model for a block (evaluation, export) and puts the live values back after it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import Tensor, nn

__all__ = ["TrainableEma", "ema_tensor_names"]


def ema_tensor_names(model: nn.Module) -> list[str]:
    """The tensors the EMA averages: trainable parameters, then the buffers of BatchNorm-like layers."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            names += [f"{prefix}.{n}" if prefix else n for n, _ in module.named_buffers(recurse=False)]
    return names


class _Tensors(nn.Module):
    """The given parameters and buffers registered (by reference) in one module, in order; ``.`` spelled ``__``."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            if isinstance(tensor, nn.Parameter):
                self.register_parameter(name.replace(".", "__"), tensor)
            else:
                self.register_buffer(name.replace(".", "__"), tensor)


class TrainableEma:
    """timm ``ModelEmaV3`` (``decay``, ``use_warmup``) over ``model``'s trainable tensors and BatchNorm statistics.

    ``update(step)`` after optimizer step ``step`` (1-based, as timm's ``train.py`` counts: the first update copies).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        self.model = model
        self.names = ema_tensor_names(model)
        self.live = _Tensors(self._live_tensors())
        self.ema = ModelEmaV3(self.live, decay=decay, use_warmup=warmup)

    def _live_tensors(self) -> dict[str, Tensor]:
        named = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        return {name: named[name] for name in self.names}

    @torch.no_grad()
    def update(self, step: int) -> None:
        self.ema.update(self.live, step=step)

    def averaged(self) -> dict[str, Tensor]:
        """The averaged tensors by the model's names."""
        return {name: t for name, t in zip(self.names, self.ema.module.state_dict().values())}

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """For the block, the model holds the averaged tensors; the live ones come back after it."""
        live = list(self.live.state_dict().values())
        saved = [t.clone() for t in live]
        with torch.no_grad():
            for target, value in zip(live, self.ema.module.state_dict().values()):
                target.copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for target, value in zip(live, saved):
                    target.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return self.averaged()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.names) ^ set(state)
        if missing:
            raise KeyError(f"the checkpoint's EMA does not hold this model's trained tensors: {sorted(missing)[:3]}")
        with torch.no_grad():
            for target, name in zip(self.ema.module.state_dict().values(), self.names):
                target.copy_(state[name])
