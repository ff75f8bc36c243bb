"""Adapters both ways between peft's PEANuT and neat-vision's NEAT.

peft's PEANuT tuner (``peft.PeanutConfig``) is NEAT with the tweaker reading ``W0.T`` (our ``axis="out"``). A peft
adapter folder holds ``adapter_config.json`` (``peft_type: PEANUT``, ``r``, ``depth``, ``act_fn``, ``scaling``,
``target_modules``, ``modules_to_save``) and ``adapter_model.safetensors`` with, per adapted ``nn.Linear``,
``base_model.model.<module>.peanut_A.weight`` ``(r, d_out)``, ``peanut_B.weight`` ``(d_out, r)`` and the
``r x r`` ``peanut_encoders.<i>.weight`` / ``peanut_decoders.<i>.weight``, plus ``base_model.model.<param>`` for
the ``modules_to_save`` (e.g. the classifier head). The correspondence is one to one: ``A``, ``B``, the
encoders and decoders are the same tensors; peft's ``depth`` counts encoder/decoder pairs (peft depth ``k`` =
our depth ``2k + 2``); ``scaling`` is our ``scale``; activations ``relu``, ``gelu``, ``silu``, ``tanh`` and
``linear`` (= our ``identity``).

peft's PEANuT adapts whole ``nn.Linear`` modules only, so a neat-vision adapter with updates on row slices of
a layer (``q``/``v`` of timm's fused ``qkv``), ``axis="in"`` (or ``auto`` choosing it), the ``sin`` activation,
or another method (LoRA, FourierFT) has no peft equivalent: the conversion says so (`PeftConversionError`).

``neat_to_peft`` works on the files alone. ``peft_to_neat`` adapts the plain base model the peft adapter was
trained on (a neat-vision adapter records a fingerprint of its base weights). This module imports neither
timm, transformers nor peft at import time; the command line builds base models with timm or transformers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter import apply_adapter
from ..adapter_files import ADAPTER_WEIGHTS, read_adapter_config, save_adapter
from ..layers import adapted_layers
from ..methods import NeatConfig

__all__ = [
    "PEFT_CONFIG",
    "PEFT_WEIGHTS",
    "PeftConversionError",
    "main",
    "neat_to_peft",
    "peft_to_neat",
    "read_peft_adapter",
]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
PREFIX = "base_model.model."  # peft's key prefix: PeftModel.base_model (the tuner) .model (the user's model)

ACT_TO_PEFT = {"relu": "relu", "gelu": "gelu", "silu": "silu", "tanh": "tanh", "identity": "linear"}
# peft's act_fn is a key of transformers' ACT2FN; these are the ones that compute one of our activations
ACT_FROM_PEFT = {"relu": "relu", "gelu": "gelu", "silu": "silu", "swish": "silu", "tanh": "tanh", "linear": "identity"}
# top-level classifier names (the core's defaults): their tensors go to modules_to_save as that whole module, as
# peft's SEQ_CLS models add "classifier" and "score" themselves (a nested "classifier.dense" would clash)
HEAD_NAMES = ("head", "classifier", "fc", "score")
# the peft task type whose PeftModel subclass fits a transformers model class, by class-name suffix
TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForCausalLM": "CAUSAL_LM",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}

_PAIR = r"(?:encoders|decoders)\.\d+\.weight"
_UPDATE_KEY = re.compile(rf"(?P<layer>.+)\.updates\.(?P<index>\d+)\.(?P<part>A|B|{_PAIR})")
_PEANUT_KEY = re.compile(rf"(?P<layer>.+)\.peanut_(?P<part>A\.weight|B\.weight|{_PAIR})")


class PeftConversionError(ValueError):
    """An adapter that has no equivalent in the other format, or files that are not what they should be."""


def _no_peft_equivalent(adapter: Path, what: str) -> PeftConversionError:
    return PeftConversionError(
        f"adapter {adapter} cannot be expressed in peft's PEANuT: {what}. peft adapts whole nn.Linear modules with "
        "a tweaker over W0.T (axis 'out') and activations relu, gelu, silu, tanh or identity."
    )


def neat_to_peft(adapter: str | Path, output: str | Path) -> Path:
    """Write the peft PEANuT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``) of ``adapter``.

    Raises `PeftConversionError` when the adapter has no peft equivalent (row slices such as q/v of a fused
    ``qkv``, ``axis`` ``in``, the ``sin`` activation, a method other than NEAT, or a trained parameter that
    belongs to the model itself rather than to a submodule).
    """
    from safetensors.torch import load_file, save_file

    adapter = Path(adapter)
    meta = read_adapter_config(adapter)
    if meta["method"] != "neat":
        raise _no_peft_equivalent(adapter, f"method {meta['method']!r} is not NEAT")
    config = NeatConfig.coerce(meta["config"])
    if config.act not in ACT_TO_PEFT:
        raise _no_peft_equivalent(adapter, f"activation {config.act!r}")
    if config.axis == "in":
        raise _no_peft_equivalent(adapter, "axis 'in' (the tweaker reads W0, not W0.T)")
    tensors = load_file(str(adapter / ADAPTER_WEIGHTS))
    shapes = {name: layer["shape"] for name, layer in meta["fingerprint"]["layers"].items()}
    pairs = (config.depth - 2) // 2
    out: dict[str, torch.Tensor] = {}
    saved_modules: set[str] = set()
    layers: dict[str, set[int]] = {}
    for key, tensor in tensors.items():
        match = _UPDATE_KEY.fullmatch(key)
        if match is None:
            module, _, _ = key.rpartition(".")
            if not module:
                raise _no_peft_equivalent(adapter, f"trained tensor {key!r} is a parameter of the model itself")
            head = module.split(".")[0]
            saved_modules.add(head if head in HEAD_NAMES else module)
            out[PREFIX + key] = tensor
            continue
        layer, part = match["layer"], match["part"]
        layers.setdefault(layer, set()).add(int(match["index"]))
        part = f"{part}.weight" if part in ("A", "B") else part
        out[f"{PREFIX}{layer}.peanut_{part}"] = tensor
    for layer, indices in layers.items():
        d_out, d_in = shapes[layer]
        if indices != {0}:
            raise _no_peft_equivalent(
                adapter, f"{layer} has {len(indices)} updates on row slices of its weight (e.g. q and v of a fused qkv)"
            )
        width = tensors[f"{layer}.updates.0.A"].shape[1]
        if width != d_out:
            raise _no_peft_equivalent(
                adapter,
                f"the tweaker of {layer} (weight {d_out} x {d_in}) has width {width}: it updates a row slice of the "
                "layer (such as q or v of a fused qkv) or reads W0 along its input axis (axis 'auto' chose 'in')",
            )
    peft_config = {
        "peft_type": "PEANUT",
        "task_type": _task_type(meta.get("base", {})),
        "base_model_name_or_path": meta.get("base", {}).get("model_name") if _is_hf(meta) else None,
        "revision": None,
        "inference_mode": True,
        "r": config.rank,
        "depth": pairs,
        "act_fn": ACT_TO_PEFT[config.act],
        "scaling": config.scale,
        "target_modules": sorted(layers),
        "exclude_modules": None,
        "modules_to_save": sorted(saved_modules) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "init_weights": True,
    }
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
    (folder / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2))
    return folder


def _is_hf(meta: dict[str, Any]) -> bool:
    return meta.get("base", {}).get("library") == "transformers"


def _task_type(base: dict[str, Any]) -> str | None:
    model_class = base.get("model_class") or ""
    return next((task for suffix, task in TASK_TYPES.items() if model_class.endswith(suffix)), None)


def read_peft_adapter(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and the tensors (prefix ``base_model.model.`` removed) of a peft PEANuT adapter folder."""
    folder = Path(folder)
    config_file = folder / PEFT_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"no peft adapter config at {config_file} (a folder written by save_pretrained)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "PEANUT":
        raise PeftConversionError(
            f"{config_file}: peft_type={config.get('peft_type')!r}; only PEANUT adapters convert to NEAT"
        )
    if (folder / PEFT_WEIGHTS).is_file():
        from safetensors.torch import load_file

        raw = load_file(str(folder / PEFT_WEIGHTS))
    elif (folder / PEFT_WEIGHTS_BIN).is_file():
        raw = torch.load(folder / PEFT_WEIGHTS_BIN, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no {PEFT_WEIGHTS} or {PEFT_WEIGHTS_BIN} in {folder}")
    tensors = {}
    for key, tensor in raw.items():
        if not key.startswith(PREFIX):
            raise PeftConversionError(f"{folder}: tensor {key!r} does not start with {PREFIX!r} (not a peft file?)")
        tensors[key.removeprefix(PREFIX)] = tensor
    return config, tensors


def _exact(name: str) -> str:
    """A target matching the module ``name`` only (a top-level name could be one of our aliases)."""
    escaped = re.escape(name)
    return escaped if "." in name else f"(?:{escaped})"


def peft_to_neat(peft_adapter: str | Path, model: nn.Module, output: str | Path | None = None) -> nn.Module:
    """Adapt the plain base ``model`` in place with the NEAT equivalent of a peft PEANuT adapter; return it.

    With ``output`` the result is also written there as a neat-vision adapter folder (`save_adapter`; it
    records ``model`` as the base, with its weights' fingerprint). The peft adapter's tweakers become NEAT
    tweakers on the same modules (targets are their exact names), its ``modules_to_save`` the trained head.
    """
    config, tensors = read_peft_adapter(peft_adapter)
    act = config.get("act_fn", "relu")
    if act not in ACT_FROM_PEFT:
        raise PeftConversionError(
            f"{peft_adapter}: act_fn={act!r} has no NEAT activation; convertible: {', '.join(ACT_FROM_PEFT)}"
        )
    updates: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _PEANUT_KEY.fullmatch(key)
        if match is not None:
            updates.setdefault(match["layer"], {})[match["part"]] = tensor
        elif ".peanut_" in key:
            raise PeftConversionError(f"{peft_adapter}: tensor {key!r} is no PEANuT weight this converter knows")
        else:
            head[key] = tensor
    if not updates:
        raise PeftConversionError(f"{peft_adapter}: the adapter holds no peanut_A / peanut_B tensors")
    head_modules = sorted({key.rpartition(".")[0] for key in head})
    if any(not module for module in head_modules):
        raise PeftConversionError(f"{peft_adapter}: a saved tensor is a parameter of the model itself: {sorted(head)}")
    neat = NeatConfig(
        targets=[_exact(name) for name in sorted(updates)],
        rank=int(config["r"]),
        depth=2 * int(config.get("depth", 0)) + 2,
        act=ACT_FROM_PEFT[act],
        scale=float(config.get("scaling", 1.0)),
        axis="out",
        train_head=bool(head_modules),
    )
    if type(model).__module__.startswith("transformers."):
        import neat_vision.nlp  # noqa: F401  registers the transformers base description for save_adapter

    apply_adapter(model, neat, head=head_modules or None)
    layers = adapted_layers(model)
    if sorted(layers) != sorted(updates):
        raise PeftConversionError(f"{peft_adapter}: adapted {sorted(layers)[:4]}..., peft names {sorted(updates)[:4]}")
    params = dict(model.named_parameters())
    ours: dict[str, torch.Tensor] = {}
    for name, parts in updates.items():
        for part, tensor in parts.items():
            ours[f"{name}.updates.0.{part.removesuffix('.weight') if part[0] in 'AB' else part}"] = tensor
    ours.update(head)
    expected = {n for n, p in params.items() if p.requires_grad}
    missing = sorted(expected - set(ours))
    if missing:
        raise PeftConversionError(f"{peft_adapter}: no tensor for {missing[:5]} (depth {config.get('depth')})")
    with torch.no_grad():
        for key, tensor in ours.items():
            if key not in params:
                raise PeftConversionError(f"{peft_adapter}: {key} has no parameter in {type(model).__name__}")
            if params[key].shape != tensor.shape:
                raise PeftConversionError(
                    f"{peft_adapter}: {key} has shape {tuple(tensor.shape)}, the model {tuple(params[key].shape)} "
                    "(another base model, or another num_classes?)"
                )
            params[key].copy_(tensor)
    if output is not None:
        save_adapter(model, output)
    return model


def _build_base(name: str, peft_config: dict[str, Any], args: argparse.Namespace) -> nn.Module:
    """The plain base model ``name``: a timm model when timm knows the name, else a transformers one."""
    import timm

    if timm.is_model(name):
        kwargs = dict(args.model_kwargs)
        if args.num_classes is not None:
            kwargs["num_classes"] = args.num_classes
        if args.pretrained_file is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": str(Path(args.pretrained_file).expanduser())}
        return timm.create_model(name, pretrained=True, **kwargs)
    import transformers

    auto = {
        "SEQ_CLS": "AutoModelForSequenceClassification",
        "CAUSAL_LM": "AutoModelForCausalLM",
        "TOKEN_CLS": "AutoModelForTokenClassification",
        "QUESTION_ANS": "AutoModelForQuestionAnswering",
    }.get(peft_config.get("task_type"), "AutoModel")
    kwargs = dict(args.model_kwargs)
    if args.num_classes is not None:
        kwargs["num_labels"] = args.num_classes
    return getattr(transformers, auto).from_pretrained(name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """``to-peft`` and ``from-peft``."""
    import yaml

    def mapping(text: str) -> dict[str, Any]:
        value = yaml.safe_load(text) or {}
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{img_size: 32}}', got {text!r}")
        return value

    p = argparse.ArgumentParser(
        prog="neat-convert",
        description="Convert adapters between peft PEANuT and neat-vision.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    to = sub.add_parser("to-peft", help="neat-vision adapter folder -> peft PEANuT adapter folder (files only)")
    to.add_argument("--adapter", required=True, help="neat-vision adapter folder")
    to.add_argument("--output", required=True, help="peft adapter folder to write")
    back = sub.add_parser("from-peft", help="peft PEANuT adapter folder -> neat-vision adapter folder")
    back.add_argument("--peft", required=True, help="peft adapter folder (adapter_config.json + weights)")
    back.add_argument("--output", required=True, help="neat-vision adapter folder to write")
    back.add_argument("--model", default=None, help="timm name[.tag] or HF name/path (default: peft's base_model)")
    back.add_argument("--num-classes", type=int, default=None, help="classes of the head (timm) / num_labels (HF)")
    back.add_argument("--pretrained-file", default=None, help="local timm weights (pretrained_cfg_overlay file)")
    back.add_argument("--model-kwargs", type=mapping, default={}, help="extra create_model/from_pretrained kwargs")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    """The command; a conversion that has no equivalent, or missing files, exit with one line."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "to-peft":
            folder = neat_to_peft(args.adapter, args.output)
        else:
            config, _ = read_peft_adapter(args.peft)
            name = args.model or config.get("base_model_name_or_path")
            if not name:
                raise ValueError(f"{args.peft} names no base model (base_model_name_or_path): pass --model")
            peft_to_neat(args.peft, _build_base(name, config, args), args.output)
            folder = Path(args.output)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    print(f"wrote {folder}", file=sys.stdout)
    return folder


def cli() -> None:
    """The ``neat-convert`` console script (``python -m neat_vision.integrations.peft``): `main`, then exit status 0."""
    main()


if __name__ == "__main__":
    cli()
