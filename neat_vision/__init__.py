"""neat-vision: NEAT (nonlinear parameter-efficient adaptation) for timm models.

``import neat_vision`` imports torch and timm and registers the timm integration
(`neat_vision.integrations.register_timm` says what it changes): ``timm.create_model(name, ...,
neat=dict(targets="qkv", rank=7))`` then returns the model with NEAT tweakers injected, the base frozen, tweakers
and head trainable. The transformers integration registers at ``import neat_vision.nlp``.
"""

from ._moved import install_moved_modules
from .adapter import (
    adapter_parameters,
    apply_adapter,
    apply_method,
    apply_neat,
    delta_norms,
    disable_adapter,
    disable_neat,
    merge,
    merge_and_unload,
    named_adapter_parameters,
    neat_parameters,
    set_path,
    trainable_summary,
    unmerge,
)
from .adapter_files import AdapterFileError, AdapterMismatchError, fingerprint, read_adapter_config, save_adapter
from .batching import batch_tweakers
from .conv import AdaptedConv2d
from .integrations import register_timm
from .integrations.timm import create_model, load_adapter
from .layers import AdaptedLayer, AdaptedLinear, adapted_layers
from .methods import (
    AdapterConfig,
    ConfigError,
    FourierConfig,
    LoraConfig,
    NeatConfig,
    Tweaker,
    register_method,
    tweaker_param_count,
)
from .methods.budget import rank_for_budget, update_param_count
from .reach import UnreachedLayerError, check_reached
from .targets import TargetError, default_targets, resolve_targets

register_timm()
install_moved_modules()

__version__ = "0.1.0"

__all__ = [
    "AdaptedConv2d",
    "AdaptedLayer",
    "AdaptedLinear",
    "AdapterConfig",
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
    "apply_method",
    "apply_neat",
    "batch_tweakers",
    "check_reached",
    "create_model",
    "default_targets",
    "delta_norms",
    "disable_adapter",
    "disable_neat",
    "fingerprint",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "named_adapter_parameters",
    "neat_parameters",
    "rank_for_budget",
    "read_adapter_config",
    "register_method",
    "resolve_targets",
    "save_adapter",
    "set_path",
    "trainable_summary",
    "tweaker_param_count",
    "unmerge",
    "update_param_count",
]
