"""FractalDB-style formula-driven images: fractals rendered from random iterated function systems.

No natural images are involved: every category is a random contractive iterated function system (IFS)
and every image is a rendering of its attractor, following FractalDB (Kataoka et al., "Pre-training
without Natural Images", ACCV 2020) and its ViT study (Nakashima et al., "Can Vision Transformers Learn
without Natural Images?", AAAI 2022).

Categories (``FractalCategories``)
    Category ``k`` is drawn by ``numpy.random.default_rng((seed, k))``, so it does not depend on
    ``num_classes``. It has ``n ~ U{2, 3, 4}`` affine maps ``f_i(p) = A_i p + t_i``; the six coefficients
    ``(a, b, c, d, e, f)`` with ``A_i = [[a, b], [c, d]]`` and ``t_i = (e, f)`` are ``U(-1, 1)`` as in
    FractalDB. Rejection rules:

    * contractivity: a map is redrawn until its largest singular value is ``< max_singular_value``
      (default 0.8). The bound is tightened so that maps stay contractive after instance jitter:
      ``(1 + sqrt(2) * jitter) * max_singular_value < 1`` is required (the jitter perturbation has
      Frobenius norm at most ``jitter * |A|_F <= sqrt(2) * jitter * |A|_2``);
    * degeneracy: the whole system is redrawn while its attractor, rendered at 32 x 32 px without margin
      (aspect ratio kept), occupies fewer than ``min_fill`` (default 0.12) of the pixels, which removes
      systems collapsing to points, lines or thin curves (FractalDB's filling-rate filter).

    Map ``i`` is chosen with probability ``p_i`` proportional to ``|det A_i|``, floored at
    ``min_prob`` (default 0.05) after normalisation and renormalised. Systems are stored padded to
    4 maps; padding maps have zero probability and are never chosen.

Instances
    Instance ``j`` of category ``k`` multiplies each of the 6 coefficients of every map by ``1 + eps``,
    ``eps ~ U(-jitter, jitter)`` (default ``jitter = 0.1``; probabilities are kept), and flips the image
    horizontally and vertically, each with probability 1/2. The randomness comes from a counter-based
    integer hash of ``(seed, k, j)`` (no global RNG state, no batch dependence): the same triple gives
    bit-identical images on CPU regardless of which other images share the batch.

Renderer (``render_fractals``)
    Chaos game, batched over images and points with torch: ``num_points`` walkers start on the
    attractor (the fixed point of map 0), each iteration applies one randomly chosen map per walker;
    after ``burn_in`` iterations (which decorrelate the walkers) every visited point is recorded, giving
    ``num_points * (iterations - burn_in)`` points per image (default 256 * 16 = 4096). The point cloud
    is scaled uniformly (aspect ratio kept) and centred into the image with a margin of
    ``margin * img_size`` pixels on each side (default 1/16), hits are counted per pixel, and the
    intensity is ``min(1, log(1 + hits) / log(1 + 2 * mean hits of the occupied pixels))``. Images are
    grayscale replicated into 3 channels, so colour cannot act as a class shortcut. On CPU 256 images of
    32 x 32 px (4096 points each) render in about 35-55 ms.

``FractalDataset`` renders single images on CPU through the same renderer and returns RGB ``uint8``
arrays; its ``val`` split uses instance indices starting at ``VAL_INSTANCE_OFFSET``, i.e. new instances
of the training categories.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["VAL_INSTANCE_OFFSET", "FractalCategories", "FractalDataset", "render_fractals"]

MAX_MAPS = 4
VAL_INSTANCE_OFFSET = 1 << 30
TEST_INSTANCE_SHIFT = 1 << 29  # FractalBatches' test instances: after val's
_FILL_CHECK_SIZE = 32
_MAX_ROUNDS = 1000
_MASK32 = 0xFFFFFFFF
_NUM_INSTANCE_DRAWS = MAX_MAPS * 6 + 2  # coefficient jitters + 2 flips
_CHAOS_COUNTER_BASE = 64


def _hash32(x: Tensor) -> Tensor:
    """Bijective mix of 32-bit values held in int64 (constants < 2**31 keep products below 2**63)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x297A2D39) & _MASK32
    return x ^ (x >> 15)


def _uniform(keys: Tensor, counters: Tensor) -> Tensor:
    """U[0, 1) float32 of shape ``keys.shape + counters.shape`` from per-image keys and counters."""
    mixed = _hash32(keys.reshape(keys.shape + (1,) * counters.dim()) ^ _hash32(counters))
    return (mixed >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _instance_keys(seed: int, class_ids: Tensor, instance_ids: Tensor) -> Tensor:
    """(B,) int64 32-bit keys from ``(seed, class, instance)``."""
    key = _hash32(torch.full_like(class_ids, seed))
    key = _hash32(key ^ class_ids)
    return _hash32(key ^ instance_ids)


def _render(
    params: Tensor,
    thresholds: Tensor,
    keys: Tensor,
    flips: Tensor,
    *,
    img_size: int,
    num_points: int,
    iterations: int,
    burn_in: int,
    margin: float,
) -> Tensor:
    """Chaos-game rendering of a batch of IFS.

    params (B, 4, 6) map coefficients (a, b, c, d, e, f); thresholds (B, 3) cumulative probabilities of
    maps 0..2 (inf past the last real map); keys (B,) int64 random keys; flips (B, 2) bool (horizontal,
    vertical). Returns (B, img_size, img_size) float32 intensities in [0, 1].
    """
    batch, device = params.shape[0], params.device
    a, b, c, d, e, f = params[:, 0].unbind(-1)
    det = (1 - a) * (1 - d) - b * c  # fixed point of map 0: (I - A) p = t
    x = ((1 - d) * e + b * f) / det
    y = (c * e + (1 - a) * f) / det
    x = x[:, None].expand(batch, num_points)
    y = y[:, None].expand(batch, num_points)
    flat_params = params.reshape(batch * MAX_MAPS, 6)
    row_offset = (torch.arange(batch, device=device) * MAX_MAPS)[:, None]
    point_counter = torch.arange(num_points, device=device, dtype=torch.int64)
    recorded_x, recorded_y = [], []
    for step in range(iterations):
        u = _uniform(keys, _CHAOS_COUNTER_BASE + step * num_points + point_counter)
        choice = (u[:, :, None] >= thresholds[:, None, :]).sum(-1)
        ma, mb, mc, md, me, mf = flat_params[row_offset + choice].unbind(-1)
        x, y = ma * x + mb * y + me, mc * x + md * y + mf
        if step >= burn_in:
            recorded_x.append(x)
            recorded_y.append(y)
    xs, ys = torch.cat(recorded_x, 1), torch.cat(recorded_y, 1)
    x_min, x_max = xs.aminmax(dim=1)
    y_min, y_max = ys.aminmax(dim=1)
    pad = margin * img_size
    extent = torch.maximum(x_max - x_min, y_max - y_min).clamp_min(1e-12)
    scale = ((img_size - 2 * pad) / extent)[:, None]
    px = pad + (xs - ((x_min + x_max) / 2)[:, None]) * scale + (img_size - 2 * pad) / 2
    py = pad + (ys - ((y_min + y_max) / 2)[:, None]) * scale + (img_size - 2 * pad) / 2
    col = px.floor().long().clamp_(0, img_size - 1)
    row = py.floor().long().clamp_(0, img_size - 1)
    col = torch.where(flips[:, :1], img_size - 1 - col, col)
    row = torch.where(flips[:, 1:], img_size - 1 - row, row)
    image_offset = torch.arange(batch, device=device)[:, None] * (img_size * img_size)
    flat = (image_offset + row * img_size + col).reshape(-1)
    hits = torch.bincount(flat, minlength=batch * img_size * img_size).reshape(batch, img_size, img_size)
    hits = hits.to(torch.float32)
    saturation = 2 * hits.sum(dim=(1, 2), keepdim=True) / (hits > 0).sum(dim=(1, 2), keepdim=True)
    return (torch.log1p(hits) / torch.log1p(saturation)).clamp_(max=1.0)


def _spectral_norm(coeffs: np.ndarray) -> np.ndarray:
    """(...,) largest singular value of the 2x2 matrices [[a, b], [c, d]] in coeffs (..., >=4)."""
    a, b, c, d = coeffs[..., 0], coeffs[..., 1], coeffs[..., 2], coeffs[..., 3]
    frob2, det = a * a + b * b + c * c + d * d, a * d - b * c
    return np.sqrt((frob2 + np.sqrt(np.maximum(frob2 * frob2 - 4 * det * det, 0.0))) / 2)


def _sample_system(rng: np.random.Generator, max_singular_value: float) -> np.ndarray:
    """(n, 6) coefficients of n ~ U{2, 3, 4} maps, each redrawn until its spectral norm is below the bound."""
    num_maps = int(rng.integers(2, MAX_MAPS + 1))
    maps = np.empty((0, 6))
    while len(maps) < num_maps:
        candidates = rng.uniform(-1.0, 1.0, size=(16, 6))
        maps = np.concatenate([maps, candidates[_spectral_norm(candidates) < max_singular_value]])
    return maps[:num_maps]


def _map_probabilities(system: np.ndarray, min_prob: float) -> np.ndarray:
    """(n,) probabilities proportional to |det A_i|, floored at ``min_prob`` and renormalised."""
    det = np.abs(system[:, 0] * system[:, 3] - system[:, 1] * system[:, 2])
    prob = np.maximum(det / max(det.sum(), 1e-300), min_prob)
    return prob / prob.sum()


def _thresholds(probs: Tensor, num_maps: Tensor) -> Tensor:
    """(C, 3) cumulative probabilities of maps 0..2, inf where no later real map exists."""
    cumulative = probs.cumsum(-1)[:, : MAX_MAPS - 1]
    later_map_exists = torch.arange(1, MAX_MAPS, device=probs.device)[None, :] < num_maps[:, None]
    return torch.where(later_map_exists, cumulative, torch.full_like(cumulative, math.inf))


def _stack_systems(systems: list[np.ndarray], min_prob: float) -> tuple[Tensor, Tensor, Tensor]:
    """Pad systems to 4 maps: params (C, 4, 6) float32, probs (C, 4) float32, num_maps (C,) int64."""
    params = np.zeros((len(systems), MAX_MAPS, 6))
    probs = np.zeros((len(systems), MAX_MAPS))
    for k, system in enumerate(systems):
        params[k, : len(system)] = system
        probs[k, : len(system)] = _map_probabilities(system, min_prob)
    num_maps = torch.tensor([len(system) for system in systems], dtype=torch.int64)
    return torch.tensor(params, dtype=torch.float32), torch.tensor(probs, dtype=torch.float32), num_maps


class FractalCategories:
    """Random contractive IFS categories, stacked as tensors for the batched renderer.

    Attributes: ``params`` (C, 4, 6) float32 map coefficients (a, b, c, d, e, f), ``probs`` (C, 4) map
    probabilities (zero on padding), ``num_maps`` (C,) int64, ``thresholds`` (C, 3) cumulative
    probabilities used to pick maps. See the module docstring for the sampling rules.
    """

    def __init__(
        self,
        num_classes: int,
        seed: int,
        *,
        max_singular_value: float = 0.8,
        jitter: float = 0.1,
        min_fill: float = 0.12,
        min_prob: float = 0.05,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0 <= seed < 1 << 32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        if not 0 < max_singular_value or (1 + math.sqrt(2) * jitter) * max_singular_value >= 1:
            raise ValueError(
                f"max_singular_value must be in (0, 1 / (1 + sqrt(2) * jitter)) = "
                f"(0, {1 / (1 + math.sqrt(2) * jitter):.4f}) for jitter={jitter}, got {max_singular_value}"
            )
        if not 0 <= min_fill < 1:
            raise ValueError(f"min_fill must be in [0, 1), got {min_fill}")
        if not 0 <= min_prob <= 1 / MAX_MAPS:
            raise ValueError(f"min_prob must be in [0, {1 / MAX_MAPS}], got {min_prob}")
        self.num_classes, self.seed, self.jitter = num_classes, seed, jitter
        self.max_singular_value, self.min_fill, self.min_prob = max_singular_value, min_fill, min_prob
        rngs = [np.random.default_rng((seed, k)) for k in range(num_classes)]
        systems = [_sample_system(rng, max_singular_value) for rng in rngs]
        pending = list(range(num_classes))
        for _ in range(_MAX_ROUNDS):
            params, probs, num_maps = _stack_systems([systems[k] for k in pending], min_prob)
            keys = torch.tensor([int(rngs[k].integers(1 << 32)) for k in pending], dtype=torch.int64)
            images = _render(
                params,
                _thresholds(probs, num_maps),
                keys,
                torch.zeros(len(pending), 2, dtype=torch.bool),
                img_size=_FILL_CHECK_SIZE,
                num_points=256,
                iterations=26,
                burn_in=10,
                margin=0.0,
            )
            fill = (images > 0).float().mean(dim=(1, 2))
            pending = [k for k, ok in zip(pending, (fill >= min_fill).tolist(), strict=True) if not ok]
            if not pending:
                break
            for k in pending:
                systems[k] = _sample_system(rngs[k], max_singular_value)
        else:
            raise RuntimeError(f"{len(pending)} categories still fail min_fill={min_fill} after {_MAX_ROUNDS} draws")
        self.params, self.probs, self.num_maps = _stack_systems(systems, min_prob)
        self.thresholds = _thresholds(self.probs, self.num_maps)

    @property
    def device(self) -> torch.device:
        return self.params.device

    def to(self, device: torch.device | str) -> FractalCategories:
        """Move the parameter tensors to ``device`` in place; returns self."""
        for name in ("params", "probs", "num_maps", "thresholds"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def render_fractals(
    categories: FractalCategories,
    class_ids: Tensor,
    instance_ids: Tensor,
    *,
    img_size: int,
    num_points: int = 256,
    iterations: int = 26,
    burn_in: int = 10,
    margin: float = 1 / 16,
    device: torch.device | str | None = None,
) -> Tensor:
    """Render instances of fractal categories in one batch.

    class_ids, instance_ids: (B,) integer tensors (classes in [0, num_classes), instances in [0, 2**32)).
    Images use ``categories.seed``; ``num_points`` walkers per image record ``iterations - burn_in``
    points each. Runs on ``device`` (default: the categories' device; categories are moved there).
    Returns (B, 3, img_size, img_size) float32 in [0, 1].
    """
    if class_ids.dim() != 1 or instance_ids.shape != class_ids.shape:
        raise ValueError(
            f"class_ids and instance_ids must be 1-D of equal length, got shapes "
            f"{tuple(class_ids.shape)} and {tuple(instance_ids.shape)}"
        )
    if class_ids.dtype.is_floating_point or instance_ids.dtype.is_floating_point:
        raise ValueError(f"class_ids/instance_ids must be integer, got {class_ids.dtype}/{instance_ids.dtype}")
    if img_size < 2:
        raise ValueError(f"img_size must be >= 2, got {img_size}")
    if num_points < 1 or iterations < 1 or num_points * iterations >= 1 << 31:
        raise ValueError(
            f"num_points and iterations must be >= 1 with num_points * iterations < 2**31, "
            f"got num_points={num_points}, iterations={iterations}"
        )
    if not 0 <= burn_in < iterations:
        raise ValueError(f"burn_in must be in [0, iterations={iterations}), got {burn_in}")
    if not 0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin}")
    if device is not None and torch.device(device) != categories.device:
        categories.to(device)
    class_ids = class_ids.to(device=categories.device, dtype=torch.int64)
    instance_ids = instance_ids.to(device=categories.device, dtype=torch.int64)
    if class_ids.numel() == 0:
        return torch.zeros(0, 3, img_size, img_size, device=categories.device)
    lo, hi = class_ids.aminmax()
    if lo < 0 or hi >= categories.num_classes:
        raise ValueError(f"class_ids must be in [0, {categories.num_classes}), got range [{lo}, {hi}]")
    lo, hi = instance_ids.aminmax()
    if lo < 0 or hi > _MASK32:
        raise ValueError(f"instance_ids must be in [0, 2**32), got range [{lo}, {hi}]")
    keys = _instance_keys(categories.seed, class_ids, instance_ids)
    draws = _uniform(keys, torch.arange(_NUM_INSTANCE_DRAWS, device=categories.device))
    eps = (2 * draws[:, : MAX_MAPS * 6] - 1) * categories.jitter
    params = categories.params[class_ids] * (1 + eps.reshape(-1, MAX_MAPS, 6))
    intensity = _render(
        params,
        categories.thresholds[class_ids],
        keys,
        draws[:, MAX_MAPS * 6 :] < 0.5,
        img_size=img_size,
        num_points=num_points,
        iterations=iterations,
        burn_in=burn_in,
        margin=margin,
    )
    return intensity[:, None].expand(-1, 3, -1, -1).contiguous()


class FractalDataset(Dataset):
    """FractalDB-style dataset of ``num_classes * instances_per_class`` images rendered on the fly (CPU).

    Items are ``(image, label)`` with image an RGB ``uint8`` array (img_size, img_size, 3). Index ``i``
    is instance ``i % instances_per_class`` of class ``i // instances_per_class``; the ``val`` split
    shifts instance indices by ``VAL_INSTANCE_OFFSET`` so its images are unseen instances.
    """

    def __init__(
        self,
        num_classes: int,
        instances_per_class: int,
        img_size: int,
        seed: int,
        split: str = "train",
        *,
        num_points: int = 256,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 1 <= instances_per_class <= VAL_INSTANCE_OFFSET:
            raise ValueError(f"instances_per_class must be in [1, {VAL_INSTANCE_OFFSET}], got {instances_per_class}")
        self.categories = FractalCategories(num_classes, seed)
        self.instances_per_class = instances_per_class
        self.img_size = img_size
        self.split = split
        self.num_points = num_points
        self.instance_offset = VAL_INSTANCE_OFFSET if split == "val" else 0
        self.classes = [f"fractal_{k:05d}" for k in range(num_classes)]

    @property
    def num_classes(self) -> int:
        return self.categories.num_classes

    def __len__(self) -> int:
        return self.num_classes * self.instances_per_class

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index must be in [0, {len(self)}), got {index}")
        label, instance = divmod(index, self.instances_per_class)
        image = render_fractals(
            self.categories,
            torch.tensor([label]),
            torch.tensor([instance + self.instance_offset]),
            img_size=self.img_size,
            num_points=self.num_points,
        )
        pixels = (image[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
        return pixels.numpy(), label


class FractalBatches:
    """Normalised batches rendered on the fly on ``device`` (the GPU path for pre-training).

    An epoch is ``steps`` batches of ``batch_size`` (class, instance) pairs drawn uniformly from
    ``num_classes x instances_per_class``; batch ``(epoch, step)`` is a pure function of ``seed``, so a
    resumed run sees the same batches. The ``val`` and ``test`` splits draw new instances of the same
    categories (instance indices from ``VAL_INSTANCE_OFFSET``, test's shifted by ``TEST_INSTANCE_SHIFT``)
    and are the same every epoch. Yields
    ``(images (B, 3, S, S) float32 normalised by mean/std, labels (B,) int64)`` on ``device``.
    """

    def __init__(
        self,
        categories: FractalCategories,
        batch_size: int,
        steps: int,
        img_size: int,
        *,
        instances_per_class: int,
        seed: int = 0,
        split: str = "train",
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        num_points: int = 256,
        device: torch.device | str = "cpu",
    ) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split={split!r} is not allowed: 'train', 'val' or 'test'")
        if batch_size < 1 or steps < 1 or instances_per_class < 1:
            raise ValueError(
                f"batch_size={batch_size}, steps={steps}, instances_per_class={instances_per_class}: all must be >= 1"
            )
        self.categories = categories.to(device)
        self.batch_size, self.steps, self.img_size = batch_size, steps, img_size
        self.instances_per_class, self.seed, self.split = instances_per_class, seed, split
        self.num_points = num_points
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.epoch = 0
        self.start = 0
        self.sampler = self  # the engine positions loaders through ``loader.sampler.set_epoch``

    @property
    def num_classes(self) -> int:
        return self.categories.num_classes

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Position at ``epoch``; iteration starts after ``start`` samples (a resumed epoch)."""
        self.epoch, self.start = epoch, start // self.batch_size

    def __len__(self) -> int:
        return self.steps

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """Batch ``step`` of the current epoch."""
        epoch = self.epoch if self.split == "train" else 0
        gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_003 + step) % (1 << 63))
        labels = torch.randint(self.num_classes, (self.batch_size,), generator=gen)
        instances = torch.randint(self.instances_per_class, (self.batch_size,), generator=gen)
        if self.split != "train":
            instances += VAL_INSTANCE_OFFSET + (TEST_INSTANCE_SHIFT if self.split == "test" else 0)
        images = render_fractals(self.categories, labels, instances, img_size=self.img_size, num_points=self.num_points)
        return (images - self.mean) / self.std, labels.to(self.device)

    def __iter__(self):
        for step in range(self.start, self.steps):
            yield self.batch(step)
