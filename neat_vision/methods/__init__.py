"""The methods: one module each (config dataclass + update module + registration) over a shared base.

Adding a method is one new module that defines its config (an `AdapterConfig` with ``method``,
``option_prefix``, ``budget_field``, ``make_update`` and ``param_count``) decorated with `register_method`, and
one import line here. Every runner then trains it (``--method NAME``, options ``--PREFIX-FIELD``).
"""

from .base import PATHS, AdapterConfig, ConfigError
from .registry import METHODS, WHOLE_MODEL_METHODS, config_class, make_config, method_names, register_method

# registration order is the order of --method's choices: the methods, one module each
from .neat import ACTIVATIONS, AXES, NeatConfig, Tweaker, tweaker_param_count  # isort: skip
from .lora import LoraConfig, LoraUpdate  # isort: skip
from .fourierft import FourierConfig, FourierUpdate  # isort: skip

__all__ = [
    "ACTIVATIONS",
    "AXES",
    "METHODS",
    "PATHS",
    "WHOLE_MODEL_METHODS",
    "AdapterConfig",
    "ConfigError",
    "FourierConfig",
    "FourierUpdate",
    "LoraConfig",
    "LoraUpdate",
    "NeatConfig",
    "Tweaker",
    "config_class",
    "make_config",
    "method_names",
    "register_method",
    "tweaker_param_count",
]
