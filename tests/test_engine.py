"""Engine pieces: options and YAML configs, dry runs of every shipped config, optimizer, schedule, sampler,
checkpoint helpers. End-to-end runs are in test_train_e2e.py."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import neat_vision.adapter
from neat_vision.data import EpochSampler, SyntheticImages, sample_seed
from neat_vision.engine import dry_run, load_config, parse_args
from neat_vision.engine.args import ConfigFileError
from neat_vision.engine.checkpoint import CheckpointMismatchError, check_resumable, rng_state, set_rng_state
from neat_vision.engine.metrics import topk_correct
from neat_vision.engine.model import UnreachedLayerError, build_adapter, build_model
from neat_vision.engine.optim import LinearWarmupDecay, param_groups

ROOT = Path(__file__).resolve().parents[1]
# configs of other tools (study runner, GLUE and instruction-tuning scripts) live in these folders
OTHER_TOOLS = {"studies", "glue", "instruct", "offline_compare", "offline_compare_mobilenet"}
CONFIGS = sorted(
    p for p in (ROOT / "configs").rglob("*.yaml") if not OTHER_TOOLS & set(p.relative_to(ROOT / "configs").parts)
)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ options, YAML


def test_yaml_sets_defaults_with_types_and_cli_overrides(tmp_path: Path) -> None:
    cfg = _write(
        tmp_path / "c.yaml", "lr_neat: 5e-3\nneat_targets: [q, v, mlp]\nneat_layers: [4, 5]\npretrained: false\n"
    )
    args = parse_args(["--config", str(cfg), "--neat-act", "sin", "--neat-depth", "6"])
    assert args.lr_neat == 5e-3 and isinstance(args.lr_neat, float)  # PyYAML reads 5e-3 as a string
    assert args.neat_targets == ["q", "v", "mlp"] and args.neat_layers == [4, 5] and args.pretrained is False
    assert (args.neat_act, args.neat_depth) == ("sin", 6)
    assert parse_args(["--config", str(cfg), "--neat-layers", "all"]).neat_layers is None
    assert parse_args(["--config", str(cfg), "--lr-neat", "1e-2"]).lr_neat == 1e-2


def test_method_neutral_spelling_of_the_update_learning_rate(tmp_path: Path) -> None:
    assert parse_args(["--method", "lora", "--lr-adapter", "2e-2"]).lr_neat == 2e-2
    cfg = tmp_path / "a.yaml"
    cfg.write_text("method: lora\nlr_adapter: 3.0e-3\n")
    assert parse_args(["--config", str(cfg)]).lr_neat == 3e-3


def test_model_kwargs_from_cli_and_yaml(tmp_path: Path) -> None:
    assert parse_args(["--model-kwargs", "{img_size: 32, depth: 2}"]).model_kwargs == {"img_size": 32, "depth": 2}
    cfg = _write(tmp_path / "c.yaml", "model_kwargs: {img_size: 32}\n")
    assert parse_args(["-c", str(cfg)]).model_kwargs == {"img_size": 32}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lr_neta: 1e-3\n", "unknown key 'lr_neta'; did you mean lr_neat"),
        ("neat_act: swish\n", "neat_act='swish' is not allowed: one of relu, sin"),
        ("epochs: 2.5\n", "epochs=2.5 is not allowed: an integer"),
        ("pretrained: 'no'\n", "pretrained='no' is not allowed: true or false"),
        ("hflip: 2\n", "hflip=2 is not allowed"),
        ("crop_scale: [0.5]\n", "a list of 2 values"),
    ],
)
def test_bad_yaml_fails_naming_key_value_and_allowed(tmp_path: Path, capsys, text: str, expected: str) -> None:
    cfg = _write(tmp_path / "bad.yaml", text)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", str(cfg)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and str(cfg) in err


def test_base_inheritance_relative_and_overrides(tmp_path: Path) -> None:
    _write(tmp_path / "base.yaml", "epochs: 10\nlr_neat: 1e-2\nneat_rank: 7\n")
    _write(tmp_path / "mid" / "dataset.yaml", "base: ../base.yaml\nlr_neat: 5e-3\ndataset: dtd\n")
    leaf = _write(tmp_path / "mid" / "sub" / "leaf.yaml", "base: ../dataset.yaml\nneat_rank: 2\n")
    values = load_config(leaf)
    assert values == {"epochs": 10, "lr_neat": 5e-3, "neat_rank": 2, "dataset": "dtd"}
    args = parse_args(["--config", str(leaf), "--epochs", "3"])
    assert (args.epochs, args.lr_neat, args.neat_rank, args.dataset) == (3, 5e-3, 2, "dtd")


def test_base_loop_and_missing_base_fail(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigFileError, match="loops"):
        load_config(a)
    with pytest.raises(ConfigFileError, match="not found"):
        load_config(_write(tmp_path / "c.yaml", "base: nope.yaml\n"))


def test_paper_configs_hold_table_6_and_7() -> None:
    cars = parse_args(["--config", str(ROOT / "configs" / "stanford_cars.yaml")])
    assert (cars.model, cars.lr_neat, cars.lr_head, cars.weight_decay) == (
        "vit_base_patch16_224.orig_in21k",
        1e-2,
        1e-2,
        4e-5,
    )
    assert (cars.epochs, cars.batch_size, cars.grad_accum, cars.amp, cars.warmup_epochs) == (10, 64, 4, "none", 0)
    mlp = parse_args(["--config", str(ROOT / "configs" / "qv_mlp" / "resisc45.yaml")])
    assert (mlp.neat_targets, mlp.neat_rank, mlp.lr_neat, mlp.lr_head, mlp.weight_decay) == (
        ["q", "v", "mlp"],
        2,
        1e-2,
        1e-2,
        3e-4,
    )
    sin = parse_args(["--config", str(ROOT / "configs" / "sin" / "cifar100.yaml")])
    assert (sin.neat_act, sin.neat_rank, sin.lr_neat, sin.lr_head, sin.weight_decay) == ("sin", 7, 1e-3, 5e-3, 1e-4)


# ------------------------------------------------------------------------------------------ dry runs


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_dry_runs(config: Path) -> None:
    plan = dry_run(parse_args(["--config", str(config), "--dry-run"]))
    assert (
        plan["params"]["trainable"] > 0
        and plan["batch_shapes"]["train"][0] == parse_args(["-c", str(config)]).batch_size
    )


def test_dry_run_plan_matches_the_paper() -> None:
    plan = dry_run(parse_args(["--config", str(ROOT / "configs" / "stanford_cars.yaml"), "--dry-run"]))
    assert plan["params"]["neat"] == 258_048  # the paper's 258K for ViT-B q,v r=7
    assert plan["split_sizes"] == {"train": 7329, "val": 815, "test": 8041}
    assert plan["plan"]["steps_per_epoch"] == 29  # 7329 // 64 = 114 batches, 4 per step
    assert plan["batch_shapes"]["train"] == [64, 3, 224, 224]
    assert plan["data_config"]["crop_pct"] == 1.0 and plan["data_config"]["mean"] == (0.5, 0.5, 0.5)


def test_model_that_bypasses_adapted_layers_fails_by_name(monkeypatch) -> None:
    """EVA02 reads ``qkv.weight`` directly; without the timm integration's forward patch the dry run refuses it."""
    monkeypatch.setattr(neat_vision.adapter, "FORWARD_PATCHES", [])
    args = parse_args(["--model", "eva02_tiny_patch14_224", "--dataset", "digits", "--dry-run"])
    with pytest.raises(UnreachedLayerError, match=r"blocks\.0\.attn\.qkv"):
        dry_run(args)
    monkeypatch.undo()
    dry_run(args)  # with the patch the attention calls the adapted qkv


# ------------------------------------------------------------------------------------------ model, optimizer


def _tiny_args(*extra: str) -> argparse.Namespace:
    kwargs = "{img_size: 16, patch_size: 4, depth: 2, embed_dim: 32, num_heads: 2}"
    return parse_args(["--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", kwargs, *extra])


def test_head_init_zero_starts_the_new_classifier_at_zero() -> None:
    args = parse_args(["--model", "test_efficientnet", "--no-pretrained", "--dataset", "digits"])
    assert args.head_init == "timm" and build_model(args, 10).get_classifier().weight.abs().sum() > 0
    args = parse_args(["--model", "test_efficientnet", "--no-pretrained", "--dataset", "digits", "--head-init", "zero"])
    model = build_model(args, 10)
    head = model.get_classifier()
    assert not head.weight.any() and not head.bias.any()
    assert model.conv_stem.weight.any()  # only the head
    assert not model(torch.randn(2, 3, 32, 32)).any()


def test_pretrained_file_loads_local_weights(tmp_path: Path) -> None:
    source = build_model(_tiny_args(), 10)
    file = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), str(file))
    model = build_model(_tiny_args("--pretrained", "--pretrained-file", str(file)), 10)
    loaded = model.state_dict()
    for name, tensor in source.state_dict().items():
        if not name.startswith("head."):  # timm drops a classifier whose class count differs from the tag's
            assert torch.equal(tensor, loaded[name]), name
    with pytest.raises(FileNotFoundError, match="pretrained_file='nope.pth'"):
        build_model(_tiny_args("--pretrained", "--pretrained-file", "nope.pth"), 10)


@pytest.mark.parametrize(
    ("method", "groups"),
    [("neat", {"neat": 1e-2, "head": 1e-3}), ("linear", {"head": 1e-3}), ("full", {"head": 1e-3, "backbone": 1e-4})],
)
def test_param_groups_per_method(method: str, groups: dict[str, float]) -> None:
    args = _tiny_args("--method", method, "--lr-neat", "1e-2", "--lr-head", "1e-3", "--lr-backbone", "1e-4")
    args.weight_decay_head = 0.5
    model = build_adapter(build_model(args, 10), args)
    got = param_groups(model, args)
    assert {g["name"]: g["lr"] for g in got} == groups
    assert {g["name"]: g["weight_decay"] for g in got}["head"] == 0.5
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in got for p in g["params"]} == trainable


def test_linear_schedule_with_warmup() -> None:
    factor = LinearWarmupDecay(warmup_steps=2, total_steps=10)
    assert [factor(t) for t in range(11)] == pytest.approx(
        [0, 0.5, 1, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0]
    )
    assert LinearWarmupDecay(0, 4)(0) == 1.0


def test_topk_correct_counts() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    assert topk_correct(logits, torch.tensor([1, 2, 0]), ks=(1, 2, 5)).tolist() == [1, 2, 3]


# ------------------------------------------------------------------------------------------ sampler, checkpoints


def test_epoch_sampler_resumes_on_the_same_items_and_seeds() -> None:
    data = SyntheticImages(23, 3, size=4)
    sampler = EpochSampler(data, shuffle=True, seed=5, drop_last=True)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, start=8)
    assert list(sampler) == full[8:] and len(sampler) == len(full) - 8
    assert full[0][1] == sample_seed(5, 3, full[0][0])
    sampler.set_epoch(4)
    assert [i for i, _ in sampler] != [i for i, _ in full]


def test_epoch_sampler_eval_shards_are_exact() -> None:
    data = SyntheticImages(11, 3, size=4)
    shards = [[i for i, _ in EpochSampler(data, num_replicas=3, rank=r, shuffle=False, pad=False)] for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))


def test_rng_state_round_trip() -> None:
    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_resume_refuses_other_options() -> None:
    args = _tiny_args("--dataset", "digits")
    saved = vars(_tiny_args("--dataset", "digits", "--neat-rank", "2", "--workers", "0"))
    with pytest.raises(CheckpointMismatchError, match="neat_rank: checkpoint 2, now 7") as info:
        check_resumable(saved, args)
    assert "workers" not in str(info.value)
