"""Target aliases per Hugging Face model family: what ``q``, ``v``, ``up``, ... mean in each family's module names.

Each preset is an alias table for `neat_vision.resolve_targets`: alias -> ``(name ending, chunk, n_chunks)``
entries, the ending a regular expression over the last components of a module name.

- ``bert`` (BERT, RoBERTa, XLM-R, ELECTRA): ``q``/``k``/``v`` = ``attention.self.query``/``key``/``value``,
  ``o`` = ``attention.output.dense``, ``up`` = ``intermediate.dense``, ``down`` = the block's ``output.dense``
  (not the attention's), ``mlp`` = up + down.
- ``llama`` (LLaMA, Mistral, Qwen2/3, Gemma): ``q``/``k``/``v``/``o`` = ``q_proj``/``k_proj``/``v_proj``/``o_proj``,
  ``gate``/``up``/``down`` = ``gate_proj``/``up_proj``/``down_proj``, ``mlp`` = gate + up + down.

Both add ``qkv`` = q + k + v. Module names work as targets in every family without a preset (``query``,
``q_proj``, or a regular expression).
"""

from __future__ import annotations

from torch import nn

from ..methods import ConfigError
from ..targets import AliasTable


def _whole(*endings: str) -> tuple[tuple[str, None, int], ...]:
    return tuple((ending, None, 1) for ending in endings)


BERT_DOWN = r"\d+\.output\.dense"

PRESETS: dict[str, AliasTable] = {
    "bert": {
        "q": _whole("query"),
        "k": _whole("key"),
        "v": _whole("value"),
        "qkv": _whole("query", "key", "value"),
        "o": _whole(r"attention\.output\.dense"),
        "up": _whole(r"intermediate\.dense"),
        "down": _whole(BERT_DOWN),
        "mlp": _whole(r"intermediate\.dense", BERT_DOWN),
    },
    "llama": {
        "q": _whole("q_proj"),
        "k": _whole("k_proj"),
        "v": _whole("v_proj"),
        "qkv": _whole("q_proj", "k_proj", "v_proj"),
        "o": _whole("o_proj"),
        "gate": _whole("gate_proj"),
        "up": _whole("up_proj"),
        "down": _whole("down_proj"),
        "mlp": _whole("gate_proj", "up_proj", "down_proj"),
    },
}

# transformers ``config.model_type`` -> preset
MODEL_TYPES: dict[str, str] = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "camembert": "bert",
    "electra": "bert",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "llama",
    "gemma2": "llama",
}


def preset_aliases(model: nn.Module, preset: str | None = None) -> AliasTable | None:
    """The alias table ``preset`` names, or when ``None`` the one for ``model.config.model_type`` (``None`` if none)."""
    if preset is None:
        preset = MODEL_TYPES.get(getattr(getattr(model, "config", None), "model_type", None))
        return None if preset is None else PRESETS[preset]
    if preset not in PRESETS:
        raise ConfigError(f"preset={preset!r} is not allowed: one of {', '.join(PRESETS)} (or None to detect)")
    return PRESETS[preset]
