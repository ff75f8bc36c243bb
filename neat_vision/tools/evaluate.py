"""Evaluate a trained adapter on a dataset split: ``neat-evaluate --adapter DIR --split test``.

Top-1/top-5 and the loss come from the training engine's own ``evaluate`` (same loader, transform and counting
as ``train.py``, so a run's test split gives its ``final.json`` numbers); per-class accuracy and the confusion
matrix come from the same pass. The dataset options are ``train.py``'s (``--dataset``, ``--data-dir``,
``--seed`` for the split, ``--skip-corrupt``, data-config overrides, ...) and default to the run's ``args.yaml``.
Writes ``metrics.json``, ``confusion.csv`` and ``confusion.png`` (with matplotlib, the ``plots`` extra) to
``--output`` (default: ``eval_<split>`` next to the adapter folder), each whole or not at all. Images the split
skips (unreadable ones, with ``--skip-corrupt``) and the files of other types in a folder dataset's class folders
are logged and listed by reason in the summary (``skipped``: reason -> count, ``skipped_files``: reason ->
paths); ``--strict`` fails instead (exit 2, one line).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from neat_vision.adapter import merge_and_unload
from neat_vision.adapter_files import AdapterMismatchError, read_adapter_config
from neat_vision.atomic import atomic_write
from neat_vision.data import SPLITS, build_dataset, build_loader, build_transforms
from neat_vision.engine.distributed import DistEnv
from neat_vision.engine.metrics import evaluate
from neat_vision.tools.trained import (
    autocast_for,
    console_script,
    open_adapter,
    pick_device,
    resolve_options,
    run_options,
    run_tool,
    tool_parser,
)

__all__ = ["confusion_matrix", "evaluate_adapter", "main", "per_class_accuracy", "plot_confusion"]

logger = logging.getLogger("neat_vision.tools.evaluate")

# train.py options evaluate accepts too (defaults: the run's args.yaml, then train.py's)
SHARED = (
    "dataset",
    "data_dir",
    "download",
    "skip_corrupt",
    "seed",
    "img_size",
    "crop_pct",
    "interpolation",
    "mean",
    "std",
    "batch_size",
    "workers",
    "amp",
    "device",
)


class _Recorder(nn.Module):
    """The model, keeping a CPU copy of every batch's logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.logits: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.logits.append(out.detach().float().cpu())
        return out


def _recording(batches: Iterable, targets: list[torch.Tensor]) -> Iterator:
    for images, labels in batches:
        targets.append(labels.cpu())
        yield images, labels


def confusion_matrix(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(C, C)`` counts: row = true class, column = top-1 prediction; ``logits (N, C)``, ``targets (N,)``."""
    pred = logits.argmax(dim=1)
    flat = targets.long() * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor, names: Sequence[str]) -> list[dict[str, Any]]:
    """Per true class: samples, correct top-1 predictions and accuracy in percent (``None`` without samples)."""
    out = []
    for i, name in enumerate(names):
        count, correct = int(confusion[i].sum()), int(confusion[i, i])
        accuracy = 100.0 * correct / count if count else None
        out.append({"class": name, "count": count, "correct": correct, "accuracy": accuracy})
    return out


def plot_confusion(confusion: torch.Tensor, names: Sequence[str], path: Path, title: str) -> Path:
    """A PNG of the row-normalised confusion matrix (counts written in the cells for up to 20 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    rows = confusion.double()
    normalised = (rows / rows.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    side = min(max(4.0, 0.35 * n + 2.5), 30.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 60:
        ax.set_xticks(range(n), labels=names, rotation=90, fontsize=max(4, 10 - n // 10))
        ax.set_yticks(range(n), labels=names, fontsize=max(4, 10 - n // 10))
    if n <= 20:
        for i in range(n):
            for j in range(n):
                colour = "white" if normalised[i, j] > 0.5 else "black"
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center", color=colour, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


@torch.no_grad()
def evaluate_adapter(
    adapter: str | Path,
    *,
    split: str = "test",
    output: str | Path | None = None,
    merge: bool = False,
    pretrained_file: str | Path | None = None,
    options: dict[str, Any] | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Evaluate ``adapter`` on ``split``; write and return the summary (also ``metrics.json`` in ``output``).

    ``options`` are ``train.py`` option values (see ``SHARED``); missing ones come from the run's ``args.yaml``,
    then ``train.py``'s defaults (``device``: ``cuda`` when available, else ``cpu``). ``merge`` evaluates the
    merged model (faster; equal up to float rounding), by default the adapter as trained. Skipped images are
    logged and listed by reason (``skipped``, ``skipped_files``); ``strict`` raises ``ValueError`` instead.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not allowed: one of {', '.join(SPLITS)}")
    library = read_adapter_config(adapter).get("base", {}).get("library")
    if library != "timm":
        raise ValueError(f"evaluate runs timm image classifiers; adapter {adapter} adapts {library}")
    run = run_options(adapter)
    given = argparse.Namespace(**{k: (options or {}).get(k) for k in SHARED})
    opts = resolve_options(given, SHARED, run)
    if opts["dataset"] is None:
        raise ValueError("dataset is not set: pass --dataset NAME (no args.yaml of a train.py run sets it)")
    if opts["dataset"] == "fractal":
        raise ValueError("dataset 'fractal' is generated on the fly for pre-training; evaluate it with train.py")
    dataset = build_dataset(
        opts["dataset"],
        opts["data_dir"],
        split,
        seed=opts["seed"],
        download=opts["download"],
        skip_corrupt=opts["skip_corrupt"],
    )
    skipped_files = {
        reason: list(files)
        for reason, files in (
            ("not an image type", getattr(dataset, "ignored_files", [])),  # in the class folders, never loaded
            ("unreadable image", getattr(dataset, "skipped_files", [])),  # dropped by --skip-corrupt
        )
        if files
    }
    if skipped_files:
        total = sum(len(files) for files in skipped_files.values())
        counts = ", ".join(f"{len(files)} {reason} (e.g. {files[0]})" for reason, files in skipped_files.items())
        if strict:
            raise ValueError(
                f"strict: {total} file(s) of dataset {opts['dataset']!r} would be skipped evaluating split "
                f"{split!r}: {counts}; fix or remove them, or drop --strict to skip them"
            )
        for reason, files in skipped_files.items():
            for file in files:
                logger.warning("skipped %s: %s", file, reason)
        logger.warning("skipped %d file(s) by reason: %s", total, counts)
    trained = open_adapter(adapter, pretrained_file=pretrained_file, options=run)
    device = pick_device(given.device)  # not the run's: it may have trained on another machine
    model = (merge_and_unload(trained.model) if merge else trained.model).to(device)
    names = list(dataset.classes)
    recorded = trained.meta.get("base", {}).get("label_names")
    if len(names) != len(trained.class_names) or (recorded is not None and recorded != names):
        raise ValueError(
            f"dataset {opts['dataset']!r} has classes {names[:10]} ({len(names)}), the adapter's model "
            f"{trained.class_names[:10]} ({len(trained.class_names)}): evaluate on the data it was trained for"
        )
    transform = build_transforms(trained.data_config(opts), train=False)
    loader = build_loader(
        dataset, transform, opts["batch_size"], train=False, num_workers=opts["workers"], resumable=True
    )
    recorder, targets = _Recorder(model), []
    batches = tqdm(_recording(loader, targets), total=len(loader), desc=f"evaluate {split}", disable=None)
    metrics = evaluate(recorder, batches, DistEnv(device), autocast_for(opts["amp"], device))
    confusion = confusion_matrix(torch.cat(recorder.logits), torch.cat(targets), len(names))
    classes = per_class_accuracy(confusion, names)
    present = [c["accuracy"] for c in classes if c["accuracy"] is not None]

    folder = Path(output) if output is not None else Path(adapter).parent / f"eval_{split}"
    folder.mkdir(parents=True, exist_ok=True)
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["true \\ predicted", *names])
    writer.writerows([name, *row] for name, row in zip(names, confusion.tolist()))
    atomic_write(folder / "confusion.csv", lambda tmp: Path(tmp).write_text(table.getvalue(), newline=""))
    plot = None
    try:
        title = f"{opts['dataset']} {split}: top-1 {metrics['top1']:.2f}%"
        plot = plot_confusion(confusion, names, folder / "confusion.png", title).name
    except ImportError:
        logger.warning("matplotlib is not installed (pip install matplotlib): confusion.png not written")
    summary = {
        "adapter": str(adapter),
        "dataset": opts["dataset"],
        "data_dir": opts["data_dir"],
        "split": split,
        "seed": opts["seed"],
        "merged": merge,
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "loss": metrics["loss"],
        "count": metrics["count"],
        "mean_class_accuracy": sum(present) / len(present) if present else None,
        "per_class": classes,
        "confusion_csv": "confusion.csv",
        "confusion_png": plot,
        "skipped": {reason: len(files) for reason, files in skipped_files.items()},
        "skipped_files": skipped_files,
    }
    atomic_write(folder / "metrics.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    logger.info(
        "%s %s: top-1 %.2f%% top-5 %.2f%% loss %.4f on %d images; %s",
        opts["dataset"],
        split,
        metrics["top1"],
        metrics["top5"],
        metrics["loss"],
        metrics["count"],
        folder / "metrics.json",
    )
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command's options (``train.py``'s shared ones keep their names, types and help)."""
    p = tool_parser(
        "neat-evaluate",
        "Top-1/top-5, per-class accuracy and a confusion matrix of a trained adapter on a split.",
        SHARED,
    )
    p.add_argument("--split", default="test", choices=SPLITS, help="which split of the dataset")
    p.add_argument("--output", default=None, help="output folder (default: eval_<split> next to the adapter)")
    p.add_argument(
        "--merge",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="evaluate the merged model (faster; equal up to float rounding)",
    )
    p.add_argument(
        "--strict", action="store_true", help="fail (exit 2) instead of skipping an unreadable image (--skip-corrupt)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command: evaluate and write the summary; bad options or missing data exit with one line."""

    def work(args: argparse.Namespace) -> dict[str, Any]:
        return evaluate_adapter(
            args.adapter,
            split=args.split,
            output=args.output,
            merge=args.merge,
            pretrained_file=args.pretrained_file,
            options={k: getattr(args, k) for k in SHARED},
            strict=args.strict,
        )

    return run_tool(build_parser(), argv, work, (AdapterMismatchError, OSError, ValueError))


cli = console_script(main)

if __name__ == "__main__":
    cli()
