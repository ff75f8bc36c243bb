"""DataLoader construction with reproducible shuffling and per-worker augmentation seeds.

Reproducibility: shuffling uses a ``torch.Generator`` seeded with ``seed`` (or ``DistributedSampler(seed)``
when distributed). DataLoader derives each worker's base seed from that generator, and ``seed_worker``
reseeds ``numpy``, ``random`` and the albumentations pipeline (which has its own random state) from it, so
workers never share augmentation streams and a run is repeatable for a fixed ``seed`` and worker count. With
``num_workers=0`` the transform is reseeded once from ``seed`` in the main process.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

__all__ = ["SyntheticImages", "TransformedDataset", "build_loader", "seed_worker"]


class TransformedDataset(Dataset):
    """Applies ``transform`` to the image of each ``(image, label)`` item (runs inside loader workers)."""

    def __init__(self, dataset: Dataset, transform: Callable[[np.ndarray], Any]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        return self.transform(image), int(label)

    def reseed(self, seed: int) -> None:
        """Reseed the transform's own random state when it has one (e.g. ``ImageTransform``)."""
        set_seed = getattr(self.transform, "set_random_seed", None)
        if callable(set_seed):
            set_seed(seed)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed numpy, random and the transform from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, TransformedDataset):
        info.dataset.reseed(seed)


def build_loader(
    dataset: Dataset,
    transform: Callable[[np.ndarray], Any],
    batch_size: int,
    *,
    train: bool,
    num_workers: int,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool | None = None,
    pin_memory: bool | None = None,
) -> DataLoader:
    """DataLoader over ``dataset`` with ``transform`` applied in the workers.

    Train loaders shuffle (reproducibly from ``seed``) and drop the last incomplete batch by default. With
    ``distributed=True`` (process group initialised) a ``DistributedSampler`` shards the data and shuffles
    for training; the caller must call ``loader.sampler.set_epoch(epoch)`` each epoch. Without
    ``drop_last`` the sampler pads the shards to equal length by repeating samples, as
    ``DistributedSampler`` does. ``pin_memory`` defaults to ``torch.cuda.is_available()``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    drop_last = train if drop_last is None else drop_last
    pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
    wrapped = TransformedDataset(dataset, transform)
    rank = 0
    sampler = None
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
        rank = dist.get_rank()
        sampler = DistributedSampler(wrapped, shuffle=train, seed=seed, drop_last=drop_last)
    generator = torch.Generator()
    generator.manual_seed(seed + rank)
    if num_workers == 0:
        wrapped.reseed(seed + rank)
    return DataLoader(
        wrapped,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        worker_init_fn=seed_worker,
        generator=generator,
    )


class SyntheticImages(Dataset):
    """Random RGB ``uint8`` images with deterministic labels, for dry runs and benchmarks.

    Item ``i`` is generated from ``(seed, i)``, so it is identical on every access and in every worker;
    its label is ``i % num_classes``.
    """

    def __init__(
        self, num_samples: int, num_classes: int, size: int | tuple[int, int] = 224, seed: int = 0
    ) -> None:
        if num_samples < 1 or num_classes < 1:
            raise ValueError(f"num_samples and num_classes must be >= 1, got {num_samples}, {num_classes}")
        self.num_samples = num_samples
        self.classes = [str(c) for c in range(num_classes)]
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.seed = seed
        self.skipped = 0

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = np.random.default_rng((self.seed, index))
        image = rng.integers(0, 256, size=(*self.size, 3), dtype=np.uint8)
        return image, index % self.num_classes
