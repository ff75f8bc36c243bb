"""Apply, merge, disable and unload updates on a model; what it trains.

`apply_adapter` replaces each target ``nn.Linear`` / ``nn.Conv2d`` by its adapted layer (`AdaptedLinear`,
`AdaptedConv2d`) carrying the method's update modules, freezes the rest and installs the reach check
(`neat_vision.reach`). Adapter files are `neat_vision.adapter_files`.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .batching import batch_tweakers
from .conv import AdaptedConv2d
from .layers import AdaptedLayer, AdaptedLinear, adapted_layers
from .methods import WHOLE_MODEL_METHODS, AdapterConfig, ConfigError, NeatConfig
from .reach import check_reached
from .targets import AliasTable, head_names, resolve_targets

# callables (model, adapted layers by name) -> [(module name, attribute, value)]: attribute settings that make a
# model's forward call adapted layers it would otherwise bypass (timm: attentions that read ``qkv.weight``).
# apply_adapter sets them and merge_and_unload restores the old values; integrations append to this.
FORWARD_PATCHES: list[Callable[[nn.Module, Mapping[str, AdaptedLayer]], list[tuple[str, str, Any]]]] = []


def _adapted(base: nn.Module, slices: tuple[tuple[int, int], ...], config: Any) -> AdaptedLayer:
    cls = AdaptedConv2d if isinstance(base, nn.Conv2d) else AdaptedLinear
    return cls(base, slices, config.make_update, path=config.path)


def _drop_missing_update_keys(module: nn.Module, incompatible_keys) -> None:
    """Load hook: a plain base checkpoint (no update tensors at all) loads into an adapted model."""
    update_keys = {
        f"{name}.updates.{key}" for name, layer in adapted_layers(module).items() for key in layer.updates.state_dict()
    }
    missing = set(incompatible_keys.missing_keys)
    if update_keys and update_keys <= missing:
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in update_keys]


def _undo_forward_patches(model: nn.Module) -> None:
    """Put back what `apply_adapter`'s ``FORWARD_PATCHES`` replaced on ``model``'s modules."""
    for module_name, attr, value in reversed(model.__dict__.pop("_neat_restore", [])):
        setattr(model.get_submodule(module_name), attr, value)


def apply_adapter(
    model: nn.Module,
    config: Any,
    *,
    aliases: AliasTable | None = None,
    head: list[str] | None = None,
) -> nn.Module:
    """Adapt ``model`` in place with the method ``config`` describes, freeze the rest, return it.

    ``nn.Linear`` targets become `AdaptedLinear`, ``nn.Conv2d`` targets `AdaptedConv2d`. ``head`` names the
    modules trained whole when ``config.train_head`` (default: the classifier). The model's first training
    forward checks that every adapted layer runs (`check_reached`).
    """
    if adapted_layers(model):
        raise ValueError("this model is already adapted; call merge_and_unload() first to adapt it again")
    targets = resolve_targets(model, config.targets, config.layers, aliases)
    for p in model.parameters():
        p.requires_grad_(False)
    for target in targets:
        parent_name, _, attr = target.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, _adapted(getattr(parent, attr), target.slices, config))
    layers = adapted_layers(model)
    for layer in layers.values():
        layer.updates.requires_grad_(True)
    restore = []
    for patches in FORWARD_PATCHES:
        for module_name, attr, value in patches(model, layers):
            module = model.get_submodule(module_name)
            restore.append((module_name, attr, getattr(module, attr)))
            setattr(module, attr, value)
    model.__dict__["_neat_restore"] = restore
    if config.train_head:
        for name in head_names(model) if head is None else head:
            model.get_submodule(name).requires_grad_(True)
    if config.trainable:
        patterns = [re.compile(p) for p in config.trainable]
        for name, p in model.named_parameters():
            if any(pat.search(name) for pat in patterns):
                p.requires_grad_(True)
    model.neat_config = config
    model.register_load_state_dict_post_hook(_drop_missing_update_keys)
    return check_reached(model)


def apply_method(
    model: nn.Module,
    method: str,
    config: AdapterConfig | None,
    *,
    apply: Callable[[nn.Module, AdapterConfig], nn.Module] = apply_adapter,
) -> nn.Module:
    """Make ``model``'s trainable set for ``method`` in place and return it (what every runner does).

    An update method's ``config`` goes through ``apply`` (`apply_adapter`, or an integration's, e.g. the
    transformers one with its family's aliases); ``linear`` trains the classifier head only (`head_names`),
    ``full`` every weight.
    """
    if config is not None:
        if config.method != method:
            raise ConfigError(f"method={method!r} was given the config of {config.method!r}")
        return apply(model, config)
    if method not in WHOLE_MODEL_METHODS:
        raise ConfigError(f"method={method!r} needs its config")
    heads = head_names(model)
    if method == "linear" and not heads:
        raise ValueError(f"method='linear' trains the classifier head, and {type(model).__name__} has none")
    model.requires_grad_(method == "full")
    for name in heads:
        model.get_submodule(name).requires_grad_(True)
    return model


def apply_neat(model: nn.Module, config: NeatConfig | Mapping[str, Any], **kwargs: Any) -> nn.Module:
    """Inject NEAT tweakers into ``model`` in place (base frozen; tweakers and head trainable)."""
    return apply_adapter(model, NeatConfig.coerce(config), **kwargs)


def named_adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every update tensor (NEAT tweakers, or another method's updates)."""
    for name, layer in adapted_layers(model).items():
        for key, p in layer.updates.named_parameters():
            yield f"{name}.updates.{key}", p


def adapter_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Every update tensor (NEAT tweakers, or another method's updates), like ``model.parameters()``."""
    for _, p in named_adapter_parameters(model):
        yield p


def neat_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Deprecated name of `named_adapter_parameters` (from before other methods shared the machinery)."""
    warnings.warn(
        "neat_parameters is deprecated: use named_adapter_parameters (the update tensors of any method)",
        DeprecationWarning,
        stacklevel=2,
    )
    return named_adapter_parameters(model)


def trainable_summary(model: nn.Module) -> dict[str, Any]:
    """Parameter counts: ``adapter`` (updates), ``head``, ``other`` trainable, ``trainable``, ``total``.

    ``neat`` is kept as an alias of ``adapter`` (the update count of whatever method is applied).
    """
    update_ids = {id(p) for p in adapter_parameters(model)}
    head_ids = {id(p) for n in head_names(model) for p in model.get_submodule(n).parameters()}
    counts = {"adapter": 0, "head": 0, "other": 0, "trainable": 0, "total": 0}
    for p in model.parameters():
        counts["total"] += p.numel()
        if p.requires_grad:
            counts["trainable"] += p.numel()
            kind = "adapter" if id(p) in update_ids else "head" if id(p) in head_ids else "other"
            counts[kind] += p.numel()
    counts["neat"] = counts["adapter"]
    counts["trainable_percent"] = 100.0 * counts["trainable"] / max(counts["total"], 1)
    counts["adapted_layers"] = len(adapted_layers(model))
    return counts


def merge(model: nn.Module, safe: bool = False) -> nn.Module:
    """Fold every update into its base weight (a copy of ``W0`` is kept for `unmerge`)."""
    for layer in adapted_layers(model).values():
        layer.merge(safe=safe)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore every adapted base weight to ``W0`` exactly."""
    for layer in adapted_layers(model).values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every adapted layer by its plain layer (``nn.Linear``, ``nn.Conv2d``) with ``W0 + dW``.

    The result is the base architecture: forward patches are undone and no hook is left.
    """
    batch_tweakers(model, enabled=False)
    check_reached(model, enabled=False)
    for name, layer in adapted_layers(model).items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, layer.to_plain())
    _undo_forward_patches(model)
    for attr in ("neat_config",):
        if hasattr(model, attr):
            delattr(model, attr)
    config = getattr(model, "config", None)  # an integration's record of the adapter in the model's own config
    if config is not None and hasattr(config, "neat_adapter"):
        delattr(config, "neat_adapter")
    hooks = model._load_state_dict_post_hooks
    for key in [k for k, h in hooks.items() if h is _drop_missing_update_keys]:
        del hooks[key]
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes its base function; merged layers are restored after."""
    layers = adapted_layers(model).values()
    was_merged = [layer.merged for layer in layers]
    for layer in layers:
        if layer.merged:
            layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, merged in zip(layers, was_merged):
            layer.disabled = False
            if merged:
                layer.merge()


disable_neat = disable_adapter  # the name before other methods shared the machinery


def set_path(model: nn.Module, path: str) -> nn.Module:
    """Switch every adapted layer's forward path (``factored``, ``fused`` or ``dense``)."""
    if path not in ("factored", "fused", "dense"):
        raise ValueError(f"path={path!r} is not allowed: one of factored, fused, dense")
    for layer in adapted_layers(model).values():
        layer.path = path
    if hasattr(model, "neat_config"):
        model.neat_config = model.neat_config.replace(path=path)
    return model


@torch.no_grad()
def delta_norms(model: nn.Module) -> dict[str, float]:
    """Frobenius norm of ``dW`` per adapted layer."""
    return {name: float(layer.delta_weight().norm()) for name, layer in adapted_layers(model).items()}


def undo_apply(model: nn.Module) -> Callable[[], None]:
    """A function that returns a plain ``model`` to the state it has now, after `apply_adapter` (even a partial one)."""
    modules = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    attrs = {k: model.__dict__[k] for k in ("neat_config", "_neat_batcher_handles") if k in model.__dict__}
    hooks = set(model._load_state_dict_post_hooks)

    def undo() -> None:
        batch_tweakers(model, enabled=False)
        check_reached(model, enabled=False)
        _undo_forward_patches(model)
        for name in adapted_layers(model):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, modules[name])
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        for key in ("neat_config", "_neat_batcher_handles"):
            model.__dict__.pop(key, None)
        if "_neat_batcher_handles" in attrs:
            batch_tweakers(model)
        if "neat_config" in attrs:
            model.__dict__["neat_config"] = attrs["neat_config"]
        for key in set(model._load_state_dict_post_hooks) - hooks:
            del model._load_state_dict_post_hooks[key]

    return undo
