"""neat-vision: NEAT (nonlinear parameter-efficient adaptation) for timm models.

``import neat_vision`` makes ``timm.create_model(name, ..., neat=dict(targets="qkv", rank=7))`` return the
model with NEAT tweakers injected, the base frozen, tweakers and head trainable.
"""

from . import models  # noqa: E402,F401  registers the shipped fractal ViT in timm
from .adapter import (
    AdapterFileError,
    AdapterMismatchError,
    UnreachedLayerError,
    adapted_layers,
    adapter_parameters,
    apply_adapter,
    apply_neat,
    check_reached,
    delta_norms,
    disable_adapter,
    disable_neat,
    fingerprint,
    merge,
    merge_and_unload,
    named_adapter_parameters,
    neat_parameters,
    read_adapter_config,
    save_adapter,
    set_path,
    trainable_summary,
    unmerge,
)
from .baselines import FourierConfig, LoraConfig, rank_for_budget
from .config import ConfigError, NeatConfig
from .conv import AdaptedConv2d
from .layers import AdaptedLayer, AdaptedLinear, batch_tweakers
from .targets import TargetError, default_targets, resolve_targets
from .timm_hook import create_model, install, load_adapter
from .tweaker import Tweaker, tweaker_param_count

install()

__version__ = "0.1.0"

__all__ = [
    "AdaptedConv2d",
    "AdaptedLayer",
    "AdaptedLinear",
    "AdapterFileError",
    "AdapterMismatchError",
    "ConfigError",
    "FourierConfig",
    "LoraConfig",
    "NeatConfig",
    "TargetError",
    "Tweaker",
    "UnreachedLayerError",
    "adapted_layers",
    "adapter_parameters",
    "apply_adapter",
    "apply_neat",
    "batch_tweakers",
    "check_reached",
    "create_model",
    "default_targets",
    "delta_norms",
    "disable_adapter",
    "disable_neat",
    "fingerprint",
    "install",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "named_adapter_parameters",
    "neat_parameters",
    "rank_for_budget",
    "read_adapter_config",
    "resolve_targets",
    "save_adapter",
    "set_path",
    "trainable_summary",
    "tweaker_param_count",
    "unmerge",
]
