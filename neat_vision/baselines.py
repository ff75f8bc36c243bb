"""Baseline methods on the NEAT machinery: LoRA, FourierFT, linear probe, full fine-tuning; parameter budgets.

LoRA and FourierFT are update modules that plug into the adapted layers (`AdaptedLinear`, `AdaptedConv2d`)
through their config's ``make_update``, so they share targets (``q``/``v`` slices of a fused ``qkv`` included),
block selection, merging and adapter files with NEAT. Linear probing and full fine-tuning have no update config.

- LoRA (Hu et al. 2021): ``dW = (alpha / r) * B @ A``, ``A (r, d_in)`` kaiming-uniform, ``B (d_out, r)``
  zeros; optional dropout on the update's input.
- FourierFT (Gao et al. 2024): ``n`` trainable spectral coefficients at random frequency locations
  (fixed by a seed, the same for every weight block of the same shape);
  ``dW = alpha * real(ifft2(S))`` where ``S (d_out, d_in)`` holds the coefficients, zeros elsewhere.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .adapter import apply_adapter
from .config import CONFIG_TYPES, PATHS, ConfigError, ConfigMethods, NeatConfig
from .targets import head_names, matrix_shape, resolve_targets
from .tweaker import tweaker_param_count

METHODS = ("neat", "lora", "fourierft", "linear", "full")
# the config field a parameter budget sets, per method with an update
BUDGET_FIELDS = {"neat": "rank", "lora": "rank", "fourierft": "n"}


def _fail(config: Any, name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{type(config).__name__}.{name}={value!r} is not allowed: {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(kw_only=True)
class _UpdateConfig(ConfigMethods):
    """Fields every update method shares with `NeatConfig`: what to adapt and what else trains."""

    targets: str | Sequence[str] = ("q", "v")
    layers: Sequence[int] | None = None
    train_head: bool = True
    trainable: Sequence[str] = field(default_factory=tuple)
    path: str = field(default="factored", compare=False)  # a runtime setting, not part of the identity

    method: ClassVar[str]

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if not isinstance(self.targets, (list, tuple)) or not self.targets:
            _fail(self, "targets", self.targets, "a non-empty string or list of strings")
        if not all(isinstance(t, str) and t for t in self.targets):
            _fail(self, "targets", self.targets, "every target must be a non-empty string")
        self.targets = tuple(self.targets)
        if self.layers is not None:
            if _is_int(self.layers):
                self.layers = (self.layers,)
            if not isinstance(self.layers, (list, tuple, range)) or not self.layers:
                _fail(self, "layers", self.layers, "None or a non-empty list of block indices")
            if not all(_is_int(i) and i >= 0 for i in self.layers):
                _fail(self, "layers", self.layers, "block indices must be integers >= 0")
            self.layers = tuple(sorted(set(self.layers)))
        if not isinstance(self.train_head, bool):
            _fail(self, "train_head", self.train_head, "True or False")
        if isinstance(self.trainable, str):
            self.trainable = (self.trainable,)
        self.trainable = tuple(self.trainable)
        if self.path not in PATHS:
            _fail(self, "path", self.path, f"one of {', '.join(PATHS)}")


class LoraUpdate(nn.Module):
    """LoRA's update of one ``(out_features, in_features)`` block: ``dW = (alpha / r) * B @ A``."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features
        self.rank = rank
        self.scaling = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        self.input_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A kaiming-uniform (``nn.Linear``'s default, as peft), B zeros: ``dW = 0``."""
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)

    def factors(self, w0: Tensor) -> tuple[Tensor, Tensor]:
        """``(scaling * B (d_out, r), A (r, d_in))``; LoRA ignores ``w0``."""
        return self.scaling * self.B, self.A

    def delta_weight(self, w0: Tensor) -> Tensor:
        """The dense update ``dW (d_out, d_in)``."""
        left, right = self.factors(w0)
        return left @ right

    def extra_repr(self) -> str:
        return f"out={self.out_features}, in={self.in_features}, rank={self.rank}, scaling={self.scaling:g}"


def fourier_indices(out_features: int, in_features: int, n: int, seed: int) -> Tensor:
    """``(2, n)`` row and column of the ``n`` spectral entries: peft's FourierFT draw for this shape and seed."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // in_features, flat % in_features])


class FourierUpdate(nn.Module):
    """FourierFT's update of one block: ``dW = alpha * real(ifft2(S))``, ``S`` zeros but ``n`` coefficients.

    Dense only (no ``factors``). The coefficients start at zero (``dW = 0``); peft's ``init_weights=False``
    default draws them from N(0, 1) instead.
    """

    def __init__(self, out_features: int, in_features: int, n: int, alpha: float, seed: int) -> None:
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features
        self.n = n
        self.alpha = alpha
        self.seed = seed
        self.register_buffer("indices", fourier_indices(out_features, in_features, n, seed), persistent=False)
        self.spectrum = nn.Parameter(torch.zeros(n))

    def delta_weight(self, w0: Tensor) -> Tensor:
        """``dW (d_out, d_in)`` in fp32 (``ifft2`` is not defined for half types); FourierFT ignores ``w0``."""
        with torch.autocast(device_type=self.spectrum.device.type, enabled=False):
            dense = self.spectrum.new_zeros((self.out_features, self.in_features), dtype=torch.float32)
            dense = dense.index_put((self.indices[0], self.indices[1]), self.spectrum.float())
            return torch.fft.ifft2(dense).real * self.alpha

    def extra_repr(self) -> str:
        return f"out={self.out_features}, in={self.in_features}, n={self.n}, alpha={self.alpha:g}, seed={self.seed}"


@dataclass(kw_only=True)
class LoraConfig(_UpdateConfig):
    """LoRA on the same targets as NEAT.

    Args:
        rank: rank ``r`` of ``B @ A``.
        alpha: scaling numerator (``dW = alpha / r * B @ A``); ``None`` = ``rank`` (scaling 1 at every rank).
        dropout: dropout probability on the update's input in training (``0`` = none).
        targets, layers, train_head, trainable, path: as in `NeatConfig`.
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0

    method: ClassVar[str] = "lora"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_int(self.rank) or self.rank < 1:
            _fail(self, "rank", self.rank, "an integer >= 1")
        if self.alpha is not None:
            if not _is_number(self.alpha) or self.alpha <= 0:
                _fail(self, "alpha", self.alpha, "None (= rank) or a finite number > 0")
            self.alpha = float(self.alpha)
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            _fail(self, "dropout", self.dropout, "a probability in [0, 1)")
        self.dropout = float(self.dropout)

    def make_update(self, out_features: int, in_features: int) -> nn.Module:
        """The update module for one ``(out_features, in_features)`` block: a `LoraUpdate`."""
        alpha = float(self.rank) if self.alpha is None else self.alpha
        return LoraUpdate(out_features, in_features, self.rank, alpha, self.dropout)

    def param_count(self, out_features: int, in_features: int) -> int:
        """Trainable parameters of one block's update: ``r * (d_out + d_in)``."""
        return self.rank * (out_features + in_features)


@dataclass(kw_only=True)
class FourierConfig(_UpdateConfig):
    """FourierFT on the same targets as NEAT.

    Args:
        n: spectral coefficients per weight block (FourierFT's ``n_frequency``); at most ``d_out * d_in``.
        alpha: scaling of ``dW`` (FourierFT's ``scaling``: 300 for ViT-B/L in its paper).
        seed: seed of the frequency locations (peft's ``random_loc_seed``).
        targets, layers, train_head, trainable: as in `NeatConfig`. ``path`` is accepted for a uniform
            interface; FourierFT has no factors, so its layers always take the dense path.
    """

    n: int = 1000
    alpha: float = 300.0
    seed: int = 777

    method: ClassVar[str] = "fourierft"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _is_int(self.n) or self.n < 1:
            _fail(self, "n", self.n, "an integer >= 1")
        if not _is_number(self.alpha):
            _fail(self, "alpha", self.alpha, "a finite number")
        self.alpha = float(self.alpha)
        if not _is_int(self.seed):
            _fail(self, "seed", self.seed, "an integer")

    def make_update(self, out_features: int, in_features: int) -> nn.Module:
        """The update module for one ``(out_features, in_features)`` block: a `FourierUpdate`."""
        if self.n > out_features * in_features:
            _fail(self, "n", self.n, f"at most {out_features * in_features} for a {out_features}x{in_features} block")
        return FourierUpdate(out_features, in_features, self.n, self.alpha, self.seed)

    def param_count(self, out_features: int, in_features: int) -> int:
        """Trainable parameters of one block's update: ``n``."""
        return self.n


CONFIG_TYPES.update({LoraConfig.method: LoraConfig, FourierConfig.method: FourierConfig})


def _block_count(config: Any, out_features: int, in_features: int) -> int:
    if isinstance(config, NeatConfig):
        return tweaker_param_count(out_features, in_features, config.rank, config.depth, config.axis)
    return config.param_count(out_features, in_features)


def _block_shapes(model: nn.Module, config: Any) -> list[tuple[int, int]]:
    """``(d_out, d_in)`` of every weight block the config adapts on ``model``."""
    return [
        (stop - start, matrix_shape(model.get_submodule(t.name))[1])
        for t in resolve_targets(model, config.targets, config.layers)
        for start, stop in t.slices
    ]


def update_param_count(model: nn.Module, config: Any) -> int:
    """Trainable update parameters ``config`` puts on ``model`` (head excluded), without adapting it."""
    return sum(_block_count(config, o, i) for o, i in _block_shapes(model, config))


def make_config(method: str, **fields: Any) -> Any:
    """The validated config of an update method (``neat``, ``lora``, ``fourierft``) from its fields."""
    if method not in BUDGET_FIELDS:
        raise ConfigError(f"method={method!r} has no update config: one of {', '.join(BUDGET_FIELDS)}")
    return CONFIG_TYPES[method].coerce(fields)


def rank_for_budget(
    model: nn.Module | Callable[[], nn.Module], method: str, budget: int, **fields: Any
) -> tuple[int, int]:
    """The rank (``n`` for FourierFT) whose update parameter count lands closest to ``budget``.

    ``model`` is a model or a factory of one (only its layer shapes are read); ``fields`` are the other
    config fields (targets, layers, depth, ...). Counts exclude the head. Returns ``(value, real_count)``;
    on a tie the smaller value wins.
    """
    if not _is_int(budget) or budget < 1:
        raise ConfigError(f"param_budget={budget!r} is not allowed: an integer >= 1")
    key = BUDGET_FIELDS.get(method)
    if key is None:
        raise ConfigError(f"param_budget is not allowed with method={method!r}: only with {', '.join(BUDGET_FIELDS)}")
    fields.pop(key, None)
    config = make_config(method, **fields)
    if not isinstance(model, nn.Module):
        model = model()
    shapes = _block_shapes(model, config)
    limit = min(o * i for o, i in shapes) if method == "fourierft" else None

    def count(value: int) -> int:
        cfg = config.replace(**{key: value})
        return sum(_block_count(cfg, o, i) for o, i in shapes)

    hi = 1
    while count(hi) < budget and (limit is None or hi < limit):
        hi = hi * 2 if limit is None else min(hi * 2, limit)
    lo = max(1, hi // 2)
    while lo < hi:  # smallest value whose count reaches the budget (or the limit)
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid) < budget else (lo, mid)
    best = min((v for v in (hi - 1, hi) if v >= 1), key=lambda v: (abs(count(v) - budget), v))
    return best, count(best)


def prepare_model(model: nn.Module, method: str, config: Any = None) -> nn.Module:
    """Set up ``model`` in place for ``method``: adapt it (``config``), head only (``linear``) or all (``full``)."""
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not allowed: one of {', '.join(METHODS)}")
    if method in BUDGET_FIELDS:
        if config is None or config.method != method:
            raise ConfigError(f"method={method!r} needs its config, got {config!r}")
        return apply_adapter(model, config)
    if config is not None:
        raise ConfigError(f"method={method!r} takes no adapter config, got {config!r}")
    model.requires_grad_(method == "full")
    if method == "linear":
        for name in head_names(model):
            model.get_submodule(name).requires_grad_(True)
    return model


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """Add the baselines' options (LoRA, FourierFT, ``--param-budget``) to a training parser."""
    group = parser.add_argument_group("baselines (--method lora | fourierft | linear | full)")
    group.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r (default 8)")
    group.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha; scaling alpha/r (default: r)")
    group.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on LoRA's input (default 0)")
    group.add_argument("--fourier-n", type=int, default=1000, help="FourierFT coefficients per block (default 1000)")
    group.add_argument("--fourier-alpha", type=float, default=300.0, help="FourierFT scaling (default 300)")
    group.add_argument("--fourier-seed", type=int, default=777, help="FourierFT frequency-location seed (default 777)")
    group.add_argument(
        "--param-budget",
        type=int,
        default=None,
        help="choose the rank (n for FourierFT) whose update parameter count (head excluded) is closest to this",
    )


def _split_targets(value: Any) -> Any:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in re.split(r"[,\s]+", str(item).strip()) if t]
    return value


def _parse_layers(value: Any) -> Any:
    """``None``, ints, or strings like ``"4-11"`` / ``"0,2,4"`` -> a list of block indices."""
    if value is None or _is_int(value):
        return value
    items = value if isinstance(value, (list, tuple, range)) else [value]
    out: list[Any] = []
    for item in items:
        if not isinstance(item, str):
            out.append(item)
            continue
        for part in filter(None, re.split(r"[,\s]+", item.strip())):
            span = re.fullmatch(r"(\d+)-(\d+)", part)
            out.extend(range(int(span[1]), int(span[2]) + 1) if span else [int(part) if part.isdigit() else part])
    return out


_SHARED_OPTIONS = {"targets": "neat_targets", "layers": "neat_layers", "path": "neat_path"}
# config field -> training option (argparse dest), per method
OPTIONS = {
    "neat": {**_SHARED_OPTIONS, **{k: f"neat_{k}" for k in ("rank", "depth", "act", "scale", "axis")}},
    "lora": {**_SHARED_OPTIONS, **{k: f"lora_{k}" for k in ("rank", "alpha", "dropout")}},
    "fourierft": {**_SHARED_OPTIONS, **{k: f"fourier_{k}" for k in ("n", "alpha", "seed")}},
}


def _fields_from_args(args: argparse.Namespace, method: str) -> dict[str, Any]:
    fields = {field: getattr(args, option, None) for field, option in OPTIONS[method].items()}
    fields["targets"] = _split_targets(fields["targets"])
    fields["layers"] = _parse_layers(fields["layers"])
    return {k: v for k, v in fields.items() if v is not None}  # unset: the config's default


def method_config(args: argparse.Namespace, model: nn.Module | None = None) -> Any:
    """The adapter config for ``args.method`` (``None`` for ``linear`` and ``full``) from parsed options.

    NEAT reads ``neat_*``; LoRA and FourierFT read their own options and share ``neat_targets``,
    ``neat_layers`` and ``neat_path``. With ``args.param_budget`` the rank (``n``) is solved on ``model``
    (required then) by `rank_for_budget` and the real update parameter count is printed.
    """
    method = getattr(args, "method", "neat") or "neat"
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is not allowed: one of {', '.join(METHODS)}")
    budget = getattr(args, "param_budget", None)
    if method not in BUDGET_FIELDS:
        if budget is not None:
            raise ConfigError(f"param_budget={budget} is not allowed with method={method!r}: it has no update")
        return None
    fields = _fields_from_args(args, method)
    key = BUDGET_FIELDS[method]
    try:
        if budget is None:
            return make_config(method, **fields)
        if model is None:
            raise ConfigError(f"param_budget={budget} needs the model to count on: pass method_config(args, model)")
        value, count = rank_for_budget(model, method, budget, **fields)
        config = make_config(method, **{**fields, key: value})
    except ConfigError as err:  # name the training options, not the config fields
        cls = CONFIG_TYPES[method].__name__
        raise ConfigError(re.sub(rf"\b{cls}\.(\w+)", lambda m: OPTIONS[method].get(m[1], m[0]), str(err))) from err
    print(f"param budget {budget}: {OPTIONS[method][key]}={value} gives {count} update parameters (head excluded)")
    return config
