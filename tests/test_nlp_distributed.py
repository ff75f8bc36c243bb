"""The NLP runners under torchrun (2 CPU processes, gloo) train like one process with the same global batch, with
every update method."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from transformers import AutoModelForCausalLM, RobertaModel  # noqa: E402

from neat_vision.engine.distributed import DistEnv, setup_distributed  # noqa: E402
from neat_vision.nlp import cli, glue, instruct, load_adapter  # noqa: E402
from neat_vision.nlp.loop import CHECKPOINT  # noqa: E402
from tests import nlp_fixtures as fx  # noqa: E402
from tests.nlp_fixtures import single_thread  # noqa: E402, F401 (an autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
# measured (1 vs 2 processes, float32 sums taken in another order): GLUE metrics 2.4e-8 and adapter tensors
# 9.3e-8 apart; instruction runner losses 3.2e-7 and tensors 2.2e-8 (DDP), 4.8e-7 and 1.5e-8 (FSDP2) apart;
# an example dropped from one rank's shard moves the GLUE train loss by 2.4e-2
ATOL = 1e-5


def torchrun(module: str, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m module argv`` (a free port; one thread per process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, "-m", module, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def run_all(runs: list[tuple[str, list[str]]]) -> int:
    """Each ``(runner, argv)`` in turn in this torchrun job; the first failure's status.

    The runs share one process group: a group made again in the same job can meet the keys the last one left in
    torchrun's store, and hang.
    """
    env = setup_distributed("cpu")
    cli.setup_distributed = lambda device: env
    DistEnv.close = lambda self: None
    mains = {"glue": glue.main, "instruct": instruct.main}
    try:
        for runner, argv in runs:
            code = mains[runner](argv)
            if code:
                return code
    finally:
        torch.distributed.destroy_process_group()
    return 0


def killed_glue_main(step: int, argv: list[str]) -> int:
    """`glue.main`, killed (KeyboardInterrupt on rank 0) when it logs the loss of optimizer step ``step``."""
    add_scalar = SummaryWriter.add_scalar

    def die(self, tag, value, global_step=None, *args, **kwargs):
        if tag == "train/loss" and global_step == step:
            raise KeyboardInterrupt(f"killed at step {step}")
        return add_scalar(self, tag, value, global_step, *args, **kwargs)

    SummaryWriter.add_scalar = die
    return glue.main(argv)


def assert_same_run(one: Path, two: Path, metrics: list[str]) -> None:
    history = [json.loads((out / "results.json").read_text())["history"] for out in (one, two)]
    assert len(history[0]) == len(history[1])
    for row1, row2 in zip(*history):
        for key in ["train_loss", *metrics]:
            assert row2[key] == pytest.approx(row1[key], abs=ATOL), key
    for folder in ("last", "best"):
        if (one / folder).is_dir():
            tensors = [load_file(out / folder / "adapter.safetensors") for out in (one, two)]
            assert set(tensors[0]) == set(tensors[1])
            for name, tensor in tensors[0].items():
                torch.testing.assert_close(tensors[1][name], tensor, atol=ATOL, rtol=0, msg=name)


@pytest.fixture(scope="module")
def roberta_folder(tmp_path_factory) -> Path:
    """Like `nlp_fixtures.save_roberta_folder`, without dropout (whose masks are per rank)."""
    folder = tmp_path_factory.mktemp("roberta") / "model"
    tokenizer = fx.make_tokenizer(fx.glue_vocabulary())
    torch.manual_seed(0)
    config = fx.roberta_config(
        vocab_size=len(tokenizer), initializer_range=0.1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    RobertaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_glue_two_processes_train_like_one(tmp_path, roberta_folder):
    # 20 examples in global batches of 7: the ranks take 3 + 4, 3 + 4, 3 + 3 examples; 9 dev batches of 2
    data = fx.write_glue(tmp_path / "glue", "mrpc", n_train=20, n_dev=18)
    common = ["--task", "mrpc", "--model", str(roberta_folder), "--data-dir", str(data), "--lr", "1e-2"]
    common += ["--batch-size", "7", "--eval-batch-size", "2", "--epochs", "2", "--neat", "rank=2", "--device", "cpu"]
    common += ["--checkpoint-steps", "1"]  # 3 steps an epoch
    assert glue.main([*common, "--output", str(tmp_path / "one")]) == 0
    # the 2-process run is killed in step 5 (mid epoch 2), then resumed from its step-4 checkpoint
    two = [*common, "--output", str(tmp_path / "two")]
    killed = torchrun("tests.test_nlp_distributed", two, NEAT_TEST_KILL_STEP="5")
    assert killed.returncode != 0 and "killed at step 5" in killed.stderr, killed.stderr[-3000:]
    assert torch.load(tmp_path / "two" / CHECKPOINT, weights_only=True)["progress"]["global_step"] == 4
    done = torchrun("neat_vision.nlp.glue", [*two, "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("mrpc: best epoch") == 1  # rank 0 reports
    assert_same_run(tmp_path / "one", tmp_path / "two", ["accuracy", "f1"])
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["dev_examples"] == 18 and (tmp_path / "two" / "summary.csv").is_file()
    assert len(torch.load(tmp_path / "two" / CHECKPOINT, weights_only=True)["rng"]) == 2
    # a 2-process checkpoint resumes with 2 processes only (each rank's random state is restored)
    resumed = glue.main([*common, "--output", str(tmp_path / "two"), "--resume"])
    assert resumed == 2


@pytest.fixture(scope="module")
def instruct_setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("instruct")
    train, test = fx.colour_records(15, seed=1), fx.colour_records(5, seed=2)
    model = fx.save_llama_folder(root / "model", train + test)
    fx.write_json(root / "eval" / "social_i_qa" / "test.json", test)
    return {"model": model, "data": fx.write_json(root / "train.json", train), "eval": root / "eval"}


def test_instruct_two_processes_train_like_one(tmp_path, instruct_setup):
    # 12 training records in global batches of 5 (micro-batches of 2): shards 2 + 3, 2 + 3, 1 + 1
    setup = instruct_setup
    common = ["--model", str(setup["model"]), "--data", str(setup["data"]), "--lr", "5e-3", "--epochs", "2"]
    common += ["--batch-size", "5", "--micro-batch-size", "2", "--val-size", "3", "--warmup-steps", "0"]
    common += ["--neat", "rank=2", "--device", "cpu"]
    evaluation = ["--eval-dir", str(setup["eval"]), "--eval-sets", "social_i_qa", "--num-beams", "1"]
    evaluation += ["--max-new-tokens", "4", "--eval-batch-size", "2"]
    assert instruct.main([*common, *evaluation, "--output", str(tmp_path / "one")]) == 0
    # FSDP2 (each decoder layer and the root sharded over the 2 ranks; the filler micro-batch of the last step)
    done = torchrun("neat_vision.nlp.instruct", [*common, "--fsdp", "--output", str(tmp_path / "fsdp")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "fsdp", ["val_loss"])
    checkpoint = torch.load(tmp_path / "fsdp" / CHECKPOINT, weights_only=True)
    assert not any(isinstance(t, DTensor) for t in checkpoint["trainable"].values())  # gathered, the usual format
    load_adapter(AutoModelForCausalLM.from_pretrained(setup["model"]), tmp_path / "fsdp" / "last")  # base matches
    common += evaluation
    done = torchrun("neat_vision.nlp.instruct", [*common, "--output", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two", ["val_loss"])
    rows = [json.loads((out / "eval" / "social_i_qa.json").read_text()) for out in (tmp_path / "one", tmp_path / "two")]
    assert len(rows[1]) == 5 and [r["response"] for r in rows[1]] == [r["response"] for r in rows[0]]


def test_lora_and_fourierft_two_processes_train_like_one(tmp_path, roberta_folder, instruct_setup):
    # GLUE as in test_glue_two_processes_train_like_one; the instruction runner as in the test above, LoRA under FSDP2
    data = fx.write_glue(tmp_path / "glue", "mrpc", n_train=20, n_dev=18)
    glue_common = ["--task", "mrpc", "--model", str(roberta_folder), "--data-dir", str(data), "--lr", "1e-2"]
    glue_common += ["--batch-size", "7", "--eval-batch-size", "2", "--epochs", "2", "--device", "cpu"]
    setup = instruct_setup
    instruct_common = ["--model", str(setup["model"]), "--data", str(setup["data"]), "--lr", "5e-3", "--epochs", "2"]
    instruct_common += ["--batch-size", "5", "--micro-batch-size", "2", "--val-size", "3", "--warmup-steps", "0"]
    instruct_common += ["--device", "cpu"]
    lora = ["--method", "lora", "--lora-rank", "2", "--lora-alpha", "4"]
    fourier = ["--method", "fourierft", "--fourier-n", "40", "--fourier-alpha", "64"]
    runs = {  # name: (runner, options, options of the 2-process run only, metrics)
        "glue-lora": ("glue", [*glue_common, *lora], [], ["accuracy", "f1"]),
        "glue-fourierft": ("glue", [*glue_common, *fourier], [], ["accuracy", "f1"]),
        "instruct-lora": ("instruct", [*instruct_common, *lora, "--neat-targets", "q,v,up"], ["--fsdp"], ["val_loss"]),
        "instruct-fourierft": ("instruct", [*instruct_common, *fourier], [], ["val_loss"]),
    }
    mains = {"glue": glue.main, "instruct": instruct.main}
    for name, (runner, argv, _, _) in runs.items():
        assert mains[runner]([*argv, "--output", str(tmp_path / "one" / name)]) == 0
    job = [
        (runner, [*argv, *two, "--output", str(tmp_path / "two" / name)])
        for name, (runner, argv, two, _) in runs.items()
    ]
    done = torchrun("tests.test_nlp_distributed", [], NEAT_TEST_RUNS=json.dumps(job))  # one job: one start-up
    assert done.returncode == 0, done.stderr[-3000:]
    for name, (_, _, _, metrics) in runs.items():
        assert_same_run(tmp_path / "one" / name, tmp_path / "two" / name, metrics)
        assert len(torch.load(tmp_path / "two" / name / CHECKPOINT, weights_only=True)["rng"]) == 2  # 2 ranks ran


if __name__ == "__main__":  # a torchrun worker of the tests above
    if "NEAT_TEST_RUNS" in os.environ:
        sys.exit(run_all(json.loads(os.environ["NEAT_TEST_RUNS"])))
    sys.exit(killed_glue_main(int(os.environ["NEAT_TEST_KILL_STEP"]), sys.argv[1:]))
