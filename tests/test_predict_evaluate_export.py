"""After training: predict, evaluate and export an adapter that a real (tiny) ``train.py`` run wrote.

The run adapts the shipped fractal-pretrained ViT (real weights, offline) to a generated ``image_folder``
dataset with named classes; predictions, metrics and the exported model are checked against the adapted model
and against the run's own ``final.json``.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch

import neat_vision
from neat_vision.data import build_transforms, read_rgb
from neat_vision.engine import parse_args, run
from neat_vision.tools.evaluate import evaluate_adapter
from neat_vision.tools.evaluate import main as evaluate_main
from neat_vision.tools.export import export_adapter
from neat_vision.tools.export import main as export_main
from neat_vision.tools.predict import main as predict_main
from neat_vision.tools.trained import open_adapter
from tests.data_fixtures import write_corrupt, write_image

CLASSES = ["circle", "cross", "dots", "lines", "square", "wave"]
ARCH = "vit_tiny6_patch4_32"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """``runs/tiny`` of a one-epoch NEAT run on 6 named classes x 10 images (36 / 12 / 12 split)."""
    root = tmp_path_factory.mktemp("after_training")
    for c, name in enumerate(CLASSES):
        for i in range(10):
            write_image(root / "shapes" / name / f"{i}.png", seed=100 * c + i, size=32)
    argv = ["--dataset", "image_folder", "--data-dir", str(root / "shapes"), "--model", f"{ARCH}.fractal"]
    argv += ["--neat-rank", "2", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-tb"]
    argv += ["--limit-train-batches", "3", "--lr-neat", "3e-2", "--lr-head", "3e-2"]
    run(parse_args([*argv, "--output", str(root / "runs"), "--experiment", "tiny"]))
    return root / "runs" / "tiny"


def test_train_records_class_names_and_evaluate_matches_its_test_metrics(trained_run: Path) -> None:
    final = json.loads((trained_run / "final.json").read_text())
    base = neat_vision.read_adapter_config(trained_run / "adapter")["base"]
    assert base["label_names"] == CLASSES and base["num_classes"] == len(CLASSES)

    summary = evaluate_adapter(trained_run / "adapter", split="test", options={"workers": 0})
    assert summary["top1"] == pytest.approx(final["test_top1"], rel=1e-12)
    assert summary["top5"] == pytest.approx(final["test_top5"], rel=1e-12)
    assert summary["loss"] == pytest.approx(final["test_loss"], rel=1e-9)
    assert summary["count"] == final["test_samples"] == 12
    per_class = summary["per_class"]
    assert [c["class"] for c in per_class] == CLASSES and sum(c["count"] for c in per_class) == 12
    assert sum(c["correct"] for c in per_class) == round(summary["top1"] * 12 / 100)
    folder = trained_run / "eval_test"
    assert json.loads((folder / "metrics.json").read_text()) == summary
    assert (folder / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(folder / "confusion.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][1:] == CLASSES and sum(int(v) for r in rows[1:] for v in r[1:]) == 12

    # the command line, on the validation split, with the options train.py knows
    val = evaluate_main(["--adapter", str(trained_run / "adapter"), "--split", "val", "--workers", "0", "--merge"])
    assert val["top1"] == pytest.approx(final["val_top1"]) and val["merged"]
    with pytest.raises(SystemExit, match="dataset 'fractal' is generated"):
        evaluate_main(["--adapter", str(trained_run / "adapter"), "--dataset", "fractal"])


def test_evaluate_rebuilds_a_randomly_initialised_base_and_matches_training_on_digits(tmp_path: Path) -> None:
    """A ``--no-pretrained`` run (timm's seeded random init) on scikit-learn's real digits: same test metrics."""
    argv = ["--dataset", "digits", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--workers", "0"]
    argv += ["--model-kwargs", "{img_size: 16, patch_size: 4, depth: 2, embed_dim: 32, num_heads: 2}"]
    argv += ["--epochs", "1", "--batch-size", "32", "--limit-train-batches", "3", "--no-tb", "--seed", "3"]
    final = run(parse_args([*argv, "--output", str(tmp_path), "--experiment", "digits"]))
    summary = evaluate_adapter(tmp_path / "digits" / "adapter", options={"workers": 0})
    assert (summary["top1"], summary["top5"], summary["count"]) == (final["test_top1"], final["test_top5"], 360)
    assert [c["class"] for c in summary["per_class"]] == [str(d) for d in range(10)]


def test_predict_writes_a_row_per_readable_image_and_reports_the_rest(trained_run: Path, tmp_path: Path) -> None:
    shapes = Path(parse_args(["--config", str(trained_run / "args.yaml")]).data_dir)
    folder = tmp_path / "images"
    shutil.copytree(shapes / "dots", folder / "dots")
    write_corrupt(folder / "dots" / "broken.png")
    single = shutil.copy(shapes / "wave" / "3.png", tmp_path / "single.png")
    listing = tmp_path / "list.txt"
    listing.write_text("# two listed files, one missing\nimages/dots/0.png\nimages/gone.png\n\n")
    out = tmp_path / "preds.csv"
    result = predict_main(
        ["--adapter", str(trained_run / "adapter"), "--output", str(out), "--topk", "3", "--workers", "0"]
        + [str(folder), str(single), str(listing), str(tmp_path / "nowhere")]
    )
    expected_paths = [*sorted((folder / "dots").glob("[0-9].png")), Path(single), folder / "dots" / "0.png"]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]) for r in rows] == expected_paths and result.rows == len(expected_paths)
    assert list(rows[0]) == ["path", "top1_label", "top1_prob", "top2_label", "top2_prob", "top3_label", "top3_prob"]
    skipped = dict(result.skipped)
    broken = str(folder / "dots" / "broken.png")
    assert set(skipped) == {broken, str(tmp_path / "images" / "gone.png"), str(tmp_path / "nowhere")}
    assert "unreadable image" in skipped[broken]

    # the rows are the adapted (unmerged) model's top-3 on the eval transform
    trained = open_adapter(trained_run / "adapter")
    transform = build_transforms(trained.data_config(), train=False)
    images = torch.stack([transform(read_rgb(p)) for p in expected_paths])
    with torch.no_grad():
        probs, classes = trained.model(images).softmax(-1).topk(3)
    for row, p_row, c_row in zip(rows, probs, classes):
        assert [row[f"top{j}_label"] for j in (1, 2, 3)] == [CLASSES[c] for c in c_row]
        assert [float(row[f"top{j}_prob"]) for j in (1, 2, 3)] == pytest.approx(p_row.tolist(), abs=2e-6)


def test_export_loads_through_timm_and_predicts_identically(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    export_main(["--adapter", str(trained_run / "adapter"), "--output", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert (config["architecture"], config["num_classes"], config["label_names"]) == (ARCH, 6, CLASSES)
    cfg = config["pretrained_cfg"]
    assert (cfg["input_size"], cfg["crop_pct"], cfg["num_classes"]) == ([3, 32, 32], 1.0, 6)

    trained = open_adapter(trained_run / "adapter")
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained.model(x)
    weights = str(out / "model.safetensors")
    loaded = {
        "overlay": timm.create_model(
            ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=weights, num_classes=6), num_classes=6
        ),
        "local-dir": timm.create_model(f"local-dir:{out}", pretrained=True),
    }
    # timm's validate.py and inference.py with --checkpoint: create_model, then load_checkpoint
    loaded["load_checkpoint"] = timm.create_model(ARCH, num_classes=6)
    timm.models.load_checkpoint(loaded["load_checkpoint"], weights)
    for how, model in loaded.items():
        with torch.no_grad():
            logits = model.eval()(x)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5, msg=how)
        assert torch.equal(logits.argmax(-1), expected.argmax(-1)), how
    assert loaded["local-dir"].pretrained_cfg["label_names"] == CLASSES
    # timm drops a checkpoint's head when the overlay does not say the checkpoint's num_classes
    headless = timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=weights), num_classes=6)
    with torch.no_grad():
        assert not torch.allclose(headless.eval()(x), expected, atol=1e-3)


def test_export_of_a_transformers_adapter_is_save_pretrained_of_the_merged_model(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from transformers import AutoModelForSequenceClassification, RobertaForSequenceClassification

    from neat_vision.nlp import apply_neat
    from tests.nlp_fixtures import save_roberta_folder

    base = save_roberta_folder(tmp_path / "base")
    model = apply_neat(RobertaForSequenceClassification.from_pretrained(base, num_labels=3), {"rank": 2}).eval()
    with torch.no_grad():
        for p in neat_vision.adapter_parameters(model):
            p.normal_(std=0.3)
    neat_vision.save_adapter(model, tmp_path / "adapter")
    export_adapter(tmp_path / "adapter", tmp_path / "merged")
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[1, 5, 9, 12, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_predict_reports_every_skipped_input_by_reason_and_strict_fails(
    trained_run: Path, tmp_path: Path, caplog, capsys
) -> None:
    """A .gif (animated) and a .txt in a folder, an unreadable .png, a missing file: listed, counted, or fatal."""
    from PIL import Image

    folder = tmp_path / "mixed"
    write_image(folder / "ok.png", seed=1, size=32)
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (folder / "notes.txt").write_text("not an image\n")
    write_corrupt(folder / "broken.png")
    out = tmp_path / "preds.csv"
    argv = ["--adapter", str(trained_run / "adapter"), "--output", str(out), "--workers", "0"]
    caplog.set_level("INFO")
    result = predict_main([*argv, str(folder), str(tmp_path / "gone.png")])
    assert result.rows == 1
    skipped = dict(result.skipped)
    assert set(skipped) == {str(folder / n) for n in ("anim.gif", "notes.txt", "broken.png")} | {
        str(tmp_path / "gone.png")
    }
    assert skipped[str(folder / "anim.gif")].startswith("not an image type: .gif file")
    assert result.reasons == {"not an image type": 2, "no such file": 1, "unreadable image": 1}
    counts = [r.getMessage() for r in caplog.records if "by reason" in r.getMessage()]
    assert len(counts) == 1 and "2 not an image type" in counts[0] and "1 unreadable image" in counts[0]
    assert "1 no such file" in counts[0]

    # --strict: exit 2 with one line naming the problem, and no CSV
    out.unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"^error: strict: 2 input\(s\) would be skipped: 2 not an image type") as info:
        predict_main([*argv, "--strict", str(folder)])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [str(info.value)]
    assert not out.exists()
    # an unreadable image found only when decoded fails the same way, and no partial CSV is left
    with pytest.raises(SystemExit, match=r"^error: strict: 1 input\(s\) would be skipped: 1 unreadable image") as info:
        predict_main([*argv, "--strict", str(folder / "ok.png"), str(folder / "broken.png")])
    assert info.value.code == 2 and not out.exists()
    assert not list(tmp_path.glob(".preds.csv.*.tmp"))


def test_evaluate_lists_skipped_images_by_reason_and_strict_fails(trained_run: Path, tmp_path: Path) -> None:
    shapes = Path(parse_args(["--config", str(trained_run / "args.yaml")]).data_dir)
    data = tmp_path / "shapes"
    shutil.copytree(shapes, data)
    for i in range(6):
        write_corrupt(data / "dots" / f"broken{i}.png")
    (data / "wave" / "notes.txt").write_text("not an image\n")
    (data / "wave" / "anim.gif").write_bytes(b"GIF89a")
    options = {"workers": 0, "data_dir": str(data), "skip_corrupt": True}
    for split in ("test", "val", "train"):
        summary = evaluate_adapter(trained_run / "adapter", split=split, output=tmp_path / split, options=options)
        if "unreadable image" in summary["skipped"]:
            break
    files = summary["skipped_files"]["unreadable image"]
    assert all(Path(f).parent == data / "dots" and Path(f).name.startswith("broken") for f in files)
    others = [str(data / "wave" / "anim.gif"), str(data / "wave" / "notes.txt")]
    assert summary["skipped_files"]["not an image type"] == others
    assert summary["skipped"] == {"not an image type": 2, "unreadable image": len(files)}
    assert json.loads((tmp_path / split / "metrics.json").read_text())["skipped_files"] == summary["skipped_files"]
    argv = ["--adapter", str(trained_run / "adapter"), "--split", split, "--workers", "0", "--data-dir", str(data)]
    with pytest.raises(SystemExit, match=r"^error: strict: \d+ file\(s\) of dataset .* 2 not an image type") as info:
        evaluate_main([*argv, "--skip-corrupt", "--strict", "--output", str(tmp_path / "strict")])
    assert info.value.code == 2 and not (tmp_path / "strict").exists()


def test_predict_on_a_full_disk_exits_2_in_one_line_and_keeps_the_earlier_csv(
    trained_run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    import errno

    out = tmp_path / "preds.csv"
    out.write_text("earlier\n")
    write_text = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith(".preds.csv."):
            write_text(self, "path,top1", newline="")  # a part, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    image = tmp_path / "one.png"
    write_image(image, seed=3, size=32)
    capsys.readouterr()
    argv = ["--adapter", str(trained_run / "adapter"), "--output", str(out), "--workers", "0", str(image)]
    with pytest.raises(SystemExit) as info:
        predict_main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {out}: no space left on the device (")
    assert out.read_text() == "earlier\n" and not list(tmp_path.glob(".preds.csv.*"))
