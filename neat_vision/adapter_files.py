"""The adapter file format: save, read and load adapter folders, and the base fingerprint they carry.

An adapter file is a folder with ``adapter.safetensors`` (the trainable tensors: updates and head; and the
BatchNorm running statistics, which training in train mode changes) and ``adapter_config.json`` (method and
config, what base model it was trained on, and a fingerprint of the adapted base weights, so loading onto other
weights fails instead of silently producing garbage).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .adapter import apply_adapter, undo_apply
from .atomic import atomic_write
from .layers import adapted_layers
from .methods import METHODS, ConfigError

ADAPTER_WEIGHTS = "adapter.safetensors"


ADAPTER_CONFIG = "adapter_config.json"


FORMAT = "neat-vision-adapter"


# callables that describe a model's base (library, name, tag, classes); integrations append to this
BASE_DESCRIBERS: list[Callable[[nn.Module], dict[str, Any] | None]] = []


class AdapterMismatchError(RuntimeError):
    """An adapter file does not fit the model it is loaded onto."""


class AdapterFileError(ValueError):
    """An adapter folder's files are cut, edited or inconsistent (not as `save_adapter` wrote them)."""


def _sketch_vectors(n: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, n, generator=gen, dtype=torch.float64)


@torch.no_grad()
def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Identity of the adapted base weights: an exact hash, and per layer a norm and bilinear sketches.

    The sketches ``u_j^T W0 v_j`` (fixed Gaussian ``u``, ``v``) change by about ``||W0 - W0'||`` when the
    weights change, so a cast to another dtype passes a tolerant check while other weights do not.
    """
    digest = hashlib.sha256()
    layers = {}
    for name, layer in adapted_layers(model).items():
        w = layer._matrix(layer.base_weight).detach().cpu().contiguous()  # a conv kernel as its matrix
        digest.update(name.encode())
        digest.update(str(w.dtype).encode())
        digest.update(w.view(-1).view(torch.uint8).numpy().tobytes())
        w64 = w.double()
        u = _sketch_vectors(w.shape[0], 1)
        v = _sketch_vectors(w.shape[1], 2)
        sketch = torch.einsum("jo,oi,ji->j", u, w64, v) / (w.shape[0] * w.shape[1]) ** 0.5
        layers[name] = {"shape": list(w.shape), "norm": float(w64.norm()), "sketch": sketch.tolist()}
    return {"sha256": digest.hexdigest(), "layers": layers}


def _compare_fingerprints(saved: dict[str, Any], current: dict[str, Any], rtol: float = 1e-2) -> list[str]:
    problems = []
    if set(saved["layers"]) != set(current["layers"]):
        only_saved = sorted(set(saved["layers"]) - set(current["layers"]))
        only_here = sorted(set(current["layers"]) - set(saved["layers"]))
        return [f"adapted layers differ: only in file {only_saved[:5]}, only in model {only_here[:5]}"]
    for name, s in saved["layers"].items():
        c = current["layers"][name]
        if s["shape"] != c["shape"]:
            problems.append(f"{name}: shape {c['shape']} != saved {s['shape']}")
            continue
        tol = rtol * max(s["norm"], 1e-12) / (s["shape"][0] * s["shape"][1]) ** 0.5
        if abs(s["norm"] - c["norm"]) > rtol * s["norm"] or any(
            abs(a - b) > tol for a, b in zip(s["sketch"], c["sketch"])
        ):
            problems.append(f"{name}: norm {c['norm']:.6g} vs saved {s['norm']:.6g}")
    return problems


def describe_base(model: nn.Module) -> dict[str, Any]:
    """What the integrations know about the base model (e.g. timm name, pretrained tag, classes)."""
    for describe in BASE_DESCRIBERS:
        info = describe(model)
        if info:
            return info
    return {"class": type(model).__name__}


def running_stats(model: nn.Module) -> dict[str, Tensor]:
    """Buffers a training forward updates: the running statistics of normalisation layers (BatchNorm's).

    A frozen CNN's BatchNorm still tracks the batches it sees in training mode, so these belong to what an
    adapter computes with, next to its trainable tensors.
    """
    stats = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            for key, buf in module.named_buffers(recurse=False):
                stats[f"{name}.{key}" if name else key] = buf
    return stats


def trained_state(model: nn.Module) -> dict[str, Tensor]:
    """What training changes: every trainable parameter and the running statistics (`running_stats`), by name."""
    state = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state.update(running_stats(model))
    return state


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tensors: Mapping[str, torch.Tensor] | None = None,
    base: tuple[dict[str, Any], dict[str, Any]] | None = None,
) -> Path:
    """Write the trained state (`trained_state`) and the adapter config to the folder ``path``; return it.

    A sharded model (FSDP) passes its gathered trainable ``tensors`` and ``base`` = ``(describe_base(model),
    fingerprint(model))`` taken before it was sharded.
    """
    from safetensors.torch import save_file

    config = getattr(model, "neat_config", None)
    if config is None:
        raise ValueError("save_adapter: this model has no adapter (apply_neat or create_model(neat=...) first)")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = {n: t.detach() for n, t in trained_state(model).items()}
    tensors = {n: t.cpu().contiguous() for n, t in tensors.items()}
    described, base_fingerprint = base if base is not None else (describe_base(model), fingerprint(model))
    meta = {
        "format": FORMAT,
        "version": 1,
        "method": config.method,
        "config": config.identity_dict(),
        "base": described,
        "fingerprint": base_fingerprint,
        "tensors": sorted(tensors),
    }
    atomic_write(folder / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    atomic_write(folder / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return folder


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of an adapter folder (`AdapterFileError` naming the file when it is cut or edited)."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"no adapter config at {file} (expected a folder written by save_adapter)")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(
            f"{file} is not valid JSON ({err}): the file is cut or edited; save the adapter again"
        ) from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise AdapterMismatchError(f"{file} is not a {FORMAT} file (format={found!r})")
    fingerprint_ok = isinstance(meta.get("fingerprint"), dict) and {"sha256", "layers"} <= set(meta["fingerprint"])
    missing = [k for k in ("method", "config") if k not in meta] + ([] if fingerprint_ok else ["fingerprint"])
    if missing:
        raise AdapterFileError(f"{file} lacks {', '.join(missing)}: the file is edited; save the adapter again")
    return meta


def config_from_meta(meta: Mapping[str, Any]) -> Any:
    """The config object recorded in an adapter's metadata."""
    method = meta["method"]
    if method not in METHODS:
        raise AdapterMismatchError(f"adapter method {method!r} is unknown here; known: {', '.join(METHODS)}")
    return METHODS[method].coerce(meta["config"])


def _read_tensors(path: str | os.PathLike, meta: Mapping[str, Any]) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"no adapter weights at {file} (expected a folder written by save_adapter)")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(
            f"{file} cannot be read ({str(err).splitlines()[0][:200]}): the file is cut or is not a safetensors "
            "file; save the adapter again"
        ) from err
    listed = meta.get("tensors")
    if listed is not None and sorted(tensors) != sorted(listed):
        raise AdapterFileError(
            f"{file} holds other tensors than {Path(path) / ADAPTER_CONFIG} lists (the two files come from "
            "different saves); save the adapter again"
        )
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise AdapterFileError(f"{file}: {len(bad)} tensor(s) hold NaN or inf (e.g. {bad[0]}); this adapter is broken")
    return tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, *, check_base: bool = True, **apply_kwargs) -> nn.Module:
    """Load an adapter folder into ``model`` (adapting it first if it is a plain model); return it.

    Raises `AdapterMismatchError` when the model's adapted base weights are not those the adapter was
    trained on (pass ``check_base=False`` to skip the check), or when the tensors do not fit, and
    `AdapterFileError` (or ``FileNotFoundError``) naming the file when the folder's files are cut or missing.
    On any failure the model is left exactly as it was given.
    """
    meta = read_adapter_config(path)
    try:
        config = config_from_meta(meta)
    except ConfigError as err:
        raise AdapterFileError(f"{Path(path) / ADAPTER_CONFIG}: {err}") from err
    tensors = _read_tensors(path, meta)
    undo = None
    if not adapted_layers(model):
        undo = undo_apply(model)
    elif getattr(model, "neat_config", None) != config:
        raise AdapterMismatchError(
            f"the model is adapted with {getattr(model, 'neat_config', None)}, the file with {config}"
        )
    try:
        if undo is not None:
            apply_adapter(model, config, **apply_kwargs)
        _check_fits(model, path, meta, tensors, check_base)
    except BaseException:
        if undo is not None:
            undo()
        raise
    params = dict(model.named_parameters())
    stats = running_stats(model)
    merged = [layer for layer in adapted_layers(model).values() if layer.merged]
    for layer in merged:
        layer.unmerge()
    with torch.no_grad():
        for name, t in tensors.items():
            if name in params:
                params[name].copy_(t)
                params[name].requires_grad_(True)
            else:
                stats[name].copy_(t)
    for layer in merged:
        layer.merge()
    return model


def _check_fits(
    model: nn.Module, path: str | os.PathLike, meta: Mapping[str, Any], tensors: Mapping[str, Tensor], check_base: bool
) -> None:
    """Raise `AdapterMismatchError` unless ``tensors`` fit ``model`` (and its base weights are the adapter's)."""
    if check_base:
        current = fingerprint(model)
        if current["sha256"] != meta["fingerprint"]["sha256"]:
            problems = _compare_fingerprints(meta["fingerprint"], current)
            if problems:
                raise AdapterMismatchError(
                    f"adapter {path} was trained on other base weights ({meta.get('base')}); "
                    f"{len(problems)} adapted layer(s) differ, e.g. {'; '.join(problems[:3])}. "
                    "Load the same pretrained weights, or pass check_base=False to force."
                )
            warnings.warn(
                "adapted base weights match the adapter's only up to precision (another dtype?)", stacklevel=3
            )
    params = dict(model.named_parameters())
    stats = running_stats(model)
    for name, t in tensors.items():
        target = params.get(name, stats.get(name))
        if target is None:
            raise AdapterMismatchError(f"adapter tensor {name} has no parameter or running statistic in this model")
        if target.shape != t.shape:
            raise AdapterMismatchError(f"adapter tensor {name}: shape {tuple(t.shape)} != {tuple(target.shape)}")
