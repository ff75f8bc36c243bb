"""The training runs behind the compatibility table (`tests/test_compat.py`), in one process or in two.

A case trains one tiny adapted model (timm ViT or HF LLaMA) for `STEPS` AdamW steps under one setup
(eager, DDP, FSDP2, FSDP1, DeepSpeed ZeRO-3, activation checkpointing of several kinds, compile, bf16
autocast, writes to the frozen weights, EMA) and returns the gradients of every step and the parameters
after the last one, gathered to full tensors under the unwrapped model's names. A distributed case gives
each rank its half of the same global batch, so its result must equal the single-process run on the whole
batch. `launch` runs a list of distributed cases in one spawn of `WORLD` gloo processes (CPU) and returns
their results; a case that fails records its error instead (any error, an ImportError included, except a missing
``deepspeed`` package, which records a skip).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib
import os
import re
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaForCausalLM

from neat_vision import FourierConfig, LoraConfig, NeatConfig, adapted_layers, apply_adapter, batch_tweakers
from neat_vision.nlp import preset_aliases

STEPS = 3
WORLD = 2
BATCH = 4  # global batch; each of the WORLD ranks gets BATCH // WORLD rows
LR = 1e-3
EMA_DECAY = 0.5

METHODS: dict[str, Any] = {
    "neat2_relu": NeatConfig(targets=("q", "v"), rank=4, depth=2, act="relu"),
    "neat6_sin": NeatConfig(targets=("q", "v"), rank=4, depth=6, act="sin"),
    "lora": LoraConfig(targets=("q", "v"), rank=4),
    "fourierft": FourierConfig(targets=("q", "v"), n=64, alpha=300.0),
}
MODELS = ("vit", "llama")
# setups that need more than one process
DISTRIBUTED = ("ddp", "fsdp2", "fsdp1", "deepspeed")


@dataclass(frozen=True)
class Case:
    """One row of the table: ``setup`` x ``model`` x ``method``, with the batched tweaker pass and bf16 autocast."""

    setup: str
    model: str
    method: str
    batch: str = "off"  # batch_tweakers(model): "off", "after" (the setup's wrapping) or "before" it
    amp: bool = False  # bf16 autocast around forward and loss

    @property
    def key(self) -> str:
        batch = "" if self.batch == "off" else f"-batch_{self.batch}"
        return f"{self.setup}-{self.model}-{self.method}{batch}" + ("-bf16" if self.amp else "")


@dataclass
class Result:
    """Gradients per step and parameters after the last step (trainable tensors, full, unwrapped names)."""

    grads: list[dict[str, Tensor | None]] = field(default_factory=list)
    params: dict[str, Tensor] = field(default_factory=dict)
    trajectory: list[dict[str, Tensor]] = field(default_factory=list)  # trainable params after each step
    losses: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


# ---- models and data ------------------------------------------------------------------------------------------


def build(model: str, method: str, seed: int = 0) -> nn.Module:
    """The tiny model adapted with ``METHODS[method]`` on q and v, rank 4; the same weights for the same seed."""
    torch.manual_seed(seed)
    if model == "vit":
        base = timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=10
        )
        return apply_adapter(base, METHODS[method])
    if model == "llama":
        from nlp_fixtures import llama_config

        base = LlamaForCausalLM(llama_config(vocab_size=64, layers=2, hidden=32, initializer_range=0.2))
        return apply_adapter(base, METHODS[method], aliases=preset_aliases(base))
    raise ValueError(f"model={model!r} is not allowed: one of {', '.join(MODELS)}")


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (what FSDP shards and checkpointing wraps, one at a time)."""
    inner = model.module if hasattr(model, "module") else model
    if hasattr(inner, "blocks"):
        return list(inner.blocks)
    return list(inner.model.layers)


def block_type(model: nn.Module) -> type:
    return type(blocks(model)[0])


def global_batch(model: str, step: int) -> tuple[Tensor, Tensor]:
    """The same data in every process: images and labels (ViT) or token ids twice (LLaMA, its own labels)."""
    g = torch.Generator().manual_seed(1000 + step)
    if model == "vit":
        return torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
    ids = torch.randint(3, 64, (BATCH, 8), generator=g)
    return ids, ids


def loss_of(model: nn.Module, kind: str, inputs: Tensor, targets: Tensor) -> Tensor:
    if kind == "vit":
        return F.cross_entropy(model(inputs).float(), targets)
    return model(input_ids=inputs, labels=targets).loss


_WRAPPER_PREFIXES = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod|module)\.")


def clean(name: str) -> str:
    """A parameter name without the prefixes wrappers add (FSDP1, checkpoint_wrapper, compile, DDP)."""
    return _WRAPPER_PREFIXES.sub("", name)


# ---- setups ---------------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A model made ready for one setup: what to call, how to step, and how to read full grads and params."""

    forward: nn.Module
    optimizer: Any
    backward: Callable[[Tensor], None]
    grads: Callable[[], dict[str, Tensor | None]]
    params: Callable[[], dict[str, Tensor]]
    step: Callable[[], None]
    extra: dict[str, Any] = field(default_factory=dict)  # facts about the setup, for the test to check


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)


def _local(model: nn.Module, forward: nn.Module | None = None) -> Prepared:
    """Plain tensors in this process (eager, DDP, checkpointing, compile)."""
    opt = _adamw(model)

    def step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    def grads() -> dict[str, Tensor | None]:
        return {
            clean(n): None if p.grad is None else p.grad.detach().clone()
            for n, p in model.named_parameters()
            if p.requires_grad
        }

    def params() -> dict[str, Tensor]:
        return {clean(n): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    return Prepared(model if forward is None else forward, opt, lambda loss: loss.backward(), grads, params, step)


def _checkpoint_blocks(model: nn.Module) -> None:
    """``torch.utils.checkpoint.checkpoint(block.forward, ..., use_reentrant=False)`` around every block."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks(model):
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def _checkpoint_wrap(model: nn.Module) -> None:
    """torch's ``checkpoint_wrapper`` (non-reentrant) on every block, in place."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    kind = block_type(model)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, kind))


def _hf_checkpointing(model: nn.Module) -> None:
    # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias) to activation_checkpointing_enable
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def _fsdp2(model: nn.Module) -> Prepared:
    from torch.distributed.fsdp import fully_shard

    for block in blocks(model):
        fully_shard(block)
    fully_shard(model)
    opt = _adamw(model)

    def step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    def grads() -> dict[str, Tensor | None]:
        return {
            n: None if p.grad is None else p.grad.full_tensor().clone()
            for n, p in model.named_parameters()
            if p.requires_grad
        }

    def params() -> dict[str, Tensor]:
        return {n: p.full_tensor().clone() for n, p in model.named_parameters() if p.requires_grad}

    return Prepared(model, opt, lambda loss: loss.backward(), grads, params, step)


def _fsdp1(model: nn.Module) -> Prepared:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    policy = ModuleWrapPolicy({block_type(model)})
    # device_id: without it FSDP1 looks for an accelerator and refuses a CPU model
    wrapped = FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
    opt = _adamw(wrapped)

    def step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    def grads() -> dict[str, Tensor | None]:
        with FSDP.summon_full_params(wrapped, with_grads=True):
            return {
                clean(n): None if p.grad is None else p.grad.detach().clone()
                for n, p in wrapped.named_parameters()
                if p.requires_grad
            }

    def params() -> dict[str, Tensor]:
        with FSDP.summon_full_params(wrapped):
            return {clean(n): p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}

    return Prepared(wrapped, opt, lambda loss: loss.backward(), grads, params, step)


def _deepspeed(model: nn.Module) -> Prepared:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    # its shared-memory all-reduce is a C++ op compiled on first use (minutes on a fresh machine); gloo does the same
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    config = {
        "train_micro_batch_size_per_gpu": BATCH // WORLD,
        "gradient_accumulation_steps": 1,
        # threshold 0: every parameter partitioned (by default small ones, the updates among them, stay whole)
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # deepspeed's default clips at 1.0; the reference does not clip
        "steps_per_print": 10**9,
    }
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=_adamw(model), config=config)
    trainable = dict(model.named_parameters())
    # a partitioned parameter holds an empty tensor outside the forward of the module that gathers it
    partitioned = [n for n in names if trainable[n].numel() == 0]

    def grads() -> dict[str, Tensor | None]:
        out = {}
        for n in names:
            g = safe_get_full_grad(trainable[n])
            out[n] = None if g is None else g.detach().clone()
        return out

    def params() -> dict[str, Tensor]:
        return {n: safe_get_full_fp32_param(trainable[n]).detach().clone() for n in names}

    prepared = Prepared(engine, opt, engine.backward, grads, params, engine.step)
    prepared.extra["unpartitioned"] = sorted(set(names) - set(partitioned))
    return prepared


def prepare(model: nn.Module, case: Case) -> Prepared:
    """Wrap ``model`` (already built and adapted) for ``case.setup``; ``batch_tweakers`` is applied by the caller."""
    setup = case.setup
    if setup in ("eager", "writes", "ema"):
        return _local(model)
    if setup == "ddp":
        return _local(model, nn.parallel.DistributedDataParallel(model))
    if setup == "checkpoint":
        _checkpoint_blocks(model)
        return _local(model)
    if setup == "checkpoint_wrapper":
        _checkpoint_wrap(model)
        return _local(model)
    if setup == "timm_checkpointing":
        model.set_grad_checkpointing()
        return _local(model)
    if setup == "hf_checkpointing":
        _hf_checkpointing(model)
        return _local(model)
    if setup == "compile":
        torch._dynamo.reset()  # a fresh cache: no recompile limit reached by earlier cases, no silent eager fallback
        torch._dynamo.utils.counters.clear()
        return _local(model, torch.compile(model, backend="aot_eager"))
    if setup == "fsdp2":
        return _fsdp2(model)
    if setup == "fsdp1":
        return _fsdp1(model)
    if setup == "deepspeed":
        return _deepspeed(model)
    raise ValueError(f"setup={setup!r} is unknown")


# ---- writes to the frozen weights between steps ----------------------------------------------------------------


def frozen_writes(model: nn.Module, step: int) -> dict[str, Tensor]:
    """New values for every adapted ``W0`` and one other frozen weight: a function of the step and old values."""
    state = model.state_dict()
    names = [f"{n}.weight" for n in adapted_layers(model)]
    names.append("norm.weight" if "norm.weight" in state else "model.norm.weight")
    g = torch.Generator().manual_seed(2000 + step)
    return {n: 0.9 * state[n] + 0.05 * torch.randn(state[n].shape, generator=g) for n in names}


def apply_writes(model: nn.Module, step: int) -> None:
    """Step 0: ``param.data.copy_`` (no autograd version bump); step 1: ``load_state_dict(strict=False)``."""
    new = frozen_writes(model, step)
    if step == 0:
        for name, value in new.items():
            model.get_parameter(name).data.copy_(value)
    elif step == 1:
        missing, unexpected = model.load_state_dict(new, strict=False)
        if unexpected:
            raise RuntimeError(f"load_state_dict did not take {unexpected}")


# ---- training -------------------------------------------------------------------------------------------------


def _autocast(on: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def train(case: Case, rank: int = 0, world: int = 1) -> Result:
    """`STEPS` AdamW steps of ``case`` in this process (rank ``rank`` of ``world``: its rows of each batch)."""
    start = time.perf_counter()
    model = build(case.model, case.method)
    if case.batch == "before":
        batch_tweakers(model)
    prepared = prepare(model, case)
    if case.batch == "after":
        batch_tweakers(model)
    ema = None
    if case.setup == "ema":
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=EMA_DECAY)
    result = Result(extra=dict(prepared.extra))
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for step in range(STEPS):
        inputs, targets = global_batch(case.model, step)
        with _autocast(case.amp):
            loss = loss_of(prepared.forward, case.model, inputs[rows], targets[rows])
        prepared.backward(loss)
        result.losses.append(loss.item())
        result.grads.append(prepared.grads())
        prepared.step()
        result.trajectory.append(prepared.params())
        if case.setup == "writes":
            apply_writes(model, step)
        if ema is not None:
            ema.update(model)
    result.params = result.trajectory[-1]
    result.extra["seconds"] = time.perf_counter() - start
    # whether the last forward used factors from the batched pass (it stands aside in some setups)
    result.extra["batched"] = any(layer.__dict__.get("_used_pending") for layer in adapted_layers(model).values())
    if case.setup == "compile":
        counters = torch._dynamo.utils.counters
        result.extra["graphs"] = counters["stats"]["unique_graphs"]
        result.extra["graph_breaks"] = sum(counters["graph_break"].values())
    if ema is not None:
        result.extra["ema_state"] = {k: v.clone() for k, v in ema.module.state_dict().items()}
        result.extra["ema_output"] = evaluate(ema.module, case.model)
    return result


def evaluate(model: nn.Module, kind: str) -> Tensor:
    """The model's output (logits) on a held-out batch, in eval mode."""
    inputs, _ = global_batch(kind, 99)
    with torch.no_grad():
        out = model.eval()(inputs)
    return (out if kind == "vit" else out.logits).clone()


def train_fresh_each_step(case: Case) -> Result:
    """The reference for ``writes``: every step on a freshly built model loaded with the current full state.

    A fresh module holds nothing from earlier steps, so this is what the frozen weights written between steps
    must give; the optimizer state travels through ``state_dict``.
    """
    state, opt_state = None, None
    result = Result()
    for step in range(STEPS):
        model = build(case.model, case.method)
        if state is not None:
            model.load_state_dict(state)
        opt = _adamw(model)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        inputs, targets = global_batch(case.model, step)
        with _autocast(case.amp):
            loss = loss_of(model, case.model, inputs, targets)
        loss.backward()
        result.losses.append(loss.item())
        result.grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        opt.step()
        result.trajectory.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        state = model.state_dict()
        if step < 2:
            state.update(frozen_writes(model, step))
        opt_state = opt.state_dict()
    result.params = result.trajectory[-1]
    return result


# ---- distributed launch ---------------------------------------------------------------------------------------


def recorded_error(error: Exception) -> str:
    """What a failed case records: ``"skip: <why>"`` only when the deepspeed package itself is missing, else
    the traceback (any other ImportError too: a broken install or a missing dependency is a failure)."""
    if isinstance(error, ModuleNotFoundError) and error.name == "deepspeed":
        return f"skip: the deepspeed package is not installed ({error!r})"
    return "".join(traceback.format_exception(error))


def _entry(rank: int, cases: list[Case], init_file: str, out: str) -> None:
    start = time.perf_counter()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # FSDP1's note on frozen parameters in a wrapped unit, per unit and case
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # deepspeed reads these when it meets an initialised process group
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    results: dict[str, Result | str] = {}
    for case in cases:
        try:
            results[case.key] = train(case, rank, WORLD)
        except Exception as error:  # recorded for the test that reads it
            results[case.key] = recorded_error(error)
        dist.barrier()
    if rank == 0:
        torch.save({"results": results, "seconds": time.perf_counter() - start}, out)
    dist.destroy_process_group()


def launch(cases: list[Case]) -> tuple[dict[str, Result | str], float, float]:
    """Run ``cases`` in one spawn of `WORLD` gloo processes.

    Returns ``{case.key: Result, or the error's traceback, or "skip: <why>"}``, the seconds of the whole spawn
    and the seconds the workers spent after their imports.
    """
    import torch.multiprocessing as mp

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        mp.start_processes(
            _entry, args=(cases, os.path.join(tmp, "pg"), out), nprocs=WORLD, join=True, start_method="spawn"
        )
        saved = torch.load(out, weights_only=False)
    return saved["results"], time.perf_counter() - start, saved["seconds"]


def max_diff(a: dict[str, Tensor | None], b: dict[str, Tensor | None]) -> float:
    """Largest absolute difference over same-named tensors (``inf`` when names differ or a tensor is missing)."""
    if set(a) != set(b):
        return float("inf")
    worst = 0.0
    for name, x in a.items():
        y = b[name]
        if x is None or y is None:
            if x is not y:
                return float("inf")
            continue
        worst = max(worst, (x.float() - y.float()).abs().max().item())
    return worst
