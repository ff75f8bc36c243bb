"""``run(args)``: train.py's run: train, validate every epoch, test at the end, checkpoint and resume, export.

`VisionTask` is what the one training loop (`neat_vision.engine.loop.TrainLoop`) trains: a timm model on an
image dataset, cross-entropy, AMP (bf16 autocast, fp16 with a GradScaler), DDP averaging the gradients of a
window of ``grad_accum`` micro-batches (the last window of an epoch may be shorter). Data order and
augmentation are functions of ``(seed, epoch, sample)`` (``neat_vision.data.EpochSampler``), and checkpoints
hold every RNG state and the position in the epoch, so a run stopped anywhere and resumed ends with the
metrics of an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import pickle
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError
from timm.utils import random_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from neat_vision.adapter import delta_norms, trainable_summary
from neat_vision.atomic import DiskWriteError, disk_write_error, remove_stale_temporaries
from neat_vision.engine.args import resolved_config
from neat_vision.engine.checkpoint import (
    atomic_write,
    check_resumable,
    load_checkpoint,
    load_model_state,
    model_state,
)
from neat_vision.engine.data import build_datasets, build_loaders, data_config
from neat_vision.engine.distributed import DistEnv, broadcast_object, setup_distributed
from neat_vision.engine.ema import TrainableEma
from neat_vision.engine.loop import EpochEnd, LoopSettings, Progress, TrainLoop
from neat_vision.engine.metrics import evaluate
from neat_vision.engine.model import (
    build_adapter,
    build_model,
    check_layers_reached,
    export_trained,
    record_label_names,
)
from neat_vision.engine.optim import build_optimizer
from neat_vision.engine.plan import Plan, dry_run, log_plan, make_plan
from neat_vision.engine.progress import format_seconds
from neat_vision.engine.regularization import batch_seed, build_mixup, build_train_loss, seeded_batch
from neat_vision.engine.schedule import PaperSchedule, TimmSchedule, build_scheduler
from neat_vision.errors import Diverged, ResumeError, one_line
from neat_vision.run_lock import shared_folder_lock

__all__ = ["NonFiniteLossError", "VisionTask", "run"]

logger = logging.getLogger("neat_vision.engine")

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

NonFiniteLossError = Diverged  # the name train.py's loop used


def _autocast(args: argparse.Namespace, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if args.amp == "none":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=AMP_DTYPES[args.amp])


def _run_dir(args: argparse.Namespace, env: DistEnv) -> Path:
    if args.experiment is not None:
        return Path(args.output) / args.experiment
    if args.resume == "auto":
        raise ValueError("resume='auto' needs --experiment NAME: the run folder under --output to continue")
    if args.resume is not None and Path(args.resume).parent.name == "checkpoints":
        return Path(args.resume).parent.parent
    name = None
    if env.is_main:
        stem = f"{args.dataset}-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}"
        name, k = stem, 1
        while (Path(args.output) / name).exists():
            name, k = f"{stem}-{k}", k + 1
    return Path(args.output) / broadcast_object(name, env)


def _check_writable(folder: Path, option: str) -> None:
    """Fail before any work when ``folder`` cannot be created or written (a file in the way, no permission)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise NotADirectoryError(
            f"{option}={str(folder)!r}: {existing} is a file, not a folder; choose another {option}"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{option}={str(folder)!r}: {existing} is not writable; choose another {option}")


def _build_base(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """``build_model``, with what the user can fix (model kwargs, a weights file, no hub access) said in one line."""
    try:
        return build_model(args, num_classes)
    except (TypeError, AssertionError) as err:  # timm checks its constructor arguments with asserts
        raise ValueError(f"model_kwargs={args.model_kwargs!r} are not accepted by {args.model}: {err}") from err
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError, EOFError, KeyError, SafetensorError) as err:
        if isinstance(err, FileNotFoundError) and args.pretrained_file is not None:
            raise
        if args.pretrained_file is not None:
            raise ValueError(
                f"pretrained_file={args.pretrained_file!r} cannot be loaded into {args.model}: {one_line(err)[:300]}"
            ) from err
        if args.pretrained:
            raise ValueError(
                f"the pretrained weights of {args.model} cannot be loaded ({one_line(err)[:300]}); pass "
                "--pretrained-file FILE (a local copy) or --no-pretrained"
            ) from err
        raise


def _checkpoint_to_resume(args: argparse.Namespace, run_dir: Path) -> Path | None:
    last = run_dir / "checkpoints" / "last.pth"
    if args.resume == "auto":
        return last if last.is_file() else None
    if args.resume is not None:
        return Path(args.resume)
    if last.is_file() or (run_dir / "final.json").is_file():
        raise FileExistsError(
            f"run folder {run_dir} already holds a run: pass --resume auto to continue it (or return its "
            "results), or choose another --experiment"
        )
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train as ``args`` says and return the final metrics (also written to ``final.json``).

    ``--dry-run`` returns the plan instead; a run stopped by ``--stop-after-steps`` returns
    ``{"stopped_at_step", "output_dir"}``.
    """
    if args.dry_run:
        return dry_run(args)
    _check_writable(Path(args.output), "output")
    env = setup_distributed(args.device)
    try:
        run_dir = _run_dir(args, env)
        _check_writable(run_dir, "experiment")
        with shared_folder_lock(run_dir, "run", env.is_main, lambda obj: broadcast_object(obj, env)):
            final_file = run_dir / "final.json"
            if args.resume == "auto" and final_file.is_file():
                logger.info("%s is finished; its results: %s", run_dir, final_file)
                return json.loads(final_file.read_text())
            task, loop = VisionTask.build(args, env, run_dir)
            return _train(task, loop)
    finally:
        env.close()


def _train(task: VisionTask, loop: TrainLoop) -> dict[str, Any]:
    """Run ``loop`` and finish the run; a full disk or refused write anywhere is one `DiskWriteError`.

    Files go through `atomic_write` (its `DiskWriteError` names them); TensorBoard writes its event file in a
    thread and raises a bare ``OSError`` at the next scalar, flush or close, named here as that event file.
    Closing TensorBoard after a failure never hides that failure.
    """
    events = _tensorboard_file(loop)
    try:
        if loop.run():
            result = {"stopped_at_step": loop.progress.global_step, "output_dir": str(task.run_dir)}
        else:
            result = task.finish(loop)
    except BaseException as err:
        events = _tensorboard_file(loop) or events
        with contextlib.suppress(Exception):  # TensorBoard failing to close (a full disk) must not hide `err`
            loop.close()
        refused = _refused_write(err, task.run_dir, events)
        if refused is not None:
            raise refused from err
        raise
    events = _tensorboard_file(loop) or events
    try:
        loop.close()
    except OSError as err:
        refused = _refused_write(err, task.run_dir, events)
        if refused is not None:
            raise refused from err
        raise
    return result


def _tensorboard_file(loop: TrainLoop) -> Path | None:
    """The event file ``loop`` writes TensorBoard to (``None``: none open; its folder when unknown)."""
    writer = loop.writer
    if writer is None:
        return None
    name = getattr(getattr(getattr(writer, "file_writer", None), "event_writer", None), "_file_name", None)
    return Path(name) if name else Path(writer.get_logdir())


def _refused_write(err: BaseException, run_dir: Path, events: Path | None = None) -> DiskWriteError | None:
    """A full disk or refused write that did not come through `atomic_write` (TensorBoard's event file).

    TensorBoard re-raises its writer thread's ``OSError`` (without a file name): it is named as ``events`` when
    known, else as the run folder.
    """
    if not isinstance(err, OSError) or isinstance(err, DiskWriteError):
        return None
    return disk_write_error(err, Path(err.filename) if err.filename else (events or run_dir), atomic=False)


@dataclass
class VisionTask:
    """Everything a run holds; ``build`` makes it and its loop (resumed when asked); the rest is the `Task`."""

    args: argparse.Namespace
    env: DistEnv
    run_dir: Path
    model: nn.Module
    net: nn.Module
    loaders: dict[str, DataLoader]
    plan: Plan
    optimizer: Optimizer
    scheduler: PaperSchedule | TimmSchedule
    scaler: torch.amp.GradScaler | None
    autocast: Callable[[], contextlib.AbstractContextManager]
    resume_from: Path | None = None
    last_val: dict[str, float] = field(default_factory=dict)  # the last validation (eval_every may skip epochs)
    ema: TrainableEma | None = None
    last_live_val: dict[str, float] = field(default_factory=dict)  # with an EMA: the live model's last validation
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    mixup: Any = None  # timm Mixup
    show_batch: bool = False  # the first augmented batch still to be shown (TensorBoard images, --save-images)
    writer: Any = None  # the loop's TensorBoard writer, once it is open

    @classmethod
    def build(cls, args: argparse.Namespace, env: DistEnv, run_dir: Path) -> tuple[VisionTask, TrainLoop]:
        """Data, model, optimizer, schedule, and the loop (restored from a checkpoint when resuming)."""
        started = time.perf_counter()
        resume_from = _checkpoint_to_resume(args, run_dir)
        device = env.device
        datasets = build_datasets(args, env)
        num_classes = datasets["train"].num_classes
        if args.num_classes is not None and args.num_classes != num_classes:
            raise ValueError(f"num_classes={args.num_classes} but dataset {args.dataset!r} has {num_classes} classes")
        random_seed(args.seed, 0)  # identical initialisation on every rank
        model = build_adapter(_build_base(args, num_classes), args).to(device)
        record_label_names(model, getattr(datasets["train"], "classes", None))
        config = data_config(args, model)
        check_layers_reached(model, config["input_size"], device)
        loaders = build_loaders(args, datasets, config, env)
        plan = make_plan(args, len(loaders["train"]))
        optimizer = build_optimizer(model, args)
        scheduler = build_scheduler(optimizer, plan.warmup_steps, plan.total_steps, args, plan.steps_per_epoch)
        scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        ema = TrainableEma(model, args.model_ema_decay, args.model_ema_warmup) if args.model_ema else None
        random_seed(args.seed, env.rank)
        net: nn.Module = model
        if env.distributed:
            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if args.compile:
            net = torch.compile(net, backend=args.torchcompile or "inductor")
        autocast = _autocast(args, device)
        task = cls(args, env, run_dir, model, net, loaders, plan, optimizer, scheduler, scaler, autocast, resume_from)
        task.ema = ema
        task.loss_fn = build_train_loss(args)
        task.mixup = build_mixup(args, num_classes)
        task.show_batch = resume_from is None and env.is_main and (args.tb or args.save_images)
        checkpoints = run_dir / "checkpoints"
        settings = LoopSettings(
            epochs=args.epochs,
            checkpoint=checkpoints / "last.pth",
            best_checkpoint=checkpoints / "best.pth",
            summary=run_dir / "summary.csv",
            tensorboard=run_dir / "tb" if args.tb else None,
            max_grad_norm=args.clip_grad or 0.0,
            checkpoint_steps=args.checkpoint_interval or 0,
            stop_after_steps=args.stop_after_steps,
            log_interval=args.log_interval,
            # the final protocol validates on data it trains on: nothing to select on, the final epoch counts
            select_metric=None if getattr(args, "split_protocol", None) == "final" else "val_top1",
            unit="img",
            checkpoint_option="checkpoint_interval",
            checkpoint_tensors=("model", "optimizer", "model_ema") if args.model_ema else ("model", "optimizer"),
            resume_option="--resume auto",
            advice=(
                f"Lower lr_neat={args.lr_neat:g} / lr_head={args.lr_head:g}, or set clip_grad (now {args.clip_grad}), "
                "and start a new run (a resumed run keeps the options)"
            ),
        )
        loop = TrainLoop(task, settings, env, started=started)
        task.loop = loop
        if resume_from is not None:
            loop.resume()
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            for folder in (run_dir, checkpoints, run_dir / "adapter"):
                remove_stale_temporaries(folder)
            config = yaml.safe_dump(resolved_config(args), sort_keys=False)
            atomic_write(run_dir / "args.yaml", lambda tmp: Path(tmp).write_text(config))
            sizes = {split: len(ds) for split, ds in datasets.items()}
            log_plan(args, trainable_summary(model), optimizer.param_groups, sizes, plan, env.world_size)
            logger.info("outputs in %s", run_dir)
        return task, loop

    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def epoch_steps(self, epoch: int, start: int) -> Iterator[tuple[int, Iterator[Any]]]:
        """Windows of ``grad_accum`` batches from step ``start``; the done batches are skipped by the sampler.

        Each micro-batch comes with its epoch and its index in the epoch over all ranks (its seed's inputs)."""
        accum, limit = self.args.grad_accum, self.plan.batches_per_epoch
        first = start * accum
        if first >= limit:
            return
        self.loaders["train"].sampler.set_epoch(epoch, start=first * self.args.batch_size)
        batches = iter(self.loaders["train"])
        world, rank = self.env.world_size, self.env.rank
        for window in range(first, limit, accum):
            n = min(accum, limit - window)
            yield n, ((epoch, (window + j) * world + rank, b) for j, b in enumerate(itertools.islice(batches, n)))

    def backward(
        self, micro: tuple[int, int, tuple[torch.Tensor, torch.Tensor]], n_micro: int
    ) -> tuple[torch.Tensor, int]:
        """The training loss of one micro-batch (mixup/cutmix applied); the gradient of the window's mean (DDP
        averages over ranks). Its random draws come from the seed of (run seed, epoch, batch index)."""
        epoch, index, (images, targets) = micro
        args, device = self.args, self.env.device
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with seeded_batch(batch_seed(args.seed, epoch, index), device):
            if self.mixup is not None:
                self.mixup.mixup_enabled = not (args.mixup_off_epoch and epoch >= args.mixup_off_epoch)
                images, targets = self.mixup(images, targets)
            if self.show_batch:
                self._show_batch(images)
            with self.autocast():
                loss = self.loss_fn(self.net(images).float(), targets)
        scaled = loss / n_micro
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss.detach().double() * len(targets), len(targets)

    def after_step(self, step: int) -> None:
        """After optimizer step ``step`` (1-based): update the EMA."""
        if self.ema is not None:
            self.ema.update(step)

    def _show_batch(self, images: torch.Tensor) -> None:
        """The first training batch as augmented (mixup/cutmix included): TensorBoard images, ``--save-images``."""
        self.show_batch = False
        config = data_config(self.args, self.model)
        mean = torch.tensor(config["mean"], device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(config["std"], device=images.device).view(1, 3, 1, 1)
        shown = (images[:16].detach().float() * std + mean).clamp(0, 1).cpu()
        writer = getattr(self.loop, "writer", None)
        if writer is not None:
            writer.add_images("train/augmented_batch", shown, 0)
        if self.args.save_images:
            from torchvision.utils import save_image

            atomic_write(self.run_dir / "train-batch.jpg", lambda tmp: save_image(shown, tmp, nrow=4, format="jpeg"))

    def checkpoint(self, progress: Progress) -> dict[str, Any]:
        """The checkpoint (`neat_vision.engine.checkpoint`), on rank 0."""
        if not self.env.is_main:
            return {}
        batch = min(progress.step_in_epoch * self.args.grad_accum, self.plan.batches_per_epoch)
        return {
            "model": model_state(self.model, full=self.args.save_full),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **({"model_ema": self.ema.state_dict()} if self.ema is not None else {}),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            # the loop's Progress, with train.py's names of the position (``batch``: the next batch of the epoch)
            "progress": asdict(progress)
            | {"step": progress.global_step, "batch": batch, "last_val": self.last_val}
            | ({"last_live_val": self.last_live_val} if self.ema is not None else {}),
            "args": resolved_config(self.args),
        }

    def restore(self) -> tuple[Path, dict[str, Any], Progress]:
        path = self.resume_from
        ckpt = load_checkpoint(path)
        check_resumable(ckpt["args"], self.args)
        if "global_step" not in ckpt["progress"]:
            raise ResumeError(f"resume={str(path)!r} was written by an older train.py: start a new run")
        load_model_state(self.model, ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.ema is not None:
            if "model_ema" not in ckpt:
                raise ResumeError(f"resume={str(path)!r} holds no model EMA: resume it without --model-ema")
            self.ema.load_state_dict(ckpt["model_ema"])
        if self.scaler is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.last_val = dict(ckpt["progress"]["last_val"])
        self.last_live_val = dict(ckpt["progress"].get("last_live_val", {}))
        return path, ckpt, Progress(**{k: ckpt["progress"][k] for k in Progress.__dataclass_fields__})

    def end_epoch(self, end: EpochEnd) -> tuple[dict[str, Any], dict[str, float]]:
        """Validate (every ``eval_every`` epochs and at the last); the summary row, TensorBoard scalars, a log line."""
        args, env = self.args, self.env
        last_step = max(end.step - 1, 0)
        lrs = {f"lr_{g['name']}": lr for g, lr in zip(self.optimizer.param_groups, self.scheduler.lrs_at(last_step))}
        val: dict[str, float] = {}
        live: dict[str, float] = {}
        if end.epoch % args.eval_every == 0 or end.epoch == args.epochs:
            val = self._evaluate("val")
            if self.ema is not None:  # the EMA is the model of record; the live model is reported beside it
                live, val = val, self._evaluate("val", ema=True)
                self.last_live_val = live
            self.last_val = val
        self.scheduler.end_epoch(end.epoch, val.get("top1"))
        row = {
            "epoch": end.epoch,
            "train_loss": end.train_loss,
            "val_loss": val.get("loss"),
            "val_top1": val.get("top1"),
            "val_top5": val.get("top5"),
            **({"live_val_loss": live.get("loss"), "live_val_top1": live.get("top1")} if self.ema is not None else {}),
            **lrs,
            "images_per_s": end.rate,
            "wall_time_s": end.elapsed(),
        }
        scalars: dict[str, float] = {}
        if not env.is_main:
            return row, scalars
        if args.tb:
            scalars = {"train/epoch_loss": end.train_loss, "train/images_per_s": end.rate}
            scalars |= {f"val/{key}": val[key] for key in ("loss", "top1", "top5") if key in val}
            scalars |= {f"val_live/{key}": live[key] for key in ("loss", "top1", "top5") if key in live}
            scalars |= {f"delta_norm/{layer}": norm for layer, norm in delta_norms(self.model).items()}
            if env.device.type == "cuda":
                scalars["memory/peak_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
        logger.info(
            "epoch %d/%d: train loss %.4f | val top-1 %s top-5 %s | %.0f img/s | %s",
            end.epoch,
            args.epochs,
            end.train_loss,
            f"{val['top1']:.2f}%" if val else "-",
            f"{val['top5']:.2f}%" if val else "-",
            end.rate,
            format_seconds(row["wall_time_s"]),
        )
        return row, scalars

    def _evaluate(self, split: str, ema: bool = False) -> dict[str, float]:
        """Top-1/top-5/loss of the live model on ``split``, or of the EMA (put into the model for the pass)."""
        args = self.args
        with self.ema.applied() if ema else contextlib.nullcontext():
            return evaluate(self.model, self.loaders[split], self.env, self.autocast, args.limit_eval_batches)

    def on_best(self, row: dict[str, Any]) -> None:
        """Nothing to do: the loop copies the epoch's checkpoint to ``best.pth``."""

    def after_save(self, progress: Progress) -> None:
        """``--checkpoint-hist N``: keep the checkpoints of the N best validated epochs (``checkpoint-<epoch>.pth``,
        copies of ``last.pth`` written at the epoch's end), as timm's ``CheckpointSaver`` keeps its history."""
        keep = self.args.checkpoint_hist
        if keep < 2 or not self.env.is_main or progress.step_in_epoch or not progress.history:
            return
        folder = self.run_dir / "checkpoints"
        row = progress.history[-1]
        if row.get("val_top1") is None:
            return
        epoch_file = folder / f"checkpoint-{row['epoch']}.pth"
        atomic_write(epoch_file, lambda tmp: shutil.copyfile(folder / "last.pth", tmp))
        scored = [r for r in progress.history if r.get("val_top1") is not None]
        ranked = sorted(scored, key=lambda r: (-r["val_top1"], -r["epoch"]))
        for r in ranked[keep:]:
            (folder / f"checkpoint-{r['epoch']}.pth").unlink(missing_ok=True)

    def finish(self, loop: TrainLoop) -> dict[str, Any]:
        """Test the last-epoch model, export the adapter, write ``final.json`` and TensorBoard hparams."""
        args, env, state, writer = self.args, self.env, loop.progress, loop.writer
        test = self._evaluate("test", ema=self.ema is not None)
        summary = trainable_summary(self.model)
        best = state.best
        final = {
            "val_top1": self.last_val["top1"],
            "val_top5": self.last_val["top5"],
            "val_loss": self.last_val["loss"],
            "best_val_top1": -1.0 if best is None else best["val_top1"],
            "best_epoch": 0 if best is None else best["epoch"],
            "test_top1": test["top1"],
            "test_top5": test["top5"],
            "test_loss": test["loss"],
            "val_samples": self.last_val["count"],
            "test_samples": test["count"],
            "trainable_params": summary["trainable"],
            "neat_params": summary["neat"],
            "head_params": summary["head"],
            "total_params": summary["total"],
            "wall_time_s": loop.elapsed(),
            "epochs": args.epochs,
            "steps": state.global_step,
            "method": args.method,
            "model": args.model,
            "dataset": args.dataset,
            "output_dir": str(self.run_dir),
        }
        if self.ema is not None:  # the EMA is the model of record (its adapter is adapter/); the live one beside it
            live_test = self._evaluate("test")
            final |= {
                "live_val_top1": self.last_live_val.get("top1"),
                "live_test_top1": live_test["top1"],
                "live_test_top5": live_test["top5"],
                "live_test_loss": live_test["loss"],
            }
        if env.device.type == "cuda":
            final["peak_memory_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
        if env.is_main:
            if self.ema is not None:
                export_trained(self.model, args, self.run_dir / "adapter_live")
                with self.ema.applied():
                    export_trained(self.model, args, self.run_dir / "adapter")
            else:
                export_trained(self.model, args, self.run_dir / "adapter")
            if writer is not None:
                writer.add_scalar("test/top1", test["top1"], state.global_step)
                writer.add_scalar("test/top5", test["top5"], state.global_step)
                metrics = {f"hparam/{k}": final[k] for k in ("test_top1", "best_val_top1", "val_top1")}
                writer.add_hparams(_hparams(args, env), metrics, run_name=".")
                writer.flush()  # TensorBoard's write errors surface now, before final.json marks the run finished
            atomic_write(self.run_dir / "final.json", lambda tmp: Path(tmp).write_text(json.dumps(final, indent=2)))
            logger.info(
                "test top-1 %.2f%% (top-5 %.2f%%) | best val top-1 %.2f%% at epoch %d | %s | outputs in %s",
                test["top1"],
                test["top5"],
                final["best_val_top1"],
                final["best_epoch"],
                format_seconds(final["wall_time_s"]),
                self.run_dir,
            )
            if writer is not None:
                logger.info("TensorBoard logs: tensorboard --logdir %s", self.run_dir / "tb")
        env.barrier()
        return final


def _hparams(args: argparse.Namespace, env: DistEnv) -> dict[str, Any]:
    keys = ("method", "model", "dataset", "epochs", "lr_neat", "lr_head", "weight_decay", "amp", "seed")
    out: dict[str, Any] = {k: getattr(args, k) for k in keys}
    if args.method == "neat":
        out |= {"neat_rank": args.neat_rank, "neat_depth": args.neat_depth, "neat_act": args.neat_act}
        out["neat_targets"] = ",".join(args.neat_targets)
    out["batch"] = args.batch_size * args.grad_accum * env.world_size
    out |= {"opt": args.opt, "sched": args.sched}
    for key in ("smoothing", "mixup", "cutmix", "aa", "reprob", "drop_path", "layer_decay"):
        if getattr(args, key):
            out[key] = getattr(args, key)
    if args.model_ema:
        out["model_ema_decay"] = args.model_ema_decay
    return out
