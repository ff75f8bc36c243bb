"""`AdaptedConv2d`: a frozen ``nn.Conv2d`` whose kernel, read as a matrix, gets trainable updates.

A kernel ``W0 (d_out, d_in/groups, kh, kw)`` is read as the matrix ``(d_out, d_in/groups * kh * kw)``: one row
per output filter, flattened in PyTorch's order. Update modules (NEAT's `Tweaker`, LoRA, FourierFT) see it
as any weight matrix and return ``dW`` (or its factors) in that shape; slices are ranges of output channels.

Forward paths:

- ``factored`` (``groups == 1`` and updates with factors ``dW = left @ right``): ``dW`` is never built;
  ``y = conv(x, W0, b) + conv1x1(conv(x, right), left)``, ``right`` as a ``(R, d_in, kh, kw)`` kernel with the
  layer's stride, padding and dilation, ``left`` as a ``(d_out, R, 1, 1)`` kernel (peft's LoRA-conv form).
- ``fused``, ``dense``, grouped convolutions (depthwise included) and updates without factors:
  ``y = conv(x, W0 + dW, b)``. A grouped kernel is small (``d_in/groups`` columns per filter), so building
  ``dW`` costs little, while a factored form would need ``groups * R`` intermediate channels (the right
  factor applied to every group): for a depthwise conv more than the layer's own width.

The layer keeps every parameter and buffer of the base conv under its own name (``weight``, ``bias``, a
gain...) and all its attributes (stride, padding, dilation, groups, padding_mode), so a plain checkpoint
still loads. Subclasses of ``nn.Conv2d`` with a forward of their own (TensorFlow "same" padding, weight
standardisation) are adapted when an integration registers their `ConvForm` in `CONV_FORMS`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import AdaptedLayer, Slice, _compute_dtype, _to


@dataclass(frozen=True)
class ConvForm:
    """How a ``nn.Conv2d`` subclass with its own forward computes: ``conv(pad(x), kernel(weight), bias)``.

    Args:
        pad: ``pad(layer, x) -> x`` padding done before the convolution (e.g. TensorFlow's dynamic "same").
        kernel: ``kernel(layer, weight) -> kernel`` the tensor convolved with (e.g. weight standardisation);
            ``None`` = the weight itself. A kernel function rules out the factored path and input dropout.

    Both read the base conv's attributes, which the adapted layer carries (it copies them all).
    """

    pad: Callable[[nn.Module, Tensor], Tensor] | None = None
    kernel: Callable[[nn.Module, Tensor], Tensor] | None = None


# nn.Conv2d subclasses whose forward is their own -> how they compute; integrations register theirs here
CONV_FORMS: dict[type, ConvForm] = {}

_MODULE_STATE = frozenset(nn.Module().__dict__)  # what nn.Module itself keeps in an instance's __dict__


def conv_form(module: nn.Module) -> ConvForm | None:
    """The `ConvForm` of a conv layer (``ConvForm()`` for ``nn.Conv2d``'s own forward); ``None``: not adaptable."""
    if not isinstance(module, nn.Conv2d):
        return None
    for cls in type(module).__mro__:
        if cls in CONV_FORMS:
            return CONV_FORMS[cls]
        if "forward" in vars(cls):
            return ConvForm() if cls is nn.Conv2d else None
    return None


class AdaptedConv2d(AdaptedLayer):
    """A frozen ``nn.Conv2d`` whose kernel rows (output channels) get trainable updates.

    ``y = conv(x, W0 + dW, b)`` with ``dW`` the update of the ``(d_out, d_in/groups * kh * kw)`` kernel matrix;
    shapes as the base conv's: ``x (N, in_channels, H, W) -> y (N, out_channels, H', W')``.
    """

    def __init__(
        self,
        base: nn.Conv2d,
        slices: Sequence[Slice],
        make_update: Callable[[int, int], nn.Module],
        path: str = "factored",
    ) -> None:
        super().__init__()
        form = conv_form(base)
        if form is None:
            raise TypeError(
                f"{type(base).__name__} has a forward of its own that AdaptedConv2d cannot reproduce; "
                "register its ConvForm in neat_vision.conv.CONV_FORMS"
            )
        self.form = form
        self.base_type = type(base)
        # stride, padding, dilation, groups, padding_mode, ... and a subclass's own (eps, same_pad, ...)
        self.base_attrs = tuple(k for k in vars(base) if k not in _MODULE_STATE)
        for attr in self.base_attrs:
            setattr(self, attr, copy.copy(getattr(base, attr)))
        for name, param in base._parameters.items():
            self.register_parameter(name, param)
        for name, buf in base._buffers.items():
            self.register_buffer(name, buf, persistent=name not in base._non_persistent_buffers_set)
        self.out_features = base.out_channels
        self.in_features = base.weight[0].numel()  # d_in/groups * kh * kw
        self._init_updates(slices, make_update, path, base.training)
        if form.kernel is not None and any(getattr(u, "input_dropout", None) is not None for u in self.updates):
            raise ValueError(
                f"input dropout is not allowed on a {self.base_type.__name__}: its kernel is a function of the "
                "weight (not W0 + an added update), so the update has no input of its own to drop"
            )

    def _matrix(self, w: Tensor) -> Tensor:
        return w.reshape(self.out_features, self.in_features)

    def _pad(self, x: Tensor) -> tuple[Tensor, str | tuple[int, ...]]:
        """``x`` padded as the base conv pads it, and the padding left to ``F.conv2d``."""
        if self.form.pad is not None:
            x = self.form.pad(self, x)
        if self.padding_mode != "zeros":
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0, 0)
        return x, self.padding

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, padding: str | tuple[int, ...]) -> Tensor:
        kernel = weight if self.form.kernel is None else self.form.kernel(self, weight)
        return F.conv2d(x, kernel, bias, self.stride, padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        x, padding = self._pad(x)
        if self.merged or self.disabled:
            return self._conv(x, self.weight, self.bias, padding)
        factored = self.path == "factored" and self.groups == 1 and self.form.kernel is None
        factors = None if self.path == "dense" else self._factors(self.weight)
        dropouts = [getattr(u, "input_dropout", None) for u in self.updates] if self.training else []
        if factors is not None and any(d is not None for d in dropouts):
            return self._forward_dropout(x, padding, factors, dropouts)
        if factors is None or not factored:
            if factors is None:
                delta = self.delta_weight()
            else:
                left, right = self._stack(factors)
                delta = (left @ right).view(self.weight.shape)
            return self._conv(x, self.weight + delta.to(self.weight.dtype), self.bias, padding)
        left, right = self._stack(factors)
        dtype = _compute_dtype(x)
        y = self._conv(x, self.weight, self.bias, padding)
        z = self._conv(x, _to(right, dtype).view(-1, *self.weight.shape[1:]), None, padding)
        return y + F.conv2d(z, _to(left, dtype)[:, :, None, None])

    def _forward_dropout(
        self, x: Tensor, padding: str | tuple[int, ...], factors: list[Tensor], dropouts: list[nn.Module | None]
    ) -> Tensor:
        """Training with input dropout (LoRA's): each update reads ``dropout(x)``, the frozen conv reads ``x``."""
        dtype = _compute_dtype(x)
        y = self._conv(x, self.weight, self.bias, padding)
        inputs = [x if d is None else d(x) for d in dropouts]
        if self.groups == 1:
            left, _ = self._stack(factors)
            z = torch.cat(
                [
                    self._conv(xi, _to(r, dtype).view(-1, *self.weight.shape[1:]), None, padding)
                    for xi, r in zip(inputs, factors[1::2])
                ],
                dim=1,
            )
            return y + F.conv2d(z, _to(left, dtype)[:, :, None, None])
        for k, ((start, stop), xi) in enumerate(zip(self.slices, inputs)):
            delta = factors[0].new_zeros(self.out_features, self.in_features)
            delta[start:stop] = factors[2 * k] @ factors[2 * k + 1]
            y = y + self._conv(xi, _to(delta.view(self.weight.shape), dtype), None, padding)
        return y

    def to_plain(self) -> nn.Conv2d:
        """The base conv's type (``nn.Conv2d`` or the registered subclass) with the kernel ``W0 + dW``."""
        plain = self.base_type.__new__(self.base_type)
        nn.Module.__init__(plain)
        for attr in self.base_attrs:
            setattr(plain, attr, copy.copy(getattr(self, attr)))
        with torch.no_grad():
            w = self.base_weight + self.delta_weight().to(self.weight.dtype)
        for name, param in self._parameters.items():
            if name == "weight":
                param = nn.Parameter(w.clone(), requires_grad=self.weight.requires_grad)
            plain.register_parameter(name, param)
        for name, buf in self._buffers.items():
            plain.register_buffer(name, buf, persistent=name not in self._non_persistent_buffers_set)
        plain.train(self.training)
        return plain

    def extra_repr(self) -> str:
        ks = "x".join(map(str, self.kernel_size))
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={ks}, stride={self.stride}, groups={self.groups}, "
            f"matrix=({self.out_features}, {self.in_features}), {self._slices_repr()}"
        )
