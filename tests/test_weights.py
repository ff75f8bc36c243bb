"""The shipped fractal checkpoint loads into the demo's model and recognises newly generated fractals."""

import timm
import torch

import neat_vision  # noqa: F401  registers vit_tiny6_patch4_32
from neat_vision.data.fractal import VAL_INSTANCE_OFFSET, FractalCategories, render_fractals


def test_fractal_checkpoint_classifies_new_instances_on_cpu():
    model = timm.create_model("vit_tiny6_patch4_32.fractal", pretrained=True).eval()
    assert model.num_classes == 1000
    categories = FractalCategories(1000, seed=0)
    gen = torch.Generator().manual_seed(123)
    labels = torch.randint(1000, (128,), generator=gen)
    instances = VAL_INSTANCE_OFFSET + 500_000 + torch.randint(1000, (128,), generator=gen)
    images = render_fractals(categories, labels, instances, img_size=32)
    with torch.no_grad():
        pred = model((images - 0.5) / 0.5).argmax(-1)
    accuracy = (pred == labels).float().mean().item()
    assert accuracy > 0.5, f"top-1 {accuracy:.3f} on new fractal instances (chance 0.001)"


def test_demo_model_loads_the_checkpoint_with_a_new_head():
    model = timm.create_model(
        "vit_tiny6_patch4_32.fractal", pretrained=True, num_classes=10, neat=dict(targets=["q", "v"], rank=4)
    )
    assert model.num_classes == 10 and len(neat_vision.adapted_layers(model)) == 6
