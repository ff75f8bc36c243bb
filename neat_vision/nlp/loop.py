"""The training loop of the NLP runners: seeded epochs, accumulation, TensorBoard, atomic checkpoints, exact resume.

Written out rather than delegated to the HF ``Trainer`` so that its guarantees are plain to read and test:

- Batches are a function of ``(seed, epoch)`` and ``checkpoint.pt`` holds the trainable tensors, optimizer,
  scheduler and RNG states and the position (epoch, step, running loss, per-epoch history), so a run
  resumed after a kill continues step for step as the uninterrupted run and ends with the same metrics.
- Checkpoints are written atomically (temporary file, then rename): a kill never leaves a torn one.
- A non-finite loss or gradient stops the run with `Diverged` before the optimizer step, and non-finite
  trainable tensors after a step stop it before they are evaluated or saved (both checks ride on the one host
  sync per step the loop makes anyway); the checkpoint the message calls good is read back and verified.
- Accumulation is exact: micro-batch losses are summed, and the gradient is divided by the number of
  loss terms (examples or answer tokens) of the whole batch, as if it were one forward pass.
- Under torchrun (DDP) every rank takes a contiguous shard of each global batch (``batch_size`` is the
  global batch whatever the number of processes) and accumulates it under ``no_sync``; one all-reduce then
  *sums* the gradients (DDP's averaging is not used, so no division by the world size is to undo) and one
  sums the loss, the loss-term count and the non-finite flags, so every rank takes the same decisions.
  Rank 0 writes the checkpoint (holding every rank's RNG state), TensorBoard, the summary and the adapters.
- With FSDP2 (`distribute(..., fsdp=True)`) the gradients are reduce-scattered as sums by FSDP itself, every
  rank runs the same number of micro-batches (an empty one forwards a real example with weight 0), and the
  checkpoint and adapters hold the gathered full tensors, so their format is that of a DDP or 1-process run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from ..adapter import atomic_write, describe_base, fingerprint, neat_parameters, remove_stale_temporaries, save_adapter
from ..engine.distributed import DistEnv, all_gather_object, all_reduce_sum
from ..errors import one_line
from ..finite import checkpoint_nonfinite, nonfinite_flag, nonfinite_names

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "neat-vision-nlp-checkpoint"


class Diverged(RuntimeError):
    """The loss, the gradients or a trainable tensor became NaN or infinite; the last checkpoint is kept."""


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed with these settings (or there is none, or one is in the way)."""


@dataclass
class LoopSettings:
    """How to step through the data. ``max_grad_norm=0`` and ``checkpoint_steps=0`` turn those off."""

    epochs: int
    batch_size: int
    micro_batch_size: int
    seed: int
    max_grad_norm: float = 0.0
    checkpoint_steps: int = 0
    autocast_dtype: torch.dtype | None = None
    select_metric: str | None = None
    maximize: bool = True


@dataclass
class Progress:
    """Where a run is: position, running loss of the current epoch, one history row per finished epoch."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    epoch_loss: float = 0.0
    epoch_terms: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] | None = None


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled example indices of one epoch, cut into batches (the last may be smaller)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def rank_shard(indices: Sequence[int], env: DistEnv) -> list[int]:
    """This rank's contiguous part of a global batch (sizes differ by at most one; a part may be empty)."""
    n, world = len(indices), env.world_size
    return list(indices[env.rank * n // world : (env.rank + 1) * n // world])


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _full(t: Tensor) -> Tensor:
    """The whole tensor (a collective for a sharded one: every rank must call it, in the same order)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(full: Tensor, param: Tensor) -> Tensor:
    """``full`` sharded as ``param`` is (as is when ``param`` is a plain tensor)."""
    if not isinstance(param, DTensor):
        return full
    return distribute_tensor(full.to(_local(param).device), param.device_mesh, param.placements)


def distribute(model: nn.Module, env: DistEnv, fsdp: bool = False) -> nn.Module:
    """``model`` wrapped in DDP when ``env`` is distributed (the loop syncs gradients itself), else ``model``.

    ``broadcast_buffers=False``: the loop runs every forward under ``no_sync`` and ranks may run different
    numbers of them (an empty shard runs none), so no collective may ride on the forward pass.
    ``fsdp``: shard ``model`` (on the CPU until now) in place with FSDP2 onto ``env.device``, each decoder layer
    (the classes of HF's ``_no_split_modules``) and the root, gradients reduced as sums; returns ``model``.
    """
    if fsdp:
        return _fully_shard(model, env)
    if not env.distributed:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def _fully_shard(model: nn.Module, env: DistEnv) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not env.distributed:
        raise ValueError("--fsdp needs a torchrun job (torchrun --nproc_per_node N -m ...); alone, leave it out")
    classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise ValueError(f"--fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules) to shard")
    # the adapter files describe the base as it is whole; computed once (the base weights are frozen)
    model._neat_unsharded_base = (describe_base(model), fingerprint(model))
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sums, like the DDP path
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return model


def seed_rank(seed: int, env: DistEnv) -> None:
    """Per-rank training randomness (dropout) after an identical initialisation; single-process runs keep theirs."""
    if env.distributed:
        torch.manual_seed(seed * 1_000_003 + env.rank)


def check_output(out: str | Path, resume: bool) -> None:
    """Fail early unless ``out`` holds a checkpoint exactly when resuming (a fresh run never overwrites one)."""
    out = Path(out)
    existing = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise ResumeError(f"--output {out}: {existing} is a file, not a folder; choose another --output")
    path = out / CHECKPOINT
    if resume and not path.is_file():
        raise ResumeError(f"nothing to resume: no {path}")
    if not resume and path.exists():
        raise ResumeError(f"{path} exists: pass --resume to continue it, or choose another output")


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_summary(path: Path, history: Sequence[dict[str, float]]) -> None:
    columns = list(dict.fromkeys(key for row in history for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text.getvalue()))


class TrainLoop:
    """Trains ``model`` for ``settings.epochs`` epochs over ``n_train`` examples and writes to ``out``.

    ``loss_fn(indices) -> (summed loss, number of loss terms)`` runs the forward pass of one micro-batch;
    ``evaluate() -> metrics`` runs after each epoch (``settings.select_metric`` picks the best epoch, whose
    adapter goes to ``out/best``). ``run_config`` is stored in the checkpoint; resuming with another fails.
    ``loss_fn`` gets this rank's shard of each batch and forwards through ``net`` (`distribute`'s wrapper);
    ``evaluate`` must return the same metrics on every rank.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        n_train: int,
        loss_fn: Callable[[list[int]], tuple[Tensor, int]],
        evaluate: Callable[[], dict[str, float]] | None,
        settings: LoopSettings,
        out: str | Path,
        run_config: dict[str, Any],
        env: DistEnv | None = None,
        net: nn.Module | None = None,
    ) -> None:
        self.model = model
        self.env = env or DistEnv(next(model.parameters()).device)
        self.net = net if net is not None else model
        self.fsdp = any(isinstance(q, DTensor) for q in _trainable(model).values())
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.n_train = n_train
        self.loss_fn = loss_fn
        self.evaluate = evaluate
        self.settings = settings
        self.out = Path(out)
        self.run_config = run_config
        self.progress = Progress()
        self.device = _local(next(model.parameters())).device
        self.saved_step: int | None = None
        # 1.0 when the last optimizer step left a non-finite trainable tensor; read at the next host sync
        self._weights_flag: Tensor | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.settings.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _last_checkpoint_note(self) -> str:
        """What is on disk to fall back on, verified: the checkpoint is read back and its tensors checked."""
        if self.saved_step is None:
            return "no checkpoint was written yet (see --checkpoint-steps)"
        if not self.env.is_main:
            return f"rank 0 reports on {self.checkpoint_path}"
        bad = checkpoint_nonfinite(self.checkpoint_path, ("trainable", "optimizer"))
        if bad is None:
            return f"the last checkpoint {self.checkpoint_path} cannot be read back: do not resume from it"
        if bad:
            return f"the last checkpoint {self.checkpoint_path} holds non-finite tensors ({', '.join(bad[:3])})"
        return f"the last good checkpoint {self.checkpoint_path} (step {self.saved_step}) is kept and verified finite"

    def _weights_error(self, names: list[str]) -> Diverged:
        p = self.progress
        which = f" ({', '.join(names[:3])})" if names else ""
        return Diverged(
            f"trainable tensors{which} became non-finite in step {p.global_step} (epoch {p.epoch + 1}); stopped "
            f"before using or saving them; {self._last_checkpoint_note()}. Lower --lr or set --max-grad-norm"
        )

    def _check_weights(self) -> None:
        """Stop when the last optimizer step made a trainable tensor non-finite."""
        flag, self._weights_flag = self._weights_flag, None
        if flag is not None and all_reduce_sum(flag.clone(), self.env).item():
            raise self._weights_error(nonfinite_names({n: _local(q) for n, q in _trainable(self.model).items()}))

    def save_checkpoint(self) -> None:
        """Write the resume state atomically (after checking that the trainable tensors are finite)."""
        self._check_weights()
        rngs = all_gather_object(_rng_state(), self.env)
        self.saved_step = self.progress.global_step
        trainable = {name: _full(p.detach()).cpu() for name, p in _trainable(self.model).items()}
        optimizer = self.optimizer.state_dict()
        if self.fsdp:  # full tensors: the format of a DDP or 1-process run
            optimizer["state"] = {
                i: {k: _full(v).cpu() if isinstance(v, DTensor) else v for k, v in per.items()}
                for i, per in optimizer["state"].items()
            }
        if not self.env.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "run_config": self.run_config,
            "trainable": trainable,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs,  # one per rank
            "progress": asdict(self.progress),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.checkpoint_path, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self) -> None:
        """Restore the state of ``out/checkpoint.pt``; it must come from the same ``run_config``."""
        check_output(self.out, resume=True)
        try:
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 (whatever torch.load meets in a torn file)
            raise ResumeError(
                f"{self.checkpoint_path} cannot be read ({one_line(err)[:200]}); it is damaged: start a new run"
            ) from err
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ResumeError(f"{self.checkpoint_path} is not a {CHECKPOINT_FORMAT} file")
        saved = state["run_config"]
        changed = sorted(k for k in set(saved) | set(self.run_config) if saved.get(k) != self.run_config.get(k))
        if changed:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {self.run_config.get(k)!r}" for k in changed)
            raise ResumeError(f"{self.checkpoint_path} was written with other settings ({detail}); resume with those")
        trainable = _trainable(self.model)
        if set(trainable) != set(state["trainable"]):
            raise ResumeError(f"{self.checkpoint_path} holds other trainable tensors than this model")
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                trainable[name].copy_(_like(tensor, trainable[name]))
        optimizer = state["optimizer"]
        params = [q for group in self.optimizer.param_groups for q in group["params"]]
        for i, per in optimizer["state"].items():
            for k, v in per.items():
                if isinstance(v, Tensor) and v.shape == params[int(i)].shape:
                    per[k] = _like(v, params[int(i)])
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rngs) != self.env.world_size:
            raise ResumeError(
                f"{self.checkpoint_path} was written by {len(rngs)} process(es), this run has "
                f"{self.env.world_size}: resume with the same number (each rank's random state is restored)"
            )
        _set_rng_state(rngs[self.env.rank])
        self.progress = Progress(**state["progress"])
        self.saved_step = self.progress.global_step

    def run(self, resume: bool = False) -> Progress:
        """Train from the start (``out`` must hold no checkpoint) or from ``out/checkpoint.pt``."""
        check_output(self.out, resume)
        self.env.barrier()  # no rank sees rank 0's first checkpoint as one in the way
        if self.env.is_main:
            for folder in (self.out, self.out / "best", self.out / "last"):
                remove_stale_temporaries(folder)
        if resume:
            self.load_checkpoint()
        purge = self.progress.global_step if resume else None
        writer = SummaryWriter(str(self.out / "tb"), purge_step=purge) if self.env.is_main else None
        try:
            while self.progress.epoch < self.settings.epochs:
                self._train_epoch(writer)
                self._end_epoch(writer)
        finally:
            if writer is not None:
                writer.close()
        self._save_adapter("last")
        self.env.barrier()  # the adapters are on disk before any rank goes on to use them
        return self.progress

    def _micro_batches(self, batch: list[int], shard: list[int]) -> list[list[int]]:
        """This rank's micro-batches; under FSDP as many on every rank as on the largest shard (``[]``: filler)."""
        size = self.settings.micro_batch_size
        micro = [shard[i : i + size] for i in range(0, len(shard), size)]
        if self.fsdp:  # FSDP's forward and backward are collectives: every rank runs as many
            largest = math.ceil(len(batch) / self.env.world_size)
            micro += [[]] * (math.ceil(largest / size) - len(micro))
        return micro

    def _save_adapter(self, folder: str) -> None:
        """Rank 0 writes the adapter to ``out/folder`` (the sharded tensors gathered on every rank first)."""
        base = getattr(self.model, "_neat_unsharded_base", None)
        tensors = {n: _full(q.detach()).cpu() for n, q in _trainable(self.model).items()} if base else None
        if self.env.is_main:
            save_adapter(self.model, self.out / folder, tensors=tensors, base=base)

    def _sync(self, trainable: list[nn.Parameter], stats: Tensor) -> Tensor:
        """Sum the gradients and ``stats`` over ranks (identity when single-process); return the summed stats.

        A tensor without a gradient on every rank keeps none (the optimizer then skips it, as alone).
        """
        if not self.env.distributed:
            return stats
        if self.fsdp:  # FSDP summed the gradients; the flag of this rank's gradient shards joins the stats
            local = nonfinite_flag((None if q.grad is None else _local(q.grad) for q in trainable), self.device)
            return all_reduce_sum(torch.cat([stats, local.view(1)]), self.env)
        present = torch.tensor([q.grad is not None for q in trainable], dtype=torch.float64, device=self.device)
        stats = all_reduce_sum(torch.cat([stats, present]), self.env)
        grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in trainable]
        flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]), self.env) if grads else None
        offset = 0
        for q, g, seen in zip(trainable, grads, stats[len(stats) - len(trainable) :].tolist()):
            q.grad = flat[offset : offset + g.numel()].view_as(q).clone() if seen else None
            offset += g.numel()
        return stats[: len(stats) - len(trainable)]

    def _train_epoch(self, writer: SummaryWriter | None) -> None:
        s, p = self.settings, self.progress
        batches = epoch_batches(self.n_train, s.batch_size, s.seed, p.epoch)
        trainable = list(_trainable(self.model).values())
        self.model.train()
        while p.step_in_epoch < len(batches):
            indices = rank_shard(batches[p.step_in_epoch], self.env)
            total = torch.zeros((), device=self.device)
            terms = 0
            sync = self.net.no_sync() if isinstance(self.net, DistributedDataParallel) else contextlib.nullcontext()
            with sync:
                for micro in self._micro_batches(batches[p.step_in_epoch], indices):
                    with self._autocast():
                        loss, n = self.loss_fn(micro or batches[p.step_in_epoch][:1])
                    (loss if micro else loss * 0).backward()
                    total += loss.detach().float() if micro else 0.0
                    terms += n if micro else 0
            pending = self._weights_flag if self._weights_flag is not None else torch.zeros((), device=self.device)
            self._weights_flag = None
            count = torch.tensor(float(terms), dtype=torch.float64, device=self.device)
            stats = self._sync(trainable, torch.stack([total.double(), count, pending.double()]))
            if not self.fsdp:
                stats = torch.cat([stats, nonfinite_flag((q.grad for q in trainable), self.device).view(1)])
            checks = stats
            step_loss, terms_sum, bad_weights, bad_grads = checks.tolist()  # the loop's one host sync per step
            terms = int(terms_sum)
            if bad_weights:
                raise self._weights_error(nonfinite_names({n: _local(q) for n, q in _trainable(self.model).items()}))
            if not math.isfinite(step_loss) or bad_grads:
                self.optimizer.zero_grad(set_to_none=True)
                what = f"loss is {step_loss}" if not math.isfinite(step_loss) else "non-finite gradients"
                raise Diverged(
                    f"{what} at step {p.global_step + 1} (epoch {p.epoch + 1}): stopped before applying it; "
                    f"{self._last_checkpoint_note()}. Lower --lr or set --max-grad-norm"
                )
            for param in trainable:
                if param.grad is not None:
                    param.grad.div_(max(terms, 1))
            if s.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, s.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._weights_flag = nonfinite_flag((_local(q) for q in trainable), self.device)
            p.global_step += 1
            p.step_in_epoch += 1
            p.epoch_loss += step_loss
            p.epoch_terms += terms
            if writer is not None:
                writer.add_scalar("train/loss", step_loss / max(terms, 1), p.global_step)
                writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], p.global_step)
            if s.checkpoint_steps and p.global_step % s.checkpoint_steps == 0 and p.step_in_epoch < len(batches):
                self.save_checkpoint()

    def _end_epoch(self, writer: SummaryWriter | None) -> None:
        self._check_weights()  # before a non-finite model is evaluated or saved as the best adapter
        s, p = self.settings, self.progress
        row: dict[str, float] = {
            "epoch": p.epoch + 1,
            "step": p.global_step,
            "train_loss": p.epoch_loss / max(p.epoch_terms, 1),
        }
        if self.evaluate is not None:
            with self._autocast():
                row.update(self.evaluate())
        for key, value in row.items():
            if key not in ("epoch", "step") and writer is not None:
                writer.add_scalar(("train/" if key == "train_loss" else "dev/") + key, value, p.global_step)
        p.history.append(row)
        metric = s.select_metric
        if metric is not None:
            best = p.best[metric] if p.best is not None else None
            if best is None or (row[metric] > best if s.maximize else row[metric] < best):
                p.best = row
                self._save_adapter("best")
        p.epoch += 1
        p.step_in_epoch = 0
        p.epoch_loss = 0.0
        p.epoch_terms = 0
        self.save_checkpoint()
        if self.env.is_main:
            _write_summary(self.out / "summary.csv", p.history)


def prepare_model(
    model: nn.Module, *, device: torch.device, dtype: torch.dtype | None, gradient_checkpointing: bool
) -> nn.Module:
    """Move to ``device``; keep trainable tensors in fp32 under a low-precision base; enable checkpointing."""
    if dtype is not None:
        for p in _trainable(model).values():
            p.data = p.data.float()
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5
            model.activation_checkpointing_enable(kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model.to(device)


def make_optimizer(model: nn.Module, lr: float, head_lr: float | None, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the tweakers at ``lr`` and every other trainable tensor (the head) at ``head_lr`` (or ``lr``)."""
    tweaker_ids = {id(p) for _, p in neat_parameters(model)}
    trainable = list(_trainable(model).values())
    groups = [{"params": [p for p in trainable if id(p) in tweaker_ids], "lr": lr}]
    others = [p for p in trainable if id(p) not in tweaker_ids]
    if others:
        groups.append({"params": others, "lr": lr if head_lr is None else head_lr})
    return torch.optim.AdamW(groups, weight_decay=weight_decay)
