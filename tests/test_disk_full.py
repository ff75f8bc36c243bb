"""A full disk or a refused write: one clear error naming the file and the free space, nothing half-written.

`atomic_write` turns a refused write (``OSError`` ENOSPC/EDQUOT/EROFS/EACCES..., torch's ``RuntimeError`` and
safetensors' error for a short write) into `DiskWriteError`; train.py exits 2 with one line, keeps the previous
checkpoint and resumes from it to the uninterrupted result. The simulated full disk runs everywhere; the real one
(a 64 MiB tmpfs filled up) only where ``mount -t tmpfs`` works (root on Linux) and skips elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import neat_vision.engine.loop as loop_module
from neat_vision.atomic import DiskWriteError, atomic_write
from neat_vision.engine import main, run
from neat_vision.engine.checkpoint import load_checkpoint
from neat_vision.errors import USER_ERRORS, exit_status

sys.path.insert(0, str(Path(__file__).parent))
from test_train_e2e import _args, _count_steps, _resumed_from, _rows, _stable  # noqa: E402
from test_train_e2e import _argv as tiny_argv  # noqa: E402

TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def _no_temporaries(folder: Path) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("failure", "says"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "the disk quota is exceeded"),
        (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only"),
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
        (RuntimeError(TORCH_SHORT_WRITE), "no space left on the device"),
        (RuntimeError("basic_ios::clear: iostream error"), "no space left on the device"),
    ],
)
def test_a_refused_write_is_one_user_error_and_keeps_the_earlier_file(tmp_path: Path, failure, says) -> None:
    target = tmp_path / "out" / "last.pth"
    atomic_write(target, lambda tmp: Path(tmp).write_text("earlier"))

    def refused(tmp: str) -> None:
        Path(tmp).write_bytes(b"PK\x03\x04 half a file")  # written in part, then the disk refused the rest
        raise failure

    with pytest.raises(DiskWriteError) as info:
        atomic_write(target, refused)
    err = info.value
    assert isinstance(err, USER_ERRORS) and exit_status(err) == 2
    message = str(err)
    assert message.startswith(f"cannot write {target}: {says}") and "\n" not in message
    assert " free on " in message and str(target.parent) in message
    assert err.filename == str(target) and err.__cause__ is failure
    assert target.read_text() == "earlier"
    _no_temporaries(target.parent)


def test_other_errors_pass_through_unchanged(tmp_path: Path) -> None:
    bug = RuntimeError("a bug, not the disk")
    with pytest.raises(RuntimeError) as info:
        atomic_write(tmp_path / "f", lambda tmp: (_ for _ in ()).throw(bug))
    assert info.value is bug
    with pytest.raises(NotADirectoryError):  # not a refused write: kept as it is
        atomic_write(tmp_path / "g", lambda tmp: open(tmp + "/nope/x", "w"))
    _no_temporaries(tmp_path)


def test_safetensors_full_disk_message_is_recognised(tmp_path: Path, monkeypatch) -> None:
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(DiskWriteError, match=r"adapter\.safetensors: no space left"):
        atomic_write(tmp_path / "adapter.safetensors", lambda tmp: full({"w": torch.zeros(3)}, tmp))
    save_file({"w": torch.zeros(3)}, str(tmp_path / "ok.safetensors"))  # the real one still works


def _failing_save_at(call: int, fail: callable) -> callable:
    """``save_checkpoint`` that runs ``fail(state, path)`` instead at its ``call``-th use."""
    real = loop_module.save_checkpoint
    calls = []

    def save(state, path, copy_to=None):
        calls.append(state["progress"]["step"])
        if len(calls) == call:
            fail(state, path)
        return real(state, path, copy_to=copy_to)

    save.calls = calls
    return save


def _check_stopped_and_resume(tmp_path: Path, name: str, capsys, caplog, monkeypatch, failed_at: int) -> None:
    """train.py stopped with one line at the failed checkpoint; last.pth is the one before; resume equals whole."""
    run_dir = tmp_path / name
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    last = run_dir / "checkpoints" / "last.pth"
    assert err[0].startswith(f"error: cannot write {last}: no space left on the device (")
    assert " free on " in err[0]
    _no_temporaries(run_dir / "checkpoints")
    assert not (run_dir / "final.json").exists()
    saved = load_checkpoint(last)  # the previous checkpoint, whole
    assert saved["progress"]["step"] == failed_at - 1
    assert all(torch.isfinite(t).all() for t in saved["model"].values())
    assert not (run_dir / "summary.csv").exists()  # no epoch finished before the failure (5 steps an epoch)
    caplog.set_level("INFO", logger="neat_vision.engine")
    taken = _count_steps(monkeypatch)
    resumed = run(_args(tmp_path, name, "--resume", "auto", "--checkpoint-interval", "1"))
    assert _resumed_from(caplog) == [failed_at - 1] and taken == list(range(failed_at, 11))  # 10 steps in all
    whole = run(_args(tmp_path, f"{name}-whole", "--checkpoint-interval", "1"))
    assert _stable(resumed) == _stable(whole)
    assert [r["train_loss"] for r in _rows(run_dir)] == [r["train_loss"] for r in _rows(tmp_path / f"{name}-whole")]


def _argv(tmp_path: Path, name: str) -> list[str]:
    """train.py's command line for the tiny run of ``test_train_e2e`` with a checkpoint after every step."""
    return tiny_argv(tmp_path, name, checkpoint_interval=1)


def test_full_disk_during_a_checkpoint_exits_2_keeps_the_last_one_and_resumes(tmp_path, capsys, caplog, monkeypatch):
    """torch.save fails like on a full disk at the checkpoint of step 3: exit 2, one line, step 2's file kept."""

    def full(state, path):
        def short_write(obj, f, *args, **kwargs):
            Path(f).write_bytes(b"PK\x03\x04 partial")
            raise RuntimeError(TORCH_SHORT_WRITE)

        monkeypatch.setattr(torch, "save", short_write)

    save = _failing_save_at(3, full)
    monkeypatch.setattr(loop_module, "save_checkpoint", save)
    with pytest.raises(SystemExit) as info:
        main(_argv(tmp_path, "full"))
    assert info.value.code == 2
    assert save.calls == [1, 2, 3]  # training did not go past the checkpoint it failed to write
    monkeypatch.undo()
    _check_stopped_and_resume(tmp_path, "full", capsys, caplog, monkeypatch, failed_at=3)


@contextlib.contextmanager
def _tmpfs(folder: Path, size: str) -> Iterator[Path]:
    folder.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
        )
    except OSError:
        mounted = None
    if mounted is None or mounted.returncode != 0:
        pytest.skip("mount -t tmpfs is not available here (needs root on Linux)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path) -> Path:
    """Write ``folder/filler`` until the file system is full."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):  # a MiB at a time, then the last pages and bytes
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * size)
    return filler


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0, reason="needs root on Linux")
def test_a_really_full_file_system_during_a_checkpoint(tmp_path: Path, capsys, caplog, monkeypatch) -> None:
    """The real thing: a tmpfs filled up just before the checkpoint of step 3 (torch's own short-write error)."""
    with _tmpfs(tmp_path / "disk", "64m") as disk:
        filled = []
        save = _failing_save_at(3, lambda state, path: filled.append(_fill(disk)))
        monkeypatch.setattr(loop_module, "save_checkpoint", save)
        with pytest.raises(SystemExit) as info:
            main(_argv(disk, "real"))
        assert info.value.code == 2 and save.calls == [1, 2, 3]
        monkeypatch.undo()
        filled[0].unlink()
        _check_stopped_and_resume(disk, "real", capsys, caplog, monkeypatch, failed_at=3)


def test_a_full_disk_under_tensorboard_is_one_line_naming_its_event_file(tmp_path: Path, capsys, monkeypatch) -> None:
    """TensorBoard writes in a thread and raises a bare OSError at the next scalar and again at close: the run
    stops with one line naming the event file (not a traceback, not close's error), and resumes."""
    from torch.utils.tensorboard import SummaryWriter

    add_scalar, close = SummaryWriter.add_scalar, SummaryWriter.close
    full = OSError(errno.ENOSPC, "No space left on device")

    def scalar(self, tag, value, step=None, *args, **kwargs):
        if step is not None and step >= 4:
            raise full
        return add_scalar(self, tag, value, step, *args, **kwargs)

    def failing_close(self):
        close(self)
        raise OSError(errno.ENOSPC, "No space left on device (at close)")

    monkeypatch.setattr(SummaryWriter, "add_scalar", scalar)
    monkeypatch.setattr(SummaryWriter, "close", failing_close)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(_argv(tmp_path, "tb"))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {tmp_path / 'tb' / 'tb'}/events.out.tfevents.")
    assert "no space left on the device" in err[0] and "it may end cut short" in err[0] and "(at close)" not in err[0]
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "tb" / "checkpoints" / "last.pth")["progress"]["step"] == 3
    final = run(_args(tmp_path, "tb", "--resume", "auto", "--checkpoint-interval", "1"))
    assert final["steps"] == 10
