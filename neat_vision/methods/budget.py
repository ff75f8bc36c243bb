"""Parameter budgets: how many update parameters a config puts on a model, and the rank that meets a budget."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..targets import AliasTable, matrix_shape, resolve_targets
from .base import AdapterConfig, ConfigError, is_int
from .registry import METHODS, config_class, make_config


def block_shapes(model: nn.Module, config: AdapterConfig, aliases: AliasTable | None = None) -> list[tuple[int, int]]:
    """``(d_out, d_in)`` of every weight block the config adapts on ``model`` (``aliases``: the family's, as in
    `apply_adapter`)."""
    return [
        (stop - start, matrix_shape(model.get_submodule(t.name))[1])
        for t in resolve_targets(model, config.targets, config.layers, aliases)
        for start, stop in t.slices
    ]


def update_param_count(model: nn.Module, config: AdapterConfig, aliases: AliasTable | None = None) -> int:
    """Trainable update parameters ``config`` puts on ``model`` (head excluded), without adapting it."""
    return sum(config.param_count(o, i) for o, i in block_shapes(model, config, aliases))


def rank_for_budget(
    model: nn.Module | Callable[[], nn.Module],
    method: str,
    budget: int,
    *,
    aliases: AliasTable | None = None,
    **fields: Any,
) -> tuple[int, int]:
    """The rank (the method's ``budget_field``: ``n`` for FourierFT) whose update count lands closest to ``budget``.

    ``model`` is a model or a factory of one (only its layer shapes are read); ``fields`` are the other
    config fields (targets, layers, depth, ...); ``aliases`` the model family's target aliases (a transformers
    model's preset, as `apply_adapter` is given). Counts exclude the head. Returns ``(value, real_count)``;
    on a tie the smaller value wins.
    """
    if not is_int(budget) or budget < 1:
        raise ConfigError(f"param_budget={budget!r} is not allowed: an integer >= 1")
    if method not in METHODS:
        raise ConfigError(f"param_budget is not allowed with method={method!r}: only with {', '.join(METHODS)}")
    key = config_class(method).budget_field
    fields.pop(key, None)
    config = make_config(method, **fields)
    if not isinstance(model, nn.Module):
        model = model()
    shapes = block_shapes(model, config, aliases)
    limit = config.budget_limit(shapes)

    def count(value: int) -> int:
        cfg = config.replace(**{key: value})
        return sum(cfg.param_count(o, i) for o, i in shapes)

    hi = 1
    while count(hi) < budget and (limit is None or hi < limit):
        hi = hi * 2 if limit is None else min(hi * 2, limit)
    lo = max(1, hi // 2)
    while lo < hi:  # smallest value whose count reaches the budget (or the limit)
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid) < budget else (lo, mid)
    best = min((v for v in (hi - 1, hi) if v >= 1), key=lambda v: (abs(count(v) - budget), v))
    return best, count(best)
