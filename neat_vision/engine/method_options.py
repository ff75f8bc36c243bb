"""From a runner's options to a method config: the one path, for train.py, the GLUE and the instruction runners.

The options come from the registered methods' fields (`neat_vision.methods`): a method's own field F is
``--PREFIX-F`` (``--neat-rank``, ``--lora-alpha``, ``--fourier-n``); the fields every method shares keep the names
they had when NEAT was the only method: ``--neat-targets``, ``--neat-layers``, ``--neat-path``, and the YAML keys
``neat_train_head`` / ``neat_trainable`` (or ``--neat train_head=false``). ``--param-budget`` solves the method's
``budget_field`` on the model. `method_config` builds the validated config once; errors name the options.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any

from torch import nn

from neat_vision.methods import METHODS, WHOLE_MODEL_METHODS, AdapterConfig, ConfigError, config_class, method_names
from neat_vision.methods.budget import rank_for_budget
from neat_vision.targets import AliasTable

__all__ = [
    "SHARED_PREFIX",
    "add_method_arguments",
    "method_config",
    "method_fields",
    "option_names",
    "parse_time_config",
]

SHARED_PREFIX = "neat"  # the shared fields' options: --neat-targets, --neat-layers, --neat-path
_FLAGGED_SHARED = ("targets", "layers", "path")  # shared fields with a flag; the others are YAML keys / --neat only
_TYPES = {"int": int, "float": float}


def option_names(cls: type[AdapterConfig]) -> dict[str, str]:
    """Config field -> option (argparse destination) for the method ``cls``."""
    shared = [f.name for f in dataclasses.fields(AdapterConfig)]
    return {
        **{name: f"{SHARED_PREFIX}_{name}" for name in shared},
        **{name: f"{cls.option_prefix}_{name}" for name in cls.own_fields()},
    }


def _add_field(group: Any, prefix: str, f: dataclasses.Field, default: Any) -> None:
    kind = str(f.type).split("|")[0].strip()
    many = "Sequence" in str(f.type)
    group.add_argument(
        f"--{prefix}-{f.name.replace('_', '-')}",
        nargs="+" if many else None,
        type=_TYPES.get(kind),
        choices=f.metadata.get("choices"),
        default=default,
        help=f.metadata.get("help"),
    )


def _field_default(f: dataclasses.Field) -> Any:
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return list(value) if isinstance(value, tuple) else value


def add_method_arguments(parser: argparse.ArgumentParser, *, config_defaults: bool, methods: list[str] | None = None):
    """``--method``, every registered method's options, ``--neat FIELD=VALUE`` and ``--param-budget``.

    ``config_defaults``: the options default to the config classes' defaults (train.py, whose saved run
    configs list them), or to ``None`` (unset: the config's default; the NLP runners).
    """
    choices = methods or method_names()
    group = parser.add_argument_group("method (--method; a method's own options are --PREFIX-FIELD)")
    group.add_argument("--method", default="neat", choices=choices, help="what to train")
    for f in dataclasses.fields(AdapterConfig):
        if f.name in _FLAGGED_SHARED:
            _add_field(group, SHARED_PREFIX, f, _field_default(f) if config_defaults else None)
    parser.set_defaults(**{f"{SHARED_PREFIX}_{n}": None for n in ("train_head", "trainable")})
    group.add_argument(
        "--neat", dest="neat_overrides", action="append", default=[], metavar="FIELD=VALUE",
        help="a NEAT or shared config field, the value read as YAML (--neat rank=4 is --neat-rank 4)",
    )  # fmt: skip
    group.add_argument(
        "--param-budget", type=int, default=None,
        help="choose the rank (n for FourierFT) whose update parameter count (head excluded) is closest to this",
    )  # fmt: skip
    for name, cls in METHODS.items():
        own = [f for f in dataclasses.fields(cls) if f.name in cls.own_fields()]
        sub = parser.add_argument_group(f"{name} (--method {name})")
        for f in own:
            _add_field(sub, cls.option_prefix, f, _field_default(f) if config_defaults else None)


def method_config(
    args: argparse.Namespace, model: nn.Module | None = None, *, aliases: AliasTable | None = None
) -> AdapterConfig | None:
    """The validated config of ``args.method`` from the options (``None`` for ``linear`` and ``full``).

    Unset options (``None``) take the config's defaults. With ``args.param_budget`` the method's
    ``budget_field`` is solved on ``model`` (required then) by `rank_for_budget`, and the count is printed;
    ``aliases``: the model family's target aliases (the NLP runners' transformers presets).
    """
    method = getattr(args, "method", "neat") or "neat"
    budget = getattr(args, "param_budget", None)
    if method in WHOLE_MODEL_METHODS:
        if budget is not None:
            raise ConfigError(f"param_budget={budget} is not allowed with method={method!r}: it has no update")
        return None
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not allowed: one of {', '.join(method_names())}")
    cls = config_class(method)
    options = option_names(cls)
    fields = method_fields(args)
    try:
        if budget is None:
            return cls.coerce(fields)
        if model is None:
            raise ConfigError(f"param_budget={budget} needs the model to count on: pass method_config(args, model)")
        value, count = rank_for_budget(model, method, budget, aliases=aliases, **fields)
        config = cls.coerce({**fields, cls.budget_field: value})
    except ConfigError as err:  # name the options, not the config fields
        message = re.sub(rf"\b{cls.__name__}\.(\w+)", lambda m: options.get(m[1], m[0]), str(err))
        raise ConfigError(message) from err
    print(f"param budget {budget}: {options[cls.budget_field]}={value} gives {count} update parameters (head excluded)")
    return config


def parse_time_config(args: argparse.Namespace) -> AdapterConfig | None:
    """The config a runner builds once, when it parses its options, and carries (``args.method_config``).

    ``None`` for ``linear`` / ``full``, and with ``--param-budget`` (the other fields are checked now; the budget
    is solved on the loaded model by ``method_config(args, model)``). Raises `ConfigError` naming the options.
    """
    if getattr(args, "param_budget", None) is None or args.method in WHOLE_MODEL_METHODS:
        return method_config(args)
    method_config(argparse.Namespace(**{**vars(args), "param_budget": None}))
    return None


def method_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the options of ``args.method`` set (unset ones are ``None`` and left out)."""
    if args.method not in METHODS:
        return {}
    values = {field: getattr(args, option, None) for field, option in option_names(config_class(args.method)).items()}
    return {field: value for field, value in values.items() if value is not None}


def all_method_options() -> set[str]:
    """Every registered method's option destinations (``neat_rank``, ``lora_alpha``, ``neat_targets``, ...)."""
    return {option for cls in METHODS.values() for option in option_names(cls).values()}
