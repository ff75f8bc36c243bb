"""DataLoader construction with reproducible shuffling and per-worker augmentation seeds.

Reproducibility: shuffling uses a ``torch.Generator`` seeded with ``seed`` (or ``DistributedSampler(seed)``
when distributed). DataLoader derives each worker's base seed from that generator, and ``seed_worker``
reseeds ``numpy``, ``random`` and the albumentations pipeline (which has its own random state) from it, so
workers never share augmentation streams and a run is repeatable for a fixed ``seed`` and worker count. With
``num_workers=0`` the transform is reseeded once from ``seed`` in the main process.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

__all__ = ["EpochSampler", "SyntheticImages", "TransformedDataset", "build_loader", "sample_seed", "seed_worker"]


class TransformedDataset(Dataset):
    """Applies ``transform`` to the image of each ``(image, label)`` item (runs inside loader workers)."""

    def __init__(self, dataset: Dataset, transform: Callable[[np.ndarray], Any]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        """``key`` is an index, or ``(index, seed)`` to reseed the transform for this sample first."""
        if isinstance(key, tuple):
            key, seed = key
            self.reseed(seed)
        image, label = self.dataset[key]
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


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Augmentation seed of sample ``index`` in ``epoch`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence((seed, epoch, index)).generate_state(1)[0])


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` yielding ``(index, sample_seed(seed, epoch, index))`` keys, resumable mid-epoch.

    Shuffling is ``DistributedSampler``'s (a permutation seeded by ``seed + epoch``); it works without a
    process group (``num_replicas=1, rank=0``). ``set_epoch(epoch, start)`` also skips the first ``start``
    items of this rank's share, without loading them. ``pad=False`` (no shuffling) gives unpadded strided
    shards ``rank::num_replicas``, so every sample is seen exactly once across ranks (exact evaluation).
    ``block=B`` (training: the batch size) deals the epoch's order in blocks of ``B`` (`_blocked_share`), so
    the ``k``-th batch of rank ``r`` holds the items of batch ``k * num_replicas + r`` of one process's order.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        pad: bool = True,
        block: int = 1,
    ) -> None:
        if shuffle and not pad:
            raise ValueError("pad=False (exact strided shards) is for evaluation and needs shuffle=False")
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.pad = pad
        self.block = block
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select ``epoch``'s order and seeds, starting at item ``start`` of this rank's share."""
        if not 0 <= start <= self._share_len():
            raise ValueError(f"start must be in [0, {self._share_len()}], got {start}")
        super().set_epoch(epoch)
        self.start = start

    def _epoch_order(self) -> list[int]:
        """The whole epoch's order over all ranks, padded or cut as ``DistributedSampler`` does."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(len(self.dataset), generator=g).tolist()
        else:
            indices = list(range(len(self.dataset)))
        if not self.drop_last:
            padding = self.total_size - len(indices)
            if padding <= len(indices):
                indices += indices[:padding]
            else:
                indices += (indices * math.ceil(padding / len(indices)))[:padding]
        else:
            indices = indices[: self.total_size]
        return indices

    def _share_len(self) -> int:
        return self.num_samples if self.pad else len(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self._share_len() - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.pad:
            share = list(super().__iter__())
            if self.block > 1:  # the same items over all ranks, dealt in whole blocks
                share = _blocked_share(self._epoch_order(), self.rank, self.num_replicas, self.block)
        else:
            share = list(range(self.rank, len(self.dataset), self.num_replicas))
        for index in share[self.start :]:
            yield index, sample_seed(self.seed, self.epoch, index)


def _blocked_share(order: list[int], rank: int, world: int, block: int) -> list[int]:
    """This rank's share of ``order`` (the epoch's padded order) in whole blocks: block ``k * world + rank`` is
    its ``k``-th; the items after the last full round of blocks are dealt one by one (``rank::world``)."""
    rounds = len(order) // (world * block)
    share = [i for k in range(rounds) for i in order[(k * world + rank) * block : (k * world + rank + 1) * block]]
    return share + order[rounds * world * block :][rank::world]


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
    resumable: bool = False,
) -> DataLoader:
    """DataLoader over ``dataset`` with ``transform`` applied in the workers.

    Train loaders shuffle (reproducibly from ``seed``) and drop the last incomplete batch by default. With
    ``distributed=True`` (process group initialised) a ``DistributedSampler`` shards the data and shuffles
    for training; the caller must call ``loader.sampler.set_epoch(epoch)`` each epoch. Without
    ``drop_last`` the sampler pads the shards to equal length by repeating samples, as
    ``DistributedSampler`` does. ``pin_memory`` defaults to ``torch.cuda.is_available()``.

    ``resumable=True`` uses an ``EpochSampler`` (with or without a process group; see the module docstring):
    call ``loader.sampler.set_epoch(epoch, start)`` before each epoch. Its eval loaders are not padded.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    drop_last = train if drop_last is None else drop_last
    pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
    wrapped = TransformedDataset(dataset, transform)
    rank, world = 0, 1
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
        rank, world = dist.get_rank(), dist.get_world_size()
    sampler = None
    if resumable:
        sampler = EpochSampler(
            wrapped,
            num_replicas=world,
            rank=rank,
            shuffle=train,
            seed=seed,
            drop_last=drop_last,
            pad=train,
            block=batch_size if train else 1,
        )
    elif distributed:
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

    def __init__(self, num_samples: int, num_classes: int, size: int | tuple[int, int] = 224, seed: int = 0) -> None:
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
