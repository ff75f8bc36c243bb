"""Training speed and memory of NEAT against peft's LoRA and PEANuT on timm ViTs (issue #4).

Every variant runs in one process, one after another, on the same random weights and data, so the ratios
hold on a noisy machine. A training step is forward + backward + AdamW under bf16 autocast (``--amp fp32``
for full precision); its time is the median over the timed steps after warm-up, CUDA events around each
step. Peak memory is ``torch.cuda.max_memory_allocated`` over the warm-up and timed steps (weights,
optimizer state and activations; nothing else is on the GPU).

Variants (``--variants`` takes glob patterns, ``--list`` prints them all):

  full                        full fine-tuning
  peft-lora                   peft LoRA r=16 (alpha 16) on the fused ``qkv`` (peft cannot adapt q/v slices)
  lora-qv, lora-qkv           our LoRA r=16 (neat_vision.LoraConfig, the same AdaptedLinear machinery)
  peft-peanut-d2, -d6         peft PEANuT r=7 on ``qkv``, peft depth 0 / 2 (= our depth 2 / 6)
  neat-d{2,6}-{qv,qkv}-PATH   NEAT r=7 on the q and v slices / the fused qkv, with PATH:
      batched   factored layer (`_FactoredLinear`) + one batched tweaker pass per forward (`batch_tweakers`)
      factored  factored layer, tweakers computed layer by layer
      fused     `_FusedLinear` (one matmul with W0 + dW, skinny backward) + batched tweaker pass
      dense     reference: autograd through the materialised dW
      plain     the core's first factored forward (autograd through the stacked skinny product)
  NAME+c                      the same, its transformer blocks compiled (``torch.compile``, regional)
  NAME+cg                     the same with CUDA graphs (``mode="reduce-overhead"``)

Sections (``--sections``): peak (bf16 matmul peak), main (the table), infer (images/s, merged NEAT vs
base), compile, scaling (rank 1..64, ViT-S/B/L), cars (the StanfordCars recipe's images/s), profile
(torch.profiler top ops), llm (a Llama-shaped causal LM, default Llama-3.2-3B's shape with random bf16
weights, batch 4 x 512 tokens: NEAT r 32 on q k v up down, per layer, batched and fused, against peft LoRA r 32
and peft PEANuT r 32; ``--llm-*`` options). ``--smoke`` runs everything on a tiny model on the CPU in a few
seconds.

    python benchmarks/bench_speed.py --sections peak,llm --optims adamw-fused --md $OUT/LLM.md --json $OUT/llm.json

    python benchmarks/bench_speed.py --models vit_base_patch16_224,vit_large_patch16_224 --batches 64,256

``--rounds N`` repeats the main table with the variants interleaved (the tables take the median); ``--optims
adamw,adamw-fused`` measures with the default (foreach) and the fused AdamW. ``--budget S`` skips what does
not fit in S seconds, so one call of a lent GPU cannot overrun. The two runs behind ``RESULTS.md``::

    python benchmarks/bench_speed.py --budget 515 --reserve 5 --md $OUT/RESULTS.md --json $OUT/results.json \
        --profile-out $OUT/profile.txt
    python benchmarks/bench_speed.py --models vit_base_patch16_224 --batches 64,256 --sections peak,compile,main \
        --variants 'peft-lora,neat-d2-qv-batched,neat-d6-qv-batched,neat-d2-qkv-batched,neat-d6-qkv-batched,\
neat-d2-qv-fused,neat-d6-qv-fused,neat-d2-qkv-fused,neat-d6-qkv-fused' --optims adamw,adamw-fused --rounds 2 \
        --compile-batches 256,64 --compile-variants 'peft-lora+c,neat-d2-qv-factored+c,neat-d6-qv-factored+c,\
peft-lora+cg,neat-d2-qv-factored+cg,neat-d6-qv-factored+cg' --flops 'peft-lora,neat-d*-batched' --budget 250 \
        --compile-reserve 20 --reserve 3 --md $OUT/RESULTS2.md --json $OUT/results2.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import fnmatch
import gc
import json
import math
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import timm  # noqa: E402

import neat_vision  # noqa: E402
from neat_vision import NeatConfig, apply_adapter, apply_neat, merge_and_unload  # noqa: E402
from neat_vision.batching import batch_tweakers  # noqa: E402
from neat_vision.layers import AdaptedLinear, _compute_dtype  # noqa: E402

try:
    import peft
except ImportError:  # pragma: no cover - peft is a test dependency
    peft = None

NEAT_RANK, LORA_RANK = 7, 16
SMOKE_VARIANTS = (
    "full",
    "peft-lora",
    "peft-peanut-d6",
    "neat-d6-qv-batched",
    "neat-d2-qkv-fused",
    "neat-d2-qv-dense",
    "neat-d6-qv-plain",
    "neat-d6-qkv-factored",
)
PATHS = ("batched", "factored", "fused", "dense", "plain")
SHORT = {"vit_small_patch16_224": "ViT-S/16", "vit_base_patch16_224": "ViT-B/16", "vit_large_patch16_224": "ViT-L/16"}


# ---- variants ----------------------------------------------------------------------------------------


def _plain_forward(self: AdaptedLinear, x: torch.Tensor) -> torch.Tensor:
    """The core's first factored forward: per-layer tweakers, autograd through the stacked skinny product."""
    left, right = self._stack(self._factors(self.weight))
    dtype = _compute_dtype(x)
    y = F.linear(x, self.weight, self.bias)
    x_right = x.to(dtype) @ right.to(dtype).t()
    y2 = torch.addmm(
        y.reshape(-1, self.out_features).to(dtype), x_right.reshape(-1, right.shape[0]), left.to(dtype).t()
    )
    return y2.view(*y.shape)


def build_neat(base: nn.Module, depth: int, target: str, path: str, rank: int = NEAT_RANK) -> nn.Module:
    targets = ("q", "v") if target == "qv" else ("qkv",)
    layer_path = {"batched": "factored", "plain": "factored"}.get(path, path)
    model = apply_neat(base, NeatConfig(targets=targets, rank=rank, depth=depth, path=layer_path))
    if path in ("batched", "fused"):
        batch_tweakers(model)
    if path == "plain":
        for module in model.modules():
            if isinstance(module, AdaptedLinear):
                module.forward = types.MethodType(_plain_forward, module)
    return model


def build_peft(base: nn.Module, kind: str, rank: int, depth: int = 0) -> nn.Module:
    if peft is None:
        raise RuntimeError("peft is not installed")
    if kind == "lora":
        cfg = peft.LoraConfig(
            r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=["qkv"], modules_to_save=["head"]
        )
    else:
        cfg = peft.PeanutConfig(r=rank, depth=depth, target_modules=["qkv"], modules_to_save=["head"])
    return peft.get_peft_model(base, cfg)


def variant_names(include_levers: bool = True) -> list[str]:
    names = ["full", "peft-lora", "lora-qv", "lora-qkv", "peft-peanut-d2", "peft-peanut-d6"]
    for path in PATHS:
        for depth in (2, 6):
            for target in ("qv", "qkv"):
                names.append(f"neat-d{depth}-{target}-{path}")
    return names


def describe(name: str) -> tuple[str, str]:
    """(method label, target label) for the tables."""
    base = _strip(name)
    compiled = {"+c": " + compile", "+cg": " + compile, CUDA graphs"}.get(name[len(base) :], "")
    if base == "full":
        return "full fine-tuning" + compiled, "all"
    if base == "peft-lora":
        return f"peft LoRA r={LORA_RANK}" + compiled, "qkv"
    if base.startswith("lora-"):
        return f"our LoRA r={LORA_RANK}" + compiled, "q,v" if base.endswith("qv") else "qkv"
    if base.startswith("peft-peanut"):
        depth = int(base.rsplit("d", 1)[1])
        return f"peft PEANuT r={NEAT_RANK} peft depth {(depth - 2) // 2} (= depth {depth})" + compiled, "qkv"
    _, d, target, path = base.split("-")
    return f"NEAT r={NEAT_RANK} depth {d[1:]} {path}" + compiled, "q,v" if target == "qv" else "qkv"


def make_model(name: str, base: nn.Module, rank: int | None = None) -> nn.Module:
    """A fresh copy of ``base`` adapted as ``name`` says (trainable: the adapter and the head)."""
    torch.manual_seed(0)
    model = copy.deepcopy(base)
    key = _strip(name)
    if key == "full":
        model.requires_grad_(True)
    elif key == "peft-lora":
        model = build_peft(model, "lora", rank or LORA_RANK)
    elif key.startswith("lora-"):
        targets = ("q", "v") if key.endswith("-qv") else ("qkv",)
        model = apply_adapter(model, neat_vision.LoraConfig(targets=targets, rank=rank or LORA_RANK))
    elif key.startswith("peft-peanut"):
        depth = int(key.rsplit("d", 1)[1])
        model = build_peft(model, "peanut", rank or NEAT_RANK, (depth - 2) // 2)
    elif key.startswith("neat-"):
        _, d, target, path = key.split("-")
        model = build_neat(model, int(d[1:]), target, path, rank or NEAT_RANK)
    else:
        raise ValueError(f"unknown variant {name!r}; --list shows them")
    return model


def compile_blocks(model: nn.Module, backend: str = "inductor", mode: str | None = None) -> nn.Module:
    """Regional compilation: every transformer block compiled in place (one compilation, reused by all)."""
    blocks = [m for m in model.modules() if type(m).__name__ == "Block"]
    if not blocks:
        raise RuntimeError("no transformer blocks found to compile")
    for block in blocks:
        block.compile(backend=backend, mode=mode, dynamic=False)
    if getattr(model, "_neat_batcher_handles", None) is not None:
        batch_tweakers(model, enabled=False)  # the compiled blocks build their tweakers inside the graph
    return model


def _strip(name: str) -> str:
    """The eager variant of a compiled one (``+c``: torch.compile, ``+cg``: with CUDA graphs)."""
    return name.split("+", 1)[0]


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- measurement ---------------------------------------------------------------------------------------


class Clock:
    """CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def marks(self, n: int) -> list:
        if self.cuda:
            return [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        return [None] * n

    def record(self, marks: list, i: int) -> None:
        if self.cuda:
            marks[i].record()
        else:
            marks[i] = time.perf_counter()

    def elapsed_ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def amp_context(device: torch.device, amp: str):
    if amp == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def timed_steps(step, clock: Clock, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    clock.sync()
    marks = clock.marks(steps + 1)
    clock.record(marks, 0)
    for i in range(steps):
        step()
        clock.record(marks, i + 1)
    clock.sync()
    return [clock.elapsed_ms(marks[i], marks[i + 1]) for i in range(steps)]


def make_step(model, batch, device, amp, num_classes=1000, optim="adamw"):
    """One training step (forward, backward, AdamW) on fixed random data, as a closure."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True if optim == "adamw-fused" else None)
    gen = torch.Generator(device="cpu").manual_seed(1)
    size = model_img_size(model)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)

    def step():
        with amp_context(device, amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def count_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def measure_training(model, batch, device, amp, warmup, steps, flops=False, num_classes=1000, optim="adamw"):
    """Median step ms, peak memory, trainable parameters (and FLOPs of one step) of ``model``."""
    clock = Clock(device)
    model.to(device).train()
    step = make_step(model, batch, device, amp, num_classes, optim)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start_alloc = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    times = timed_steps(step, clock, warmup, steps)
    out = {
        "step_ms": statistics.median(times),
        "step_ms_min": min(times),
        "step_ms_all": [round(t, 3) for t in times],
        "trainable": trainable(model),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
        "start_gib": start_alloc / 2**30,
    }
    if flops:
        out["flops"] = count_flops(step)
    return out


def model_img_size(model: nn.Module) -> int:
    for m in model.modules():
        size = getattr(getattr(m, "patch_embed", None), "img_size", None)
        if size is not None:
            return int(size[0])
    return 224


@torch.inference_mode()
def images_per_s(model, batch, device, amp, warmup, steps) -> float:
    clock = Clock(device)
    model.to(device).eval()
    x = torch.randn(batch, 3, model_img_size(model), model_img_size(model), device=device)

    def step():
        with amp_context(device, amp):
            model(x)

    times = timed_steps(step, clock, warmup, steps)
    return batch / (statistics.median(times) / 1e3)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bf16_peak_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    clock = Clock(device)
    times = timed_steps(lambda: torch.mm(a, b), clock, 3, reps)
    return 2 * n**3 / (statistics.median(times) / 1e3) / 1e12


# ---- the language side: a Llama-shaped causal LM --------------------------------------------------------

# Llama-3.2-3B's shape (random weights); "smoke" is a tiny one for the CPU
LLM_CONFIGS = {
    "llama-3.2-3b": dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=True,
    ),
    "smoke": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=128, tie_word_embeddings=True,
    ),
}  # fmt: skip
LLM_TARGETS = ("q", "k", "v", "up", "down")  # the paper's LLaMA targets (Tables 10/11)
LLM_VARIANTS = ("peft-lora", "peft-peanut", "neat", "neat-batched", "neat-fused")


def build_llm_base(config_name: str, device: torch.device) -> nn.Module:
    """A ``LlamaForCausalLM`` of the named shape with random bf16 weights, built directly on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**LLM_CONFIGS[config_name]))
    finally:
        torch.set_default_dtype(default)
    return model.requires_grad_(False)


def make_llm(variant: str, base: nn.Module, rank: int) -> nn.Module:
    """A copy of ``base`` with ``variant``'s adapter of rank ``rank`` on q k v up down (fp32 adapter weights)."""
    torch.manual_seed(0)
    model = copy.deepcopy(base)
    if variant.startswith("peft-"):
        if peft is None:
            raise RuntimeError("peft is not installed")
        modules = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
        if variant == "peft-lora":
            cfg = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=modules)
        else:
            cfg = peft.PeanutConfig(r=rank, depth=0, target_modules=modules)
        return peft.get_peft_model(model, cfg)
    from neat_vision.nlp import apply_neat as apply_neat_hf

    path = "fused" if variant == "neat-fused" else "factored"
    model = apply_neat_hf(model, NeatConfig(targets=LLM_TARGETS, rank=rank, path=path))
    if variant in ("neat-batched", "neat-fused"):
        batch_tweakers(model)
    return model


def make_lm_step(model, batch: int, seq: int, device, optim: str = "adamw"):
    """One causal-LM training step (bf16 autocast, loss on every token, AdamW) on fixed random tokens."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True if optim == "adamw-fused" else None)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# ---- the run ----------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.t0 = time.monotonic()
        self.results: list[dict] = []
        self.bases: dict[str, nn.Module] = {}
        self.meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python " + " ".join(sys.argv),
            "device": torch.cuda.get_device_name() if self.device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "timm": timm.__version__,
            "peft": getattr(peft, "__version__", "-"),
            "python": platform.python_version(),
            "neat_vision": neat_vision.__version__,
        }

    # time budget ----------------------------------------------------------------------------------
    def left_s(self) -> float:
        return self.args.budget - (time.monotonic() - self.t0)

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)

    def base(self, model_name: str, num_classes: int = 1000) -> nn.Module:
        key = f"{model_name}/{num_classes}"
        if key not in self.bases:
            torch.manual_seed(0)
            kwargs = dict(self.args.model_kwargs)
            self.bases[key] = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
            self.bases[key].requires_grad_(False)
        return self.bases[key]

    def record(self, row: dict) -> None:
        self.results.append(row)
        if self.args.json:
            Path(self.args.json).write_text(json.dumps({"meta": self.meta, "results": self.results}, indent=1))
        if self.args.md:
            Path(self.args.md).write_text(render_markdown(self.meta, self.results))

    def train_row(
        self, section, model_name, batch, variant, *, amp="bf16", rank=None, num_classes=1000, optim="adamw", **extra
    ):
        args = self.args
        row = dict(section=section, model=model_name, batch=batch, variant=variant, amp=amp, rank=rank, **extra)
        row["optim"] = optim
        compiled = _strip(variant) != variant
        if self.left_s() < args.reserve + (args.compile_reserve if compiled else 0):
            row["error"] = "skipped: time budget"
            self.record(row)
            return row
        model = None
        try:
            t = time.monotonic()
            model = make_model(variant, self.base(model_name, num_classes), rank)
            if compiled:
                mode = "reduce-overhead" if variant.endswith("+cg") else args.compile_mode
                compile_blocks(model.to(self.device), backend=args.compile_backend, mode=mode)
            warmup = args.compile_warmup if compiled else args.warmup
            row.update(
                measure_training(
                    model,
                    batch,
                    self.device,
                    amp,
                    warmup,
                    args.steps,
                    flops=not compiled and any(fnmatch.fnmatch(variant, f) for f in args.flops),
                    num_classes=num_classes,
                    optim=optim,
                )
            )
            row["wall_s"] = round(time.monotonic() - t, 1)
        except Exception as exc:  # a variant that fails is recorded, the run goes on
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            if args.smoke or args.strict:
                raise
        finally:
            del model
            free(self.device)
        self.log(_row_line(row))
        self.record(row)
        return row

    # sections -----------------------------------------------------------------------------------------
    def peak(self) -> None:
        if self.device.type != "cuda":
            self.meta["bf16_peak_tflops"] = float("nan")
            return
        self.meta["bf16_peak_tflops"] = round(bf16_peak_tflops(self.device), 1)
        self.log(f"bf16 matmul peak (8192^3): {self.meta['bf16_peak_tflops']} TFLOP/s")

    def llm(self) -> None:
        """Causal-LM training step: NEAT vs peft LoRA and PEANuT at the same rank on q k v up down."""
        args = self.args
        try:
            base = build_llm_base(args.llm_config, self.device)
        except ImportError as exc:
            self.record(dict(section="llm", model=args.llm_config, batch=args.llm_batch, error=f"skipped: {exc}"))
            return
        for rnd in range(args.rounds):
            for variant in args.llm_variants:
                row = dict(section="llm", model=args.llm_config, batch=args.llm_batch, variant=variant, amp="bf16")
                row.update(seq=args.llm_seq, rank=args.llm_rank, optim=args.optims[-1], round=rnd)
                if self.left_s() < args.reserve:
                    row["error"] = "skipped: time budget"
                    self.record(row)
                    continue
                model = None
                try:
                    t = time.monotonic()
                    model = make_llm(variant, base, args.llm_rank).train()
                    step = make_lm_step(model, args.llm_batch, args.llm_seq, self.device, row["optim"])
                    if self.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    times = timed_steps(step, Clock(self.device), args.warmup, args.steps)
                    row.update(
                        step_ms=statistics.median(times),
                        step_ms_min=min(times),
                        step_ms_all=[round(x, 3) for x in times],
                        trainable=trainable(model),
                        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else math.nan,
                        wall_s=round(time.monotonic() - t, 1),
                    )
                except Exception as exc:  # a variant that fails is recorded, the run goes on
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    if args.smoke or args.strict:
                        raise
                finally:
                    del model
                    free(self.device)
                self.log(_row_line(row))
                self.record(row)
        del base
        free(self.device)

    def main(self) -> None:
        for rnd in range(self.args.rounds):  # rounds interleave the variants; the tables take the median
            for model_name in self.args.models:
                for batch in self.args.batches:
                    for optim in self.args.optims:
                        for variant in self.select(self.main_variants(model_name)):
                            self.train_row("main", model_name, batch, variant, optim=optim, round=rnd)

    def main_variants(self, model_name: str) -> list[str]:
        names = variant_names()
        if model_name in self.args.levers_models or self.args.smoke:
            return names
        return [n for n in names if n.rsplit("-", 1)[-1] in ("batched", "fused") or not n.startswith("neat")]

    def select(self, names: list[str]) -> list[str]:
        pats = self.args.variants
        return [n for n in names if any(fnmatch.fnmatch(n, p) for p in pats)]

    def infer(self) -> None:
        args = self.args
        for model_name in args.models:
            for batch in args.batches:
                if self.left_s() < args.reserve:
                    return
                row = dict(section="infer", model=model_name, batch=batch)
                try:
                    base = copy.deepcopy(self.base(model_name))
                    neat = make_model("neat-d2-qv-batched", self.base(model_name))
                    with torch.no_grad():  # a non-trivial update, so merging changes the weights
                        for n, p in neat.named_parameters():
                            if n.endswith(".B"):
                                p.normal_(std=0.01)
                    merged = merge_and_unload(copy.deepcopy(neat))
                    rounds: dict[str, list[float]] = {"base": [], "merged": []}
                    for _ in range(args.infer_rounds):  # interleaved, so drift hits both
                        for key, model in (("base", base), ("merged", merged)):
                            rounds[key].append(images_per_s(model, batch, self.device, "bf16", 2, args.steps))
                    row["base_img_s"] = statistics.median(rounds["base"])
                    row["merged_img_s"] = statistics.median(rounds["merged"])
                    row["neat_unmerged_img_s"] = images_per_s(neat, batch, self.device, "bf16", 2, args.steps)
                    del base, merged, neat
                    free(self.device)
                    if peft is not None:
                        lora = make_model("peft-lora", self.base(model_name))
                        row["lora_unmerged_img_s"] = images_per_s(lora, batch, self.device, "bf16", 2, args.steps)
                        del lora
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    if args.smoke or args.strict:
                        raise
                free(self.device)
                self.log(f"infer {model_name} b{batch}: {json.dumps({k: v for k, v in row.items() if 'img' in k})}")
                self.record(row)

    def compile(self) -> None:
        args = self.args
        for model_name in args.compile_models:
            for batch in args.compile_batches:
                for variant in args.compile_variants:
                    self.train_row("compile", model_name, batch, variant)

    def scaling(self) -> None:
        args = self.args
        model_name = args.models[0] if args.smoke else "vit_base_patch16_224"
        batch = args.scaling_batch
        variants = [v for v in ("peft-lora", "neat-d2-qv-batched", "neat-d6-qv-batched") if peft or "peft" not in v]
        for rank in args.ranks:
            for variant in variants:
                self.train_row("rank", model_name, batch, variant, rank=rank)
        for width_model in args.width_models:
            for variant in variants:
                self.train_row("width", width_model, batch, variant)

    def cars(self) -> None:
        model_name = self.args.models[0] if self.args.smoke else "vit_base_patch16_224"
        for amp in ("fp32", "bf16"):
            self.train_row("cars", model_name, self.args.cars_batch, "neat-d2-qv-batched", amp=amp, num_classes=196)

    def profile(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        args = self.args
        model_name, batch = args.models[0], args.batches[0]
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        for variant in args.profile_variants:
            if self.left_s() < args.reserve:
                return
            model = make_model(variant, self.base(model_name)).to(self.device).train()
            step = make_step(model, batch, self.device, "bf16")
            for _ in range(3):
                step()
            Clock(self.device).sync()
            n = 3
            with profile(activities=activities) as prof:
                for _ in range(n):
                    step()
                Clock(self.device).sync()
            events = prof.key_averages()
            kernels = sum(e.count for e in events if e.device_type.name == "CUDA") / n
            ops = sum(e.count for e in events if e.key.startswith("aten::") and e.device_type.name == "CPU") / n
            self.log(f"profile {variant} {model_name} b{batch}: {kernels:.0f} kernels, {ops:.0f} aten ops per step")
            row = dict(
                section="profile",
                model=model_name,
                batch=batch,
                variant=variant,
                kernels_per_step=kernels,
                aten_ops_per_step=ops,
            )
            if args.profile_out:
                with open(args.profile_out, "a") as f:
                    f.write(f"\n\n===== {variant} {model_name} batch {batch}: {kernels:.0f} kernels/step =====\n")
                    f.write(events.table(sort_by=sort, row_limit=30, max_name_column_width=60))
                    f.write("\nby CPU time\n")
                    f.write(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
            top = sorted(events, key=lambda e: -getattr(e, sort))[:8]
            row["top_ops"] = [(e.key[:60], round(getattr(e, sort) / n / 1e3, 3), e.count // n) for e in top]
            self.log("  top (ms/step, calls/step): " + "; ".join(f"{k} {t} x{c}" for k, t, c in row["top_ops"]))
            self.record(row)
            free(self.device)


def _row_line(row: dict) -> str:
    if "error" in row:
        return f"{row['section']} {row['model']} b{row['batch']} {row['variant']}: {row['error']}"
    flops = f" {row['flops'] / 1e12:.2f} TFLOP" if "flops" in row else ""
    rank = f" r{row['rank']}" if row.get("rank") else ""
    return (
        f"{row['section']} {row['model']} b{row['batch']} {row['variant']}{rank} {row['amp']} {row.get('optim', '')}: "
        f"{row['step_ms']:.2f} ms (min {row['step_ms_min']:.2f}), peak {row['peak_gib']:.2f} GiB, "
        f"trainable {row['trainable']:,}{flops} [{row.get('wall_s', 0)}s]"
    )


# ---- tables ----------------------------------------------------------------------------------------------


def _fmt(v, digits=1):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def render_markdown(meta: dict, results: list[dict]) -> str:
    out = [
        "# Speed and memory: NEAT vs peft's LoRA and PEANuT",
        "",
        f"- device: {meta['device']}; bf16 matmul peak measured in the run (8192^3): "
        f"{meta.get('bf16_peak_tflops', '-')} TFLOP/s",
        f"- torch {meta['torch']}, timm {meta['timm']}, peft {meta['peft']}, Python {meta['python']}, "
        f"neat-vision {meta['neat_vision']}",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}`",
        "- random weights (`pretrained=False`), 224 px, AdamW, bf16 autocast unless noted; step = forward + backward"
        " + optimizer; median of the timed steps after warm-up (CUDA events); peak = `max_memory_allocated`"
        " (weights + optimizer state + activations); trainable includes the classifier head in every variant.",
        "- peft cannot adapt the q and v slices of timm's fused `qkv`: its LoRA and PEANuT rows adapt `qkv` whole,"
        " and stand as the bar for both target rows.",
        "",
    ]
    main = [r for r in results if r["section"] == "main"]
    for model, optim in dict.fromkeys((r["model"], r.get("optim", "adamw")) for r in main):
        rows = [r for r in main if r["model"] == model and r.get("optim", "adamw") == optim]
        batches = list(dict.fromkeys(r["batch"] for r in rows))
        rounds = len({r.get("round", 0) for r in rows})
        note = {"adamw": "AdamW (foreach, the default)", "adamw-fused": "AdamW(fused=True)"}.get(optim, optim)
        note += f", median of {rounds} interleaved rounds" if rounds > 1 else ""
        out += [f"## Training step, {SHORT.get(model, model)}, {note}", ""]
        head = "| variant | target | trainable |"
        sep = "|---|---|---:|"
        for b in batches:
            head += f" ms, b{b} | x LoRA | peak GiB | x LoRA |"
            sep += "---:|---:|---:|---:|"
        out += [head, sep]
        lora = {b: _find(rows, "peft-lora", b) for b in batches}
        for variant in dict.fromkeys(r["variant"] for r in rows):
            method, target = describe(variant)
            cells = []
            trainable_count = None
            for b in batches:
                r = _find(rows, variant, b)
                ref = lora[b]
                if r is None or "error" in r:
                    cells.append(f" {'n/a' if r is None else 'failed'} | | | |")
                    continue
                trainable_count = r["trainable"]
                cells.append(
                    f" {_fmt(r['step_ms'])} | {_ratio(r, ref, 'step_ms')} | {_fmt(r['peak_gib'], 2)} | "
                    f"{_ratio(r, ref, 'peak_gib')} |"
                )
            tc = f"{trainable_count:,}" if trainable_count is not None else "-"
            out.append(f"| {method} | {target} | {tc} |" + "".join(cells))
        out.append("")
    llm = [r for r in results if r["section"] == "llm" and "variant" in r]
    if llm:
        first = llm[0]
        out += [
            f"## Language model: {first['model']} (random weights, bf16), batch {first['batch']} x "
            f"{first['seq']} tokens, r {first['rank']} on q k v up down, {first['optim']}",
            "",
            "peft PEANuT at peft depth 0 (= NEAT depth 2); LoRA alpha = r. Step = forward + backward + optimizer.",
            "",
            "| variant | trainable | ms | x LoRA | peak GiB | x LoRA |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        ref = _find(llm, "peft-lora", first["batch"])
        for variant in dict.fromkeys(r["variant"] for r in llm):
            r = _find(llm, variant, first["batch"])
            if r is None or "error" in r:
                out.append(f"| {variant} | | failed | | | |")
                continue
            out.append(
                f"| {variant} | {r['trainable']:,} | {_fmt(r['step_ms'])} | {_ratio(r, ref, 'step_ms')} | "
                f"{_fmt(r['peak_gib'], 2)} | {_ratio(r, ref, 'peak_gib')} |"
            )
        out.append("")
    errors = [r for r in results if "error" in r]
    infer = [r for r in results if r["section"] == "infer" and "error" not in r]
    if infer:
        out += [
            "## Inference (bf16 autocast, images/s; base and merged interleaved, median of rounds)",
            "",
            "| model | batch | base | merged NEAT | merged / base | NEAT unmerged (batched) | peft LoRA unmerged |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in infer:
            out.append(
                f"| {SHORT.get(r['model'], r['model'])} | {r['batch']} | {_fmt(r['base_img_s'], 0)} | "
                f"{_fmt(r['merged_img_s'], 0)} | {r['merged_img_s'] / r['base_img_s']:.3f} | "
                f"{_fmt(r['neat_unmerged_img_s'], 0)} | {_fmt(r.get('lora_unmerged_img_s'), 0)} |"
            )
        out.append("")
    comp = [r for r in results if r["section"] == "compile"]
    if comp:
        peak = meta.get("bf16_peak_tflops")
        out += [
            "## Compiled mode (transformer blocks `torch.compile`d, regional; against eager peft LoRA)",
            "",
            "| model | batch | variant | ms | x eager LoRA | eager ms, same variant | TFLOP/step | MFU | eager MFU |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in comp:
            if "error" in r:
                out.append(f"| {SHORT.get(r['model'], r['model'])} | {r['batch']} | {r['variant']} | failed ||||||")
                continue
            eager = _find_any(results, r["model"], r["batch"], _strip(r["variant"]))
            lora = _find_any(results, r["model"], r["batch"], "peft-lora")
            flops = (eager or {}).get("flops") or r.get("flops") or (lora or {}).get("flops")
            ok = flops and peak and not math.isnan(peak)
            mfu = flops / (r["step_ms"] / 1e3) / (peak * 1e12) if ok else None
            eager_mfu = flops / (eager["step_ms"] / 1e3) / (peak * 1e12) if ok and eager else None
            method, target = describe(r["variant"])
            out.append(
                f"| {SHORT.get(r['model'], r['model'])} | {r['batch']} | {method} ({target}) | {_fmt(r['step_ms'])} | "
                f"{_ratio(r, lora, 'step_ms')} | {_fmt((eager or {}).get('step_ms'))} | "
                f"{_fmt(flops / 1e12 if flops else None, 2)} | {_fmt(mfu * 100 if mfu else None)}% | "
                f"{_fmt(eager_mfu * 100 if eager_mfu else None)}% |"
            )
        out.append("")
    for section, title, key in (("rank", "rank", "rank"), ("width", "model width", "model")):
        rows = [r for r in results if r["section"] == section and "error" not in r]
        if not rows:
            continue
        b = rows[0]["batch"]
        what = SHORT.get(rows[0]["model"], rows[0]["model"]) if section == "rank" else "rank: LoRA 16, NEAT 7"
        out += [
            f"## Scaling with {title} ({what}, batch {b}, bf16; NEAT on q,v batched, LoRA on qkv)",
            "",
            f"| {title} | LoRA ms | NEAT d2 ms | x LoRA | NEAT d6 ms | x LoRA | LoRA GiB | NEAT d2 GiB | NEAT d6 GiB |"
            " LoRA trainable | NEAT d2 trainable |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for k in dict.fromkeys(r[key] for r in rows):
            group = {r["variant"]: r for r in rows if r[key] == k}
            lo, n2, n6 = (group.get(v) for v in ("peft-lora", "neat-d2-qv-batched", "neat-d6-qv-batched"))
            label = SHORT.get(k, k) if section == "width" else k
            out.append(
                f"| {label} | {_fmt((lo or {}).get('step_ms'))} | {_fmt((n2 or {}).get('step_ms'))} | "
                f"{_ratio(n2, lo, 'step_ms')} | {_fmt((n6 or {}).get('step_ms'))} | {_ratio(n6, lo, 'step_ms')} | "
                f"{_fmt((lo or {}).get('peak_gib'), 2)} | {_fmt((n2 or {}).get('peak_gib'), 2)} | "
                f"{_fmt((n6 or {}).get('peak_gib'), 2)} | {(lo or {}).get('trainable', 0):,} | "
                f"{(n2 or {}).get('trainable', 0):,} |"
            )
        out.append("")
    cars = [r for r in results if r["section"] == "cars" and "error" not in r]
    if cars:
        out += [
            "## StanfordCars recipe throughput (ViT-B/16, NEAT q,v r=7 depth 2, batch 64, 196 classes, synthetic data)",
            "",
            "| precision | step ms | images/s | peak GiB |",
            "|---|---:|---:|---:|",
        ]
        for r in cars:
            label = "fp32 (as the paper; TF32 off, PyTorch default)" if r["amp"] == "fp32" else "bf16 autocast"
            out.append(
                f"| {label} | {_fmt(r['step_ms'])} | {_fmt(r['batch'] / r['step_ms'] * 1e3, 0)} | "
                f"{_fmt(r['peak_gib'], 2)} |"
            )
        out.append("")
    prof = [r for r in results if r["section"] == "profile"]
    if prof:
        out += [
            "## Launches per training step (torch.profiler)",
            "",
            "| model | batch | variant | GPU kernels | aten ops |",
        ]
        out.append("|---|---:|---|---:|---:|")
        for r in prof:
            out.append(
                f"| {SHORT.get(r['model'], r['model'])} | {r['batch']} | {r['variant']} | "
                f"{r['kernels_per_step']:.0f} | {r['aten_ops_per_step']:.0f} |"
            )
        out.append("")
    if errors:
        out += ["## Not measured", ""]
        out += [f"- {r['section']} {r['model']} b{r['batch']} {r.get('variant', '')}: {r['error']}" for r in errors]
        out.append("")
    return "\n".join(out)


def _find(rows, variant, batch):
    """The row of ``variant`` at ``batch``; several rounds combine: median step time, largest peak."""
    found = [r for r in rows if r["variant"] == variant and r["batch"] == batch]
    good = [r for r in found if "error" not in r]
    if len(good) <= 1:
        return good[0] if good else (found[0] if found else None)
    row = dict(good[0])
    row["step_ms"] = statistics.median(r["step_ms"] for r in good)
    row["peak_gib"] = max(r["peak_gib"] for r in good)
    return row


def _find_any(results, model, batch, variant, optim="adamw"):
    rows = [
        r
        for r in results
        if r["section"] == "main" and r["model"] == model and r.get("optim", "adamw") == optim and "error" not in r
    ]
    return _find(rows, variant, batch)


def _ratio(row, ref, key):
    if not row or not ref or "error" in row or "error" in ref:
        return "-"
    a, b = row.get(key), ref.get(key)
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{a / b:.2f}"


# ---- command line ----------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [v for v in s.split(",") if v]  # noqa: E731
    ints = lambda s: [int(v) for v in csv(s)]  # noqa: E731
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 2 steps (the test suite runs this)")
    p.add_argument("--list", action="store_true", help="print the variant names and exit")
    p.add_argument("--device", default=None)
    p.add_argument("--models", type=csv, default=["vit_base_patch16_224", "vit_large_patch16_224"])
    p.add_argument("--levers-models", type=csv, default=["vit_base_patch16_224"], help="models that get every path")
    p.add_argument("--batches", type=ints, default=[64, 256])
    p.add_argument("--variants", type=csv, default=["*"], help="glob patterns over variant names")
    p.add_argument(
        "--sections", type=csv, default=["peak", "cars", "main", "infer", "scaling", "profile", "compile", "llm"]
    )
    p.add_argument("--rounds", type=int, default=1, help="repeat the main table, variants interleaved")
    p.add_argument("--optims", type=csv, default=["adamw"], help="adamw (foreach, default) and/or adamw-fused")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument(
        "--flops",
        type=csv,
        default=["peft-lora", "full", "neat-d2-qv-factored", "neat-d6-qv-factored", "neat-d*-qv-batched"],
        help="variant patterns whose FLOPs per step are counted (torch.utils.flop_counter; for MFU)",
    )
    p.add_argument("--infer-rounds", type=int, default=3)
    p.add_argument("--compile-models", type=csv, default=["vit_base_patch16_224"])
    p.add_argument("--compile-batches", type=ints, default=[256, 64])
    p.add_argument(
        "--compile-variants",
        type=csv,
        default=None,
        help="default: peft-lora+c,neat-d2-qv-factored+c,neat-d6-qv-factored+c",
    )
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--compile-warmup", type=int, default=3)
    p.add_argument("--ranks", type=ints, default=[1, 4, 16, 64])
    p.add_argument(
        "--width-models", type=csv, default=["vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224"]
    )
    p.add_argument("--scaling-batch", type=int, default=64)
    p.add_argument("--cars-batch", type=int, default=64)
    p.add_argument("--profile-variants", type=csv, default=["peft-lora", "neat-d6-qv-batched", "neat-d6-qv-plain"])
    p.add_argument("--profile-out", default=None, help="file for the full profiler tables")
    p.add_argument("--llm-config", default="llama-3.2-3b", choices=sorted(LLM_CONFIGS), help="llm section's shape")
    p.add_argument("--llm-variants", type=csv, default=list(LLM_VARIANTS))
    p.add_argument("--llm-batch", type=int, default=4)
    p.add_argument("--llm-seq", type=int, default=512)
    p.add_argument("--llm-rank", type=int, default=32)
    p.add_argument("--budget", type=float, default=1e9, help="seconds; later variants are skipped past it")
    p.add_argument("--reserve", type=float, default=0.0, help="stop starting variants this many seconds before")
    p.add_argument("--compile-reserve", type=float, default=60.0, help="extra seconds a compiled variant needs")
    p.add_argument("--strict", action="store_true", help="stop at the first failing variant")
    p.add_argument("--md", default=None, help="Markdown output (default benchmarks/RESULTS.md; none with --smoke)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.model_kwargs = {}
    if args.smoke:
        args.device = args.device or "cpu"
        args.models = ["vit_tiny_patch16_224"]
        args.levers_models = args.models
        args.model_kwargs = dict(img_size=32, patch_size=16, depth=2)
        torch.set_num_threads(1)
        args.batches = [2]
        args.warmup, args.steps, args.compile_warmup, args.infer_rounds = 1, 1, 1, 1
        args.compile_models, args.compile_batches = args.models, [2]
        args.compile_backend = "aot_eager"
        args.compile_variants = args.compile_variants or ["neat-d6-qv-batched+c"]
        args.ranks, args.width_models, args.scaling_batch, args.cars_batch = [1, 2], args.models, 2, 2
        args.flops = ["peft-lora", "neat-d6-qv-batched"]
        args.compile_reserve = 0.0
        args.ranks = [2]
        args.profile_variants = ["neat-d6-qv-batched"]
        args.llm_config, args.llm_batch, args.llm_seq, args.llm_rank = "smoke", 2, 16, 4
        if args.variants == ["*"]:
            args.variants = list(SMOKE_VARIANTS)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.compile_variants = args.compile_variants or ["peft-lora+c", "neat-d2-qv-factored+c", "neat-d6-qv-factored+c"]
    if args.md is None and not args.smoke:
        args.md = str(ROOT / "benchmarks" / "RESULTS.md")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(variant_names()))
        return 0
    if args.smoke and peft is None:
        args.variants = [v for v in args.variants if not v.startswith("peft")]
    bench = Bench(args)
    bench.log(f"{bench.meta['device']} torch {torch.__version__} timm {timm.__version__} peft {bench.meta['peft']}")
    for section in args.sections:
        if bench.left_s() < args.reserve:
            bench.log(f"section {section} skipped: time budget")
            continue
        getattr(bench, section)()
    if args.md:
        bench.log(f"wrote {args.md}")
    if args.md and not args.smoke:
        print(Path(args.md).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
