"""What the NLP runners add to the one training loop (`neat_vision.engine.loop`): `TextTask` and `train_text`;
each ``--method``'s optimizer groups and what a run saves (`save_trained`).

Batches are a function of ``(seed, epoch)``; accumulation is exact (micro-batch losses summed, the gradient
divided by the loss terms of the whole batch). Under torchrun every rank takes a contiguous shard of each global
batch (``--batch-size`` is global). With FSDP2 (`distribute(..., fsdp=True)`) every rank runs as many micro-batches
(an empty one forwards a real example with weight 0), and the checkpoint and adapters hold the gathered full
tensors, the format of a DDP or 1-process run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from ..adapter import adapter_parameters
from ..adapter_files import AdapterMismatchError, describe_base, fingerprint, save_adapter
from ..atomic import atomic_write, remove_stale_temporaries
from ..engine.distributed import DistEnv
from ..engine.loop import Diverged, EpochEnd, LoopSettings, Progress, ResumeError, TrainLoop
from ..engine.options import option_differences
from ..errors import one_line
from ..integrations.transformers import load_adapter
from ..methods import WHOLE_MODEL_METHODS
from ..targets import head_names
from .cli import DTYPES, run_config

__all__ = [
    "CHECKPOINT",
    "Diverged",
    "Progress",
    "ResumeError",
    "TextTask",
    "load_trained",
    "make_optimizer",
    "save_trained",
    "train_text",
]

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "neat-vision-nlp-checkpoint"
EXPORT = "export.json"  # what a linear / full run saves instead of an adapter (train.py's export_trained files)


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


class TextTask:
    """A transformers model on ``n_train`` examples, trained as the runners' ``args`` say: the loop's `Task`.

    ``loss_fn(indices) -> (summed loss, number of loss terms)`` runs the forward pass of one micro-batch (of
    ``micro`` examples at most, default ``args.batch_size``) of this rank's shard through ``net`` (`distribute`'s
    wrapper). ``run_config(args)`` is stored in the checkpoint; resuming with another fails.
    """

    scaler = None

    def __init__(
        self,
        args: argparse.Namespace,
        env: DistEnv,
        model: nn.Module,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        n_train: int,
        loss_fn: Callable[[list[int]], tuple[Tensor, int]],
        micro: int | None = None,
    ) -> None:
        self.args, self.env, self.model, self.net = args, env, model, net
        self.optimizer, self.scheduler = optimizer, scheduler
        self.n_train, self.loss_fn, self.micro = n_train, loss_fn, micro or args.batch_size
        self.out, self.run_config, self.dtype = Path(args.output), run_config(args), DTYPES[args.dtype]
        self.checkpoint_path = self.out / CHECKPOINT
        self.evaluate: Callable[[], dict[str, float]] | None = None
        self.fsdp = any(isinstance(q, DTensor) for q in _trainable(model).values())

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.env.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_train / self.args.batch_size)

    def epoch_steps(self, epoch: int, start: int) -> Iterator[tuple[int, list[tuple[list[int], list[int]]]]]:
        """Per step: this rank's micro-batches, each with the example a filler (an empty one) forwards."""
        for batch in epoch_batches(self.n_train, self.args.batch_size, self.args.seed, epoch)[start:]:
            micro = self._micro_batches(batch, rank_shard(batch, self.env))
            yield len(micro), [(indices, batch[:1]) for indices in micro]

    def _micro_batches(self, batch: list[int], shard: list[int]) -> list[list[int]]:
        """This rank's micro-batches; under FSDP as many on every rank as on the largest shard (``[]``: filler)."""
        micro = [shard[i : i + self.micro] for i in range(0, len(shard), self.micro)]
        if self.fsdp:  # FSDP's forward and backward are collectives: every rank runs as many
            largest = math.ceil(len(batch) / self.env.world_size)
            micro += [[]] * (math.ceil(largest / self.micro) - len(micro))
        return micro

    def backward(self, micro: tuple[list[int], list[int]], n_micro: int) -> tuple[Tensor, int]:
        indices, filler = micro
        with self._autocast():
            loss, n = self.loss_fn(indices or filler)
        if not indices:
            (loss * 0).backward()
            return torch.zeros((), device=self.env.device), 0
        loss.backward()
        return loss.detach().float(), n

    def end_epoch(self, end: EpochEnd) -> tuple[dict[str, Any], dict[str, float]]:
        row: dict[str, Any] = {"epoch": end.epoch, "step": end.step, "train_loss": end.train_loss}
        if self.evaluate is not None:
            with self._autocast():
                row.update(self.evaluate())
        metrics = {key: value for key, value in row.items() if key not in ("epoch", "step")}
        return row, {("train/" if key == "train_loss" else "dev/") + key: value for key, value in metrics.items()}

    def on_best(self, row: dict[str, Any]) -> None:
        self.save_adapter("best")

    def save_adapter(self, folder: str) -> None:
        """Rank 0 writes what trained to ``out/folder`` (`save_trained`; sharded tensors gathered on every rank)."""
        base = getattr(self.model, "_neat_unsharded_base", None)
        tensors = {n: _full(q.detach()).cpu() for n, q in _trainable(self.model).items()} if base else None
        if self.env.is_main:
            save_trained(self.model, self.out / folder, self.args, tensors=tensors, base=base)

    def checkpoint(self, progress: Progress) -> dict[str, Any]:
        """The resume state, full tensors (gathered on every rank under FSDP: the format of a DDP run)."""
        trainable = {name: _full(p.detach()).cpu() for name, p in _trainable(self.model).items()}
        optimizer = self.optimizer.state_dict()
        if self.fsdp:
            optimizer["state"] = {
                i: {k: _full(v).cpu() if isinstance(v, DTensor) else v for k, v in per.items()}
                for i, per in optimizer["state"].items()
            }
        return {
            "format": CHECKPOINT_FORMAT,
            "run_config": self.run_config,
            "trainable": trainable,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "progress": asdict(progress),
        }

    def restore(self) -> tuple[Path, dict[str, Any], Progress]:
        """Restore the state of ``out/checkpoint.pt``; it must come from the same ``run_config``."""
        path = self.checkpoint_path
        check_output(self.out, resume=True)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 (whatever torch.load meets in a torn file)
            raise ResumeError(f"{path} cannot be read ({one_line(err)[:200]}); it is damaged: start a new run") from err
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ResumeError(f"{path} is not a {CHECKPOINT_FORMAT} file")
        saved = state["run_config"]
        diffs = option_differences(saved, self.run_config)
        if diffs:
            raise ResumeError(f"cannot resume: settings differ from {path}'s (resume with those): {diffs}")
        trainable = _trainable(self.model)
        if set(trainable) != set(state["trainable"]):
            raise ResumeError(f"{path} holds other trainable tensors than this model")
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                trainable[name].copy_(_like(tensor, trainable[name]))
        optimizer = state["optimizer"]
        params = [q for group in self.optimizer.param_groups for q in group["params"]]
        for i, per in optimizer["state"].items():
            for k, v in per.items():
                if isinstance(v, Tensor) and v.shape == params[int(i)].shape:
                    per[k] = _like(v, params[int(i)])
        names = [group.get("name") for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(optimizer)
        for group, name in zip(self.optimizer.param_groups, names):  # older checkpoints call "adapter" "neat"
            group["name"] = name
        self.scheduler.load_state_dict(state["scheduler"])
        return path, state, Progress(**state["progress"])


def train_text(
    task: TextTask,
    evaluate: Callable[[], dict[str, float]] | None,
    select_metric: str | None,
    maximize: bool = True,
) -> Progress:
    """Train ``task`` from the start (``--output`` must hold no checkpoint) or, with ``--resume``, from its checkpoint.

    ``evaluate() -> metrics`` runs after each epoch (the same metrics on every rank); ``select_metric`` picks the
    best epoch, whose adapter goes to ``best/``. Writes ``checkpoint.pt``, ``summary.csv``, ``tb/`` and ``last/``.
    """
    args, env, out = task.args, task.env, task.out
    task.evaluate = evaluate
    check_output(out, args.resume)
    env.barrier()  # no rank sees rank 0's first checkpoint as one in the way
    if env.is_main:
        for folder in (out, out / "best", out / "last"):
            remove_stale_temporaries(folder)
    settings = LoopSettings(
        epochs=args.epochs,
        checkpoint=task.checkpoint_path,
        summary=out / "summary.csv",
        tensorboard=out / "tb",
        checkpoint_tensors=("trainable", "optimizer"),
        max_grad_norm=args.max_grad_norm,
        checkpoint_steps=args.checkpoint_steps,
        progress_interval=max(task.steps_per_epoch() // 10, 1),
        select_metric=select_metric,
        maximize=maximize,
        sum_gradients=True,
        unit="terms",
        checkpoint_option="--checkpoint-steps",
        advice="Lower --lr or set --max-grad-norm",
    )
    loop = TrainLoop(task, settings, env)
    try:
        if args.resume:
            loop.resume()
        loop.run()
    finally:
        loop.close()
    task.save_adapter("last")
    env.barrier()  # the adapters are on disk before any rank goes on to use them
    return loop.progress


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
    """AdamW over named groups: ``adapter``, the update parameters of any method, at ``lr``; ``head`` at
    ``head_lr`` (default ``lr``); ``backbone`` at ``lr``. Empty groups are left out.

    With an adapter, ``head`` is every other trainable tensor (the classifier and ``neat_trainable``'s, as when
    NEAT was the only method); without one (``linear``, ``full``) it is the classifier's modules, and the other
    weights (``full``) are ``backbone``.
    """
    update_ids = {id(p) for p in adapter_parameters(model)}
    head_ids = {id(p) for name in head_names(model) for p in model.get_submodule(name).parameters()}
    members: dict[str, list[nn.Parameter]] = {"adapter": [], "head": [], "backbone": []}
    for p in _trainable(model).values():
        kind = "adapter" if id(p) in update_ids else "head" if update_ids or id(p) in head_ids else "backbone"
        members[kind].append(p)
    lrs = {"adapter": lr, "head": lr if head_lr is None else head_lr, "backbone": lr}
    groups = [{"name": name, "params": params, "lr": lrs[name]} for name, params in members.items() if params]
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable tensor")
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def save_trained(
    model: nn.Module,
    folder: Path,
    args: argparse.Namespace,
    *,
    tensors: dict[str, Tensor] | None = None,
    base: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> Path:
    """Write what ``args.method`` trained to ``folder``: the adapter (`save_adapter`) of an update method, else
    train.py's export files: ``head.safetensors`` (``linear``: the head; the rest is the base model) or
    ``model.safetensors`` with ``config.json`` (``full``: every weight, a ``from_pretrained`` folder), each with
    ``export.json`` (method, model, class, labels, file). Sharded (FSDP) models pass their gathered ``tensors``
    and ``base`` (see `save_adapter`). Each file is replaced whole or not at all.
    """
    from safetensors.torch import save_file

    method = getattr(args, "method", "neat")
    if method not in WHOLE_MODEL_METHODS:
        return save_adapter(model, folder, tensors=tensors, base=base)
    if tensors is None:
        tensors = {name: p.detach() for name, p in _trainable(model).items()}
    tensors = {name: t.cpu().contiguous() for name, t in tensors.items()}
    described = base[0] if base is not None else describe_base(model)
    file = "head.safetensors" if method == "linear" else "model.safetensors"
    atomic_write(folder / file, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    if method == "full":
        config = json.loads(model.config.to_json_string())
        config["architectures"] = [described.get("model_class", type(model).__name__)]
        atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    meta = {
        "method": method,
        "model": args.model,
        "model_class": described.get("model_class"),
        "num_classes": described.get("num_labels"),
        "file": file,
    }
    atomic_write(folder / EXPORT, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return folder


def load_trained(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load what a run saved (`save_trained`) onto ``model`` (the base it trained): an adapter folder, or the
    head (``linear``) or every weight (``full``) of an ``export.json`` folder."""
    folder = Path(folder)
    if not (folder / EXPORT).is_file():
        return load_adapter(model, folder)
    from safetensors.torch import load_file

    meta = json.loads((folder / EXPORT).read_text())
    tensors = load_file(str(folder / meta["file"]))
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    missing = sorted(set(params) - set(tensors)) if meta["method"] == "full" else []
    wrong = [name for name in set(tensors) & set(params) if tensors[name].shape != params[name].shape]
    if unknown or missing or wrong:
        raise AdapterMismatchError(
            f"{folder} ({meta['method']} of {meta.get('model')}) does not fit {type(model).__name__}: "
            f"unknown tensors {unknown[:3]}, missing {missing[:3]}, other shapes {sorted(wrong)[:3]}"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return model
