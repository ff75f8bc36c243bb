"""Bad inputs and faults a new user meets, as a table: every one ends in one ``error:`` line naming the option
or file, a non-zero exit status, and no file that existed before is changed.

The runners are called in-process (``neat_vision.engine.main``, ``nlp.glue.main``, ``nlp.instruct.main``)
with ``argv``; the adapter API cases call ``load_adapter`` on damaged copies of a real adapter folder and
check that the model is left exactly as it was given. The non-finite stops have their own tests below the
table: the checkpoint the message calls good is read back, found finite, and resumes (to the same stop).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.utils import random_seed
from torch import nn

import neat_vision
from neat_vision import AdapterFileError, AdapterMismatchError, NeatConfig, apply_neat, save_adapter
from neat_vision.engine import main as train_main
from neat_vision.engine import parse_args
from neat_vision.engine.checkpoint import load_checkpoint
from neat_vision.engine.model import build_adapter, build_model
from neat_vision.errors import EXIT_DIVERGED, EXIT_USAGE
from tests import data_fixtures as dfx

pytest.importorskip("transformers")

from neat_vision.nlp import glue, instruct  # noqa: E402
from neat_vision.nlp.loop import CHECKPOINT  # noqa: E402
from tests import nlp_fixtures as nfx  # noqa: E402
from tests.nlp_fixtures import single_thread  # noqa: E402, F401 (an autouse fixture)

TINY_KWARGS = "{img_size: 16, patch_size: 4, depth: 2, embed_dim: 32, num_heads: 2}"
VISION = ["--dataset", "digits", "--model", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", TINY_KWARGS]
VISION += ["--epochs", "1", "--batch-size", "16", "--workers", "0", "--limit-train-batches", "2"]
VISION += ["--limit-eval-batches", "1", "--no-tb", "--log-interval", "1", "--checkpoint-interval", "0"]


# ------------------------------------------------------------------------------------------------ fixtures


@dataclass
class Shared:
    """Files every case may read (and none may change): data, models, a stopped run, adapters."""

    root: Path
    image_folder: Path
    corrupt_folder: Path
    csv: Path
    stopped_run: Path
    roberta: Path
    glue: Path
    llama: Path
    records: Path
    adapter: Path


def _tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=3,
        img_size=16,
        patch_size=4,
        depth=2,
        embed_dim=32,
        num_heads=2,
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    root = tmp_path_factory.mktemp("shared")
    dfx.write_image_folder(root / "folder")
    dfx.write_image_folder(root / "corrupt", corrupt=True)
    csv = dfx.write_csv(root / "csvdata").root
    assert (
        _invoke(
            "train", [*VISION, "--output", str(root / "runs"), "--experiment", "stopped"] + ["--stop-after-steps", "1"]
        )
        == 0
    )
    roberta = nfx.save_roberta_folder(root / "roberta")
    data = nfx.write_glue(root / "glue", "cola", n_train=24, n_dev=8)
    records = nfx.colour_records(16)
    llama = nfx.save_llama_folder(root / "llama", records)
    nfx.write_json(root / "records.json", records)
    model = apply_neat(_tiny_vit(), NeatConfig(targets=["q", "v"], rank=2))
    save_adapter(model, root / "adapter")
    return Shared(
        root,
        root / "folder",
        root / "corrupt",
        csv,
        root / "runs" / "stopped",
        roberta,
        data,
        llama,
        root / "records.json",
        root / "adapter",
    )


def _invoke(runner: str, argv: list[str]) -> int:
    mains = {"train": train_main, "glue": glue.main, "instruct": instruct.main}
    try:
        code = mains[runner](argv)
    except SystemExit as stop:
        code = stop.code
    return 0 if code is None else code


def _snapshot(*roots: Path) -> dict[str, tuple[str, int, int]]:
    """Every file under ``roots``: content hash, modification time, mode."""
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                stat = path.stat()
                out[str(path)] = (hashlib.sha1(path.read_bytes()).hexdigest(), stat.st_mtime_ns, stat.st_mode)
    return out


def _error_line(err: str) -> str:
    """The one ``error:`` line of ``err`` (which must end with it and hold no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert "Traceback" not in err, err
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


# ------------------------------------------------------------------------------------------ the CLI table


@dataclass(frozen=True)
class Case:
    """``argv(shared, tmp)`` may first write the case's own files under ``tmp``; ``expect``: parts of the line."""

    id: str
    runner: str
    argv: Callable[[Shared, Path], list[str]]
    expect: tuple[str, ...]
    starts_run: bool = False  # the run began before meeting the problem: its own new files may appear


def _vision(*extra: str) -> Callable[[Shared, Path], list[str]]:
    return lambda s, tmp: [*VISION, "--output", str(tmp / "runs"), "--experiment", "x", *extra]


def _with_file(name: str, content: bytes | str, build: Callable[[Path], list[str]]) -> Callable:
    def argv(s: Shared, tmp: Path) -> list[str]:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return build(path)

    return argv


def _truncated_checkpoint(s: Shared, tmp: Path) -> list[str]:
    data = (s.stopped_run / "checkpoints" / "last.pth").read_bytes()
    bad = tmp / "bad" / "last.pth"
    bad.parent.mkdir()
    bad.write_bytes(data[: len(data) // 2])
    return [*_vision("--resume", str(bad))(s, tmp)]


def _not_a_checkpoint(s: Shared, tmp: Path) -> list[str]:
    torch.save({"weights": torch.ones(2)}, tmp / "other.pth")
    return _vision("--resume", str(tmp / "other.pth"))(s, tmp)


def _csv_missing_image(s: Shared, tmp: Path) -> list[str]:
    shutil.copytree(s.csv.parent, tmp / "csvdata")
    (tmp / "csvdata" / "images" / "ant_2.jpg").unlink()
    return _vision("--dataset", "csv", "--data-dir", str(tmp / "csvdata" / "labels.csv"))(s, tmp)


def _corrupt_folder(*extra: str) -> Callable[[Shared, Path], list[str]]:
    """The folder with one undecodable image; batches of 1 and no limits, so every image is met."""
    every = ["--batch-size", "1", "--limit-train-batches", "1000", "--limit-eval-batches", "1000"]
    return lambda s, tmp: _vision("--dataset", "image_folder", "--data-dir", str(s.corrupt_folder), *every, *extra)(
        s, tmp
    )


def _glue(*extra: str) -> Callable[[Shared, Path], list[str]]:
    def argv(s: Shared, tmp: Path) -> list[str]:
        common = ["--task", "cola", "--model", str(s.roberta), "--data-dir", str(s.glue), "--output", str(tmp / "run")]
        return common + ["--lr", "1e-2", "--batch-size", "8", "--epochs", "1", "--neat", "rank=2", *extra]

    return argv


def _glue_with(prepare: Callable[[Shared, Path], list[str]]) -> Callable[[Shared, Path], list[str]]:
    return lambda s, tmp: _glue(*prepare(s, tmp))(s, tmp)


def _instruct(*extra: str, train: bool = True) -> Callable[[Shared, Path], list[str]]:
    def argv(s: Shared, tmp: Path) -> list[str]:
        common = ["--model", str(s.llama), "--output", str(tmp / "run")]
        training = ["--data", str(s.records), "--lr", "1e-2", "--batch-size", "8", "--epochs", "1"]
        return common + (training if train else []) + ["--cutoff-len", "48", "--neat", "rank=2", *extra]

    return argv


def _cut_adapter(s: Shared, tmp: Path) -> list[str]:
    shutil.copytree(s.adapter, tmp / "adapter")
    weights = tmp / "adapter" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return ["--eval-only", "--adapter", str(tmp / "adapter")]


def _glue_bad_label(s: Shared, tmp: Path) -> list[str]:
    shutil.copytree(s.glue, tmp / "glue")
    train = tmp / "glue" / "CoLA" / "train.tsv"
    train.write_text(train.read_text().replace("\t1\t", "\t7\t", 1))
    return ["--data-dir", str(tmp / "glue")]


def _glue_torn_checkpoint(s: Shared, tmp: Path) -> list[str]:
    (tmp / "run").mkdir()
    (tmp / "run" / CHECKPOINT).write_bytes(b"PK\x03\x04 torn")
    return ["--resume"]


CASES = [
    # --- train.py: options
    Case("unknown-option", "train", _vision("--lr-neta", "1"), ("unrecognized arguments: --lr-neta", "--help")),
    Case("negative-lr", "train", _vision("--lr-neat", "-1"), ("--lr-neat=-1.0", "a finite number > 0")),
    Case("zero-head-lr", "train", _vision("--lr-head", "0"), ("--lr-head=0.0", "> 0")),
    Case("nan-backbone-lr", "train", _vision("--method", "full", "--lr-backbone", "nan"), ("--lr-backbone=nan",)),
    Case("negative-weight-decay", "train", _vision("--weight-decay", "-0.1"), ("--weight-decay=-0.1", ">= 0")),
    Case("flip-probability", "train", _vision("--hflip", "1.5"), ("--hflip", "[0, 1]")),
    Case("zero-clip", "train", _vision("--clip-grad", "0"), ("--clip-grad=0.0",)),
    Case("zero-epochs", "train", _vision("--epochs", "0"), ("--epochs=0", "an integer >= 1")),
    Case("not-an-int", "train", _vision("--epochs", "two"), ("--epochs", "invalid int value: 'two'")),
    Case("zero-std", "train", _vision("--std", "0", "1", "1"), ("--std=[0.0, 1.0, 1.0]",)),
    Case("neat-rank", "train", _vision("--neat-rank", "0"), ("--neat-rank=0", "an integer >= 1")),
    Case("lora-dropout", "train", _vision("--method", "lora", "--lora-dropout", "1.5"), ("--lora-dropout=1.5",)),
    Case("zero-budget", "train", _vision("--param-budget", "0"), ("--param-budget=0",)),
    Case("model-name", "train", _vision("--model", "vit_tinny_patch16_224"), ("vit_tinny", "vit_tiny_patch16_224")),
    Case("device-name", "train", _vision("--device", "gpu0"), ("device='gpu0' is not allowed",)),
    Case("device-absent", "train", _vision("--device", "cuda:99"), ("device='cuda:99'",)),
    Case("bad-targets", "train", _vision("--neat-targets", "nosuchlayer"), ("nosuchlayer",)),
    Case("class-count", "train", _vision("--num-classes", "3"), ("num_classes=3", "10 classes")),
    Case("model-kwargs", "train", _vision("--model-kwargs", "{bogus_arg: 1}"), ("bogus_arg", "not accepted by")),
    Case(
        "model-kwargs-shape",
        "train",
        _vision("--model-kwargs", "{img_size: 16, patch_size: 4, depth: 2, embed_dim: 30, num_heads: 4}"),
        ("not accepted by", "divisible"),
    ),
    # --- train.py: configs
    Case("config-no-value", "train", lambda s, tmp: ["--config"], ("--config", "expected one argument")),
    Case("config-missing", "train", lambda s, tmp: ["--config", str(tmp / "nope.yaml")], ("nope.yaml", "not found")),
    Case(
        "config-yaml-syntax",
        "train",
        _with_file("c.yaml", "lr_neat: [1e-3,\n", lambda p: ["--config", str(p)]),
        ("c.yaml", "not valid YAML", "line"),
    ),
    Case(
        "config-range",
        "train",
        _with_file("c.yaml", "lr_neat: -1\n", lambda p: ["--config", str(p)]),
        ("c.yaml", "lr_neat=-1", "> 0"),
    ),
    Case(
        "config-unknown-key",
        "train",
        _with_file("c.yaml", "lr_neta: 1e-3\n", lambda p: ["--config", str(p)]),
        ("c.yaml", "lr_neta", "did you mean lr_neat"),
    ),
    Case("config-list", "train", _with_file("c.yaml", "- 1\n", lambda p: ["--config", str(p)]), ("c.yaml", "mapping")),
    Case("config-binary", "train", _with_file("c.yaml", b"\xff\xfe\x00", lambda p: ["--config", str(p)]), ("c.yaml",)),
    # --- train.py: data
    Case("unknown-dataset", "train", _vision("--dataset", "cifar11"), ("unknown dataset 'cifar11'",)),
    Case("no-dataset", "train", lambda s, tmp: [*VISION[2:], "--output", str(tmp)], ("dataset is not set",)),
    Case(
        "folder-missing",
        "train",
        lambda s, tmp: _vision("--dataset", "image_folder", "--data-dir", str(tmp / "nope"))(s, tmp),
        ("image_folder", "nope", "not found"),
    ),
    Case("csv-missing-image", "train", _csv_missing_image, ("ant_2.jpg", "do not exist", "--skip-corrupt")),
    Case(
        "csv-no-header",
        "train",
        _with_file("l.csv", "a.jpg,cat\n", lambda p: [*VISION, "--dataset", "csv", "--data-dir", str(p)]),
        ("l.csv", "'path' and 'label'"),
    ),
    Case("corrupt-image", "train", _corrupt_folder(), ("broken.png", "--skip-corrupt"), starts_run=True),
    Case(
        "corrupt-image-in-worker",
        "train",
        _corrupt_folder("--workers", "1"),
        ("broken.png", "--skip-corrupt"),
        starts_run=True,
    ),
    # --- train.py: outputs, checkpoints, weights
    Case(
        "output-is-a-file",
        "train",
        _with_file("file", "x", lambda p: [*VISION, "--output", str(p)]),
        ("output=", "is a file, not a folder"),
    ),
    Case(
        "run-folder-taken",
        "train",
        lambda s, tmp: [*VISION, "--output", str(s.stopped_run.parent), "--experiment", "stopped"],
        ("already holds a run", "--resume auto"),
    ),
    Case(
        "resume-other-options",
        "train",
        lambda s, tmp: (
            [*VISION, "--output", str(s.stopped_run.parent), "--experiment", "stopped"]
            + ["--resume", "auto", "--lr-neat", "0.1"]
        ),
        ("cannot resume", "lr_neat"),
    ),
    Case(
        "resume-auto-unnamed",
        "train",
        lambda s, tmp: [*VISION, "--output", str(tmp), "--resume", "auto"],
        ("--experiment NAME",),
    ),
    Case("resume-missing", "train", _vision("--resume", "nope.pth"), ("nope.pth", "no such checkpoint")),
    Case("resume-truncated", "train", _truncated_checkpoint, ("last.pth", "cannot read the checkpoint")),
    Case("resume-not-a-checkpoint", "train", _not_a_checkpoint, ("other.pth", "not a train.py checkpoint")),
    Case(
        "weights-missing", "train", _vision("--pretrained", "--pretrained-file", "no.safetensors"), ("no.safetensors",)
    ),
    Case(
        "weights-garbage",
        "train",
        _with_file("w.safetensors", b"\x00" * 64, lambda p: [*VISION, "--pretrained", "--pretrained-file", str(p)]),
        ("w.safetensors", "cannot be loaded into"),
    ),
    # --- GLUE runner
    Case("glue-negative-lr", "glue", _glue("--lr", "-1"), ("--lr=-1.0", "> 0")),
    Case("glue-weight-decay", "glue", _glue("--weight-decay", "-1"), ("--weight-decay=-1.0",)),
    Case("glue-warmup", "glue", _glue("--warmup-ratio", "1.5"), ("--warmup-ratio=1.5", "[0, 1]")),
    Case("glue-neat-rank", "glue", _glue("--neat", "rank=0"), ("neat_rank=0",)),
    Case("glue-neat-field", "glue", _glue("--neat", "rnak=2"), ("rnak", "allowed fields")),
    Case("glue-missing-task", "glue", lambda s, tmp: ["--output", str(tmp / "o")], ("--task",)),
    Case(
        "glue-config-syntax",
        "glue",
        _with_file("g.yaml", "lr: [1,\n", lambda p: ["--config", str(p)]),
        ("g.yaml", "YAML"),
    ),
    Case(
        "glue-config-unknown",
        "glue",
        _with_file("g.yaml", "learning_rate: 1\n", lambda p: ["--config", str(p)]),
        ("learning_rate",),
    ),
    Case("glue-data-missing", "glue", lambda s, tmp: _glue("--data-dir", str(tmp / "none"))(s, tmp), ("no GLUE file",)),
    Case("glue-bad-label", "glue", _glue_with(_glue_bad_label), ("train.tsv", "label")),
    Case("glue-model-missing", "glue", lambda s, tmp: _glue("--model", str(tmp / "no_model"))(s, tmp), ("no_model",)),
    Case("glue-resume-nothing", "glue", _glue("--resume"), ("nothing to resume",)),
    Case("glue-resume-torn", "glue", _glue_with(_glue_torn_checkpoint), (CHECKPOINT, "cannot be read")),
    Case(
        "glue-output-is-a-file",
        "glue",
        _with_file(
            "f",
            "x",
            lambda p: ["--task", "cola", "--lr", "1", "--batch-size", "2", "--epochs", "1", "--output", str(p)],
        ),
        ("is a file, not a folder",),
    ),
    # --- instruction runner
    Case(
        "instruct-data-missing",
        "instruct",
        lambda s, tmp: _instruct("--data", str(tmp / "no.json"))(s, tmp),
        ("no.json",),
    ),
    Case(
        "instruct-data-json",
        "instruct",
        lambda s, tmp: _with_file("d.json", '[{"instruction": "a"', lambda p: _instruct("--data", str(p))(s, tmp))(
            s, tmp
        ),
        ("d.json", "not valid JSON"),
    ),
    Case("instruct-eval-set", "instruct", _instruct("--eval-sets", "mmlu", "--eval-dir", "."), ("'mmlu'",)),
    Case("instruct-no-adapter", "instruct", _instruct("--eval-only", train=False), ("--adapter",)),
    Case(
        "instruct-cut-adapter",
        "instruct",
        lambda s, tmp: _instruct(*_cut_adapter(s, tmp), train=False)(s, tmp),
        ("adapter.safetensors", "cannot be read"),
    ),
    Case("instruct-val-size", "instruct", _instruct("--val-size", "-1"), ("--val-size=-1",)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_ends_in_one_line_and_changes_nothing(
    case: Case, shared: Shared, tmp_path: Path, capsys, monkeypatch
) -> None:
    # the working directory is tmp_path, inside the snapshot: defaults such as ./runs are covered too
    monkeypatch.chdir(tmp_path)
    argv = case.argv(shared, tmp_path)
    before = _snapshot(shared.root, tmp_path)
    capsys.readouterr()
    code = _invoke(case.runner, argv)
    line = _error_line(capsys.readouterr().err)
    assert code == EXIT_USAGE, line
    for part in case.expect:
        assert part in line, (part, line)
    after = _snapshot(shared.root, tmp_path)
    assert {k: after.get(k) for k in before} == before  # nothing that existed was changed
    if not case.starts_run:
        assert set(after) == set(before)  # and nothing was written


def test_corrupt_images_train_with_skip_corrupt(shared: Shared, tmp_path: Path) -> None:
    """The control of the corrupt-image cases: the same data trains once the flag the message names is set."""
    assert _invoke("train", [*_corrupt_folder()(shared, tmp_path), "--skip-corrupt"]) == 0


def test_the_script_itself_exits_2_with_one_line(tmp_path: Path) -> None:
    """The same through a real process: ``python train.py`` with a negative learning rate."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "train.py"), *VISION, "--output", str(tmp_path), "--lr-neat", "-1"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=300,
    )
    assert result.returncode == EXIT_USAGE
    assert result.stderr.splitlines() == [
        "error: --lr-neat=-1.0 is not allowed: a finite number > 0 (see train.py --help)"
    ]
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------ the adapter API table


def _model_state(model: nn.Module) -> dict:
    """Everything ``load_adapter`` could change: modules, parameters and flags, attributes, hooks."""
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "tensors": {n: t.clone() for n, t in model.state_dict().items()},
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "attrs": sorted(k for k in vars(model) if k in ("neat_config", "_neat_batcher_handles")),
        "hooks": len(model._load_state_dict_post_hooks) + len(model._forward_hooks) + len(model._forward_pre_hooks),
    }


def _same(a: dict, b: dict) -> bool:
    tensors = a["tensors"].keys() == b["tensors"].keys() and all(
        torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"]
    )
    return tensors and all(a[k] == b[k] for k in ("modules", "trainable", "attrs", "hooks"))


def _edit_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        meta = json.loads((folder / "adapter_config.json").read_text())
        change(meta)
        (folder / "adapter_config.json").write_text(json.dumps(meta))

    return edit


def _edit_tensors(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        tensors = load_file(folder / "adapter.safetensors")
        change(tensors)
        save_file(tensors, folder / "adapter.safetensors")

    return edit


def _cut(name: str, keep: int) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:keep])


def _plain(seed: int = 0) -> nn.Module:
    return _tiny_vit(seed)


def _adapted_other() -> nn.Module:
    return apply_neat(_tiny_vit(), NeatConfig(targets=["q", "v"], rank=3))


ADAPTER_CASES = [
    # (id, damage the folder copy, model to load onto, exception, parts of the message)
    ("weights-truncated", _cut("adapter.safetensors", 100), _plain, AdapterFileError, ("adapter.safetensors", "cut")),
    ("config-cut", _cut("adapter_config.json", 40), _plain, AdapterFileError, ("adapter_config.json", "JSON")),
    ("folder-missing", lambda f: shutil.rmtree(f), _plain, FileNotFoundError, ("adapter_config.json",)),
    (
        "weights-missing",
        lambda f: (f / "adapter.safetensors").unlink(),
        _plain,
        FileNotFoundError,
        ("adapter.safetensors",),
    ),
    ("config-bad-field", _edit_config(lambda m: m["config"].update(rank=0)), _plain, AdapterFileError, ("rank=0",)),
    ("config-no-fingerprint", _edit_config(lambda m: m.pop("fingerprint")), _plain, AdapterFileError, ("fingerprint",)),
    (
        "config-other-format",
        _edit_config(lambda m: m.update(format="x")),
        _plain,
        AdapterMismatchError,
        ("format='x'",),
    ),
    (
        "other-base-weights",
        lambda f: None,
        lambda: _plain(seed=1),
        AdapterMismatchError,
        ("other base weights", "check_base=False"),
    ),
    (
        "shapes-differ",
        _edit_config(lambda m: m["config"].update(rank=3)),
        _plain,
        AdapterMismatchError,
        ("shape",),
    ),
    (
        "tensors-from-another-save",
        _edit_tensors(lambda t: t.pop(sorted(t)[0])),
        _plain,
        AdapterFileError,
        ("other tensors",),
    ),
    (
        "tensors-nan",
        _edit_tensors(lambda t: t[sorted(t)[0]].fill_(float("nan"))),
        _plain,
        AdapterFileError,
        ("NaN or inf",),
    ),
    ("adapted-otherwise", lambda f: None, _adapted_other, AdapterMismatchError, ("adapted with",)),
]


@pytest.mark.parametrize(
    ("damage", "model_fn", "error", "expect"), [c[1:] for c in ADAPTER_CASES], ids=[c[0] for c in ADAPTER_CASES]
)
def test_failed_load_adapter_leaves_model_and_files_as_they_were(
    shared, tmp_path, damage, model_fn, error, expect
) -> None:
    folder = tmp_path / "adapter"
    shutil.copytree(shared.adapter, folder)
    damage(folder)
    model = model_fn()
    state = _model_state(model)
    files = _snapshot(tmp_path)
    with pytest.raises(error) as info:
        neat_vision.load_adapter(model, folder)
    message = str(info.value)
    assert "\n" not in message and all(part in message for part in expect), message
    assert _same(_model_state(model), state)
    assert _snapshot(tmp_path) == files


def test_a_plain_fully_trainable_model_stays_fully_trainable_after_a_refused_adapter(shared) -> None:
    model = _plain(seed=1)  # other weights than the adapter's base
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    with pytest.raises(AdapterMismatchError):
        neat_vision.load_adapter(model, shared.adapter)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    assert not neat_vision.adapted_layers(model)
    neat_vision.load_adapter(_plain(seed=0), shared.adapter)  # the control: the right base loads


def test_load_adapter_by_name_refuses_an_unknown_recorded_model(shared, tmp_path) -> None:
    folder = tmp_path / "adapter"
    shutil.copytree(shared.adapter, folder)
    _edit_config(lambda m: m["base"].update(model_name="vit_gone"))(folder)
    with pytest.raises(ValueError, match="model 'vit_gone.*is not a timm model"):
        neat_vision.load_adapter(None, folder)


# ------------------------------------------------------------------------------------------ non-finite stops


def _diverged(err: str) -> tuple[str, int, int]:
    line = _error_line(err)
    bad = int(re.search(r"step (\d+)", line)[1])
    kept = re.search(r"the last good checkpoint (\S+) \(step (\d+)\) is \w+ and verified finite", line)
    assert kept, line
    return line, bad, int(kept[2])


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("nan"))


def _inject(fault: str, monkeypatch) -> None:
    """``gradients``: NaN gradients (finite loss) from the 3rd forward; ``weights``: the 2nd step leaves an inf."""
    if fault == "gradients":
        cross_entropy, calls = torch.nn.functional.cross_entropy, []

        def poisoned(logits, *args, **kwargs):
            calls.append(1)
            return cross_entropy(_NanGradient.apply(logits) if len(calls) >= 3 else logits, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    elif fault == "weights":
        step, calls = torch.optim.AdamW.step, []

        def poisoned_step(self, *args, **kwargs):
            out = step(self, *args, **kwargs)
            calls.append(1)
            if len(calls) == 2:
                with torch.no_grad():
                    self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
            return out

        monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)


@pytest.mark.parametrize(
    ("fault", "what"),
    [("learning-rate", "non-finite"), ("gradients", "non-finite gradients"), ("weights", ") became non-finite")],
)
def test_vision_stop_on_non_finite_keeps_a_finite_resumable_checkpoint(fault, what, tmp_path, capsys, monkeypatch):
    argv = [*VISION, "--output", str(tmp_path), "--experiment", "nan", "--limit-train-batches", "6"]
    argv += ["--checkpoint-interval", "1"] + (
        ["--lr-neat", "1e30", "--lr-head", "1e30"] if fault == "learning-rate" else []
    )
    _inject(fault, monkeypatch)
    capsys.readouterr()
    assert _invoke("train", argv) == EXIT_DIVERGED
    line, bad_step, kept_step = _diverged(capsys.readouterr().err)
    assert what in line and "epoch 1" in line
    last = tmp_path / "nan" / "checkpoints" / "last.pth"
    ckpt = load_checkpoint(last)
    assert ckpt["progress"]["step"] == kept_step == bad_step - 1 >= 1
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert not (tmp_path / "nan" / "final.json").exists()
    saved = _snapshot(last.parent)
    monkeypatch.undo()
    if fault == "learning-rate":  # the resumed run replays exactly to the same stop; the checkpoint stays as it was
        assert _invoke("train", [*argv, "--resume", "auto"]) == EXIT_DIVERGED
        assert _diverged(capsys.readouterr().err)[0] == line
        assert _snapshot(last.parent) == saved
    else:  # the fault is gone: the kept checkpoint resumes and the run finishes
        assert _invoke("train", [*argv, "--resume", "auto"]) == 0
        assert json.loads((tmp_path / "nan" / "final.json").read_text())["steps"] == 6


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # the skipped steps
def test_vision_fp16_overflowing_gradients_are_skipped_by_the_scaler_not_stopped(tmp_path: Path, monkeypatch) -> None:
    """Under fp16 + GradScaler inf gradients are normal: the scaler skips the step and lowers its scale."""
    scaler_type = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: scaler_type(device, init_scale=2.0**100))
    argv = [*VISION, "--output", str(tmp_path), "--experiment", "amp", "--amp", "fp16", "--device", "cpu"]
    assert _invoke("train", argv) == 0
    ckpt = load_checkpoint(tmp_path / "amp" / "checkpoints" / "last.pth")
    assert ckpt["progress"]["step"] == 2 and ckpt["scaler"]["scale"] == 2.0**98  # both steps were skipped
    args = parse_args(argv)
    random_seed(args.seed, 0)  # the run's initialisation
    initial = build_adapter(build_model(args, 10), args).state_dict()
    assert all(torch.equal(t, initial[k]) for k, t in ckpt["model"].items())  # so nothing was applied


@pytest.mark.parametrize("runner", ["glue", "instruct"])
def test_nlp_stop_on_non_finite_keeps_a_finite_resumable_checkpoint(runner, shared, tmp_path, capsys) -> None:
    argv = (_glue if runner == "glue" else _instruct)("--lr", "1e30", "--checkpoint-steps", "1", "--epochs", "3")(
        shared, tmp_path
    )
    # the LLaMA's RMSNorms absorb huge activations: there weight decay 1 at lr 1e30 makes the weights overflow
    argv += ["--head-lr", "1e30"] if runner == "glue" else ["--warmup-steps", "0", "--weight-decay", "1"]
    capsys.readouterr()
    assert _invoke(runner, argv) == EXIT_DIVERGED
    line, bad_step, kept_step = _diverged(capsys.readouterr().err)
    state = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert state["progress"]["global_step"] == kept_step >= 1
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())
    saved = _snapshot(tmp_path / "run")
    assert _invoke(runner, [*argv, "--resume"]) == EXIT_DIVERGED
    assert _diverged(capsys.readouterr().err)[0] == line
    assert {k: v for k, v in _snapshot(tmp_path / "run").items() if k.endswith(CHECKPOINT)} == {
        k: v for k, v in saved.items() if k.endswith(CHECKPOINT)
    }


# ------------------------------------------------------------------------------------- leftovers and modes


def test_stale_temporaries_are_removed_at_the_next_start_and_outputs_share_one_mode(shared, tmp_path) -> None:
    run_dir = tmp_path / "x"
    (run_dir / "checkpoints").mkdir(parents=True)
    stale = run_dir / "checkpoints" / ".last.pth.k3j_x9qa.tmp"  # what a kill during a write leaves
    stale.write_bytes(b"half")
    keep = run_dir / "checkpoints" / "notes.tmp"
    keep.write_text("mine")
    assert _invoke("train", [*VISION, "--output", str(tmp_path), "--experiment", "x"]) == 0
    assert not stale.exists() and keep.read_text() == "mine"
    modes = {p.relative_to(run_dir).as_posix(): p.stat().st_mode & 0o777 for p in run_dir.rglob("*") if p.is_file()}
    modes.pop("checkpoints/notes.tmp")
    assert {"final.json", "args.yaml", "summary.csv", "checkpoints/last.pth", "adapter/adapter.safetensors"} <= set(
        modes
    )
    assert len(set(modes.values())) == 1, modes
