"""End-to-end training runs on scikit-learn's digits with a tiny randomly initialised ViT (CPU, seconds)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.utils import random_seed

import neat_vision
from neat_vision.engine import NonFiniteLossError, main, parse_args, run
from neat_vision.engine.checkpoint import load_checkpoint
from neat_vision.engine.data import build_datasets, build_loaders, data_config
from neat_vision.engine.distributed import DistEnv
from neat_vision.engine.metrics import evaluate
from neat_vision.engine.model import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "dataset": "digits",
    "model": "vit_tiny_patch16_224",
    "pretrained": False,
    "model_kwargs": {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2},
    "epochs": 2,
    "batch_size": 32,
    "grad_accum": 2,
    "lr_neat": 1e-2,
    "lr_head": 1e-2,
    "hflip": 0.5,
    "crop_scale": [0.5, 1.0],
    "workers": 0,
    "limit_train_batches": 9,
    "log_interval": 2,
    "checkpoint_interval": 0,
}
# what differs between two runs that computed the same thing
VOLATILE = {"wall_time_s", "output_dir"}


def _argv(tmp_path: Path, experiment: str, **options) -> list[str]:
    """train.py's command line for the tiny run (``TINY``, ``options`` overriding it) into ``tmp_path/experiment``."""
    argv = ["--output", str(tmp_path), "--experiment", experiment]
    for key, value in {**TINY, **options}.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def _args(tmp_path: Path, experiment: str, *extra: str, **options):
    return parse_args([*_argv(tmp_path, experiment, **options), *extra])


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def _stable(final: dict) -> dict:
    return {k: v for k, v in final.items() if k not in VOLATILE}


def test_run_learns_writes_outputs_and_exports_a_loadable_adapter(tmp_path: Path) -> None:
    args = _args(tmp_path, "e2e", epochs=3)
    final = run(args)
    run_dir = tmp_path / "e2e"
    for name in ("args.yaml", "summary.csv", "final.json", "checkpoints/last.pth", "checkpoints/best.pth"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tb").glob("events.out.tfevents.*"))
    assert json.loads((run_dir / "final.json").read_text()) == final
    rows = _rows(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert {"lr_neat", "lr_head", "images_per_s", "val_top1", "val_top5"} <= set(rows[0])
    assert final["neat_params"] > 0 and final["trainable_params"] == final["neat_params"] + final["head_params"]
    assert final["val_top1"] == pytest.approx(float(rows[-1]["val_top1"]))
    assert parse_args(["--config", str(run_dir / "args.yaml")]).model_kwargs == TINY["model_kwargs"]

    # the exported adapter on a freshly built base reproduces the validation accuracy
    random_seed(args.seed, 0)
    model = neat_vision.load_adapter(build_model(args, 10), run_dir / "adapter")
    env = DistEnv(torch.device("cpu"))
    loaders = build_loaders(args, build_datasets(args, env), data_config(args, model), env)
    assert evaluate(model, loaders["val"], env, contextlib.nullcontext)["top1"] == pytest.approx(final["val_top1"])

    # a finished run folder with --resume auto returns its results without training
    again = run(_args(tmp_path, "e2e", "--resume", "auto", epochs=3))
    assert again == final


def _count_steps(monkeypatch) -> list[int]:
    """The global step after each optimizer step the loop takes from now on (proof of where a run restarted)."""
    import neat_vision.engine.loop as loop_module

    taken: list[int] = []
    step = loop_module.TrainLoop._optimizer_step

    def counted(loop, terms):
        step(loop, terms)
        taken.append(loop.progress.global_step + 1)

    monkeypatch.setattr(loop_module.TrainLoop, "_optimizer_step", counted)
    return taken


def _resumed_from(caplog) -> list[int]:
    found = (re.search(r"resumed from .*, step (\d+) ", r.getMessage()) for r in caplog.records)
    return [int(m[1]) for m in found if m]


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, monkeypatch, caplog) -> None:
    caplog.set_level("INFO", logger="neat_vision.engine")
    whole = run(_args(tmp_path, "whole"))
    taken = _count_steps(monkeypatch)
    # stop mid-epoch 1 (after 3 of 5 optimizer steps), resume with other worker counts, stop again in epoch 2
    stopped = run(_args(tmp_path, "parts", "--stop-after-steps", "3"))
    assert stopped["stopped_at_step"] == 3 and not (tmp_path / "parts" / "final.json").exists()
    assert taken == [1, 2, 3] and _resumed_from(caplog) == []
    taken.clear()
    again = run(_args(tmp_path, "parts", "--resume", "auto", "--stop-after-steps", "7", workers=2))
    assert again["stopped_at_step"] == 7
    # it restarted from the checkpoint of step 3 and took steps 4..7 only
    assert _resumed_from(caplog) == [3] and taken == [4, 5, 6, 7]
    assert load_checkpoint(tmp_path / "parts" / "checkpoints" / "last.pth")["progress"]["step"] == 7
    taken.clear()
    parts = run(_args(tmp_path, "parts", "--resume", "auto", workers=1))
    assert _resumed_from(caplog) == [3, 7] and taken == [8, 9, 10]
    assert _stable(parts) == _stable(whole) and parts["steps"] == 10
    a, b = (load_file(tmp_path / name / "adapter" / "adapter.safetensors") for name in ("whole", "parts"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert [r["train_loss"] for r in _rows(tmp_path / "parts")] == [r["train_loss"] for r in _rows(tmp_path / "whole")]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, capsys) -> None:
    args = _args(tmp_path, "nan", "--checkpoint-interval", "1", lr_neat=1e30, lr_head=1e30)
    with pytest.raises(NonFiniteLossError, match=r"non-finite .* optimizer step (\d+)") as info:
        run(args)
    bad_step = int(re.search(r"optimizer step (\d+)", str(info.value))[1])
    last = tmp_path / "nan" / "checkpoints" / "last.pth"
    assert f"checkpoint {last} (step {bad_step - 1}) is intact and verified finite" in str(info.value)
    ckpt = load_checkpoint(tmp_path / "nan" / "checkpoints" / "last.pth")
    assert ckpt["progress"]["step"] == bad_step - 1 >= 1
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # the script reports it in one line and exits 3
        main(["--config", str(tmp_path / "nan" / "args.yaml"), "--experiment", "nan2"])
    assert exit_info.value.code == 3
    assert capsys.readouterr().err.startswith("error: non-finite ")


def test_torchrun_two_processes_with_gloo_train_like_one(tmp_path: Path) -> None:
    # the same global batch: 2 processes x 16 = 1 x 32; augmentation is seeded per sample, not per rank
    config = tmp_path / "tiny.yaml"
    half = {**TINY, "batch_size": TINY["batch_size"] // 2}
    config.write_text(json.dumps({**half, "epochs": 1, "output": str(tmp_path), "experiment": "ddp"}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [*cmd, str(ROOT / "train.py"), "--config", str(config), "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    final = json.loads((tmp_path / "ddp" / "final.json").read_text())
    assert final["test_samples"] == 360 and final["steps"] == 5  # exact eval across shards; 9 batches, accum 2
    assert result.stdout.count("epoch 1/1: train loss") == 1  # only rank 0 reports
    assert len(_rows(tmp_path / "ddp")) == 1
    one = run(_args(tmp_path, "one", epochs=1))
    for key, value in one.items():
        if key in VOLATILE or not isinstance(value, (int, float)):
            continue
        # measured: accuracies and counts equal, losses within 4e-8 (gloo's sum of two halves vs one sum)
        assert final[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    ddp_rows, one_rows = _rows(tmp_path / "ddp"), _rows(tmp_path / "one")
    assert float(ddp_rows[0]["train_loss"]) == pytest.approx(float(one_rows[0]["train_loss"]), rel=1e-6)
