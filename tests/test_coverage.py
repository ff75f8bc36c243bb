"""Coverage table: timm families x {NEAT, LoRA, FourierFT} through the same checks as benchmarks/coverage.py.

Each case is a family's architecture shrunk to a tiny configuration (the real module names and layer types,
fewer blocks and channels), built with ``pretrained=False``, adapted with ``targets="default"``. The checks
(`coverage.check_method`), in order: output identical to the base at init; every adapted layer reached in a
training forward; a gradient on every update from the pre-logits features; save/load round trip; merged ==
unmerged, unmerge bit-exact and ``merge_and_unload`` to the base layer types. A failure names the check.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import StdConv2d

ROOT = Path(__file__).resolve().parents[1]


def _load_coverage():
    spec = importlib.util.spec_from_file_location("coverage_table", ROOT / "benchmarks" / "coverage.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["coverage_table"] = module
    spec.loader.exec_module(module)
    return module


cov = _load_coverage()
C = cov.Case

VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
SWIN = dict(img_size=32, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2))
CASES = [
    # transformers: attention + MLP (BEiT, EVA02 and SwinV2 read qkv.weight directly unless timm_hook's patch)
    C("vision_transformer", "vit_tiny_patch16_224", VIT, 32),
    C("deit", "deit_tiny_patch16_224", VIT, 32),
    C("beit", "beit_base_patch16_224", VIT, 32),
    C("eva", "eva02_tiny_patch14_224", dict(img_size=28, depth=2, embed_dim=32, num_heads=2), 28),
    C("swin_transformer", "swin_tiny_patch4_window7_224", SWIN, 32),
    C("swin_transformer_v2", "swinv2_tiny_window8_256", SWIN, 32),
    C("cait", "cait_xxs24_224", dict(VIT, depth_token_only=1), 32),
    C("xcit", "xcit_nano_12_p8_224", dict(img_size=32, depth=2, embed_dim=32, num_heads=2, cls_attn_layers=1), 32),
    C("pvt_v2", "pvt_v2_b0", dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 24, 32), num_heads=(1, 1, 2, 2)), 64),
    C(
        "levit",
        "levit_128s",
        dict(img_size=64, embed_dim=(32, 48, 64), key_dim=8, num_heads=(2,) * 3, depth=(1,) * 3),
        64,
    ),
    C("gemma4_vit", "gemma4_vit_167m", dict(embed_dim=32, depth=2, num_heads=2, head_dim=16, intermediate_size=64), 32),
    C("swiftformer", "swiftformer_xs", dict(layers=(1, 1, 1, 1), embed_dims=(16, 24, 32, 48)), 64),
    # hybrids
    C("maxxvit", "test_coatnet", dict(img_size=64), 64),
    C("mobilevit", "mobilevit_xxs", {}, 32),
    C(
        "efficientformer_v2",
        "efficientformerv2_s0",
        dict(img_size=64, depths=(1,) * 4, embed_dims=(16, 24, 32, 48)),
        64,
    ),
    C("efficientvim", "efficientvim_m1", dict(embed_dim=(16, 24, 32), depths=(1, 1, 1)), 64),
    # CNNs: pointwise convs (and conv MLPs)
    C("convnext", "convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), 32),  # conv_mlp=True
    C("resnet", "test_resnet", {}, 32),
    C("efficientnet", "mobilenetv2_035", dict(depth_multiplier=0.3), 32),
    C("efficientnet", "test_efficientnet", {}, 32),
    C("mobilenetv3", "tf_mobilenetv3_small_minimal_100", {}, 32),  # TensorFlow "same" padding: Conv2dSame
    C("regnet", "regnetx_002", dict(depth=6, w0=16, wa=24.0, wm=2.0, group_size=8), 32),
    C("densenet", "densenet121", dict(growth_rate=8, block_config=(1, 1, 1, 1)), 32),
    C("repvit", "repvit_m1", dict(embed_dim=(16, 24, 32, 48), depth=(1, 1, 1, 1)), 32),
    C("fastvit", "fastvit_t8", dict(layers=(1, 1, 1, 1), embed_dims=(48, 96, 192, 384)), 32),
    C("nfnet", "test_nfnet", {}, 32),  # ScaledStdConv2d
    C("resnetv2", "resnetv2_18", dict(layers=(1,) * 4, channels=(8, 16, 32, 64), stem_chs=8, conv_layer=StdConv2d), 32),
    C("dla", "dla46x_c", dict(levels=(1,) * 6, channels=(16, 16, 32, 32, 64, 64)), 32),  # a conv classifier
    C("mambaout", "test_mambaout", {}, 32),
]


IDS = [f"{c.family}-{c.arch}" for c in CASES]


@pytest.mark.parametrize("method", cov.METHODS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_family_adapts_and_trains(case, method):
    torch.set_num_threads(1)
    base = cov.build_base(case)
    config = cov.method_config(method, base, case.targets)
    cov.check_method(lambda: cov.build_base(case), config, cov.images(case))


def test_table_covers_the_families_the_issue_names():
    families = {c.family for c in CASES}
    assert len(families) >= 24
    named = {"beit", "eva", "swin_transformer_v2", "resnet", "efficientnet", "convnext", "regnet", "densenet", "levit"}
    assert named <= families and any(c.arch.startswith("mobilenetv2") for c in CASES)
    assert set(timm.list_modules()) >= families


def test_check_fails_on_a_bypassed_layer():
    """The checks can fail: with the qkv-bias patch removed, BEiT's q/v updates are never reached."""
    case = CASES[2]
    from neat_vision import adapter

    patches = list(adapter.FORWARD_PATCHES)
    adapter.FORWARD_PATCHES.clear()
    try:
        base = cov.build_base(case)
        with pytest.raises(cov.CheckFailed, match=r"^reached: .*blocks\.0\.attn\.qkv"):
            cov.check_method(lambda: cov.build_base(case), cov.method_config("neat", base, "default"), cov.images(case))
    finally:
        adapter.FORWARD_PATCHES.extend(patches)


def test_check_fails_on_a_layer_that_ignores_its_update_at_inference(monkeypatch):
    """The checks can fail: an AdaptedLinear whose eval forward ignores its update (ViT's layer scale set to 1)."""
    from neat_vision.layers import AdaptedLinear

    train_forward = AdaptedLinear.forward

    def forward(self, x):
        if self.training or self.merged:
            return train_forward(self, x)
        return torch.nn.functional.linear(x, self.weight, self.bias)

    monkeypatch.setattr(AdaptedLinear, "forward", forward)
    case = C("vision_transformer", "vit_tiny_patch16_224", dict(VIT, init_values=1e-5), 32)
    base = cov.build_base(case)
    with pytest.raises(cov.CheckFailed, match=r"^update: "):
        cov.check_method(lambda: cov.build_base(case), cov.method_config("lora", base, "default"), cov.images(case))
