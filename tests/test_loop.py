"""The one training loop (`neat_vision.engine.loop`) on a toy task: exact mid-epoch resume, the NaN stop."""

from __future__ import annotations

import ast
import csv
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

import neat_vision.engine.loop as loop_module
import neat_vision.engine.options as options_module
from neat_vision.engine.distributed import DistEnv
from neat_vision.engine.loop import Diverged, EpochEnd, LoopSettings, Progress, ResumeError, TrainLoop


class ToyTask:
    """Regression on 10 points: batches of 4, 4, 2 in a per-epoch order, micro-batches of 2, dropout."""

    scaler = None

    def __init__(self, out: Path, nan_from_call: int | None = None) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1))  # dropout draws from the RNG
        self.net = self.model
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0 / (1 + step))
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(10, 3, generator=generator)
        self.y = self.x.sum(1) + 0.1 * torch.randn(10, generator=generator)
        self.path = out / "checkpoint.pt"
        self.calls, self.nan_from_call = 0, nan_from_call
        self.best_epochs: list[int] = []

    def steps_per_epoch(self) -> int:
        return 3

    def epoch_steps(self, epoch: int, start: int):
        order = torch.randperm(10, generator=torch.Generator().manual_seed(epoch)).tolist()
        for batch in [order[i : i + 4] for i in range(0, 10, 4)][start:]:
            micro = [batch[i : i + 2] for i in range(0, len(batch), 2)]
            yield len(micro), micro

    def backward(self, micro: list[int], n_micro: int) -> tuple[torch.Tensor, int]:
        self.calls += 1
        loss = ((self.net(self.x[micro]).squeeze(-1) - self.y[micro]) ** 2).sum()
        if self.nan_from_call is not None and self.calls >= self.nan_from_call:
            loss = loss * float("nan")
        loss.backward()
        return loss.detach(), len(micro)

    def end_epoch(self, end: EpochEnd) -> tuple[dict, dict]:
        self.model.eval()
        with torch.no_grad():
            val = float(((self.model(self.x).squeeze(-1) - self.y) ** 2).mean())
        return {"epoch": end.epoch, "train_loss": end.train_loss, "val_loss": val}, {"val/loss": val}

    def on_best(self, row: dict) -> None:
        self.best_epochs.append(row["epoch"])

    def checkpoint(self, progress: Progress) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "progress": asdict(progress),
        }

    def restore(self) -> tuple[Path, dict, Progress]:
        state = torch.load(self.path, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return self.path, state, Progress(**state["progress"])


def make_loop(task: ToyTask, out: Path, **options) -> TrainLoop:
    settings = LoopSettings(
        epochs=3,
        checkpoint=task.path,
        summary=out / "summary.csv",
        tensorboard=out / "tb",
        select_metric="val_loss",
        maximize=False,
        sum_gradients=True,
        **options,
    )
    return TrainLoop(task, settings, DistEnv(torch.device("cpu")))


def run(loop: TrainLoop, resume: bool = False) -> bool:
    try:
        if resume:
            loop.resume()
        return loop.run()
    finally:
        loop.close()


def test_a_run_stopped_mid_epoch_and_resumed_equals_an_uninterrupted_one(tmp_path):
    whole_task = ToyTask(tmp_path / "whole")
    whole = make_loop(whole_task, tmp_path / "whole")
    assert run(whole) is False
    assert [row["epoch"] for row in whole.progress.history] == [1, 2, 3] and whole.progress.global_step == 9

    parts = tmp_path / "parts"
    assert run(make_loop(ToyTask(parts), parts, stop_after_steps=4)) is True  # step 1 of epoch 2
    saved = torch.load(parts / "checkpoint.pt", weights_only=True)
    assert (saved["progress"]["epoch"], saved["progress"]["step_in_epoch"], len(saved["rng"])) == (1, 1, 1)
    torch.manual_seed(123)  # the resumed session restores the RNG state that dropout draws from
    task = ToyTask(parts)
    resumed = make_loop(task, parts)
    assert run(resumed, resume=True) is False
    assert resumed.progress.history == whole.progress.history and resumed.progress.best == whole.progress.best
    for a, b in zip(whole_task.model.parameters(), task.model.parameters()):
        assert torch.equal(a, b)
    rows = list(csv.DictReader((parts / "summary.csv").open()))
    assert [float(r["val_loss"]) for r in rows] == [row["val_loss"] for row in whole.progress.history]
    assert any((parts / "tb").iterdir())


def test_a_non_finite_loss_stops_before_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    task = ToyTask(tmp_path, nan_from_call=9)  # 2 + 2 + 1 micro-batches an epoch: call 9 is in step 5
    loop = make_loop(task, tmp_path, checkpoint_steps=1)
    with pytest.raises(Diverged, match=r"non-finite training loss \(nan\) at epoch 2, optimizer step 5") as info:
        run(loop)
    path = tmp_path / "checkpoint.pt"
    assert re.search(
        rf"the last good checkpoint {re.escape(str(path))} \(step 4\) is intact and verified", str(info.value)
    )
    state = torch.load(path, weights_only=True)
    assert state["progress"]["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert all(torch.isfinite(p).all() for p in task.model.parameters())  # the bad step was not applied


def test_a_checkpoint_of_another_number_of_processes_is_refused(tmp_path):
    run(make_loop(ToyTask(tmp_path), tmp_path))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state["rng"] = state["rng"] * 2
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(ResumeError, match=r"written by 2 process\(es\), this run has 1"):
        make_loop(ToyTask(tmp_path), tmp_path).resume()


@pytest.mark.parametrize("module", [loop_module, options_module], ids=lambda m: m.__name__)
def test_the_shared_modules_import_neither_timm_nor_transformers(module):
    tree = ast.parse(Path(module.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {name for name in imported if name.split(".")[0] in ("timm", "transformers")}
