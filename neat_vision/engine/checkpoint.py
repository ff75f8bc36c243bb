"""Small resumable checkpoints, written atomically.

A checkpoint is a dict saved with ``torch.save`` and read back with ``torch.load(weights_only=True)``:

* ``model``: the trainable tensors and BatchNorm running statistics by name (the whole state dict with
  ``--save-full``);
* ``optimizer``, ``scheduler``, ``scaler`` (or ``None``): their ``state_dict()``;
* ``rng``: per rank, the python, numpy, torch and CUDA generator states;
* ``progress``: ``epoch`` (in progress, 0-based), ``batch`` (next batch of that epoch), ``step`` (optimizer
  steps done), the partial epoch's loss sums, best validation top-1 and its epoch, last validation metrics,
  elapsed wall time;
* ``args``: the run's resolved options, checked against the resuming run's.

Files are written to a temporary name in the same folder and moved with ``os.replace``, so a kill never
leaves a truncated ``last.pth`` (the temporary file it may leave is removed when the run starts again).
"""

from __future__ import annotations

import argparse
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from neat_vision.adapter_files import trained_state
from neat_vision.atomic import atomic_write
from neat_vision.engine.options import option_differences
from neat_vision.errors import ResumeError, one_line

__all__ = [
    "CHECKPOINT_TENSORS",
    "RUN_CONTROL_OPTIONS",
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "atomic_write",
    "check_resumable",
    "load_checkpoint",
    "load_model_state",
    "model_state",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

# options that may change between a run and its resumption (they do not change what is computed)
RUN_CONTROL_OPTIONS = frozenset(
    {
        "resume",
        "output",
        "experiment",
        "workers",
        "device",
        "log_interval",
        "tb",
        "checkpoint_interval",
        "stop_after_steps",
        "compile",
        "dry_run",
        "data_dir",
        "download",
        "save_full",
        "pretrained_file",
        "torchcompile",
        "grad_checkpointing",
        "save_images",
        "checkpoint_hist",
    }
)


# what a checkpoint holds, and the parts whose tensors must be finite for it to be good
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "progress", "args")
CHECKPOINT_TENSORS = ("model", "optimizer")


# the one resume error (`neat_vision.errors`), under the name this module has always used
CheckpointMismatchError = ResumeError


class CorruptCheckpointError(ResumeError, ValueError):
    """A checkpoint file cannot be read (truncated, or not written by ``train.py``)."""


def rng_state() -> dict[str, Any]:
    """This process's generator states (numpy's as tensors, so ``weights_only`` loading accepts them)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "gauss": (has_gauss, cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured (older NLP checkpoints hold only the torch and CUDA states)."""
    if "python" in state:
        random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    if "numpy" in state:
        numpy = state["numpy"]
        has_gauss, cached = numpy["gauss"]
        np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_state(model: nn.Module, full: bool = False) -> dict[str, torch.Tensor]:
    """The trainable tensors and BatchNorm running statistics by name (``full``: the whole state dict), on the CPU."""
    if full:
        return {n: t.detach().cpu() for n, t in model.state_dict().items()}
    return {n: t.detach().cpu() for n, t in trained_state(model).items()}


def load_model_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load ``model_state`` output; every trainable parameter must be in it."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(tensors))
    if missing:
        raise CheckpointMismatchError(f"checkpoint lacks {len(missing)} trainable tensor(s), e.g. {missing[:3]}")
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise CheckpointMismatchError(f"checkpoint has tensors this model lacks, e.g. {result.unexpected_keys[:3]}")


def check_resumable(saved: dict[str, Any], args: argparse.Namespace) -> None:
    """Fail naming every option (outside ``RUN_CONTROL_OPTIONS``) whose value differs from the checkpoint's."""
    diffs = option_differences(saved, vars(args), ignore=RUN_CONTROL_OPTIONS | {"config", "method_config"})
    if diffs:
        raise CheckpointMismatchError(
            "cannot resume: options differ from the checkpoint's (resume with the run's args.yaml as --config): "
            + diffs
        )


def save_checkpoint(state: dict[str, Any], path: Path, copy_to: Path | None = None) -> None:
    """Write ``state`` atomically to ``path`` (and, when ``copy_to`` is given, an identical copy there)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    if copy_to is not None:
        atomic_write(copy_to, lambda tmp: shutil.copyfile(path, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (tensors and plain Python values only)."""
    if not path.is_file():
        raise FileNotFoundError(f"resume={str(path)!r}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as err:
        raise CorruptCheckpointError(
            f"resume={str(path)!r}: cannot read the checkpoint ({one_line(err)[:200]}); resume from another "
            "checkpoint (best.pth) or start a new run"
        ) from err
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CorruptCheckpointError(
            f"resume={str(path)!r}: not a train.py checkpoint (it lacks {', '.join(missing)}); pass a "
            "checkpoints/last.pth or best.pth written by train.py"
        )
    return state
