"""The comparison command runs end to end on a tiny grid and selects the learning rate on validation."""

from pathlib import Path

import yaml

from neat_vision import compare

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


def test_compare_end_to_end_on_a_tiny_grid(tmp_path):
    config = {
        "title": "tiny digits",
        "base_config": str(REPO / "configs" / "demo.yaml"),
        "overrides": {
            "epochs": 1,
            "limit_train_batches": 2,
            "limit_eval_batches": 1,
            "param_budget": 18432,
            "tb": False,
        },
        "methods": {"LP": {"method": "linear", "lr": [1e-2, 3e-2]}, "NEAT": {"method": "neat", "lr": [1e-2]}},
        "seeds": [0, 1],
        "output": str(tmp_path / "study"),
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    assert compare.main(["--config", str(path), "--output", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "compare.md").read_text()
    assert "| LP |" in text and "| NEAT | 18,432 |" in text and "± " in text
    assert (tmp_path / "report" / "compare.png").stat().st_size > 0
    assert len((tmp_path / "report" / "compare.csv").read_text().splitlines()) == 3
