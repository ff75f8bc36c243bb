"""Which of timm's model families NEAT, LoRA and FourierFT adapt and train: checks per family, a table.

A family is a model module of the installed timm (``timm.list_modules()``). For each one its smallest
architecture (fewest parameters, counted on the meta device) is built with ``pretrained=False`` at a small
input size, with ``targets="default"`` (the per-family rule of `neat_vision.targets`), and for each method:

1. reached: a training forward runs every adapted layer (the library's own check, plus hooks here);
2. identity: at init the adapted model's output is identical to the base model's (eval mode), bit for bit; where
   the timm integration patched the forward (BEiT, EVA, SwinV2: ``qkv_bias_separate``, the q/v bias added after
   the matmul instead of inside it) within 1e-6 relative, the rounding of that reordered sum;
3. gradient: every update gets a non-zero gradient from the pre-logits features;
4. merge: after one optimizer step, the merged model computes what the unmerged one does, unmerge restores
   ``W0`` bit for bit, and ``merge_and_unload`` gives the base architecture with the same outputs;
5. round trip: ``save_adapter`` then ``load_adapter`` onto a fresh copy of the base gives identical outputs.

Random weights stand in for pretrained ones, with one change: parameters that timm initialises to zero
(SwinV2's post-norm gains, ResNet's last BN gain per block, layer scales set to 0) are drawn at random, since
a zero gain passes no gradient to the branch behind it (pretrained gains are not zero).

    python benchmarks/coverage.py                      # every family -> benchmarks/COVERAGE.md
    python benchmarks/coverage.py --families resnet beit --out /tmp/c.md
    python benchmarks/coverage.py --update --families csatv2   # recheck rows of the committed table

``tests/test_coverage.py`` runs the same checks on a table of tiny configurations.
"""

from __future__ import annotations

import argparse
import copy
import gc
import platform
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import DropPath
from torch import Tensor, nn

import neat_vision
from neat_vision import FourierConfig, LoraConfig, NeatConfig
from neat_vision.adapter import adapter_parameters
from neat_vision.layers import adapted_layers
from neat_vision.reach import UnreachedLayerError
from neat_vision.targets import DEFAULT, DEFAULT_ALIASES, KIND_ALIASES, default_targets, matrix_shape, resolve_targets

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 5
METHODS = ("neat", "lora", "fourierft")
SIZES = (64, 96, 128, 160, 224)  # input sizes tried, smallest first
BATCH = 4  # BatchNorm in training mode needs more than one value per channel; a few more make sparse (ReLU)
# activations unlikely to miss an update's input by chance


@dataclass
class Case:
    """One family to check: the architecture, the ``create_model`` keyword arguments and the input size."""

    family: str
    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    size: int = 64
    targets: Any = "default"


def build_base(case: Case, seed: int = 0) -> nn.Module:
    """The plain model in eval mode; timm's zero-initialised parameters drawn at random (module docstring)."""
    torch.manual_seed(seed)
    model = timm.create_model(case.arch, pretrained=False, num_classes=NUM_CLASSES, **case.kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() and not p.any():
                p.normal_(std=0.1)
    return model.eval()


@torch.no_grad()
def enlarge_layer_scales(model: nn.Module) -> nn.Module:
    """Layer scales (timm's ``gamma``, a constant 1e-6..0.1 at init) set to 1, in place.

    A small layer scale shrinks what an update changes in the output below the merge tolerance, so a layer that
    ignored its update at inference would pass the merge checks.
    """
    for p in model.parameters():
        if p.is_floating_point() and p.dim() == 1 and p.numel() and p.any() and (p == p[0]).all() and p[0].abs() < 1:
            p.fill_(1.0)
    return model


def images(case: Case, seed: int = 1) -> Tensor:
    return torch.randn(BATCH, 3, case.size, case.size, generator=torch.Generator().manual_seed(seed))


def method_config(method: str, model: nn.Module, targets: Any) -> Any:
    """The config each method is checked with: rank 2 (FourierFT: 16 coefficients, or the smallest block)."""
    if method == "neat":
        return NeatConfig(targets=targets, rank=2)
    if method == "lora":
        return LoraConfig(targets=targets, rank=2)
    blocks = [
        (stop - start) * matrix_shape(model.get_submodule(t.name))[1]
        for t in resolve_targets(model, NeatConfig(targets=targets).targets)
        for start, stop in t.slices
    ]
    return FourierConfig(targets=targets, n=min(16, *blocks))


class CheckFailed(AssertionError):
    """One check failed; the message starts with the check's name."""


def _check(name: str, ok: bool, reason: str) -> None:
    if not ok:
        raise CheckFailed(f"{name}: {reason}")


def _features(model: nn.Module, x: Tensor) -> Tensor:
    """Pre-logits features (timm's ``forward_head(..., pre_logits=True)``), else the output."""
    try:
        out = model.forward_head(model.forward_features(x), pre_logits=True)
    except (AttributeError, TypeError, NotImplementedError):
        out = model(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def _relative(got: Tensor, expected: Tensor) -> float:
    """Largest difference relative to the output's scale."""
    return ((got - expected).abs().max() / (1 + expected.abs().max())).item()


def _dead_updates(model: nn.Module, x: Tensor) -> list[str]:
    """Updates whose parameters all get a zero gradient from a random projection of the pre-logits features.

    Dropout and stochastic depth are off for this forward (NesT drops a block's branch with probability 0.5).
    At init only the zero factor gets a gradient (NEAT's and LoRA's ``B``): ``g.T @ (x @ right.T)``. With random
    weights an input channel can be dead (ReLU) for every image, and a ReLU tweaker's ``right`` can be zero on
    exactly the live ones; `check_method` then draws the updates once more. An update the loss does not depend
    on gets no gradient for any draw.
    """
    model.zero_grad(set_to_none=True)
    for module in model.modules():  # a branch that stochastic depth or dropout drops passes no gradient by chance
        if isinstance(module, (nn.Dropout, DropPath)):
            module.eval()
    feats = _features(model, x)
    (feats * torch.randn(feats.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    return [
        f"{name}.updates.{k}"
        for name, layer in adapted_layers(model).items()
        for k, update in enumerate(layer.updates)
        if not any(p.grad is not None and p.grad.abs().sum() > 0 for p in update.parameters())
    ]


def _rows_without_gradient(base: nn.Module, x: Tensor, dead: dict[str, Any]) -> int:
    """How many of the ``dead`` updates adapt weight rows that full fine-tuning of ``base`` cannot move either."""
    base.train().requires_grad_(True)
    for module in base.modules():
        if isinstance(module, (nn.Dropout, DropPath)):
            module.eval()
    feats = _features(base, x)
    (feats * torch.randn(feats.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    count = 0
    for name, layer in dead.items():
        start, stop = layer.slices[int(name.rsplit(".", 1)[1])]
        grad = base.get_submodule(name.split(".updates.")[0]).weight.grad
        count += grad is None or not grad[start:stop].any()
    return count


def check_method(make_base: Callable[[], nn.Module], config: Any, x: Tensor, tol: float = 1e-4) -> None:
    """The five checks of the module docstring, in order, on models from ``make_base`` (same weights each call).

    Raises `CheckFailed` naming the first check that fails: ``identity``, ``reached``, ``gradient``,
    ``update`` (after 5 steps the update must move the pre-logits output by over ``10 * tol``), ``round trip``
    or ``merge``.
    """
    model = make_base().eval()
    types = {name: type(module) for name, module in model.named_modules()}
    with torch.no_grad():
        expected = model(x)
    neat_vision.apply_adapter(model, config)
    layers = adapted_layers(model)
    with torch.no_grad():
        got = model(x)
    diff = (got - expected).abs().max().item()
    if model.__dict__.get("_neat_restore"):  # a forward patch: the bias added after the matmul rounds differently
        err = _relative(got, expected)
        _check("identity", err < 1e-6, f"output differs from the base model at init by {err:.3g} (relative)")
    else:
        _check("identity", torch.equal(got, expected), f"output differs from the base model at init by {diff:.3g}")

    # from here on the layer scales are 1 (in this model and every other one made), so the update shows
    enlarge_layer_scales(model)
    made = make_base

    def make_base() -> nn.Module:
        return enlarge_layer_scales(made())

    with torch.no_grad():
        before = _features(model, x)  # dW = 0, layer scales 1; pre-logits: some heads are scaled by 1e-3

    model.train()
    ran: set[str] = set()
    hooks = [layer.register_forward_pre_hook(lambda m, a, n=name: ran.add(n)) for name, layer in layers.items()]
    try:
        model(x)
    except UnreachedLayerError as err:  # the library's own check, at the first training forward
        raise CheckFailed(f"reached: {err}") from None
    finally:
        for hook in hooks:
            hook.remove()
    missed = sorted(set(layers) - ran)
    _check("reached", not missed, f"{len(missed)} of {len(layers)} adapted layers never ran, e.g. {missed[:3]}")

    dead = _dead_updates(model, x)
    if dead:  # once more with the updates' random parameters drawn again (the docstring of _dead_updates)
        torch.manual_seed(1)
        for layer in layers.values():
            for update in layer.updates:
                if hasattr(update, "reset_parameters"):
                    update.reset_parameters()
        dead = _dead_updates(model, x)
    if dead:
        frozen = _rows_without_gradient(make_base(), x, {n: layers[n.split(".updates.")[0]] for n in dead})
        note = f"; {frozen} of them adapt weight rows that get none in full fine-tuning either" if frozen else ""
        _check("gradient", False, f"{len(dead)} updates get no gradient from the features, e.g. {dead[:3]}{note}")

    optimizer = torch.optim.AdamW(adapter_parameters(model), lr=1e-1)
    for _ in range(5):  # dW is not zero, and visible in the output, after a few steps along the same gradient
        optimizer.step()
    model.eval()
    _check("merge", any(layer.delta_weight().abs().sum() > 0 for layer in layers.values()), "no update after a step")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        y = _features(model, x)
        # the update must show in the output well above the merge tolerance, or merge checks would pass vacuously
        moved = _relative(y, before)
        _check(
            "update",
            moved > 10 * tol,
            f"the trained update moves the eval output by {moved:.3g} (relative), not above {10 * tol:.0e}",
        )
        neat_vision.save_adapter(model, tmp)
        fresh = neat_vision.load_adapter(make_base(), tmp).eval()
        _check("round trip", torch.equal(_features(fresh, x), y), "the loaded adapter computes other outputs")

    with torch.no_grad():
        w0 = {n: layer.weight.detach().clone() for n, layer in layers.items()}
        delta = {n: layer.delta_weight() for n, layer in layers.items()}
        neat_vision.merge(model)
        off = [n for n, layer in layers.items() if not torch.allclose(layer.weight, w0[n] + delta[n].to(w0[n].dtype))]
        _check("merge", not off, f"merged weight is not W0 + dW: {off[:3]}")
        err = _relative(_features(model, x), y)
        _check("merge", err < tol, f"merged output differs from the unmerged one by {err:.3g} (relative)")
        neat_vision.unmerge(model)
        changed = [n for n, layer in layers.items() if not torch.equal(layer.weight, w0[n])]
        _check("merge", not changed, f"unmerge does not restore W0 bit for bit: {changed[:3]}")
        _check("merge", torch.equal(_features(model, x), y), "output after unmerge differs from before merge")
        plain = neat_vision.merge_and_unload(model)
        wrong = [n for n in layers if type(plain.get_submodule(n)) is not types[n]]
        _check("merge", not wrong, f"merge_and_unload did not restore the base layer types: {wrong[:3]}")
        err = _relative(_features(plain, x), y)
        _check("merge", err < tol, f"merge_and_unload output differs by {err:.3g} (relative)")


def run_case(case: Case, make_base: Callable[[], nn.Module] | None = None) -> tuple[str, int, list[str]]:
    """Every method's checks on one family: ``(targets, adapted layers, problems)``.

    ``make_base`` returns the base model, the same weights on every call (default: copies of `build_base`'s).
    """
    x = images(case)
    base = build_base(case) if make_base is None else make_base()
    make_base = make_base or (lambda: copy.deepcopy(base))
    targets = NeatConfig(targets=case.targets).targets
    n_layers = len(resolve_targets(base, targets))
    problems = []
    for method in METHODS:
        try:
            check_method(make_base, method_config(method, base, case.targets), x)
        except Exception as err:  # noqa: BLE001 - any failure is a row of the table
            problems.append(
                f"{method}: {err}" if isinstance(err, CheckFailed) else f"{method}: {type(err).__name__}: {err}"
            )
    return describe_targets(base, case.targets), n_layers, problems


def describe_targets(model: nn.Module, targets: Any) -> str:
    """``default`` resolved to the aliases it stands for on ``model``."""
    names = NeatConfig(targets=targets).targets
    if DEFAULT not in names:
        return ", ".join(names)
    rule = default_targets(model)
    if all(t in DEFAULT_ALIASES or t in KIND_ALIASES for t in rule):
        return "default: " + ", ".join(rule)
    return "default: every block layer"


# ---- choosing the architecture and input size of a family -------------------------------------------------


def smallest_architecture(family: str) -> str | None:
    """The registered architecture of ``family`` with the fewest parameters (built on the meta device)."""
    best = None
    for name in timm.list_models(module=family):
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False)
        except Exception:  # noqa: BLE001 - an architecture that does not build is skipped
            continue
        count = sum(p.numel() for p in model.parameters())
        if best is None or count < best[1]:
            best = (name, count)
    return None if best is None else best[0]


def fit_input(family: str, arch: str) -> Case:
    """The smallest input size the architecture runs at (without, then with, ``img_size=``), else its own."""
    torch.manual_seed(0)
    cfg = timm.get_pretrained_cfg(arch)
    own = int(cfg.input_size[-1]) if cfg is not None else 224
    for size in (*[s for s in SIZES if s < own], own):
        for kwargs in ({}, {"img_size": size}):
            try:
                model = timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES, **kwargs).eval()
                with torch.no_grad():
                    model(torch.zeros(BATCH, 3, size, size))
                return Case(family, arch, kwargs, size)
            except Exception:  # noqa: BLE001 - try the next size
                continue
    return Case(family, arch, {}, own)


def read_archs(table: Path) -> dict[str, str]:
    """family -> architecture of a table this script wrote (to skip the search for the smallest one)."""
    archs = {}
    for line in table.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 2 and cells[1] not in ("architecture", "-", "---") and not cells[0].startswith("-"):
            archs[cells[0]] = cells[1]
    return archs


def read_rows(table: Path) -> list[dict[str, Any]]:
    """The rows of a table this script wrote."""
    keys = ("family", "arch", "size", "targets", "layers", "status", "reason")
    rows = []
    for line in table.read_text().splitlines():
        if not line.startswith("| ") or line.startswith("| family |"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        if len(cells) == len(keys):
            rows.append(dict(zip(keys, cells)))
    return rows


def families() -> list[str]:
    """timm's model modules (neat_vision registers its own models in a module named ``models``; not timm's)."""
    return [m for m in timm.list_modules() if m != "models"]


def write_table(rows: list[dict[str, Any]], out: Path, seconds: float, command: str, updated: str = "") -> None:
    ok = sum(r["status"] == "ok" for r in rows)
    lines = [
        "# timm model families: NEAT, LoRA and FourierFT adapt and train",
        "",
        f"{ok} of {len(rows)} families pass every check (timm {timm.__version__}, torch {torch.__version__}, "
        f"neat-vision {neat_vision.__version__}, {platform.machine()} CPU, {seconds / 60:.1f} min).{updated}",
        "",
        f'Command: `{command}`. Each family\'s smallest architecture, `pretrained=False`, `targets="default"`; '
        "for NEAT (r 2), LoRA (r 2) and FourierFT (n 16): every adapted layer reached, output identical at init, "
        "a gradient on every update, merged == unmerged (and `merge_and_unload`), save/load round trip "
        "(`benchmarks/coverage.py` says how).",
        "",
        "| family | architecture | input | targets | layers | status | reason |",
        "|---|---|---:|---|---:|---|---|",
    ]
    for r in rows:
        reason = r["reason"].replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {r['family']} | {r['arch']} | {r['size']} | {r['targets']} | {r['layers']} | {r['status']} | {reason} |"
        )
    out.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="*", default=None, help="timm modules to check (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "COVERAGE.md", help="table to write")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--archs-from", type=Path, default=None, help="reuse the architectures of a table this script wrote"
    )
    parser.add_argument(
        "--update", action="store_true", help="recheck --families only and replace their rows in the --out table"
    )
    args = parser.parse_args(argv)
    if args.update and not (args.families and args.out.is_file()):
        parser.error("--update needs --families and an existing --out table")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    start = time.time()
    known = read_archs(args.archs_from) if args.archs_from else {}
    rows = []
    for family in args.families or families():
        t0 = time.time()
        row = {"family": family, "arch": "-", "size": "-", "targets": "-", "layers": 0}
        try:
            arch = known.get(family) or smallest_architecture(family)
            if arch is None:
                raise RuntimeError("no architecture of this family builds")
            case = fit_input(family, arch)
            row.update(arch=case.arch, size=case.size)
            targets, layers, problems = run_case(case)
            row.update(targets=targets, layers=layers)
        except Exception as err:  # noqa: BLE001 - any failure is a row of the table
            problems = [f"{type(err).__name__}: {err}"]
        row["status"] = "ok" if not problems else "fail"
        row["reason"] = "; ".join(p[:300] for p in problems)
        rows.append(row)
        print(f"{family:28s} {row['arch']:40s} {row['status']:4s} {time.time() - t0:6.1f}s {row['reason'][:200]}")
        sys.stdout.flush()
        gc.collect()
    command = "python benchmarks/coverage.py" + (f" --families {' '.join(args.families)}" if args.families else "")
    if args.update:
        header = args.out.read_text().splitlines()
        old_command = next(line for line in header if line.startswith("Command: `")).split("`")[1]
        old_minutes = float(re.search(r"CPU, ([0-9.]+) min", header[2]).group(1))
        fresh = {r["family"]: r for r in rows}
        old = read_rows(args.out)
        rows = [fresh.pop(r["family"], r) for r in old] + list(fresh.values())
        updated = f" Rows of {', '.join(args.families)} rechecked with `{command} --update`."
        write_table(rows, args.out, old_minutes * 60, old_command, updated)
    else:
        write_table(rows, args.out, time.time() - start, command)
    print(f"{sum(r['status'] == 'ok' for r in rows)} of {len(rows)} families pass; table: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
