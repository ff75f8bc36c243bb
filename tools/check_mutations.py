"""Show that the suite can fail: break the package on purpose, one mutation at a time, and run the tests that
guard that behaviour against the broken copy. Every mutation must make at least one of its tests fail.

    python tools/check_mutations.py            # all mutations (about 10 minutes on 2 cores)
    python tools/check_mutations.py --only resume_auto_wrong_file coverage_ignores_update

Each mutation edits a copy of the working tree (tracked and untracked files; this checkout is not touched),
and the copy's tests run with ``PYTHONPATH`` set to it, so subprocesses (train.py, torchrun workers) import the
broken package too. A mutation whose text is not found is reported as stale: the code moved, update the table.
Exit status 0 when every mutation was caught.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str  # the defect it plants
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest arguments: the tests that must catch it


MUTATIONS = (
    Mutation(
        "resume_auto_wrong_file",
        "--resume auto looks for the wrong file, so a run silently starts over",
        "neat_vision/engine/vision.py",
        'last = run_dir / "checkpoints" / "last.pth"\n    if args.resume == "auto":\n        return last if',
        'last = run_dir / "checkpoints" / "last.pth"\n    if args.resume == "auto":\n        return None if',
        ("tests/test_train_e2e.py", "tests/test_resume_kill.py"),
    ),
    Mutation(
        "resume_restores_nothing",
        "TrainLoop.resume validates the checkpoint, then restores nothing (every runner starts over)",
        "neat_vision/engine/loop.py",
        "        path, state, progress = self.task.restore()\n",
        "        path, state, progress = self.task.restore()\n        return\n",
        ("tests/test_loop.py", "tests/test_resume_kill.py", "tests/test_nlp_runners.py", "-k", "resume"),
    ),
    Mutation(
        "vision_restore_skips_weights",
        "the vision checkpoint restores the progress but not the weights and optimizer",
        "neat_vision/engine/vision.py",
        '        load_model_state(self.model, ckpt["model"])\n'
        '        self.optimizer.load_state_dict(ckpt["optimizer"])\n',
        "",
        ("tests/test_train_e2e.py", "tests/test_resume_kill.py", "-k", "resume"),
    ),
    Mutation(
        "coverage_ignores_update",
        "the adapted linear layer ignores its update at inference",
        "neat_vision/layers.py",
        "        if self.merged or self.disabled:\n            return F.linear(x, self.weight, self.bias)\n"
        "        dropouts",
        "        if self.merged or self.disabled or not self.training:\n"
        "            return F.linear(x, self.weight, self.bias)\n        dropouts",
        ("tests/test_coverage.py",),
    ),
    Mutation(
        "adapters_never_train",
        "the update is detached: adapters get no gradient and never train (bf16 compat rows)",
        "neat_vision/layers.py",
        "            left, right = self._stack(factors)\n",
        "            left, right = (t.detach() for t in self._stack(factors))\n",
        ("tests/test_compat.py", "-k", "bf16 and (eager or ddp) and vit"),
    ),
    Mutation(
        "worker_import_error",
        "a distributed worker meets an ImportError other than deepspeed's (a broken install)",
        "neat_vision/batching.py",
        "def batch_tweakers(",
        "import neat_vision_missing_dependency  # noqa\n\n\ndef batch_tweakers(",
        ("tests/test_compat.py", "-k", "ddp-vit-neat2_relu"),
    ),
    Mutation(
        "readme_refusal_gone",
        "load_adapter accepts other base weights (the README's 'refused' example refuses nothing)",
        "neat_vision/adapter_files.py",
        "            if problems:\n                raise AdapterMismatchError(",
        "            if problems and False:\n                raise AdapterMismatchError(",
        ("tests/test_readme.py",),
    ),
    Mutation(
        "compile_drops_update",
        "under torch.compile the adapted layer runs the frozen weight only",
        "neat_vision/layers.py",
        "        if self.merged or self.disabled:\n            return F.linear(x, self.weight, self.bias)\n"
        "        dropouts",
        "        if self.merged or self.disabled or torch.compiler.is_compiling():\n"
        "            return F.linear(x, self.weight, self.bias)\n        dropouts",
        ("tests/test_core.py", "-k", "compile"),
    ),
)


def copy_tree(dest: Path) -> None:
    """The working tree's tracked and untracked (not ignored) files, as they are now."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        rel = Path(raw.decode())
        src = ROOT / rel
        if src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.readlink(src), dest / rel)
        elif src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run(mutation: Mutation, base: Path) -> tuple[str, str]:
    """Apply ``mutation`` to a copy of ``base`` and run its tests; return (verdict, pytest's summary line)."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutation.name}-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(base, copy, symlinks=True)
        target = copy / mutation.file
        text = target.read_text()
        if text.count(mutation.old) != 1:
            return "STALE", f"{mutation.file}: the text to mutate occurs {text.count(mutation.old)} times"
        target.write_text(text.replace(mutation.old, mutation.new))
        env = {**os.environ, "PYTHONPATH": str(copy)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutation.tests]
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        summary = lines[-1] if lines else proc.stderr.strip().splitlines()[-1:]
        failed = re.search(r"\b\d+ (failed|error)", str(summary)) is not None
        return ("CAUGHT" if failed else "MISSED"), str(summary)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[m.name for m in MUTATIONS], help="run these mutations only")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    missed = 0
    with tempfile.TemporaryDirectory(prefix="mutants-base-") as tmp:
        base = Path(tmp) / "repo"
        base.mkdir()
        copy_tree(base)
        for m in chosen:
            start = time.monotonic()
            verdict, summary = run(m, base)
            missed += verdict != "CAUGHT"
            print(f"{verdict:6} {m.name:28} {time.monotonic() - start:5.0f} s  {' '.join(m.tests)}", flush=True)
            print(f"       {m.what}\n       pytest: {summary}", flush=True)
    print(f"{len(chosen) - missed} of {len(chosen)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
