"""NEAT: the tweaker (a tiny network that reads a frozen weight ``W0`` and outputs its update ``dW``), its config
and its registration.

Conventions (PyTorch layout, ``W0`` is ``(d_out, d_in)``). With ``axis="out"`` (the authors' code and
peft) the tweaker reads the columns of ``W0``::

    H  = G(W0.T @ A.T)          # (d_in, r)    A: (r, d_out)
    dW = s * B @ H.T            # (d_out, d_in) B: (d_out, r), zero at init

With ``axis="in"`` (the paper's equations) it reads the rows: ``H = G(W0 @ A.T)`` is ``(d_out, r)`` and
``dW = s * H @ B.T`` with ``B: (d_in, r)``. Either way ``dW = left @ right`` with ``left: (d_out, r)`` and
``right: (r, d_in)``, so ``x @ dW.T = (x @ right.T) @ left.T`` never needs ``dW``.

``G`` is ``act`` for depth 2. Depth ``2 + 2k`` adds ``k`` encoder and ``k`` decoder ``r x r`` layers with
mirrored residuals: encoders push ``h`` and apply ``h = act(enc(h))``; decoders apply
``h = act(dec(h)) + popped``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterConfig, is_int, is_number
from .registry import register_method


def _sin2pi(x: Tensor) -> Tensor:
    return torch.sin(2 * math.pi * x)


def _gelu(x: Tensor) -> Tensor:
    return F.gelu(x)


def _identity(x: Tensor) -> Tensor:
    return x


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "sin": _sin2pi,
    "gelu": _gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "identity": _identity,
}


def resolve_axis(axis: str, out_features: int, in_features: int) -> str:
    """``out`` or ``in``; ``auto`` takes the side with fewer parameters (``out`` on a tie)."""
    if axis == "auto":
        return "in" if in_features < out_features else "out"
    return axis


AXES = ("out", "in", "auto")


def tweaker_param_count(out_features: int, in_features: int, rank: int, depth: int, axis: str) -> int:
    """Trainable parameters of one tweaker: ``2 * r * width + (depth - 2) * r * r``."""
    width = out_features if resolve_axis(axis, out_features, in_features) == "out" else in_features
    return 2 * rank * width + (depth - 2) * rank * rank


class Tweaker(nn.Module):
    """``f(W0)``: the NEAT update network for one ``(out_features, in_features)`` weight block."""

    def __init__(
        self,
        out_features: int,
        in_features: int,
        rank: int,
        depth: int = 2,
        act: str = "relu",
        scale: float = 1.0,
        axis: str = "out",
    ) -> None:
        super().__init__()
        if depth < 2 or depth % 2:
            raise ValueError(f"depth={depth} is not allowed: an even integer >= 2")
        if act not in ACTIVATIONS:
            raise ValueError(f"act={act!r} is not allowed: one of {', '.join(ACTIVATIONS)}")
        self.out_features = out_features
        self.in_features = in_features
        self.rank = rank
        self.depth = depth
        self.act = act
        self.scale = scale
        self.axis = resolve_axis(axis, out_features, in_features)
        width = out_features if self.axis == "out" else in_features
        n_pairs = (depth - 2) // 2
        self.A = nn.Parameter(torch.empty(rank, width))
        self.encoders = nn.ModuleList(nn.Linear(rank, rank, bias=False) for _ in range(n_pairs))
        self.decoders = nn.ModuleList(nn.Linear(rank, rank, bias=False) for _ in range(n_pairs))
        self.B = nn.Parameter(torch.zeros(width, rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A and the ``r x r`` layers kaiming-uniform (``nn.Linear``'s default), B zeros: ``dW = 0``."""
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        for layer in (*self.encoders, *self.decoders):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def hidden(self, w0: Tensor) -> Tensor:
        """``H = G(M @ A.T)`` with ``M = W0.T`` (axis out, ``(d_in, r)``) or ``W0`` (axis in, ``(d_out, r)``)."""
        act = ACTIVATIONS[self.act]
        m = w0.t() if self.axis == "out" else w0
        h = act(m.to(self.A.dtype) @ self.A.t())
        residuals = []
        for enc in self.encoders:
            residuals.append(h)
            h = act(enc(h))
        for dec in self.decoders:
            h = act(dec(h)) + residuals.pop()
        return h

    def factors(self, w0: Tensor) -> tuple[Tensor, Tensor]:
        """``(left, right)`` with ``dW = left @ right``; ``left: (d_out, r)``, ``right: (r, d_in)``.

        Computed in the tweaker's own dtype with autocast off: the tweaker is tiny and its input ``W0``
        is fixed, so low precision here buys nothing and costs accuracy (``sin(2*pi*x)`` in bf16).
        """
        if torch.is_autocast_enabled(w0.device.type):
            with torch.autocast(device_type=w0.device.type, enabled=False):
                return self.factors(w0)
        h = self.hidden(w0)
        b = self.B if self.scale == 1.0 else self.scale * self.B
        if self.axis == "out":
            return b, h.t()
        return h, b.t()

    def delta_weight(self, w0: Tensor) -> Tensor:
        """The dense update ``dW``, shape of ``w0``."""
        left, right = self.factors(w0)
        return left @ right

    def extra_repr(self) -> str:
        return (
            f"out={self.out_features}, in={self.in_features}, rank={self.rank}, depth={self.depth}, "
            f"act={self.act}, scale={self.scale}, axis={self.axis}"
        )


@register_method
@dataclass(kw_only=True)
class NeatConfig(AdapterConfig):
    """Configuration of NEAT tweakers.

    Args:
        rank: hidden width ``r`` of each tweaker.
        depth: total number of tweaker layers, even, ``2`` = vanilla NEAT (``A`` then ``B``); each extra
            pair adds one ``r x r`` encoder and one decoder with a mirrored residual.
        act: activation ``G``: one of ``relu``, ``sin`` (``sin(2*pi*x)``), ``gelu``, ``silu``, ``tanh``,
            ``identity``.
        scale: scaling ``s`` of the update.
        axis: which side of ``W0`` the tweaker reads: ``out`` (authors' code and peft; width ``d_out``),
            ``in`` (the paper's equations; width ``d_in``), or ``auto`` (the cheaper side per layer).
        targets, layers, train_head, trainable, path: shared by every method (`AdapterConfig`).
    """

    rank: int = field(default=7, metadata={"help": "tweaker width r"})
    depth: int = field(default=2, metadata={"help": "tweaker depth (even; 2 = vanilla NEAT)"})
    act: str = field(default="relu", metadata={"help": "tweaker activation", "choices": tuple(ACTIVATIONS)})
    scale: float = field(default=1.0, metadata={"help": "update scaling s"})
    axis: str = field(default="out", metadata={"help": "side of W0 the tweaker reads", "choices": AXES})

    method: ClassVar[str] = "neat"
    option_prefix: ClassVar[str] = "neat"
    budget_field: ClassVar[str] = "rank"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_int(self.rank) or self.rank < 1:
            self.fail("rank", self.rank, "an integer >= 1")
        if not is_int(self.depth) or self.depth < 2 or self.depth % 2:
            self.fail("depth", self.depth, "an even integer >= 2 (2 = vanilla NEAT: 2, 4, 6, ...)")
        if self.act not in ACTIVATIONS:
            self.fail("act", self.act, f"one of {', '.join(ACTIVATIONS)}")
        if not is_number(self.scale):
            self.fail("scale", self.scale, "a finite number")
        self.scale = float(self.scale)
        if self.axis not in AXES:
            self.fail("axis", self.axis, f"one of {', '.join(AXES)}")

    def make_update(self, out_features: int, in_features: int) -> Tweaker:
        """The update module for one ``(out_features, in_features)`` weight block: a `Tweaker`."""
        return Tweaker(out_features, in_features, self.rank, self.depth, self.act, self.scale, self.axis)

    def param_count(self, out_features: int, in_features: int) -> int:
        """Trainable parameters of one block's tweaker: ``2 * r * width + (depth - 2) * r * r``."""
        return tweaker_param_count(out_features, in_features, self.rank, self.depth, self.axis)
