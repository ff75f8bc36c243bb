"""`NeatConfig`: what to adapt and how, validated on construction."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from .tweaker import Tweaker

ACTIVATIONS = ("relu", "sin", "gelu", "silu", "tanh", "identity")
AXES = ("out", "in", "auto")
PATHS = ("factored", "fused", "dense")


class ConfigError(ValueError):
    """A configuration field holds a value that is not allowed."""


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"NeatConfig.{field_name}={value!r} is not allowed: {allowed}")


class ConfigMethods:
    """What every method's config dataclass offers: ``coerce`` from a dict, ``to_dict``, ``replace``."""

    method: ClassVar[str]

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


@dataclass
class NeatConfig(ConfigMethods):
    """Configuration of NEAT tweakers.

    Args:
        targets: what to adapt: aliases (``q``, ``k``, ``v``, ``qkv``, ``proj``, ``fc1``, ``fc2``, ``mlp``),
            or regular expressions over module names, or a list of these.
        rank: hidden width ``r`` of each tweaker.
        depth: total number of tweaker layers, even, ``2`` = vanilla NEAT (``A`` then ``B``); each extra
            pair adds one ``r x r`` encoder and one decoder with a mirrored residual.
        act: activation ``G``: one of ``relu``, ``sin`` (``sin(2*pi*x)``), ``gelu``, ``silu``, ``tanh``,
            ``identity``.
        scale: scaling ``s`` of the update.
        axis: which side of ``W0`` the tweaker reads: ``out`` (authors' code and peft; width ``d_out``),
            ``in`` (the paper's equations; width ``d_in``), or ``auto`` (the cheaper side per layer).
        layers: block indices to adapt (counted in model order over the blocks that hold targets), or
            ``None`` for all. NEAT-S adapts blocks 4-11.
        train_head: also train the classifier head.
        trainable: extra regular expressions over parameter names to keep trainable (e.g. ``norm``).
        path: training forward: ``factored`` (never builds ``dW``), ``fused`` (one matmul with
            ``W0 + dW``, skinny backward), or ``dense`` (reference: autograd through ``dW``).
    """

    targets: str | Sequence[str] = ("q", "v")
    rank: int = 7
    depth: int = 2
    act: str = "relu"
    scale: float = 1.0
    axis: str = "out"
    layers: Sequence[int] | None = None
    train_head: bool = True
    trainable: Sequence[str] = field(default_factory=tuple)
    path: str = field(default="factored", compare=False)  # a runtime setting, not part of the identity

    method: ClassVar[str] = "neat"

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if not isinstance(self.targets, (list, tuple)) or not self.targets:
            _fail("targets", self.targets, "a non-empty string or list of strings")
        if not all(isinstance(t, str) and t for t in self.targets):
            _fail("targets", self.targets, "every target must be a non-empty string")
        self.targets = tuple(self.targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            _fail("rank", self.rank, "an integer >= 1")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 2 or self.depth % 2:
            _fail("depth", self.depth, "an even integer >= 2 (2 = vanilla NEAT: 2, 4, 6, ...)")
        if self.act not in ACTIVATIONS:
            _fail("act", self.act, f"one of {', '.join(ACTIVATIONS)}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or self.scale != self.scale:
            _fail("scale", self.scale, "a finite number")
        self.scale = float(self.scale)
        if self.axis not in AXES:
            _fail("axis", self.axis, f"one of {', '.join(AXES)}")
        if self.layers is not None:
            if isinstance(self.layers, int) and not isinstance(self.layers, bool):
                self.layers = (self.layers,)
            if not isinstance(self.layers, (list, tuple, range)) or not self.layers:
                _fail("layers", self.layers, "None or a non-empty list of block indices")
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers):
                _fail("layers", self.layers, "block indices must be integers >= 0")
            self.layers = tuple(sorted(set(self.layers)))
        if not isinstance(self.train_head, bool):
            _fail("train_head", self.train_head, "True or False")
        if isinstance(self.trainable, str):
            self.trainable = (self.trainable,)
        self.trainable = tuple(self.trainable)
        if self.path not in PATHS:
            _fail("path", self.path, f"one of {', '.join(PATHS)}")

    def make_update(self, out_features: int, in_features: int) -> nn.Module:
        """The update module for one ``(out_features, in_features)`` weight block: a `Tweaker`."""
        return Tweaker(out_features, in_features, self.rank, self.depth, self.act, self.scale, self.axis)


# method name -> config class; other methods (LoRA, FourierFT) register here and share the machinery
CONFIG_TYPES: dict[str, type] = {"neat": NeatConfig}
