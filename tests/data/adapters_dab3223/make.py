"""Wrote this folder with neat-vision at main dab3223 (run from the repository root at that commit).

Three adapters on the shipped fractal ViT (``vit_tiny6_patch4_32``, packaged weights, so the base is the same
on every machine), each with random (not trained) update tensors so that the outputs differ from the base,
and ``expected.safetensors``: the input and each adapted model's logits. `tests/test_legacy_adapters.py`
loads them with today's code and compares.
"""

import timm
import torch
from safetensors.torch import save_file

import neat_vision
from neat_vision import FourierConfig, LoraConfig, NeatConfig

HERE = "tests/data/adapters_dab3223"
CONFIGS = {
    "neat": NeatConfig(targets=["q", "v"], rank=2, depth=4, act="sin", layers=[4, 5]),
    "lora": LoraConfig(targets=["qkv"], rank=2, layers=[5]),
    "fourierft": FourierConfig(targets=["fc2"], n=16, alpha=10.0, layers=[5]),
}

torch.manual_seed(0)
x = torch.randn(2, 3, 32, 32)
expected = {"input": x}
for name, config in CONFIGS.items():
    model = timm.create_model("vit_tiny6_patch4_32", pretrained=True, num_classes=3)
    neat_vision.apply_adapter(model, config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.05)
    model.eval()
    with torch.no_grad():
        expected[name] = model(x)
    neat_vision.save_adapter(model, f"{HERE}/{name}")
save_file(expected, f"{HERE}/expected.safetensors")
