"""Training engine: the training command's argument parsing, model building, loop, checkpoints and logging.

``run(parse_args([...]))`` trains in-process and returns the final metrics; ``main()`` is the command:
``neat-train``, ``python -m neat_vision.engine``, or ``python train.py`` in a checkout.
"""

from __future__ import annotations

from collections.abc import Sequence

from neat_vision.engine.args import build_parser, load_config, parse_args
from neat_vision.engine.plan import dry_run
from neat_vision.engine.progress import log_to_stdout
from neat_vision.engine.vision import NonFiniteLossError, run
from neat_vision.errors import USER_ERRORS, exit_status, report

__all__ = ["NonFiniteLossError", "build_parser", "dry_run", "load_config", "main", "parse_args", "run"]


def main(argv: Sequence[str] | None = None) -> None:
    """The training script: parse, run, report; a bad option or file exits 2, a diverged run 3 (one line each)."""
    args = parse_args(argv)
    log_to_stdout()
    try:
        run(args)
    except USER_ERRORS as err:
        report(err, exit_status(err))
