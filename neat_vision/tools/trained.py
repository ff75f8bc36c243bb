"""A trained adapter folder opened for use: the model it adapts, its class names and the run's options.

Shared by ``predict``, ``evaluate`` and ``export``. ``train.py`` writes the adapter to ``runs/<exp>/adapter`` next
to the run's ``args.yaml``; when that file is there its options (split seed, dataset, data-config overrides,
``pretrained_file``) are the defaults of these commands, so they see the data as training saw it. Options
shared with ``train.py`` are copied from its parser: same names, types, choices and help.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neat_vision.adapter_files import read_adapter_config
from neat_vision.engine.args import build_parser, load_config
from neat_vision.engine.data import data_config
from neat_vision.errors import EXIT_USAGE, one_line

__all__ = [
    "AMP_DTYPES",
    "DATA_CONFIG_OPTIONS",
    "Trained",
    "add_train_options",
    "autocast_for",
    "console_script",
    "open_adapter",
    "pick_device",
    "resolve_options",
    "run_options",
    "run_tool",
    "tool_parser",
]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# train.py options that shape how a trained model sees its inputs (timm data config overrides)
DATA_CONFIG_OPTIONS = ("img_size", "crop_pct", "interpolation", "mean", "std")


@dataclass
class Trained:
    """An adapted model (eval mode, on its device) and what its adapter folder records."""

    model: nn.Module
    meta: dict[str, Any]
    class_names: list[str]
    options: dict[str, Any]

    @property
    def library(self) -> str | None:
        """``timm`` or ``transformers``: the integration that described the base model."""
        return self.meta.get("base", {}).get("library")

    def data_config(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """timm's ``resolve_data_config`` for the model as ``train.py`` resolves it (``img_size``, ``crop_pct``,
        ``interpolation``, ``mean``, ``std`` from ``overrides``, else the run's options)."""
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        opts = {k: given.get(k, self.options.get(k)) for k in DATA_CONFIG_OPTIONS}
        model_kwargs = self.options.get("model_kwargs") or self.meta.get("base", {}).get("model_args", {})
        return data_config(argparse.Namespace(**opts, model_kwargs=model_kwargs), self.model)


def run_options(adapter: str | Path) -> dict[str, Any]:
    """The options of the ``train.py`` run that wrote ``adapter`` (its sibling ``args.yaml``), or ``{}``."""
    file = Path(adapter).parent / "args.yaml"
    return load_config(file) if file.is_file() else {}


def add_train_options(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """Add ``train.py``'s options ``names`` (dest names) to ``parser``, defaulting to ``None`` (= not given)."""
    actions = {a.dest: a for a in build_parser()._actions}
    for name in names:
        action = actions[name]
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": action.help}
        if isinstance(action, argparse.BooleanOptionalAction):
            kwargs["action"] = argparse.BooleanOptionalAction
            option_strings = [s for s in action.option_strings if not s.startswith("--no-")]
        else:
            kwargs.update(type=action.type, nargs=action.nargs, choices=action.choices, metavar=action.metavar)
            option_strings = action.option_strings
        parser.add_argument(*option_strings, **kwargs)


def resolve_options(given: argparse.Namespace, names: Sequence[str], run: dict[str, Any]) -> dict[str, Any]:
    """Each option in ``names``: given on the command line, else the run's value, else ``train.py``'s default."""
    defaults = vars(build_parser().parse_args([]))
    out = {}
    for name in names:
        value = getattr(given, name)
        out[name] = value if value is not None else run.get(name, defaults[name])
    return out


def _class_names(base: dict[str, Any], num_classes: int | None) -> list[str]:
    names = base.get("label_names")
    if isinstance(names, list) and (num_classes is None or len(names) == num_classes):
        return [str(n) for n in names]
    return [str(i) for i in range(num_classes or 0)]


def pick_device(name: str | None) -> torch.device:
    """``name``, or as ``train.py`` picks it: ``cuda`` when available, else ``cpu``."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def open_adapter(
    adapter: str | Path,
    *,
    pretrained_file: str | Path | None = None,
    options: dict[str, Any] | None = None,
) -> Trained:
    """Build the base model an adapter folder records, load the adapter onto it, and return it in eval mode.

    timm bases are built with their pretrained weights (``pretrained_file``, else the run's
    ``pretrained_file``, else the hub), or for a run with ``--no-pretrained`` with timm's random init under the
    run's seed (as ``train.py`` built it), and checked against the adapter's fingerprint of them; transformers
    bases with ``from_pretrained`` of the recorded name or path. ``options`` replace the run's ``args.yaml``.
    """
    adapter = Path(adapter)
    meta = read_adapter_config(adapter)
    options = run_options(adapter) if options is None else options
    base = meta.get("base", {})
    library = base.get("library")
    if library == "timm":
        from neat_vision.integrations.timm import load_adapter

        weights = pretrained_file or options.get("pretrained_file")
        kwargs = {}
        if weights is not None:
            file = Path(weights).expanduser()
            if not file.is_file():
                raise FileNotFoundError(f"pretrained_file={str(weights)!r}: no such file")
            kwargs["pretrained_cfg_overlay"] = {"file": str(file)}
        pretrained = bool(options.get("pretrained", True)) or weights is not None
        if not pretrained:
            from timm.utils import random_seed

            random_seed(options.get("seed", 0), 0)  # train.py seeds so before building the model
        kwargs = {**options.get("model_kwargs", {}), **kwargs}
        model = load_adapter(None, adapter, pretrained=pretrained, **kwargs)
        num_classes = getattr(model, "num_classes", None)
    elif library == "transformers":
        from neat_vision.nlp import load_adapter

        model = load_adapter(None, adapter)
        num_classes = getattr(model.config, "num_labels", None)
    else:
        raise ValueError(
            f"adapter {adapter} records base {base}: only timm and transformers bases can be rebuilt "
            "(adapters written by train.py, or save_adapter on a timm or transformers model)"
        )
    return Trained(model.eval(), meta, _class_names(base, num_classes), options)


def autocast_for(amp: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """The context manager factory ``train.py`` uses for ``--amp`` (``none``, ``bf16``, ``fp16``)."""
    if amp == "none":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def tool_parser(prog: str, description: str, options: Sequence[str]) -> argparse.ArgumentParser:
    """A tool's parser: ``--adapter``, ``--pretrained-file`` and train.py's ``options`` (same names, types, help)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--adapter", required=True, help="adapter folder (runs/<exp>/adapter)")
    parser.add_argument("--pretrained-file", default=None, help="local base weights (default: the run's, else the hub)")
    add_train_options(parser, options)
    return parser


def run_tool(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    work: Callable[[argparse.Namespace], Any],
    errors: tuple[type[BaseException], ...],
) -> Any:
    """Parse ``argv``, log to stdout, return ``work(args)``; ``errors`` exit 2 with one ``error: ...`` line.

    The ``SystemExit`` raised has exit status 2 (``code``) and the line as its message (``str``).
    """
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    try:
        return work(args)
    except errors as err:
        line = f"error: {one_line(err)}"
        print(line, file=sys.stderr, flush=True)
        stop = SystemExit(line)
        stop.code = EXIT_USAGE  # the message is printed; the status is a user error's, like train.py's
        raise stop from err


def console_script(main: Callable[[], Any]) -> Callable[[], None]:
    """``main`` as a console script: it exits 0 when ``main`` returns (a script would print a returned object and
    exit 1), and with ``main``'s own status when it exits."""

    def script() -> None:
        main()

    script.__doc__ = f"The console script of `{main.__module__}.main`."
    return script
