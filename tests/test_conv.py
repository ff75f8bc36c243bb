"""Updates on Conv2d layers, conv targets, the qkv-bias patch of BEiT/EVA/SwinV2, the library's reach check."""

import copy
import pickle

import pytest
import timm
import torch
from timm.layers import Conv2dSame, ScaledStdConv2d, StdConv2d, StdConv2dSame
from torch import nn

import neat_vision
from neat_vision import (
    AdaptedConv2d,
    FourierConfig,
    LoraConfig,
    NeatConfig,
    TargetError,
    UnreachedLayerError,
    adapted_layers,
    check_reached,
    load_adapter,
    merge,
    merge_and_unload,
    named_adapter_parameters,
    rank_for_budget,
    resolve_targets,
    save_adapter,
    trainable_summary,
    tweaker_param_count,
    unmerge,
)
from neat_vision.adapter_files import AdapterMismatchError
from neat_vision.targets import default_targets

MERGE_TOL = dict(rtol=1e-4, atol=1e-4)
CONFIGS = {
    "neat": NeatConfig(targets="x", rank=2, depth=4, act="sin", scale=0.7),
    "neat-in": NeatConfig(targets="x", rank=3, axis="in"),
    "lora": LoraConfig(targets="x", rank=2, alpha=4),
    "fourierft": FourierConfig(targets="x", n=10, alpha=50.0),
}
CONVS = {
    "3x3-stride2": dict(in_channels=8, out_channels=12, kernel_size=3, stride=2, padding=1),
    "dilated-reflect": dict(
        in_channels=8, out_channels=12, kernel_size=3, padding=2, dilation=2, padding_mode="reflect"
    ),
    "1x1-nobias": dict(in_channels=8, out_channels=12, kernel_size=1, bias=False),
    "3x1-circular": dict(in_channels=8, out_channels=12, kernel_size=(3, 1), padding=(1, 0), padding_mode="circular"),
    "same": dict(in_channels=8, out_channels=12, kernel_size=3, padding="same"),
    "grouped": dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, groups=4),
    "depthwise": dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8),
}


def _randomise(layer):
    with torch.no_grad():
        for p in layer.updates.parameters():
            p.normal_(std=0.3)


@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("conv", CONVS)
def test_conv_paths_merge_and_unload(conv, method):
    torch.manual_seed(0)
    base = nn.Conv2d(**CONVS[conv])
    layer = AdaptedConv2d(copy.deepcopy(base), [(0, base.out_channels)], CONFIGS[method].make_update)
    assert layer.in_features == base.weight[0].numel() and layer.out_features == base.out_channels
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    assert torch.equal(layer(x), base(x)), "not the base function at init"
    _randomise(layer)
    outs, grads = {}, {}
    for path in ("dense", "factored", "fused"):
        layer.path = path
        layer.zero_grad()
        x.grad = None
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs[path], grads[path] = y.detach(), [x.grad.clone()] + [p.grad.clone() for p in layer.updates.parameters()]
    for path in ("factored", "fused"):
        torch.testing.assert_close(outs[path], outs["dense"], rtol=1e-5, atol=1e-5)
        for g, ref in zip(grads[path], grads["dense"]):
            torch.testing.assert_close(g, ref, **MERGE_TOL)
    with torch.no_grad():  # the base conv with its kernel plus dW: what every path computes
        expected = base._conv_forward(x, base.weight + layer.delta_weight(), base.bias)
        torch.testing.assert_close(outs["dense"], expected, rtol=1e-5, atol=1e-5)
        w0 = layer.weight.detach().clone()
        layer.merge()
        torch.testing.assert_close(layer(x), outs["dense"], **MERGE_TOL)
        layer.unmerge()
        assert torch.equal(layer.weight, w0)
        plain = layer.to_plain()
        assert type(plain) is nn.Conv2d and plain.padding_mode == base.padding_mode and plain.groups == base.groups
        torch.testing.assert_close(plain(x), outs["dense"], **MERGE_TOL)
        clone = pickle.loads(pickle.dumps(layer))
        assert torch.equal(clone(x), layer(x))


def test_factored_conv_never_builds_dw(monkeypatch):
    torch.manual_seed(0)
    layer = AdaptedConv2d(nn.Conv2d(8, 12, 3, padding=1), [(0, 6), (6, 12)], CONFIGS["neat"].make_update)
    _randomise(layer)

    def refuse(*args, **kwargs):
        raise AssertionError("dW built on the factored path")

    monkeypatch.setattr(AdaptedConv2d, "delta_weight", refuse)
    monkeypatch.setattr(neat_vision.Tweaker, "delta_weight", refuse)
    x = torch.randn(2, 8, 7, 7)
    layer(x).square().sum().backward()
    assert all(p.grad is not None for p in layer.updates.parameters())


def test_conv_slices_keep_other_channels():
    torch.manual_seed(0)
    layer = AdaptedConv2d(nn.Conv2d(4, 9, 3), [(0, 3), (6, 9)], CONFIGS["lora"].make_update)
    _randomise(layer)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.weight[3:6], w0[3:6]) and not torch.equal(layer.weight[:3], w0[:3])


def test_conv_lora_dropout_only_in_training():
    torch.manual_seed(0)
    config = LoraConfig(targets="x", rank=2, dropout=0.5)
    for conv in (nn.Conv2d(8, 12, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8)):
        layer = AdaptedConv2d(conv, [(0, conv.out_channels)], config.make_update)
        _randomise(layer)
        x = torch.randn(2, 8, 6, 6)
        layer.eval()
        clean = layer(x)
        layer.train()
        torch.manual_seed(1)
        dropped = layer(x)
        assert not torch.allclose(dropped, clean)
        torch.manual_seed(1)  # the same masks by hand: the frozen conv reads x, the update dropout(x)
        masked = nn.functional.dropout(x, 0.5, training=True)
        delta = layer.delta_weight()
        expected = conv._conv_forward(x, conv.weight, conv.bias) + conv._conv_forward(masked, delta, None)
        torch.testing.assert_close(dropped, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Conv2dSame(8, 12, 3, stride=2),
        lambda: StdConv2d(8, 12, 3, padding=1),
        lambda: StdConv2dSame(8, 12, 3, stride=2),
        lambda: ScaledStdConv2d(8, 12, 3, padding=1),
    ],
    ids=["Conv2dSame", "StdConv2d", "StdConv2dSame", "ScaledStdConv2d"],
)
def test_timm_conv_forms(make):
    torch.manual_seed(0)
    base = make()
    layer = AdaptedConv2d(copy.deepcopy(base), [(0, 12)], CONFIGS["neat"].make_update)
    assert set(dict(layer.named_parameters())) - {
        n for n, _ in layer.updates.named_parameters(prefix="updates")
    } == set(dict(base.named_parameters())), "the base's parameters (a gain too) keep their names"
    x = torch.randn(2, 8, 9, 10)
    assert torch.equal(layer(x), base(x))
    _randomise(layer)
    y = layer(x)
    layer.path = "dense"
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        plain = layer.to_plain()
        assert type(plain) is type(base)
        torch.testing.assert_close(plain(x), y, **MERGE_TOL)
        layer.merge()
        torch.testing.assert_close(layer(x), y, **MERGE_TOL)


def test_conv_subclass_with_unknown_forward_is_not_adaptable():
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Conv2d(3, 4, 1), Doubled(4, 4, 1))

        def forward(self, x):
            return self.blocks(x)

    assert [t.name for t in resolve_targets(Net(), ["pw"])] == ["blocks.0"]
    with pytest.raises(TypeError, match="Doubled has a forward of its own.*CONV_FORMS"):
        AdaptedConv2d(Doubled(4, 4, 1), [(0, 4)], CONFIGS["lora"].make_update)


def test_lora_conv_matches_peft():
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(6, 10, 3, stride=2, padding=1)

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    net = Net()
    base = copy.deepcopy(net.conv)
    peft_model = peft.get_peft_model(net, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["conv"]))
    lora = peft_model.base_model.model.conv
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_(std=0.5)
    ours = AdaptedConv2d(base, [(0, 10)], LoraConfig(targets="conv", rank=3, alpha=6).make_update)
    with torch.no_grad():
        ours.updates[0].A.copy_(lora.lora_A["default"].weight.reshape(3, -1))
        ours.updates[0].B.copy_(lora.lora_B["default"].weight.reshape(10, 3))
    x = torch.randn(2, 6, 9, 9)
    expected = peft_model(x)
    for path in ("factored", "fused", "dense"):
        ours.path = path
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.delta_weight(), lora.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
    peft_model.merge_adapter()
    merge_ours = ours.to_plain()
    torch.testing.assert_close(merge_ours.weight, lora.base_layer.weight, rtol=1e-5, atol=1e-6)


# ---- conv targets, counts, budgets ---------------------------------------------------------------------


def _effnet(**neat):
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", pretrained=False, num_classes=5, **neat)


def test_conv_pw_dw_aliases_and_their_rules():
    model = _effnet()
    modules = dict(model.named_modules())
    conv = {t.name for t in resolve_targets(model, ["conv"])}
    pw = {t.name for t in resolve_targets(model, ["pw"])}
    dw = {t.name for t in resolve_targets(model, ["dw"])}
    assert "conv_stem" not in conv and "conv_head" not in conv and pw | dw <= conv
    assert all(modules[n].kernel_size == (1, 1) and modules[n].groups == 1 for n in pw)
    assert all(modules[n].groups == modules[n].in_channels > 1 for n in dw)
    assert any(".se." in n for n in pw) and any(n.endswith("conv_pwl") for n in pw) and not pw & dw
    assert {n for n, m in modules.items() if isinstance(m, nn.Conv2d) and "." in n} == conv


def test_mlp_alias_takes_conv_mlps_and_proj_skips_patch_embeddings():
    torch.manual_seed(0)
    convnext = timm.create_model("convnext_atto", pretrained=False, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
    mlp = resolve_targets(convnext, ["mlp"])
    assert [t.name for t in mlp][:2] == ["stages.0.blocks.0.mlp.fc1", "stages.0.blocks.0.mlp.fc2"]
    assert all(isinstance(convnext.get_submodule(t.name), nn.Conv2d) for t in mlp)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    assert [t.name for t in resolve_targets(vit, ["proj"])] == ["blocks.0.attn.proj"]  # not patch_embed.proj


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=1), ["q", "v", "mlp"]),
        ("levit_128s", dict(embed_dim=(32, 48, 64), key_dim=8, num_heads=(2,) * 3, depth=(1,) * 3), ["qkv", "mlp"]),
        ("swiftformer_xs", dict(layers=(1, 1, 1, 1), embed_dims=(16, 24, 32, 48)), ["qkv", "mlp"]),
        (
            "gemma4_vit_167m",
            dict(embed_dim=32, depth=1, num_heads=2, head_dim=16, intermediate_size=64),
            ["q", "v", "mlp"],
        ),
        ("test_resnet", {}, ["pw"]),
        ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)), ["mlp", "pw"]),
        ("convnext_atto", dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), conv_mlp=False), ["mlp"]),
    ],
)
def test_default_targets_per_family(name, kwargs, expected):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    assert default_targets(model) == expected
    assert resolve_targets(model, ["default"]) == resolve_targets(model, expected)


def test_default_falls_back_to_every_block_layer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3)
            self.blocks = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 3))
            self.head = nn.Linear(4, 2)

    assert [t.name for t in resolve_targets(Net(), ["default"])] == ["blocks.0", "blocks.1"]


def test_default_skips_single_feature_layers_that_names_still_take():
    class SpatialGate(nn.Module):  # CSATv2's shape: a 1-channel map, a 1 -> 3 projection
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(1, 3)
            self.mlp = nn.Sequential(nn.Linear(1, 4), nn.Linear(4, 1))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.ModuleDict(dict(qkv=nn.Linear(16, 48), gate=SpatialGate()))])
            self.head = nn.Linear(16, 2)

    assert [t.name for t in resolve_targets(Net(), ["default"])] == ["blocks.0.qkv"]
    assert [t.name for t in resolve_targets(Net(), ["qkv"])] == ["blocks.0.qkv", "blocks.0.gate.qkv"]


def test_unknown_target_lists_aliases_and_conv_modules():
    with pytest.raises(TargetError, match=r"conv, pw, dw, default.*blocks\.\*\.\*\.conv_pw"):
        _effnet(neat=dict(targets="query"))


def test_conv_param_counts_budget_and_summary():
    model = _effnet(neat=dict(targets="pw", rank=3, axis="in"))
    expected = 0
    for layer in adapted_layers(model).values():
        assert isinstance(layer, AdaptedConv2d)
        o, i = layer.out_features, layer.in_features
        expected += tweaker_param_count(o, i, 3, 2, "in")
        assert sum(p.numel() for p in layer.updates.parameters()) == tweaker_param_count(o, i, 3, 2, "in")
    assert trainable_summary(model)["adapter"] == expected
    for method, fields in (("neat", dict(targets="conv")), ("lora", dict(targets="pw")), ("fourierft", {})):
        fields.setdefault("targets", "pw")
        value, count = rank_for_budget(_effnet, method, 3000, **fields)
        key = "n" if method == "fourierft" else "rank"
        config = neat_vision.methods.make_config(method, **fields, **{key: value})
        assert trainable_summary(neat_vision.apply_adapter(_effnet(), config))["adapter"] == count


def test_conv_adapter_round_trip_with_running_stats_and_refuses_other_base(tmp_path):
    model = _effnet(neat=dict(targets="pw", rank=2))
    x = torch.randn(4, 3, 32, 32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model.train()(x).logsumexp(-1).sum().backward()
        opt.step()
    model.eval()
    folder = save_adapter(model, tmp_path / "a")
    meta = neat_vision.read_adapter_config(folder)
    assert any(n.endswith("running_mean") for n in meta["tensors"])  # BatchNorm tracked the training batches
    fresh = load_adapter(_effnet(), folder).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    torch.manual_seed(5)
    other = timm.create_model("test_efficientnet", pretrained=False, num_classes=5)
    with pytest.raises(AdapterMismatchError, match="other base weights"):
        load_adapter(other, folder)
    with torch.no_grad():
        y = model(x)
        merge(model)
        torch.testing.assert_close(model(x), y, **MERGE_TOL)
        unmerge(model)
        names = list(adapted_layers(model))
        plain = merge_and_unload(model)
    assert not adapted_layers(plain) and all(type(plain.get_submodule(n)) is nn.Conv2d for n in names)


@pytest.mark.parametrize("path", ["factored", "fused"])
def test_conv_autocast_bf16_and_compile(path):
    model = _effnet(neat=dict(targets="conv", rank=2, path=path))
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.train()(x).float().logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for _, p in named_adapter_parameters(model))
    if path == "factored":
        model.eval()
        with torch.no_grad():
            ref = model(x)
            out = torch.compile(model, backend="aot_eager")(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---- BEiT, EVA02, SwinV2: attention that reads qkv.weight ----------------------------------------------

QKV_BIAS_MODELS = {
    "beit": ("beit_base_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2), 32),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, depth=2, embed_dim=32, num_heads=2), 28),
    "swinv2": (
        "swinv2_tiny_window8_256",
        dict(img_size=32, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2)),
        32,
    ),
}


@pytest.mark.parametrize("key", QKV_BIAS_MODELS)
def test_qkv_bias_families_train_q_and_v(key):
    name, kwargs, size = QKV_BIAS_MODELS[key]
    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()
    with torch.no_grad():  # SwinV2 initialises its post-norm gains to zero, which passes no gradient back
        for p in base.parameters():
            if not p.any():
                p.normal_(std=0.1)
    model = neat_vision.apply_neat(copy.deepcopy(base), dict(targets=["q", "v"], rank=2))
    attns = [m for m in model.modules() if hasattr(m, "qkv_bias_separate")]
    assert attns and all(m.qkv_bias_separate and m.q_bias is not None for m in attns)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model(x), base(x)), "outputs at init"
    feats = model.train().forward_head(model.forward_features(x), pre_logits=True)
    (feats * torch.randn(feats.shape)).sum().backward()
    assert all(p.grad.abs().sum() > 0 for n, p in named_adapter_parameters(model) if n.endswith(".B"))
    plain = merge_and_unload(model.eval())
    assert not any(m.qkv_bias_separate for m in plain.modules() if hasattr(m, "qkv_bias_separate"))


# ---- the library refuses an adapted layer the forward never reaches ------------------------------------


def _vit(**neat):
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=3, **neat
    )


def test_unreached_layer_refused_at_first_training_forward():
    model = _vit(neat=dict(targets=["q", "v"], rank=2))
    model.blocks[1].attn.forward = lambda x, **kwargs: x  # a forward that bypasses blocks.1.attn.qkv
    x = torch.randn(2, 3, 32, 32)
    model.eval()(x)  # evaluation and no-grad forwards are not checked
    with torch.no_grad():
        model.train()(x)
    with pytest.raises(UnreachedLayerError, match=r"1 of 2 adapted layers.*blocks\.1\.attn\.qkv"):
        model(x)
    with pytest.raises(UnreachedLayerError):  # it stays until the forward reaches every layer
        model(x)
    check_reached(model, enabled=False)
    model(x).sum().backward()


def test_reach_check_removes_itself_and_survives_copies():
    model = _vit(neat=dict(targets="qkv", rank=2))
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    assert hooks == (1, 1)
    twin, clone = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 3, 32, 32)
    for m in (model, twin, clone):
        m.train()(x).sum().backward()
        assert not m._forward_pre_hooks and not m._forward_hooks
        assert not any(layer._forward_pre_hooks for layer in adapted_layers(m).values())


def test_reach_check_stands_aside_for_compiled_blocks():
    model = _vit(neat=dict(targets="qkv", rank=2))
    for block in model.blocks:
        block.compile(backend="aot_eager")
    model.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    assert not model._forward_pre_hooks and not any(
        layer._forward_pre_hooks for layer in adapted_layers(model).values()
    )
