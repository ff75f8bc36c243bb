"""VTAB-1k and FGVC in their on-disk layouts (generated here, tiny), the split protocols, and the suite command."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from neat_vision.data import FGVC_SETS, VTAB1K_TASKS, build_dataset
from neat_vision.data.benchmarks import ListFileError
from neat_vision.data.datasets import DatasetNotFoundError
from neat_vision.studies.benchmark import main as benchmark_main
from neat_vision.studies.benchmark import ppt

SIZES = {"train800": 6, "val200": 4, "test": 5}  # images per list (train800val200 = both)


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)


def make_vtab_task(root: Path, task: str, classes: int = 2) -> Path:
    """``<root>/<task>/images/*.png`` + the four lists, labels cycling over ``min(classes, 3)`` classes; the
    images of class c are brighter for larger c, so a tiny model can learn something."""
    folder = root / task
    lines: dict[str, list[str]] = {}
    k = 0
    for name, n in SIZES.items():
        lines[name] = []
        for i in range(n):
            label = i % min(classes, 3)
            rel = f"images/{name}_{i}.png"
            _image(folder / rel, k)
            k += 1
            lines[name].append(f"{rel} {label}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for name, rows in lines.items():
        (folder / f"{name}.txt").write_text("\n".join(rows) + "\n")
    return folder


def make_fgvc_set(root: Path, name: str) -> Path:
    """VPT's layout: ``train.json``/``val.json``/``test.json`` mapping image paths (under the set's image folder)
    to class ids (1-based here, as some sets ship them: made contiguous by the loader)."""
    folder = root / name
    spec = FGVC_SETS[name]
    ids = list(range(1, spec.classes + 1))
    k = 0
    for split, n in (("train", spec.classes), ("val", 3), ("test", 4)):
        mapping = {}
        for i in range(n):
            rel = f"{split}/{i}.jpg"
            _image(folder / spec.images / rel, k)
            k += 1
            mapping[rel] = ids[i % len(ids)]
        (folder / f"{split}.json").write_text(json.dumps(mapping))
    return folder


@pytest.mark.parametrize("task", list(VTAB1K_TASKS))
def test_every_vtab1k_task_loads_with_its_classes_and_the_protocols_lists(tmp_path, task):
    folder = make_vtab_task(tmp_path, task)
    sizes = {
        (protocol, split): len(build_dataset("vtab1k", folder, split, protocol=protocol))
        for protocol in ("tune", "final")
        for split in ("train", "val", "test")
    }
    assert sizes == {
        ("tune", "train"): 6, ("tune", "val"): 4, ("tune", "test"): 5,
        ("final", "train"): 10, ("final", "val"): 4, ("final", "test"): 5,
    }  # fmt: skip
    assert build_dataset("vtab1k", folder, "train").num_classes == VTAB1K_TASKS[task]
    image, label = build_dataset("vtab1k", folder, "test")[0]
    assert image.shape == (12, 10, 3) and label == 0


@pytest.mark.parametrize("name", list(FGVC_SETS))
def test_every_fgvc_set_loads_vpt_json_splits(tmp_path, name):
    folder = make_fgvc_set(tmp_path, name)
    classes = FGVC_SETS[name].classes
    train = build_dataset("fgvc", folder, "train", protocol="tune")
    assert train.num_classes == classes and len(train) == classes and sorted(set(train.labels)) == list(range(classes))
    assert len(build_dataset("fgvc", folder, "train", protocol="final")) == classes + 3
    assert len(build_dataset("fgvc", folder, "val")) == 3 and len(build_dataset("fgvc", folder, "test")) == 4


@pytest.mark.parametrize(
    "damage, error, message",
    [
        (lambda f: (f / "val200.txt").unlink(), DatasetNotFoundError, "val200.txt not found"),
        (lambda f: (f / "val200.txt").write_text("images/a.png\n"), ListFileError, "val200.txt:1: expected"),
        (lambda f: (f / "val200.txt").write_text("images/val200_0.png 99\n"), ListFileError, "val200.txt:1: label 99"),
        (lambda f: (f / "images" / "val200_1.png").unlink(), DatasetNotFoundError, "val200_1.png"),
    ],
)
def test_bad_vtab_lists_fail_naming_the_file_and_line(tmp_path, damage, error, message):
    folder = make_vtab_task(tmp_path, "dtd")
    damage(folder)
    with pytest.raises(error, match=message.replace(".", r"\.")):
        build_dataset("vtab1k", folder, "val")


def test_unknown_task_folder_and_bad_fgvc_ids_fail(tmp_path):
    folder = make_vtab_task(tmp_path, "not_a_task")
    with pytest.raises(ValueError, match="its name must be one of cifar, caltech101"):
        build_dataset("vtab1k", folder, "train")
    cub = make_fgvc_set(tmp_path, "CUB_200_2011")
    (cub / "test.json").write_text(json.dumps({"test/0.jpg": 999}))
    with pytest.raises(ListFileError, match=r"test.json: class id\(s\) \[999\] do not occur in train.json"):
        build_dataset("fgvc", cub, "test")
    with pytest.raises(ValueError, match="has one split; drop split_protocol"):
        build_dataset("digits", None, "train", protocol="final")


def test_ppt_is_vpetls_formula():
    assert ppt(72.25, 0.29e6) == pytest.approx(72.25 * np.exp(-np.log10(0.029 + 1)))


TINY = dict(
    model="vit_tiny_patch16_224", pretrained=False, model_kwargs=dict(img_size=16, patch_size=8, depth=1, embed_dim=32,
    num_heads=2), method="neat", neat_rank=2, epochs=1, batch_size=2, workers=0, squash=True, no_aug=True,
    crop_pct=1.0, lr_neat=1e-2, lr_head=1e-2, tb=False,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    for task in ("dtd", "kitti"):
        make_vtab_task(root / "data", task)
    (root / "neat.yaml").write_text(yaml.safe_dump(TINY))
    return root


def _bench(root: Path, *extra: str) -> int:
    return benchmark_main([
        "--suite", "vtab1k", "--data-dir", str(root / "data"), "--config", str(root / "neat.yaml"),
        "--tasks", "dtd", "kitti", "--grid", "lr_neat=0.01,0.001", "--seeds", "0", "1",
        "--output", str(root / "out"), "--gpus", "0", "0", *extra,
    ])  # fmt: skip


def test_the_suite_command_tunes_on_val_trains_on_train_and_val_and_tabulates(tiny_suite, capsys):
    root = tiny_suite
    assert _bench(root) == 0
    out = root / "out"
    rows = list(csv.DictReader(open(out / "benchmark.csv")))
    assert len(rows) == 1 and rows[0]["method"] == "neat"
    row = {k: float(v) for k, v in rows[0].items() if k != "method"}
    assert row["mean"] == pytest.approx((row["dtd"] + row["kitti"]) / 2)
    assert row["mean_natural"] == row["dtd"] and row["mean_structured"] == row["kitti"]
    assert "mean_specialized" not in row  # no task of that group was run
    assert row["mean_of_groups"] == pytest.approx((row["dtd"] + row["kitti"]) / 2)
    assert row["seeds"] == 2 and row["ppt"] == pytest.approx(ppt(row["mean"], row["trainable_params"]))
    assert (out / "benchmark.md").is_file() and (out / "benchmark.png").is_file()
    tune_runs = sorted(p.name for p in (out / "neat" / "tune").glob("task=*"))
    final_runs = sorted(p.name for p in (out / "neat" / "final").glob("task=*"))
    assert len(tune_runs) == 4 and len(final_runs) == 4  # 2 tasks x 2 lrs x 1 seed; 2 tasks x 2 seeds
    args = yaml.safe_load((out / "neat" / "final" / final_runs[0] / "args.yaml").read_text())
    assert args["split_protocol"] == "final"
    log = (out / "neat" / "final" / "logs" / f"{final_runs[0]}.log").read_text()
    assert "train/val/test 10/4/5" in log  # train800val200 (6 + 4)
    tune_log = (out / "neat" / "tune" / "logs" / f"{tune_runs[0]}.log").read_text()
    assert "train/val/test 6/4/5" in tune_log

    # selection reads val only: a poisoned test score on the losing point does not move the choice
    selection = {r["task"]: r for r in csv.DictReader(open(out / "selection.csv"))}
    chosen = selection["dtd"]["lr_neat"]
    loser = next(p for p in tune_runs if p.startswith("task=dtd__") and f"lr_neat={chosen}__" not in p)
    final_file = out / "neat" / "tune" / loser / "final.json"
    poisoned = json.loads(final_file.read_text()) | {"test_top1": 1000.0, "best_val_top1": 1000.0}
    final_file.write_text(json.dumps(poisoned))
    capsys.readouterr()

    # an interrupted suite resumes without rerunning finished runs
    (out / "neat" / "final" / final_runs[0] / "final.json").unlink()
    for name in ("checkpoints/last.pth",):
        (out / "neat" / "final" / final_runs[0] / name).unlink(missing_ok=True)
    assert _bench(root) == 0
    printed = capsys.readouterr().out
    assert "4 runs, 4 finished, 0 to run" in printed and "4 runs, 3 finished, 1 to run" in printed
    again = {r["task"]: r for r in csv.DictReader(open(out / "selection.csv"))}
    assert again["dtd"]["lr_neat"] == chosen


def test_the_suite_through_submitit_local(tiny_suite, tmp_path):
    pytest.importorskip("submitit")
    root = tiny_suite
    code = benchmark_main([
        "--suite", "vtab1k", "--data-dir", str(root / "data"), "--config", str(root / "neat.yaml"),
        "--tasks", "kitti", "--seeds", "0", "--output", str(tmp_path / "out"), "--executor", "submitit-local",
        "--slurm", "{timeout_min: 20}",
    ])  # fmt: skip
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "benchmark.csv")))
    assert rows[0]["method"] == "neat" and 0 <= float(rows[0]["kitti"]) <= 100
    assert any((tmp_path / "out" / "neat" / "tune" / "submitit").rglob("*.out"))
