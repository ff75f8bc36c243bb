"""The method registry: a method's module registers its config class with `register_method`."""

from __future__ import annotations

from typing import Any

from .base import AdapterConfig, ConfigError

# method name -> config class (each method's module adds itself when imported; see neat_vision.methods)
METHODS: dict[str, type[AdapterConfig]] = {}
# methods without an update module: what trains is a part of the model itself
WHOLE_MODEL_METHODS = ("linear", "full")


def register_method(config_class: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make ``config_class.method`` a method name (``--method``, adapter files)."""
    name = config_class.method
    if name in WHOLE_MODEL_METHODS or METHODS.get(name, config_class) is not config_class:
        raise ValueError(f"method {name!r} is registered already")
    METHODS[name] = config_class
    return config_class


def method_names() -> list[str]:
    """Every ``--method`` a runner accepts: the update methods, then ``linear`` (head only) and ``full``."""
    return [*METHODS, *WHOLE_MODEL_METHODS]


def config_class(method: str) -> type[AdapterConfig]:
    """The config class registered as ``method`` (`ConfigError` naming the update methods otherwise)."""
    if method not in METHODS:
        raise ConfigError(f"method={method!r} has no update config: one of {', '.join(METHODS)}")
    return METHODS[method]


def make_config(method: str, **fields: Any) -> AdapterConfig:
    """The validated config of an update method (``neat``, ``lora``, ``fourierft``) from its fields."""
    return config_class(method).coerce(fields)
