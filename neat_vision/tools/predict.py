"""Classify images with a trained adapter: ``neat-predict --adapter DIR --output preds.csv IMAGES``.

Inputs are image files, folders (searched recursively for image files) and file lists (any other file: one
path per line, relative paths taken from the list's folder, blank lines and ``#`` comments skipped). Each image
gets one CSV row: its path, then the top-k class names and probabilities. Images go through the model's eval
transform (timm's ``resolve_data_config`` with the run's overrides, the same resize and centre crop as
``train.py``'s evaluation) in batches on any device; the adapter is merged into a plain model first unless
``--no-merge``. Every input that is not predicted is reported and skipped, by reason (`SKIP_REASONS`: no such
file, not an image type -- a ``.gif`` or ``.txt`` in a folder included --, unreadable image, ...), in the log
(one line per input and one with the counts) and in the result (`Prediction.skipped`, `Prediction.reasons`); the
others are still predicted. ``--strict`` fails instead (exit 2, one line), writing no CSV.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from neat_vision.adapter import merge_and_unload
from neat_vision.adapter_files import AdapterMismatchError, read_adapter_config
from neat_vision.atomic import DiskWriteError, atomic_write
from neat_vision.data import CorruptImageError, build_transforms, read_rgb
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

__all__ = ["SKIP_REASONS", "Prediction", "SkippedInputsError", "collect_images", "main", "predict"]

logger = logging.getLogger("neat_vision.tools.predict")

# train.py options predict accepts too (defaults: the run's args.yaml, then train.py's)
SHARED = ("img_size", "crop_pct", "interpolation", "mean", "std", "batch_size", "workers", "amp", "device")


# why an input is skipped: each problem reads "<reason>: <detail>"
SKIP_REASONS = (
    "no such file",  # an input or a listed path that does not exist (or is not a file)
    "not an image type",  # a file in a folder whose type is not an image one (.gif, .txt, ...), or not a list
    "no image files",  # a folder without image files
    "unreadable image",  # an image file that cannot be decoded
    "untransformable image",  # decoded, but the eval transform failed on it
)


class SkippedInputsError(ValueError):
    """``--strict``: inputs would be skipped (a user error: exit 2, one line)."""


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS


def _problem(reason: str, detail: str) -> str:
    assert reason in SKIP_REASONS, reason
    return f"{reason}: {detail}"


def _not_an_image(path: Path) -> str:
    kind = f"{path.suffix.lower()} file" if path.suffix else "a file without an extension"
    return _problem("not an image type", f"{kind}; image types: {', '.join(IMG_EXTENSIONS)}")


def reason_of(problem: str) -> str:
    """The `SKIP_REASONS` entry a skipped input's problem starts with."""
    return problem.partition(":")[0]


def collect_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files ``inputs`` name (files, folders, file lists), in order, and ``(path, problem)`` pairs.

    Every file of a folder that is not predicted is a problem too (``not an image type``).
    """
    images: list[Path] = []
    problems: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            found = [p for p in files if _is_image(p)]
            problems.extend((str(p), _not_an_image(p)) for p in files if not _is_image(p))
            if not found:
                problems.append(
                    (str(path), _problem("no image files", f"folder holds none ({', '.join(IMG_EXTENSIONS)})"))
                )
            images.extend(found)
        elif not path.exists():
            problems.append((str(path), _problem("no such file", "no such file or folder")))
        elif _is_image(path):
            images.append(path)
        else:
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError:
                problems.append((str(path), _problem("not an image type", "neither an image file nor a text list")))
                continue
            for line in lines:
                entry = line.strip()
                if not entry or entry.startswith("#"):
                    continue
                listed = Path(entry).expanduser()
                listed = listed if listed.is_absolute() else path.parent / listed
                if not listed.is_file():
                    problems.append((str(listed), _problem("no such file", f"listed in {path}: not a file")))
                elif _is_image(listed):
                    images.append(listed)
                else:
                    problems.append((str(listed), f"{_not_an_image(listed)} (listed in {path})"))
    return images, problems


class _ImageFiles(Dataset):
    """``(index, tensor)`` per file, or ``(index, problem)`` when it cannot be read or transformed."""

    def __init__(self, paths: Sequence[Path], transform: Any) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | str]:
        try:
            return index, self.transform(read_rgb(self.paths[index]))
        except CorruptImageError as err:
            return index, _problem("unreadable image", str(err.__cause__ or err))
        except Exception as err:  # one bad image must not stop the others (decoders raise many kinds)
            return index, _problem("untransformable image", f"{type(err).__name__}: {err}")


def _collate(items: list[tuple[int, torch.Tensor | str]]) -> tuple[list[int], torch.Tensor | None, list]:
    good = [(i, t) for i, t in items if isinstance(t, torch.Tensor)]
    bad = [(i, t) for i, t in items if not isinstance(t, torch.Tensor)]
    images = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], images, bad


@dataclass
class Prediction:
    """What a `predict` call wrote: the CSV, how many rows, and the inputs it skipped: ``(path, problem)``.

    ``problem`` reads ``"<reason>: <detail>"`` (a `SKIP_REASONS` entry); `reasons` counts them by reason.
    """

    output: Path
    rows: int
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def reasons(self) -> dict[str, int]:
        """How many inputs were skipped for each reason (only the reasons that occurred)."""
        return dict(Counter(reason_of(problem) for _, problem in self.skipped))


def _counts(skipped: Sequence[tuple[str, str]]) -> str:
    """``"2 not an image type (e.g. a.gif), 1 unreadable image (e.g. b.png)"``."""
    by_reason: dict[str, list[str]] = {}
    for path, problem in skipped:
        by_reason.setdefault(reason_of(problem), []).append(path)
    return ", ".join(f"{len(paths)} {reason} (e.g. {paths[0]})" for reason, paths in by_reason.items())


def _refuse(skipped: Sequence[tuple[str, str]], strict: bool) -> None:
    if strict and skipped:
        first_path, first = skipped[0]
        raise SkippedInputsError(
            f"strict: {len(skipped)} input(s) would be skipped: {_counts(skipped)}; first: {first_path}: {first}; "
            "fix or remove them, or drop --strict to skip them"
        )


@torch.inference_mode()
def predict(
    adapter: str | Path,
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    topk: int = 5,
    merge: bool = True,
    pretrained_file: str | Path | None = None,
    options: dict[str, Any] | None = None,
    strict: bool = False,
) -> Prediction:
    """Write one CSV row per readable image of ``inputs``: ``path, top1_label, top1_prob, ...`` (top ``topk``).

    ``options`` are ``train.py`` option values (``batch_size``, ``workers``, ``amp`` and the data config
    overrides); missing ones come from the run's ``args.yaml``, then ``train.py``'s defaults. ``device``
    defaults to ``cuda`` when available, else ``cpu``. Skipped inputs are logged and returned by reason;
    ``strict`` raises `SkippedInputsError` instead (before any CSV is written).
    """
    if topk < 1:
        raise ValueError(f"topk={topk} is not allowed: an integer >= 1")
    library = read_adapter_config(adapter).get("base", {}).get("library")
    if library != "timm":
        raise ValueError(f"predict classifies images with timm models; adapter {adapter} adapts {library}")
    run = run_options(adapter)
    given = argparse.Namespace(**{k: (options or {}).get(k) for k in SHARED})
    opts = resolve_options(given, SHARED, run)
    paths, skipped = collect_images(inputs)
    _refuse(skipped, strict)
    for path, problem in skipped:
        logger.warning("skipped %s: %s", path, problem)
    if not paths:
        raise FileNotFoundError(f"no image files in {[str(i) for i in inputs]}")
    trained = open_adapter(adapter, pretrained_file=pretrained_file, options=run)
    device = pick_device(given.device)  # not the run's: it may have trained on another machine
    model = (merge_and_unload(trained.model) if merge else trained.model).to(device)
    transform = build_transforms(trained.data_config(opts), train=False)
    loader = DataLoader(
        _ImageFiles(paths, transform),
        batch_size=opts["batch_size"],
        num_workers=opts["workers"],
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    names = trained.class_names
    k = min(topk, len(names))
    autocast = autocast_for(opts["amp"], device)
    output = Path(output)
    rows = 0
    text = io.StringIO()  # written whole (atomic_write) once every image is done: no half CSV on a failure
    writer = csv.writer(text)
    writer.writerow(["path", *(f"top{j}_{c}" for j in range(1, k + 1) for c in ("label", "prob"))])
    for indices, images, bad in tqdm(loader, desc="predict", unit="batch", disable=None):
        found = [(str(paths[index]), problem) for index, problem in bad]
        _refuse(found, strict)
        for path, problem in found:
            skipped.append((path, problem))
            logger.warning("skipped %s: %s", path, problem)
        if images is None:
            continue
        with autocast():
            logits = model(images.to(device, non_blocking=True))
        probs, classes = logits.float().softmax(dim=-1).topk(k, dim=-1)
        for index, p_row, c_row in zip(indices, probs.tolist(), classes.tolist()):
            cells = [cell for c, p in zip(c_row, p_row) for cell in (names[c], f"{p:.6f}")]
            writer.writerow([str(paths[index]), *cells])
            rows += 1
    atomic_write(output, lambda tmp: Path(tmp).write_text(text.getvalue(), newline=""))
    logger.info("wrote %d predictions to %s; skipped %d input(s)", rows, output, len(skipped))
    if skipped:
        logger.warning("skipped %d input(s) by reason: %s", len(skipped), _counts(skipped))
    return Prediction(output, rows, skipped)


def build_parser() -> argparse.ArgumentParser:
    """The command's options (``train.py``'s shared ones keep their names, types and help)."""
    p = tool_parser("neat-predict", "Top-k classes per image with a trained adapter (one CSV row per image).", SHARED)
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive) or file lists (one path per line)")
    p.add_argument("--output", default="predictions.csv", help="CSV file to write")
    p.add_argument("--topk", type=int, default=5, help="classes per image")
    p.add_argument(
        "--merge", action=argparse.BooleanOptionalAction, default=True, help="merge the adapter first (faster)"
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail (exit 2) instead of skipping an input that is missing, not an image or unreadable",
    )
    return p


def main(argv: Sequence[str] | None = None) -> Prediction:
    """The command: predict, report skipped inputs by reason; exit 2 (one line) when nothing could be predicted,
    or with ``--strict`` when an input would be skipped."""

    def work(args: argparse.Namespace) -> Prediction:
        return predict(
            args.adapter,
            args.inputs,
            args.output,
            topk=args.topk,
            merge=args.merge,
            pretrained_file=args.pretrained_file,
            options={k: getattr(args, k) for k in SHARED},
            strict=args.strict,
        )

    return run_tool(build_parser(), argv, work, (AdapterMismatchError, FileNotFoundError, DiskWriteError, ValueError))


cli = console_script(main)

if __name__ == "__main__":
    cli()
