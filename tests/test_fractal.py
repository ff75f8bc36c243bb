"""Tests for the FractalDB-style formula-driven dataset (neat_vision.data.fractal)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from neat_vision.data.fractal import VAL_INSTANCE_OFFSET, FractalCategories, FractalDataset, render_fractals

SEED = 0
NUM_CLASSES = 10
INSTANCES = 8


@pytest.fixture(scope="module")
def categories() -> FractalCategories:
    return FractalCategories(NUM_CLASSES, SEED)


@pytest.fixture(scope="module")
def grid(categories: FractalCategories) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (NUM_CLASSES * INSTANCES, 3, 32, 32) and their class ids."""
    class_ids = torch.arange(NUM_CLASSES).repeat_interleave(INSTANCES)
    instance_ids = torch.arange(INSTANCES).repeat(NUM_CLASSES)
    return render_fractals(categories, class_ids, instance_ids, img_size=32), class_ids


def test_render_shape_dtype_range(grid: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, _ = grid
    assert images.shape == (NUM_CLASSES * INSTANCES, 3, 32, 32)
    assert images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(images[:, 0], images[:, 2])  # grayscale replicated
    assert (images.amax(dim=(1, 2, 3)) == 1).all()  # every image has content


def test_render_deterministic_and_batch_independent(
    categories: FractalCategories, grid: tuple[torch.Tensor, torch.Tensor]
) -> None:
    images, class_ids = grid
    instance_ids = torch.arange(INSTANCES).repeat(NUM_CLASSES)
    again = render_fractals(categories, class_ids.flip(0), instance_ids.flip(0), img_size=32).flip(0)
    assert torch.equal(images, again)
    single = render_fractals(categories, class_ids[5:6], instance_ids[5:6], img_size=32)
    assert torch.equal(single, images[5:6])
    fresh = render_fractals(FractalCategories(NUM_CLASSES, SEED), class_ids, instance_ids, img_size=32)
    assert torch.equal(fresh, images)


def test_different_instance_or_class_gives_different_image(grid: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, _ = grid
    flat = images[:, 0].reshape(NUM_CLASSES * INSTANCES, -1)
    distances = torch.cdist(flat, flat)
    off_diagonal = ~torch.eye(len(flat), dtype=torch.bool)
    assert (distances[off_diagonal] > 0).all()


def test_classes_are_distinct(grid: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, class_ids = grid
    flat = images[:, 0].reshape(len(images), -1)
    distances = torch.cdist(flat, flat)
    same = class_ids[:, None] == class_ids[None, :]
    off_diagonal = ~torch.eye(len(flat), dtype=torch.bool)
    within, between = distances[same & off_diagonal].mean(), distances[~same].mean()
    assert between > 1.05 * within
    centroids = flat.reshape(NUM_CLASSES, INSTANCES, -1).mean(1)
    accuracy = (torch.cdist(flat, centroids).argmin(1) == class_ids).float().mean()
    assert accuracy >= 0.9


def test_class_independent_of_num_classes(categories: FractalCategories) -> None:
    small = FractalCategories(3, SEED)
    assert torch.equal(small.params, categories.params[:3])
    assert torch.equal(small.probs, categories.probs[:3])
    assert not torch.equal(FractalCategories(3, SEED + 1).params, small.params)


def test_categories_contractive_and_normalised(categories: FractalCategories) -> None:
    matrices = categories.params[..., :4].reshape(NUM_CLASSES, 4, 2, 2).double()
    norms = torch.linalg.matrix_norm(matrices, ord=2)
    real = torch.arange(4)[None, :] < categories.num_maps[:, None]
    assert ((norms < categories.max_singular_value) | ~real).all()
    assert (norms[real] > 0).all()
    # Instance jitter keeps maps contractive: the spectral norm is convex in eps, so its maximum over the
    # jitter box is at one of the 16 sign vertices.
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=4)), dtype=torch.float64).reshape(16, 1, 1, 2, 2)
    jittered = matrices[None] * (1 + categories.jitter * signs)
    assert (torch.linalg.matrix_norm(jittered, ord=2) < 1).all()
    assert torch.allclose(categories.probs.sum(-1), torch.ones(NUM_CLASSES))
    assert ((categories.probs > 0) == real).all()
    assert ((2 <= categories.num_maps) & (categories.num_maps <= 4)).all()


def test_dataset_items_and_splits() -> None:
    train = FractalDataset(4, 3, img_size=24, seed=SEED)
    val = FractalDataset(4, 3, img_size=24, seed=SEED, split="val")
    assert len(train) == len(val) == 12
    assert train.num_classes == 4 and len(train.classes) == 4
    image, label = train[7]
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (24, 24, 3)
    assert label == 2 and image.max() == 255
    assert np.array_equal(image, train[7][0])
    assert not np.array_equal(image, val[7][0])
    assert val[7][1] == label
    rendered = render_fractals(train.categories, torch.tensor([2]), torch.tensor([1]), img_size=24)
    assert np.array_equal(image, (rendered[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    val_rendered = render_fractals(
        train.categories, torch.tensor([2]), torch.tensor([1 + VAL_INSTANCE_OFFSET]), img_size=24
    )
    assert np.array_equal(val[7][0], (val_rendered[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"img_size": 1}, "img_size"),
        ({"img_size": 32, "burn_in": 30}, "burn_in"),
        ({"img_size": 32, "num_points": 0}, "num_points"),
        ({"img_size": 32, "margin": 0.5}, "margin"),
    ],
)
def test_render_rejects_bad_arguments(categories: FractalCategories, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_fractals(categories, torch.tensor([0]), torch.tensor([0]), **kwargs)


def test_rejects_bad_ids_and_config(categories: FractalCategories) -> None:
    with pytest.raises(ValueError, match="class_ids"):
        render_fractals(categories, torch.tensor([NUM_CLASSES]), torch.tensor([0]), img_size=32)
    with pytest.raises(ValueError, match="instance_ids"):
        render_fractals(categories, torch.tensor([0]), torch.tensor([-1]), img_size=32)
    with pytest.raises(ValueError, match="max_singular_value"):
        FractalCategories(2, SEED, max_singular_value=0.95)
    with pytest.raises(ValueError, match="split"):
        FractalDataset(2, 2, img_size=32, seed=SEED, split="test")


def test_min_fill_rejects_sparse_systems() -> None:
    ids = torch.arange(6)
    occupancy = {
        min_fill: (
            render_fractals(FractalCategories(6, SEED, min_fill=min_fill), ids, ids, img_size=32, margin=0.0) > 0
        )
        .float()
        .mean()
        for min_fill in (0.0, 0.3)
    }
    assert occupancy[0.3] > 0.25 > occupancy[0.0]
