"""``run(args)``: train, validate every epoch, test at the end, checkpoint and resume, export the adapter.

The loop is written out rather than hidden behind callbacks. One optimizer step is ``grad_accum``
micro-batches (the last window of an epoch may be shorter); the LR schedule, logging, checkpoints and the
non-finite-loss check all count optimizer steps. Data order and augmentation are functions of
``(seed, epoch, sample)`` (``neat_vision.data.EpochSampler``), and checkpoints hold every RNG state and the
position in the epoch, so a run stopped anywhere and resumed ends with the metrics of an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import pickle
import time
from collections.abc import Callable
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
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from neat_vision.adapter import delta_norms, remove_stale_temporaries, trainable_summary
from neat_vision.engine.args import resolved_config
from neat_vision.engine.checkpoint import (
    CHECKPOINT_TENSORS,
    CheckpointMismatchError,
    atomic_write,
    check_resumable,
    load_checkpoint,
    load_model_state,
    model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from neat_vision.engine.data import build_datasets, build_loaders, data_config
from neat_vision.engine.distributed import (
    DistEnv,
    all_gather_object,
    all_reduce_sum,
    broadcast_object,
    setup_distributed,
)
from neat_vision.engine.metrics import append_summary, evaluate, truncate_summary
from neat_vision.engine.model import (
    build_adapter,
    build_model,
    check_layers_reached,
    export_trained,
    record_label_names,
)
from neat_vision.engine.optim import build_optimizer, build_scheduler
from neat_vision.engine.plan import Plan, dry_run, log_plan, make_plan
from neat_vision.engine.progress import Progress, format_seconds
from neat_vision.errors import one_line
from neat_vision.finite import checkpoint_nonfinite, nonfinite_flag, nonfinite_names

__all__ = ["NonFiniteLossError", "run"]

logger = logging.getLogger("neat_vision.engine")

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN or infinite (the step was not applied), or the weights did after one."""


@dataclass
class Progression:
    """Where the run is; saved in every checkpoint (``epoch`` and ``batch`` point at the next batch)."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    best_val_top1: float = -1.0
    best_epoch: int = 0
    last_val: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0


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
        final_file = run_dir / "final.json"
        if args.resume == "auto" and final_file.is_file():
            logger.info("%s is finished; its results: %s", run_dir, final_file)
            return json.loads(final_file.read_text())
        trainer = Trainer.build(args, env, run_dir)
        try:
            for _ in range(trainer.state.epoch, args.epochs):
                if trainer.train_epoch():
                    return {"stopped_at_step": trainer.state.step, "output_dir": str(run_dir)}
                trainer.end_epoch()
            return trainer.finish()
        finally:
            if trainer.writer is not None:
                trainer.writer.close()
    finally:
        env.close()


@dataclass
class Trainer:
    """Everything a run holds; ``build`` makes it (resuming when asked), the methods are the loop's parts."""

    args: argparse.Namespace
    env: DistEnv
    run_dir: Path
    model: nn.Module
    net: nn.Module
    loaders: dict[str, DataLoader]
    plan: Plan
    optimizer: Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler | None
    autocast: Callable[[], contextlib.AbstractContextManager]
    state: Progression
    writer: SummaryWriter | None
    started: float = field(default_factory=time.perf_counter)
    saved_step: int | None = None
    images_per_s: float = 0.0
    # 1.0 when the last optimizer step left a non-finite trainable tensor; read at the next sync (no extra one)
    weights_flag: torch.Tensor | None = None

    @classmethod
    def build(cls, args: argparse.Namespace, env: DistEnv, run_dir: Path) -> Trainer:
        """Data, model, optimizer, schedule and state (restored from a checkpoint when resuming)."""
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
        scheduler = build_scheduler(optimizer, plan.warmup_steps, plan.total_steps)
        scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
        state = Progression()
        random_seed(args.seed, env.rank)  # training randomness (e.g. dropout) differs per rank
        if resume_from is not None:
            ckpt = load_checkpoint(resume_from)
            check_resumable(ckpt["args"], args)
            load_model_state(model, ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if scaler is not None:
                scaler.load_state_dict(ckpt["scaler"])
            state = Progression(**ckpt["progress"])
            rngs = ckpt["rng"]
            if len(rngs) != env.world_size:
                raise CheckpointMismatchError(
                    f"{resume_from} was written by {len(rngs)} process(es), this run has {env.world_size}: "
                    "resume with the same number of processes (data shards and steps depend on it)"
                )
            set_rng_state(rngs[env.rank])
            logger.info(
                "resumed from %s: epoch %d, batch %d, step %d", resume_from, state.epoch + 1, state.batch, state.step
            )
        net: nn.Module = model
        if env.distributed:
            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if args.compile:
            net = torch.compile(net)
        writer = None
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            for folder in (run_dir, run_dir / "checkpoints", run_dir / "adapter"):
                remove_stale_temporaries(folder)
            (run_dir / "args.yaml").write_text(yaml.safe_dump(resolved_config(args), sort_keys=False))
            truncate_summary(run_dir / "summary.csv", state.epoch)
            if args.tb:
                writer = SummaryWriter(str(run_dir / "tb"), purge_step=state.step if resume_from else None)
            sizes = {split: len(ds) for split, ds in datasets.items()}
            log_plan(args, trainable_summary(model), optimizer.param_groups, sizes, plan, env.world_size)
            logger.info("outputs in %s", run_dir)
        autocast = _autocast(args, device)
        trainer = cls(
            args,
            env,
            run_dir,
            model,
            net,
            loaders,
            plan,
            optimizer,
            scheduler,
            scaler,
            autocast,
            state,
            writer,
            started,
        )
        if resume_from is not None:
            trainer.saved_step = state.step
        return trainer

    def elapsed(self) -> float:
        """Wall time of the run so far, over all its sessions."""
        return self.state.elapsed_s + time.perf_counter() - self.started

    def _check_weights(self) -> None:
        """Stop (on every rank) when the last optimizer step made a trainable tensor non-finite."""
        if self.weights_flag is None:
            return
        bad = all_reduce_sum(self.weights_flag.clone(), self.env).item()
        self.weights_flag = None
        if bad:
            raise self._weights_error()

    def _weights_error(self) -> NonFiniteLossError:
        names = nonfinite_names((n, p) for n, p in self.model.named_parameters() if p.requires_grad)
        which = f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""
        return NonFiniteLossError(
            f"trainable weights{which} became non-finite in optimizer step {self.state.step} (epoch "
            f"{self.state.epoch + 1}); stopped before using or saving them; {self._last_checkpoint_note()}. "
            f"{self._advice()}"
        )

    def _advice(self) -> str:
        args = self.args
        return (
            f"Lower lr_neat={args.lr_neat:g} / lr_head={args.lr_head:g}, or set clip_grad (now {args.clip_grad}), "
            "and start a new run (a resumed run keeps the options)"
        )

    def save(self, best: bool = False) -> None:
        """Checkpoint ``last`` (and ``best``) on rank 0 after checking the weights; every rank gives its RNG state."""
        self._check_weights()
        rngs = all_gather_object(rng_state(), self.env)
        if not self.env.is_main:
            return
        ckpt = {
            "model": model_state(self.model, full=self.args.save_full),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": rngs,
            "progress": asdict(self.state) | {"elapsed_s": self.elapsed()},
            "args": resolved_config(self.args),
        }
        folder = self.run_dir / "checkpoints"
        save_checkpoint(ckpt, folder / "last.pth", copy_to=folder / "best.pth" if best else None)
        self.saved_step = self.state.step

    def _last_checkpoint_note(self) -> str:
        """What is on disk to fall back on, verified: ``last.pth`` is read back and its tensors checked."""
        last = self.run_dir / "checkpoints" / "last.pth"
        if self.saved_step is None:
            return "no checkpoint was written yet (see checkpoint_interval)"
        if not self.env.is_main:
            return f"rank 0 reports on {last}"
        bad = checkpoint_nonfinite(last, CHECKPOINT_TENSORS)
        if bad is None:
            return f"the last checkpoint {last} cannot be read back: do not resume from it"
        if bad:
            return f"the last checkpoint {last} holds non-finite tensors ({', '.join(bad[:3])}): do not resume from it"
        return f"the last good checkpoint {last} (step {self.saved_step}) is intact and verified finite"

    def train_epoch(self) -> bool:
        """Train from ``state.epoch, state.batch`` to the end of that epoch; ``True`` when stopped early."""
        args, env, state, plan = self.args, self.env, self.state, self.plan
        self.loaders["train"].sampler.set_epoch(state.epoch, start=state.batch * args.batch_size)
        self.net.train()
        accum = args.grad_accum
        progress = Progress(
            f"epoch {state.epoch + 1}/{args.epochs}",
            plan.steps_per_epoch,
            math.ceil(state.batch / accum),
            args.log_interval,
            env.is_main,
        )
        # loss sum, samples, non-finite gradients, non-finite weights after the previous step: one all-reduce
        window = torch.zeros(4, dtype=torch.float64, device=env.device)
        logged = [0.0, 0]  # loss sum, samples since the last TensorBoard point
        start, samples_seen = time.perf_counter(), 0
        try:
            for batch, (images, targets) in enumerate(self.loaders["train"], start=state.batch):
                if batch >= plan.batches_per_epoch:
                    break
                window_start = batch - batch % accum
                window_end = min(window_start + accum, plan.batches_per_epoch)
                last_in_window = batch == window_end - 1
                images = images.to(env.device, non_blocking=True)
                targets = targets.to(env.device, non_blocking=True)
                sync = contextlib.nullcontext() if last_in_window or not env.distributed else self.net.no_sync()
                with sync:
                    with self.autocast():
                        loss = F.cross_entropy(self.net(images).float(), targets)
                    scaled = loss / (window_end - window_start)
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                window[0] += loss.detach().double() * len(targets)
                window[1] += len(targets)
                if not last_in_window:
                    continue
                trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
                if self.scaler is not None:
                    # inf gradients are the scaler's business under fp16: it skips that step and lowers its scale
                    self.scaler.unscale_(self.optimizer)
                else:
                    window[2] = nonfinite_flag((p.grad for p in trainable), env.device)
                if self.weights_flag is not None:
                    window[3] = self.weights_flag
                    self.weights_flag = None
                loss_sum, samples, bad_grads, bad_weights = all_reduce_sum(window, env).tolist()
                window.zero_()
                mean_loss = loss_sum / samples
                if bad_weights:
                    raise self._weights_error()
                if not math.isfinite(mean_loss) or bad_grads:
                    self.optimizer.zero_grad(set_to_none=True)
                    what = f"training loss ({mean_loss})" if not math.isfinite(mean_loss) else "gradients"
                    raise NonFiniteLossError(
                        f"non-finite {what} at epoch {state.epoch + 1}, optimizer step {state.step + 1}: "
                        f"stopped before applying it; {self._last_checkpoint_note()}. {self._advice()}"
                    )
                lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
                self._optimizer_step(trainable)
                self.weights_flag = nonfinite_flag(trainable, env.device)
                state.step += 1
                state.batch = batch + 1
                state.loss_sum += loss_sum
                state.loss_count += int(samples)
                samples_seen += int(samples)
                logged = [logged[0] + loss_sum, logged[1] + int(samples)]
                rate = samples_seen / (time.perf_counter() - start)
                info = {"loss": f"{mean_loss:.4f}", "lr": f"{max(lrs.values()):.2e}", "img/s": f"{rate:.0f}"}
                progress.update(math.ceil(state.batch / accum), info)
                if self.writer is not None and state.step % args.log_interval == 0:
                    self.writer.add_scalar("train/loss", logged[0] / logged[1], state.step)
                    for name, lr in lrs.items():
                        self.writer.add_scalar(f"lr/{name}", lr, state.step)
                    logged = [0.0, 0]
                if args.stop_after_steps is not None and state.step >= args.stop_after_steps:
                    self.save()
                    logger.info("stopped after %d steps (stop_after_steps); continue with --resume", state.step)
                    return True
                interval = args.checkpoint_interval
                if interval and state.step % interval == 0 and state.batch < plan.batches_per_epoch:
                    self.save()
        finally:
            progress.close()
        self.images_per_s = samples_seen / max(time.perf_counter() - start, 1e-9)
        return False

    def _optimizer_step(self, trainable: list[nn.Parameter]) -> None:
        """Clip (gradients already unscaled), step, zero the gradients, advance the schedule."""
        if self.args.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(trainable, self.args.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def end_epoch(self) -> None:
        """Validate, record the epoch (summary.csv, TensorBoard, log), checkpoint ``last`` (and ``best``)."""
        self._check_weights()  # before a non-finite model is evaluated and recorded
        args, env, state = self.args, self.env, self.state
        last_step = max(state.step - 1, 0)
        lrs = {
            f"lr_{g['name']}": base * factor(last_step)
            for g, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas)
        }
        train_loss = state.loss_sum / max(state.loss_count, 1)
        state.epoch, state.batch, state.loss_sum, state.loss_count = state.epoch + 1, 0, 0.0, 0
        val: dict[str, float] = {}
        if state.epoch % args.eval_every == 0 or state.epoch == args.epochs:
            val = state.last_val = evaluate(
                self.model, self.loaders["val"], env, self.autocast, args.limit_eval_batches
            )
        improved = bool(val) and val["top1"] > state.best_val_top1
        if improved:
            state.best_val_top1, state.best_epoch = val["top1"], state.epoch
        if env.is_main:
            self._record_epoch(train_loss, val, lrs)
        self.save(best=improved)

    def _record_epoch(self, train_loss: float, val: dict[str, float], lrs: dict[str, float]) -> None:
        state, writer = self.state, self.writer
        row = {
            "epoch": state.epoch,
            "train_loss": train_loss,
            "val_loss": val.get("loss"),
            "val_top1": val.get("top1"),
            "val_top5": val.get("top5"),
            **lrs,
            "images_per_s": self.images_per_s,
            "wall_time_s": self.elapsed(),
        }
        append_summary(self.run_dir / "summary.csv", row)
        if writer is not None:
            writer.add_scalar("train/epoch_loss", train_loss, state.step)
            writer.add_scalar("train/images_per_s", self.images_per_s, state.step)
            for key in ("loss", "top1", "top5"):
                if key in val:
                    writer.add_scalar(f"val/{key}", val[key], state.step)
            for layer, norm in delta_norms(self.model).items():
                writer.add_scalar(f"delta_norm/{layer}", norm, state.step)
            if self.env.device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(self.env.device) / 2**30
                writer.add_scalar("memory/peak_gib", peak, state.step)
        logger.info(
            "epoch %d/%d: train loss %.4f | val top-1 %s top-5 %s | %.0f img/s | %s",
            state.epoch,
            self.args.epochs,
            train_loss,
            f"{val['top1']:.2f}%" if val else "-",
            f"{val['top5']:.2f}%" if val else "-",
            self.images_per_s,
            format_seconds(self.elapsed()),
        )

    def finish(self) -> dict[str, Any]:
        """Test the last-epoch model, export the adapter, write ``final.json`` and TensorBoard hparams."""
        args, env, state = self.args, self.env, self.state
        test = evaluate(self.model, self.loaders["test"], env, self.autocast, args.limit_eval_batches)
        summary = trainable_summary(self.model)
        final = {
            "val_top1": state.last_val["top1"],
            "val_top5": state.last_val["top5"],
            "val_loss": state.last_val["loss"],
            "best_val_top1": state.best_val_top1,
            "best_epoch": state.best_epoch,
            "test_top1": test["top1"],
            "test_top5": test["top5"],
            "test_loss": test["loss"],
            "val_samples": state.last_val["count"],
            "test_samples": test["count"],
            "trainable_params": summary["trainable"],
            "neat_params": summary["neat"],
            "head_params": summary["head"],
            "total_params": summary["total"],
            "wall_time_s": self.elapsed(),
            "epochs": args.epochs,
            "steps": state.step,
            "method": args.method,
            "model": args.model,
            "dataset": args.dataset,
            "output_dir": str(self.run_dir),
        }
        if env.device.type == "cuda":
            final["peak_memory_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
        if env.is_main:
            export_trained(self.model, args, self.run_dir / "adapter")
            if self.writer is not None:
                self.writer.add_scalar("test/top1", test["top1"], state.step)
                self.writer.add_scalar("test/top5", test["top5"], state.step)
                metrics = {f"hparam/{k}": final[k] for k in ("test_top1", "best_val_top1", "val_top1")}
                self.writer.add_hparams(_hparams(args, env), metrics, run_name=".")
            atomic_write(self.run_dir / "final.json", lambda tmp: Path(tmp).write_text(json.dumps(final, indent=2)))
            logger.info(
                "test top-1 %.2f%% (top-5 %.2f%%) | best val top-1 %.2f%% at epoch %d | %s | outputs in %s",
                test["top1"],
                test["top5"],
                state.best_val_top1,
                state.best_epoch,
                format_seconds(final["wall_time_s"]),
                self.run_dir,
            )
            if self.writer is not None:
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
    return out
