"""Files written whole or not at all: `atomic_write` (a temporary file moved into place) and its clean-up.

A write the file system refuses (full disk, quota, read-only, no permission; torch's and safetensors' own
errors for a short write included) raises `DiskWriteError` naming the file and the free space, and leaves
neither the temporary file nor a partial file under the final name: the previous file stays as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import traceback
from collections.abc import Callable
from pathlib import Path

__all__ = ["DiskWriteError", "atomic_write", "atomic_write_text", "disk_write_error", "remove_stale_temporaries"]

# temporary files of atomic_write: ".<name>.<8 random characters>.tmp" next to the target
_TEMPORARY = re.compile(r"^\..+\.[0-9a-z_]{8}\.tmp$")


class DiskWriteError(OSError):
    """A file could not be written: the disk is full, a quota is reached, or the file system refuses the write.

    An ``OSError`` (a user's problem: the runners exit 2 with its one-line message, which names the file and
    the free space there); ``errno`` is the underlying error number when known, ``filename`` the file.
    """

    def __init__(self, message: str, path: Path | str, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = code
        self.filename = str(path)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple:  # picklable (a DataLoader worker or another rank may raise it)
        return type(self), (self.message, self.filename, self.errno)


# the errors of a refused write, and what to say about each
_REFUSED = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "the file is too large for the file system",
    errno.EIO: "an input/output error",
}
# how torch.save (its C++ zip writer) and safetensors (Rust) report a failed or short write: not as OSError
_SHORT_WRITE = re.compile(
    r"unexpected pos|file write failed|iostream error|PytorchStreamWriter failed|StorageFull|No space left|"
    r"Quota exceeded|Read-only file system|os error (28|122|30|13|5)\b",
    re.I,
)
_CODE_IN_TEXT = {
    "no space left": errno.ENOSPC,
    "storagefull": errno.ENOSPC,
    "os error 28": errno.ENOSPC,
    "quota": errno.EDQUOT,
    "read-only": errno.EROFS,
    "os error 30": errno.EROFS,
    "os error 13": errno.EACCES,
    "os error 5": errno.EIO,
}


def _free_space(path: Path) -> str:
    """``"<free> free on <folder>"`` for the nearest existing folder of ``path`` (``shutil.disk_usage``)."""
    folder = next((p for p in (path.parent, *path.parents) if p.exists()), path.parent)
    try:
        free = float(shutil.disk_usage(folder).free)
    except OSError:
        return f"free space unknown on {folder}"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    while free >= 1024 and len(units) > 1:
        free, units = free / 1024, units[1:]
    amount = f"{free:.0f} B" if units[0] == "B" else f"{free:.1f} {units[0]}"
    return f"{amount} free on {folder}"


def _is_refused(err: BaseException) -> bool:
    """``err`` is a refused or short write (see `disk_write_error`)."""
    if isinstance(err, OSError):
        return isinstance(err, DiskWriteError) or err.errno in _REFUSED
    return isinstance(err, Exception) and _SHORT_WRITE.search(str(err)) is not None


def disk_write_error(err: BaseException, path: Path | str, atomic: bool = True) -> DiskWriteError | None:
    """``err`` as a `DiskWriteError` for ``path`` when it is a refused or short write, else ``None``.

    Recognised: an ``OSError`` whose ``errno`` is ENOSPC, EDQUOT, EROFS, EACCES, EPERM, EFBIG or EIO, and
    torch's or safetensors' error for a write that failed or came out short (a ``RuntimeError`` and a
    ``SafetensorError`` that say so). ``atomic``: the file was being written by `atomic_write` (so an earlier
    version is unchanged); otherwise it was appended to in place and may end in a cut-short record.
    """
    if isinstance(err, DiskWriteError):
        return err
    if not _is_refused(err):
        return None
    path = Path(path)
    code: int | None
    if isinstance(err, OSError):
        code = err.errno
    else:
        text = str(err).lower()
        code = next((c for key, c in _CODE_IN_TEXT.items() if key in text), errno.ENOSPC)
    why = _REFUSED.get(code, "the write failed")
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        advice = "free some space (or choose another output folder) and run again"
    else:
        advice = "choose a writable output folder and run again"
    kept = "the earlier file of that name, if any, is unchanged" if atomic else "it may end cut short"
    return DiskWriteError(
        f"cannot write {path}: {why} ({_free_space(path)}); {kept}; {advice}",
        path,
        code,
    )


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_name)`` for a temporary file next to ``path``, then move it onto ``path``.

    The file gets the ordinary mode of new files (``0o666`` less the umask), like files written directly.
    A refused or short write (full disk, quota, read-only, no permission) raises `DiskWriteError`; the
    temporary file is removed and ``path`` keeps its earlier contents (or stays absent).
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
            try:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                break
            except FileExistsError:
                continue
        mode = os.stat(tmp).st_mode & 0o777  # the umask applied: what a plain open() would have given
        write(tmp)
        os.chmod(tmp, mode)  # writers that replace the file (safetensors) create it 0600
        os.replace(tmp, path)
    except BaseException as err:
        refused = _is_refused(err)
        if refused:
            # a writer still open in the tracebacks' frames (torch's zip writer) holds the temporary file's space
            seen: BaseException | None = err
            cleared: set[int] = set()
            while seen is not None and id(seen) not in cleared:
                cleared.add(id(seen))
                traceback.clear_frames(seen.__traceback__)
                seen = seen.__context__
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if refused and not isinstance(err, DiskWriteError):
            raise disk_write_error(err, path) from err  # after the clean-up: it reports the free space left
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    """`atomic_write` of a text file (``newline=""``: the text is written as given)."""
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, newline=""))


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files an interrupted `atomic_write` left in ``folder``; return them."""
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if _TEMPORARY.match(p.name) and p.is_file()]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale
