"""Command line and YAML configs, timm style: a YAML ``--config`` sets the argparse defaults.

YAML keys are the argparse destination names (``lr_neat``, ``neat_depth``); a config may start with
``base: other.yaml`` (a path relative to the file) to inherit that file's values and override some. Unknown
keys fail naming the key and its closest valid names; values are converted and checked as the command line
would (PyYAML reads ``5e-3`` as a string, so types matter). Command-line options override the config.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import yaml

from neat_vision.config import ACTIVATIONS, AXES, PATHS, ConfigError
from neat_vision.engine.model import _baselines, add_method_args, method_choices, neat_config
from neat_vision.errors import OneLineParser, device_problem_of

__all__ = ["ConfigFileError", "build_parser", "load_config", "parse_args", "resolved_config"]

AMP_CHOICES = ("none", "bf16", "fp16")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area", "lanczos")
_KINDS = {"int": "an integer", "float": "a number", "_mapping": "a mapping", "_probability": "a probability"}
# destinations that are not settable from a YAML file
_NOT_IN_YAML = {"help", "config"}


class ConfigFileError(ValueError):
    """A YAML config holds an unknown key, an unreadable value or a broken ``base:`` chain."""


def _mapping(text: str) -> dict[str, Any]:
    value = yaml.safe_load(text) if isinstance(text, str) else text
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{img_size: 32}}', got {text!r}")
    return dict(value)


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The training script's argument parser (every option can also be set in a YAML config)."""
    p = OneLineParser(
        prog="train.py",
        description="Fine-tune a timm model with NEAT (or a baseline method).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("-c", "--config", default=None, help="YAML file whose keys (dest names) set the defaults")
    bool_flag = argparse.BooleanOptionalAction

    g = p.add_argument_group("method")
    g.add_argument("--method", default="neat", choices=method_choices(), help="what to train")
    g.add_argument(
        "--neat-targets", nargs="+", default=["q", "v"], help="aliases (q k v qkv proj fc1 fc2 mlp) or regexes"
    )
    g.add_argument("--neat-rank", type=int, default=7, help="tweaker width r")
    g.add_argument("--neat-depth", type=int, default=2, help="tweaker depth (even; 2 = vanilla NEAT)")
    g.add_argument("--neat-act", default="relu", choices=ACTIVATIONS, help="tweaker activation")
    g.add_argument("--neat-scale", type=float, default=1.0, help="update scaling s")
    g.add_argument("--neat-axis", default="out", choices=AXES, help="side of W0 the tweaker reads")
    g.add_argument("--neat-layers", nargs="+", default=None, help="block indices to adapt (4 5 6, 4-11), or all")
    g.add_argument("--neat-path", default="factored", choices=PATHS, help="training forward path")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_base_patch16_224.orig_in21k", help="timm model name[.tag]")
    g.add_argument("--pretrained", action=bool_flag, default=True, help="load the pretrained weights")
    g.add_argument("--pretrained-file", default=None, help="local weights file (timm pretrained_cfg_overlay)")
    g.add_argument("--model-kwargs", type=_mapping, default={}, help="extra create_model kwargs, a YAML mapping")
    g.add_argument("--num-classes", type=int, default=None, help="classes of the head (None: the dataset's)")
    g.add_argument("--head-init", default="timm", choices=["timm", "zero"], help="classifier init: timm's, or zeros")
    g.add_argument("--compile", action=bool_flag, default=False, help="torch.compile the model")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, help="registered dataset name (neat_vision.data)")
    g.add_argument("--data-dir", default="data", help="dataset root folder")
    g.add_argument("--download", action=bool_flag, default=False, help="let torchvision download the data")
    g.add_argument("--skip-corrupt", action=bool_flag, default=False, help="drop unreadable images")
    g.add_argument(
        "--img-size", type=int, default=None, help="input size (None: model_kwargs img_size, else the model's)"
    )
    g.add_argument("--crop-pct", type=float, default=None, help="eval resize = size / crop_pct (None: the model's)")
    g.add_argument(
        "--interpolation", default=None, choices=INTERPOLATIONS, help="resize interpolation (None: the model's)"
    )
    g.add_argument("--mean", type=float, nargs=3, default=None, help="normalisation mean (None: the model's)")
    g.add_argument("--std", type=float, nargs=3, default=None, help="normalisation std (None: the model's)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=[0.08, 1.0], help="RandomResizedCrop area range")
    g.add_argument("--hflip", type=_probability, default=0.5, help="horizontal flip probability")
    g.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per rank")
    g.add_argument("--fractal-classes", type=int, default=1000, help="dataset fractal: IFS categories")
    g.add_argument("--fractal-instances", type=int, default=1000, help="dataset fractal: instances per category")
    g.add_argument("--fractal-steps", type=int, default=500, help="dataset fractal: training batches per epoch")
    g.add_argument("--fractal-eval-batches", type=int, default=10, help="dataset fractal: val/test batches")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=64, help="per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument(
        "--lr-adapter", "--lr-neat", dest="lr_neat", type=float, default=5e-3,
        help="LR of the update parameters of any method (NEAT, LoRA, FourierFT); YAML key lr_adapter or lr_neat",
    )  # fmt: skip
    g.add_argument("--lr-head", type=float, default=5e-3, help="LR of the classifier head")
    g.add_argument("--lr-backbone", type=float, default=None, help="LR of other trainable weights (None: lr_neat)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    g.add_argument("--weight-decay-head", type=float, default=None, help="head weight decay (None: weight_decay)")
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warmup, then linear decay to 0")
    g.add_argument("--amp", default="none", choices=AMP_CHOICES, help="mixed precision")
    g.add_argument("--clip-grad", type=float, default=None, help="max gradient norm")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="None: cuda when available, else cpu")
    g.add_argument("--limit-train-batches", type=int, default=None, help="batches per epoch (smoke runs)")
    g.add_argument("--limit-eval-batches", type=int, default=None, help="batches per evaluation (smoke runs)")
    g.add_argument("--stop-after-steps", type=int, default=None, help="stop like an interruption after N steps")

    g = p.add_argument_group("outputs")
    g.add_argument("--output", default="runs", help="root folder of the runs")
    g.add_argument("--experiment", default=None, help="run folder name (None: <dataset>-<method>-<time>)")
    g.add_argument("--resume", default=None, help="checkpoint path, or 'auto' (the run folder's last.pth)")
    g.add_argument("--checkpoint-interval", type=int, default=100, help="also save last.pth every N steps")
    g.add_argument("--save-full", action=bool_flag, default=False, help="checkpoints include the frozen weights")
    g.add_argument("--eval-every", type=int, default=1, help="validate every N epochs (and the last)")
    g.add_argument("--log-interval", type=int, default=20, help="optimizer steps between log lines")
    g.add_argument("--tb", action=bool_flag, default=True, help="write TensorBoard logs")
    g.add_argument("--dry-run", action=bool_flag, default=False, help="build everything, print the plan, exit")
    add_method_args(p)
    return p


# method-neutral spellings of option names that predate the other methods
YAML_ALIASES = {"lr_adapter": "lr_neat"}


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in _NOT_IN_YAML}


def _read_chain(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(s) for s in (*seen, path))
        raise ConfigFileError(f"config inheritance loops: {chain}")
    if not path.is_file():
        where = f" (base of {seen[-1]})" if seen else ""
        raise ConfigFileError(f"config file {path} not found{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigFileError(f"{path}: not valid YAML ({problem}{where})") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigFileError(f"{path}: cannot read the config ({err})") from err
    if not isinstance(data, Mapping):
        raise ConfigFileError(f"{path}: a config must be a YAML mapping of option: value, got {type(data).__name__}")
    data = dict(data)
    base = data.pop("base", None)
    if base is None:
        return {key: (value, path) for key, value in data.items()}
    if not isinstance(base, str):
        raise ConfigFileError(f"{path}: base must be a path to another YAML file, got {base!r}")
    merged = _read_chain(path.parent / base, (*seen, path))
    merged.update({key: (value, path) for key, value in data.items()})
    return merged


def _convert(action: argparse.Action, key: str, value: Any, where: Path) -> Any:
    def fail(allowed: str) -> ConfigFileError:
        return ConfigFileError(f"{where}: {key}={value!r} is not allowed: {allowed}")

    if value is None:
        return None
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    items = value if isinstance(value, list) and action.nargs is not None else [value]
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise fail(f"a list of {action.nargs} values")
    kind = _KINDS.get(getattr(action.type, "__name__", ""), "a string")
    out = []
    for item in items:
        if isinstance(item, bool) or (action.type is int and isinstance(item, float) and not item.is_integer()):
            raise fail(kind)
        try:
            out.append(action.type(item) if action.type is not None else str(item))
        except argparse.ArgumentTypeError as err:
            raise fail(str(err)) from err
        except (TypeError, ValueError) as err:
            raise fail(f"{kind} ({err})") from err
    if action.choices is not None and any(v not in action.choices for v in out):
        raise fail(f"one of {', '.join(map(str, action.choices))}")
    value = out if action.nargs is not None else out[0]
    if key in RANGES and not RANGES[key][0](value):
        raise fail(RANGES[key][1])
    return value


def load_config(path: str | Path, parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """The option values a YAML config (with its ``base:`` chain) sets, converted and checked."""
    actions = _actions(parser or build_parser())
    values = {}
    for key, (value, where) in _read_chain(Path(path), ()).items():
        key = YAML_ALIASES.get(key, key)
        if key not in actions:
            close = difflib.get_close_matches(key, list(actions), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigFileError(f"{where}: unknown key {key!r}{hint} (keys are option names with underscores)")
        values[key] = _convert(actions[key], key, value, where)
    return values


def _block_indices(values: list[Any]) -> list[int] | None:
    """``['all']`` -> ``None``; ints and strings like ``4-11`` or ``0,2,4`` -> sorted block indices."""
    tokens = [t for v in values for t in re.split(r"[,\s]+", str(v).strip()) if t]
    if [t.lower() for t in tokens] == ["all"]:
        return None
    out: set[int] = set()
    for token in tokens:
        span = re.fullmatch(r"(\d+)-(\d+)", token)
        if span:
            out.update(range(int(span[1]), int(span[2]) + 1))
        elif token.isdigit():
            out.add(int(token))
        else:
            raise ValueError(token)
    return sorted(out)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _at_least(low: float, strict: bool = False) -> Callable[[Any], bool]:
    return lambda v: _number(v) and (v > low if strict else v >= low)


_POSITIVE, _NON_NEGATIVE, _COUNT = _at_least(0, strict=True), _at_least(0), _at_least(1)
# option -> (check of its value, what is allowed); None passes where the option's default is None
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{k: (_COUNT, "an integer >= 1") for k in ("epochs", "batch_size", "grad_accum", "eval_every", "log_interval")},
    **{k: (_COUNT, "None or an integer >= 1") for k in ("limit_train_batches", "limit_eval_batches")},
    **{k: (_COUNT, "None or an integer >= 1") for k in ("stop_after_steps", "img_size", "num_classes")},
    **{k: (_COUNT, "an integer >= 1") for k in ("fractal_classes", "fractal_instances", "fractal_steps")},
    "fractal_eval_batches": (_COUNT, "an integer >= 1"),
    **{k: (_NON_NEGATIVE, "an integer >= 0") for k in ("workers", "checkpoint_interval", "seed")},
    **{k: (_POSITIVE, "a finite number > 0") for k in ("lr_neat", "lr_head")},
    "lr_backbone": (_POSITIVE, "None (= lr_neat) or a finite number > 0"),
    "weight_decay": (_NON_NEGATIVE, "a finite number >= 0"),
    "weight_decay_head": (_NON_NEGATIVE, "None (= weight_decay) or a finite number >= 0"),
    "warmup_epochs": (_NON_NEGATIVE, "a finite number >= 0"),
    "clip_grad": (_POSITIVE, "None (no clipping) or a finite number > 0"),
    "crop_pct": (_POSITIVE, "None (the model's) or a finite number > 0"),
    "hflip": (lambda v: _number(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    "mean": (lambda v: all(_number(x) for x in v), "None or 3 finite numbers"),
    "std": (lambda v: all(_number(x) and x > 0 for x in v), "None or 3 finite numbers > 0"),
    "crop_scale": (lambda v: _number(v[0]) and _number(v[1]) and 0 < v[0] <= v[1] <= 1, "0 < min <= max <= 1"),
    "lora_rank": (_COUNT, "an integer >= 1"),
    "lora_dropout": (lambda v: _number(v) and 0 <= v < 1, "a probability in [0, 1)"),
    "lora_alpha": (_POSITIVE, "None (= lora_rank) or a finite number > 0"),
    "fourier_n": (_COUNT, "an integer >= 1"),
    "fourier_seed": (_NON_NEGATIVE, "an integer >= 0"),
    "param_budget": (_COUNT, "None or an integer >= 1"),
}


def _check_model_name(name: str) -> str | None:
    """Why ``name`` is not a timm model (with the closest names), or ``None`` when it is one."""
    if ":" in name:  # hf-hub:..., local-dir:...: timm resolves these itself
        return None
    architecture = name.split(".", 1)[0]
    if timm.is_model(architecture):
        return None
    close = difflib.get_close_matches(architecture, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else " (timm.list_models() lists them)"
    return f"model={name!r} is not a timm model{hint}"


def _check_method(args: argparse.Namespace) -> str | None:
    """Build the method's adapter config now, so a bad ``neat_*`` / ``lora_*`` / ``fourier_*`` value fails here."""
    module = _baselines()
    try:
        if module is None:
            if args.method == "neat":
                neat_config(args)
        elif getattr(args, "param_budget", None) is None:  # a budget's config needs the model: built in run()
            module.method_config(args)
    except ConfigError as err:
        return str(err)
    return None


def _finalize(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    args.neat_targets = [t for v in args.neat_targets for t in re.split(r"[,\s]+", v.strip()) if t]
    if args.neat_layers is not None:
        try:
            args.neat_layers = _block_indices(args.neat_layers)
        except ValueError:
            parser.error(f"neat_layers={args.neat_layers!r} is not allowed: block indices (4 5 6, 4-11, 0,2) or all")
    for name, (ok, allowed) in RANGES.items():
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            parser.error(f"{name}={value!r} is not allowed: {allowed}")
    if args.pretrained_file is not None and not args.pretrained:
        parser.error("pretrained_file is set but pretrained is false: drop one of them")
    for problem in (_check_model_name(args.model), device_problem_of(args.device), _check_method(args)):
        if problem is not None:
            parser.error(problem)
    return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``); a ``--config`` YAML sets the defaults first."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = OneLineParser(prog="train.py", add_help=False)
    pre.add_argument("-c", "--config", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    if known.config is not None:
        try:
            parser.set_defaults(**load_config(known.config, parser))
        except ConfigFileError as err:
            parser.error(str(err))
    return _finalize(parser.parse_args(argv), parser)


def resolved_config(args: argparse.Namespace) -> dict[str, Any]:
    """The options that define the run, as a YAML-ready dict that ``--config`` accepts back.

    One-shot controls (``resume``, ``stop_after_steps``, ``dry_run``) are left out, so the file reruns the run.
    """
    skip = _NOT_IN_YAML | {"resume", "stop_after_steps", "dry_run"}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k not in skip}
