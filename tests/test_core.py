"""Invariants every adapted model must keep, run over a table of (model, config) cases (peft's style)."""

import copy
import pickle
import subprocess
import sys
import warnings

import pytest
import timm
import torch
from torch import nn

import neat_vision
from neat_vision import (
    AdaptedLinear,
    AdapterMismatchError,
    ConfigError,
    NeatConfig,
    TargetError,
    adapted_layers,
    disable_neat,
    load_adapter,
    merge,
    merge_and_unload,
    named_adapter_parameters,
    save_adapter,
    trainable_summary,
    unmerge,
)

MODELS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, num_classes=5), 32),
    "deit": ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, num_classes=5), 32),
    "swin": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=5),
        32,
    ),
    "pvt_v2": ("pvt_v2_b0", dict(depths=(1, 1, 1, 1), num_classes=5), 64),
}

# merged weights round differently from W0 and dW applied separately (fp32)
MERGE_TOL = dict(rtol=1e-4, atol=1e-4)

CASES = [
    ("vit", dict(targets=["q", "v"], rank=4)),
    ("vit", dict(targets="qkv", rank=3, depth=4, act="sin")),
    ("vit", dict(targets=["q", "v", "mlp"], rank=2, depth=6, act="gelu", axis="in", path="fused")),
    ("deit", dict(targets=["k", "proj"], rank=2, act="tanh", axis="auto", path="dense")),
    ("swin", dict(targets=["q", "v"], rank=2, act="silu", scale=0.5)),
    ("pvt_v2", dict(targets=["q", "v", "fc2"], rank=2, depth=4)),
]
IDS = [f"{m}-{'-'.join(c['targets']) if isinstance(c['targets'], list) else c['targets']}" for m, c in CASES]


def build(model_key, neat=None, seed=0):
    name, kwargs, _ = MODELS[model_key]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, neat=neat, **kwargs)


def images(model_key, n=2, seed=1):
    size = MODELS[model_key][2]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def train_steps(model, x, steps=3, lr=0.05):
    """A few AdamW steps on a fixed batch; makes every update non-zero."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    target = torch.arange(x.shape[0]) % 5
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
    model.eval()
    return model


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    return request.param


def test_output_identical_to_base_at_init(case):
    key, cfg = case
    base = build(key).eval()
    adapted = build(key, neat=cfg).eval()
    x = images(key)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), base(x), rtol=0, atol=0)


def test_gradients_reach_only_trainable_set(case):
    key, cfg = case
    model = build(key, neat=cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in named_adapter_parameters(model)}
    head = model.get_classifier()
    expected |= {n for n, p in model.named_parameters() if any(p is q for q in head.parameters())}
    assert trainable == expected
    model(images(key)).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith(".B")), "B gets no gradient"


def test_only_trainable_tensors_change(case):
    key, cfg = case
    model = build(key, neat=cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, images(key))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, value in model.state_dict().items():
        if name in trainable:
            assert not torch.equal(value, before[name]), f"{name} did not train"
        else:
            torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=f"{name} changed")


def test_merge_unmerge_and_unload(case):
    key, cfg = case
    model = train_steps(build(key, neat=cfg), images(key))
    x = images(key, seed=2)
    w0 = {n: m.weight.detach().clone() for n, m in adapted_layers(model).items()}
    with torch.no_grad():
        y = model(x)
        merge(model)
        torch.testing.assert_close(model(x), y, **MERGE_TOL)
        assert any(not torch.equal(m.weight, w0[n]) for n, m in adapted_layers(model).items())
        with pytest.warns(UserWarning, match="already merged"):
            merge(model)
        torch.testing.assert_close(model(x), y, **MERGE_TOL)
        unmerge(model)
        for n, m in adapted_layers(model).items():
            assert torch.equal(m.weight, w0[n]), f"{n} not restored bit for bit"
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)
        plain = merge_and_unload(copy.deepcopy(model))
        assert not adapted_layers(plain) and not hasattr(plain, "neat_config")
        assert isinstance(plain.get_submodule(next(iter(w0))), nn.Linear)
        torch.testing.assert_close(plain(x), y, **MERGE_TOL)


def test_safe_merge_refuses_nan():
    model = build("vit", neat=dict(targets=["q", "v"], rank=2))
    layer = next(iter(adapted_layers(model).values()))
    with torch.no_grad():
        layer.updates[0].B.fill_(float("nan"))
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN"):
        merge(model, safe=True)
    assert torch.equal(layer.weight, before) and not layer.merged


def test_disable_context(case):
    key, cfg = case
    base = build(key).eval()
    model = train_steps(build(key, neat=cfg), images(key))
    base.get_classifier().load_state_dict(model.get_classifier().state_dict())  # the head trains too
    x = images(key, seed=3)
    with torch.no_grad():
        y = model(x)
        with disable_neat(model):
            torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
        torch.testing.assert_close(model(x), y, rtol=0, atol=0)
        merge(model)
        with disable_neat(model):
            torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
        assert all(m.merged for m in adapted_layers(model).values())
        torch.testing.assert_close(model(x), y, **MERGE_TOL)


def test_pickle_round_trip(case):
    key, cfg = case
    model = train_steps(build(key, neat=cfg), images(key))
    clone = pickle.loads(pickle.dumps(model))
    x = images(key, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


def test_save_load_round_trip(case, tmp_path):
    key, cfg = case
    model = train_steps(build(key, neat=cfg), images(key))
    folder = save_adapter(model, tmp_path / "adapter")
    meta = neat_vision.read_adapter_config(folder)
    head = model.get_classifier()
    head_names = {n for n, p in model.named_parameters() if any(p is q for q in head.parameters())}
    assert head_names <= set(meta["tensors"]) and any(n.endswith("bias") for n in head_names)
    assert set(meta["tensors"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    fresh = build(key).eval()  # same seed: same base weights, untrained head
    load_adapter(fresh, folder)
    assert "path" not in meta["config"]  # the forward path is a runtime setting, not part of the adapter
    neat_vision.set_path(fresh, cfg.get("path", "factored"))  # the same path computes bit for bit the same
    x = images(key, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    for name, p in fresh.get_classifier().named_parameters():
        assert torch.equal(p, dict(model.get_classifier().named_parameters())[name])


def test_forward_path_is_not_part_of_the_adapter(tmp_path):
    """An adapter trained on one path loads onto a model adapted with another path (it keeps its path)."""
    model = train_steps(build("vit", neat=dict(targets=["q", "v"], rank=3)), images("vit"))
    folder = save_adapter(model, tmp_path / "adapter")
    fused = build("vit", neat=dict(targets=["q", "v"], rank=3, path="fused")).eval()
    load_adapter(fused, folder)
    assert {layer.path for layer in adapted_layers(fused).values()} == {"fused"}
    x = images("vit", seed=6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_mismatched_base_refused(tmp_path):
    model = train_steps(build("vit", neat=dict(targets=["q", "v"], rank=2)), images("vit"))
    folder = save_adapter(model, tmp_path / "a")
    other = build("vit", seed=123)
    with pytest.raises(AdapterMismatchError, match="other base weights"):
        load_adapter(other, folder)
    half = build("vit").to(torch.bfloat16)
    with pytest.warns(UserWarning, match="up to precision"):
        load_adapter(half, folder)


def test_load_adapter_by_name_records_model(tmp_path):
    torch.manual_seed(7)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        num_classes=3,
        neat=dict(targets="qkv", rank=2),
    )
    train_steps(model, torch.randn(3, 3, 32, 32))
    folder = save_adapter(model, tmp_path / "a")
    meta = neat_vision.read_adapter_config(folder)
    assert meta["base"]["model_name"] == "vit_tiny_patch16_224" and meta["base"]["num_classes"] == 3
    torch.manual_seed(7)
    loaded = load_adapter(None, folder, pretrained=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_q_v_slices_leave_k_rows_and_bias_untouched():
    model = build("vit", neat=dict(targets=["q", "v"], rank=3))
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, AdaptedLinear) and qkv.slices == ((0, 192), (384, 576))
    w0, b0 = qkv.weight.detach().clone(), qkv.bias.detach().clone()
    train_steps(model, images("vit"))
    merge(model)
    assert torch.equal(qkv.weight[192:384], w0[192:384]) and torch.equal(qkv.bias, b0)
    assert not torch.equal(qkv.weight[:192], w0[:192]) and not torch.equal(qkv.weight[384:], w0[384:])


# ---- parameter counts -----------------------------------------------------------------------------


def test_vit_base_qv_rank7_has_paper_count():
    model = timm.create_model("vit_base_patch16_224", pretrained=False, neat=dict(targets=["q", "v"], rank=7))
    assert trainable_summary(model)["neat"] == 258_048
    assert sum(p.numel() for _, p in named_adapter_parameters(model)) == 12 * 2 * (2 * 7 * 768)


@pytest.mark.parametrize(
    "cfg, per_block",
    [
        # (targets, rank, depth, axis) -> NEAT params per block of a width-192 ViT (qkv 576x192, fc 768x192)
        (dict(targets=["q", "v"], rank=4, depth=6), 2 * (2 * 4 * 192 + 4 * 16)),
        (dict(targets="qkv", rank=3), 2 * 3 * 576),
        (dict(targets="qkv", rank=3, axis="in"), 2 * 3 * 192),
        (dict(targets="qkv", rank=3, axis="auto", depth=4), 2 * 3 * 192 + 2 * 9),
        (dict(targets="mlp", rank=2), 2 * 2 * 768 + 2 * 2 * 192),
        (dict(targets="mlp", rank=2, axis="in"), 2 * 2 * 192 + 2 * 2 * 768),
        (dict(targets=["q", "v", "proj"], rank=5, depth=10, axis="in"), 3 * (2 * 5 * 192 + 8 * 25)),
    ],
)
def test_param_count_formula(cfg, per_block):
    model = build("vit", neat=cfg)
    assert trainable_summary(model)["neat"] == 2 * per_block
    for layer in adapted_layers(model).values():
        i = layer.in_features
        for (a, b), upd in zip(layer.slices, layer.updates):
            assert sum(p.numel() for p in upd.parameters()) == neat_vision.tweaker_param_count(
                b - a, i, cfg["rank"], cfg.get("depth", 2), cfg.get("axis", "out")
            )


def test_layers_selects_blocks():
    model = timm.create_model(
        "vit_base_patch16_224", pretrained=False, neat=dict(targets=["q", "v"], rank=1, layers=range(4, 12))
    )
    assert sorted(int(n.split(".")[1]) for n in adapted_layers(model)) == list(range(4, 12))
    swin = build("swin", neat=dict(targets="qkv", rank=1, layers=[1]))
    assert list(adapted_layers(swin)) == ["layers.1.blocks.0.attn.qkv"]
    with pytest.raises(TargetError, match="blocks \\[7\\] do not exist"):
        build("vit", neat=dict(targets="qkv", layers=[7]))


# ---- factored, fused and dense paths --------------------------------------------------------------


@pytest.mark.parametrize("depth", [2, 4, 6])
@pytest.mark.parametrize("act", ["relu", "sin", "gelu", "silu", "tanh", "identity"])
@pytest.mark.parametrize("axis", ["out", "in"])
def test_paths_agree(depth, act, axis):
    torch.manual_seed(0)
    base = nn.Linear(24, 36)
    cfg = NeatConfig(targets="x", rank=3, depth=depth, act=act, axis=axis, scale=0.7)
    layer = AdaptedLinear(base, [(0, 12), (24, 36)], cfg.make_update)
    for upd in layer.updates:
        nn.init.normal_(upd.B, std=0.5)
    x = torch.randn(5, 7, 24, requires_grad=True)
    outs, grads = {}, {}
    for path in ("dense", "factored", "fused"):
        layer.path = path
        layer.zero_grad()
        x.grad = None
        y = layer(x)
        (y * torch.linspace(-1, 1, 36)).sum().backward()
        outs[path] = y.detach()
        grads[path] = [x.grad.clone()] + [p.grad.clone() for p in layer.updates.parameters()]
    for path in ("factored", "fused"):
        torch.testing.assert_close(outs[path], outs["dense"], rtol=1e-5, atol=1e-5)
        for g, ref in zip(grads[path], grads["dense"]):
            torch.testing.assert_close(g, ref, **MERGE_TOL)
    dense = torch.zeros(36, 24)
    for (a, b), upd in zip(layer.slices, layer.updates):
        dense[a:b] = upd.delta_weight(base.weight[a:b])
    torch.testing.assert_close(layer.delta_weight(), dense)
    assert not torch.equal(outs["dense"], base(x))


# ---- dtype and compile ----------------------------------------------------------------------------


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["factored", "fused"])
def test_autocast_bf16(base_dtype, path):
    model = build("vit", neat=dict(targets=["q", "v"], rank=3, path=path))
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(base_dtype)
    assert all(p.dtype == torch.float32 for _, p in named_adapter_parameters(model))
    x = images("vit")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(-1).sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for _, p in named_adapter_parameters(model))


def test_torch_compile_trains_like_eager():
    """A compiled model's gradients, optimizer step and outputs after it equal eager's (at init the update is zero,
    so only a trained step shows the adapter's path is compiled right)."""
    eager = build("vit", neat=dict(targets=["q", "v"], rank=2))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend="aot_eager")
    x = images("vit")
    with torch.no_grad():
        before = eager(x)
    targets = torch.arange(len(x)) % before.shape[1]
    results = {}
    for name, model, net in (("eager", eager, eager), ("compiled", compiled_model, compiled)):
        params = [p for _, p in named_adapter_parameters(model)]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        for _ in range(2):  # the second step runs where the update is no longer zero
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), targets).backward()
            grads = [p.grad.clone() for p in params]
            optimizer.step()
        with torch.no_grad():
            results[name] = (grads, [p.detach().clone() for p in params], net(x))
    (g_e, p_e, out_e), (g_c, p_c, out_c) = results["eager"], results["compiled"]
    assert any(g.abs().sum() > 0 for g in g_e)
    for a, b in zip(g_e + p_e, g_c + p_c):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out_e, before, atol=1e-4)  # the trained update changed the outputs
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)


# ---- timm integration -----------------------------------------------------------------------------


def test_every_create_model_binding():
    code = (
        "from timm.models import create_model\n"
        "import timm, timm.models, neat_vision\n"
        "kw = dict(pretrained=False, img_size=32, patch_size=8, depth=1, neat=dict(targets='qkv', rank=2))\n"
        "for fn in (create_model, timm.create_model, timm.models.create_model, neat_vision.create_model):\n"
        "    m = fn('vit_tiny_patch16_224', **kw)\n"
        "    assert len(neat_vision.adapted_layers(m)) == 1, fn\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_neat_none_returns_untouched_model():
    for neat in (None,):
        model = build("vit", neat=neat)
        assert not adapted_layers(model) and all(p.requires_grad for p in model.parameters())


def test_checkpoint_path_and_local_pretrained_file(tmp_path):
    name, kwargs, _ = MODELS["vit"]
    torch.manual_seed(11)
    donor = timm.create_model(name, pretrained=False, **kwargs).eval()
    path = tmp_path / "weights.pth"
    torch.save(donor.state_dict(), path)
    x = images("vit")
    for extra in (dict(checkpoint_path=str(path)), dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))):
        torch.manual_seed(0)
        model = timm.create_model(
            name, **{"pretrained": False, **kwargs, **extra}, neat=dict(targets=["q", "v"], rank=2)
        ).eval()
        assert adapted_layers(model)
        with torch.no_grad():  # features: timm re-initialises a head whose class count differs from the cfg's
            torch.testing.assert_close(model.forward_features(x), donor.forward_features(x), rtol=0, atol=0)


def test_unknown_target_lists_adaptable_names():
    with pytest.raises(TargetError, match=r"blocks\.\*\.attn\.qkv.*blocks\.\*\.mlp\.fc1"):
        build("vit", neat=dict(targets="query"))


def test_regex_targets():
    model = build("vit", neat=dict(targets=r"blocks\.1\.mlp\.fc\d", rank=1))
    assert list(adapted_layers(model)) == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]


def test_overlapping_targets_refused():
    with pytest.raises(TargetError, match="overlap"):
        build("vit", neat=dict(targets=["qkv", "q"]))


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("rank", 0, "integer >= 1"),
        ("depth", 3, "even integer >= 2"),
        ("act", "swish", "relu, sin"),
        ("axis", "rows", "out, in, auto"),
        ("layers", [-1], "integers >= 0"),
        ("path", "fast", "factored, fused, dense"),
        ("targets", [], "non-empty"),
    ],
)
def test_config_errors_name_field_value_allowed(field, value, allowed):
    with pytest.raises(ConfigError) as err:
        NeatConfig(**{field: value})
    msg = str(err.value)
    assert f"NeatConfig.{field}={value!r}" in msg and allowed in msg


def test_unknown_config_key_fails():
    with pytest.raises(ConfigError, match="unknown NeatConfig field.*'rnak'.*rank"):
        build("vit", neat=dict(rnak=4))


def test_already_adapted_refused():
    model = build("vit", neat=dict(targets="qkv", rank=1))
    with pytest.raises(ValueError, match="already adapted"):
        neat_vision.apply_neat(model, dict(targets="proj"))


def test_apply_neat_on_existing_model():
    model = build("vit")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        neat_vision.apply_neat(model, NeatConfig(targets=["q", "v"], rank=2))
    assert len(adapted_layers(model)) == 2 and trainable_summary(model)["head"] == 192 * 5 + 5


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = build("vit", neat=dict(targets=["q", "v"], rank=3, depth=4))
        for _, p in named_adapter_parameters(model):
            torch.nn.init.normal_(p, std=0.1)
        model.set_grad_checkpointing(checkpointing)
        model(images("vit")).square().sum().backward()
        grads.append([p.grad.clone() for _, p in named_adapter_parameters(model)])
    for with_ckpt, without in zip(grads[1], grads[0]):
        torch.testing.assert_close(with_ckpt, without, rtol=1e-5, atol=1e-6)
