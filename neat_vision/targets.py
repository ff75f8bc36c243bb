"""Target resolution: a target spec -> the ``nn.Linear`` modules to adapt and the row slices of each.

A target is an alias or a regular expression:

- aliases name a module by the end of its name (its last path component, or a regular expression over the
  last components, e.g. ``attention\\.output\\.dense``) and, for fused projections, a chunk of its output
  rows: ``q`` is chunk 0 of 3 of a fused ``qkv`` (or a whole ``q``), ``k``/``v`` are chunks 1/2 of ``qkv``
  or chunks 0/1 of a fused ``kv`` (or a whole ``k``/``v``), ``qkv`` is the fused layer as one block
  (or the separate q/k/v/kv layers), ``proj``/``fc1``/``fc2`` are themselves, ``mlp`` is fc1 + fc2.
  Integrations add their own aliases (e.g. Hugging Face's ``q_proj``) through ``aliases=``.
- anything else is a regular expression matched in full against module names (``blocks\\.0\\.attn\\.qkv``),
  or a plain name matched as a suffix (``query`` matches ``encoder.layer.0.attention.self.query``).

Block indices (``layers=``) count, in model order, the distinct block prefixes of the matched modules: the
module name up to its last numeric component (``blocks.4`` in ``blocks.4.attn.qkv``; in Swin's
``layers.1.blocks.0.attn.qkv`` the prefix ``layers.1.blocks.0`` is the third block).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

# alias -> list of (name ending, chunk index, number of chunks); the ending is a regular expression matched against
# the last components of a module name (``qkv``, ``attention\.output\.dense``); chunk None = the whole layer
AliasTable = Mapping[str, Sequence[tuple[str, int | None, int]]]

DEFAULT_ALIASES: dict[str, tuple[tuple[str, int | None, int], ...]] = {
    "q": (("qkv", 0, 3), ("q", None, 1)),
    "k": (("qkv", 1, 3), ("kv", 0, 2), ("k", None, 1)),
    "v": (("qkv", 2, 3), ("kv", 1, 2), ("v", None, 1)),
    "qkv": (("qkv", None, 1), ("q", None, 1), ("kv", None, 1), ("k", None, 1), ("v", None, 1)),
    "proj": (("proj", None, 1),),
    "fc1": (("fc1", None, 1),),
    "fc2": (("fc2", None, 1),),
    "mlp": (("fc1", None, 1), ("fc2", None, 1)),
}


class TargetError(ValueError):
    """A target spec that matches nothing, or matches overlapping parts of a layer."""


@dataclass(frozen=True)
class Target:
    """One module to adapt: its name, the row slices of its weight, and its block index."""

    name: str
    slices: tuple[tuple[int, int], ...]
    block: int | None


_NUMBER = re.compile(r"\.(\d+)(?=\.|$)")


def _block_prefix(name: str) -> str | None:
    matches = list(_NUMBER.finditer(name))
    return name[: matches[-1].end()] if matches else None


def adaptable_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` by name (already adapted layers count under their name)."""
    from .layers import AdaptedLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, AdaptedLinear)) and n}


def _summarise(names: Sequence[str]) -> str:
    patterns = list(dict.fromkeys(_NUMBER.sub(".*", n) for n in names))
    return ", ".join(patterns)


def resolve_targets(
    model: nn.Module,
    targets: Sequence[str],
    layers: Sequence[int] | None = None,
    aliases: AliasTable | None = None,
) -> list[Target]:
    """Resolve ``targets`` on ``model`` into a list of `Target` (model order).

    Raises `TargetError` when a target matches nothing (listing the adaptable names), when two targets
    overlap on the same rows, or when ``layers`` names a block the model does not have.
    """
    table = dict(DEFAULT_ALIASES)
    table.update(aliases or {})
    modules = adaptable_modules(model)
    rows: dict[str, list[tuple[int, int]]] = {}

    for target in targets:
        found = False
        if target in table:
            for ending, chunk, n_chunks in table[target]:
                ending_pattern = re.compile(rf"(?:.*\.)?(?:{ending})")
                for name, module in modules.items():
                    if not ending_pattern.fullmatch(name):
                        continue
                    out = module.out_features
                    if chunk is None:
                        span = (0, out)
                    elif out % n_chunks:
                        raise TargetError(f"target {target!r}: {name} has {out} outputs, not divisible by {n_chunks}")
                    else:
                        size = out // n_chunks
                        span = (chunk * size, (chunk + 1) * size)
                    rows.setdefault(name, []).append(span)
                    found = True
        else:
            try:
                pattern = re.compile(target)
            except re.error as err:
                msg = f"target {target!r} is neither an alias nor a valid regular expression: {err}"
                raise TargetError(msg) from None
            for name, module in modules.items():
                if pattern.fullmatch(name) or name.endswith("." + target):
                    rows.setdefault(name, []).append((0, module.out_features))
                    found = True
        if not found:
            raise TargetError(
                f"target {target!r} matches no linear layer of {type(model).__name__}. Aliases: "
                f"{', '.join(table)}. Adaptable modules: {_summarise(list(modules))}"
            )

    blocks: dict[str, int] = {}
    for name in modules:
        prefix = _block_prefix(name)
        if name in rows and prefix is not None and prefix not in blocks:
            blocks[prefix] = len(blocks)
    if layers is not None:
        missing = sorted(set(layers) - set(blocks.values()))
        if missing:
            raise TargetError(
                f"NeatConfig.layers={list(layers)} is not allowed: blocks {missing} do not exist; "
                f"the targeted blocks are 0..{len(blocks) - 1}"
            )

    resolved = []
    for name in modules:
        if name not in rows:
            continue
        spans = sorted(set(rows[name]))
        for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
            if b0 < a1:
                raise TargetError(f"targets overlap on {name}: rows [{a0}, {a1}) and [{b0}, {b1})")
        prefix = _block_prefix(name)
        block = blocks.get(prefix) if prefix is not None else None
        if layers is not None and block not in layers:
            continue
        resolved.append(Target(name, tuple(spans), block))
    if not resolved:
        raise TargetError(f"targets {list(targets)} with layers={list(layers or [])} select no module")
    return resolved
