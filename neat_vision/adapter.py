"""Apply, merge and unload updates on a model; save and load adapter files.

An adapter file is a folder with ``adapter.safetensors`` (the trainable tensors: updates and head; and the
BatchNorm running statistics, which training in train mode changes) and
``adapter_config.json`` (method and config, what base model it was trained on, and a fingerprint of the
adapted base weights, so loading onto other weights fails instead of silently producing garbage).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import secrets
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import CONFIG_TYPES, ConfigError, NeatConfig
from .conv import AdaptedConv2d
from .layers import AdaptedLayer, AdaptedLinear, batch_tweakers
from .targets import AliasTable, head_names, resolve_targets

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "neat-vision-adapter"

# callables that describe a model's base (library, name, tag, classes); integrations append to this
BASE_DESCRIBERS: list[Callable[[nn.Module], dict[str, Any] | None]] = []

# callables (model, adapted layers by name) -> [(module name, attribute, value)]: attribute settings that make a
# model's forward call adapted layers it would otherwise bypass (timm: attentions that read ``qkv.weight``).
# apply_adapter sets them and merge_and_unload restores the old values; integrations append to this.
FORWARD_PATCHES: list[Callable[[nn.Module, Mapping[str, AdaptedLayer]], list[tuple[str, str, Any]]]] = []


class AdapterMismatchError(RuntimeError):
    """An adapter file does not fit the model it is loaded onto."""


class AdapterFileError(ValueError):
    """An adapter folder's files are cut, edited or inconsistent (not as `save_adapter` wrote them)."""


class UnreachedLayerError(RuntimeError):
    """An adapted layer is never called by the model's forward, so its update would not train."""


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    """The model's adapted layers (`AdaptedLinear`, `AdaptedConv2d`) by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def _adapted(base: nn.Module, slices: tuple[tuple[int, int], ...], config: Any) -> AdaptedLayer:
    cls = AdaptedConv2d if isinstance(base, nn.Conv2d) else AdaptedLinear
    return cls(base, slices, config.make_update, path=config.path)


def _note(ran: set[str], name: str, module: nn.Module, args: Any) -> None:
    ran.add(name)


class _ReachCheck:
    """The one-shot check that every adapted layer runs, at the model's first training forward.

    Before a forward in training mode with gradients on, it hooks every adapted layer to note that it ran;
    after the forward it removes those hooks and then, when every layer ran, itself. A layer that did not run
    raises `UnreachedLayerError` naming it (and the check stays: the next training forward fails too). It
    stands aside under ``torch.compile`` (the compiled forward runs no Python hooks) and removes itself when
    a submodule is compiled (``module.compile()``), where hooks on the layers would cost a recompilation.
    """

    def __init__(self) -> None:
        self.hook_ids: tuple[int, int] | None = None
        self.ran: set[str] = set()
        self.handles: list[Any] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"hook_ids": self.hook_ids}  # the per-forward hooks do not outlive a forward

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()
        self.hook_ids = state["hook_ids"]

    def _release(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def pre(self, model: nn.Module, args: Any) -> None:
        if not model.training or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return
        self._release()  # left over from a forward that raised
        if any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()):
            check_reached(model, enabled=False)
            return
        self.ran = set()
        for name, layer in adapted_layers(model).items():
            self.handles.append(layer.register_forward_pre_hook(functools.partial(_note, self.ran, name)))

    def post(self, model: nn.Module, args: Any, output: Any) -> None:
        if not self.handles:
            return
        self._release()
        layers = adapted_layers(model)
        missed = [name for name in layers if name not in self.ran]
        if missed:
            raise UnreachedLayerError(
                f"{len(missed)} of {len(layers)} adapted layers never ran in {type(model).__name__}'s training forward "
                f"(e.g. {', '.join(missed[:4])}): the model reads their weights directly or skips them, so their "
                "updates would not train. Pick other targets, or, if the forward skips them on purpose, call "
                "neat_vision.check_reached(model, enabled=False)"
            )
        check_reached(model, enabled=False)


def check_reached(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Install (idempotent) or remove the one-shot check that every adapted layer runs in training.

    `apply_adapter` installs it: the model's first forward in training mode (gradients on) raises
    `UnreachedLayerError` naming each adapted layer the forward did not call, then the check removes itself.
    """
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, h in hooks.items() if isinstance(getattr(h, "__self__", None), _ReachCheck)]:
            del hooks[key]
    if enabled:
        check = _ReachCheck()
        pre = model.register_forward_pre_hook(check.pre)
        post = model.register_forward_hook(check.post)
        check.hook_ids = (pre.id, post.id)
    return model


def _drop_missing_update_keys(module: nn.Module, incompatible_keys) -> None:
    """Load hook: a plain base checkpoint (no update tensors at all) loads into an adapted model."""
    update_keys = {
        f"{name}.updates.{key}" for name, layer in adapted_layers(module).items() for key in layer.updates.state_dict()
    }
    missing = set(incompatible_keys.missing_keys)
    if update_keys and update_keys <= missing:
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in update_keys]


def _undo_forward_patches(model: nn.Module) -> None:
    """Put back what `apply_adapter`'s ``FORWARD_PATCHES`` replaced on ``model``'s modules."""
    for module_name, attr, value in reversed(model.__dict__.pop("_neat_restore", [])):
        setattr(model.get_submodule(module_name), attr, value)


def apply_adapter(
    model: nn.Module,
    config: Any,
    *,
    aliases: AliasTable | None = None,
    head: list[str] | None = None,
) -> nn.Module:
    """Adapt ``model`` in place with the method ``config`` describes, freeze the rest, return it.

    ``nn.Linear`` targets become `AdaptedLinear`, ``nn.Conv2d`` targets `AdaptedConv2d`. ``head`` names the
    modules trained whole when ``config.train_head`` (default: the classifier). The model's first training
    forward checks that every adapted layer runs (`check_reached`).
    """
    if adapted_layers(model):
        raise ValueError("this model is already adapted; call merge_and_unload() first to adapt it again")
    targets = resolve_targets(model, config.targets, config.layers, aliases)
    for p in model.parameters():
        p.requires_grad_(False)
    for target in targets:
        parent_name, _, attr = target.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, _adapted(getattr(parent, attr), target.slices, config))
    layers = adapted_layers(model)
    for layer in layers.values():
        layer.updates.requires_grad_(True)
    restore = []
    for patches in FORWARD_PATCHES:
        for module_name, attr, value in patches(model, layers):
            module = model.get_submodule(module_name)
            restore.append((module_name, attr, getattr(module, attr)))
            setattr(module, attr, value)
    model.__dict__["_neat_restore"] = restore
    if config.train_head:
        for name in head_names(model) if head is None else head:
            model.get_submodule(name).requires_grad_(True)
    if config.trainable:
        patterns = [re.compile(p) for p in config.trainable]
        for name, p in model.named_parameters():
            if any(pat.search(name) for pat in patterns):
                p.requires_grad_(True)
    model.neat_config = config
    model.register_load_state_dict_post_hook(_drop_missing_update_keys)
    return check_reached(model)


def apply_neat(model: nn.Module, config: NeatConfig | Mapping[str, Any], **kwargs: Any) -> nn.Module:
    """Inject NEAT tweakers into ``model`` in place (base frozen; tweakers and head trainable)."""
    return apply_adapter(model, NeatConfig.coerce(config), **kwargs)


def named_adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every update tensor (NEAT tweakers, or another method's updates)."""
    for name, layer in adapted_layers(model).items():
        for key, p in layer.updates.named_parameters():
            yield f"{name}.updates.{key}", p


def adapter_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Every update tensor (NEAT tweakers, or another method's updates), like ``model.parameters()``."""
    for _, p in named_adapter_parameters(model):
        yield p


neat_parameters = named_adapter_parameters  # the name before other methods shared the machinery


def trainable_summary(model: nn.Module) -> dict[str, Any]:
    """Parameter counts: ``adapter`` (updates), ``head``, ``other`` trainable, ``trainable``, ``total``.

    ``neat`` is kept as an alias of ``adapter`` (the update count of whatever method is applied).
    """
    update_ids = {id(p) for p in adapter_parameters(model)}
    head_ids = {id(p) for n in head_names(model) for p in model.get_submodule(n).parameters()}
    counts = {"adapter": 0, "head": 0, "other": 0, "trainable": 0, "total": 0}
    for p in model.parameters():
        counts["total"] += p.numel()
        if p.requires_grad:
            counts["trainable"] += p.numel()
            kind = "adapter" if id(p) in update_ids else "head" if id(p) in head_ids else "other"
            counts[kind] += p.numel()
    counts["neat"] = counts["adapter"]
    counts["trainable_percent"] = 100.0 * counts["trainable"] / max(counts["total"], 1)
    counts["adapted_layers"] = len(adapted_layers(model))
    return counts


def merge(model: nn.Module, safe: bool = False) -> nn.Module:
    """Fold every update into its base weight (a copy of ``W0`` is kept for `unmerge`)."""
    for layer in adapted_layers(model).values():
        layer.merge(safe=safe)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Restore every adapted base weight to ``W0`` exactly."""
    for layer in adapted_layers(model).values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every adapted layer by its plain layer (``nn.Linear``, ``nn.Conv2d``) with ``W0 + dW``.

    The result is the base architecture: forward patches are undone and no hook is left.
    """
    batch_tweakers(model, enabled=False)
    check_reached(model, enabled=False)
    for name, layer in adapted_layers(model).items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, layer.to_plain())
    _undo_forward_patches(model)
    for attr in ("neat_config",):
        if hasattr(model, attr):
            delattr(model, attr)
    config = getattr(model, "config", None)  # an integration's record of the adapter in the model's own config
    if config is not None and hasattr(config, "neat_adapter"):
        delattr(config, "neat_adapter")
    hooks = model._load_state_dict_post_hooks
    for key in [k for k, h in hooks.items() if h is _drop_missing_update_keys]:
        del hooks[key]
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes its base function; merged layers are restored after."""
    layers = adapted_layers(model).values()
    was_merged = [layer.merged for layer in layers]
    for layer in layers:
        if layer.merged:
            layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, merged in zip(layers, was_merged):
            layer.disabled = False
            if merged:
                layer.merge()


disable_neat = disable_adapter  # the name before other methods shared the machinery


def set_path(model: nn.Module, path: str) -> nn.Module:
    """Switch every adapted layer's forward path (``factored``, ``fused`` or ``dense``)."""
    if path not in ("factored", "fused", "dense"):
        raise ValueError(f"path={path!r} is not allowed: one of factored, fused, dense")
    for layer in adapted_layers(model).values():
        layer.path = path
    if hasattr(model, "neat_config"):
        model.neat_config = model.neat_config.replace(path=path)
    return model


@torch.no_grad()
def delta_norms(model: nn.Module) -> dict[str, float]:
    """Frobenius norm of ``dW`` per adapted layer."""
    return {name: float(layer.delta_weight().norm()) for name, layer in adapted_layers(model).items()}


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


# temporary files of atomic_write: ".<name>.<8 random characters>.tmp" next to the target
_TEMPORARY = re.compile(r"^\..+\.[0-9a-z_]{8}\.tmp$")


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_name)`` for a temporary file next to ``path``, then move it onto ``path``.

    The file gets the ordinary mode of new files (``0o666`` less the umask), like files written directly.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    mode = os.stat(tmp).st_mode & 0o777  # the umask applied: what a plain open() would have given
    try:
        write(tmp)
        os.chmod(tmp, mode)  # writers that replace the file (safetensors) create it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files an interrupted `atomic_write` left in ``folder``; return them."""
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if _TEMPORARY.match(p.name) and p.is_file()]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


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
    if method not in CONFIG_TYPES:
        raise AdapterMismatchError(f"adapter method {method!r} is unknown here; known: {', '.join(CONFIG_TYPES)}")
    return CONFIG_TYPES[method].coerce(meta["config"])


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


def _undo_apply(model: nn.Module) -> Callable[[], None]:
    """A function that returns a plain ``model`` to the state it has now, after `apply_adapter` (even a partial one)."""
    modules = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    attrs = {k: model.__dict__[k] for k in ("neat_config", "_neat_batcher_handles") if k in model.__dict__}
    hooks = set(model._load_state_dict_post_hooks)

    def undo() -> None:
        batch_tweakers(model, enabled=False)
        check_reached(model, enabled=False)
        _undo_forward_patches(model)
        for name in adapted_layers(model):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, modules[name])
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        for key in ("neat_config", "_neat_batcher_handles"):
            model.__dict__.pop(key, None)
        if "_neat_batcher_handles" in attrs:
            batch_tweakers(model)
        if "neat_config" in attrs:
            model.__dict__["neat_config"] = attrs["neat_config"]
        for key in set(model._load_state_dict_post_hooks) - hooks:
            del model._load_state_dict_post_hooks[key]

    return undo


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
        undo = _undo_apply(model)
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
