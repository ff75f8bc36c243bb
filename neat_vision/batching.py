"""The cross-layer tweaker batcher (opt-in): one batched pass computes the factors of all same-shaped NEAT layers.

`batch_tweakers` hooks a model's forward; `TweakerBatcher` says where it stands aside (compile, sharded weights,
activation checkpointing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .layers import AdaptedLinear, _no_autocast, _to
from .methods.neat import ACTIVATIONS, Tweaker


def _is_local_full(weight: Tensor, shape: tuple[int, int]) -> bool:
    """Whether ``weight`` is a plain local tensor of its full shape (not a DTensor, shard or ZeRO-3 stub)."""
    return type(weight) in (nn.Parameter, Tensor) and tuple(weight.shape) == shape and not hasattr(weight, "ds_id")


def _batch_key(layer: AdaptedLinear) -> tuple | None:
    """What must agree for layers to share one batched tweaker pass (``None``: not batchable)."""
    if layer.merged or layer.disabled or layer.path == "dense" or not layer.updates:
        return None
    if not _is_local_full(layer.weight, (layer.out_features, layer.in_features)):
        return None  # sharded (FSDP, DeepSpeed ZeRO-3): only the layer's own forward sees the gathered W0
    first = layer.updates[0]
    if not all(type(u) is Tweaker for u in layer.updates):
        return None
    sizes = {stop - start for start, stop in layer.slices}
    if len(sizes) != 1:
        return None
    device = layer.weight.device
    if layer.path == "fused" or not torch.is_autocast_enabled(device.type):
        dtype = first.A.dtype
    else:
        dtype = torch.get_autocast_dtype(device.type)
    return (
        layer.path, device, first.A.dtype, dtype, layer.slices, layer.in_features, layer.out_features,
        first.rank, first.depth, first.act, first.scale, first.axis,
    )  # fmt: skip


def _batched_factors(layers: Sequence[AdaptedLinear], key: tuple) -> tuple[Tensor, Tensor]:
    """Stacked ``left (L, d_out, S*r)`` and ``right (L, S*r, d_in)`` of ``L`` same-keyed layers.

    The same function as each layer's `Tweaker.factors` followed by `AdaptedLinear._stack`, but every op
    after the first matmul (which reads each layer's own ``W0`` slice) runs once for all ``G = L*S``
    tweakers: ``act``, the ``r x r`` encoders/decoders as one ``bmm`` each, the scale, the padding into the
    stacked layout and the cast to the compute dtype. The hidden state is kept transposed, ``H.T`` of
    shape ``(G, r, d)``: then every weight gradient comes out contiguous (no copy per parameter when
    autograd accumulates it) and, for ``axis="out"``, ``H.T`` already is the stacked ``right``.
    """
    _, device, _, dtype, slices, in_features, out_features, rank, _, act_name, scale, axis = key
    act = ACTIVATIONS[act_name]
    ups = [u for layer in layers for u in layer.updates]
    n_layers, n_slices = len(layers), len(slices)
    with _no_autocast(device.type):
        pre = []
        for layer in layers:
            w0 = layer.weight
            for (start, stop), u in zip(layer.slices, layer.updates):
                m = w0 if (start, stop) == (0, out_features) else w0[start:stop]
                m = _to(m, u.A.dtype)
                pre.append(u.A @ (m if axis == "out" else m.t()))  # H.T before act: (r, d_in) / (r, d_slice)
        ht = act(torch.stack(pre))
        residuals = []
        for j in range(len(ups[0].encoders)):
            residuals.append(ht)
            ht = act(torch.bmm(torch.stack([u.encoders[j].weight for u in ups]), ht))
        for j in range(len(ups[0].decoders)):
            ht = act(torch.bmm(torch.stack([u.decoders[j].weight for u in ups]), ht)) + residuals.pop()
        b = torch.stack([u.B for u in ups])  # (G, width, r)
        if scale != 1.0:
            b = b * scale
        if axis == "out":  # left pieces s*B (G, d_slice, r); right = H.T stacked
            pieces_left = b
            right = _to(ht.view(n_layers, n_slices * rank, in_features), dtype)
        else:  # left pieces H (G, d_slice, r); right = s*B.T stacked
            pieces_left = ht.transpose(1, 2)
            right = b.view(n_layers, n_slices, in_features, rank).transpose(2, 3)
            right = (
                right.contiguous() if right.dtype == dtype else right.to(dtype, memory_format=torch.contiguous_format)
            )
            right = right.view(n_layers, -1, in_features)
        if n_slices == 1 and slices[0] == (0, out_features):
            left = _to(pieces_left, dtype)
        else:
            left = pieces_left.new_zeros((n_layers, out_features, n_slices * rank), dtype=dtype)
            pieces_left = pieces_left.reshape(n_layers, n_slices, -1, rank)
            for k, (start, stop) in enumerate(slices):
                left[:, start:stop, k * rank : (k + 1) * rank] = pieces_left[:, k]
    return left, right


class TweakerBatcher:
    """Forward hooks on a model: one batched tweaker pass per forward for all same-shaped layers (opt-in).

    Before the model's forward it computes the factors of every batchable adapted layer (`_batch_key`)
    in one pass per group and leaves them with each layer, which uses them once; after the forward
    (also when it raises) whatever was not used is dropped, so no factors outlive the forward that
    made them. A layer called outside the model's forward, or twice in one, computes its own factors.
    It stands aside (every layer computes its own factors, the same function) under ``torch.compile``
    (the compiler fuses the per-layer ops itself), for layers whose weight is sharded (FSDP1, FSDP2,
    DeepSpeed ZeRO-3: only the layer's own forward sees the gathered ``W0``), and while activation
    checkpointing is on (timm's ``set_grad_checkpointing``, Hugging Face's ``gradient_checkpointing_enable``,
    torch's ``checkpoint_wrapper``): a recomputed layer must repeat its own forward ops. Checkpointing it
    cannot see (``torch.utils.checkpoint`` inside a forward) is refused with an error at the recompute.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._scan()

    def _scan(self) -> None:
        self.entries = []  # (parent, attribute, layer) of each adapted layer
        # every (parent, attribute, child) link from the model down to an adapted layer, checked each forward:
        # a wrapper put around any module on the way (checkpoint_wrapper, FSDP) makes the batcher scan again
        self.links: list[tuple[nn.Module, str, nn.Module]] = []
        # modules carrying timm's (grad_checkpointing) or Hugging Face's (gradient_checkpointing) switch
        self.checkpointing_flags = [
            m for m in self.model.modules() if hasattr(m, "grad_checkpointing") or hasattr(m, "gradient_checkpointing")
        ]
        # torch's checkpoint_wrapper (and wrappers like it) recompute their module in the backward
        self.checkpoint_wrapped = any("Checkpoint" in type(m).__name__ for m in self.model.modules())
        links: dict[tuple[int, str], tuple[nn.Module, str, nn.Module]] = {}
        for name, module in self.model.named_modules():
            if isinstance(module, AdaptedLinear):
                parent = self.model
                for attr in name.split("."):
                    child = parent._modules[attr]
                    links[(id(parent), attr)] = (parent, attr, child)
                    parent = child
                parent_name, _, attr = name.rpartition(".")
                self.entries.append((self.model.get_submodule(parent_name), attr, module))
        self.links = list(links.values())

    def layers(self) -> list[AdaptedLinear]:
        if any(parent._modules.get(attr) is not child for parent, attr, child in self.links):
            self._scan()
        return [layer for _, _, layer in self.entries]

    def _checkpointing(self) -> bool:
        """Activation checkpointing recomputes layers after the forward, without the batched factors."""
        return self.checkpoint_wrapped or any(
            getattr(m, "grad_checkpointing", False) is True or getattr(m, "gradient_checkpointing", False) is True
            for m in self.checkpointing_flags
        )

    def pre_hook(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            return
        layers = self.layers()  # rescans first if a module on the way was wrapped or replaced
        if self._checkpointing():
            return
        groups: dict[tuple, list[AdaptedLinear]] = {}
        for layer in layers:
            key = _batch_key(layer)
            if key is not None:
                groups.setdefault(key, []).append(layer)
        for key, members in groups.items():
            left, right = _batched_factors(members, key)
            for layer, lft, rgt in zip(members, left.unbind(0), right.unbind(0)):
                layer.__dict__["_pending"] = (lft, rgt)

    def post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        for _, _, layer in self.entries:
            layer.__dict__["_pending"] = None


def batch_tweakers(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Opt in: compute all tweakers of ``model`` in one batched pass per forward (idempotent; ``enabled=False`` undoes).

    Same function and gradients as the per-layer computation; it saves the per-layer tweaker ops,
    which dominate the step of small batches (per-op launch overhead). Used by ``model(x)`` only, not by
    calls of its submodules (those compute per layer). Off by default: the adapted layer alone is a plain
    module whose forward reads only its own parameters and input. `TweakerBatcher` says where it stands aside.
    """
    handles = model.__dict__.pop("_neat_batcher_handles", None)
    if handles is not None:
        for handle in handles:
            handle.remove()
    if enabled:
        batcher = TweakerBatcher(model)
        model.__dict__["_neat_batcher_handles"] = (
            model.register_forward_pre_hook(batcher.pre_hook),
            model.register_forward_hook(batcher.post_hook, always_call=True),
        )
    return model
