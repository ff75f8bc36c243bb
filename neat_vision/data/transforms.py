"""Albumentations pipelines built from a timm data config.

``data_config`` is the dict returned by ``timm.data.resolve_data_config`` (keys ``input_size`` (C, H, W),
``interpolation``, ``mean``, ``std``, ``crop_pct``; mean/std in 0..1 units).

* train: ``RandomResizedCrop(H, W, scale)`` + ``HorizontalFlip(p=hflip)`` + ``Normalize`` + ``ToTensorV2``
* eval: resize (shortest side to ``int(size / crop_pct)``; both sides when ``H != W``, as timm does)
  + ``CenterCrop(H, W)`` + ``Normalize`` + ``ToTensorV2``

The result maps an RGB ``uint8`` HxWx3 array to a ``float32`` CxHxW tensor. Albumentations keeps its own
random state inside ``Compose`` (global ``numpy``/``random`` seeds do not reach it); ``set_random_seed``
reseeds it, which ``neat_vision.data.loader`` does per DataLoader worker.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no PyPI version check (network) on import

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

__all__ = ["INTERPOLATIONS", "ImageTransform", "build_transforms"]

INTERPOLATIONS: dict[str, int] = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


class ImageTransform:
    """Callable wrapper: ``transform(image_uint8_hwc) -> float32 CHW tensor``."""

    def __init__(self, pipeline: A.Compose) -> None:
        self.pipeline = pipeline

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        return self.pipeline(image=image)["image"]

    def set_random_seed(self, seed: int) -> None:
        """Reseed the augmentation random state (used per DataLoader worker)."""
        self.pipeline.set_random_seed(seed)

    def __repr__(self) -> str:
        return f"ImageTransform({self.pipeline!r})"


def _field(data_config: Mapping[str, Any], key: str) -> Any:
    if key not in data_config:
        raise KeyError(
            f"data_config is missing {key!r} (have {sorted(data_config)}); use timm.data.resolve_data_config"
        )
    return data_config[key]


def _triple(data_config: Mapping[str, Any], key: str) -> tuple[float, float, float]:
    value = _field(data_config, key)
    if not isinstance(value, Sequence) or len(value) != 3:
        raise ValueError(f"data_config[{key!r}] must be 3 per-channel values in 0..1, got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def build_transforms(
    data_config: Mapping[str, Any],
    train: bool,
    *,
    hflip: float = 0.5,
    scale: tuple[float, float] = (0.08, 1.0),
    seed: int | None = None,
) -> ImageTransform:
    """Train or eval pipeline for a timm ``data_config``; ``seed`` fixes the augmentation random state."""
    input_size = _field(data_config, "input_size")
    if len(input_size) != 3 or input_size[0] != 3:
        raise ValueError(f"data_config['input_size'] must be (3, H, W), got {input_size!r}")
    height, width = int(input_size[1]), int(input_size[2])
    interpolation = _field(data_config, "interpolation")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"data_config['interpolation'] must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
    flag = INTERPOLATIONS[interpolation]
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f"hflip must be a probability in [0, 1], got {hflip!r}")
    normalize = A.Normalize(mean=_triple(data_config, "mean"), std=_triple(data_config, "std"), max_pixel_value=255.0)
    if train:
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale!r}")
        steps: list[A.BasicTransform] = [
            A.RandomResizedCrop(size=(height, width), scale=scale, interpolation=flag),
            A.HorizontalFlip(p=hflip),
        ]
    else:
        crop_pct = float(_field(data_config, "crop_pct"))
        if crop_pct <= 0:
            raise ValueError(f"data_config['crop_pct'] must be > 0, got {crop_pct!r}")
        if height == width:
            resize: A.BasicTransform = A.SmallestMaxSize(max_size=int(height / crop_pct), interpolation=flag)
        else:
            resize = A.Resize(int(height / crop_pct), int(width / crop_pct), interpolation=flag)
        steps = [resize, A.CenterCrop(height, width, pad_if_needed=True)]
    return ImageTransform(A.Compose([*steps, normalize, ToTensorV2()], seed=seed))
