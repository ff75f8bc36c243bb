"""Files written whole or not at all: `atomic_write` (a temporary file moved into place) and its clean-up."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

# temporary files of atomic_write: ".<name>.<8 random characters>.tmp" next to the target
_TEMPORARY = re.compile(r"^\..+\.[0-9a-z_]{8}\.tmp$")


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_name)`` for a temporary file next to ``path``, then move it onto ``path``.

    The file gets the ordinary mode of new files (``0o666`` less the umask), like files written directly.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    mode = os.stat(tmp).st_mode & 0o777  # the umask applied: what a plain open() would have given
    try:
        write(tmp)
        os.chmod(tmp, mode)  # writers that replace the file (safetensors) create it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files an interrupted `atomic_write` left in ``folder``; return them."""
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if _TEMPORARY.match(p.name) and p.is_file()]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale
