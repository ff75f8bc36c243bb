"""`AdaptedLinear`: a frozen ``nn.Linear`` plus updates on row slices of its weight.

Each update module (a NEAT `Tweaker`, or a LoRA/FourierFT update) owns its trainable tensors and
implements ``delta_weight(w0) -> dW`` and, when its update is a product, ``factors(w0) -> (left, right)``
with ``dW = left @ right``. An update with factors may also hold an ``input_dropout`` module (LoRA's
dropout): in training the layer then feeds ``input_dropout(x)`` to that update only, on the factored path.
A slice is a row range ``[start, stop)`` of the weight: the whole weight, or the ``q``/``k``/``v`` block of a
fused ``qkv`` projection.

The layer keeps the base ``weight`` and ``bias`` under their original names, so a plain checkpoint of
the base model still loads into the adapted model.
"""

from __future__ import annotations

import contextlib
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


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off only where it is on (entering ``torch.autocast`` costs a few microseconds per call).

    Returns plain context managers that ``torch.compile`` traces without a graph break.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _bias_grad(g2: Tensor, bias: Tensor | None, needed: bool) -> Tensor | None:
    return g2.sum(0).to(bias.dtype) if needed and bias is not None else None


def _linear_out(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` bit for bit, as a contiguous tensor that is no view.

    A custom Function's output must not be a view of a tensor made in its forward, or an in-place addition by
    the caller fails (timm's ``qkv += qkv_bias``). For a contiguous input of 3 or more dims with a bias,
    ``F.linear`` runs one ``addmm`` on the flattened input and returns a view of its result: here the same
    ``addmm`` writes into a fresh tensor. Other inputs take ``F.linear`` itself (the same ops, so an adapted
    layer at init computes exactly what the plain one does).
    """
    if bias is not None and x.dim() >= 3 and x.is_contiguous():
        y = x.new_empty(*x.shape[:-1], weight.shape[0])
        torch.addmm(bias, x.view(-1, x.shape[-1]), weight.t(), out=y.view(-1, weight.shape[0]))
        return y
    y = F.linear(x, weight, bias)
    return y.clone() if y._is_view() or not y.is_contiguous() else y


class _FactoredLinear(torch.autograd.Function):
    """``y = x @ W0.T + b + (x @ right.T) @ left.T`` in the compute dtype, with a hand-written backward.

    ``left (d_out, R)`` and ``right (R, d_in)`` come in the compute dtype. Against autograd through the
    same ops it saves the casts of ``x`` (one instead of one per matmul), the separate addition of the
    skinny product to ``y`` and of the two ``grad_x`` terms (both are ``addmm`` into the big matmul's
    output), and it does not keep the compute-dtype copy of ``W0`` for the backward (recast there).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, left, right, dtype):  # noqa: D102
        xd = _to(x, dtype)
        x2 = xd.reshape(-1, x.shape[-1])
        y = _linear_out(xd, _to(weight, dtype), None if bias is None else _to(bias, dtype))
        xr = x2 @ right.t()
        y.view(x2.shape[0], -1).addmm_(xr, left.t())
        ctx.dtype, ctx.x_dtype, ctx.x_shape, ctx.has_bias = dtype, x.dtype, x.shape, bias is not None
        ctx.save_for_backward(x2, weight, left, right, xr, bias)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        x2, weight, left, right, xr, bias = ctx.saved_tensors
        dtype = ctx.dtype
        need_x, need_w, need_b, need_l, need_r = ctx.needs_input_grad[:5]
        with _no_autocast(grad_y.device.type):
            g2 = _to(grad_y, dtype).reshape(-1, grad_y.shape[-1])
            gl = g2 @ left if need_x or need_r else None
            grad_x = grad_w = grad_l = grad_r = None
            if need_x:
                grad_x = g2 @ _to(weight, dtype)
                grad_x.addmm_(gl, right)
                grad_x = _to(grad_x.view(ctx.x_shape), ctx.x_dtype)
            if need_w:
                grad_w = _to(g2.t() @ x2, weight.dtype)
            if need_l:
                grad_l = g2.t() @ xr
            if need_r:
                grad_r = gl.t() @ x2
            grad_b = _bias_grad(g2, bias, need_b)
        return grad_x, grad_w, grad_b, grad_l, grad_r, None


class _FusedLinear(torch.autograd.Function):
    """``y = x @ (W0 + left @ right).T + b`` as one matmul; the backward needs only skinny matmuls.

    ``W0 + dW`` is built in the factors' dtype (fp32) and cast once to the compute dtype (cheap:
    ``d_out x d_in``, no batch dimension); it is rebuilt in the backward rather than kept. The tweaker
    gradients are ``dL/dleft = g.T @ (x @ right.T)`` and ``dL/dright = (g @ left).T @ x``; ``g.T @ x`` is
    never formed. Note: the forward sees ``dW`` rounded together with ``W0`` to the compute dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, left, right, dtype):  # noqa: D102
        with _no_autocast(x.device.type):
            xd = _to(x, dtype)
            x2 = xd.reshape(-1, x.shape[-1])
            w = torch.addmm(_to(weight, left.dtype), left, right).to(dtype)
            y = _linear_out(xd, w, None if bias is None else _to(bias, dtype))
        ctx.dtype, ctx.x_dtype, ctx.x_shape = dtype, x.dtype, x.shape
        ctx.save_for_backward(x2, weight, left, right, bias)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        x2, weight, left, right, bias = ctx.saved_tensors
        dtype = ctx.dtype
        need_x, need_w, need_b, need_l, need_r = ctx.needs_input_grad[:5]
        with _no_autocast(grad_y.device.type):
            g2 = _to(grad_y, dtype).reshape(-1, grad_y.shape[-1])
            grad_x = grad_w = grad_l = grad_r = None
            if need_x:
                w = torch.addmm(_to(weight, left.dtype), left, right).to(dtype)
                grad_x = _to((g2 @ w).view(ctx.x_shape), ctx.x_dtype)
            if need_w:
                grad_w = _to(g2.t() @ x2, weight.dtype)
            if need_l:
                grad_l = _to(g2.t() @ (x2 @ _to(right, dtype).t()), left.dtype)
            if need_r:
                grad_r = _to((g2 @ _to(left, dtype)).t() @ x2, right.dtype)
            grad_b = _bias_grad(g2, bias, need_b)
        return grad_x, grad_w, grad_b, grad_l, grad_r, None


class AdaptedLayer(nn.Module):
    """The part every adapted layer shares: updates on row slices of a frozen weight matrix; merge / unmerge.

    The frozen weight is read as an ``(out_features, in_features)`` matrix, one update per row slice of it.
    Subclasses (`AdaptedLinear`, `neat_vision.conv.AdaptedConv2d`) set ``weight``, ``bias``, ``out_features``
    and ``in_features`` (the matrix width: ``in_features`` of a Linear, ``in/groups * kh * kw`` of a conv),
    call `_init_updates`, and implement ``forward`` and ``to_plain``.
    """

    weight: Tensor
    bias: Tensor | None
    out_features: int
    in_features: int

    def _init_updates(
        self, slices: Sequence[Slice], make_update: Callable[[int, int], nn.Module], path: str, training: bool
    ) -> None:
        self.slices: tuple[Slice, ...] = tuple((int(a), int(b)) for a, b in slices)
        for start, stop in self.slices:
            if not 0 <= start < stop <= self.out_features:
                raise ValueError(f"slice [{start}, {stop}) is outside the {self.out_features} output rows")
        self.updates = nn.ModuleList(make_update(stop - start, self.in_features) for start, stop in self.slices)
        for update in self.updates:
            if getattr(update, "input_dropout", None) is not None and not hasattr(update, "factors"):
                raise ValueError(f"{type(update).__name__} has input_dropout but no factors(): dropout needs factors")
        self.path = path
        self.merged = False
        self.disabled = False
        self._w0_backup: Tensor | None = None
        if self.weight.dtype.is_floating_point:
            self.updates.to(device=self.weight.device)
        self.train(training)  # an adapter applied to a model in eval mode must not bring dropout

    @property
    def base_weight(self) -> Tensor:
        """``W0`` (the saved copy while merged), in the weight's own shape."""
        return self._w0_backup if self.merged else self.weight

    def _matrix(self, w: Tensor) -> Tensor:
        """``w`` as the ``(out_features, in_features)`` matrix the updates read."""
        return w

    def _factors(self, w0: Tensor) -> list[Tensor] | None:
        """``[left_0, right_0, left_1, ...]`` of every slice, or ``None`` when an update has no factors."""
        w0 = self._matrix(w0)
        out: list[Tensor] = []
        for (start, stop), update in zip(self.slices, self.updates):
            if not hasattr(update, "factors"):
                return None
            out.extend(update.factors(w0[start:stop]))
        return out

    def delta_weight(self) -> Tensor:
        """The dense update ``dW`` in the weight's shape (zeros outside the slices), in fp32 or wider."""
        w = self.base_weight
        w0 = self._matrix(w)
        delta = None
        for (start, stop), update in zip(self.slices, self.updates):
            d = update.delta_weight(w0[start:stop])
            if delta is None:
                delta = torch.zeros(w0.shape, dtype=torch.promote_types(d.dtype, torch.float32), device=d.device)
            delta[start:stop] = d
        return delta if w0 is w else delta.view(w.shape)

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
            warnings.warn(f"{type(self).__name__} is already merged; nothing changed", UserWarning, stacklevel=2)
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
            warnings.warn(f"{type(self).__name__} is not merged; nothing changed", UserWarning, stacklevel=2)
            return
        self.weight.copy_(self._w0_backup)
        self._w0_backup = None
        self.merged = False

    def to_plain(self) -> nn.Module:
        """The base layer type computing the adapted function (weight ``W0 + dW``)."""
        raise NotImplementedError

    def _slices_repr(self) -> str:
        return f"slices={list(self.slices)}, path={self.path}, merged={self.merged}"


class AdaptedLinear(AdaptedLayer):
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
        self._init_updates(slices, make_update, path, base.training)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.disabled:
            return F.linear(x, self.weight, self.bias)
        dropouts = [getattr(u, "input_dropout", None) for u in self.updates] if self.training else []
        if any(d is not None for d in dropouts):
            return self._forward_dropout(x, dropouts)
        path = self.path
        pending = self.__dict__.get("_pending")
        if pending is not None:  # factors from the opt-in batched pass (see `batch_tweakers`)
            self.__dict__["_pending"] = None
            self.__dict__["_used_pending"] = True
            left, right = pending
        else:
            if self.__dict__.get("_used_pending") and not torch.compiler.is_compiling():
                if torch._C._current_graph_task_id() != -1:
                    raise RuntimeError(
                        "batch_tweakers is on, but an adapted layer is recomputed in the backward pass (activation "
                        "checkpointing the batcher cannot see): call neat_vision.batch_tweakers(model, enabled=False)"
                    )
                self.__dict__["_used_pending"] = False
            factors = None if path == "dense" else self._factors(self.weight)
            if factors is None:
                return F.linear(x, self.weight + self.delta_weight().to(self.weight.dtype), self.bias)
            left, right = self._stack(factors)
        dtype = _compute_dtype(x)
        if path == "fused":
            return _FusedLinear.apply(x, self.weight, self.bias, left, right, dtype)
        return _FactoredLinear.apply(x, self.weight, self.bias, _to(left, dtype), _to(right, dtype), dtype)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state = dict(state)
        state.pop("_pending", None)
        state.pop("_used_pending", None)
        return state

    def _forward_dropout(self, x: Tensor, dropouts: list[nn.Module | None]) -> Tensor:
        """Training with input dropout (LoRA's): each update reads ``dropout(x)``; factored, plain autograd."""
        factors = self._factors(self.weight)
        left, right = self._stack(factors)
        dtype = _compute_dtype(x)
        x_right = torch.cat(
            [(x if d is None else d(x)).to(dtype) @ r.to(dtype).t() for d, r in zip(dropouts, factors[1::2])], dim=-1
        )
        return F.linear(x, self.weight, self.bias).to(dtype) + x_right @ left.to(dtype).t()

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

    def to_plain(self) -> nn.Linear:
        """`to_linear`."""
        return self.to_linear()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._slices_repr()}"


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    """The model's adapted layers (`AdaptedLinear`, `neat_vision.conv.AdaptedConv2d`) by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}
