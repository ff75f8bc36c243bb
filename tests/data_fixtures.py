"""Writers of tiny dataset copies in each dataset's real on-disk layout (torchvision 0.29 / RESISC45 / CSV).

Each ``write_*`` function creates a few 16x16 images per class (3 classes where the format allows) under
``root`` and returns a ``Fixture`` describing what was written, so tests can check sizes and coverage.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

SIZE = 16


@dataclass
class Fixture:
    """What a writer produced: the root to pass to ``build_dataset`` and the expected counts."""

    root: Path
    num_classes: int
    pool: int
    test: int | None = None
    files: list[Path] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.pool + (self.test or 0)


def write_image(path: Path, seed: int, size: int = SIZE) -> Path:
    """A small random RGB image, encoded according to the file extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_corrupt(path: Path) -> Path:
    """A file with an image extension whose content is not a decodable image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return path


def _cifar_batch(labels: list[int], label_key: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8)
    batch = {
        "data": data,
        label_key: labels,
        "filenames": [f"img_{seed}_{i}.png" for i in range(len(labels))],
    }
    if label_key == "fine_labels":
        batch["coarse_labels"] = [0] * len(labels)
    else:
        batch["batch_label"] = f"batch {seed}"
    return batch


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: Path) -> Fixture:
    """``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` with 3 images per batch."""
    base = root / "cifar-10-batches-py"
    for b in range(1, 6):
        _pickle(base / f"data_batch_{b}", _cifar_batch([0, 1, 2], "labels", seed=b))
    _pickle(base / "test_batch", _cifar_batch([0, 1, 2, 0, 1, 2], "labels", seed=0))
    _pickle(base / "batches.meta", {"label_names": CIFAR10_NAMES, "num_cases_per_batch": 3, "num_vis": 3072})
    return Fixture(root, num_classes=10, pool=15, test=6)


def write_cifar100(root: Path) -> Fixture:
    """``cifar-100-python/{train, test, meta}`` with 4 fine classes."""
    base = root / "cifar-100-python"
    _pickle(base / "train", _cifar_batch([0, 1, 2, 3] * 4, "fine_labels", seed=1))
    _pickle(base / "test", _cifar_batch([0, 1, 2, 3] * 2, "fine_labels", seed=2))
    _pickle(
        base / "meta",
        {"fine_label_names": ["apple", "bear", "castle", "dolphin"], "coarse_label_names": ["x"]},
    )
    return Fixture(root, num_classes=4, pool=16, test=8)


def cifar_checksums(root: Path, cls: type) -> dict[str, object]:
    """``train_list``/``test_list``/``meta`` class attributes with the md5 sums of the tiny copy.

    torchvision verifies CIFAR files against the real archives' md5 sums, which a generated copy cannot
    match; tests monkeypatch these attributes instead.
    """
    base = root / cls.base_folder

    def md5(name: str) -> str:
        return hashlib.md5((base / name).read_bytes()).hexdigest()

    return {
        "train_list": [[name, md5(name)] for name, _ in cls.train_list],
        "test_list": [[name, md5(name)] for name, _ in cls.test_list],
        "meta": {**cls.meta, "md5": md5(cls.meta["filename"])},
    }


PET_BREEDS = [("Abyssinian", 1), ("Bengal", 1), ("american_bulldog", 2)]


def write_oxford_pets(root: Path) -> Fixture:
    """``oxford-iiit-pet/images/<Breed>_<n>.jpg`` and ``annotations/{trainval,test}.txt``."""
    base = root / "oxford-iiit-pet"
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    files = []
    for class_id, (breed, species) in enumerate(PET_BREEDS, start=1):
        for n in range(1, 8):
            image_id = f"{breed}_{n}"
            files.append(write_image(base / "images" / f"{image_id}.jpg", seed=100 * class_id + n))
            part = "trainval" if n <= 4 else "test"
            lines[part].append(f"{image_id} {class_id} {species} {class_id}")
    (base / "annotations").mkdir(parents=True)
    for part, rows in lines.items():
        (base / "annotations" / f"{part}.txt").write_text("\n".join(rows) + "\n")
    return Fixture(root, num_classes=3, pool=12, test=9, files=files)


CAR_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]


def _cars_annotations(path: Path, classes: list[int]) -> None:
    dtype = [(k, "O") for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    records = np.array(
        [[(1, 1, SIZE - 1, SIZE - 1, c, f"{i:05d}.jpg") for i, c in enumerate(classes, start=1)]], dtype=dtype
    )
    scipy.io.savemat(path, {"annotations": records})


def write_stanford_cars(root: Path) -> Fixture:
    """``stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/,
    cars_test_annos_withlabels.mat, cars_test/}`` (classes are 1-based in the .mat files)."""
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([CAR_NAMES], dtype=object)})
    train_classes = [1, 2, 3] * 4
    test_classes = [1, 2, 3] * 2
    _cars_annotations(base / "devkit" / "cars_train_annos.mat", train_classes)
    _cars_annotations(base / "cars_test_annos_withlabels.mat", test_classes)
    files = [write_image(base / "cars_train" / f"{i:05d}.jpg", seed=i) for i in range(1, len(train_classes) + 1)]
    files += [write_image(base / "cars_test" / f"{i:05d}.jpg", seed=50 + i) for i in range(1, len(test_classes) + 1)]
    return Fixture(root, num_classes=3, pool=12, test=6, files=files)


TEXTURES = ["banded", "blotchy", "braided"]


def write_dtd(root: Path) -> Fixture:
    """``dtd/dtd/images/<class>/<class>_NNNN.jpg`` and ``dtd/dtd/labels/{train,val,test}1.txt``."""
    base = root / "dtd" / "dtd"
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    files = []
    for c, texture in enumerate(TEXTURES):
        for n in range(5):
            name = f"{texture}_{n:04d}.jpg"
            files.append(write_image(base / "images" / texture / name, seed=10 * c + n))
            lines[("train", "train", "val", "test", "test")[n]].append(f"{texture}/{name}")
    (base / "labels").mkdir(parents=True)
    for part, rows in lines.items():
        (base / "labels" / f"{part}1.txt").write_text("\n".join(rows) + "\n")
    return Fixture(root, num_classes=3, pool=15, files=files)


def write_eurosat(root: Path) -> Fixture:
    """``eurosat/2750/<Class>/<Class>_<n>.jpg``."""
    files = [
        write_image(root / "eurosat" / "2750" / cls / f"{cls}_{n}.jpg", seed=10 * c + n)
        for c, cls in enumerate(["AnnualCrop", "Forest", "River"])
        for n in range(1, 6)
    ]
    return Fixture(root, num_classes=3, pool=15, files=files)


VARIANTS = ["707-320", "A300B4", "Cessna 172"]


def write_fgvc_aircraft(root: Path) -> Fixture:
    """``fgvc-aircraft-2013b/data/{images/<id>.jpg, variants.txt, images_variant_{trainval,test}.txt}``."""
    data = root / "fgvc-aircraft-2013b" / "data"
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    files = []
    for c, variant in enumerate(VARIANTS):
        for n in range(7):
            image_id = f"{1000000 + 10 * c + n:07d}"
            files.append(write_image(data / "images" / f"{image_id}.jpg", seed=10 * c + n))
            lines["trainval" if n < 4 else "test"].append(f"{image_id} {variant}")
    (data / "variants.txt").write_text("\n".join(VARIANTS) + "\n")
    for part, rows in lines.items():
        (data / f"images_variant_{part}.txt").write_text("\n".join(rows) + "\n")
    return Fixture(root, num_classes=3, pool=12, test=9, files=files)


def write_resisc45(root: Path) -> Fixture:
    """``NWPU-RESISC45/<class>/<class>_NNN.jpg``."""
    files = [
        write_image(root / "NWPU-RESISC45" / cls / f"{cls}_{n:03d}.jpg", seed=10 * c + n)
        for c, cls in enumerate(["airplane", "beach", "forest"])
        for n in range(1, 6)
    ]
    return Fixture(root, num_classes=3, pool=15, files=files)


def write_image_folder(root: Path, corrupt: bool = False) -> Fixture:
    """``root/<class>/<image>.png`` (3 classes x 5); ``corrupt`` adds one undecodable ``.png``."""
    files = [
        write_image(root / cls / f"{n}.png", seed=10 * c + n)
        for c, cls in enumerate(["cat", "dog", "fox"])
        for n in range(5)
    ]
    if corrupt:
        files.append(write_corrupt(root / "dog" / "broken.png"))
    return Fixture(root, num_classes=3, pool=len(files), files=files)


def write_presplit_folder(root: Path) -> Fixture:
    """``root/{train,test}/<class>/<image>.png`` without a val folder."""
    files = [
        write_image(root / part / cls / f"{n}.png", seed=100 * p + 10 * c + n)
        for p, (part, count) in enumerate([("train", 5), ("test", 2)])
        for c, cls in enumerate(["cat", "dog", "fox"])
        for n in range(count)
    ]
    return Fixture(root, num_classes=3, pool=15, test=6, files=files)


def write_csv(root: Path, with_split: bool = False) -> Fixture:
    """``root/labels.csv`` with ``path,label[,split]`` rows pointing at ``root/images/*.jpg``."""
    rows = ["path,label,split" if with_split else "path,label"]
    files = []
    for c, label in enumerate(["zebra", "ant", "moose"]):
        for n in range(5):
            files.append(write_image(root / "images" / f"{label}_{n}.jpg", seed=10 * c + n))
            split = ",train" if n < 3 else ",val" if n == 3 else ",test"
            rows.append(f"images/{label}_{n}.jpg,{label}" + (split if with_split else ""))
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return Fixture(root / "labels.csv", num_classes=3, pool=15, files=files)
