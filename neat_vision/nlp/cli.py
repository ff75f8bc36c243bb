"""Command-line settings of the GLUE and instruction runners, in the grammar of every runner.

A YAML ``--config`` (with ``base:`` chains) sets the defaults, flags override them; keys are the flags' names
with underscores (``batch_size`` for ``--batch-size``); the NEAT fields are ``neat: {rank: 8}``, ``neat_rank``,
``--neat-rank 8`` or ``--neat rank=8`` (`neat_vision.engine.options`). Unknown keys fail with the closest names.

``--method`` picks what trains, with train.py's option names (`neat_vision.engine.method_options`): ``neat``,
``lora`` (``--lora-rank/--lora-alpha/--lora-dropout``), ``fourierft`` (``--fourier-n/--fourier-alpha/--fourier-seed``),
all three on the shared ``--neat-targets/--neat-layers`` (and YAML ``neat_train_head``, ``neat_trainable``), or
``full`` (every weight) and, on the GLUE runner, ``linear`` (the classifier head only). `parse_args` builds the
method's config once and carries it in ``args.method_config`` (``--param-budget``: solved on the model by
`method_config_for`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.distributed import DistEnv, broadcast_object, setup_distributed
from ..engine.method_options import (
    add_method_arguments,
    all_method_options,
    method_config,
    method_fields,
    parse_time_config,
)
from ..engine.options import ConfigFileError, read_values, settle_command_line
from ..engine.progress import log_to_stdout
from ..errors import USER_ERRORS, OneLineParser, device_problem_of, exit_code
from ..integrations.transformers_presets import preset_aliases
from ..methods import METHODS, AdapterConfig, ConfigError, method_names
from ..run_lock import shared_folder_lock

DTYPES = {"fp32": None, "bf16": torch.bfloat16}

# settings that must be positive integers when given
COUNTS = ("epochs", "batch_size", "micro_batch_size", "eval_batch_size", "max_length", "cutoff_len", "num_beams")
COUNTS += ("eval_limit", "max_new_tokens")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# setting -> (check of its value when given, what is allowed)
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "head_lr": (lambda v: _number(v) and v > 0, "a finite number > 0 (default: --lr)"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "a finite number >= 0"),
    "max_grad_norm": (lambda v: _number(v) and v >= 0, "a finite number >= 0 (0: no clipping)"),
    "warmup_ratio": (lambda v: _number(v) and 0 <= v <= 1, "a fraction in [0, 1]"),
    **{k: (lambda v: _integer(v) and v >= 0, "an integer >= 0") for k in ("warmup_steps", "val_size", "seed")},
    "checkpoint_steps": (lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: only at epoch ends)"),
    "param_budget": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
}

# settings that do not change a run's training (a resumed run may differ in these)
NOT_TRAINING = {"config", "resume", "device", "output", "checkpoint_steps", "eval_batch_size", "eval_dir", "eval_sets"}
# fsdp: the same sums and the same checkpoint format as DDP, so either may resume the other
NOT_TRAINING |= {"eval_limit", "max_new_tokens", "num_beams", "eval_only", "adapter", "fsdp"}
# what run_config records in its own way (the config object is built from the others)
_METHOD_KEYS = {"method", "method_config", "param_budget"}


def _amp(text: str) -> str:
    """``--amp`` / ``--dtype``: train.py's ``none`` is ``fp32``; fp16 (with a GradScaler) is train.py's only."""
    value = {"none": "fp32"}.get(text, text)
    if value == "fp16":
        raise argparse.ArgumentTypeError("fp16 is train.py's only (it needs a GradScaler): bf16 or none (fp32)")
    if value not in DTYPES:
        raise argparse.ArgumentTypeError("one of fp32, bf16 (as --amp: none, bf16)")
    return value


def _resume(text: str) -> str:
    if text != "auto":
        raise argparse.ArgumentTypeError(
            f"{text!r}: these runners continue the run in --output (--resume or --resume auto)"
        )
    return text


def add_common_arguments(parser: argparse.ArgumentParser, methods: Sequence[str] | None = None) -> None:
    """Flags every runner has: config, model, output, the method and its fields, optimisation and checkpointing.

    Their names are train.py's where they mean the same thing (``--method``, ``--neat-rank``, ``--lora-rank``,
    ``--param-budget``, ``--lr-adapter``, ``--amp``, ``--resume auto``, ``--experiment``, ``--clip-grad``,
    ``--checkpoint-interval``), with the older spellings kept. ``methods``: the ``--method`` choices (default: all).
    """
    parser.add_argument(
        "--config", help="YAML file whose keys set the defaults of these flags, or a shipped config's name (glue/...)"
    )
    parser.add_argument("--model", help="transformers model name or local folder (from_pretrained)")
    parser.add_argument("--tokenizer", help="tokenizer name or folder (default: --model)")
    parser.add_argument("--output", help="run folder: checkpoint.pt, best/ and last/ adapters, summary.csv, tb/")
    parser.add_argument("--experiment", help="run folder name under --output (default: --output is the run folder)")
    parser.add_argument(
        "--resume", nargs="?", const="auto", type=_resume, help="continue the run in --output from checkpoint.pt"
    )
    add_method_arguments(parser, config_defaults=False, methods=list(methods or method_names()))
    parser.add_argument(
        "--lr", "--lr-adapter", "--lr-neat", type=float,
        help="learning rate of the update parameters (NEAT, LoRA, FourierFT), or of the weights with --method full",
    )  # fmt: skip
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, help="examples per optimizer step (all processes together)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--max-grad-norm", "--clip-grad", type=float, default=0.0, help="gradient clipping (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype", "--amp", type=_amp, default="fp32", metavar="{fp32,bf16,none}",
        help="bf16: bf16 base weights and autocast; none = fp32",
    )  # fmt: skip
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--checkpoint-steps", "--checkpoint-interval", type=int, default=500,
        help="also checkpoint every N steps (0: off)",
    )  # fmt: skip


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, required: Sequence[str]
) -> argparse.Namespace:
    """Parse ``argv`` with ``--config`` defaults (`neat_vision.engine.options`: the grammar of every runner).

    Fails on unknown YAML keys, on values out of range and on missing ``required`` settings. The method's options
    become ``args.method_config`` (`neat_vision.engine.method_options.parse_time_config`: the validated config;
    ``None`` for ``linear`` / ``full``, and with ``--param-budget`` until `method_config_for` solves it on the
    model).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = OneLineParser(prog=parser.prog, add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            parser.set_defaults(**read_values(known.config, parser, skip={"resume"}))
        except ConfigFileError as err:
            parser.error(str(err))
    args = parser.parse_args(argv)
    settle_command_line(parser, args, argv)
    if args.experiment is not None:
        if args.output is None:
            parser.error("--experiment needs --output: the folder that holds the run folders")
        args.output = str(Path(args.output) / args.experiment)
    del args.experiment
    missing = [name for name in required if getattr(args, name) is None]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        parser.error(f"missing setting(s) {flags}: give them as flags or in the --config file")
    for name in COUNTS:
        value = getattr(args, name, None)
        if value is not None and (not _integer(value) or value < 1):
            parser.error(f"--{name.replace('_', '-')}={value!r} is not allowed: an integer >= 1")
    for name, (ok, allowed) in RANGES.items():
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            parser.error(f"--{name.replace('_', '-')}={value!r} is not allowed: {allowed}")
    try:
        args.method_config = parse_time_config(args)
    except ConfigError as err:
        parser.error(str(err))
    device_problem = device_problem_of(args.device)
    if device_problem:
        parser.error(device_problem)
    return args


def method_config_for(args: argparse.Namespace, model: nn.Module) -> AdapterConfig | None:
    """The run's method config: the one `parse_args` built, or the ``--param-budget`` one solved on ``model`` with
    its family's target aliases (then carried in ``args.method_config`` too); ``None`` for ``linear`` and ``full``."""
    if args.method_config is None and args.method in METHODS:
        args.method_config = method_config(args, model, aliases=preset_aliases(model))
    return args.method_config


def _output_lock(args: argparse.Namespace, env: DistEnv) -> contextlib.AbstractContextManager:
    """The lock of ``--output`` for the run (rank 0 holds it); none when the path is blocked by a file (the run
    reports that itself, in its own words)."""
    out = Path(args.output)
    existing = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        return contextlib.nullcontext()
    return shared_folder_lock(out, "run", env.is_main, lambda obj: broadcast_object(obj, env))


def run_main(
    run: Callable[[argparse.Namespace, DistEnv], dict[str, Any]], args: argparse.Namespace
) -> tuple[int, dict[str, Any] | None]:
    """A runner's ``main`` around ``run(args, env)``: log lines, the torchrun process group, one-line errors.

    Returns the exit status and the results (``None`` when it failed, and on ranks other than 0).
    """
    log_to_stdout()
    env = None
    try:
        env = setup_distributed(args.device)
        with _output_lock(args, env):
            results = run(args, env)
    except USER_ERRORS as err:
        return exit_code(err), None
    finally:
        if env is not None:
            env.close()
    return 0, results if env.is_main else None


def load_pretrained(load: Callable[..., Any], name: str, *args: Any, **kwargs: Any) -> Any:
    """``load(name, ...)`` (a ``from_pretrained``), with a folder or hub name that cannot be loaded said in one line."""
    try:
        return load(name, *args, **kwargs)
    except (OSError, ValueError) as err:  # a missing folder; a name that is neither a folder nor a hub id
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"--model / --tokenizer {name!r} cannot be loaded: {first[:300]}") from err


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The settings that define a run's training (what a resumed run must share with the original).

    The method's fields set are under the method's name (``neat: {rank: 8}``, ``lora: {rank: 4}``); ``method``
    and ``param_budget`` appear only when they are not the defaults (``neat``, none), so a NEAT run's settings
    are those the runners recorded before they trained other methods, and its checkpoints resume.
    """
    config = {k: v for k, v in vars(args).items() if k not in NOT_TRAINING | _METHOD_KEYS | all_method_options()}
    method = getattr(args, "method", "neat")
    if method in METHODS:
        config[method] = method_fields(args)
    if method != "neat":
        config["method"] = method
    if getattr(args, "param_budget", None) is not None:
        config["param_budget"] = args.param_budget
    return dict(sorted(config.items()))
