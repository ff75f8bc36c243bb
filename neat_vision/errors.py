"""The error types of the training runners and how the command-line tools report them.

Exit status of ``neat-train`` (``train.py``), ``neat-glue`` and ``neat-instruct``:
``0`` done; ``2`` (`EXIT_USAGE`) a mistake in an option, a config or a file, or a checkpoint that cannot be
resumed (`ResumeError`; one ``error: ...`` line naming it); ``3`` (`EXIT_DIVERGED`) the run diverged
(`Diverged`: non-finite loss, gradients or weights; the last good checkpoint is kept); ``4``
(`EXIT_PREEMPTED`) stopped by SIGTERM, SIGUSR1 or SIGUSR2 (`Preempted`: the current optimizer step finished,
the checkpoint written; continue with ``--resume auto`` / ``--resume``); ``1`` anything else (a traceback: a
bug to report). A second process on a folder a live run holds (`FolderInUse`) exits 2.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from typing import NoReturn

import torch

from .adapter_files import AdapterMismatchError
from .reach import UnreachedLayerError
from .run_lock import FolderInUse

__all__ = [
    "EXIT_DIVERGED",
    "EXIT_PREEMPTED",
    "EXIT_USAGE",
    "USER_ERRORS",
    "Diverged",
    "FolderInUse",
    "PREEMPT_SIGNALS",
    "OneLineParser",
    "Preempted",
    "ResumeError",
    "device_problem_of",
    "exit_code",
    "exit_status",
    "one_line",
    "report",
]

EXIT_USAGE = 2
EXIT_DIVERGED = 3
# not 0-3 (done, bug, usage, diverged), nor 128+N: that is what a shell reports for a process the signal killed
# before it could checkpoint; 4 says the checkpoint is written and the run can be requeued and resumed
EXIT_PREEMPTED = 4

# the signals that stop a run after a checkpointed optimizer step: Slurm's preemption/time limit (SIGTERM) and
# its warnings (``--signal=USR1@90``, ``--signal=USR2@90``)
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Diverged(RuntimeError):
    """The loss or the gradients became NaN or infinite (the step was not applied), or the weights did after one.

    The last checkpoint is kept; the message says whether it was read back and verified finite. Exit status 3.
    """


class Preempted(RuntimeError):
    """Stopped by a signal (SIGTERM, SIGUSR1, SIGUSR2) after finishing an optimizer step and checkpointing it.

    Exit status 4: resume with ``--resume auto`` (``neat-train``) or ``--resume`` (``neat-glue``, ``neat-instruct``).
    """


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed by this run (other options, other processes, damaged, absent or in the way)."""


# what every runner reports in one line with its exit status: options, files, data or run state (a `ConfigError`
# is a ValueError, a missing file an OSError), a checkpoint that cannot be resumed, a divergence; anything
# else is a bug and keeps its traceback
USER_ERRORS = (
    Diverged,
    Preempted,
    ResumeError,
    FolderInUse,
    AdapterMismatchError,
    UnreachedLayerError,
    ValueError,
    OSError,
)


def exit_status(err: BaseException) -> int:
    """The documented exit status of a runner that failed with ``err`` (a user's mistake or a divergence)."""
    if isinstance(err, Preempted):
        return EXIT_PREEMPTED
    return EXIT_DIVERGED if isinstance(err, Diverged) else EXIT_USAGE


class OneLineParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (no usage block) pointing at ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {one_line(message)} (see {self.prog} --help)\n")


# a DataLoader worker's exception arrives as "Caught X in DataLoader worker ...\nOriginal Traceback ...\nX: msg"
_WORKER_TRACEBACK = re.compile(r"Original Traceback \(most recent call last\):", re.M)


def one_line(err: BaseException | str) -> str:
    """The message of ``err`` on one line (for an error re-raised from a DataLoader worker: the original one)."""
    text = str(err)
    if _WORKER_TRACEBACK.search(text):
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+(Error|Exception): ", "", last.strip())
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def exit_code(err: BaseException) -> int:
    """Report a failure in one line on stderr (``error: ...``); return its exit status (`exit_status`)."""
    print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
    return exit_status(err)


def report(err: BaseException | str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``error: <one line>`` to stderr and exit with ``code``."""
    print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def device_problem_of(name: str | None) -> str | None:
    """Why the ``device`` option ``name`` cannot be used on this machine, or ``None`` (also for ``None``: auto)."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"device={name!r} is not allowed: cpu, cuda, cuda:N (or another torch device type)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"device={name!r} but no CUDA device is available here; use --device cpu"
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        return f"device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None
