"""Data layer: dataset registry and loaders, deterministic splits, albumentations transforms, DataLoaders."""

from neat_vision.data.datasets import (
    ArrayImageDataset,
    CorruptImageError,
    DatasetEntry,
    DatasetNotFoundError,
    FileImageDataset,
    ImageDataset,
    apply_split_rule,
    available_datasets,
    build_dataset,
    dataset_info,
    read_rgb,
    register_dataset,
)
from neat_vision.data.loader import SyntheticImages, TransformedDataset, build_loader, seed_worker
from neat_vision.data.splits import (
    DTD_RULE,
    OFFICIAL_TEST_VAL10,
    POOLED_60_20_20,
    SPLITS,
    SplitRule,
    holdout_size,
    stratified_holdout,
)
from neat_vision.data.transforms import INTERPOLATIONS, ImageTransform, build_transforms

__all__ = [
    "DTD_RULE",
    "INTERPOLATIONS",
    "OFFICIAL_TEST_VAL10",
    "POOLED_60_20_20",
    "SPLITS",
    "ArrayImageDataset",
    "CorruptImageError",
    "DatasetEntry",
    "DatasetNotFoundError",
    "FileImageDataset",
    "ImageDataset",
    "ImageTransform",
    "SplitRule",
    "SyntheticImages",
    "TransformedDataset",
    "apply_split_rule",
    "available_datasets",
    "build_dataset",
    "build_loader",
    "build_transforms",
    "dataset_info",
    "holdout_size",
    "read_rgb",
    "register_dataset",
    "seed_worker",
    "stratified_holdout",
]
