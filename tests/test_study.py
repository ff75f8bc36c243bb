"""The study runner end to end with a stand-in training script (locally and through submitit), its validation."""

import csv
import os
import shutil
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

from neat_vision.studies import study as study_module
from neat_vision.studies.runs import PARAMETERS, SLURM_SET, default_command
from neat_vision.studies.study import StudyError, load_study, main, run_study, slots, write_point_config

REPO = Path(__file__).resolve().parents[1]

# honours neat-train's study interface: --config (with base: chains), --output, --experiment, --resume auto
FAKE_TRAIN = textwrap.dedent(
    """
    import argparse, json, os, sys, time
    from pathlib import Path
    import yaml

    def read(path):
        data = yaml.safe_load(path.read_text()) or {}
        base = data.pop("base", None)
        return {**read(path.parent / base), **data} if base else data

    p = argparse.ArgumentParser()
    for opt in ("--config", "--output", "--experiment", "--resume"):
        p.add_argument(opt)
    args = p.parse_args()
    cfg = read(Path(args.config))
    run = Path(args.output) / args.experiment
    with open(Path(args.output) / "invocations.txt", "a") as f:
        f.write(f"{args.experiment} {os.environ.get('CUDA_VISIBLE_DEVICES', '-') or 'none'}\\n")
    if (run / "final.json").exists():
        sys.exit(0)
    run.mkdir(parents=True, exist_ok=True)
    resumed = (run / "partial").exists()
    if os.environ.get("FAKE_CRASH") == args.experiment and not resumed:
        (run / "partial").write_text("interrupted")
        sys.exit(3)
    if os.environ.get("FAKE_HOLD") == args.experiment:  # hold the folder's lock as neat-train does, until released
        import fcntl
        lock = open(run / ".neat.lock", "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        (run / "pids.tmp").write_text(f"{os.getpid()} {os.getppid()}")
        os.replace(run / "pids.tmp", run / "pids")
        while not (run / "release").exists():
            time.sleep(0.1)
    if os.environ.get("FAKE_WAIT") == args.experiment and not resumed:  # wait to be preempted
        (run / "partial").write_text("interrupted")
        (run / "pids.tmp").write_text(f"{os.getpid()} {os.getppid()}")
        os.replace(run / "pids.tmp", run / "pids")
        time.sleep(60)
        sys.exit(4)
    acc = 50 + 3 * cfg["neat_depth"] + (5 if cfg["neat_act"] == "sin" else 0) + cfg["seed"] + 1000 * cfg["lr_neat"]
    final = dict(val_top1=acc - 1, best_val_top1=acc, test_top1=acc - 2, trainable_params=100 * cfg["neat_rank"],
                 neat_params=90 * cfg["neat_rank"], wall_time_s=1.5, resumed=resumed)
    (run / "final.json").write_text(json.dumps(final))
    """
)


def write_study(tmp_path, **changes):
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    (tmp_path / "configs").mkdir(exist_ok=True)
    (tmp_path / "configs" / "base.yaml").write_text("neat_rank: 3\nneat_act: relu\nlr_neat: 0.005\n")
    study = dict(
        base_config="base.yaml",
        overrides=dict(neat_rank=2),
        grid=dict(neat_depth=[2, 4], neat_act=["relu", {"neat_act": "sin", "lr_neat": 0.001}]),
        seeds=[0, 1],
        output=str(tmp_path / "out"),
        train_command=[sys.executable, str(tmp_path / "fake_train.py")],
    )
    study.update(changes)
    path = tmp_path / "configs" / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def invocations(tmp_path):
    file = tmp_path / "out" / "invocations.txt"
    return file.read_text().split("\n")[:-1] if file.exists() else []


def test_study_end_to_end_resumes_and_skips(tmp_path, monkeypatch, capsys):
    path = write_study(tmp_path)
    crash = "neat_depth=4__neat_act=sin__seed=1"
    monkeypatch.setenv("FAKE_CRASH", crash)
    assert main(["--config", str(path)]) == 1  # one run interrupted, the other seven finished
    out = capsys.readouterr().out
    assert "8 runs, 0 finished, 8 to run one after another" in out and "ETA" in out and f"{crash} FAILED" in out
    assert len(invocations(tmp_path)) == 8

    monkeypatch.delenv("FAKE_CRASH")
    assert main(["--config", str(path)]) == 0
    assert "8 runs, 7 finished, 1 to run" in capsys.readouterr().out
    assert invocations(tmp_path)[8:] == [f"{crash} -"]  # only the interrupted run, which resumed
    out_dir = tmp_path / "out"
    assert yaml.safe_load((out_dir / crash / "final.json").read_text())["resumed"] is True

    rows = list(csv.DictReader(open(out_dir / "results.csv")))
    assert len(rows) == 8
    assert list(rows[0])[:5] == ["run", "neat_depth", "neat_act", "lr_neat", "seed"]
    by_run = {r["run"]: r for r in rows}
    sin4 = by_run["neat_depth=4__neat_act=sin__seed=0"]
    assert (sin4["lr_neat"], sin4["trainable_params"], sin4["best_val_top1"]) == ("0.001", "200", "68.0")
    assert by_run["neat_depth=2__neat_act=relu__seed=1"]["lr_neat"] == ""  # the base config's value

    table = (out_dir / "results.md").read_text()
    assert "| neat_depth | neat_act | seeds | trainable params | best val top-1 | test top-1 | time |" in table
    assert "| 4 | sin | 2 | 200 | 68.50 ± 0.71 | 66.50 ± 0.71 | 0m02s |" in table
    for axis in ("neat_depth", "neat_act"):
        assert (out_dir / f"plot_{axis}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = [d for d in (out_dir / "tb_hparams").iterdir() if d.is_dir()]
    assert len(runs) == 8 and all(any(f.name.startswith("events.out") for f in d.iterdir()) for d in runs)

    assert main(["--config", str(path)]) == 0  # everything finished: nothing runs
    assert "8 runs, 8 finished, 0 to run" in capsys.readouterr().out
    assert len(invocations(tmp_path)) == 9
    (out_dir / "results.md").unlink()
    assert main(["--config", str(path), "--report-only"]) == 0
    assert "| 2 | relu | 2 | 200 |" in capsys.readouterr().out and (out_dir / "results.md").is_file()


@pytest.mark.parametrize(
    "visible, devices, where, describe",
    [
        (["0", "1"], {"0", "1"}, "on GPU 0", "to run on GPUs 0, 1 ->"),
        (["2", "3"], {"2", "3"}, "on GPU 0 (CUDA_VISIBLE_DEVICES=2)", "to run on GPUs 0, 1 ->"),  # the study's mask
        ([], {"none"}, "in slot 0 (CPU)", "to run in 2 CPU slot(s) (GPU id(s) 0, 1: no CUDA GPU) ->"),
        (["0"], {"0", "none"}, "in slot 1 (CPU)", "on GPUs 0 and in 1 CPU slot(s) (GPU id(s) 1: this process sees"),
    ],
    ids=["gpus", "masked", "no-cuda", "fewer-gpus"],
)
def test_runs_spread_over_gpus(tmp_path, capsys, monkeypatch, visible, devices, where, describe):
    """Each slot says where its runs are: on a GPU (CUDA_VISIBLE_DEVICES names it) or on the CPU (it names none)."""
    monkeypatch.setattr(study_module, "visible_gpus", lambda: visible)
    path = write_study(tmp_path, gpus=[0, 1], grid=dict(neat_depth=[2, 4, 6], neat_act=["relu"]))
    assert main(["--config", str(path)]) == 0
    seen = [line.split()[1] for line in invocations(tmp_path)]
    assert len(seen) == 6 and set(seen) == devices
    out = capsys.readouterr().out
    assert f"{where}\n" in out and describe in out
    assert len(list(csv.DictReader(open(tmp_path / "out" / "results.csv")))) == 6


def test_slots_follow_the_visible_gpus(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert study_module.visible_gpus() == ["5", "7"]
    assert [(s.gpu, s.visible, s.where()) for s in slots([1, 1, 2])] == [
        (1, "7", " on GPU 1 (CUDA_VISIBLE_DEVICES=7)"),
        (1, "7", " on GPU 1 (CUDA_VISIBLE_DEVICES=7)"),
        (2, "", " in slot 2 (CPU)"),
    ]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert study_module.visible_gpus() == ["0", "1"] and slots(None)[0].where() == ""


def test_point_configs_inherit_the_base(tmp_path):
    study = load_study(write_study(tmp_path), output=str(tmp_path / "elsewhere"))
    points = study.points()
    assert [p.name for p in points][:3] == [
        "neat_depth=2__neat_act=relu__seed=0",
        "neat_depth=2__neat_act=relu__seed=1",
        "neat_depth=2__neat_act=sin__seed=0",
    ]
    config = write_point_config(study, points[-1])
    data = yaml.safe_load(config.read_text())
    assert (config.parent / data.pop("base")).resolve() == tmp_path / "configs" / "base.yaml"
    assert data == dict(neat_rank=2, neat_depth=4, neat_act="sin", lr_neat=0.001, seed=1)


def test_base_config_template_and_axis(tmp_path):
    grid = dict(base_config=["a/cars.yaml", "a/pets.yaml"], neat_act=["relu", "sin"])
    study = load_study(write_study(tmp_path, base_config=None, grid=grid))
    assert [(p.labels["base_config"], p.base.name) for p in study.points()][::4] == [("cars", "cars.yaml")] * 1 + [
        ("pets", "pets.yaml")
    ]
    grid = dict(dataset=["cars", "pets"], neat_act=["relu", "sin"])
    study = load_study(write_study(tmp_path, base_config="{neat_act}/{dataset}.yaml", grid=grid))
    bases = [p.base.relative_to(tmp_path / "configs").as_posix() for p in study.points()[::2]]
    assert bases == ["relu/cars.yaml", "sin/cars.yaml", "relu/pets.yaml", "sin/pets.yaml"]
    assert "base_config" not in study.run_options(study.points()[0])
    with pytest.raises(StudyError, match=r"base_config='\{model\}.yaml' names an option this point does not set"):
        load_study(write_study(tmp_path, base_config="{model}.yaml")).points()


def test_dry_run_runs_nothing(tmp_path, capsys):
    assert main(["--config", str(write_study(tmp_path)), "--dry-run"]) == 0
    assert capsys.readouterr().out.count("--experiment neat_depth=") == 8 and not invocations(tmp_path)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(sweep={}), r"unknown study key\(s\) \['sweep'\]: allowed keys are base_config, overrides"),
        (dict(overrides=dict(seed=3)), r"study overrides.seed=3 is not allowed: options other than seed"),
        (dict(grid=dict(neat_depth=[])), r"study grid.neat_depth=\[\] is not allowed: a non-empty list"),
        (dict(grid=dict(a=["x", {"a": "x", "lr_neat": 1}])), r"two grid points are both named 'a=x'"),
        (dict(seeds=[0, "1"]), r"study seeds=\[0, '1'\] is not allowed: an integer or a non-empty list"),
        (dict(gpus="all"), r"study gpus='all' is not allowed: a list of device ids"),
        (dict(base_config=3), r"study file.base_config=3 is not allowed: a path to a training config"),
        (dict(base_config=None), r"has no base_config"),
        (dict(executor="ray"), r"study executor='ray' is not allowed: local \(this process runs them.*; slurm \("),
        (dict(slurm=dict(partiton="gpu")), r"unknown slurm key\(s\) \['partiton'\]: allowed keys are timeout_min,"),
        (dict(slurm=dict(timeout_min="2h")), r"study slurm.timeout_min='2h' is not allowed: the time limit of one run"),
        (dict(slurm=dict(mem_gb=0)), r"study slurm.mem_gb=0 is not allowed: memory per run in GB, a number > 0"),
        (dict(executor="slurm"), r"study slurm.timeout_min=None is not allowed: required with executor slurm"),
        (dict(executor="submitit-local", gpus=[0]), r"study gpus=\[0\] is not allowed: only with executor local"),
        (
            dict(slurm=dict(parameters=dict(slurm_partition="gpu"))),
            r"study slurm.parameters.slurm_partition='gpu' is not allowed: set by the study: use slurm.partition",
        ),
        (dict(slurm=dict(parameters=dict(nodes=2))), r"study slurm.parameters.nodes=2 is not allowed: one process per"),
    ],
)
def test_study_errors_name_key_value_allowed(tmp_path, changes, match):
    with pytest.raises(StudyError, match=match):
        load_study(write_study(tmp_path, **changes)).points()


def test_shipped_study_configs_load():
    files = sorted((REPO / "configs" / "studies").glob("*.yaml"))
    assert {f.stem for f in files} >= {"depth", "activation", "targets", "rank", "demo_depth", "demo_activation"}
    for file in files:
        study = load_study(file, train_command="true")
        points = study.points()
        assert points and all(p.options.get("base_config", study.overrides.get("base_config")) for p in points)


def test_a_shipped_study_is_named_from_anywhere(tmp_path, monkeypatch):
    """``neat-study --config studies/depth`` in any folder: the packaged file, its base_config beside it."""
    monkeypatch.chdir(tmp_path)
    study = load_study("studies/depth")
    assert study.file == (REPO / "configs" / "studies" / "depth.yaml").resolve()
    assert study.points()[0].base == (REPO / "configs" / "stanford_cars.yaml").resolve()
    assert study.train_command == default_command() == (sys.executable, "-m", "neat_vision.engine")
    with pytest.raises(StudyError, match=r"study file depth not found: .*; did you mean studies/depth\?"):
        load_study("depth")


def test_the_slurm_tables_are_one():
    assert all(SLURM_SET[name] == key for key, name in PARAMETERS.items())
    assert SLURM_SET["slurm_time"] == "timeout_min" and SLURM_SET["slurm_gpus_per_node"] == "gpus_per_node"


@pytest.fixture(scope="module")
def real_engine_study(tmp_path_factory):
    """LoRA and FourierFT through the default command (python -m neat_vision.engine) on the digits data (tiny ViT,
    two steps), run by the local runner."""
    tmp_path = tmp_path_factory.mktemp("real_engine")
    base = dict(
        model="vit_tiny_patch16_224",
        pretrained=False,
        model_kwargs=dict(img_size=32, patch_size=8, depth=2),
        dataset="digits",
        img_size=32,
        epochs=1,
        batch_size=32,
        workers=0,
        limit_train_batches=2,
        limit_eval_batches=1,
    )
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    study = dict(
        base_config="base.yaml",
        overrides=dict(lora_rank=2, fourier_n=40),
        grid=dict(method=["lora", "fourierft"]),
        output=str(tmp_path / "out"),
        slurm=dict(timeout_min=10),
    )
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    assert main(["--config", str(tmp_path / "study.yaml")]) == 0
    return tmp_path


def _results(folder):
    """results.csv without the wall-clock column."""
    return [
        {k: v for k, v in row.items() if k != "wall_time_s"} for row in csv.DictReader(open(folder / "results.csv"))
    ]


def test_study_with_the_real_engine(real_engine_study, capsys):
    tmp_path = real_engine_study
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "out" / "results.csv"))}
    assert rows["lora"]["trainable_params"] == str(2 * 2 * 2 * (192 + 192) + 192 * 10 + 10)
    assert rows["fourierft"]["trainable_params"] == str(2 * 2 * 40 + 192 * 10 + 10)
    assert all(0 <= float(r["test_top1"]) <= 100 for r in rows.values())
    assert (tmp_path / "out" / "plot_method.png").is_file() and (
        tmp_path / "out" / "method=lora__seed=0" / "tb"
    ).is_dir()
    capsys.readouterr()
    assert main(["--config", str(tmp_path / "study.yaml")]) == 0
    assert "2 runs, 2 finished, 0 to run" in capsys.readouterr().out


def test_real_engine_study_through_submitit_matches_the_local_runner(real_engine_study, capsys):
    """The same study file as submitit jobs (its local executor) next to a finished run: skip it, train the other."""
    pytest.importorskip("submitit")
    tmp_path = real_engine_study
    shutil.copytree(tmp_path / "out" / "method=fourierft__seed=0", tmp_path / "cluster" / "method=fourierft__seed=0")
    cluster = ["--config", str(tmp_path / "study.yaml"), "--executor", "submitit-local", "--output"]
    assert main([*cluster, str(tmp_path / "cluster")]) == 0
    out = capsys.readouterr().out
    assert "2 runs, 1 finished, 1 to run as submitit local jobs" in out and "submitted 1 job(s)" in out
    assert _results(tmp_path / "cluster") == _results(tmp_path / "out")


def _runs_of(folder):
    file = folder / "invocations.txt"
    return [line.split()[0] for line in file.read_text().splitlines()] if file.exists() else []


def test_submitit_local_skips_resumes_and_matches_the_local_runner(tmp_path, monkeypatch, capsys):
    """The cluster path (submitit's local executor standing in for Slurm) on the same study file."""
    pytest.importorskip("submitit")
    path = write_study(tmp_path, seeds=[0], slurm=dict(timeout_min=10, parameters=dict(slurm_account="lab")))
    cluster = ["--config", str(path), "--executor", "submitit-local"]
    crash = "neat_depth=4__neat_act=sin__seed=0"
    monkeypatch.setenv("FAKE_CRASH", crash)
    assert main(cluster) == 1
    out = capsys.readouterr().out
    assert "4 runs, 0 finished, 4 to run as submitit local jobs (all at once)" in out and "submitted 4 job(s)" in out
    assert f"{crash} FAILED (exit code 3)" in out and "ETA" in out
    assert len(_runs_of(tmp_path / "out")) == 4

    monkeypatch.delenv("FAKE_CRASH")
    assert main(cluster) == 0
    out = capsys.readouterr().out
    assert "4 runs, 3 finished, 1 to run" in out and "submitted 1 job(s)" in out
    assert _runs_of(tmp_path / "out")[4:] == [crash]  # only the interrupted run, which resumed
    assert yaml.safe_load((tmp_path / "out" / crash / "final.json").read_text())["resumed"] is True
    log = (tmp_path / "out" / "logs" / f"{crash}.log").read_text().splitlines()
    assert [line.split("--experiment ")[1] for line in log if line.startswith("$ ")] == [f"{crash} --resume auto"] * 2

    assert main(cluster) == 0  # everything finished: nothing is submitted
    out = capsys.readouterr().out
    assert "4 runs, 4 finished, 0 to run" in out and "submitted" not in out and len(_runs_of(tmp_path / "out")) == 5

    assert main(["--config", str(path), "--output", str(tmp_path / "local")]) == 0  # the embedded runner
    for name in ("results.csv", "results.md"):
        assert (tmp_path / "out" / name).read_text() == (tmp_path / "local" / name).read_text()


def test_submitit_requeues_a_preempted_run(tmp_path, monkeypatch):
    """submitit's preemption signal: the job requeues itself, the run is stopped and resumes in the new attempt."""
    pytest.importorskip("submitit")
    path = write_study(tmp_path, grid=dict(neat_depth=[2], neat_act=["relu"]), seeds=[0], slurm=dict(timeout_min=60))
    name = "neat_depth=2__neat_act=relu__seed=0"
    monkeypatch.setenv("FAKE_WAIT", name)
    pids = tmp_path / "out" / name / "pids"

    def preempt():
        deadline = time.monotonic() + 60
        while not pids.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(int(pids.read_text().split()[1]), signal.SIGUSR2)  # to the job process, as Slurm signals it

    thread = threading.Thread(target=preempt)
    thread.start()
    assert main(["--config", str(path), "--executor", "submitit-local"]) == 0
    thread.join()
    assert _runs_of(tmp_path / "out") == [name, name]
    assert yaml.safe_load((tmp_path / "out" / name / "final.json").read_text())["resumed"] is True
    with pytest.raises(ProcessLookupError):  # the interrupted attempt's run was stopped, not left running
        os.kill(int(pids.read_text().split()[0]), 0)
    logs = "".join(f.read_text() for f in (tmp_path / "out" / "submitit").rglob("*.err"))
    assert "Caught signal SIGUSR2" in logs and "this job is preempted" in logs


def test_sigterm_to_a_submitit_study_leaves_its_jobs_running_and_a_rerun_waits_for_them(tmp_path, monkeypatch, capsys):
    """The jobs belong to the scheduler: SIGTERM to the study ends its wait (exit 4) without cancelling them;
    a rerun does not submit the still-running point again but waits for it and collects its result."""
    pytest.importorskip("submitit")
    path = write_study(tmp_path, grid=dict(neat_depth=[2], neat_act=["relu"]), seeds=[0], slurm=dict(timeout_min=60))
    name = "neat_depth=2__neat_act=relu__seed=0"
    run_dir = tmp_path / "out" / name
    monkeypatch.setenv("FAKE_HOLD", name)  # the run locks its folder, writes its pids and waits for "release"

    def sigterm():
        deadline = time.monotonic() + 60
        while not (run_dir / "pids").is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    thread = threading.Thread(target=sigterm, daemon=True)
    thread.start()
    try:
        begun = time.monotonic()
        assert main(["--config", str(path), "--executor", "submitit-local"]) == 4
        assert time.monotonic() - begun < 50
        thread.join(timeout=10)
        out, err = capsys.readouterr()
        assert "received SIGTERM: 1 job(s) left running" in out
        assert "stopped by SIGTERM: 1 job(s) left running" in err
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the study's handler is gone
        run_pid = int((run_dir / "pids").read_text().split()[0])
        os.kill(run_pid, 0)  # not cancelled: the run still runs

        threading.Timer(2.0, lambda: (run_dir / "release").write_text("go")).start()
        assert main(["--config", str(path), "--executor", "submitit-local"]) == 0
        out = capsys.readouterr().out
        assert f"1 still running from an earlier submission, waited for: {name}" in out
        assert "submitted" not in out  # not started a second time
        assert (tmp_path / "out" / "invocations.txt").read_text().split() == [name, "none"]
        assert "1/1 " + name + " done" in out and (tmp_path / "out" / "results.csv").is_file()
    finally:
        (run_dir / "release").write_text("go")


def test_submitit_options_are_checked_before_anything_runs(tmp_path, capsys):
    pytest.importorskip("submitit")
    slurm = dict(timeout_min=10, parameters=dict(slurm_partitoin="gpu"))
    path = write_study(tmp_path, executor="submitit-local", slurm=slurm)
    with pytest.raises(SystemExit):
        main(["--config", str(path)])
    err = capsys.readouterr().err
    assert "study slurm.parameters.slurm_partitoin='gpu' is not allowed: Unknown argument 'partitoin'" in err
    assert "Valid arguments: " in err and "partition" in err
    assert not invocations(tmp_path) and not (tmp_path / "out" / "logs").exists()
    path = write_study(tmp_path, slurm=dict(timeout_min=10))
    if shutil.which("srun") is None:
        with pytest.raises(StudyError, match=r"executor='slurm' cannot start here: Could not detect \"srun\""):
            run_study(load_study(path, executor="slurm"))
    assert main(["--config", str(path), "--executor", "submitit-local", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 to run as submitit local jobs" in out and out.count("--experiment neat_depth=") == 8
    assert not invocations(tmp_path) and not (tmp_path / "out" / "logs").exists()


def test_compare_takes_the_executor_too(tmp_path, capsys):
    pytest.importorskip("submitit")
    from neat_vision.studies import compare

    study = yaml.safe_load(write_study(tmp_path).read_text())
    methods = dict(neat=dict(method="neat", neat_depth=2, neat_act="relu", lr=[0.001, 0.002]))
    config = dict(title="fake", base_config=str(tmp_path / "configs" / "base.yaml"), methods=methods)
    config.update(seeds=[0], output=study["output"], train_command=study["train_command"], slurm=dict(timeout_min=10))
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        compare.main(["--config", str(path), "--executor", "ray"])
    assert "study executor='ray' is not allowed" in capsys.readouterr().err
    report = ["--config", str(path), "--executor", "submitit-local", "--output", str(tmp_path / "report")]
    assert compare.main(report) == 0
    assert "submitted 2 job(s)" in capsys.readouterr().out and len(_runs_of(tmp_path / "out")) == 2
    text = (tmp_path / "report" / "compare.md").read_text()
    assert "| neat | 270 | 300 | 0.002 (edge) | 57.00 | 56.00 ± 0.00 | 1 |" in text  # best rate at the grid's end


class _Dropping:
    """A finalizer that gets a real SIGINT while it runs: Python calls the SIGINT handler inside ``__del__`` and
    drops its KeyboardInterrupt ("Exception ignored in ..."), as it does when Ctrl-C comes during a garbage
    collection."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs here at the latest


@pytest.mark.parametrize("how", ["signal", "dropped"])
@pytest.mark.parametrize("executor", ["local", "submitit-local"])
def test_ctrl_c_in_the_wait_loop_stops_the_runs(tmp_path, monkeypatch, capsys, request, executor, how):
    """Ctrl-C while the study waits: its runs are stopped (submitit-local: jobs cancelled), it raises
    KeyboardInterrupt; a Ctrl-C whose KeyboardInterrupt Python dropped (raised in a finalizer) is not lost."""
    if executor != "local":
        pytest.importorskip("submitit")
        from neat_vision.studies import slurm
    # Ctrl-C reaches a process whose SIGINT is Python's default handler; a shell's background job (`cmd &` without
    # job control, as in a nohup'd CI script) starts with SIGINT ignored, where no Ctrl-C can reach a study at all
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    path = write_study(tmp_path, grid=dict(neat_depth=[2], neat_act=["relu"]), seeds=[0], slurm=dict(timeout_min=60))
    name = "neat_depth=2__neat_act=relu__seed=0"
    monkeypatch.setenv("FAKE_WAIT", name)  # the run writes its pids, then sleeps 60 s
    pids = tmp_path / "out" / name / "pids"
    waiting = threading.Event()  # set at a turn of the study's wait loop once the run has started
    dropped = []

    class Turns(study_module.CtrlC):
        def check(self):
            if pids.is_file():
                waiting.set()
                if how == "dropped" and not dropped:
                    dropped.append(self)
                    _Dropping()  # freed at once: its __del__ gets the SIGINT
                    assert self.pressed  # the handler ran, its KeyboardInterrupt was dropped
            super().check()

    monkeypatch.setattr(study_module, "CtrlC", Turns)
    if executor != "local":
        monkeypatch.setattr(slurm, "CtrlC", Turns)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    def ctrl_c():  # a real SIGINT to the main thread, only once the study waits for the started run
        if how == "signal" and waiting.wait(timeout=120):
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    thread = threading.Thread(target=ctrl_c, daemon=True)
    thread.start()
    begun = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        main(["--config", str(path), "--executor", executor])
    took = time.monotonic() - begun
    thread.join(timeout=10)
    assert waiting.is_set(), "the run never started, or the study never waited for it"
    assert took < 50, f"the study took {took:.0f} s: it waited for the run instead of stopping it"
    out = capsys.readouterr().out
    assert "interrupted: cancelled 1 job(s)" in out if executor != "local" else "interrupted: stopped 1 run(s)" in out
    if how == "dropped":
        assert [type(u.exc_value) for u in unraisable] == [KeyboardInterrupt]  # Python did drop it
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the study's handler is gone
    run, parent = map(int, pids.read_text().split())
    if executor == "local":
        assert parent == os.getpid()  # the study's own child
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # stopping the job stops its run
        try:
            os.kill(run, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the run (pid {run}) still runs after the study was interrupted")
    assert not (tmp_path / "out" / name / "final.json").exists()


def test_a_grid_over_timm_recipe_flags_is_checked_by_the_engine(tmp_path, capsys):
    """Any train.py flag can be a study axis, the timm recipe flags too; a bad value fails before anything runs."""
    base = dict(model="vit_tiny_patch16_224", pretrained=False, dataset="digits", batch_size=8)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    grid = dict(sched=["cosine", "linear"], mixup=[0.0, 0.8], model_ema=[False, True])
    study = dict(base_config="base.yaml", grid=grid, output=str(tmp_path / "out"))
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    assert main(["--config", str(tmp_path / "study.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 runs, 0 finished, 8 to run" in out and out.count("--experiment") == 8
    study["grid"] = dict(sched=["cosine", "cosin"])
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    with pytest.raises(SystemExit) as info:
        main(["--config", str(tmp_path / "study.yaml"), "--dry-run"])
    assert info.value.code == 2 and "cosin" in capsys.readouterr().err
