"""NEAT on Hugging Face transformers models: apply with the family's aliases, load adapters, describe the base.

The adapted model stays the same ``PreTrainedModel`` (same class, forward, ``generate``, ``save_pretrained``),
so the HF ``Trainer`` and its launchers train it as they would any model: only the tweakers and the head
require gradients. The head is the core's default: a child named ``classifier`` (BERT/RoBERTa) or ``score``
(LLaMA-class sequence classifiers); a causal LM's ``lm_head`` stays frozen unless named in ``head=``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import transformers
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .. import adapter as core
from ..config import NeatConfig
from .presets import preset_aliases


def apply_neat(
    model: PreTrainedModel,
    config: NeatConfig | Mapping[str, Any],
    preset: str | None = None,
    *,
    head: Sequence[str] | None = None,
) -> PreTrainedModel:
    """Inject NEAT tweakers into a transformers model in place; base frozen, tweakers and head trainable.

    Args:
        model: a transformers model (``RobertaForSequenceClassification``, ``LlamaForCausalLM``, ...).
        config: a `NeatConfig` or a dict of its fields; targets use the preset's aliases (``q``, ``v``, ``up``).
        preset: alias table (``bert`` or ``llama``); ``None`` picks it from ``model.config.model_type``.
        head: modules trained whole when ``config.train_head`` (default: ``classifier`` / ``score``).
    """
    aliases = preset_aliases(model, preset)
    return core.apply_neat(model, config, aliases=aliases, head=None if head is None else list(head))


def load_adapter(
    model_or_name: PreTrainedModel | str | None,
    path: str | os.PathLike,
    *,
    preset: str | None = None,
    check_base: bool = True,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """Load an adapter folder (written by `neat_vision.save_adapter`) onto a transformers model.

    With a model, it is adapted (if plain) with the preset's aliases and the tensors are loaded. With a name
    or path (or ``None``: the name recorded in the adapter), the recorded model class is built with
    ``from_pretrained(name, num_labels=<recorded>, **from_pretrained_kwargs)`` first. The base check then
    confirms the weights are those the adapter was trained on (``check_base=False`` skips it).
    """
    if isinstance(model_or_name, nn.Module):
        model = model_or_name
    else:
        base = core.read_adapter_config(path).get("base", {})
        if base.get("library") != "transformers":
            raise ValueError(f"adapter {path} was not trained on a transformers model (base: {base}); pass the model")
        name = model_or_name or base.get("model_name")
        if not name:
            raise ValueError(f"adapter {path} records no model name or path; pass the model or its name")
        model_class = getattr(transformers, base["model_class"])
        kwargs = {"num_labels": base["num_labels"], **from_pretrained_kwargs}
        model = model_class.from_pretrained(name, **kwargs)
    return core.load_adapter(model, path, check_base=check_base, aliases=preset_aliases(model, preset))


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs: Any) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained``, with a pad token (``unk``, else ``eos``) when the tokenizer has none."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def describe_transformers(model: nn.Module) -> dict[str, Any] | None:
    """The base description recorded in adapter files: library, name or path, class, type, labels."""
    if not isinstance(model, PreTrainedModel):
        return None
    config = model.config
    return {
        "library": "transformers",
        "model_name": config._name_or_path or None,
        "model_class": type(model).__name__,
        "model_type": config.model_type,
        "num_labels": config.num_labels,
    }


def install() -> None:
    """Register `describe_transformers` with the core's adapter files (idempotent)."""
    if describe_transformers not in core.BASE_DESCRIBERS:
        core.BASE_DESCRIBERS.append(describe_transformers)
