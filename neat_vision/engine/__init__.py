"""Training engine: ``train.py``'s argument parsing, model building, loop, checkpoints and logging.

``run(parse_args([...]))`` trains in-process and returns the final metrics; ``main()`` is the script.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from neat_vision.config import ConfigError
from neat_vision.engine.args import build_parser, load_config, parse_args
from neat_vision.engine.checkpoint import CheckpointMismatchError
from neat_vision.engine.loop import NonFiniteLossError, run
from neat_vision.engine.model import UnreachedLayerError
from neat_vision.engine.plan import dry_run

# failures caused by options, data or run state: reported as one line, exit status 1
_USER_ERRORS = (
    NonFiniteLossError,
    CheckpointMismatchError,
    UnreachedLayerError,
    ConfigError,
    FileExistsError,
    FileNotFoundError,
    ValueError,
)

__all__ = ["NonFiniteLossError", "build_parser", "dry_run", "load_config", "main", "parse_args", "run"]


def main(argv: Sequence[str] | None = None) -> None:
    """The training script: parse, run, report; a non-finite loss or a bad option exits non-zero."""
    args = parse_args(argv)
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    try:
        run(args)
    except _USER_ERRORS as err:
        raise SystemExit(f"error: {err}") from err
