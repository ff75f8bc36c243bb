"""Command-line settings of the runners: a YAML ``--config`` sets the defaults, flags override them.

YAML keys are the flags' names with underscores (``batch_size`` for ``--batch-size``); ``neat:`` is a mapping
of `NeatConfig` fields, overridden field by field with ``--neat KEY=VALUE`` (the value read as YAML).
Unknown keys fail with the allowed names, so a misspelled setting never passes silently.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from ..adapter import AdapterMismatchError
from ..config import ConfigError, NeatConfig
from ..engine.distributed import DistEnv, setup_distributed
from ..engine.progress import log_to_stdout
from ..errors import Diverged, OneLineParser, ResumeError, device_problem_of, exit_status, one_line

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
}

# settings that do not change a run's training (a resumed run may differ in these)
NOT_TRAINING = {"config", "resume", "device", "output", "checkpoint_steps", "eval_batch_size", "eval_dir", "eval_sets"}
# fsdp: the same sums and the same checkpoint format as DDP, so either may resume the other
NOT_TRAINING |= {"eval_limit", "max_new_tokens", "num_beams", "eval_only", "adapter", "fsdp"}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every runner has: config, model, output, NEAT overrides, optimisation and checkpointing basics."""
    parser.add_argument("--config", help="YAML file whose keys set the defaults of these flags")
    parser.add_argument("--model", help="transformers model name or local folder (from_pretrained)")
    parser.add_argument("--tokenizer", help="tokenizer name or folder (default: --model)")
    parser.add_argument("--output", help="run folder: checkpoint.pt, best/ and last/ adapters, summary.csv, tb/")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from checkpoint.pt")
    parser.add_argument(
        "--neat", dest="neat_overrides", action="append", default=[], metavar="KEY=VALUE", help="NeatConfig field"
    )
    parser.add_argument("--lr", type=float, help="learning rate of the tweakers")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, help="examples per optimizer step")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--max-grad-norm", type=float, default=0.0, help="gradient clipping (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="bf16: bf16 base weights and autocast")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--checkpoint-steps", type=int, default=500, help="also checkpoint every N steps (0: off)")
    parser.set_defaults(neat={})


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, required: Sequence[str]
) -> argparse.Namespace:
    """Parse ``argv`` with ``--config`` defaults; fail on unknown YAML keys and on missing ``required`` settings."""
    pre = OneLineParser(prog=parser.prog, add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            parser.error(f"--config {path}: no such file")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            parser.error(f"--config {path}: not a readable YAML file ({str(err).splitlines()[0]}{where})")
        if not isinstance(values, Mapping):
            parser.error(f"--config {path}: a config must be a YAML mapping of setting: value")
        allowed = {a.dest for a in parser._actions} | set(parser._defaults)
        allowed -= {"help", "config", "neat_overrides", "resume"}
        unknown = sorted(set(values) - allowed)
        if unknown:
            parser.error(f"{path}: unknown key(s) {unknown}; allowed keys are {', '.join(sorted(allowed))}")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    if not isinstance(args.neat or {}, Mapping):
        parser.error(f"neat={args.neat!r} is not allowed: a mapping of NeatConfig fields, e.g. {{rank: 8}}")
    args.neat = dict(args.neat or {})
    for item in args.neat_overrides:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--neat {item!r} is not allowed: KEY=VALUE (e.g. --neat rank=8)")
        args.neat[key] = yaml.safe_load(value)
    del args.neat_overrides
    missing = [name for name in required if getattr(args, name) is None]
    if missing:
        flags = ", ".join("--" + name.replace("_", "-") for name in missing)
        parser.error(f"missing setting(s) {flags}: give them as flags or in the --config file")
    for action in parser._actions:  # argparse checks choices on the command line only, not on YAML defaults
        value = getattr(args, action.dest, None)
        if action.choices and value is not None and value not in action.choices:
            parser.error(f"{action.dest}={value!r} is not allowed: one of {', '.join(map(str, action.choices))}")
    for name in COUNTS:
        value = getattr(args, name, None)
        if value is not None and (not _integer(value) or value < 1):
            parser.error(f"--{name.replace('_', '-')}={value!r} is not allowed: an integer >= 1")
    for name, (ok, allowed) in RANGES.items():
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            parser.error(f"--{name.replace('_', '-')}={value!r} is not allowed: {allowed}")
    try:
        NeatConfig.coerce(args.neat)
    except ConfigError as err:
        parser.error(f"--neat / neat: {err}")
    device_problem = device_problem_of(args.device)
    if device_problem:
        parser.error(device_problem)
    return args


# what a runner's main reports in one line (`exit_code`); anything else is a bug and keeps its traceback
USER_ERRORS = (Diverged, ResumeError, AdapterMismatchError, ValueError, OSError)


def exit_code(err: BaseException) -> int:
    """Report a runner's failure in one line on stderr; its exit status (`neat_vision.errors`)."""
    print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
    return exit_status(err)


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
    """The settings that define a run's training (what a resumed run must share with the original)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in NOT_TRAINING}
