"""Albumentations pipelines built from a timm data config, with timm's training-augmentation vocabulary.

``data_config`` is the dict returned by ``timm.data.resolve_data_config`` (keys ``input_size`` (C, H, W),
``interpolation``, ``mean``, ``std``, ``crop_pct``; mean/std in 0..1 units).

* train: ``RandomResizedCrop(H, W, scale, ratio)`` + ``HorizontalFlip(p=hflip)`` [+ ``VerticalFlip(p=vflip)``]
  [+ timm AutoAugment / RandAugment / AugMix (``auto_augment``)] [+ ``ColorJitter`` (``color_jitter``)]
  + ``Normalize`` + ``ToTensorV2`` [+ timm ``RandomErasing`` (``reprob``, ``remode``, ``recount``)]
* eval (and train with ``no_aug=True``): resize (shortest side to ``int(size / crop_pct)``; both sides when
  ``H != W``, as timm does) + ``CenterCrop(H, W)`` + ``Normalize`` + ``ToTensorV2``

Steps in brackets are present only when their option is set, so the default train pipeline is exactly the
one built before these options existed (same output for the same seed). The option meanings and order follow
``timm.data.transforms_factory.transforms_imagenet_train`` (timm 1.0): color jitter is dropped when
``auto_augment`` is set (unless the string contains ``'3a'``, as in timm), AutoAugment/RandAugment/AugMix run
on a PIL image after the crop and flips, random erasing runs on the normalized CHW tensor.

The result maps an RGB ``uint8`` HxWx3 array to a ``float32`` CxHxW tensor. Albumentations keeps its own
random state inside ``Compose`` (global ``numpy``/``random`` seeds do not reach it); ``set_random_seed``
reseeds it, which ``neat_vision.data.loader`` does per sample (or per DataLoader worker).

timm's AutoAugment/RandAugment/AugMix draw from Python's global ``random`` and ``numpy.random`` states, and
its RandomErasing from the global torch (CPU) generator. When such a step is present, each call of the
transform seeds those three global generators from ``(seed, n)`` — ``seed`` being the last one given to
``set_random_seed`` (or ``build_transforms(seed=...)``) and ``n`` the number of calls since then — and
restores their previous states afterwards. So the output is a function of the seed (and of ``n``: calls
without a reseed in between get different, still reproducible, augmentations), and the caller's global
random states are left as they were. With no seed at all (``seed=None`` and no ``set_random_seed``) these
steps are seeded from fresh OS entropy, like albumentations' own ``seed=None`` state. Seeding the global
states is not thread safe: do not call one such transform from several threads of one process at once
(DataLoader worker processes are fine).
"""

from __future__ import annotations

import math
import numbers
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no PyPI version check (network) on import

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image, ImageOps
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from timm.data.auto_augment import posterize as timm_posterize
from timm.data.random_erasing import RandomErasing

__all__ = [
    "AUTO_AUGMENT_FORMS",
    "INTERPOLATIONS",
    "RANDOM_ERASING_MODES",
    "ImageTransform",
    "build_transforms",
    "check_auto_augment",
]

INTERPOLATIONS: dict[str, int] = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}

RANDOM_ERASING_MODES: tuple[str, ...] = ("const", "rand", "pixel")
"""timm ``RandomErasing`` fill modes: 0 (const), one normal colour per box (rand), per-pixel normal (pixel)."""

AUTO_AUGMENT_FORMS = (
    "'rand[-m<int>][-n<int>][-p<float>][-mstd<float>][-mmax<int>][-inc<0|1>][-t<weights|3aw|3a>]' "
    "(RandAugment, e.g. 'rand-m9-mstd0.5-inc1'), "
    "'augmix[-m<int>][-w<int>][-d<int>][-a<float>][-b<0|1>][-mstd<float>]' (AugMix, e.g. 'augmix-m5-w4-d2'), "
    "or an AutoAugment policy 'original', 'originalr', 'v0', 'v0r' or '3a' [-mstd<float>] (e.g. 'original')"
)
"""The ``auto_augment`` strings timm 1.0 accepts (timm's ``--aa``); there is no TrivialAugment in timm 1.0."""

# Config sections timm 1.0 parses (timm/data/auto_augment.py); timm silently skips a section without a digit
# (e.g. 'rand-m9-x') and an unknown 't' transform set, so those are refused here before timm sees them.
_RAND_KEYS: dict[str, type] = {"m": int, "n": int, "p": float, "mstd": float, "mmax": int, "inc": int}
_RAND_TRANSFORM_SETS = ("weights", "3aw", "3a")
_AUGMIX_KEYS: dict[str, type] = {"m": int, "w": int, "d": int, "a": float, "b": int, "mstd": float}
_AA_POLICIES = ("original", "originalr", "v0", "v0r", "3a")
_AA_KEYS: dict[str, type] = {"mstd": float}
# PIL resampling filters timm's AA ops may use (PIL affine transforms accept only these three).
_PIL_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_GLOBAL_STREAM_TAG = 0x6E656174  # keeps the global-RNG seeds apart from albumentations' own seed streams


class _TimmPilAugment(A.ImageOnlyTransform):
    """A timm PIL augmentation (AutoAugment / RandAugment / AugMix) applied to an RGB ``uint8`` HxWx3 array.

    Draws from the global ``random`` / ``numpy.random`` states (``ImageTransform`` seeds and restores them).
    """

    def __init__(self, augment: Callable[[Image.Image], Image.Image], name: str, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.augment = augment
        self.name = name

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        out = self.augment(Image.fromarray(np.ascontiguousarray(img)).convert("RGB"))
        return np.array(out, dtype=np.uint8)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("name",)


class ImageTransform:
    """Callable wrapper: ``transform(image_uint8_hwc) -> float32 CHW tensor``.

    ``pipeline`` is the albumentations ``Compose``; ``erase`` (optional) is applied to its output tensor.
    When a step draws from global random states (timm AA / RandAugment / AugMix, ``erase``), each call seeds
    them from ``(seed, calls since the last reseed)`` and restores them afterwards (see the module docstring).
    """

    def __init__(
        self,
        pipeline: A.Compose,
        *,
        erase: Callable[[torch.Tensor], torch.Tensor] | None = None,
        seed: int | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.erase = erase
        self.seed = seed
        self.calls = 0
        self.uses_global_rng = erase is not None or any(isinstance(t, _TimmPilAugment) for t in pipeline.transforms)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if not self.uses_global_rng:
            return self.pipeline(image=image)["image"]
        py_state = random.getstate()
        np_state = np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                self._seed_global_rngs()
                out = self.pipeline(image=image)["image"]
                if self.erase is not None:
                    out = self.erase(out)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return out

    def _seed_global_rngs(self) -> None:
        if self.seed is None:
            sequence = np.random.SeedSequence()  # fresh OS entropy, like albumentations with seed=None
        else:
            sequence = np.random.SeedSequence((_GLOBAL_STREAM_TAG, int(self.seed) % 2**128, self.calls))
        self.calls += 1
        words = sequence.generate_state(6, dtype=np.uint32)
        random.seed(int(words[0]) << 32 | int(words[1]))
        np.random.seed(words[2:4])
        # CPU generator only: torch.manual_seed would also (lazily) reseed CUDA, which fork_rng does not restore
        torch.random.default_generator.manual_seed(int(words[4]) << 32 | int(words[5]))

    def set_random_seed(self, seed: int) -> None:
        """Reseed the augmentation random state (used per sample / per DataLoader worker)."""
        self.pipeline.set_random_seed(seed)
        self.seed = seed
        self.calls = 0

    def __repr__(self) -> str:
        if self.erase is None:
            return f"ImageTransform({self.pipeline!r})"
        return f"ImageTransform({self.pipeline!r}, erase={self.erase!r})"


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


def _timm_augment(text: str, hparams: Mapping[str, Any]) -> Callable[[Image.Image], Image.Image]:
    """timm's own dispatch of an ``auto_augment`` string (``transforms_imagenet_train``)."""
    params = dict(hparams)  # timm setdefault()s into it
    if text.startswith("rand"):
        built = rand_augment_transform(text, params)
    elif text.startswith("augmix"):
        params["translate_pct"] = 0.3
        built = augment_and_mix_transform(text, params)
    else:
        built = auto_augment_transform(text, params)
    _fix_posterize(built)
    return built


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's ``posterize`` where keeping 0 bits gives a black image, as Pillow < 12 did (Pillow >= 12 raises)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size, 0)
    return ImageOps.posterize(img, bits_to_keep)


def _fix_posterize(transform: Any) -> None:
    """Point every posterize op of a built timm transform at `_posterize` (RandAugment's ``inc1`` levels and
    magnitude noise reach 0 bits: 'rand-m9-mstd0.5-inc1' would fail on current Pillow)."""
    ops = list(getattr(transform, "ops", []) or [])
    for sub in getattr(transform, "policy", []) or []:
        ops.extend(sub)
    for op in ops:
        if getattr(op, "aug_fn", None) is timm_posterize:
            op.aug_fn = _posterize


def _section_problem(section: str, keys: Mapping[str, type]) -> str | None:
    match = re.fullmatch(r"([a-z]+)(\d.*)", section)
    if match is None or match.group(1) not in keys:
        return f"unknown section {section!r}"
    key, value = match.groups()
    try:
        keys[key](value)
    except ValueError:
        return f"section {section!r} needs {keys[key].__name__} value after {key!r}"
    return None


def _auto_augment_problem(text: str) -> str | None:
    """Why timm 1.0 would refuse (or silently misread) ``text``; None when it is a valid string."""
    head, *sections = text.split("-")
    if text.startswith("rand"):
        if head != "rand":
            return f"unknown variant {head!r}"
        for section in sections:
            if section.startswith("t"):
                if section[1:] not in _RAND_TRANSFORM_SETS:
                    return f"unknown RandAugment transform set {section!r}"
                continue
            problem = _section_problem(section, _RAND_KEYS)
            if problem:
                return problem
        return None
    if text.startswith("augmix"):
        if head != "augmix":
            return f"unknown variant {head!r}"
        keys = _AUGMIX_KEYS
    else:
        if head not in _AA_POLICIES:
            if head.lower().startswith(("trivial", "ta_")):
                return f"unknown policy {head!r}: timm 1.0 has no TrivialAugment"
            return f"unknown policy {head!r}"
        keys = _AA_KEYS
    for section in sections:
        problem = _section_problem(section, keys)
        if problem:
            return problem
    return None


def check_auto_augment(text: str) -> str | None:
    """None when timm accepts ``text`` as an ``auto_augment`` (``--aa``) string, else a one-line message."""
    if not isinstance(text, str):
        problem: str | None = f"not a string ({type(text).__name__})"
    else:
        problem = _auto_augment_problem(text)
        if problem is None:
            try:
                _timm_augment(text, {"translate_const": 100, "img_mean": (124, 116, 104)})
            except (AssertionError, KeyError, ValueError, TypeError, IndexError) as exc:
                problem = f"timm: {exc}" if str(exc) else f"timm raised {type(exc).__name__}"
    if problem is None:
        return None
    return f"auto_augment={text!r} is not a timm augmentation string ({problem}); allowed: {AUTO_AUGMENT_FORMS}"


def _probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _color_jitter(value: Any) -> tuple[float, float, float, float] | None:
    """timm semantics: a number b -> (b, b, b, 0); 3 or 4 numbers -> (brightness, contrast, saturation[, hue])."""
    if value is None:
        return None
    allowed = (
        "allowed: None, a number >= 0 (brightness = contrast = saturation), or 3 or 4 numbers "
        "(brightness, contrast, saturation >= 0[, hue in [0, 0.5]])"
    )
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        factors = [float(value)] * 3 + [0.0]
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) in (3, 4):
        if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in value):
            raise ValueError(f"color_jitter must be numbers, got {value!r}; {allowed}")
        factors = [float(v) for v in value] + ([0.0] if len(value) == 3 else [])
    else:
        raise ValueError(f"color_jitter={value!r} is not a jitter strength; {allowed}")
    if not all(math.isfinite(f) and f >= 0 for f in factors) or factors[3] > 0.5:
        raise ValueError(f"color_jitter={value!r} is out of range; {allowed}")
    return (factors[0], factors[1], factors[2], factors[3])


def build_transforms(
    data_config: Mapping[str, Any],
    train: bool,
    *,
    hflip: float = 0.5,
    scale: tuple[float, float] = (0.08, 1.0),
    seed: int | None = None,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    vflip: float = 0.0,
    color_jitter: float | tuple[float, ...] | None = None,
    auto_augment: str | None = None,
    reprob: float = 0.0,
    remode: str = "pixel",
    recount: int = 1,
    no_aug: bool = False,
    squash: bool = False,
) -> ImageTransform:
    """Train or eval pipeline for a timm ``data_config``; ``seed`` fixes the augmentation random state.

    Train options, with timm's meanings (``timm/train.py`` flags in brackets):

    * ``hflip`` / ``vflip`` [``--hflip`` / ``--vflip``]: flip probabilities.
    * ``scale`` / ``ratio`` [``--scale`` / ``--ratio``]: ``RandomResizedCrop`` area and aspect-ratio ranges.
    * ``color_jitter`` [``--color-jitter``]: a number b jitters brightness, contrast and saturation by factors
      in ``[max(0, 1 - b), 1 + b]`` (hue untouched); 3 or 4 numbers give (brightness, contrast, saturation[,
      hue]). Ignored when ``auto_augment`` is set (unless it contains ``'3a'``), as in timm. None: off.
    * ``auto_augment`` [``--aa``]: a timm AutoAugment / RandAugment / AugMix string (see ``check_auto_augment``
      and ``AUTO_AUGMENT_FORMS``), e.g. ``'rand-m9-mstd0.5-inc1'``. None: off.
    * ``reprob`` / ``remode`` / ``recount`` [``--reprob`` / ``--remode`` / ``--recount``]: timm random erasing
      of the normalized tensor, with this probability, fill mode (one of ``RANDOM_ERASING_MODES``) and up to
      this many boxes.
    * ``no_aug`` [``--no-aug``]: no augmentation at all; the train pipeline is the eval pipeline (and every
      other train option is ignored, after validation).
    * ``squash``: the eval pipeline (and the train one with ``no_aug``) resizes the image to the input size,
      aspect ratio not kept, without a crop (the VTAB-1k protocol's ``Resize((224, 224))``).

    All options are validated (``ValueError``) whether or not ``train`` is set; eval pipelines ignore them.
    """
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
    vflip = _probability("vflip", vflip)
    reprob = _probability("reprob", reprob)
    if remode not in RANDOM_ERASING_MODES:
        raise ValueError(f"remode must be one of {list(RANDOM_ERASING_MODES)}, got {remode!r}")
    if isinstance(recount, bool) or not isinstance(recount, numbers.Integral) or recount < 1:
        raise ValueError(f"recount must be an integer >= 1 (most erased boxes per image), got {recount!r}")
    if (
        not isinstance(ratio, Sequence)
        or len(ratio) != 2
        or not all(isinstance(r, numbers.Real) and not isinstance(r, bool) and math.isfinite(r) for r in ratio)
        or not 0.0 < ratio[0] <= ratio[1]
    ):
        raise ValueError(f"ratio must be (min, max) aspect ratios with 0 < min <= max, got {ratio!r}")
    jitter = _color_jitter(color_jitter)
    if auto_augment is not None:
        problem = check_auto_augment(auto_augment)
        if problem is not None:
            raise ValueError(problem)
    mean = _triple(data_config, "mean")
    normalize = A.Normalize(mean=mean, std=_triple(data_config, "std"), max_pixel_value=255.0)
    erase = None
    if train and not no_aug:
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale!r}")
        steps: list[A.BasicTransform] = [
            A.RandomResizedCrop(
                size=(height, width), scale=scale, ratio=(float(ratio[0]), float(ratio[1])), interpolation=flag
            ),
            A.HorizontalFlip(p=hflip),
        ]
        if vflip > 0:
            steps.append(A.VerticalFlip(p=vflip))
        if auto_augment is not None:
            hparams: dict[str, Any] = {
                "translate_const": int(min(height, width) * 0.45),
                "img_mean": tuple(min(255, round(255 * x)) for x in mean),
            }
            if interpolation in _PIL_INTERPOLATIONS:  # else timm's default (random bilinear / bicubic)
                hparams["interpolation"] = _PIL_INTERPOLATIONS[interpolation]
            steps.append(_TimmPilAugment(_timm_augment(auto_augment, hparams), auto_augment))
        if jitter is not None and any(jitter) and (auto_augment is None or "3a" in auto_augment):
            brightness, contrast, saturation, hue = jitter
            steps.append(A.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue, p=1.0))
        if reprob > 0:
            erase = RandomErasing(probability=reprob, mode=remode, max_count=int(recount), device="cpu")
    elif squash:
        steps = [A.Resize(height, width, interpolation=flag)]
    else:
        crop_pct = float(_field(data_config, "crop_pct"))
        if crop_pct <= 0:
            raise ValueError(f"data_config['crop_pct'] must be > 0, got {crop_pct!r}")
        if height == width:
            resize: A.BasicTransform = A.SmallestMaxSize(max_size=int(height / crop_pct), interpolation=flag)
        else:
            resize = A.Resize(int(height / crop_pct), int(width / crop_pct), interpolation=flag)
        steps = [resize, A.CenterCrop(height, width, pad_if_needed=True)]
    return ImageTransform(A.Compose([*steps, normalize, ToTensorV2()], seed=seed), erase=erase, seed=seed)
