"""Target resolution: a target spec -> the ``nn.Linear`` / ``nn.Conv2d`` modules to adapt and their row slices.

A conv's weight is read as the matrix ``(out_channels, in_channels/groups * kh * kw)``, so its rows are its
output channels. A target is an alias or a regular expression:

- name aliases name a module by the end of its name (its last path component, or a regular expression over the
  last components, e.g. ``attention\\.output\\.dense``) and, for fused projections, a chunk of its output
  rows: ``q`` is chunk 0 of 3 of a fused ``qkv`` (or a whole ``q``), ``k``/``v`` are chunks 1/2 of ``qkv``
  or chunks 0/1 of a fused ``kv`` (or a whole ``k``/``v``), ``qkv`` is the fused layer as one block
  (or the separate q/k/v/kv layers), ``proj``/``fc1``/``fc2`` are themselves, ``mlp`` is fc1 + fc2. They
  match linear layers and pointwise (1x1) convs but never the classifier (it trains whole with ``train_head``),
  so ``mlp`` also takes a conv MLP (ConvNeXt's ``conv_mlp``),
  and the spellings of other families: a layer wrapped with its norm (``qkv.linear``, ``fc1.conv``), LeViT's
  ``mlp.ln1``/``ln2``, Gemma's ``q_proj``/``o_proj``/``gate_proj``/``up_proj``/``down_proj``, SwiftFormer's
  ``to_query``/``to_key``.
  Integrations add their own aliases (e.g. Hugging Face's ``q_proj``) through ``aliases=``.
- kind aliases pick the convs of the blocks by shape: ``conv`` every one, ``pw`` the pointwise (1x1) ones,
  ``dw`` the depthwise ones (``groups == in_channels``). A conv is in a block when it is not a child of the
  model itself (ResNet's ``conv1``, EfficientNet's ``conv_stem``/``conv_head``), not in the stem or head (a
  path component starting with ``stem``, ``conv_stem``, ``patch_embed`` or ``head``) and not the classifier.
- ``default`` is a rule per family: where the model has attention projections, ``q`` + ``v`` + ``mlp``
  (attention and MLP of a transformer; ``qkv`` + ``mlp`` where q and v are not separable, as LeViT's
  per-head fused projection or SwiftFormer's query/key attention); otherwise ``mlp`` + ``pw`` (a CNN's MLPs
  and pointwise convs, those that match); otherwise every linear layer and conv of the blocks. The rule skips
  layers with a single feature on either side (CSATv2's 1-channel spatial attention: a 1 -> 3 projection behind
  a LayerNorm over one feature, which passes no gradient); name them to adapt them.
- anything else is a regular expression matched in full against module names (``blocks\\.0\\.attn\\.qkv``),
  or a plain name matched as a suffix (``query`` matches ``encoder.layer.0.attention.self.query``).

Block indices (``layers=``) count, in model order, the distinct block prefixes of the matched modules: the
module name up to its last numeric component (``blocks.4`` in ``blocks.4.attn.qkv``; in Swin's
``layers.1.blocks.0.attn.qkv`` the prefix ``layers.1.blocks.0`` is the third block).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

# alias -> list of (name ending, chunk index, number of chunks); the ending is a regular expression matched against
# the last components of a module name (``qkv``, ``attention\.output\.dense``); chunk None = the whole layer
AliasTable = Mapping[str, Sequence[tuple[str, int | None, int]]]

_W = r"(?:\.linear|\.conv)?"  # a layer wrapped with its norm (timm's LinearNorm/ConvNorm, Gemma's ClippedLinear)
_Q, _K, _V = (
    (f"(?:q|q_proj|to_query){_W}", None, 1),
    (f"(?:k|k_proj|to_key){_W}", None, 1),
    (f"(?:v|v_proj){_W}", None, 1),
)
_FC1, _FC2 = (
    ((f"fc1{_W}", None, 1), (r"mlp\.ln1\.linear", None, 1)),
    ((f"fc2{_W}", None, 1), (r"mlp\.ln2\.linear", None, 1)),
)
DEFAULT_ALIASES: dict[str, tuple[tuple[str, int | None, int], ...]] = {
    "q": (("qkv", 0, 3), _Q),
    "k": (("qkv", 1, 3), ("kv", 0, 2), _K),
    "v": (("qkv", 2, 3), ("kv", 1, 2), _V),
    "qkv": ((f"qkv{_W}", None, 1), _Q, (f"kv{_W}", None, 1), _K, _V),
    "proj": ((f"(?:proj|o_proj){_W}", None, 1), (r"proj\.ln\.linear", None, 1)),
    "fc1": _FC1,
    "fc2": _FC2,
    "mlp": (*_FC1, *_FC2, (f"(?:gate|up|down)_proj{_W}", None, 1)),
}


def _is_pointwise(m: nn.Module) -> bool:
    return tuple(m.kernel_size) == (1, 1) and m.groups < m.in_channels


def _is_depthwise(m: nn.Module) -> bool:
    return m.groups == m.in_channels > 1


# alias -> which convs of the blocks it takes
KIND_ALIASES: dict[str, Callable[[nn.Conv2d], bool]] = {
    "conv": lambda m: True,
    "pw": _is_pointwise,
    "dw": _is_depthwise,
}
DEFAULT = "default"
DEFAULT_MIN_WIDTH = 2  # the default rule skips layers with one input or one output feature
_STEM_OR_HEAD = re.compile(r"(?:^|\.)(?:stem|conv_stem|patch_embed|head)[^.]*(?:\.|$)")


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


def head_names(model: nn.Module) -> list[str]:
    """Names of the classifier modules (timm's ``get_classifier()``, else a child ``head``/``classifier``/...)."""
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
        return [n for n, m in model.named_modules() if m is head and n]
    names = {"head", "classifier", "fc", "score"}
    return [n for n, _ in model.named_children() if n in names]


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of the weight matrix the updates read: a conv's is ``(out, in/groups * kh * kw)``."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.weight[0].numel()
    return module.out_features, module.in_features


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` and adaptable ``nn.Conv2d`` of ``model`` by name (adapted layers count too).

    A ``nn.Conv2d`` subclass with a forward of its own is adaptable when its `ConvForm` is registered.
    """
    from .conv import conv_form
    from .layers import AdaptedLayer

    return {
        n: m
        for n, m in model.named_modules()
        if n and (isinstance(m, (nn.Linear, AdaptedLayer)) or conv_form(m) is not None)
    }


def _is_conv(module: nn.Module) -> bool:
    from .conv import AdaptedConv2d

    return isinstance(module, (nn.Conv2d, AdaptedConv2d))


def _name_alias_kind(module: nn.Module) -> bool:
    """Name aliases take linear layers and pointwise convs (not a patch embedding named ``proj``)."""
    return not _is_conv(module) or tuple(module.kernel_size) == (1, 1)


def _block_convs(modules: Mapping[str, nn.Module], heads: Sequence[str]) -> dict[str, nn.Module]:
    """The convs inside the blocks: not a child of the model, not in the stem or head, not the classifier."""
    return {
        n: m
        for n, m in modules.items()
        if _is_conv(m) and "." in n and not _STEM_OR_HEAD.search(n) and not _in_head(n, heads)
    }


def _in_head(name: str, heads: Sequence[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in heads)


def default_targets(model: nn.Module, aliases: AliasTable | None = None) -> list[str]:
    """What ``targets="default"`` stands for on ``model`` (the rule in the module docstring)."""
    table = {**DEFAULT_ALIASES, **(aliases or {})}
    wide = {n: m for n, m in adaptable_modules(model).items() if min(matrix_shape(m)) >= DEFAULT_MIN_WIDTH}
    return _default_targets(model, table, wide)


def _default_targets(model: nn.Module, table: AliasTable, modules: Mapping[str, nn.Module]) -> list[str]:
    """The ``default`` rule (module docstring): attention + MLP, else pointwise convs, else every block layer."""

    heads = head_names(model)

    def matches(alias: str) -> bool:
        try:
            return any(_alias_spans(alias, table[alias], modules, heads))
        except TargetError:  # a fused projection whose rows are not q | k | v (GCViT's global kv): not separable
            return False

    mlp = ["mlp"] if matches("mlp") else []
    if matches("q") and matches("v"):
        return ["q", "v", *mlp]
    if matches("qkv"):
        return ["qkv", *mlp]
    convs = _block_convs(modules, heads)
    pointwise = ["pw"] if any(_is_pointwise(m) for m in convs.values()) else []
    if mlp or pointwise:
        return [*mlp, *pointwise]
    in_blocks = [
        n
        for n, m in modules.items()
        if (n in convs if _is_conv(m) else "." in n and not _STEM_OR_HEAD.search(n) and not _in_head(n, heads))
    ]
    return [re.escape(n) for n in in_blocks]


def _alias_spans(
    target: str,
    entries: Sequence[tuple[str, int | None, int]],
    modules: Mapping[str, nn.Module],
    heads: Sequence[str],
) -> list[tuple[str, tuple[int, int]]]:
    """``(module name, row span)`` of every module a name alias takes (never the classifier: it trains whole)."""
    found = []
    for ending, chunk, n_chunks in entries:
        ending_pattern = re.compile(rf"(?:.*\.)?(?:{ending})")
        for name, module in modules.items():
            if not ending_pattern.fullmatch(name) or not _name_alias_kind(module) or _in_head(name, heads):
                continue
            out = matrix_shape(module)[0]
            if chunk is None:
                span = (0, out)
            elif out % n_chunks:
                raise TargetError(f"target {target!r}: {name} has {out} outputs, not divisible by {n_chunks}")
            else:
                size = out // n_chunks
                span = (chunk * size, (chunk + 1) * size)
            found.append((name, span))
    return found


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
    heads = head_names(model)
    rows: dict[str, list[tuple[int, int]]] = {}
    pools = [(t, modules) for t in targets if t != DEFAULT]
    if DEFAULT in targets:
        wide = {n: m for n, m in modules.items() if min(matrix_shape(m)) >= DEFAULT_MIN_WIDTH}
        pools += [(t, wide) for t in _default_targets(model, table, wide)]
        targets = [t for t, _ in pools]

    for target, modules_of_target in pools:
        found = False
        if target in table:
            for name, span in _alias_spans(target, table[target], modules_of_target, heads):
                rows.setdefault(name, []).append(span)
                found = True
        elif target in KIND_ALIASES:
            for name, module in _block_convs(modules_of_target, heads).items():
                if KIND_ALIASES[target](module):
                    rows.setdefault(name, []).append((0, matrix_shape(module)[0]))
                    found = True
        else:
            try:
                pattern = re.compile(target)
            except re.error as err:
                msg = f"target {target!r} is neither an alias nor a valid regular expression: {err}"
                raise TargetError(msg) from None
            for name, module in modules_of_target.items():
                if pattern.fullmatch(name) or name.endswith("." + target):
                    rows.setdefault(name, []).append((0, matrix_shape(module)[0]))
                    found = True
        if not found:
            raise TargetError(
                f"target {target!r} matches no linear or conv layer of {type(model).__name__}. Aliases: "
                f"{', '.join([*table, *KIND_ALIASES, DEFAULT])}. Adaptable modules: {_summarise(list(modules))}"
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
