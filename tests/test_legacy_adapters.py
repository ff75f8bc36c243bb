"""Adapter folders written by an earlier release (main dab3223) load and compute what they computed then."""

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import neat_vision

LEGACY = Path(__file__).parent / "data" / "adapters_dab3223"


@pytest.mark.parametrize("method", ["neat", "lora", "fourierft"])
def test_an_adapter_saved_by_main_dab3223_loads_with_the_same_outputs(method):
    expected = load_file(str(LEGACY / "expected.safetensors"))
    model = neat_vision.load_adapter("vit_tiny6_patch4_32", LEGACY / method)  # the recorded base, pretrained
    assert model.neat_config.method == method
    model.eval()
    with torch.no_grad():
        logits = model(expected["input"])
    torch.testing.assert_close(logits, expected[method], rtol=1e-5, atol=1e-5)
    plain = timm.create_model("vit_tiny6_patch4_32", pretrained=True, num_classes=3)
    neat_vision.load_adapter(plain, LEGACY / method)  # onto a model the user built
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(expected["input"]), expected[method], rtol=1e-5, atol=1e-5)
