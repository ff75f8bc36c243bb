"""One run per output folder: `folder_lock` holds an OS lock on ``<folder>/.neat.lock`` while a runner or study runs.

The lock is ``fcntl.flock`` on that file: the kernel drops it when its holder exits in any way (``kill -9``
included), so a stale lock file never blocks a resume; only a live holder does. The file names the holder
(pid, host, start time, command) for the one-line refusal of a second process (`FolderInUse`, exit 2); a clean
end removes it. A process may take the lock of a folder it already holds (nested use, e.g. a compare running
its study); forked children (DataLoader workers) do not keep it. On a network file system without ``flock``
support the lock is skipped with a warning. Standard library only.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["LOCK_NAME", "FolderInUse", "folder_lock", "holder_of", "is_locked", "shared_folder_lock"]

LOCK_NAME = ".neat.lock"

logger = logging.getLogger("neat_vision")

# folder (resolved) -> [file descriptor, nesting depth] of the locks this process holds
_HELD: dict[Path, list[int]] = {}


class FolderInUse(RuntimeError):
    """Another live process holds the folder's lock (exit status 2, one line naming the folder and the holder)."""


def _forget_in_child() -> None:
    """A forked child shares the parent's lock: close its copies so the lock dies with the parent alone."""
    for fd, _ in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def holder_of(folder: Path) -> str:
    """What the lock file of ``folder`` says about its holder (``pid N on HOST since TIME``), or ``unknown``."""
    try:
        info = dict(line.split("=", 1) for line in (Path(folder) / LOCK_NAME).read_text().splitlines() if "=" in line)
    except OSError:
        return "an unknown process"
    if "pid" not in info:
        return "an unknown process"
    return f"pid {info['pid']} on {info.get('host', '?')} since {info.get('started', '?')}"


def is_locked(folder: str | Path) -> bool:
    """Whether a live process (this one excluded) holds the lock of ``folder``; a stale lock file is not held.

    The probe takes a shared lock for an instant only when a lock file exists (a holder writes one), so a run
    starting in that instant could be refused (exit 2, nothing lost); callers probe rarely."""
    folder = Path(folder)
    if folder.resolve() in _HELD:
        return False
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        return err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "run") -> Iterator[None]:
    """Hold the lock of ``folder`` (created if absent) for the block; `FolderInUse` at once if another holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _HELD:  # this process holds it already
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderInUse(
                    f"{folder} is in use by another {what} ({holder_of(folder)}; lock file {path}): wait for it to "
                    "end or stop it, or choose another output folder"
                ) from None
            logger.warning("cannot lock %s (%s): not guarding it against a second run", path, err)
            yield
            return
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # locked a file its releasing holder had just removed: take the lock of the new one
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    info = f"pid={os.getpid()}\nhost={socket.gethostname()}\nstarted={started}\ncommand={' '.join(sys.argv)[:500]}\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(path)  # a clean end leaves no lock file (a killed holder's stays, unlocked: harmless)
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def shared_folder_lock(
    folder: str | Path, what: str, is_main: bool, broadcast: Callable[[Any], Any] | None = None
) -> Iterator[None]:
    """`folder_lock` for a torchrun job: rank 0 (``is_main``) holds it, ``broadcast`` (rank 0's object on every
    rank) tells the others whether it got it, so a refused job fails on every rank at once instead of hanging."""
    with contextlib.ExitStack() as stack:
        refused = None
        if is_main:
            try:
                stack.enter_context(folder_lock(folder, what))
            except FolderInUse as err:
                refused = str(err)
        if broadcast is not None:
            refused = broadcast(refused)
        if refused is not None:
            raise FolderInUse(refused)
        yield
