"""timm training-augmentation options of ``build_transforms`` (tiny images, CPU only)."""

from __future__ import annotations

import pickle
import random

import albumentations as A
import numpy as np
import pytest
import torch
from albumentations.pytorch import ToTensorV2

from neat_vision.data.transforms import INTERPOLATIONS, build_transforms, check_auto_augment

CONFIG = {
    "input_size": (3, 32, 32),
    "interpolation": "bilinear",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 0.875,
}
RAND = "rand-m9-mstd0.5-inc1"
VALID = (
    "rand-m9-mstd0.5-inc1",
    "rand-m9-n2-mstd0",
    "rand",
    "rand-m7-tweights",
    "augmix-m5-w4-d2",
    "original",
    "originalr",
    "v0",
    "v0r",
    "3a",
    "v0-mstd0.5",
)
INVALID = (
    "rand-q9",
    "foo",
    "augmix-x",
    "augmix-q3",
    "rand-m9-x",
    "randfoo",
    "rand-m9.5",
    "rand-m9-tnope",
    "",
    "v0-m3",
    "trivialaugment",
    "ta_wide",
)


def _images(n: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8) for _ in range(n)]


def _run(transform, seeds, images=None) -> list[torch.Tensor]:
    out = []
    for seed, image in zip(seeds, images or _images(len(seeds))):
        transform.set_random_seed(seed)
        out.append(transform(image))
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _old_train(config, hflip=0.5, scale=(0.08, 1.0), seed=None) -> A.Compose:
    """The train pipeline as built before the timm options existed."""
    flag = INTERPOLATIONS[config["interpolation"]]
    _, height, width = config["input_size"]
    normalize = A.Normalize(mean=config["mean"], std=config["std"], max_pixel_value=255.0)
    steps = [A.RandomResizedCrop(size=(height, width), scale=scale, interpolation=flag), A.HorizontalFlip(p=hflip)]
    return A.Compose([*steps, normalize, ToTensorV2()], seed=seed)


def _global_states():
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _assert_global_states(before) -> None:
    py, np_state, torch_state = _global_states()
    assert py == before[0]
    assert np_state[0] == before[1][0] and np.array_equal(np_state[1], before[1][1]) and np_state[2:] == before[1][2:]
    assert torch.equal(torch_state, before[2])


# ------------------------------------------------------------------------------------------------ defaults


def test_albumentations_default_ratio_is_timms() -> None:
    assert A.RandomResizedCrop(size=(8, 8)).ratio == pytest.approx((3 / 4, 4 / 3))


@pytest.mark.parametrize("kwargs", [{}, {"hflip": 0.0, "scale": (0.5, 1.0)}])
def test_default_train_pipeline_unchanged(kwargs) -> None:
    images = _images(6)
    new = build_transforms(CONFIG, train=True, seed=7, **kwargs)
    old = _old_train(CONFIG, seed=7, **kwargs)
    assert not new.uses_global_rng
    # stream without reseeding, then per-sample reseeding
    assert _same([new(im) for im in images], [old(image=im)["image"] for im in images])
    for seed, im in zip(range(6), images):
        new.set_random_seed(seed)
        old.set_random_seed(seed)
        assert torch.equal(new(im), old(image=im)["image"])
    explicit = build_transforms(
        CONFIG,
        train=True,
        seed=7,
        ratio=(3 / 4, 4 / 3),
        vflip=0.0,
        color_jitter=None,
        auto_augment=None,
        reprob=0.0,
        remode="pixel",
        recount=1,
        no_aug=False,
        **kwargs,
    )
    assert _same(_run(explicit, range(6), images), _run(new, range(6), images))


def test_no_aug_train_is_eval() -> None:
    images = _images(3)
    train = build_transforms(CONFIG, train=True, no_aug=True, auto_augment=RAND, reprob=1.0, vflip=1.0, seed=1)
    evaluation = build_transforms(CONFIG, train=False)
    assert _same(_run(train, [1, 2, 3], images), [evaluation(im) for im in images])
    assert not train.uses_global_rng


# --------------------------------------------------------------------------------------------- determinism


def test_seeded_augmentation_is_deterministic_and_leaves_global_rng_alone() -> None:
    kwargs = {"auto_augment": RAND, "reprob": 0.5, "color_jitter": 0.4, "vflip": 0.5}
    transform = build_transforms(CONFIG, train=True, seed=0, **kwargs)
    assert transform.uses_global_rng
    assert not any(isinstance(t, A.ColorJitter) for t in transform.pipeline.transforms)  # dropped with AA
    assert any(isinstance(t, A.VerticalFlip) for t in transform.pipeline.transforms)
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    before = _global_states()
    first = _run(transform, [10, 11, 12, 13])
    _assert_global_states(before)
    other = build_transforms(CONFIG, train=True, seed=99, **kwargs)
    assert _same(_run(other, [10, 11, 12, 13]), first)  # a pure function of the per-sample seed
    assert not _same(_run(transform, [20, 21, 22, 23]), first)
    # calls without a reseed: reproducible, but not repeated
    image = _images(1)[0]
    transform.set_random_seed(5)
    stream = [transform(image) for _ in range(3)]
    transform.set_random_seed(5)
    assert _same([transform(image) for _ in range(3)], stream)
    assert not torch.equal(stream[0], stream[1])
    _assert_global_states(before)


def test_global_rng_does_not_reach_the_transform() -> None:
    transform = build_transforms(CONFIG, train=True, auto_augment=RAND, reprob=0.5)
    np.random.seed(1)
    random.seed(1)
    torch.manual_seed(1)
    first = _run(transform, [3, 4, 5])
    np.random.seed(2)
    random.seed(2)
    torch.manual_seed(2)
    assert _same(_run(transform, [3, 4, 5]), first)


def test_picklable() -> None:
    transform = build_transforms(CONFIG, train=True, auto_augment="augmix-m5-w4-d2", reprob=0.5, color_jitter=0.3)
    copy = pickle.loads(pickle.dumps(transform))
    assert _same(_run(copy, [1, 2, 3]), _run(transform, [1, 2, 3]))
    plain = build_transforms(CONFIG, train=True, color_jitter=(0.4, 0.4, 0.4, 0.1), vflip=0.5)
    assert _same(_run(pickle.loads(pickle.dumps(plain)), [1, 2]), _run(plain, [1, 2]))


# ------------------------------------------------------------------------------------------ applied steps


def test_rand_augment_is_applied() -> None:
    base = build_transforms(CONFIG, train=True)
    augmented = build_transforms(CONFIG, train=True, auto_augment="rand-m9-n2-mstd0")
    seeds = list(range(8))
    images = _images(8)
    plain = _run(base, seeds, images)
    changed = _run(augmented, seeds, images)
    # same seed -> same crop and flip, so every difference comes from RandAugment
    assert sum(not torch.equal(a, b) for a, b in zip(plain, changed)) >= 4


@pytest.mark.parametrize("auto_augment", ["augmix-m5-w4-d2", "original", "v0r", "3a"])
def test_other_auto_augments_run(auto_augment) -> None:
    out = _run(build_transforms(CONFIG, train=True, auto_augment=auto_augment), [1, 2])
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.float32 for o in out)


def test_color_jitter_and_vflip_are_applied() -> None:
    images = _images(4)
    base = _run(build_transforms(CONFIG, train=True), range(4), images)
    jitter = build_transforms(CONFIG, train=True, color_jitter=0.4)
    assert sum(isinstance(t, A.ColorJitter) for t in jitter.pipeline.transforms) == 1
    assert not jitter.uses_global_rng
    assert not _same(_run(jitter, range(4), images), base)
    # '3a' keeps color jitter on, as in timm
    three_a = build_transforms(CONFIG, train=True, color_jitter=0.4, auto_augment="3a")
    assert any(isinstance(t, A.ColorJitter) for t in three_a.pipeline.transforms)
    plain = build_transforms(CONFIG, train=True, hflip=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    flipped = build_transforms(CONFIG, train=True, hflip=0.0, vflip=1.0, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    image = images[0]
    assert torch.equal(_run(flipped, [0], [image])[0], torch.flip(_run(plain, [0], [image])[0], dims=[1]))


def test_color_jitter_semantics() -> None:
    jitter = [
        t
        for t in build_transforms(CONFIG, train=True, color_jitter=0.4).pipeline.transforms
        if isinstance(t, A.ColorJitter)
    ][0]
    assert jitter.brightness == pytest.approx((0.6, 1.4)) and jitter.saturation == pytest.approx((0.6, 1.4))
    assert jitter.hue == pytest.approx((0.0, 0.0)) and jitter.p == 1.0
    jitter = [
        t
        for t in build_transforms(CONFIG, train=True, color_jitter=(1.5, 0.2, 0.3, 0.1)).pipeline.transforms
        if isinstance(t, A.ColorJitter)
    ][0]
    assert jitter.brightness == pytest.approx((0.0, 2.5)) and jitter.contrast == pytest.approx((0.8, 1.2))
    assert jitter.hue == pytest.approx((-0.1, 0.1))


def test_random_erasing_const_erases_to_zero() -> None:
    flat = np.full((40, 48, 3), 200, dtype=np.uint8)  # normalizes to a nonzero constant everywhere
    transform = build_transforms(CONFIG, train=True, reprob=1.0, remode="const", recount=2)
    for seed in range(5):
        out = _run(transform, [seed], [flat])[0]
        zeros = (out == 0).all(dim=0)
        assert zeros.any() and not zeros.all()
        assert torch.allclose(out[:, ~zeros], torch.tensor((200 / 255 - 0.5) / 0.5))


def test_random_erasing_pixel_mode_is_seeded() -> None:
    flat = np.full((40, 48, 3), 200, dtype=np.uint8)
    transform = build_transforms(CONFIG, train=True, reprob=1.0)  # remode='pixel'
    out = _run(transform, [1, 2, 1], [flat] * 3)
    assert torch.equal(out[0], out[2]) and not torch.equal(out[0], out[1])
    background = torch.tensor((200 / 255 - 0.5) / 0.5)
    assert (out[0] != background).any()


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("text", VALID)
def test_check_auto_augment_accepts(text) -> None:
    assert check_auto_augment(text) is None


@pytest.mark.parametrize("text", INVALID)
def test_check_auto_augment_refuses(text) -> None:
    message = check_auto_augment(text)
    assert message is not None and "\n" not in message
    assert f"auto_augment={text!r}" in message and "rand-m9-mstd0.5-inc1" in message
    with pytest.raises(ValueError, match="auto_augment="):
        build_transforms(CONFIG, train=True, auto_augment=text)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"remode": "zeros"}, "remode"),
        ({"reprob": 1.5}, "reprob"),
        ({"reprob": -0.1}, "reprob"),
        ({"vflip": 2}, "vflip"),
        ({"hflip": -1}, "hflip"),
        ({"recount": 0}, "recount"),
        ({"recount": 1.5}, "recount"),
        ({"ratio": (0.0, 1.0)}, "ratio"),
        ({"ratio": (2.0, 1.0)}, "ratio"),
        ({"color_jitter": -0.1}, "color_jitter"),
        ({"color_jitter": (0.4, 0.4)}, "color_jitter"),
        ({"color_jitter": (0.4, 0.4, 0.4, 0.6)}, "color_jitter"),
    ],
)
@pytest.mark.parametrize("train", [True, False])
def test_bad_options_raise(kwargs, name, train) -> None:
    with pytest.raises(ValueError, match=name) as info:
        build_transforms(CONFIG, train=train, **kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)
