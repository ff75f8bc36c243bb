"""Build the timm model and make its trainable set for a method; check adapted layers; export the result.

``build_adapter`` applies the method config that `neat_vision.engine.method_options.method_config` built from
the options (any registered method), or sets up ``linear`` (head only) / ``full`` (everything).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from neat_vision.adapter import apply_method, disable_adapter
from neat_vision.adapter_files import save_adapter
from neat_vision.atomic import atomic_write
from neat_vision.batching import batch_tweakers
from neat_vision.engine.method_options import method_config
from neat_vision.layers import adapted_layers
from neat_vision.reach import UnreachedLayerError

__all__ = [
    "UnreachedLayerError",
    "build_adapter",
    "build_model",
    "check_layers_reached",
    "export_trained",
    "record_label_names",
]


def build_model(args: argparse.Namespace, num_classes: int, *, meta: bool = False) -> nn.Module:
    """The plain timm model: pretrained weights (hub or ``pretrained_file``) unless ``meta`` (dry runs)."""
    kwargs = {**args.model_kwargs, "num_classes": num_classes}
    for option, name in (("drop", "drop_rate"), ("drop_path", "drop_path_rate")):  # timm's train.py passes these
        if getattr(args, option, None) is not None:
            kwargs[name] = getattr(args, option)
    if meta:
        with torch.device("meta"):
            return timm.create_model(args.model, pretrained=False, **kwargs)
    if args.pretrained_file is not None:
        file = Path(args.pretrained_file).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"pretrained_file={args.pretrained_file!r}: no such file")
        kwargs["pretrained_cfg_overlay"] = {"file": str(file)}
    model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    if getattr(args, "head_init", "timm") == "zero":
        zero_head(model)
    return model


def zero_head(model: nn.Module) -> None:
    """Set the new classifier's weights and bias to zero (the usual start for transfer; timm's own init of
    some heads, e.g. EfficientNet's uniform(+-1/sqrt(classes)), gives logits in the tens on pretrained features).
    """
    head = model.get_classifier()
    params = list(head.parameters()) if isinstance(head, nn.Module) else []
    if not params:
        raise ValueError(f"head_init='zero': {type(model).__name__} has no classifier parameters (num_classes=0?)")
    with torch.no_grad():
        for p in params:
            p.zero_()


def build_adapter(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """Make ``model``'s trainable set for ``args.method`` in place and return it.

    The method's config is the one `parse_args` built (``args.method_config``); with ``--param-budget`` it is
    solved on ``model`` here. ``linear`` trains the classifier, ``full`` everything.
    """
    config = getattr(args, "method_config", None)
    if config is None:  # a parameter budget (solved on the model), or options that did not come from parse_args
        config = method_config(args, model)
    model = apply_method(model, args.method, config)
    if getattr(args, "grad_checkpointing", False):
        model.set_grad_checkpointing(True)  # timm's blocks recompute in the backward: no batched tweaker pass
        return model
    # train.py runs the model eagerly, under DDP or compiled: the batched tweaker pass is correct in each (it
    # stands aside under compile and sharding); library users opt in themselves
    return batch_tweakers(model) if config is not None else model


def record_label_names(model: nn.Module, names: Sequence[str] | None) -> None:
    """Keep the dataset's class names where timm keeps a model's labels, ``pretrained_cfg["label_names"]``.

    Adapter files record them (``base.label_names``) for predict, evaluate and export; ``None`` changes nothing.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if names is not None and isinstance(cfg, dict):
        model.pretrained_cfg = {**cfg, "label_names": [str(n) for n in names]}


@torch.no_grad()
def check_layers_reached(model: nn.Module, input_size: tuple[int, int, int], device: torch.device | str) -> None:
    """Run one forward and fail naming every adapted layer the forward never calls (before any data loads).

    A model that reads an adapted layer's weight directly bypasses the module and its update would stay at
    zero; the library's own check (`neat_vision.check_reached`) fails at the first training forward, this one
    before the run starts. It runs with the updates disabled (the base forward), so it also works on the
    meta device.
    """
    layers = adapted_layers(model)
    if not layers:
        return
    called: set[str] = set()
    hooks = [
        layer.register_forward_pre_hook(lambda module, inputs, name=name: called.add(name))
        for name, layer in layers.items()
    ]
    was_training = model.training
    try:
        with disable_adapter(model):
            model.eval()(torch.zeros(1, *input_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    missed = [name for name in layers if name not in called]
    if missed:
        raise UnreachedLayerError(
            f"{len(missed)} of {len(layers)} adapted layers are never called by {type(model).__name__}.forward "
            f"(e.g. {', '.join(missed[:4])}): this model reads their weights directly, so the updates would not "
            "train. Pick other targets (e.g. proj, fc1, fc2) or another model family."
        )


def export_trained(model: nn.Module, args: argparse.Namespace, folder: Path) -> Path:
    """Write what the run trained to ``folder``: the adapter (``save_adapter``) for adapter methods.

    ``linear`` writes ``head.safetensors`` (the head; the backbone is the pretrained one) and ``full`` writes
    ``model.safetensors`` (the whole state dict, loadable with ``timm.create_model(..., checkpoint_path=)``),
    each with an ``export.json`` naming the model, method and classes.
    """
    if args.method not in ("linear", "full"):
        return save_adapter(model, folder)
    folder.mkdir(parents=True, exist_ok=True)
    if args.method == "linear":
        file = "head.safetensors"
        tensors = {n: p for n, p in model.named_parameters() if p.requires_grad}
    else:
        file = "model.safetensors"
        tensors = model.state_dict()
    tensors = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
    atomic_write(folder / file, lambda tmp: save_file(tensors, tmp))
    meta = {
        "method": args.method,
        "model": args.model,
        "model_kwargs": args.model_kwargs,
        "num_classes": getattr(model, "num_classes", None),
        "file": file,
    }
    atomic_write(folder / "export.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return folder
