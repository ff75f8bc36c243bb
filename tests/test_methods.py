"""Every method on the shared machinery: the invariants of LoRA and FourierFT, peft conformance, budgets, options."""

import argparse
import copy

import pytest
import timm
import torch
from torch import nn

import neat_vision
from neat_vision import (
    AdaptedLinear,
    ConfigError,
    FourierConfig,
    LoraConfig,
    NeatConfig,
    adapted_layers,
    disable_neat,
    merge,
    merge_and_unload,
    neat_parameters,
    rank_for_budget,
    save_adapter,
    trainable_summary,
    unmerge,
)
from neat_vision.engine.method_options import add_method_arguments, method_config
from neat_vision.engine.model import build_adapter
from neat_vision.engine.options import settle_command_line
from neat_vision.methods import method_names
from neat_vision.methods.budget import update_param_count
from neat_vision.methods.fourierft import fourier_indices

VIT = dict(pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=5)
MERGE_TOL = dict(rtol=1e-4, atol=1e-4)

CASES = [
    LoraConfig(targets=["q", "v"], rank=4, alpha=8),
    LoraConfig(targets="qkv", rank=2, dropout=0.2, path="fused"),
    LoraConfig(targets="mlp", rank=3, path="dense", layers=[1]),
    FourierConfig(targets=["q", "v"], n=50, alpha=300.0),
    FourierConfig(targets=["proj", "fc2"], n=80, alpha=100.0, seed=3),
]
IDS = ["lora-qv", "lora-qkv-dropout-fused", "lora-mlp-dense", "fourier-qv", "fourier-proj-fc2"]


def build(config=None, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", **VIT)
    return model if config is None else neat_vision.apply_adapter(model, config)


def images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def train_steps(model, x, steps=3, lr=0.05):
    """A few AdamW steps on a fixed batch (train mode: dropout on); every trainable tensor moves."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    target = torch.arange(x.shape[0]) % 5
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
    return model.eval()


@pytest.fixture(params=CASES, ids=IDS)
def config(request):
    return request.param


def test_identity_at_init_in_train_and_eval(config):
    base = build()
    model = build(config)
    x = images()
    with torch.no_grad():
        for mode in (False, True):
            torch.testing.assert_close(model.train(mode)(x), base.train(mode)(x), rtol=0, atol=0)


def test_only_trainable_tensors_change(config):
    model = build(config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n, _ in model.get_classifier().named_parameters()}
    assert trainable == {n for n, _ in neat_parameters(model)} | {f"head.{n}" for n in head}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, images())
    for name, value in model.state_dict().items():
        if name in trainable:
            assert not torch.equal(value, before[name]), f"{name} did not train"
        else:
            torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=f"{name} changed")


def test_merge_unmerge_unload_and_disable(config):
    base = build()
    model = train_steps(build(config), images())
    base.get_classifier().load_state_dict(model.get_classifier().state_dict())
    x = images(seed=2)
    with torch.no_grad():
        y = model(x)
        assert not torch.allclose(y, base(x))
        with disable_neat(model):
            torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
        w0 = {n: m.weight.detach().clone() for n, m in adapted_layers(model).items()}
        merge(model, safe=True)
        torch.testing.assert_close(model(x), y, **MERGE_TOL)
        unmerge(model)
        assert all(torch.equal(m.weight, w0[n]) for n, m in adapted_layers(model).items())
        plain = merge_and_unload(copy.deepcopy(model))
        assert not adapted_layers(plain)
        torch.testing.assert_close(plain(x), y, **MERGE_TOL)


def test_save_load_round_trip(config, tmp_path):
    model = train_steps(build(config), images())
    folder = save_adapter(model, tmp_path / "adapter")
    assert neat_vision.read_adapter_config(folder)["method"] == config.method
    fresh = neat_vision.load_adapter(build().eval(), folder)
    assert fresh.neat_config == config
    neat_vision.set_path(fresh, config.path)  # a runtime setting: the same path gives the same bits
    x = images(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_analytic_count_matches_model(config):
    model = build(config)
    assert update_param_count(build(), config) == trainable_summary(model)["neat"] > 0


@pytest.mark.parametrize("method", method_names())
def test_every_method_trains(method):
    options = {"neat": "--neat-rank 2", "lora": "--lora-rank 2", "fourierft": "--fourier-n 30"}.get(method, "")
    model = build_adapter(build(), engine_args(f"--method {method} {options}".split()))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if method == "linear":
        assert trainable == {"head.weight", "head.bias"}
    if method == "full":
        assert trainable == {n for n, _ in model.named_parameters()}
    x, target = images(6), torch.arange(6) % 5
    with torch.no_grad():
        loss0 = nn.functional.cross_entropy(model(x), target)
    train_steps(model, x, steps=4, lr=1e-2)
    with torch.no_grad():
        assert nn.functional.cross_entropy(model(x), target) < loss0


def test_an_unknown_method_is_refused_naming_the_methods():
    with pytest.raises(ConfigError, match="one of neat, lora, fourierft, linear, full"):
        method_config(argparse.Namespace(method="bitfit"))


# ---- the layer protocol: paths and dropout ---------------------------------------------------------


def test_lora_paths_agree_and_dropout_only_in_training():
    torch.manual_seed(0)
    base = nn.Linear(24, 36)
    layer = AdaptedLinear(base, [(0, 12), (24, 36)], LoraConfig(targets="x", rank=3, alpha=6).make_update)
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
        outs[path], grads[path] = y.detach(), [x.grad.clone()] + [p.grad.clone() for p in layer.updates.parameters()]
    for path in ("factored", "fused"):
        torch.testing.assert_close(outs[path], outs["dense"], rtol=1e-5, atol=1e-5)
        for g, ref in zip(grads[path], grads["dense"]):
            torch.testing.assert_close(g, ref, **MERGE_TOL)

    with_dropout = LoraConfig(targets="x", rank=3, alpha=6, dropout=0.5)
    dropped = AdaptedLinear(base, [(0, 12), (24, 36)], with_dropout.make_update)
    dropped.load_state_dict(layer.state_dict())
    with torch.no_grad():
        dropped.eval()
        torch.testing.assert_close(dropped(x), outs["dense"], rtol=1e-5, atol=1e-5)
        dropped.train()
        for path in ("dense", "factored", "fused"):
            dropped.path = path
            y = dropped(x)
            assert not torch.allclose(y, outs["dense"])
            torch.testing.assert_close(y[..., 12:24], base(x)[..., 12:24], rtol=0, atol=0)  # k rows untouched


def test_fourier_has_no_factors_and_fixed_locations():
    cfg = FourierConfig(targets="x", n=40, seed=5)
    a, b = cfg.make_update(12, 24), cfg.make_update(12, 24)
    assert not hasattr(a, "factors") and "indices" not in a.state_dict()
    assert torch.equal(a.indices, b.indices) and torch.equal(a.indices, fourier_indices(12, 24, 40, 5))
    assert not torch.equal(a.indices, cfg.replace(seed=6).make_update(12, 24).indices)
    assert len({(int(r), int(c)) for r, c in a.indices.t()}) == 40
    with pytest.raises(ConfigError, match=r"FourierConfig.n=400 is not allowed: at most 288 for a 12x24 block"):
        cfg.replace(n=400).make_update(12, 24)


@pytest.mark.parametrize(
    "cls, changes, match",
    [
        (LoraConfig, dict(rank=0), r"LoraConfig.rank=0 is not allowed: an integer >= 1"),
        (LoraConfig, dict(dropout=1.0), r"LoraConfig.dropout=1.0 is not allowed: a probability in \[0, 1\)"),
        (LoraConfig, dict(alpha=-1), r"LoraConfig.alpha=-1 is not allowed"),
        (LoraConfig, dict(path="sparse"), r"LoraConfig.path='sparse' is not allowed: one of factored, fused, dense"),
        (FourierConfig, dict(n=True), r"FourierConfig.n=True is not allowed: an integer >= 1"),
        (FourierConfig, dict(alpha=float("nan")), r"FourierConfig.alpha=nan is not allowed: a finite number"),
        (FourierConfig, dict(targets=[]), r"FourierConfig.targets=\[\] is not allowed"),
        (FourierConfig, dict(layers=[-1]), r"FourierConfig.layers=\[-1\] is not allowed"),
    ],
)
def test_config_errors_name_field_value_allowed(cls, changes, match):
    with pytest.raises(ConfigError, match=match):
        cls(**changes)


def test_coerce_and_round_trip_dicts():
    cfg = LoraConfig(targets=["q", "v"], rank=4, layers=[3, 1])
    assert cfg.layers == (1, 3) and LoraConfig.coerce(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"unknown FourierConfig field\(s\) \['rank'\]: allowed fields are"):
        FourierConfig.coerce({"rank": 3})


# ---- peft conformance ----------------------------------------------------------------------------

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(20, 30)

    def forward(self, x):
        return self.lin(x)


def _ours_on(net_state, config):
    base = nn.Linear(20, 30)
    base.load_state_dict({k.removeprefix("lin."): v for k, v in net_state.items()})
    return AdaptedLinear(base, [(0, 30)], config.make_update, path=config.path)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_matches_peft(dropout):
    torch.manual_seed(0)
    net = Net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    model = peft.get_peft_model(net, peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules=["lin"]))
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.5)
    ours = _ours_on(state, LoraConfig(targets="lin", rank=4, alpha=12, dropout=dropout))
    with torch.no_grad():
        ours.updates[0].A.copy_(layer.lora_A["default"].weight)
        ours.updates[0].B.copy_(layer.lora_B["default"].weight)
    x = torch.randn(6, 20)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        for path in ("factored", "fused", "dense"):
            ours.path = path
            torch.testing.assert_close(ours.eval()(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.delta_weight(), layer.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
        model.train()
        torch.manual_seed(7)
        expected = model(x)
        torch.manual_seed(7)
        torch.testing.assert_close(ours.train()(x), expected, rtol=1e-5, atol=1e-5)  # the same dropout mask


def test_lora_init_matches_peft_distribution():
    torch.manual_seed(3)
    ours = LoraConfig(targets="x", rank=4).make_update(30, 20)
    torch.manual_seed(3)
    theirs = nn.Linear(20, 4, bias=False)  # peft's lora_A: kaiming-uniform(a=sqrt(5)) like nn.Linear
    torch.testing.assert_close(ours.A, theirs.weight, rtol=0, atol=0)
    assert not ours.B.any()


def test_fourierft_matches_peft():
    torch.manual_seed(0)
    net = Net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    pcfg = peft.FourierFTConfig(n_frequency=45, scaling=150.0, random_loc_seed=11, target_modules=["lin"])
    model = peft.get_peft_model(net, pcfg)  # init_weights=False: N(0, 1) coefficients, a non-zero update
    layer = model.base_model.model.lin
    ours = _ours_on(state, FourierConfig(targets="lin", n=45, alpha=150.0, seed=11))
    assert torch.equal(ours.updates[0].indices, layer.indices["default"])
    with torch.no_grad():
        ours.updates[0].spectrum.copy_(layer.fourierft_spectrum["default"])
        x = torch.randn(6, 20)
        torch.testing.assert_close(ours(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.delta_weight(), layer.get_delta_weight("default"), rtol=1e-5, atol=1e-7)


# ---- parameter budgets ---------------------------------------------------------------------------


def test_budget_reproduces_paper_counts_on_vit_base():
    vit_b = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10)
    assert rank_for_budget(vit_b, "neat", 258_048) == (7, 258_048)  # the paper's QV setting, r = 7
    assert rank_for_budget(vit_b, "neat", 258_048, targets=["q", "v", "mlp"]) == (2, 258_048)  # QV-MLP: r = 2
    assert rank_for_budget(vit_b, "lora", 589_824) == (16, 589_824)
    assert rank_for_budget(vit_b, "fourierft", 239_000) == (9958, 238_992)
    assert rank_for_budget(vit_b, "neat", 5) == (1, 36_864)  # below the smallest count: rank 1


@pytest.mark.parametrize(
    "method, fields",
    [
        ("neat", dict(depth=6, targets=["q", "v"])),
        ("neat", dict(axis="in", targets="mlp", layers=[1])),
        ("lora", dict(targets="qkv")),
        ("fourierft", dict(targets=["q", "v"])),
    ],
)
@pytest.mark.parametrize("budget", [1000, 7777, 20000])
def test_budget_is_closest_and_real(method, fields, budget):
    value, count = rank_for_budget(build, method, budget, **fields)
    key = {"neat": "rank", "lora": "rank", "fourierft": "n"}[method]
    cfg = {"neat": NeatConfig, "lora": LoraConfig, "fourierft": FourierConfig}[method](**fields, **{key: value})
    assert trainable_summary(build(cfg))["neat"] == count
    for other in (value - 1, value + 1):
        if other >= 1:
            assert abs(update_param_count(build(), cfg.replace(**{key: other})) - budget) >= abs(count - budget)


def test_budget_caps_fourier_n_and_refuses_other_methods():
    assert rank_for_budget(build(), "fourierft", 10**9, targets="q") == (192 * 192, 2 * 192 * 192)
    with pytest.raises(ConfigError, match="param_budget is not allowed with method='linear'"):
        rank_for_budget(build(), "linear", 100)
    with pytest.raises(ConfigError, match="param_budget=0 is not allowed"):
        rank_for_budget(build(), "neat", 0)


# ---- the training engine's side: options and configs ---------------------------------------------


def engine_args(argv):
    """The options every runner parses for its method (defaults: the configs' own, as train.py)."""
    parser = argparse.ArgumentParser()
    add_method_arguments(parser, config_defaults=True)
    args = parser.parse_args(argv)
    settle_command_line(parser, args, argv)
    return args


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], NeatConfig(rank=7)),
        ("--neat-depth 4 --neat-act sin --neat-layers 1", NeatConfig(rank=7, depth=4, act="sin", layers=[1])),
        ("--method lora --lora-rank 16 --lora-alpha 16 --lora-dropout 0.1", LoraConfig(rank=16, alpha=16, dropout=0.1)),
        ("--method fourierft --neat-targets q,v,proj --fourier-n 30", FourierConfig(targets=["q", "v", "proj"], n=30)),
        ("--method lora --neat-layers 0-1 --neat-path fused", LoraConfig(layers=[0, 1], path="fused")),
        ("--method linear", None),
        ("--method full", None),
    ],
)
def test_method_config_from_options(argv, expected):
    assert method_config(engine_args(argv.split() if argv else []), build()) == expected


def test_method_config_solves_budget(capsys):
    args = engine_args(["--method", "neat", "--neat-targets", "q", "v", "mlp", "--param-budget", "7000"])
    config = method_config(args, build())
    value, count = rank_for_budget(build(), "neat", 7000, targets=["q", "v", "mlp"])
    assert config == NeatConfig(targets=["q", "v", "mlp"], rank=value)
    assert f"param budget 7000: neat_rank={value} gives {count} update parameters" in capsys.readouterr().out
    args = engine_args(["--method", "full", "--param-budget", "7000"])
    with pytest.raises(ConfigError, match="param_budget=7000 is not allowed with method='full'"):
        method_config(args, build())


@pytest.mark.parametrize(
    "argv, match",
    [
        ("--method lora --lora-dropout 1.5", r"lora_dropout=1.5 is not allowed: a probability in \[0, 1\)"),
        ("--method fourierft --fourier-n 0", r"fourier_n=0 is not allowed: an integer >= 1"),
        ("--method fourierft --neat-layers 0 --neat-train-head-is-yaml-only", r"neat_train_head=1 is not allowed"),
        ("--neat-depth 3", r"neat_depth=3 is not allowed: an even integer >= 2"),
    ],
)
def test_method_config_errors_name_the_options(argv, match):
    argv = argv.split()
    yaml_only = "--neat-train-head-is-yaml-only" in argv  # neat_train_head: a YAML key (or --neat train_head=...)
    args = engine_args([a for a in argv if a != "--neat-train-head-is-yaml-only"])
    if yaml_only:
        args.neat_train_head = 1
    with pytest.raises(ConfigError, match=match):
        method_config(args, build())
