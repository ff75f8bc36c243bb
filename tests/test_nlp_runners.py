"""The GLUE and instruction-tuning runners end to end on tiny models and data in the real formats, every method."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402

from neat_vision.engine.method_options import method_fields  # noqa: E402
from neat_vision.integrations.transformers import load_tokenizer  # noqa: E402
from neat_vision.methods import LoraConfig, NeatConfig  # noqa: E402
from neat_vision.nlp import glue, instruct  # noqa: E402
from neat_vision.nlp.cli import parse_args  # noqa: E402
from neat_vision.nlp.glue_data import TASKS, load_glue  # noqa: E402
from neat_vision.nlp.loop import CHECKPOINT, load_trained  # noqa: E402
from neat_vision.nlp.metrics import glue_metrics  # noqa: E402
from tests import nlp_fixtures as fx  # noqa: E402
from tests.nlp_fixtures import assert_same_saved, single_thread  # noqa: E402, F401 (single_thread: an autouse fixture)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def roberta_folder(tmp_path_factory) -> Path:
    return fx.save_roberta_folder(tmp_path_factory.mktemp("roberta") / "model")


def glue_args(model: Path, data: Path, out: Path, task: str, *extra: str) -> list[str]:
    common = ["--task", task, "--model", str(model), "--data-dir", str(data), "--output", str(out)]
    return common + ["--lr", "1e-2", "--batch-size", "8", "--neat", "rank=2", "--neat", "scale=1.0", *extra]


# each method's options on top of glue_args' (whose NEAT-only fields the other methods leave aside)
METHOD_ARGS = {
    "neat": [],
    "lora": ["--method", "lora", "--lora-rank", "2", "--lora-alpha", "4"],
    "fourierft": ["--method", "fourierft", "--fourier-n", "48", "--fourier-alpha", "64"],
    "linear": ["--method", "linear"],
    "full": ["--method", "full"],
}
SAVED = {"linear": "head.safetensors", "full": "model.safetensors"}  # what linear / full save instead of an adapter


@contextlib.contextmanager
def killed_at_step(monkeypatch, step: int) -> Iterator[None]:
    """Within the block, a run dies (KeyboardInterrupt) when it logs the training loss of optimizer step ``step``."""
    add_scalar = SummaryWriter.add_scalar

    def die(self, tag, value, global_step=None, *args, **kwargs):
        if tag == "train/loss" and global_step == step:
            raise KeyboardInterrupt("killed")
        return add_scalar(self, tag, value, global_step, *args, **kwargs)

    monkeypatch.setattr(SummaryWriter, "add_scalar", die)
    try:
        yield
    finally:
        monkeypatch.setattr(SummaryWriter, "add_scalar", add_scalar)


def nan_losses_from_call(monkeypatch, first: int) -> None:
    """``F.cross_entropy`` returns NaN from its ``first``-th call on (a diverging run)."""
    cross_entropy, calls = torch.nn.functional.cross_entropy, []

    def nan_from(*args, **kwargs):
        calls.append(1)
        loss = cross_entropy(*args, **kwargs)
        return loss * float("nan") if len(calls) >= first else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_from)


def read_results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize(
    ("task", "extra", "method"),
    [
        ("cola", [], "neat"),
        ("stsb", [], "neat"),
        ("mrpc", ["--gradient-checkpointing"], "neat"),
        ("mnli", ["--dtype", "bf16"], "neat"),
        ("stsb", [], "lora"),
        ("stsb", [], "fourierft"),
        ("stsb", [], "linear"),
        ("stsb", ["--head-lr", "2e-2"], "full"),
    ],
    ids=["cola", "stsb", "mrpc-checkpointing", "mnli-bf16", "stsb-lora", "stsb-fourierft", "stsb-linear"]
    + ["stsb-full"],
)
def test_glue_runner_end_to_end(tmp_path, roberta_folder, task, extra, method):
    data = fx.write_glue(tmp_path / "glue", task, n_train=24, n_dev=12)
    out = tmp_path / "run"
    assert glue.main(glue_args(roberta_folder, data, out, task, "--epochs", "2", *METHOD_ARGS[method], *extra)) == 0
    results = read_results(out)
    metrics = {"cola": {"mcc"}, "stsb": {"pearson", "spearman"}, "mrpc": {"accuracy", "f1"}, "mnli": {"accuracy"}}
    assert [row["epoch"] for row in results["history"]] == [1, 2]
    assert metrics[task] <= set(results["best"]) and results["dev_examples"] == 12
    saved = SAVED.get(method, "adapter.safetensors")
    assert (out / "best" / saved).is_file() and (out / "last" / saved).is_file()
    assert len((out / "summary.csv").read_text().splitlines()) == 3 and list((out / "tb").iterdir())
    state = torch.load(out / CHECKPOINT, weights_only=True)
    groups = {"linear": ["head"], "full": ["head", "backbone"]}.get(method, ["adapter", "head"])
    assert [g["name"] for g in state["optimizer"]["param_groups"]] == groups
    params = results["params"]
    if method == "linear":  # the classifier head only
        assert params["trainable"] == params["head"] > 0 and params["adapter"] == 0
    if method == "full":
        assert params["trainable"] == params["total"]
    if method in ("lora", "fourierft"):
        assert params["adapter"] == (4 * 2 * (32 + 32) if method == "lora" else 4 * 48)  # 2 layers x q, v
    if task == "stsb":  # what the run saved, loaded onto the base model, scores what the run recorded
        model = AutoModelForSequenceClassification.from_pretrained(roberta_folder, num_labels=1)
        models = [load_trained(model, out / "best")]
        if method == "full":  # a from_pretrained folder as well
            models.append(AutoModelForSequenceClassification.from_pretrained(out / "best"))
        _, dev = load_glue(TASKS["stsb"], data)
        first, second = ([texts[k] for texts, _ in dev] for k in (0, 1))
        batch = load_tokenizer(roberta_folder)(first, second, padding=True, return_tensors="pt")
        for model in models:
            with torch.no_grad():
                scores = model.eval()(**batch).logits.squeeze(-1).numpy()
            pearson = glue_metrics("stsb", scores, [label for _, label in dev])["pearson"]
            assert pearson == pytest.approx(results["best"]["pearson"], abs=1e-5)


def test_glue_training_learns_a_toy_task(tmp_path, roberta_folder):
    data = fx.write_glue(tmp_path / "glue", "sst2", n_train=128, n_dev=32)
    out = tmp_path / "run"
    settings = ["--epochs", "24", "--batch-size", "16", "--neat", "rank=4"]
    assert glue.main(glue_args(roberta_folder, data, out, "sst2", *settings)) == 0
    history = read_results(out)["history"]
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert read_results(out)["best"]["accuracy"] >= 0.85  # chance is 0.5


@pytest.mark.parametrize("method", ["neat", "lora", "fourierft", "full"])
def test_glue_resume_after_a_kill_ends_with_the_same_results(tmp_path, roberta_folder, monkeypatch, method):
    data = fx.write_glue(tmp_path / "glue", "cola", n_train=40, n_dev=16)
    # 5 steps an epoch: checkpoints at 3, 5, 6, 9, 10, ...
    settings = ["--epochs", "3", "--checkpoint-steps", "3", *METHOD_ARGS[method]]
    assert glue.main(glue_args(roberta_folder, data, tmp_path / "whole", "cola", *settings)) == 0

    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt), killed_at_step(monkeypatch, 8):
        glue.main(glue_args(roberta_folder, data, killed, "cola", *settings))
    assert torch.load(killed / CHECKPOINT, weights_only=True)["progress"]["global_step"] == 6

    assert glue.main(glue_args(roberta_folder, data, killed, "cola", *settings)) == 2  # no silent restart
    assert glue.main(glue_args(roberta_folder, data, killed, "cola", *settings, "--resume", "--lr", "1e-3")) == 2
    assert glue.main(glue_args(roberta_folder, data, killed, "cola", *settings, "--resume")) == 0
    whole, resumed = read_results(tmp_path / "whole"), read_results(killed)
    assert resumed["history"] == whole["history"] and resumed["best"] == whole["best"]
    for folder in ("best", "last"):
        assert_same_saved(tmp_path / "whole" / folder, killed / folder)
    if method != "neat":  # another method is another run
        other = glue_args(roberta_folder, data, killed, "cola", "--epochs", "3", "--checkpoint-steps", "3", "--resume")
        assert glue.main(other) == 2


# what the NEAT-only runners stored as a checkpoint's run config: the NeatConfig fields set under "neat", no method
OLD_RUN_CONFIG = {
    "batch_size": 8,
    "dtype": "fp32",
    "epochs": 2,
    "gradient_checkpointing": False,
    "head_lr": None,
    "lr": 0.01,
    "max_grad_norm": 0.0,
    "max_length": 512,
    "neat": {"rank": 2, "scale": 1.0, "targets": ["q", "v"]},
    "seed": 0,
    "task": "cola",
    "tokenizer": None,
    "warmup_ratio": 0.06,
    "weight_decay": 0.0,
}


def test_glue_resumes_a_checkpoint_of_the_neat_only_runner(tmp_path, roberta_folder, monkeypatch, capsys):
    data = fx.write_glue(tmp_path / "glue", "cola", n_train=24, n_dev=8)
    out = tmp_path / "run"
    argv = glue_args(roberta_folder, data, out, "cola", "--epochs", "2", "--checkpoint-steps", "2")
    argv += ["--neat-targets", "q,v"]
    with pytest.raises(KeyboardInterrupt), killed_at_step(monkeypatch, 3):
        glue.main(argv)
    # the checkpoint as the NEAT-only runners wrote it: their run config, their optimizer group name
    state = torch.load(out / CHECKPOINT, weights_only=True)
    old = {**OLD_RUN_CONFIG, "data_dir": str(data), "model": str(roberta_folder)}
    assert state["run_config"] == old  # a NEAT run's settings are recorded as they were
    assert [g["name"] for g in state["optimizer"]["param_groups"]] == ["adapter", "head"]
    state["optimizer"]["param_groups"][0]["name"] = "neat"
    torch.save(state, out / CHECKPOINT)
    assert glue.main([*argv, "--resume", "--method", "lora"]) == 2
    assert "method: checkpoint None, now 'lora'" in capsys.readouterr().err
    assert glue.main([*argv, "--resume"]) == 0
    assert [row["epoch"] for row in read_results(out)["history"]] == [1, 2]


def test_glue_stops_on_a_nan_loss_and_keeps_the_last_good_checkpoint(tmp_path, roberta_folder, monkeypatch):
    data = fx.write_glue(tmp_path / "glue", "cola", n_train=40, n_dev=16)
    nan_losses_from_call(monkeypatch, 5)
    out = tmp_path / "run"
    assert glue.main(glue_args(roberta_folder, data, out, "cola", "--epochs", "2", "--checkpoint-steps", "2")) == 3
    state = torch.load(out / CHECKPOINT, weights_only=True)
    assert state["progress"]["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())


def test_instruct_runner_trains_evaluates_and_reloads(tmp_path):
    train, test, gsm = fx.colour_records(96, seed=0), fx.colour_records(16, seed=1), fx.number_records(4, seed=2)
    model = fx.save_llama_folder(tmp_path / "model", train + test + gsm)
    fx.write_json(tmp_path / "train.json", train)
    fx.write_json(tmp_path / "eval" / "social_i_qa" / "test.json", test)
    fx.write_json(tmp_path / "eval" / "gsm8k" / "test.json", gsm)
    out = tmp_path / "run"
    common = ["--model", str(model), "--output", str(out), "--eval-dir", str(tmp_path / "eval")]
    common += ["--eval-sets", "social_i_qa", "gsm8k", "--max-new-tokens", "6", "--num-beams", "1"]
    training = ["--data", str(tmp_path / "train.json"), "--lr", "2e-2", "--batch-size", "8", "--micro-batch-size", "4"]
    training += ["--epochs", "8", "--warmup-steps", "2", "--cutoff-len", "64", "--val-size", "8"]
    training += ["--neat", "targets=[q, k, v, up, down]", "--neat", "rank=4"]
    assert instruct.main(common + training) == 0
    results = read_results(out)
    losses = [row["val_loss"] for row in results["history"]]
    assert losses[-1] < 0.5 * losses[0] and results["train_examples"] == 88
    rows = json.loads((out / "eval" / "social_i_qa.json").read_text())
    assert len(rows) == 16 and all(row["prediction"] in ("answer1", "answer2") for row in rows)  # the format
    assert results["eval"]["social_i_qa"]["accuracy"] >= 0.9  # and the colour -> answer rule (chance: 0.5)
    assert results["eval"]["gsm8k"]["total"] == 4

    again = tmp_path / "again"
    reload = ["--model", str(model), "--output", str(again), "--eval-dir", str(tmp_path / "eval")]
    reload += ["--eval-sets", "social_i_qa", "--max-new-tokens", "6", "--num-beams", "1"]
    assert instruct.main([*reload, "--eval-only", "--adapter", str(out / "last")]) == 0
    assert json.loads((again / "eval" / "social_i_qa.json").read_text()) == rows
    assert instruct.main([*reload, "--eval-only"]) == 2  # needs --adapter
    assert instruct.main([*reload, "--eval-sets", "mmlu", "--eval-only", "--adapter", str(out / "last")]) == 2


INSTRUCT_METHOD_ARGS = {
    "neat": [],
    "lora": ["--method", "lora", "--lora-rank", "2", "--lora-dropout", "0.1"],  # dropout: the RNG state resumes
    "fourierft": ["--method", "fourierft", "--fourier-n", "32", "--fourier-alpha", "64"],
    "full": ["--method", "full"],
}


@pytest.mark.parametrize("method", list(INSTRUCT_METHOD_ARGS))
def test_instruct_resume_after_a_kill_mid_epoch_ends_with_the_same_results(tmp_path, monkeypatch, method):
    records = fx.colour_records(20, seed=3)
    model = fx.save_llama_folder(tmp_path / "model", records)
    data = fx.write_json(tmp_path / "train.json", records)
    fx.write_json(tmp_path / "eval" / "social_i_qa" / "test.json", records[:3])
    evaluation = ["--eval-dir", str(tmp_path / "eval"), "--eval-sets", "social_i_qa", "--max-new-tokens", "3"]
    evaluation += ["--num-beams", "1"]

    def argv(out: Path, *extra: str) -> list[str]:
        # 16 training records in batches of 4 (micro-batches of 2): 4 steps an epoch, checkpoints at 3, 4, 6, 8
        common = ["--model", str(model), "--output", str(out), "--data", str(data), "--lr", "1e-2", "--epochs", "2"]
        common += ["--batch-size", "4", "--micro-batch-size", "2", "--val-size", "4", "--warmup-steps", "1"]
        common += ["--cutoff-len", "48", "--neat", "rank=2", "--checkpoint-steps", "3", *evaluation]
        return common + [*INSTRUCT_METHOD_ARGS[method], *extra]

    assert instruct.main(argv(tmp_path / "whole")) == 0
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt), killed_at_step(monkeypatch, 7):
        instruct.main(argv(killed))
    progress = torch.load(killed / CHECKPOINT, weights_only=True)["progress"]
    assert (progress["global_step"], progress["epoch"], progress["step_in_epoch"]) == (6, 1, 2)  # mid epoch 2
    assert instruct.main(argv(killed, "--resume")) == 0
    whole, resumed = read_results(tmp_path / "whole"), read_results(killed)
    assert resumed["history"] == whole["history"] and resumed["best"] == whole["best"]
    assert resumed["eval"] == whole["eval"]
    assert (killed / "summary.csv").read_text() == (tmp_path / "whole" / "summary.csv").read_text()
    for folder in ("best", "last"):
        assert_same_saved(tmp_path / "whole" / folder, killed / folder)
    # the saved last/ (an adapter, or the full model's weights) evaluates to the same answers on the base model
    again = ["--model", str(model), "--output", str(tmp_path / "again"), *evaluation]
    assert instruct.main([*again, "--eval-only", "--adapter", str(killed / "last")]) == 0
    rows = [json.loads((out / "eval" / "social_i_qa.json").read_text()) for out in (killed, tmp_path / "again")]
    assert len(rows[0]) == 3 and rows[1] == rows[0]


def test_instruct_stops_on_a_nan_loss_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    records = fx.colour_records(20, seed=3)
    model = fx.save_llama_folder(tmp_path / "model", records)
    data = fx.write_json(tmp_path / "train.json", records)
    out = tmp_path / "run"
    # train.py's spellings: 16 records in batches of 4 (micro-batches of 2), a checkpoint every step
    argv = ["--model", str(model), "--output", str(tmp_path), "--experiment", "run", "--data", str(data)]
    argv += ["--lr-adapter", "1e-2", "--epochs", "2", "--batch-size", "4", "--micro-batch-size", "2"]
    argv += ["--val-size", "4", "--warmup-steps", "1", "--cutoff-len", "48", "--neat-rank", "2"]
    argv += ["--checkpoint-interval", "1"]
    nan_losses_from_call(monkeypatch, 5)  # micro-batch 5 = the first of step 3
    assert instruct.main(argv) == 3
    assert "non-finite" in capsys.readouterr().err
    state = torch.load(out / CHECKPOINT, weights_only=True)
    assert state["progress"]["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())


@pytest.mark.parametrize("config", sorted((CONFIGS / "glue").glob("*.yaml")), ids=lambda p: p.stem)
def test_glue_configs_hold_the_paper_settings(config):
    args = parse_args(glue.build_parser(), ["--config", str(config)], required=("task", "lr", "batch_size", "epochs"))
    neat = args.method_config
    assert isinstance(neat, NeatConfig) and args.method == "neat"
    small = config.stem.endswith("neat_s")
    assert (neat.rank, neat.layers, neat.targets) == ((1, tuple(range(4, 12))) if small else (8, None)) + (("q", "v"),)
    assert (args.max_length, args.warmup_ratio, args.seed, args.model) == (512, 0.06, 0, "roberta-base")
    assert config.stem == f"{args.task}_neat_{'s' if small else 'l'}"
    if config.stem == "cola_neat_s":  # Table 9
        assert (args.lr, args.head_lr, neat.scale, args.batch_size) == (5e-3, 1e-3, 0.1, 64)
    if config.stem == "qqp_neat_l":  # Table 8
        assert (args.lr, args.head_lr, neat.scale, args.batch_size) == (5e-3, 5e-3, 0.01, 64)


@pytest.mark.parametrize(("name", "rank", "epochs", "cutoff"), [("commonsense", 32, 1, 256), ("math", 64, 3, 2048)])
def test_instruct_configs_hold_the_paper_settings(name, rank, epochs, cutoff):
    args = parse_args(instruct.build_parser(), ["--config", str(CONFIGS / "instruct" / f"{name}.yaml")], required=())
    neat = args.method_config
    assert isinstance(neat, NeatConfig) and args.method == "neat"
    assert (neat.rank, neat.scale, neat.targets) == (rank, 1.0, ("q", "k", "v", "up", "down"))
    assert (args.lr, args.batch_size, args.warmup_steps, args.epochs, args.cutoff_len) == (
        3e-4,
        16,
        100,
        epochs,
        cutoff,
    )


def test_unknown_config_keys_fail_with_the_closest_names(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("task: cola\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit):
        parse_args(glue.build_parser(), ["--config", str(config)], required=())
    assert "unknown key 'learning_rate'; did you mean lr_adapter?" in capsys.readouterr().err
    config.write_text("task: cola\ndtype: fp8\n")
    with pytest.raises(SystemExit):  # a bad value in a file fails even where the command line overrides it
        parse_args(glue.build_parser(), ["--config", str(config), "--dtype", "bf16"], required=())
    assert "dtype='fp8' is not allowed: one of fp32, bf16" in capsys.readouterr().err
    config.write_text("task: cola\nepochs: 0\n")
    with pytest.raises(SystemExit):
        parse_args(glue.build_parser(), ["--config", str(config)], required=())
    assert "--epochs=0 is not allowed: an integer >= 1" in capsys.readouterr().err


def test_a_shipped_neat_config_trains_lora_on_its_targets_and_layers():
    config = CONFIGS / "glue" / "cola_neat_s.yaml"
    args = parse_args(glue.build_parser(), ["--config", str(config), "--method", "lora", "--lora-rank", "1"], ())
    # the shared fields (targets, layers) apply; NEAT's own (rank, scale) are NEAT's only
    assert args.method_config == LoraConfig(targets=("q", "v"), layers=tuple(range(4, 12)), rank=1)
    budget = ["--config", str(config), "--method", "fourierft", "--fourier-alpha", "30", "--param-budget", "9"]
    args = parse_args(glue.build_parser(), budget, ())
    assert args.method_config is None and args.param_budget == 9  # solved on the model once it is loaded
    assert method_fields(args) == {"targets": ["q", "v"], "layers": list(range(4, 12)), "alpha": 30.0}


def _glue_bad(tmp: Path) -> list[str]:
    return ["--task", "cola", "--model", str(tmp / "no-model"), "--data-dir", str(tmp / "no-data")]


def _instruct_bad(tmp: Path) -> list[str]:
    return ["--model", str(tmp / "no-model"), "--data", str(tmp / "no-data.json")]


BAD_METHOD_OPTIONS = {  # id: (runner, options, what the one error line says)
    "glue-unknown": ("glue", ["--method", "peft"], "invalid choice: 'peft'"),
    "instruct-linear": ("instruct", ["--method", "linear"], "invalid choice: 'linear'"),  # no task head
    "glue-lora-rank": ("glue", ["--method", "lora", "--lora-rank", "0"], "lora_rank=0 is not allowed: an integer >= 1"),
    "glue-lora-dropout": ("glue", ["--method", "lora", "--lora-dropout", "1.5"], "lora_dropout=1.5 is not allowed"),
    "instruct-lora-alpha": ("instruct", ["--method", "lora", "--lora-alpha", "-2"], "lora_alpha=-2.0 is not allowed"),
    "instruct-fourier-n": ("instruct", ["--method", "fourierft", "--fourier-n", "0"], "fourier_n=0 is not allowed"),
    "glue-fourier-alpha": ("glue", ["--method", "fourierft", "--fourier-alpha", "inf"], "fourier_alpha=inf is not"),
    "glue-linear-budget": ("glue", ["--method", "linear", "--param-budget", "9"], "not allowed with method='linear'"),
    "instruct-full-budget": ("instruct", ["--method", "full", "--param-budget", "9"], "not allowed with method='full'"),
    "glue-zero-budget": ("glue", ["--method", "lora", "--param-budget", "0"], "--param-budget=0 is not allowed"),
    "glue-neat-rank": ("glue", ["--neat", "rank=0"], "neat_rank=0 is not allowed: an integer >= 1"),
    "instruct-yaml": ("instruct", ["--config", "{yaml}"], "lora_rank=0 is not allowed"),
}


@pytest.mark.parametrize(("runner", "argv", "expected"), BAD_METHOD_OPTIONS.values(), ids=BAD_METHOD_OPTIONS)
def test_bad_method_options_exit_2_in_one_line_before_any_loading(tmp_path, capsys, runner, argv, expected):
    (tmp_path / "bad.yaml").write_text("method: lora\nlora_rank: 0\n")
    argv = [a.replace("{yaml}", str(tmp_path / "bad.yaml")) for a in argv]
    main, common = (glue.main, _glue_bad(tmp_path)) if runner == "glue" else (instruct.main, _instruct_bad(tmp_path))
    with pytest.raises(SystemExit) as exit_info:  # the parser's exit: nothing was read or loaded
        main([*common, "--output", str(tmp_path / "run"), "--lr", "1e-3", "--batch-size", "2", "--epochs", "1", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
