"""timm's training vocabulary in train.py: each flag does what timm's part does, and the whole recipe resumes
exactly, trains alike on 1 and 2 processes and stops on a NaN with a finite checkpoint (EMA included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_train_e2e import TINY, VOLATILE, _args, _argv, _count_steps, _resumed_from, _rows, _stable
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from timm.scheduler import create_scheduler_v2

from neat_vision.engine import NonFiniteLossError, parse_args, run
from neat_vision.engine.checkpoint import load_checkpoint
from neat_vision.engine.ema import TrainableEma
from neat_vision.engine.optim import build_optimizer, param_groups
from neat_vision.engine.regularization import build_mixup, build_train_loss, seeded_batch
from neat_vision.engine.schedule import build_scheduler

ROOT = Path(__file__).resolve().parents[1]

# the whole recipe at once (tiny): cosine + warmup + smoothing + mixup/cutmix + RandAugment + erasing + EMA + drop path
RECIPE = (
    "--sched", "cosine", "--warmup-epochs", "1", "--min-lr", "1e-4", "--smoothing", "0.1", "--mixup", "0.8",
    "--cutmix", "1.0", "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--model-ema", "--model-ema-decay",
    "0.8", "--drop-path", "0.1", "--drop", "0.1",
)  # fmt: skip


def _options(**changes):
    args = parse_args(["--dataset", "digits", "--model", "vit_tiny_patch16_224", "--no-pretrained"])
    for key, value in changes.items():
        setattr(args, key, value)
    return args


# ---- each flag against timm's own part ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sched, extra",
    [
        ("cosine", {}),
        ("cosine", {"sched_on_updates": True}),
        ("step", {"decay_epochs": 2, "decay_rate": 0.5}),
        ("multistep", {"decay_milestones": [2, 3]}),
        ("poly", {"decay_rate": 1.0, "sched_on_updates": True}),
        ("tanh", {}),
    ],
)
def test_schedule_sets_the_lrs_timm_sets(sched, extra):
    """Per optimizer step, the LR of each group equals timm's scheduler driven as timm's train.py drives it."""
    epochs, steps = 5, 3
    settings = dict(sched=sched, epochs=epochs, warmup_epochs=1, warmup_lr=1e-4, min_lr=1e-5, **extra)
    args = _options(**settings)

    def optimizer():
        a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
        return torch.optim.AdamW([{"params": [a], "lr": 1e-2}, {"params": [b], "lr": 3e-3}])

    ours_opt, timm_opt = optimizer(), optimizer()
    ours = build_scheduler(ours_opt, 0, epochs * steps, args, steps)
    on_updates = bool(extra.get("sched_on_updates"))
    reference, _ = create_scheduler_v2(
        timm_opt, sched=sched, num_epochs=epochs, warmup_epochs=1, warmup_lr=1e-4, min_lr=1e-5,
        decay_epochs=extra.get("decay_epochs", 90), decay_milestones=extra.get("decay_milestones", [90, 180, 270]),
        decay_rate=extra.get("decay_rate", 0.1), step_on_epochs=not on_updates, updates_per_epoch=steps,
    )  # fmt: skip
    seen, expected, updates = [], [], 0
    for epoch in range(epochs):
        for _ in range(steps):
            seen.append([g["lr"] for g in ours_opt.param_groups])
            assert ours.lrs_at(updates) == pytest.approx(seen[-1])  # what the summary reports
            expected.append([g["lr"] for g in timm_opt.param_groups])
            ours.step()
            updates += 1
            reference.step_update(num_updates=updates)
        ours.end_epoch(epoch + 1, 50.0)
        reference.step(epoch + 1, 50.0)
    np.testing.assert_allclose(seen, expected, rtol=1e-12)
    assert len({tuple(lrs) for lrs in seen}) >= 3  # the schedule moved


def test_plateau_schedule_state_survives_a_resume():
    """timm does not save plateau's counters; we do: a schedule restored mid-run decays when the original would."""
    args = _options(sched="plateau", epochs=20, patience_epochs=1, decay_rate=0.5)

    def make():
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.AdamW([p], lr=1e-2)
        return opt, build_scheduler(opt, 0, 20, args, 1)

    opt_a, a = make()
    metrics = [10.0, 9.0, 8.0, 7.0, 6.0, 5.0]
    for epoch, m in enumerate(metrics[:2], 1):  # stopped with one bad epoch counted (timm would forget it)
        a.end_epoch(epoch, m)
    opt_b, b = make()
    b.load_state_dict(a.state_dict())
    opt_b.load_state_dict(opt_a.state_dict())
    for epoch, m in enumerate(metrics[2:], 3):
        a.end_epoch(epoch, m)
        b.end_epoch(epoch, m)
        assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"]
    assert opt_a.param_groups[0]["lr"] <= 1e-2 / 4  # it decayed more than once


def test_mixup_and_cutmix_are_timms_and_targets_sum_to_one():
    args = _options(mixup=0.8, cutmix=1.0, smoothing=0.1)
    ours = build_mixup(args, num_classes=10)
    reference = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    x = torch.randn(8, 3, 16, 16)
    y = torch.arange(8) % 10
    for seed in range(6):  # both modes come up (switch_prob 0.5)
        with seeded_batch(seed, torch.device("cpu")):
            mixed, soft = ours(x.clone(), y)
        np.random.seed(seed)
        want_x, want_y = reference(x.clone(), y)
        torch.testing.assert_close(mixed, want_x)
        torch.testing.assert_close(soft, want_y)
        torch.testing.assert_close(soft.sum(1), torch.ones(8))
        assert not torch.equal(mixed, x)


def test_losses_are_the_ones_timm_train_picks():
    logits, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    smooth = build_train_loss(_options(smoothing=0.1))
    assert isinstance(smooth, LabelSmoothingCrossEntropy)
    torch.testing.assert_close(smooth(logits, labels), F.cross_entropy(logits, labels, label_smoothing=0.1))
    assert isinstance(build_train_loss(_options(mixup=0.2)), SoftTargetCrossEntropy)
    assert isinstance(build_train_loss(_options(bce_loss=True, smoothing=0.1)), BinaryCrossEntropy)
    assert build_train_loss(_options()) is F.cross_entropy


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_equals_an_ema_computed_by_hand(warmup):
    model = timm.create_model("resnet10t", num_classes=3)  # BatchNorm statistics are averaged too
    for p in model.parameters():
        p.requires_grad_(False)
    model.fc.weight.requires_grad_(True)
    ema = TrainableEma(model, decay=0.9, warmup=warmup)
    assert ema.names[0] == "fc.weight" and any(n.endswith("running_mean") for n in ema.names)
    by_hand = None
    for step in range(1, 6):
        with torch.no_grad():
            model.fc.weight.add_(torch.randn_like(model.fc.weight))
            model.bn1.running_mean.add_(1.0)
        ema.update(step)
        decay = 0.0 if step == 1 else (min(1 - step ** (-2 / 3), 0.9) if warmup else 0.9)  # timm's warmup, t=step-1
        live = {"fc.weight": model.fc.weight.clone(), "bn1.running_mean": model.bn1.running_mean.clone()}
        by_hand = live if by_hand is None else {k: decay * by_hand[k] + (1 - decay) * live[k] for k in live}
        averaged = ema.averaged()
        for key in by_hand:
            torch.testing.assert_close(averaged[key], by_hand[key])
    before = model.fc.weight.clone()
    with ema.applied():
        torch.testing.assert_close(model.fc.weight, by_hand["fc.weight"])
    assert torch.equal(model.fc.weight, before)  # the live weights came back


@pytest.mark.parametrize("sched", ["linear", "cosine"])
def test_layer_decay_groups_are_timms(sched):
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=3, num_classes=4)
    args = _options(method="full", layer_decay=0.6, lr_neat=1e-2, lr_head=1e-2, sched=sched)
    groups = param_groups(model, args)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    reference = param_groups_layer_decay(model, weight_decay=0.0, layer_decay=0.6)
    want = {id(p): g["lr_scale"] for g in reference for p in g["params"]}
    assert scale_of == want and len(set(want.values())) == 5  # embeddings, 3 blocks, head/norm
    optimizer = build_optimizer(model, args)
    build_scheduler(optimizer, 0, 10, args, 2)
    for g in optimizer.param_groups:  # the schedule's LR times the group's scale
        assert g["lr"] == pytest.approx(1e-2 * g["lr_scale"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sched", "cosin"], "invalid choice: 'cosin'"),
        (["--mixup", "-1"], "--mixup=-1.0 is not allowed: a finite number >= 0"),
        (["--smoothing", "1.5"], "--smoothing=1.5 is not allowed: a number in [0, 1)"),
        (["--aa", "rand-q9"], "--aa='rand-q9'"),
        (["--model-ema-decay", "2"], "--model-ema-decay=2.0 is not allowed: a number in [0, 1)"),
        (["--opt", "adamx"], "--opt='adamx' is not a timm optimizer"),
        (["--mixup", "0.8", "--batch-size", "7"], "--batch-size=7 is odd"),
        (["--cutmix", "1", "--batch-size", "1"], "--batch-size=1 is odd"),
        (["--min-lr", "1e-5"], "--min-lr=1e-05 has no effect with sched='linear'"),
        (["--layer-decay", "0.7", "--model", "resnet18"], None),  # resnet has layers: accepted
        (["--reprob", "1.5"], "--reprob=1.5 is not allowed: a probability in [0, 1]"),
        (["--remode", "zero"], "invalid choice: 'zero'"),
    ],
)
def test_bad_recipe_values_fail_before_anything_loads(argv, message, capsys):
    base = ["--dataset", "digits", "--model", "vit_tiny_patch16_224", "--no-pretrained"]
    if message is None:
        parse_args([*base, *argv])
        return
    with pytest.raises(SystemExit) as info:
        parse_args([*base, *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_layer_decay_on_a_model_without_layers_is_refused(capsys, monkeypatch):
    import timm.optim

    # what timm returns for a model it puts in one layer group (no group_matcher, no blocks or stages)
    monkeypatch.setattr(timm.optim, "param_groups_layer_decay", lambda model, layer_decay: [{"lr_scale": 1.0}])
    with pytest.raises(SystemExit):
        parse_args(
            ["--dataset", "digits", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--layer-decay", "0.7"]
        )
    assert "timm finds no layers" in capsys.readouterr().err


# ---- the whole recipe through the engine ----------------------------------------------------------------------


def test_full_recipe_stopped_and_resumed_equals_an_uninterrupted_run(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="neat_vision.engine")
    whole = run(_args(tmp_path, "whole", *RECIPE, "--save-images", "--checkpoint-hist", "2", epochs=3))
    run_dir = tmp_path / "whole"
    rows = _rows(run_dir)
    assert {"live_val_top1", "val_top1"} <= set(rows[0]) and float(rows[0]["lr_neat"]) == pytest.approx(1e-5)
    assert (run_dir / "train-batch.jpg").is_file() and (run_dir / "adapter_live").is_dir()
    assert len(list((run_dir / "checkpoints").glob("checkpoint-*.pth"))) == 2  # the 2 best of 3 epochs
    assert "live_test_top1" in whole and whole["test_top1"] != whole["live_test_top1"]
    ema = load_file(run_dir / "adapter" / "adapter.safetensors")
    live = load_file(run_dir / "adapter_live" / "adapter.safetensors")
    assert any(not torch.equal(ema[k], live[k]) for k in ema)  # adapter/ is the EMA, adapter_live/ the live one
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 1}).Reload()
    assert "train/augmented_batch" in events.Tags()["images"]

    taken = _count_steps(monkeypatch)
    stopped = run(
        _args(
            tmp_path, "parts", *RECIPE, "--save-images", "--checkpoint-hist", "2", "--stop-after-steps", "7", epochs=3
        )
    )
    assert stopped["stopped_at_step"] == 7 and taken[-1] == 7  # mid-epoch 2 (5 steps per epoch)
    assert load_checkpoint(tmp_path / "parts" / "checkpoints" / "last.pth")["model_ema"]
    taken.clear()
    parts = run(
        _args(
            tmp_path,
            "parts",
            *RECIPE,
            "--save-images",
            "--checkpoint-hist",
            "2",
            "--resume",
            "auto",
            workers=2,
            epochs=3,
        )
    )
    assert _resumed_from(caplog) == [7] and taken == list(range(8, 16))
    assert _stable(parts) == _stable(whole)
    assert [r["train_loss"] for r in _rows(tmp_path / "parts")] == [r["train_loss"] for r in rows]


def test_full_recipe_nan_stop_keeps_a_finite_checkpoint_with_its_ema(tmp_path):
    args = _args(tmp_path, "nan", *RECIPE, "--checkpoint-interval", "1", lr_neat=1e30, lr_head=1e30)
    with pytest.raises(NonFiniteLossError, match=r"optimizer step (\d+)") as info:
        run(args)
    assert "is intact and verified finite" in str(info.value)
    ckpt = load_checkpoint(tmp_path / "nan" / "checkpoints" / "last.pth")
    assert ckpt["model_ema"] and all(torch.isfinite(t).all() for t in ckpt["model_ema"].values())
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_full_recipe_on_two_gloo_processes_trains_like_one(tmp_path):
    """2 processes x batch 16 x accum 1 = 1 process x batch 16 x accum 2: the same micro-batches, the same mixup,
    RandAugment, erasing and drop-path draws (seeded per sample and per batch), so the same run."""
    config = tmp_path / "tiny.yaml"
    half = {**TINY, "batch_size": 16, "grad_accum": 1, "epochs": 1, "output": str(tmp_path), "experiment": "ddp"}
    config.write_text(json.dumps(half))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [*cmd, str(ROOT / "train.py"), "--config", str(config), "--device", "cpu", *RECIPE],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "final.json").read_text())
    one = run(_args(tmp_path, "one", *RECIPE, batch_size=16, grad_accum=2, epochs=1, limit_train_batches=18))
    assert ddp["steps"] == one["steps"] == 9
    for key, value in one.items():
        if key in VOLATILE or not isinstance(value, (int, float)):
            continue
        assert ddp[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_vpetl_recipe_runs_end_to_end_on_the_offline_demo(tmp_path):
    config = tmp_path / "vtab_demo.yaml"
    config.write_text(f"base: {ROOT / 'configs' / 'recipes' / 'vtab1k_vpetl.yaml'}\ndataset: digits\n")
    recipe = parse_args(["--config", str(config)])
    assert (recipe.sched, recipe.warmup_epochs, recipe.min_lr, recipe.smoothing, recipe.drop_path) == (
        "cosine", 10, 1e-5, 0.1, 0.1,
    )  # fmt: skip
    argv = _argv(tmp_path, "vpetl", epochs=2, warmup_epochs=1)
    final = run(parse_args(["--config", str(config), *argv]))
    assert final["steps"] == 10 and 0 <= final["test_top1"] <= 100
    rows = _rows(tmp_path / "vpetl")
    assert float(rows[0]["lr_neat"]) == pytest.approx(1e-7)  # warmup_lr in the first (warmup) epoch


def test_grad_checkpointing_and_channels_last_train_like_the_plain_run(tmp_path):
    """timm's block checkpointing (the batched tweaker pass stands aside) and the channels-last format change how
    the step is computed, not what it computes."""
    plain = run(_args(tmp_path, "plain", "--drop-path", "0.1", epochs=1))
    other = run(_args(tmp_path, "ckpt", "--drop-path", "0.1", "--grad-checkpointing", "--channels-last", epochs=1))
    for key, value in plain.items():
        if key in VOLATILE or not isinstance(value, (int, float)):
            continue
        assert other[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
