"""The run's data: datasets from ``neat_vision.data``, timm's data config with overrides, resumable loaders."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from timm.data import resolve_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset

from neat_vision.data import SPLITS, build_dataset, build_loader, build_transforms
from neat_vision.data.fractal import FractalBatches, FractalCategories
from neat_vision.engine.distributed import DistEnv

__all__ = ["augmentation_options", "build_datasets", "build_loaders", "data_config"]


def data_config(args: argparse.Namespace, model: nn.Module) -> dict[str, Any]:
    """timm's ``resolve_data_config`` for ``model``, overridden by the options that are set.

    Overrides: ``img_size`` (default: ``model_kwargs['img_size']``, else the model's), ``crop_pct``,
    ``interpolation``, ``mean``, ``std``.
    """
    img_size = args.img_size if args.img_size is not None else args.model_kwargs.get("img_size")
    overrides = {
        "img_size": img_size,
        "crop_pct": args.crop_pct,
        "interpolation": args.interpolation,
        "mean": args.mean,
        "std": args.std,
    }
    return resolve_data_config({k: v for k, v in overrides.items() if v is not None}, model=model)


def augmentation_options(args: argparse.Namespace) -> dict[str, Any]:
    """`build_transforms` keywords for the training augmentation options (timm's names and meanings)."""
    jitter = getattr(args, "color_jitter", None)
    return {
        "hflip": args.hflip,
        "scale": tuple(args.crop_scale),
        "ratio": tuple(getattr(args, "ratio", (3 / 4, 4 / 3))),
        "vflip": getattr(args, "vflip", 0.0),
        "color_jitter": None if jitter is None else (jitter[0] if len(jitter) == 1 else tuple(jitter)),
        "auto_augment": getattr(args, "aa", None),
        "reprob": getattr(args, "reprob", 0.0),
        "remode": getattr(args, "remode", "pixel"),
        "recount": getattr(args, "recount", 1),
        "no_aug": getattr(args, "no_aug", False),
        "squash": getattr(args, "squash", False),
    }


def build_datasets(args: argparse.Namespace, env: DistEnv) -> dict[str, Dataset]:
    """The train, val and test splits of ``args.dataset`` (rank 0 first when downloading)."""
    if args.dataset is None:
        raise ValueError("dataset is not set: pass --dataset NAME (see neat_vision.data.available_datasets())")
    if args.dataset == "fractal":
        categories = FractalCategories(args.fractal_classes, args.seed)
        return {
            split: _FractalSplit(
                categories, args.batch_size * (args.fractal_steps if split == "train" else args.fractal_eval_batches)
            )
            for split in SPLITS
        }

    def load() -> dict[str, Dataset]:
        return {
            split: build_dataset(
                args.dataset,
                args.data_dir,
                split,
                seed=args.seed,
                download=args.download,
                skip_corrupt=args.skip_corrupt,
                protocol=getattr(args, "split_protocol", None),
            )
            for split in SPLITS
        }

    if not (args.download and env.distributed):
        return load()
    datasets = load() if env.is_main else None
    env.barrier()
    return datasets if datasets is not None else load()


def build_loaders(
    args: argparse.Namespace, datasets: dict[str, Dataset], config: dict[str, Any], env: DistEnv
) -> dict[str, DataLoader]:
    """Resumable loaders: train (shuffled, augmented, sharded), val and test (exact unpadded shards)."""
    if args.dataset == "fractal":
        return _fractal_loaders(args, datasets["train"], config, env)
    loaders = {}
    for split, dataset in datasets.items():
        train = split == "train"
        transform = build_transforms(config, train, **augmentation_options(args))
        loaders[split] = build_loader(
            dataset,
            transform,
            args.batch_size,
            train=train,
            num_workers=args.workers,
            distributed=env.distributed,
            seed=args.seed,
            resumable=True,
        )
    return loaders


@dataclass
class _FractalSplit:
    """A fractal split as the engine sees a dataset: its categories and its size (samples per epoch)."""

    categories: FractalCategories
    size: int

    @property
    def num_classes(self) -> int:
        return self.categories.num_classes

    def __len__(self) -> int:
        return self.size


def _fractal_loaders(
    args: argparse.Namespace, split: _FractalSplit, config: dict[str, Any], env: DistEnv
) -> dict[str, FractalBatches]:
    """Fractal batches rendered on the run's device (the GPU when there is one): no files, no workers.

    Train draws ``fractal_steps`` random batches per epoch; val and test are fixed sets of new instances
    (test instances start after val's). Each rank renders its own batches (seeded by rank).
    """
    common = dict(
        instances_per_class=args.fractal_instances,
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        device=env.device,
    )
    size = config["input_size"][-1]
    seed = args.seed + 7919 * env.rank
    categories = split.categories
    return {
        "train": FractalBatches(categories, args.batch_size, args.fractal_steps, size, seed=seed, **common),
        "val": FractalBatches(
            categories, args.batch_size, args.fractal_eval_batches, size, seed=seed, split="val", **common
        ),
        "test": FractalBatches(
            categories,
            args.batch_size,
            args.fractal_eval_batches,
            size,
            seed=seed,
            split="test",
            **common,
        ),
    }
