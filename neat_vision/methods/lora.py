"""LoRA (Hu et al. 2021) on the adapted layers: ``dW = (alpha / r) * B @ A``, its config and its registration.

``A (r, d_in)`` kaiming-uniform, ``B (d_out, r)`` zeros; optional dropout on the update's input. It shares
targets (``q``/``v`` slices of a fused ``qkv`` included), block selection, merging and adapter files with NEAT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from .base import AdapterConfig, is_int, is_number
from .registry import register_method


class LoraUpdate(nn.Module):
    """LoRA's update of one ``(out_features, in_features)`` block: ``dW = (alpha / r) * B @ A``."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features
        self.rank = rank
        self.scaling = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.input_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A kaiming-uniform (``nn.Linear``'s default, as peft), B zeros: ``dW = 0``."""
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def factors(self, w0: Tensor) -> tuple[Tensor, Tensor]:
        """``(scaling * B (d_out, r), A (r, d_in))``; LoRA ignores ``w0``."""
        return self.scaling * self.B, self.A

    def delta_weight(self, w0: Tensor) -> Tensor:
        """The dense update ``dW (d_out, d_in)``."""
        left, right = self.factors(w0)
        return left @ right

    def extra_repr(self) -> str:
        return f"out={self.out_features}, in={self.in_features}, rank={self.rank}, scaling={self.scaling:g}"


@register_method
@dataclass(kw_only=True)
class LoraConfig(AdapterConfig):
    """LoRA on the same targets as NEAT.

    Args:
        rank: rank ``r`` of ``B @ A``.
        alpha: scaling numerator (``dW = alpha / r * B @ A``); ``None`` = ``rank`` (scaling 1 at every rank).
        dropout: dropout probability on the update's input in training (``0`` = none).
        targets, layers, train_head, trainable, path: shared by every method (`AdapterConfig`).
    """

    rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; scaling alpha/r (None: r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on LoRA's input"})

    method: ClassVar[str] = "lora"
    option_prefix: ClassVar[str] = "lora"
    budget_field: ClassVar[str] = "rank"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_int(self.rank) or self.rank < 1:
            self.fail("rank", self.rank, "an integer >= 1")
        if self.alpha is not None:
            if not is_number(self.alpha) or self.alpha <= 0:
                self.fail("alpha", self.alpha, "None (= rank) or a finite number > 0")
            self.alpha = float(self.alpha)
        if not is_number(self.dropout) or not 0 <= self.dropout < 1:
            self.fail("dropout", self.dropout, "a probability in [0, 1)")
        self.dropout = float(self.dropout)

    def make_update(self, out_features: int, in_features: int) -> nn.Module:
        """The update module for one ``(out_features, in_features)`` block: a `LoraUpdate`."""
        alpha = float(self.rank) if self.alpha is None else self.alpha
        return LoraUpdate(out_features, in_features, self.rank, alpha, self.dropout)

    def param_count(self, out_features: int, in_features: int) -> int:
        """Trainable parameters of one block's update: ``r * (d_out + d_in)``."""
        return self.rank * (out_features + in_features)
