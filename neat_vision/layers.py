"""`AdaptedLinear`: a frozen ``nn.Linear`` plus updates on row slices of its weight.

Each update module (a NEAT `Tweaker`, or a LoRA/FourierFT update) owns its trainable tensors and
implements ``delta_weight(w0) -> dW`` and, when its update is a product, ``factors(w0) -> (left, right)``
with ``dW = left @ right``. A slice is a row range ``[start, stop)`` of the weight: the whole weight, or
the ``q``/``k``/``v`` block of a fused ``qkv`` projection.

The layer keeps the base ``weight`` and ``bias`` under their original names, so a plain checkpoint of
the base model still loads into the adapted model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Slice = tuple[int, int]


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _effective_weight(weight: Tensor, slices: Sequence[Slice], factors: Sequence[Tensor]) -> Tensor:
    w = weight.clone()
    for k, (start, stop) in enumerate(slices):
        left, right = factors[2 * k], factors[2 * k + 1]
        w[start:stop] += left @ right
    return w


class _FusedLinear(torch.autograd.Function):
    """``y = x @ (W0 + dW).T + b`` as one matmul; the backward needs only skinny matmuls.

    ``dW`` is cheap to build (``d_out x d_in``, no batch dimension); the tweaker gradients are
    ``dL/dleft = g.T @ (x @ right.T)`` and ``dL/dright = (g @ left).T @ x`` and never form ``g.T @ x``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, slices: tuple, *factors: Tensor) -> Tensor:
        dtype = _compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(dtype)
            w = _effective_weight(weight, slices, factors).to(dtype)
            y = F.linear(x, w, None if bias is None else bias.to(dtype))
        ctx.slices = slices
        ctx.dtype = dtype
        ctx.bias_grad = bias is not None and bias.requires_grad
        ctx.save_for_backward(x, weight, *factors)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, *factors = ctx.saved_tensors
        dtype = ctx.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            grad_y = grad_y.to(dtype)
            grad_x = None
            if ctx.needs_input_grad[0]:
                w = _effective_weight(weight, ctx.slices, factors).to(dtype)
                grad_x = grad_y @ w
            x2 = x.reshape(-1, x.shape[-1])
            g2 = grad_y.reshape(-1, grad_y.shape[-1])
            grad_w = (g2.t() @ x2).to(weight.dtype) if ctx.needs_input_grad[1] else None
            grad_b = g2.sum(0) if ctx.bias_grad else None
            grad_factors = []
            for k, (start, stop) in enumerate(ctx.slices):
                left, right = factors[2 * k], factors[2 * k + 1]
                g_slice = g2[:, start:stop]
                x_right = x2 @ right.to(dtype).t()
                grad_left = (g_slice.t() @ x_right).to(left.dtype)
                grad_right = ((g_slice @ left.to(dtype)).t() @ x2).to(right.dtype)
                grad_factors += [grad_left, grad_right]
        return (grad_x, grad_w, grad_b, None, *grad_factors)


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight slices each get a trainable update.

    ``y = x @ W0.T + b + sum_k pad_k(x @ dW_k.T)``, where ``dW_k`` is the update of rows
    ``slices[k]`` of ``W0``. Shapes: ``x (..., in_features) -> y (..., out_features)``.
    """

    def __init__(
        self,
        base: nn.Linear,
        slices: Sequence[Slice],
        make_update: Callable[[int, int], nn.Module],
        path: str = "factored",
    ) -> None:
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.slices: tuple[Slice, ...] = tuple((int(a), int(b)) for a, b in slices)
        for start, stop in self.slices:
            if not 0 <= start < stop <= self.out_features:
                raise ValueError(f"slice [{start}, {stop}) is outside the {self.out_features} output rows")
        self.updates = nn.ModuleList(make_update(stop - start, self.in_features) for start, stop in self.slices)
        self.path = path
        self.merged = False
        self.disabled = False
        self._w0_backup: Tensor | None = None
        device, dtype = base.weight.device, base.weight.dtype
        if dtype.is_floating_point:
            self.updates.to(device=device)

    @property
    def base_weight(self) -> Tensor:
        """``W0`` (the saved copy while merged)."""
        return self._w0_backup if self.merged else self.weight

    def _factors(self, w0: Tensor) -> list[Tensor] | None:
        out: list[Tensor] = []
        for (start, stop), update in zip(self.slices, self.updates):
            if not hasattr(update, "factors"):
                return None
            out.extend(update.factors(w0[start:stop]))
        return out

    def delta_weight(self) -> Tensor:
        """The dense update ``dW`` of the whole weight (zeros outside the slices), in fp32 or wider."""
        w0 = self.base_weight
        delta = None
        for (start, stop), update in zip(self.slices, self.updates):
            d = update.delta_weight(w0[start:stop])
            if delta is None:
                delta = torch.zeros(w0.shape, dtype=torch.promote_types(d.dtype, torch.float32), device=d.device)
            delta[start:stop] = d
        return delta

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.disabled:
            return F.linear(x, self.weight, self.bias)
        path = self.path
        factors = None if path == "dense" else self._factors(self.weight)
        if factors is None:
            return F.linear(x, self.weight + self.delta_weight().to(self.weight.dtype), self.bias)
        if path == "fused":
            return _FusedLinear.apply(x, self.weight, self.bias, self.slices, *factors)
        left, right = self._stack(factors)
        dtype = _compute_dtype(x)
        y = F.linear(x, self.weight, self.bias)
        x_right = x.to(dtype) @ right.to(dtype).t()
        y2 = torch.addmm(
            y.reshape(-1, self.out_features).to(dtype), x_right.reshape(-1, right.shape[0]), left.to(dtype).t()
        )
        return y2.view(*y.shape)

    def _stack(self, factors: list[Tensor]) -> tuple[Tensor, Tensor]:
        """One ``(d_out, R)`` left and ``(R, d_in)`` right for all slices (``R`` = sum of ranks)."""
        if len(self.slices) == 1 and self.slices[0] == (0, self.out_features):
            return factors[0], factors[1]
        lefts, rights = factors[0::2], factors[1::2]
        rank = sum(r.shape[0] for r in rights)
        left = lefts[0].new_zeros(self.out_features, rank)
        col = 0
        for (start, stop), piece in zip(self.slices, lefts):
            left[start:stop, col : col + piece.shape[1]] = piece
            col += piece.shape[1]
        return left, torch.cat(rights, dim=0)

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """Fold ``dW`` into ``weight``; a copy of ``W0`` is kept so `unmerge` restores it exactly."""
        if self.merged:
            warnings.warn("AdaptedLinear is already merged; nothing changed", UserWarning, stacklevel=2)
            return
        merged = self.weight + self.delta_weight().to(self.weight.dtype)
        if safe and not torch.isfinite(merged).all():
            raise ValueError("merge refused: the merged weight has NaN or inf entries (a broken update?)")
        self._w0_backup = self.weight.detach().clone()
        self.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore ``W0`` bit for bit."""
        if not self.merged:
            warnings.warn("AdaptedLinear is not merged; nothing changed", UserWarning, stacklevel=2)
            return
        self.weight.copy_(self._w0_backup)
        self._w0_backup = None
        self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the adapted function (``W0 + dW``, same bias)."""
        with torch.no_grad():
            w = self.base_weight + self.delta_weight().to(self.weight.dtype)
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=w.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            linear.bias.requires_grad_(self.bias.requires_grad)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"slices={list(self.slices)}, path={self.path}, merged={self.merged}"
        )
