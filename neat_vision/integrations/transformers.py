"""NEAT on Hugging Face transformers models: apply with the family's aliases, load adapters, describe the base.

The adapted model stays the same ``PreTrainedModel`` (same class, forward, ``generate``, ``save_pretrained``),
so the HF ``Trainer`` and its launchers train it as they would any model: only the tweakers and the head
require gradients. The head is the core's default: a child named ``classifier`` (BERT/RoBERTa) or ``score``
(LLaMA-class sequence classifiers); a causal LM's ``lm_head`` stays frozen unless named in ``head=``.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .. import adapter, adapter_files
from ..layers import adapted_layers
from ..methods import NeatConfig
from .transformers_presets import preset_aliases


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
    return apply_adapter(model, NeatConfig.coerce(config), preset, head=head)


def apply_adapter(
    model: PreTrainedModel, config: Any, preset: str | None = None, *, head: Sequence[str] | None = None
) -> PreTrainedModel:
    """`apply_neat` for any registered method's config (NEAT, LoRA, FourierFT).

    The adapter is recorded in ``model.config.neat_adapter``, so ``save_pretrained`` (and the ``Trainer``'s
    ``save_model``) writes what `from_pretrained` needs to rebuild it; `merge_and_unload` removes the record.
    """
    head = None if head is None else list(head)
    adapter.apply_adapter(model, config, aliases=preset_aliases(model, preset), head=head)
    _record_adapter(model, config, preset, head)
    return model


def _record_adapter(model: PreTrainedModel, config: Any, preset: str | None, head: list[str] | None) -> None:
    model.config.neat_adapter = {
        "format": adapter_files.FORMAT,
        "method": config.method,
        "config": config.identity_dict(),
        "preset": preset,
        "head": head,
    }


_restoring = threading.local()


def from_pretrained(
    path: str | os.PathLike, model_class: type[PreTrainedModel] | None = None, **from_pretrained_kwargs: Any
) -> PreTrainedModel:
    """Reload an adapted model written by ``save_pretrained`` or the ``Trainer`` (base, head and updates).

    ``model_class`` defaults to the class recorded in ``config.json`` (``architectures``); the keyword
    arguments go to its ``from_pretrained`` (``dtype``, ``device_map``, ...). The update tensors stay in
    their saved dtype (fp32), as after `apply_neat`.
    """
    config = transformers.AutoConfig.from_pretrained(path)
    record = getattr(config, "neat_adapter", None)
    if not isinstance(record, Mapping) or record.get("format") != adapter_files.FORMAT:
        raise adapter_files.AdapterMismatchError(
            f"{path} holds no neat-vision adapter (its config.json has no neat_adapter record); "
            "load it with its class's from_pretrained"
        )
    if model_class is None:
        model_class = getattr(transformers, (config.architectures or ["AutoModel"])[0])
    _restoring.active = True
    try:
        model = model_class.from_pretrained(path, **from_pretrained_kwargs)
    finally:
        _restoring.active = False
    adapter_config = adapter_files.config_from_meta(record)
    apply_adapter(model, adapter_config, record.get("preset"), head=record.get("head"))
    saved = _update_tensors(path)
    params = dict(adapter.named_adapter_parameters(model))
    if set(saved) != set(params):
        only_file, only_model = sorted(set(saved) - set(params)), sorted(set(params) - set(saved))
        raise adapter_files.AdapterMismatchError(
            f"{path}: the saved update tensors do not fit the rebuilt adapter "
            f"(only in the files: {only_file[:3]}, only in the model: {only_model[:3]})"
        )
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    return model


def _update_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``*.updates.*`` tensors of a saved model (one ``model.safetensors`` or an index of shards)."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index is not None:
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    tensors = {}
    for shard in shards:
        file = cached_file(path, shard, _raise_exceptions_for_missing_entries=False)
        if file is None:
            raise FileNotFoundError(f"{path}: no {shard} (from_pretrained reads safetensors checkpoints)")
        with safe_open(file, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if ".updates." in k})
    return tensors


def _warn_dropped_updates(model: PreTrainedModel, path: Any) -> None:
    record = getattr(model.config, "neat_adapter", None)
    if isinstance(record, Mapping) and not adapted_layers(model) and not getattr(_restoring, "active", False):
        warnings.warn(
            f"{path} was saved with a neat-vision {record.get('method')} adapter, which "
            f"{type(model).__name__}.from_pretrained does not load: this is the base model. Reload it with "
            f"neat_vision.nlp.from_pretrained({str(path)!r}).",
            UserWarning,
            stacklevel=3,
        )


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
        base = adapter_files.read_adapter_config(path).get("base", {})
        if base.get("library") != "transformers":
            raise ValueError(f"adapter {path} was not trained on a transformers model (base: {base}); pass the model")
        name = model_or_name or base.get("model_name")
        if not name:
            raise ValueError(f"adapter {path} records no model name or path; pass the model or its name")
        model_class = getattr(transformers, base["model_class"])
        kwargs = {"num_labels": base["num_labels"], **from_pretrained_kwargs}
        model = model_class.from_pretrained(name, **kwargs)
    adapter_files.load_adapter(model, path, check_base=check_base, aliases=preset_aliases(model, preset))
    if not hasattr(model.config, "neat_adapter"):
        _record_adapter(model, model.neat_config, preset, None)
    return model


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
    """Register `describe_transformers` with the core's adapter files, and make a plain ``from_pretrained``
    of a saved adapted model warn that it drops the updates (idempotent)."""
    if describe_transformers not in adapter_files.BASE_DESCRIBERS:
        adapter_files.BASE_DESCRIBERS.append(describe_transformers)
    original = PreTrainedModel.from_pretrained.__func__
    if getattr(original, "_neat_vision", False):
        return

    @functools.wraps(original)
    def from_pretrained_checked(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = original(cls, pretrained_model_name_or_path, *args, **kwargs)
        loaded = model[0] if isinstance(model, tuple) else model
        if isinstance(loaded, PreTrainedModel):
            _warn_dropped_updates(loaded, pretrained_model_name_or_path)
        return model

    from_pretrained_checked._neat_vision = True
    PreTrainedModel.from_pretrained = classmethod(from_pretrained_checked)
