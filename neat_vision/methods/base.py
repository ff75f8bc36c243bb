"""What every method's config shares: the fields that say what to adapt and what else trains, validated once.

A method is a config dataclass (these fields plus its own) whose ``make_update(d_out, d_in)`` builds the update
module of one weight block and whose ``param_count(d_out, d_in)`` counts that module's trainable tensors. The
update module owns its tensors and implements ``delta_weight(w0) -> dW`` and, when ``dW`` is a product,
``factors(w0) -> (left (d_out, r), right (r, d_in))`` (the adapted layers then never build ``dW``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

PATHS = ("factored", "fused", "dense")


class ConfigError(ValueError):
    """A configuration field holds a value that is not allowed."""


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(kw_only=True)
class AdapterConfig:
    """The fields every method shares.

    Args:
        targets: what to adapt: aliases (``q``, ``k``, ``v``, ``qkv``, ``proj``, ``fc1``, ``fc2``, ``mlp``; per
            model family), ``default``, or regular expressions over module names, or a list of these.
        layers: block indices to adapt (counted in model order over the blocks that hold targets), or
            ``None`` for all. NEAT-S adapts blocks 4-11.
        train_head: also train the classifier head.
        trainable: extra regular expressions over parameter names to keep trainable (e.g. ``norm``).
        path: training forward: ``factored`` (never builds ``dW``), ``fused`` (one matmul with ``W0 + dW``,
            skinny backward), or ``dense`` (reference: autograd through ``dW``). A runtime setting: not part
            of what an adapter is (adapter files leave it out).
    """

    targets: str | Sequence[str] = field(
        default=("q", "v"), metadata={"help": "aliases (q k v qkv proj fc1 fc2 mlp; per family), default, or regexes"}
    )
    layers: Sequence[int] | None = field(
        default=None, metadata={"help": "block indices to adapt (4 5 6, 4-11), or all"}
    )
    train_head: bool = True
    trainable: Sequence[str] = field(default_factory=tuple)
    path: str = field(default="factored", compare=False, metadata={"help": "training forward path", "choices": PATHS})

    method: ClassVar[str]  # the name in adapter files and in ``--method``
    option_prefix: ClassVar[str]  # a runner's option of field F is ``--{option_prefix}-F``
    budget_field: ClassVar[str]  # the field a parameter budget solves for

    def fail(self, name: str, value: Any, allowed: str) -> None:
        """Raise `ConfigError` naming this config's field, the value and what is allowed."""
        raise ConfigError(f"{type(self).__name__}.{name}={value!r} is not allowed: {allowed}")

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if not isinstance(self.targets, (list, tuple)) or not self.targets:
            self.fail("targets", self.targets, "a non-empty string or list of strings")
        if not all(isinstance(t, str) and t for t in self.targets):
            self.fail("targets", self.targets, "every target must be a non-empty string")
        self.targets = tuple(self.targets)
        if self.layers is not None:
            if is_int(self.layers):
                self.layers = (self.layers,)
            if not isinstance(self.layers, (list, tuple, range)) or not self.layers:
                self.fail("layers", self.layers, "None or a non-empty list of block indices")
            if not all(is_int(i) and i >= 0 for i in self.layers):
                self.fail("layers", self.layers, "block indices must be integers >= 0")
            self.layers = tuple(sorted(set(self.layers)))
        if not isinstance(self.train_head, bool):
            self.fail("train_head", self.train_head, "True or False")
        if isinstance(self.trainable, str):
            self.trainable = (self.trainable,)
        self.trainable = tuple(self.trainable)
        if self.path not in PATHS:
            self.fail("path", self.path, f"one of {', '.join(PATHS)}")

    @classmethod
    def own_fields(cls) -> tuple[str, ...]:
        """The method's own fields (not the shared ones of `AdapterConfig`)."""
        shared = {f.name for f in dataclasses.fields(AdapterConfig)}
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in shared)

    @classmethod
    def coerce(cls, value: Any) -> Any:
        """Return ``value`` as this config class (a mapping's unknown keys fail with the allowed names)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{cls.method}={value!r} is not allowed: a {cls.__name__} or a dict of its fields")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s) {unknown}: allowed fields are {', '.join(names)}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of the fields (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def identity_dict(self) -> dict[str, Any]:
        """`to_dict` without the runtime settings (``compare=False`` fields such as ``path``): what an adapter is."""
        runtime = {f.name for f in dataclasses.fields(self) if not f.compare}
        return {k: v for k, v in self.to_dict().items() if k not in runtime}

    def replace(self, **changes: Any) -> Any:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def make_update(self, out_features: int, in_features: int) -> nn.Module:
        """The update module of one ``(out_features, in_features)`` weight block."""
        raise NotImplementedError

    def param_count(self, out_features: int, in_features: int) -> int:
        """Trainable parameters of one block's update module (what `make_update` would build)."""
        raise NotImplementedError

    def budget_limit(self, shapes: Sequence[tuple[int, int]]) -> int | None:
        """The largest ``budget_field`` value these ``(d_out, d_in)`` blocks allow (``None``: no limit)."""
        return None
