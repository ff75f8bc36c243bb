"""The README's Python examples run as written, and print what their comments say.

Every ``print(...)`` line of a block must run (a ``print`` in an ``except`` branch proves the refusal it shows);
where the line ends in a ``# comment``, what it printed must appear in that comment (``print(n)  # 4096`` or
``# 2 x 2048 = 4096``), so a README value that drifts from the code fails here.
"""

import re
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def print_lines(block: str) -> dict[int, str | None]:
    """Line number -> the ``# comment`` (or ``None``) of each line of ``block`` that calls ``print``."""
    out = {}
    for number, line in enumerate(block.splitlines(), start=1):
        code, _, comment = line.partition("  # ")
        if re.match(r"\s*print\(", code):
            out[number] = comment.strip() or None
    return out


def shown(printed: str, comment: str) -> bool:
    """``printed`` occurs in ``comment`` as a whole value (not inside a longer number or word)."""
    return re.search(rf"(?<![\w.]){re.escape(printed)}(?![\w.])", comment) is not None


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = f"README.md[python block {index}]"
    printed: dict[int, list[str]] = {}

    def recording_print(*args, sep=" ", end="\n", file=None, flush=False):
        frame = sys._getframe(1)
        if frame.f_code.co_filename == name and file is None:
            printed.setdefault(frame.f_lineno, []).append(sep.join(map(str, args)))
        print(*args, sep=sep, end=end, file=file, flush=flush)

    exec(compile(BLOCKS[index], name, "exec"), {"__name__": "__readme__", "print": recording_print})
    for number, comment in print_lines(BLOCKS[index]).items():
        assert number in printed, f"{name} line {number} never printed (a branch the README shows did not run)"
        if comment is not None:
            for text in printed[number]:
                assert shown(text, comment), f"{name} line {number} printed {text!r}; the README says: # {comment}"


def test_the_output_check_catches_a_drifted_value():
    assert shown("4096", "2 layers x 2 x (2 x 8 x 64) = 4096 tweaker parameters")
    assert shown("['pw']", "['pw']: the 1x1 convs of the blocks")
    assert shown("258048 7690", "258048 7690")
    assert not shown("4097", "= 4096 tweaker parameters") and not shown("409", "= 4096")
    assert print_lines('x = 1\nprint(x)  # 1\n  print("a")\n') == {2: "1", 3: None}
