"""Deterministic, seeded, class-stratified train/val/test splits.

Every split is computed from the label array alone, so the rule can be checked at the real dataset sizes
without any images (see ``SplitRule.sizes``).

The rule
--------
``stratified_holdout(labels, fraction, seed)`` holds out exactly ``ceil(n * fraction)`` of ``n`` samples:

* each class ``c`` with ``n_c`` samples first gets ``floor(n_c * fraction)`` held-out samples;
* the remaining slots go one each to the classes with the largest fractional remainder
  ``n_c * fraction - floor(n_c * fraction)`` (ties broken by a seeded random order);
* inside a class, the held-out samples are the first ones of a seeded random permutation.

Fractions are treated as exact decimals (0.1 is 1/10), so sizes never depend on float rounding.
``ceil`` guarantees a non-empty held-out part for any ``n >= 1`` and a non-empty remainder for ``n >= 2``
when ``fraction <= 1/2``, which keeps tiny datasets usable.

A ``SplitRule`` composes holdouts:

* ``test_fraction=None`` (official test set): the official training pool is split into train and val,
  with ``val = ceil(pool * val_fraction)``; the official test set is used unchanged.
* ``test_fraction=t``: all images form one pool; ``test = ceil(pool * t)`` is held out first, then
  ``val = ceil(rest * val_fraction)`` is held out of the rest. ``val_fraction`` is therefore a fraction of
  the non-test images (60/20/20 is ``test_fraction=0.2, val_fraction=0.25``).

The rules used by ``neat_vision.data.datasets`` and the sizes they give on the real datasets (paper Table 12):

=============  ==========================  ================================  =======================
dataset        pool                        rule                              train / val / test
=============  ==========================  ================================  =======================
OxfordPets     trainval 3,680 + test       ``OFFICIAL_TEST_VAL10``           3,312 / 368 / 3,669
StanfordCars   train 8,144 + test          ``OFFICIAL_TEST_VAL10``           7,329 / 815 / 8,041
CIFAR-10/100   train 50,000 + test         ``OFFICIAL_TEST_VAL10``           45,000 / 5,000 / 10,000
FGVC-Aircraft  trainval 3,334 + test       ``OFFICIAL_TEST_VAL10``           3,000 / 334 / 3,333
DTD            5,640 (split 1, all parts)  ``DTD_RULE`` (test 20%, val 10%)  4,060 / 452 / 1,128
EuroSAT        27,000                      ``POOLED_60_20_20``               16,200 / 5,400 / 5,400
RESISC45       31,500                      ``POOLED_60_20_20``               18,900 / 6,300 / 6,300
=============  ==========================  ================================  =======================

Each holdout draws from its own random stream derived from ``(seed, stage)``, so the same seed always gives
the same split and different seeds give different splits. Returned index arrays are sorted.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = [
    "DTD_RULE",
    "OFFICIAL_TEST_VAL10",
    "POOLED_60_20_20",
    "SPLITS",
    "SplitRule",
    "holdout_size",
    "stratified_holdout",
]

SPLITS = ("train", "val", "test")

_TEST_STAGE = 0
_VAL_STAGE = 1


def _exact(fraction: float, name: str) -> Fraction:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"{name} must be in the open interval (0, 1), got {fraction!r}")
    return Fraction(fraction).limit_denominator(1_000_000)


def _ceil_mul(n: int, frac: Fraction) -> int:
    return -(-n * frac.numerator // frac.denominator)


def holdout_size(n: int, fraction: float) -> int:
    """Number of samples ``stratified_holdout`` holds out of ``n``: ``ceil(n * fraction)``."""
    return _ceil_mul(n, _exact(fraction, "fraction"))


def _rng(seed: int, stage: int) -> np.random.Generator:
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng((seed, stage))


def _holdout(labels: np.ndarray, frac: Fraction, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(classes))
    scaled = counts * frac.numerator
    base = scaled // frac.denominator
    remainder = scaled % frac.denominator
    extra = _ceil_mul(len(labels), frac) - int(base.sum())
    order = np.lexsort((rng.random(len(classes)), -remainder))
    take = base.copy()
    take[order[:extra]] += 1
    held = np.zeros(len(labels), dtype=bool)
    for k in range(len(classes)):
        members = rng.permutation(np.flatnonzero(inverse == k))
        held[members[: take[k]]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(labels))`` into ``(kept, held_out)`` sorted index arrays, stratified by label.

    ``held_out`` has exactly ``ceil(len(labels) * fraction)`` elements (see the module docstring).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    return _holdout(labels, _exact(fraction, "fraction"), _rng(seed, _VAL_STAGE))


@dataclass(frozen=True)
class SplitRule:
    """How a dataset is divided into train/val/test (see the module docstring).

    Attributes:
        val_fraction: fraction of the non-test pool held out as validation.
        test_fraction: fraction of all images held out as test, or ``None`` when an official test set is used.
    """

    val_fraction: float
    test_fraction: float | None = None

    def __post_init__(self) -> None:
        _exact(self.val_fraction, "val_fraction")
        if self.test_fraction is not None:
            _exact(self.test_fraction, "test_fraction")

    @property
    def official_test(self) -> bool:
        """True when the test split is the dataset's official test set rather than carved from the pool."""
        return self.test_fraction is None

    def sizes(self, pool_size: int, test_size: int | None = None) -> dict[str, int]:
        """Split sizes for a pool of ``pool_size`` images (and an official test set of ``test_size``)."""
        if self.test_fraction is None:
            if test_size is None:
                raise ValueError("test_size is required when the rule uses an official test set")
            n_test, rest = test_size, pool_size
        else:
            if test_size is not None:
                raise ValueError(f"test_size must be None when test_fraction={self.test_fraction} is set")
            n_test = holdout_size(pool_size, self.test_fraction)
            rest = pool_size - n_test
        n_val = holdout_size(rest, self.val_fraction)
        return {"train": rest - n_val, "val": n_val, "test": n_test}

    def assign(self, labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        """Sorted index arrays into ``labels`` (the pool) for each split the pool provides.

        With an official test set the result has ``train`` and ``val`` only; otherwise also ``test``.
        """
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
        out: dict[str, np.ndarray] = {}
        pool = np.arange(len(labels))
        if self.test_fraction is not None:
            test_frac = _exact(self.test_fraction, "test_fraction")
            keep, held = _holdout(labels, test_frac, _rng(seed, _TEST_STAGE))
            pool, out["test"] = pool[keep], pool[held]
        keep, held = _holdout(labels[pool], _exact(self.val_fraction, "val_fraction"), _rng(seed, _VAL_STAGE))
        out["train"], out["val"] = pool[keep], pool[held]
        return out


OFFICIAL_TEST_VAL10 = SplitRule(val_fraction=0.1)
"""Official test set; 10% of the official training pool becomes validation."""

DTD_RULE = SplitRule(val_fraction=0.1, test_fraction=0.2)
"""One pool; 20% test, then 10% of the rest validation."""

POOLED_60_20_20 = SplitRule(val_fraction=0.25, test_fraction=0.2)
"""One pool; 60% train, 20% validation, 20% test."""
