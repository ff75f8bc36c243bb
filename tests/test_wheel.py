"""An installed wheel runs: its console scripts, and the configs it ships, named instead of given as paths.

The slow test builds the wheel from a copy of this checkout, installs it into a fresh virtual environment outside
the repository (torch, timm, ... come from this interpreter's site-packages, nothing is downloaded) and runs
``neat-train --config demo`` there from an empty folder, then every console script's ``--help``.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from neat_vision.engine.args import load_config
from neat_vision.engine.options import ConfigFileError, find_config, packaged_configs

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {  # console script -> its function (pyproject.toml [project.scripts])
    "neat-train": "neat_vision.engine:main",
    "neat-study": "neat_vision.studies.study:main",
    "neat-compare": "neat_vision.studies.compare:main",
    "neat-benchmark": "neat_vision.studies.benchmark:main",
    "neat-predict": "neat_vision.tools.predict:cli",
    "neat-evaluate": "neat_vision.tools.evaluate:cli",
    "neat-export": "neat_vision.tools.export:cli",
    "neat-convert": "neat_vision.integrations.peft:cli",
    "neat-glue": "neat_vision.nlp.glue:main",
    "neat-instruct": "neat_vision.nlp.instruct:main",
}
# what the wheel is built from (setuptools reads these; README.md is the long description)
SOURCES = ("pyproject.toml", "setup.cfg", "README.md", "neat_vision", "configs")


def test_every_runner_has_its_console_script():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.scripts]\n", 1)[1].split("\n\n", 1)[0]
    assert section.splitlines() == [f'{name} = "{target}"' for name, target in SCRIPTS.items()]


def test_a_config_is_named_or_given_as_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = packaged_configs().resolve()
    assert shipped == (ROOT / "configs").resolve()  # in a checkout: the link to the top-level configs/
    assert find_config("demo") == shipped / "demo.yaml"
    assert find_config("glue/cola_neat_l") == find_config("glue/cola_neat_l.yaml") == shipped / "glue/cola_neat_l.yaml"
    assert find_config("configs/studies/depth.yaml") == shipped / "studies/depth.yaml"  # a checkout's path, anywhere
    (tmp_path / "demo.yaml").write_text("epochs: 2\n")
    assert find_config("demo.yaml") == Path("demo.yaml")  # a file that exists wins
    assert load_config("demo.yaml") == {"epochs": 2} and load_config("demo")["model"] == "vit_tiny6_patch4_32.fractal"


def test_base_inside_a_shipped_config_is_relative_to_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values = load_config("compare/dtd_neat")  # base: ../dtd.yaml, whose base is base.yaml
    assert (values["dataset"], values["method"], values["neat_rank"], values["epochs"]) == ("dtd", "neat", 7, 10)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("demoo", r"config file demoo not found: no such file, and no config .*; did you mean demo\?"),
        ("cola_neat_l", r"did you mean glue/cola_neat_l, "),
        ("configs/studies/deph.yaml", r"did you mean studies/depth, "),
        ("/nowhere/demo.yaml", r"^config file /nowhere/demo.yaml not found$"),
        ("../demo", r"config file ../demo not found"),  # names stay inside the shipped folder
    ],
)
def test_neither_a_file_nor_a_shipped_config(tmp_path, monkeypatch, name, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigFileError, match=expected):
        find_config(name)


def _source_copy(dest: Path) -> Path:
    dest.mkdir()
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(src, dest / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    return dest


def _venv(path: Path) -> Path:
    """A fresh virtual environment that sees this interpreter's packages (a venv's too: CI runs in one)."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)], check=True)
    python = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if sys.prefix != sys.base_prefix:  # --system-site-packages reaches the base interpreter's, not this venv's
        lines = [f"import site; site.addsitedir({p!r})" for p in site.getsitepackages()]
        (Path(purelib) / "_parent_env.pth").write_text("\n".join(lines) + "\n")
    return python


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.wheel
def test_the_wheel_installs_and_trains_the_demo_by_name(tmp_path):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the wheel without build isolation needs setuptools (the test extra has it)")
    src = _source_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)]
    built = subprocess.run(build, cwd=src, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = dist.glob("neat_vision-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert {f"neat_vision/{p}" for p in shipped} <= names  # every config, as files
    assert "neat_vision/weights/vit_tiny6_patch4_32_fractal.safetensors" in names
    assert all(f"{script} = {target}" in entry_points for script, target in SCRIPTS.items())

    python = _venv(tmp_path / "venv")
    bin_dir = python.parent
    install = [str(python), "-m", "pip", "install", "--no-deps", "--force-reinstall", "--no-index", "-q", str(wheel)]
    installed = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]

    work = tmp_path / "work"  # no checkout here: the names below can only be the wheel's configs
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    # which neat_vision the environment imports (found, not run: no torch import for this)
    where = [str(python), "-c", "import importlib.util; print(importlib.util.find_spec('neat_vision').origin)"]
    package = Path(_run(where, work, env).stdout.strip()).resolve().parent
    assert package.is_relative_to((tmp_path / "venv").resolve()), package  # the wheel's copy, not the checkout
    configs = package / "configs"
    assert not configs.is_symlink() and (configs / "demo.yaml").is_file() and (configs / "studies/depth.yaml").is_file()
    train = [
        str(bin_dir / "neat-train"), "--config", "demo", "--epochs", "1", "--limit-train-batches", "3",
        "--limit-eval-batches", "2", "--workers", "0", "--device", "cpu", "--no-tb", "--log-interval", "1",
        "--output", str(work / "runs"), "--experiment", "demo",
    ]  # fmt: skip
    study = [str(bin_dir / "neat-study"), "--config", "studies/demo_depth", "--output", str(work / "out"), "--dry-run"]
    commands = {
        "train": train,
        "study": study,  # a shipped study, its runs checked by this engine, their command this installation's
        **{script: [str(bin_dir / script), "--help"] for script in SCRIPTS},
    }
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        futures = {name: pool.submit(_run, cmd, work, env) for name, cmd in commands.items()}
        done = {name: future.result() for name, future in futures.items()}
    for name, result in done.items():
        assert result.returncode == 0, f"{name}: {result.stdout[-3000:]}{result.stderr[-3000:]}"

    final = json.loads((work / "runs" / "demo" / "final.json").read_text())
    assert (final["epochs"], final["steps"], final["model"]) == (1, 3, "vit_tiny6_patch4_32.fractal")
    assert 0 <= final["test_top1"] <= 100
    assert "test top-1" in done["train"].stdout
    assert "demo_depth.yaml: 15 runs, 0 finished, 15 to run" in done["study"].stdout
    assert done["study"].stdout.count(f"{python} -m neat_vision.engine --config ") == 15
    for script in SCRIPTS:
        assert done[script].stdout.startswith(f"usage: {script} "), f"{script}: {done[script].stdout[:200]}"
