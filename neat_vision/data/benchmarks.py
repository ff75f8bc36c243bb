"""The vision PEFT suites in the layouts the community shares: VTAB-1k (19 tasks) and FGVC (5 sets).

``--dataset vtab1k --data-dir <root>/<task>``: NOAH's ``get_vtab1k.py`` layout (read by V-PETL Bench, NOAH, SSF,
PETL_Vision): ``<task>/images/...`` and four lists of ``relative/path label`` lines, ``train800.txt``,
``val200.txt``, ``train800val200.txt``, ``test.txt``; the task is the folder's name (`VTAB1K_TASKS`).

``--dataset fgvc --data-dir <root>/<set>``: VPT's splits, ``train.json``, ``val.json``, ``test.json`` per set,
each mapping an image path (relative to the set's image folder, `FGVC_SETS`) to a class id; ids are made
contiguous in sorted order, as VPT does.

The split protocol (`PROTOCOLS`): ``tune`` trains on train800 (FGVC: train) and validates on val200 (val);
``final`` trains on all of it (train800val200; FGVC: train + val) and validates on val200 (val), which is then
part of the training data: a fit figure, not one to select on (the final epoch counts, as the field does).
Test is the test list in both. Every list line is checked before the first step: a malformed line, an unknown
class or a missing image fails naming the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from neat_vision.data.datasets import DatasetNotFoundError, FileImageDataset, ImageDataset, register_dataset

__all__ = [
    "FGVC_SETS",
    "PROTOCOLS",
    "VTAB1K_GROUPS",
    "VTAB1K_TASKS",
    "FgvcSet",
    "ListFileError",
    "suite_tasks",
]

PROTOCOLS = ("tune", "final")

# task folder name -> classes, in the field's column order, by group
VTAB1K_GROUPS: dict[str, dict[str, int]] = {
    "natural": {
        "cifar": 100,
        "caltech101": 102,
        "dtd": 47,
        "oxford_flowers102": 102,
        "oxford_iiit_pet": 37,
        "svhn": 10,
        "sun397": 397,
    },
    "specialized": {"patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5},
    "structured": {
        "clevr_count": 8,
        "clevr_dist": 6,
        "dmlab": 6,
        "kitti": 4,
        "dsprites_loc": 16,
        "dsprites_ori": 16,
        "smallnorb_azi": 18,
        "smallnorb_ele": 9,
    },
}
VTAB1K_TASKS: dict[str, int] = {task: n for group in VTAB1K_GROUPS.values() for task, n in group.items()}
VTAB1K_LISTS = {"tune": ("train800.txt", "val200.txt"), "final": ("train800val200.txt", "val200.txt")}


class ListFileError(ValueError):
    """A split list (VTAB-1k ``.txt``, FGVC ``.json``) is malformed; the message names the file and line."""


@dataclass(frozen=True)
class FgvcSet:
    """An FGVC set: its classes and its image folder (relative to the set's folder; VPT's ``get_imagedir``)."""

    classes: int
    images: str


FGVC_SETS: dict[str, FgvcSet] = {
    "CUB_200_2011": FgvcSet(200, "images"),
    "nabirds": FgvcSet(555, "images"),
    "OxfordFlower": FgvcSet(102, "."),
    "Stanford-dogs": FgvcSet(120, "Images"),
    "Stanford-cars": FgvcSet(196, "."),
}
_FGVC_KEYS = {name.lower().replace("-", "_"): name for name in FGVC_SETS}


def suite_tasks(suite: str) -> dict[str, int]:
    """The tasks (folder names) of ``suite`` ('vtab1k' or 'fgvc') and their class counts."""
    if suite == "vtab1k":
        return dict(VTAB1K_TASKS)
    if suite == "fgvc":
        return {name: s.classes for name, s in FGVC_SETS.items()}
    raise ValueError(f"suite={suite!r} is not known: vtab1k or fgvc")


def _task_folder(root: Path | None, dataset: str, known: dict[str, int], layout: str) -> tuple[Path, str]:
    if root is None:
        raise ValueError(f"dataset {dataset!r} needs --data-dir <root>/<task>")
    if not root.is_dir():
        raise DatasetNotFoundError(f"{dataset}: folder {root} not found (expected {layout})")
    keys = {k.lower().replace("-", "_"): k for k in known}
    task = keys.get(root.name.lower().replace("-", "_"))
    if task is None:
        raise ValueError(
            f"{dataset}: data_dir={str(root)!r} is not a task folder; its name must be one of {', '.join(known)}"
        )
    return root, task


def _read_vtab_list(file: Path, classes: int) -> tuple[list[Path], list[int]]:
    if not file.is_file():
        raise DatasetNotFoundError(
            f"vtab1k: {file} not found (each task folder holds images/ and train800.txt, val200.txt, "
            "train800val200.txt, test.txt: NOAH's get_vtab1k.py layout)"
        )
    paths, labels = [], []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ListFileError(f"{file}:{number}: expected 'relative/path label', got {line!r}")
        label = int(parts[1])
        if not 0 <= label < classes:
            raise ListFileError(f"{file}:{number}: label {label} is out of range for {classes} classes")
        paths.append(file.parent / parts[0])
        labels.append(label)
    if not paths:
        raise ListFileError(f"{file}: the list is empty")
    return paths, labels


def _checked(dataset: FileImageDataset, lists: str) -> FileImageDataset:
    missing = dataset.missing_files()
    if missing:
        raise DatasetNotFoundError(
            f"{len(missing)} image(s) listed in {lists} do not exist, e.g. {', '.join(missing[:3])}"
        )
    return dataset


@register_dataset("vtab1k", aliases=("vtab", "vtab_1k"), protocols=PROTOCOLS)
def _vtab1k(root: Path | None, split: str, seed: int, download: bool, protocol: str = "tune") -> ImageDataset:
    root, task = _task_folder(root, "vtab1k", VTAB1K_TASKS, "<root>/<task>/{images/, train800.txt, ...}")
    classes = VTAB1K_TASKS[task]
    name = "test.txt" if split == "test" else VTAB1K_LISTS[protocol][split == "val"]
    paths, labels = _read_vtab_list(root / name, classes)
    return _checked(FileImageDataset(paths, labels, [str(i) for i in range(classes)]), str(root / name))


def _read_fgvc_json(file: Path) -> dict[str, int]:
    if not file.is_file():
        raise DatasetNotFoundError(
            f"fgvc: {file} not found (each set folder holds VPT's train.json, val.json, test.json)"
        )
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ListFileError(f"{file}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict) or not data:
        raise ListFileError(f"{file}: expected a non-empty mapping of image path -> class id")
    for path, label in data.items():
        if isinstance(label, bool) or not isinstance(label, int):
            raise ListFileError(f"{file}: the class id of {path!r} is {label!r}, not an integer")
    return data


@register_dataset("fgvc", aliases=("vpt_fgvc",), protocols=PROTOCOLS)
def _fgvc(root: Path | None, split: str, seed: int, download: bool, protocol: str = "tune") -> ImageDataset:
    root, task = _task_folder(root, "fgvc", {k: s.classes for k, s in FGVC_SETS.items()}, "<root>/<set>/train.json")
    spec = FGVC_SETS[task]
    train = _read_fgvc_json(root / "train.json")
    ids = sorted(set(train.values()))  # VPT: class ids made contiguous in sorted order of the train split's ids
    if len(ids) != spec.classes:
        raise ListFileError(f"{root / 'train.json'}: {len(ids)} classes, {task} has {spec.classes}")
    index = {v: i for i, v in enumerate(ids)}
    files = {"train": ["train.json"] + (["val.json"] if protocol == "final" else []), "val": ["val.json"]}
    files["test"] = ["test.json"]
    paths, labels = [], []
    for name in files[split]:
        mapping = train if name == "train.json" else _read_fgvc_json(root / name)
        unknown = sorted({v for v in mapping.values() if v not in index})
        if unknown:
            raise ListFileError(f"{root / name}: class id(s) {unknown[:5]} do not occur in train.json")
        paths += [root / spec.images / p for p in mapping]
        labels += [index[v] for v in mapping.values()]
    dataset = FileImageDataset(paths, labels, [str(v) for v in ids])
    return _checked(dataset, " + ".join(str(root / n) for n in files[split]))
