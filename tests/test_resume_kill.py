"""A real ``kill -9`` of ``train.py`` (a separate process) between periodic checkpoints, then ``--resume auto``.

The process (``tests/preempt_worker.py``) pauses after optimizer step 8, before that step's bookkeeping, so the
test never races the run: the last checkpoint on disk is the periodic one of step 6 (``--checkpoint-interval 3``),
older than the step the process reached. The resumed run must restart from step 6, take steps 7..10 only, and
end with the results of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from neat_vision.engine import run
from neat_vision.engine.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from test_disk_full import _argv  # noqa: E402
from test_train_e2e import _args, _count_steps, _resumed_from, _rows, _stable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240.0) -> None:
    """Poll ``condition()`` until true; fail when ``proc`` ends first or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"train.py exited {proc.returncode} before {what}:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def test_kill_9_between_periodic_checkpoints_resumes_from_the_older_one(tmp_path: Path, monkeypatch, caplog) -> None:
    argv = _argv(tmp_path, "killed")
    argv[argv.index("--checkpoint-interval") + 1] = "3"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PAUSE_STEP": "8"}
    log = (tmp_path / "train.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "preempt_worker.py"), "train", *argv],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    proc.stdout = log
    last = tmp_path / "killed" / "checkpoints" / "last.pth"
    try:
        _wait_for(lambda: "PAUSED pid=" in (tmp_path / "train.log").read_text(), proc, "the pause at step 8")
        _wait_for(last.is_file, proc, "checkpoints/last.pth")
        assert load_checkpoint(last)["progress"]["step"] == 6  # the periodic checkpoint before the kill
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert not (tmp_path / "killed" / "final.json").exists()

    caplog.set_level("INFO", logger="neat_vision.engine")
    taken = _count_steps(monkeypatch)
    resumed = run(_args(tmp_path, "killed", "--resume", "auto", "--checkpoint-interval", "3"))
    assert _resumed_from(caplog) == [6] and taken == [7, 8, 9, 10]  # restarted at the older checkpoint
    whole = run(_args(tmp_path, "whole", "--checkpoint-interval", "3"))
    assert _stable(resumed) == _stable(whole)
    assert [r["train_loss"] for r in _rows(tmp_path / "killed")] == [r["train_loss"] for r in _rows(tmp_path / "whole")]
    a, b = (load_file(tmp_path / name / "adapter" / "adapter.safetensors") for name in ("whole", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
