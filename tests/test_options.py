"""One option grammar for train.py, the GLUE runner and the instruction runner (`neat_vision.engine.options`).

The same names mean the same settings in all three, on the command line and in YAML (with ``base:`` chains);
unknown keys get suggestions; two spellings of one option fail naming both; nothing is loaded to find out.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from neat_vision import NeatConfig  # noqa: E402
from neat_vision.engine import parse_args as train_parse  # noqa: E402
from neat_vision.methods import FourierConfig, LoraConfig  # noqa: E402
from neat_vision.nlp import glue, instruct  # noqa: E402
from neat_vision.nlp.cli import parse_args as nlp_parse  # noqa: E402
from neat_vision.nlp.cli import run_config  # noqa: E402

RUNNERS = ("train", "glue", "instruct")


def _parse(runner: str, argv: list[str]):
    if runner == "train":
        return train_parse(["--model", "vit_tiny_patch16_224", "--no-pretrained", *argv])
    parser = glue.build_parser() if runner == "glue" else instruct.build_parser()
    return nlp_parse(parser, ["--model", "tiny", *(["--task", "cola"] if runner == "glue" else []), *argv], ())


def _settings(runner: str, args) -> dict:
    """What the shared names set, read back from each runner's namespace."""
    if runner == "train":
        return dict(
            neat=args.method_config,
            lr=args.lr_neat,
            clip=args.clip_grad,
            every=args.checkpoint_interval,
            amp=args.amp,
            resume=args.resume,
            folder=Path(args.output) / args.experiment if args.experiment else None,
            seed=args.seed,
            epochs=args.epochs,
        )
    return dict(
        neat=args.method_config,
        lr=args.lr,
        clip=args.max_grad_norm,
        every=args.checkpoint_steps,
        amp=args.dtype,
        resume=args.resume,
        folder=Path(args.output) if args.output else None,
        seed=args.seed,
        epochs=args.epochs,
    )


SHARED_FLAGS = [
    *("--neat-targets", "q,v", "--neat-rank", "4", "--neat-depth", "4", "--neat-act", "sin", "--neat-scale", "0.5"),
    *("--neat-axis", "in", "--neat-layers", "0-1", "--lr-adapter", "1e-3", "--clip-grad", "1.0"),
    *("--checkpoint-interval", "7", "--amp", "bf16", "--seed", "3", "--epochs", "2"),
    *("--resume", "auto", "--output", "root", "--experiment", "exp"),
]
SHARED_YAML = """
neat: {targets: [q, v], rank: 4, depth: 4}
neat_act: sin
lr_adapter: 1e-3
clip_grad: 1.0
checkpoint_interval: 7
amp: bf16
seed: 3
"""
EXPECTED = dict(
    neat=NeatConfig(targets=("q", "v"), rank=4, depth=4, act="sin", scale=0.5, axis="in", layers=(0, 1)),
    lr=1e-3,
    clip=1.0,
    every=7,
    amp="bf16",
    resume="auto",
    folder=Path("root") / "exp",
    seed=3,
    epochs=2,
)


@pytest.mark.parametrize("runner", RUNNERS)
def test_every_runner_reads_the_shared_names_on_the_command_line(runner):
    assert _settings(runner, _parse(runner, SHARED_FLAGS)) == EXPECTED


@pytest.mark.parametrize("runner", RUNNERS)
def test_every_runner_reads_the_shared_names_from_a_yaml_chain(runner, tmp_path):
    (tmp_path / "base.yaml").write_text(SHARED_YAML + "epochs: 9\nneat_scale: 0.25\n")
    leaf = tmp_path / "sub" / "leaf.yaml"
    leaf.parent.mkdir()
    # the leaf overrides the base key by key, and the neat fields one by one
    leaf.write_text("base: ../base.yaml\nepochs: 2\nneat: {scale: 0.5, axis: in, layers: 0-1}\n")
    args = _parse(runner, ["--config", str(leaf), "--resume", "--output", "root", "--experiment", "exp"])
    assert _settings(runner, args) == EXPECTED


@pytest.mark.parametrize("runner", RUNNERS)
def test_neat_field_value_is_the_same_as_its_own_flag(runner):
    by_field = _parse(runner, ["--neat", "rank=5", "--neat", "act=tanh", "--neat", "layers=[2, 3]"])
    by_flag = _parse(runner, ["--neat-rank", "5", "--neat-act", "tanh", "--neat-layers", "2", "3"])
    assert _settings(runner, by_field)["neat"] == _settings(runner, by_flag)["neat"]
    assert _settings(runner, by_flag)["neat"].rank == 5


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--lr", "1e-3", "--lr-adapter", "2e-3"], "--lr and --lr-adapter set the same option"),
        (["--neat", "rank=4", "--neat-rank", "8"], "--neat rank=... and --neat-rank set the same option"),
        (["--neat", "rnak=4"], "'rnak' is not a NeatConfig field; did you mean rank?"),
        (["--neat", "rank"], "--neat 'rank' is not allowed: FIELD=VALUE"),
        (["--neat-act", "swish"], "invalid choice: 'swish'"),
        (["--neat", "act=swish"], "neat_act='swish' is not allowed: one of relu, sin"),
        (["--neat", "depth=3"], "depth=3 is not allowed: an even integer >= 2"),
    ],
)
def test_two_spellings_and_bad_neat_fields_fail_naming_them(runner, argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(runner, argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lr_adaptr: 1e-3\n", "unknown key 'lr_adaptr'; did you mean lr_adapter"),
        ("neat: {rnak: 4}\n", "unknown key 'neat_rnak'; did you mean neat_rank"),
        ("lr: 1e-3\nlr_adapter: 2e-3\n", "lr and lr_adapter set the same option: keep one"),
        ("neat: {rank: 4}\nneat_rank: 8\n", "neat_rank and neat_rank set the same option"),
        ("neat: 4\n", "neat=4 is not allowed: a mapping of NeatConfig fields"),
        ("seed: 1.5\n", "seed=1.5 is not allowed: an integer"),
        ("amp: fp8\n", "amp='fp8' is not allowed: "),
    ],
)
def test_bad_yaml_fails_in_every_runner_naming_the_file_key_and_value(runner, text, expected, tmp_path, capsys):
    (tmp_path / "base.yaml").write_text(text)
    leaf = tmp_path / "leaf.yaml"
    leaf.write_text("base: base.yaml\nepochs: 1\n")
    with pytest.raises(SystemExit) as exit_info:
        _parse(runner, ["--config", str(leaf)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and str(tmp_path / "base.yaml") in err  # the file that holds the mistake


def test_nlp_runners_read_yaml_numbers_as_train_py_does(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("lr: 5e-3\nhead_lr: 1e-3\n")  # PyYAML reads 5e-3 as a string
    args = _parse("glue", ["--config", str(config)])
    assert (args.lr, args.head_lr) == (5e-3, 1e-3)
    assert _parse("glue", ["--lr-head", "2e-3"]).head_lr == 2e-3


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--amp", "fp16"], "fp16 is train.py's only (it needs a GradScaler): bf16 or none"),
        (["--resume", "last.pth"], "these runners continue the run in --output (--resume or --resume auto)"),
        (["--experiment", "x"], "--experiment needs --output"),
    ],
)
def test_nlp_runners_refuse_what_only_train_py_does(argv, expected, capsys):
    with pytest.raises(SystemExit):
        _parse("instruct", argv)
    assert expected in capsys.readouterr().err


def test_spellings_do_not_change_what_a_resumed_run_compares():
    old = _parse("glue", ["--neat", "rank=4", "--lr", "1e-3", "--dtype", "fp32", "--resume", "--output", "r/e"])
    new = _parse(
        "glue", ["--neat-rank", "4", "--lr-adapter", "1e-3", "--amp", "none", "--output", "r", "--experiment", "e"]
    )
    assert run_config(old) == run_config(new)
    assert {"neat_rank", "neat_overrides", "experiment"}.isdisjoint(run_config(new))  # the fields sit under "neat"


METHOD_FLAGS = {
    "lora": ["--method", "lora", "--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.1"],
    "fourierft": ["--method", "fourierft", "--fourier-n", "100", "--fourier-alpha", "30", "--fourier-seed", "5"],
}
METHOD_YAML = {
    "lora": "method: lora\nlora_rank: 4\nlora_alpha: 8\nlora_dropout: 0.1\n",
    "fourierft": "method: fourierft\nfourier_n: 100\nfourier_alpha: 30\nfourier_seed: 5\n",
}
METHOD_EXPECTED = {
    "lora": LoraConfig(targets=("q", "v"), layers=(0, 1), rank=4, alpha=8.0, dropout=0.1),
    "fourierft": FourierConfig(targets=("q", "v"), layers=(0, 1), n=100, alpha=30.0, seed=5),
}


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("method", ["lora", "fourierft"])
def test_every_runner_reads_the_lora_and_fourier_names(runner, method, tmp_path):
    shared = ["--neat-targets", "q,v", "--neat-layers", "0-1"]
    by_flags = _parse(runner, [*METHOD_FLAGS[method], *shared])
    (tmp_path / "m.yaml").write_text(METHOD_YAML[method] + "neat: {targets: [q, v], layers: 0-1}\n")
    by_yaml = _parse(runner, ["--config", str(tmp_path / "m.yaml")])
    assert by_flags.method == by_yaml.method == method
    assert _settings(runner, by_flags)["neat"] == _settings(runner, by_yaml)["neat"] == METHOD_EXPECTED[method]
    budget = _parse(runner, ["--method", method, "--param-budget", "5000"])
    assert budget.param_budget == 5000 and budget.method_config is None  # solved on the model, when it is built


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--method", "lora", "--lora-dropout", "1.5"], "lora_dropout=1.5 is not allowed: a probability in [0, 1)"),
        (["--method", "lora", "--lora-rank", "0"], "lora_rank=0 is not allowed: an integer >= 1"),
        (["--method", "fourierft", "--fourier-n", "0"], "fourier_n=0 is not allowed: an integer >= 1"),
        (["--method", "full", "--param-budget", "9"], "param_budget=9 is not allowed with method='full'"),
        (["--method", "lora", "--param-budget", "0"], "budget=0 is not allowed: "),
    ],
)
def test_bad_lora_and_fourier_values_fail_alike_in_every_runner(runner, argv, expected, capsys):
    if runner == "train":  # train.py names the flags as typed (--lora-dropout=1.5, --method='full')
        flags = ("lora_dropout", "lora_rank", "fourier_n", "param_budget", "method")
        expected = re.sub(rf"\b({'|'.join(flags)})=", lambda m: "--" + m[1].replace("_", "-") + "=", expected)
    with pytest.raises(SystemExit) as exit_info:
        _parse(runner, argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_a_neat_runs_settings_are_recorded_as_before_and_other_methods_add_theirs():
    neat = run_config(_parse("glue", ["--neat-rank", "4", "--neat-targets", "q,v"]))
    assert neat["neat"] == {"rank": 4, "targets": ["q", "v"]}
    assert {"method", "param_budget", "method_config", "method_fields", "lora", "lora_rank"}.isdisjoint(neat)
    lora = run_config(_parse("glue", ["--method", "lora", "--lora-rank", "4", "--neat-rank", "9"]))
    assert (lora["method"], lora["lora"]) == ("lora", {"rank": 4}) and "neat" not in lora  # NEAT's own: not LoRA's
    full = run_config(_parse("instruct", ["--method", "full"]))
    assert full["method"] == "full" and not {"neat", "lora", "fourierft"} & set(full)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lr: -1\n", "lr=-1.0 is not allowed: a finite number > 0"),  # not lr_neat: the file says lr
        ("lr_adapter: 0\n", "lr_adapter=0.0 is not allowed"),
        ("neat: {rank: 0}\n", "neat.rank=0 is not allowed: an integer >= 1"),  # the method config's own check
        ("neat: {act: swish}\n", "neat.act='swish' is not allowed: one of"),
        ("neat_depth: 3\n", "neat_depth=3 is not allowed: an even integer >= 2"),
        ("clip_grad: 0\n", "clip_grad=0.0 is not allowed"),  # read as max_grad_norm's destination
        ("max_grad_norm: 0\n", "max_grad_norm=0.0 is not allowed"),
    ],
)
def test_a_config_files_value_errors_name_the_key_as_the_file_spells_it(text, expected, tmp_path, capsys):
    (tmp_path / "base.yaml").write_text(text)
    (tmp_path / "leaf.yaml").write_text("base: base.yaml\nepochs: 1\n")
    with pytest.raises(SystemExit) as exit_info:
        _parse("train", ["--config", str(tmp_path / "leaf.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'base.yaml'}: {expected}")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--lr", "-1"], "--lr=-1.0 is not allowed: a finite number > 0"),
        (["--lr-neat=-1"], "--lr-neat=-1.0 is not allowed"),
        (["--max-grad-norm", "0"], "--max-grad-norm=0.0 is not allowed"),
        (["--neat-rank", "0"], "--neat-rank=0 is not allowed: an integer >= 1"),
        (["--neat", "rank=0"], "--neat rank=0 is not allowed: an integer >= 1"),
    ],
)
def test_a_command_lines_value_errors_name_the_flag_as_typed(argv, expected, tmp_path, capsys):
    (tmp_path / "ok.yaml").write_text("lr: 0.1\nneat: {rank: 2}\n")  # overridden by the command line
    for config in ([], ["--config", str(tmp_path / "ok.yaml")]):
        with pytest.raises(SystemExit) as exit_info:
            _parse("train", [*config, *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {expected}"), err
