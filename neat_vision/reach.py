"""The one-shot check that every adapted layer runs in the model's first training forward.

A model that reads an adapted layer's weight directly (instead of calling the layer) would leave its update at
zero; `check_reached` (installed by `neat_vision.apply_adapter`) fails naming such layers instead.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .layers import adapted_layers


class UnreachedLayerError(RuntimeError):
    """An adapted layer is never called by the model's forward, so its update would not train."""


def _note(ran: set[str], name: str, module: nn.Module, args: Any) -> None:
    ran.add(name)


class _ReachCheck:
    """The one-shot check that every adapted layer runs, at the model's first training forward.

    Before a forward in training mode with gradients on, it hooks every adapted layer to note that it ran;
    after the forward it removes those hooks and then, when every layer ran, itself. A layer that did not run
    raises `UnreachedLayerError` naming it (and the check stays: the next training forward fails too). It
    stands aside under ``torch.compile`` (the compiled forward runs no Python hooks) and removes itself when
    a submodule is compiled (``module.compile()``), where hooks on the layers would cost a recompilation.
    """

    def __init__(self) -> None:
        self.hook_ids: tuple[int, int] | None = None
        self.ran: set[str] = set()
        self.handles: list[Any] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"hook_ids": self.hook_ids}  # the per-forward hooks do not outlive a forward

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()
        self.hook_ids = state["hook_ids"]

    def _release(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def pre(self, model: nn.Module, args: Any) -> None:
        if not model.training or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return
        self._release()  # left over from a forward that raised
        if any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()):
            check_reached(model, enabled=False)
            return
        self.ran = set()
        for name, layer in adapted_layers(model).items():
            self.handles.append(layer.register_forward_pre_hook(functools.partial(_note, self.ran, name)))

    def post(self, model: nn.Module, args: Any, output: Any) -> None:
        if not self.handles:
            return
        self._release()
        layers = adapted_layers(model)
        missed = [name for name in layers if name not in self.ran]
        if missed:
            raise UnreachedLayerError(
                f"{len(missed)} of {len(layers)} adapted layers never ran in {type(model).__name__}'s training forward "
                f"(e.g. {', '.join(missed[:4])}): the model reads their weights directly or skips them, so their "
                "updates would not train. Pick other targets, or, if the forward skips them on purpose, call "
                "neat_vision.check_reached(model, enabled=False)"
            )
        check_reached(model, enabled=False)


def check_reached(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Install (idempotent) or remove the one-shot check that every adapted layer runs in training.

    `apply_adapter` installs it: the model's first forward in training mode (gradients on) raises
    `UnreachedLayerError` naming each adapted layer the forward did not call, then the check removes itself.
    """
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, h in hooks.items() if isinstance(getattr(h, "__self__", None), _ReachCheck)]:
            del hooks[key]
    if enabled:
        check = _ReachCheck()
        pre = model.register_forward_pre_hook(check.pre)
        post = model.register_forward_hook(check.post)
        check.hook_ids = (pre.id, post.id)
    return model
