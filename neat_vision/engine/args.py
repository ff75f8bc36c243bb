"""``neat-train``'s options (``train.py`` in a checkout), timm style: a YAML ``--config`` (a path, or a shipped
config's name such as ``demo``) sets the argparse defaults, flags override them.

The grammar (``base:`` chains, key spellings, ``neat:`` mappings, suggestions for unknown keys) is the one
every runner shares, in `neat_vision.engine.options`; this module holds the options and their allowed ranges,
and checks the model name and the method's config before anything is built.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import yaml

from neat_vision.engine.method_options import add_method_arguments, parse_time_config
from neat_vision.engine.options import ConfigFileError, did_you_mean, read_values, settle_command_line
from neat_vision.errors import OneLineParser, device_problem_of
from neat_vision.methods import ConfigError

__all__ = ["ConfigFileError", "build_parser", "load_config", "parse_args", "resolved_config"]

AMP_CHOICES = ("none", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "tanh", "step", "multistep", "plateau", "poly", "wsd", "none")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area", "lanczos")
# destinations that are not settable from a YAML file
_NOT_IN_YAML = {"help", "config"}


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


def prog() -> str:
    """The training command's name in messages: ``train.py`` when run as a checkout's script, else ``neat-train``
    (the console script; also ``python -m neat_vision.engine``)."""
    return "train.py" if Path(sys.argv[0]).name == "train.py" else "neat-train"


def build_parser() -> argparse.ArgumentParser:
    """The training script's argument parser (every option can also be set in a YAML config)."""
    p = OneLineParser(
        prog=prog(),
        description="Fine-tune a timm model with NEAT, LoRA or FourierFT (or train the head only, or everything).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "-c", "--config", default=None,
        help="YAML file whose keys (dest names) set the defaults, or a shipped config's name (demo, cifar100, ...)",
    )  # fmt: skip
    bool_flag = argparse.BooleanOptionalAction

    add_method_arguments(p, config_defaults=True)

    g = p.add_argument_group("model")
    g.add_argument("--model", default="vit_base_patch16_224.orig_in21k", help="timm model name[.tag]")
    g.add_argument("--pretrained", action=bool_flag, default=True, help="load the pretrained weights")
    g.add_argument("--pretrained-file", default=None, help="local weights file (timm pretrained_cfg_overlay)")
    g.add_argument("--model-kwargs", type=_mapping, default={}, help="extra create_model kwargs, a YAML mapping")
    g.add_argument("--num-classes", type=int, default=None, help="classes of the head (None: the dataset's)")
    g.add_argument("--head-init", default="timm", choices=["timm", "zero"], help="classifier init: timm's, or zeros")
    g.add_argument("--compile", action=bool_flag, default=False, help="torch.compile the model")
    g.add_argument(
        "--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
        help="timm's spelling: torch.compile with this backend (default inductor); implies compile",
    )  # fmt: skip
    g.add_argument("--drop", type=float, default=None, help="dropout rate of the model (timm drop_rate; None: its own)")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (timm drop_path_rate)")
    g.add_argument("--channels-last", action=bool_flag, default=False, help="channels-last memory format")
    g.add_argument(
        "--grad-checkpointing", action=bool_flag, default=False,
        help="activation checkpointing of the blocks (timm set_grad_checkpointing)",
    )  # fmt: skip

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, help="registered dataset name (neat_vision.data)")
    g.add_argument("--data-dir", default="data", help="dataset root folder")
    g.add_argument("--download", action=bool_flag, default=False, help="let torchvision download the data")
    g.add_argument("--skip-corrupt", action=bool_flag, default=False, help="drop unreadable images")
    g.add_argument(
        "--split-protocol", default=None, choices=["tune", "final"],
        help="vtab1k/fgvc: tune (train800 -> val200) or final (train800val200, report test); None: tune",
    )  # fmt: skip
    g.add_argument(
        "--squash", action=bool_flag, default=False,
        help="evaluate (and with --no-aug train) on the image resized to the input size, no crop (VTAB-1k protocol)",
    )  # fmt: skip
    g.add_argument(
        "--img-size", type=int, default=None, help="input size (None: model_kwargs img_size, else the model's)"
    )
    g.add_argument("--crop-pct", type=float, default=None, help="eval resize = size / crop_pct (None: the model's)")
    g.add_argument(
        "--interpolation", default=None, choices=INTERPOLATIONS, help="resize interpolation (None: the model's)"
    )
    g.add_argument("--mean", type=float, nargs=3, default=None, help="normalisation mean (None: the model's)")
    g.add_argument("--std", type=float, nargs=3, default=None, help="normalisation std (None: the model's)")
    g.add_argument(
        "--crop-scale", "--scale", dest="crop_scale", type=float, nargs=2, default=[0.08, 1.0],
        help="RandomResizedCrop area range (timm --scale)",
    )  # fmt: skip
    g.add_argument("--ratio", type=float, nargs=2, default=[3 / 4, 4 / 3], help="RandomResizedCrop aspect-ratio range")
    g.add_argument("--hflip", type=_probability, default=0.5, help="horizontal flip probability")
    g.add_argument("--vflip", type=_probability, default=0.0, help="vertical flip probability")
    g.add_argument(
        "--color-jitter", type=float, nargs="+", default=None,
        help="brightness/contrast/saturation (one value, or 3-4 with hue); off when aa is set, as in timm",
    )  # fmt: skip
    g.add_argument(
        "--aa", default=None,
        help="timm auto-augment string: rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, v0, trivialaugment, ...",
    )  # fmt: skip
    g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability (timm RandomErasing)")
    g.add_argument("--remode", default="pixel", choices=["pixel", "rand", "const"], help="random erasing fill")
    g.add_argument("--recount", type=int, default=1, help="random erasing: at most this many regions")
    g.add_argument("--no-aug", action=bool_flag, default=False, help="no training augmentation at all (timm)")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (> 0 turns it on)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (> 0 turns it on)")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix when both are on")
    g.add_argument("--mixup-mode", default="batch", choices=["batch", "pair", "elem"], help="how mixup draws")
    g.add_argument("--mixup-off-epoch", type=int, default=0, help="turn mixup/cutmix off from this epoch (0: never)")
    g.add_argument("--save-images", action=bool_flag, default=False, help="write the first augmented batch as a jpg")
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
        "--lr-adapter", "--lr-neat", "--lr", dest="lr_neat", type=float, default=5e-3,
        help="LR of the update parameters of any method (NEAT, LoRA, FourierFT); YAML key lr_adapter, lr_neat or lr",
    )  # fmt: skip
    g.add_argument("--lr-head", type=float, default=5e-3, help="LR of the classifier head")
    g.add_argument("--lr-backbone", type=float, default=None, help="LR of other trainable weights (None: lr_neat)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay")
    g.add_argument("--weight-decay-head", type=float, default=None, help="head weight decay (None: weight_decay)")
    g.add_argument(
        "--opt", default="adamw", help="optimizer, any of timm.optim.list_optimizers() (timm create_optimizer_v2)"
    )
    g.add_argument("--opt-eps", type=float, default=None, help="optimizer epsilon (None: the optimizer's)")
    g.add_argument("--opt-betas", type=float, nargs="+", default=None, help="optimizer betas (None: the optimizer's)")
    g.add_argument("--momentum", type=float, default=0.9, help="momentum of sgd/momentum/rmsprop-like optimizers")
    g.add_argument(
        "--layer-decay", type=float, default=None, help="layer-wise LR decay (timm param_groups_layer_decay)"
    )
    g.add_argument(
        "--sched", default="linear", choices=SCHEDULES,
        help="LR schedule: linear is the paper's (warmup from 0, decay to 0, per step); the rest are timm's",
    )  # fmt: skip
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="warmup length in epochs")
    g.add_argument(
        "--warmup-lr", type=float, default=None, help="LR at the start of warmup (timm schedules; None: timm's 1e-5)"
    )
    g.add_argument("--min-lr", type=float, default=0.0, help="lowest LR of cosine/poly/plateau (timm schedules)")
    g.add_argument("--decay-epochs", type=float, default=90, help="step: epochs between LR decays")
    g.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270], help="multistep: decay epochs")
    g.add_argument("--decay-rate", type=float, default=0.1, help="step/multistep/plateau factor; poly power")
    g.add_argument("--patience-epochs", type=int, default=10, help="plateau: epochs without improvement")
    g.add_argument(
        "--sched-on-updates", action=bool_flag, default=False,
        help="timm schedules: set the LR every optimizer step instead of every epoch",
    )  # fmt: skip
    g.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")
    g.add_argument("--bce-loss", action=bool_flag, default=False, help="binary cross-entropy (timm BinaryCrossEntropy)")
    g.add_argument("--model-ema", action=bool_flag, default=False, help="keep an EMA of the trained weights")
    g.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay")
    g.add_argument("--model-ema-warmup", action=bool_flag, default=False, help="EMA decay warmup (timm ModelEmaV3)")
    g.add_argument("--amp", default="none", choices=AMP_CHOICES, help="mixed precision")
    g.add_argument("--clip-grad", "--max-grad-norm", type=float, default=None, help="max gradient norm")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="None: cuda when available, else cpu")
    g.add_argument("--limit-train-batches", type=int, default=None, help="batches per epoch (smoke runs)")
    g.add_argument("--limit-eval-batches", type=int, default=None, help="batches per evaluation (smoke runs)")
    g.add_argument("--stop-after-steps", type=int, default=None, help="stop like an interruption after N steps")

    g = p.add_argument_group("outputs")
    g.add_argument("--output", default="runs", help="root folder of the runs")
    g.add_argument("--experiment", default=None, help="run folder name (None: <dataset>-<method>-<time>)")
    g.add_argument(
        "--resume", nargs="?", const="auto", default=None,
        help="checkpoint path, or auto (the run folder's last.pth; also --resume alone)",
    )  # fmt: skip
    g.add_argument(
        "--checkpoint-interval", "--checkpoint-steps", type=int, default=100, help="also save last.pth every N steps"
    )
    g.add_argument("--save-full", action=bool_flag, default=False, help="checkpoints include the frozen weights")
    g.add_argument(
        "--eval-every", "--val-interval", dest="eval_every", type=int, default=1,
        help="validate every N epochs (and the last)",
    )  # fmt: skip
    g.add_argument(
        "--checkpoint-hist", type=int, default=1,
        help="keep the N best epochs' checkpoints (checkpoint-<epoch>.pth) beside last.pth and best.pth",
    )  # fmt: skip
    g.add_argument("--log-interval", type=int, default=20, help="optimizer steps between log lines")
    g.add_argument("--tb", action=bool_flag, default=True, help="write TensorBoard logs")
    g.add_argument("--dry-run", action=bool_flag, default=False, help="build everything, print the plan, exit")
    return p


def load_config(
    path: str | Path,
    parser: argparse.ArgumentParser | None = None,
    spellings: dict[str, tuple[Path, str]] | None = None,
) -> dict[str, Any]:
    """The option values a YAML config (with its ``base:`` chain) sets, converted and checked.

    ``spellings`` receives, per option, the file and key that set it (see `read_values`).
    """
    return read_values(path, parser or build_parser(), skip=_NOT_IN_YAML, check=_check_range, spellings=spellings)


def _check_range(dest: str, value: Any) -> str | None:
    """What is allowed for option ``dest`` when ``value`` is out of its range (`RANGES`), else ``None``."""
    if dest in RANGES and not RANGES[dest][0](value):
        return RANGES[dest][1]
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _at_least(low: float, strict: bool = False) -> Callable[[Any], bool]:
    return lambda v: _number(v) and (v > low if strict else v >= low)


_POSITIVE, _NON_NEGATIVE, _COUNT = _at_least(0, strict=True), _at_least(0), _at_least(1)


def _PROBABILITY(v: Any) -> bool:  # noqa: N802
    return _number(v) and 0 <= v <= 1


def _betas(v: Any) -> bool:
    return 1 <= len(v) <= 3 and all(_number(b) and 0 <= b < 1 for b in v)


def _jitter(v: Any) -> bool:
    return len(v) in (1, 3, 4) and all(_number(c) and c >= 0 for c in v)


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
    **{k: (_PROBABILITY, "a probability in [0, 1]") for k in ("vflip", "reprob", "mixup_prob", "mixup_switch_prob")},
    **{k: (_NON_NEGATIVE, "a finite number >= 0 (0: off)") for k in ("mixup", "cutmix")},
    "smoothing": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "drop": (lambda v: _number(v) and 0 <= v < 1, "None or a rate in [0, 1)"),
    "drop_path": (lambda v: _number(v) and 0 <= v < 1, "None or a rate in [0, 1)"),
    "recount": (_COUNT, "an integer >= 1"),
    "model_ema_decay": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "layer_decay": (lambda v: _number(v) and 0 < v <= 1, "None or a number in (0, 1]"),
    "momentum": (_NON_NEGATIVE, "a finite number >= 0"),
    "opt_eps": (_POSITIVE, "None or a finite number > 0"),
    "opt_betas": (
        lambda v: 1 <= len(v) <= 3 and all(_number(b) and 0 <= b < 1 for b in v),
        "None or 1-3 numbers in [0, 1)",
    ),
    **{k: (_NON_NEGATIVE, "a finite number >= 0") for k in ("warmup_lr", "min_lr", "decay_epochs", "decay_rate")},
    **{k: (_NON_NEGATIVE, "an integer >= 0") for k in ("mixup_off_epoch", "patience_epochs")},
    "decay_milestones": (lambda v: all(_number(m) and m >= 1 for m in v), "epochs >= 1"),
    "checkpoint_hist": (_COUNT, "an integer >= 1"),
    "ratio": (lambda v: _number(v[0]) and _number(v[1]) and 0 < v[0] <= v[1], "0 < min <= max"),
    "color_jitter": (
        lambda v: len(v) in (1, 3, 4) and all(_number(c) and c >= 0 for c in v),
        "None, or 1, 3 or 4 numbers >= 0",
    ),
}


def _check_model_name(name: str) -> str | None:
    """Why ``name`` is not a timm model (with the closest names), or ``None`` when it is one."""
    if ":" in name:  # hf-hub:..., local-dir:...: timm resolves these itself
        return None
    architecture = name.split(".", 1)[0]
    if timm.is_model(architecture):
        return None
    hint = did_you_mean(architecture, timm.list_models(), cutoff=0.6) or " (timm.list_models() lists them)"
    return f"model={name!r} is not a timm model{hint}"


def _check_method(args: argparse.Namespace) -> str | None:
    """Build the method's config now and carry it (``args.method_config``), so a bad option fails before anything
    is built. A parameter budget's config needs the model: `neat_vision.engine.model.build_adapter` solves it then
    (the other fields are checked here)."""
    try:
        args.method_config = parse_time_config(args)
    except ConfigError as err:
        return str(err)
    return None


def _check_recipe(args: argparse.Namespace) -> str | None:
    """The timm-recipe options that depend on each other or on timm's registries (cheap: before any data loads)."""
    from timm.optim import list_optimizers

    from neat_vision.data.transforms import check_auto_augment

    known = list_optimizers()
    if args.opt.lower() not in known:
        return f"opt={args.opt!r} is not a timm optimizer{did_you_mean(args.opt.lower(), known) or ''}"
    if args.aa is not None:
        problem = check_auto_augment(args.aa)
        if problem is not None:
            return problem.replace("auto_augment=", "aa=", 1)
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        return (
            f"batch_size={args.batch_size} is odd: mixup={args.mixup:g} / cutmix={args.cutmix:g} pair the samples of "
            "a batch (timm Mixup), so the batch size per process must be even"
        )
    if args.sched == "linear":
        for name, value in (("min_lr", args.min_lr), ("warmup_lr", args.warmup_lr)):
            if value:
                return (
                    f"{name}={value!r} has no effect with sched='linear' (the paper's schedule: warmup from 0, decay "
                    "to 0): choose a timm schedule (cosine, poly with decay_rate=1 for a linear decay, ...)"
                )
    if args.layer_decay is not None:
        return _check_layer_decay(args)
    return None


def _check_layer_decay(args: argparse.Namespace) -> str | None:
    """Whether timm finds more than one layer group in the model (built on the meta device: no weights)."""
    from timm.optim import param_groups_layer_decay

    try:
        with torch.device("meta"):
            model = timm.create_model(args.model, pretrained=False, **args.model_kwargs)
    except Exception:  # the model's own error is reported when it is built
        return None
    groups = param_groups_layer_decay(model, layer_decay=0.5)  # any decay < 1 tells the layers apart
    if len({g["lr_scale"] for g in groups}) < 2:
        return (
            f"layer_decay={args.layer_decay!r}: timm finds no layers (blocks, stages) in {args.model} to decay over "
            "(it has no group_matcher); drop layer_decay"
        )
    return None


def _as_given(
    message: str, parser: argparse.ArgumentParser, argv: Sequence[str], spellings: Mapping[str, tuple[Path, str]]
) -> str:
    """``message`` with each ``option=`` named as given: the flag typed, or the config file's key (and file)."""
    dests = {a.dest for a in parser._actions}
    files: list[Path] = []

    def name(match: re.Match) -> str:
        dest = match[1]
        if dest not in dests:
            return match[0]
        typed = _spelling(parser, dest, argv)
        if typed == dest and dest in spellings:
            where, typed = spellings[dest]
            files.append(where)
        return f"{typed}="

    named = re.sub(r"(?<![\w.-])([a-z][a-z0-9_]*)=", name, message)
    return f"{files[0]}: {named}" if files else named


def _finalize(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    spellings: Mapping[str, tuple[Path, str]] | None = None,
) -> argparse.Namespace:
    spellings = spellings or {}
    settle_command_line(parser, args, argv)
    for name, (ok, allowed) in RANGES.items():
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            parser.error(f"{_spelling(parser, name, argv)}={value!r} is not allowed: {allowed}")
    if args.pretrained_file is not None and not args.pretrained:
        parser.error("pretrained_file is set but pretrained is false: drop one of them")
    if args.torchcompile is not None:
        args.compile = True
    for problem in (
        _check_model_name(args.model),
        device_problem_of(args.device),
        _check_method(args),
        _check_recipe(args),
    ):
        if problem is not None:
            parser.error(_as_given(problem, parser, argv, spellings))
    return args


def _spelling(parser: argparse.ArgumentParser, dest: str, argv: Sequence[str]) -> str:
    """How ``argv`` names option ``dest``: the flag as typed (the last one: it wins), else ``--neat FIELD`` for a
    ``--neat FIELD=VALUE``, else ``dest`` (a config file's value is checked, naming its key, when it is read)."""
    tokens = list(argv[: list(argv).index("--")] if "--" in argv else argv)
    flags = {f for a in parser._actions if a.dest == dest for f in a.option_strings}
    typed = [t.split("=", 1)[0] for t in tokens if t.split("=", 1)[0] in flags]
    if typed:
        return typed[-1]
    if dest.startswith("neat_"):
        field = dest.removeprefix("neat_")
        pairs = zip(tokens, tokens[1:])
        if any(a == "--neat" and b.partition("=")[0].strip() == field for a, b in pairs):
            return f"--neat {field}"
    return dest


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``); a ``--config`` YAML sets the defaults first."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = OneLineParser(prog=prog(), add_help=False)
    pre.add_argument("-c", "--config", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    spellings: dict[str, tuple[Path, str]] = {}
    if known.config is not None:
        try:
            parser.set_defaults(**load_config(known.config, parser, spellings))
        except ConfigFileError as err:
            parser.error(str(err))
    return _finalize(parser.parse_args(argv), parser, argv, spellings)


def resolved_config(args: argparse.Namespace) -> dict[str, Any]:
    """The options that define the run, as a YAML-ready dict that ``--config`` accepts back.

    One-shot controls (``resume``, ``stop_after_steps``, ``dry_run``) are left out, so the file reruns the run.
    """
    skip = _NOT_IN_YAML | {"resume", "stop_after_steps", "dry_run", "method_config"}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k not in skip}
