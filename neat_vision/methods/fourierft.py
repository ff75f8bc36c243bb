"""FourierFT (Gao et al. 2024) on the adapted layers, its config and its registration.

``n`` trainable spectral coefficients at random frequency locations (fixed by a seed, the same for every
weight block of the same shape); ``dW = alpha * real(ifft2(S))`` where ``S (d_out, d_in)`` holds the
coefficients, zeros elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from .base import AdapterConfig, is_int, is_number
from .registry import register_method


def fourier_indices(out_features: int, in_features: int, n: int, seed: int) -> Tensor:
    """``(2, n)`` row and column of the ``n`` spectral entries: peft's FourierFT draw for this shape and seed."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // in_features, flat % in_features])


class FourierUpdate(nn.Module):
    """FourierFT's update of one block: ``dW = alpha * real(ifft2(S))``, ``S`` zeros but ``n`` coefficients.

    Dense only (no ``factors``). The coefficients start at zero (``dW = 0``); peft's ``init_weights=False``
    default draws them from N(0, 1) instead.
    """

    def __init__(self, out_features: int, in_features: int, n: int, alpha: float, seed: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features
        self.n = n
        self.alpha = alpha
        self.seed = seed
        self.register_buffer("indices", fourier_indices(out_features, in_features, n, seed), persistent=False)
        self.spectrum = nn.Parameter(torch.zeros(n))

    def delta_weight(self, w0: Tensor) -> Tensor:
        """``dW (d_out, d_in)`` in fp32 (``ifft2`` is not defined for half types); FourierFT ignores ``w0``."""
        with torch.autocast(device_type=self.spectrum.device.type, enabled=False):
            dense = self.spectrum.new_zeros((self.out_features, self.in_features), dtype=torch.float32)
            dense = dense.index_put((self.indices[0], self.indices[1]), self.spectrum.float())
            return torch.fft.ifft2(dense).real * self.alpha

    def extra_repr(self) -> str:
        return f"out={self.out_features}, in={self.in_features}, n={self.n}, alpha={self.alpha:g}, seed={self.seed}"


@register_method
@dataclass(kw_only=True)
class FourierConfig(AdapterConfig):
    """FourierFT on the same targets as NEAT.

    Args:
        n: spectral coefficients per weight block (FourierFT's ``n_frequency``); at most ``d_out * d_in``.
        alpha: scaling of ``dW`` (FourierFT's ``scaling``: 300 for ViT-B/L in its paper).
        seed: seed of the frequency locations (peft's ``random_loc_seed``).
        targets, layers, train_head, trainable, path: shared by every method (`AdapterConfig`); FourierFT has no
            factors, so its layers always take the dense path.
    """

    n: int = field(default=1000, metadata={"help": "FourierFT coefficients per block"})
    alpha: float = field(default=300.0, metadata={"help": "FourierFT scaling"})
    seed: int = field(default=777, metadata={"help": "FourierFT frequency-location seed"})

    method: ClassVar[str] = "fourierft"
    option_prefix: ClassVar[str] = "fourier"
    budget_field: ClassVar[str] = "n"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_int(self.n) or self.n < 1:
            self.fail("n", self.n, "an integer >= 1")
        if not is_number(self.alpha):
            self.fail("alpha", self.alpha, "a finite number")
        self.alpha = float(self.alpha)
        if not is_int(self.seed):
            self.fail("seed", self.seed, "an integer")

    def make_update(self, out_features: int, in_features: int) -> nn.Module:
        """The update module for one ``(out_features, in_features)`` block: a `FourierUpdate`."""
        if self.n > out_features * in_features:
            self.fail("n", self.n, f"at most {out_features * in_features} for a {out_features}x{in_features} block")
        return FourierUpdate(out_features, in_features, self.n, self.alpha, self.seed)

    def param_count(self, out_features: int, in_features: int) -> int:
        """Trainable parameters of one block's update: ``n``."""
        return self.n

    def budget_limit(self, shapes: Sequence[tuple[int, int]]) -> int | None:
        """``n`` is at most ``d_out * d_in`` of the smallest block."""
        return min(o * i for o, i in shapes)
