"""timm models shipped with neat-vision: a small ViT pre-trained on generated fractals (FractalDB-style).

After `register` (``import neat_vision`` calls it),
``timm.create_model("vit_tiny6_patch4_32.fractal", pretrained=True, num_classes=10)`` loads the checkpoint
that ships inside the package (``neat_vision/weights/``), so a pre-trained backbone is at hand offline.
The architecture is ViT-Tiny's width (192, 3 heads) with 6 blocks, for 32 x 32 px images in 4 x 4 patches
(64 tokens + class token). ``neat_vision/weights/README.md`` is its model card (data, command, device).
"""

from __future__ import annotations

from pathlib import Path

from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, is_model, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

WEIGHTS_DIR = Path(__file__).parents[1] / "weights"
FRACTAL_CHECKPOINT = WEIGHTS_DIR / "vit_tiny6_patch4_32_fractal.safetensors"
FRACTAL_CLASSES = 1000


def _cfg(**kwargs):
    return {
        "num_classes": FRACTAL_CLASSES,
        "input_size": (3, 32, 32),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "fixed_input_size": True,
        "mean": IMAGENET_INCEPTION_MEAN,
        "std": IMAGENET_INCEPTION_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "vit_tiny6_patch4_32.fractal": _cfg(file=str(FRACTAL_CHECKPOINT)),
        "vit_tiny6_patch4_32.untrained": _cfg(),
    }
)


def vit_tiny6_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Tiny width, 6 blocks, 32 px, patch 4; ``.fractal`` weights are pre-trained on fractals."""
    model_args = dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3)
    return build_model_with_cfg(
        VisionTransformer,
        "vit_tiny6_patch4_32",
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **dict(model_args, **kwargs),
    )


def register() -> None:
    """Add ``vit_tiny6_patch4_32`` (tags ``fractal``, ``untrained``) to timm's model registry (idempotent)."""
    if not is_model("vit_tiny6_patch4_32"):
        register_model(vit_tiny6_patch4_32)
