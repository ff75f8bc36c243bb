"""One run per output folder (`neat_vision.run_lock`) and graceful preemption (SIGTERM / SIGUSR1 / SIGUSR2).

The runners run as processes that pause after a given optimizer step (``tests/preempt_worker.py``) until they
are signalled or killed there, so nothing races: a second process on the same folder is refused naming the
first, a signalled run checkpoints and exits 4, a ``kill -9`` leaves a lock that blocks nothing, and the
resumed run (restarting from a step > 0) ends with the results of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import neat_vision.engine.loop as loop_module
from neat_vision.engine import main as train_main
from neat_vision.engine import parse_args, run
from neat_vision.engine.checkpoint import load_checkpoint
from neat_vision.engine.distributed import DistEnv
from neat_vision.errors import EXIT_PREEMPTED, EXIT_USAGE, PREEMPT_SIGNALS, Preempted
from neat_vision.run_lock import LOCK_NAME, FolderInUse, folder_lock
from tests.test_loop import ToyTask, make_loop
from tests.test_loop import run as run_loop

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "preempt_worker.py"
TINY = {  # tests/test_train_e2e.py's tiny run: 5 optimizer steps an epoch
    "dataset": "digits",
    "model": "vit_tiny_patch16_224",
    "no-pretrained": None,
    "model-kwargs": json.dumps({"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}),
    "epochs": "2",
    "batch-size": "32",
    "grad-accum": "2",
    "lr-neat": "1e-2",
    "lr-head": "1e-2",
    "workers": "0",
    "limit-train-batches": "9",
    "checkpoint-interval": "0",
}
VOLATILE = {"wall_time_s", "output_dir"}


def _train_argv(out: Path, experiment: str, *extra: str, **options: str) -> list[str]:
    argv = ["--output", str(out), "--experiment", experiment, "--device", "cpu"]
    for key, value in {**TINY, **options}.items():
        argv += [f"--{key}"] if value is None else [f"--{key}", value]
    return [*argv, *extra]


def _start(runner: str, argv: list[str], pause_step: int, torchrun: bool = False, pause_rank: int = 0):
    env = {**os.environ, "PAUSE_STEP": str(pause_step), "PAUSE_RANK": str(pause_rank), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(ROOT)
    launch = [sys.executable]
    if torchrun:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.Popen(
        [*launch, str(WORKER), runner, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


class Forked:
    """``call()`` (a runner's ``main``) in a forked copy of this test process (no second start-up of torch), which
    pauses after optimizer step ``pause_step`` until it is signalled; its stdout and stderr go to ``log``."""

    def __init__(self, call, pause_step: int, name: Path, env: dict[str, str] | None = None) -> None:
        self.marker, self.log = name.with_suffix(".paused"), name.with_suffix(".log")
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns to pytest
            code = 1
            try:
                fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
                os.environ.update(env or {})
                self._pause_after(pause_step)
                code = call()
            except SystemExit as stop:
                code = stop.code
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code if isinstance(code, int) else 0 if code is None else 1)

    def _pause_after(self, pause_step: int) -> None:
        step, marker = loop_module.TrainLoop._optimizer_step, self.marker

        def paused(loop, terms):
            step(loop, terms)
            if loop.progress.global_step + 1 == pause_step:
                marker.write_text(str(os.getpid()))
                deadline = time.monotonic() + 120
                while loop.signal is None and time.monotonic() < deadline:
                    time.sleep(0.01)

        loop_module.TrainLoop._optimizer_step = paused

    def paused(self) -> None:
        """Wait until it pauses (or fail when it exited first)."""
        while not self.marker.exists():
            done, status = os.waitpid(self.pid, os.WNOHANG)
            assert not done, f"exited {os.waitstatus_to_exitcode(status)}:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.02)

    def wait(self) -> tuple[int, str]:
        """Its exit status and output."""
        status = os.waitpid(self.pid, 0)[1]
        return os.waitstatus_to_exitcode(status), self.log.read_text()


def _paused_pid(proc: subprocess.Popen) -> tuple[int, str]:
    """Read ``proc``'s output up to its ``PAUSED pid=N`` line: N and the output so far."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        found = re.match(r"PAUSED pid=(\d+)", line)
        if found:
            return int(found[1]), "".join(seen)
    proc.wait()
    raise AssertionError(f"exited {proc.returncode} before pausing:\n{''.join(seen)[-3000:]}")


def _error_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("error: ")]
    assert lines, out[-3000:]
    return lines[-1]


def _stable(final: dict) -> dict:
    return {k: v for k, v in final.items() if k not in VOLATILE}


def _resumed_step(caplog) -> int:
    found = [re.search(r"resumed from .*, step (\d+) ", r.getMessage()) for r in caplog.records]
    steps = [int(m[1]) for m in found if m]
    assert steps, "no resume was logged"
    return steps[-1]


# --------------------------------------------------------------------------------------------- the lock itself


def test_the_folder_lock_refuses_a_second_holder_names_the_first_and_leaves_no_file(tmp_path):
    with folder_lock(tmp_path / "run"):
        text = (tmp_path / "run" / LOCK_NAME).read_text()
        assert f"pid={os.getpid()}\n" in text and "host=" in text and "started=" in text
        with folder_lock(tmp_path / "run"):  # the holder itself may nest
            pass
        # another process (a fork: it does not inherit the lock, and is refused it)
        child = os.fork()
        if child == 0:
            code = 9
            try:
                with folder_lock(tmp_path / "run"):
                    code = 8
            except FolderInUse as err:
                (tmp_path / "refused").write_text(str(err))
                code = 7
            os._exit(code)
        assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 7
        assert f"is in use by another run (pid {os.getpid()} on " in (tmp_path / "refused").read_text()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    with folder_lock(tmp_path / "run"):  # released
        pass


# --------------------------------------------------------------------------------------------- the loop


class SignalledTask(ToyTask):
    """The toy task that receives stop signals in given micro-batch calls (and again while checkpointing)."""

    def __init__(self, out: Path, signals: dict[int, int], during_save: int | None = None) -> None:
        super().__init__(out)
        self.signals, self.during_save = signals, during_save

    def backward(self, micro, n_micro):
        result = super().backward(micro, n_micro)
        if self.calls in self.signals:
            signal.raise_signal(self.signals[self.calls])
        return result

    def checkpoint(self, progress):
        if self.during_save is not None and self.calls >= min(self.signals):
            signal.raise_signal(self.during_save)  # a repeat while saving: ignored
        return super().checkpoint(progress)


def test_a_signal_stops_the_loop_after_the_step_with_a_checkpoint_and_the_resume_equals_a_whole_run(tmp_path):
    before = [signal.getsignal(s) for s in PREEMPT_SIGNALS]
    whole_task = ToyTask(tmp_path / "whole")
    whole = make_loop(whole_task, tmp_path / "whole")
    assert run_loop(whole) is False
    parts = tmp_path / "parts"
    # 2 + 2 + 1 micro-batches an epoch: call 7 is in step 4 (epoch 2); the repeats are ignored
    task = SignalledTask(parts, {7: signal.SIGUSR1, 8: signal.SIGTERM}, during_save=signal.SIGTERM)
    with pytest.raises(Preempted, match=r"preempted by SIGUSR1 after optimizer step 4 \(epoch 2, step 1 of it\)"):
        run_loop(make_loop(task, parts))
    assert [signal.getsignal(s) for s in PREEMPT_SIGNALS] == before  # the handlers are restored
    saved = torch.load(parts / "checkpoint.pt", weights_only=True)
    assert saved["progress"]["global_step"] == 4
    task = ToyTask(parts)
    resumed = make_loop(task, parts)
    assert run_loop(resumed, resume=True) is False
    assert resumed.progress.history == whole.progress.history
    for a, b in zip(whole_task.model.parameters(), task.model.parameters()):
        assert torch.equal(a, b)


def test_the_stop_is_decided_over_ranks(tmp_path, monkeypatch):
    """A flag raised on another rank (here: the reduced sum) stops this one after the same step."""
    import neat_vision.engine.loop as loop_module

    reduce_sum = loop_module.all_reduce_sum

    def other_rank_signalled(t, env):
        out = reduce_sum(t, env)
        if t.numel() >= 5:  # the step's stats: loss, terms, bad weights, stop, bad gradients
            out[3] += 1
        return out

    monkeypatch.setattr(loop_module, "all_reduce_sum", other_rank_signalled)
    task = ToyTask(tmp_path)
    settings = make_loop(task, tmp_path).settings
    loop = loop_module.TrainLoop(task, settings, DistEnv(torch.device("cpu")))
    with pytest.raises(Preempted, match="preempted by a signal to another rank after optimizer step 1 "):
        run_loop(loop)


# --------------------------------------------------------------------------------------------- train.py


def test_train_lock_sigterm_and_kill(tmp_path, capsys, caplog):
    cut_argv = _train_argv(tmp_path, "cut")
    kill_argv = _train_argv(tmp_path, "killed", **{"checkpoint-interval": "1"})
    cut = Forked(lambda: train_main(cut_argv), 3, tmp_path / "cut")
    killed = Forked(lambda: train_main(kill_argv), 3, tmp_path / "killed")
    cut.paused()
    # a second process on the run folder is refused at once, naming the holder
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        train_main([*cut_argv, "--resume", "auto"])
    assert info.value.code == EXIT_USAGE
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: {tmp_path / 'cut'} is in use by another run (pid {cut.pid} on "), line
    os.kill(cut.pid, signal.SIGTERM)
    code, out = cut.wait()
    assert code == EXIT_PREEMPTED, out[-3000:]
    assert _error_line(out).startswith("error: preempted by SIGTERM after optimizer step 4 (epoch 1, step 4 of it)")
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pth")["progress"]["step"] == 4
    # kill -9: the lock file stays but holds nothing
    killed.paused()
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait()[0] == -signal.SIGKILL
    assert (tmp_path / "killed" / LOCK_NAME).is_file()
    caplog.set_level(logging.INFO, logger="neat_vision.engine")
    resumed = run(parse_args([*cut_argv, "--resume", "auto"]))
    assert _resumed_step(caplog) == 4
    again = run(parse_args([*kill_argv, "--resume", "auto"]))
    assert _resumed_step(caplog) == 2  # the last checkpoint before the kill
    whole = run(parse_args(_train_argv(tmp_path, "whole")))
    assert _stable(resumed) == _stable(whole) == _stable(again)
    a, b = (load_file(tmp_path / name / "adapter" / "adapter.safetensors") for name in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "cut" / LOCK_NAME).exists()


def test_train_under_torchrun_stops_every_rank_at_the_same_step_and_resumes(tmp_path, caplog):
    argv = _train_argv(tmp_path, "ddp", epochs="1", **{"batch-size": "16"})
    job = _start("train", argv, 2, torchrun=True, pause_rank=1)
    pid, out = _paused_pid(job)
    os.kill(pid, signal.SIGTERM)  # rank 1 only: the stop is reduced over the ranks
    out += job.communicate(timeout=300)[0]
    assert job.returncode == 1, out[-3000:]  # torchrun's own status for failed workers; theirs is 4
    assert "exitcode  : 4" in out, out[-3000:]
    # both ranks, after the same step (the two ranks' stderr lines may interleave on one line of the merged output)
    who = r"(?:SIGTERM|a signal to another rank)"
    stops = re.findall(rf"error: preempted by {who} after (optimizer step \d+ \(epoch \d+, step \d+ of it\))", out)
    assert len(stops) == 2, out[-3000:]
    assert set(stops) == {"optimizer step 3 (epoch 1, step 3 of it)"}
    assert load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pth")["progress"]["step"] == 3
    resumed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py")]
        + [*argv, "--resume", "auto"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert re.search(r"resumed from .*, step 3 ", resumed.stdout + resumed.stderr)
    final = json.loads((tmp_path / "ddp" / "final.json").read_text())
    one = run(parse_args(_train_argv(tmp_path, "one", epochs="1")))
    for key, value in one.items():  # 2 x 16 = 1 x 32 (see test_train_e2e's torchrun test)
        if key not in VOLATILE and isinstance(value, (int, float)):
            assert final[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


# --------------------------------------------------------------------------------------------- NLP runners


pytest.importorskip("transformers")

from neat_vision.nlp import glue, instruct  # noqa: E402
from neat_vision.nlp.loop import CHECKPOINT  # noqa: E402
from tests import nlp_fixtures as fx  # noqa: E402
from tests.nlp_fixtures import assert_same_saved, single_thread  # noqa: E402, F401 (single_thread: an autouse fixture)


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_glue_lock_sigterm_and_kill(tmp_path, capsys, caplog):
    model = fx.save_roberta_folder(tmp_path / "model")
    data = fx.write_glue(tmp_path / "glue", "cola", n_train=40, n_dev=16)  # 5 steps an epoch

    def argv(out: Path, *extra: str) -> list[str]:
        common = ["--task", "cola", "--model", str(model), "--data-dir", str(data), "--output", str(out)]
        return common + ["--lr", "1e-2", "--batch-size", "8", "--neat", "rank=2", "--epochs", "2", *extra]

    killed_argv = argv(tmp_path / "killed", "--checkpoint-steps", "1")
    cut = Forked(lambda: glue.main(argv(tmp_path / "cut")), 3, tmp_path / "cut")
    killed = Forked(lambda: glue.main(killed_argv), 3, tmp_path / "killed")
    cut.paused()
    pid = cut.pid
    capsys.readouterr()
    assert glue.main(argv(tmp_path / "cut", "--resume")) == EXIT_USAGE
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: {tmp_path / 'cut'} is in use by another run (pid {pid} on "), line
    os.kill(pid, signal.SIGUSR1)
    code, out = cut.wait()
    assert code == EXIT_PREEMPTED, out[-3000:]
    assert _error_line(out).startswith("error: preempted by SIGUSR1 after optimizer step 4 (epoch 1, step 4 of it)")
    assert torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["progress"]["global_step"] == 4
    killed.paused()
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait()[0] == -signal.SIGKILL
    assert (tmp_path / "killed" / LOCK_NAME).is_file()
    caplog.set_level(logging.INFO, logger="neat_vision.engine")
    assert glue.main(argv(tmp_path / "cut", "--resume")) == 0
    assert _resumed_step(caplog) == 4
    assert glue.main([*killed_argv, "--resume"]) == 0  # the killed run's lock blocks nothing
    assert _resumed_step(caplog) == 2
    assert glue.main(argv(tmp_path / "whole")) == 0
    whole = _results(tmp_path / "whole")
    for resumed in (_results(tmp_path / "cut"), _results(tmp_path / "killed")):
        assert resumed["history"] == whole["history"] and resumed["best"] == whole["best"]
    for folder in ("best", "last"):
        assert_same_saved(tmp_path / "whole" / folder, tmp_path / "cut" / folder)


def test_instruct_sigterm_checkpoints_and_resumes_like_a_whole_run(tmp_path, caplog):
    records = fx.colour_records(20, seed=3)
    model = fx.save_llama_folder(tmp_path / "model", records)
    data = fx.write_json(tmp_path / "train.json", records)

    def argv(out: Path, *extra: str) -> list[str]:
        # 16 training records in batches of 4 (micro-batches of 2): 4 steps an epoch
        common = ["--model", str(model), "--output", str(out), "--data", str(data), "--lr", "1e-2", "--epochs", "2"]
        common += ["--batch-size", "4", "--micro-batch-size", "2", "--val-size", "4", "--warmup-steps", "1"]
        return common + ["--cutoff-len", "48", "--neat", "rank=2", *extra]

    cut = Forked(lambda: instruct.main(argv(tmp_path / "cut")), 5, tmp_path / "cut")
    cut.paused()
    os.kill(cut.pid, signal.SIGTERM)
    code, out = cut.wait()
    assert code == EXIT_PREEMPTED, out[-3000:]
    assert _error_line(out).startswith("error: preempted by SIGTERM after optimizer step 6 (epoch 2, step 2 of it)")
    assert torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["progress"]["global_step"] == 6
    caplog.set_level(logging.INFO, logger="neat_vision.engine")
    assert instruct.main(argv(tmp_path / "cut", "--resume")) == 0
    assert _resumed_step(caplog) == 6
    assert instruct.main(argv(tmp_path / "whole")) == 0
    whole, resumed = _results(tmp_path / "whole"), _results(tmp_path / "cut")
    assert resumed["history"] == whole["history"] and resumed["best"] == whole["best"]
    assert_same_saved(tmp_path / "whole" / "last", tmp_path / "cut" / "last")


# --------------------------------------------------------------------------------------------- studies

# a stand-in training command: waits (when BLOCK is set) until it is signalled, then "checkpoints" and exits 4
FAKE_TRAIN = textwrap.dedent(
    """
    import argparse, json, os, signal, sys, time
    from pathlib import Path

    p = argparse.ArgumentParser()
    for opt in ("--config", "--output", "--experiment", "--resume"):
        p.add_argument(opt)
    args = p.parse_args()
    run = Path(args.output) / args.experiment
    run.mkdir(parents=True, exist_ok=True)
    if os.environ.get("BLOCK"):
        def stop(signum, frame):
            (run / "signalled").write_text(signal.Signals(signum).name)
            sys.exit(4)
        signal.signal(signal.SIGTERM, stop)
        (run / "pid.tmp").write_text(str(os.getpid()))
        os.replace(run / "pid.tmp", run / "pid")
        time.sleep(120)
        sys.exit(1)
    final = dict(val_top1=50, best_val_top1=51, test_top1=49, trainable_params=10, neat_params=9, wall_time_s=1.0)
    (run / "final.json").write_text(json.dumps(final))
    """
)


def _wait_for(path: Path, forked: Forked) -> None:
    while not path.exists():
        done, status = os.waitpid(forked.pid, os.WNOHANG)
        assert not done, f"exited {os.waitstatus_to_exitcode(status)}:\n{forked.log.read_text()[-3000:]}"
        time.sleep(0.02)


def test_study_lock_forwards_sigterm_and_a_killed_study_blocks_nothing(tmp_path, capsys, monkeypatch):
    from neat_vision.studies.study import main as study_main

    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    (tmp_path / "base.yaml").write_text("neat_rank: 3\n")
    config = tmp_path / "study.yaml"
    study = dict(base_config="base.yaml", grid=dict(neat_depth=[2]), seeds=[0], output=str(tmp_path / "out"))
    study["train_command"] = [sys.executable, str(tmp_path / "fake_train.py")]
    config.write_text(yaml.safe_dump(study))
    argv = ["--config", str(config)]
    run_dir = tmp_path / "out" / "neat_depth=2__seed=0"
    first = Forked(lambda: study_main(argv), 0, tmp_path / "first", env={"BLOCK": "1"})
    _wait_for(run_dir / "pid", first)
    capsys.readouterr()
    assert study_main(argv) == EXIT_USAGE
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: {tmp_path / 'out'} is in use by another study (pid {first.pid} on "), line
    os.kill(first.pid, signal.SIGTERM)
    code, out = first.wait()
    assert code == EXIT_PREEMPTED, out
    assert (run_dir / "signalled").read_text() == "SIGTERM"  # forwarded to the run, which checkpointed
    assert "stopped by SIGTERM" in _error_line(out)
    # kill -9 of a study: its lock blocks nothing
    (run_dir / "pid").unlink()
    second = Forked(lambda: study_main(argv), 0, tmp_path / "second", env={"BLOCK": "1"})
    _wait_for(run_dir / "pid", second)
    os.kill(second.pid, signal.SIGKILL)
    second.wait()
    os.kill(int((run_dir / "pid").read_text()), signal.SIGKILL)  # its orphaned run
    assert (tmp_path / "out" / LOCK_NAME).is_file()
    monkeypatch.delenv("BLOCK", raising=False)
    assert study_main(argv) == 0
    assert (run_dir / "final.json").is_file()
    assert not (tmp_path / "out" / LOCK_NAME).exists()


def test_folder_in_use_is_a_user_error():
    from neat_vision.errors import USER_ERRORS, exit_status

    assert issubclass(FolderInUse, USER_ERRORS) and exit_status(FolderInUse("x")) == EXIT_USAGE
    assert exit_status(Preempted("x")) == EXIT_PREEMPTED == 4
