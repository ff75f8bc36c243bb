"""Classify images with a trained adapter: ``neat-predict --adapter DIR --output preds.csv IMAGES``.

Inputs are image files, folders (searched recursively for image files) and file lists (any other file: one
path per line, relative paths taken from the list's folder, blank lines and ``#`` comments skipped). Each image
gets one CSV row: its path, then the top-k class names and probabilities. Images go through the model's eval
transform (timm's ``resolve_data_config`` with the run's overrides, the same resize and centre crop as
``train.py``'s evaluation) in batches on any device; the adapter is merged into a plain model first unless
``--no-merge``. An image that cannot be found, read or transformed is reported and skipped; the others are
still predicted.
"""

from __future__ import annotations

import argparse
import csv
import logging
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

__all__ = ["Prediction", "collect_images", "main", "predict"]

logger = logging.getLogger("neat_vision.tools.predict")

# train.py options predict accepts too (defaults: the run's args.yaml, then train.py's)
SHARED = ("img_size", "crop_pct", "interpolation", "mean", "std", "batch_size", "workers", "amp", "device")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS


def collect_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """The image files ``inputs`` name (files, folders, file lists), in order, and ``(path, problem)`` pairs."""
    images: list[Path] = []
    problems: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _is_image(p))
            if not found:
                problems.append((str(path), f"folder holds no image files ({', '.join(IMG_EXTENSIONS)})"))
            images.extend(found)
        elif not path.exists():
            problems.append((str(path), "no such file or folder"))
        elif _is_image(path):
            images.append(path)
        else:
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError:
                problems.append((str(path), f"neither an image file ({', '.join(IMG_EXTENSIONS)}) nor a text list"))
                continue
            for line in lines:
                entry = line.strip()
                if not entry or entry.startswith("#"):
                    continue
                listed = Path(entry).expanduser()
                listed = listed if listed.is_absolute() else path.parent / listed
                if listed.is_file():
                    images.append(listed)
                else:
                    problems.append((str(listed), f"listed in {path}: not a file"))
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
            return index, f"unreadable image ({err.__cause__ or err})"
        except Exception as err:  # one bad image must not stop the others (decoders raise many kinds)
            return index, f"{type(err).__name__}: {err}"


def _collate(items: list[tuple[int, torch.Tensor | str]]) -> tuple[list[int], torch.Tensor | None, list]:
    good = [(i, t) for i, t in items if isinstance(t, torch.Tensor)]
    bad = [(i, t) for i, t in items if not isinstance(t, torch.Tensor)]
    images = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], images, bad


@dataclass
class Prediction:
    """What a `predict` call wrote: the CSV, how many rows, and the inputs it skipped with the reason."""

    output: Path
    rows: int
    skipped: list[tuple[str, str]] = field(default_factory=list)


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
) -> Prediction:
    """Write one CSV row per readable image of ``inputs``: ``path, top1_label, top1_prob, ...`` (top ``topk``).

    ``options`` are ``train.py`` option values (``batch_size``, ``workers``, ``amp`` and the data config
    overrides); missing ones come from the run's ``args.yaml``, then ``train.py``'s defaults. ``device``
    defaults to ``cuda`` when available, else ``cpu``.
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
    output.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with open(output, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", *(f"top{j}_{c}" for j in range(1, k + 1) for c in ("label", "prob"))])
        for indices, images, bad in tqdm(loader, desc="predict", unit="batch", disable=None):
            for index, problem in bad:
                skipped.append((str(paths[index]), problem))
                logger.warning("skipped %s: %s", paths[index], problem)
            if images is None:
                continue
            with autocast():
                logits = model(images.to(device, non_blocking=True))
            probs, classes = logits.float().softmax(dim=-1).topk(k, dim=-1)
            for index, p_row, c_row in zip(indices, probs.tolist(), classes.tolist()):
                cells = [cell for c, p in zip(c_row, p_row) for cell in (names[c], f"{p:.6f}")]
                writer.writerow([str(paths[index]), *cells])
                rows += 1
    logger.info("wrote %d predictions to %s; skipped %d input(s)", rows, output, len(skipped))
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
    return p


def main(argv: Sequence[str] | None = None) -> Prediction:
    """The command: predict, report skipped inputs, exit non-zero only when nothing could be predicted."""

    def work(args: argparse.Namespace) -> Prediction:
        return predict(
            args.adapter,
            args.inputs,
            args.output,
            topk=args.topk,
            merge=args.merge,
            pretrained_file=args.pretrained_file,
            options={k: getattr(args, k) for k in SHARED},
        )

    return run_tool(build_parser(), argv, work, (AdapterMismatchError, FileNotFoundError, ValueError))


cli = console_script(main)

if __name__ == "__main__":
    cli()
