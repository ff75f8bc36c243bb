"""The speed benchmark's CPU smoke mode (so the script cannot rot), and the fast paths it measures.

The batched tweaker pass (`neat_vision.batching.batch_tweakers`) and the hand-written backward of the
factored and fused layers must compute the same function and gradients as the per-layer reference.
"""

import copy
import importlib.util
import json
import pickle
import sys
from pathlib import Path

import pytest
import timm
import torch

import neat_vision
from neat_vision import adapted_layers, merge_and_unload, named_adapter_parameters
from neat_vision.batching import batch_tweakers
from neat_vision.layers import _FactoredLinear, _FusedLinear

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "benchmarks" / "bench_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_speed"] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_smoke(tmp_path):
    bench = _load_bench()
    md, js = tmp_path / "RESULTS.md", tmp_path / "results.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--smoke", "--md", str(md), "--json", str(js)]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads(js.read_text())["results"]
    assert not [r for r in results if "error" in r]
    sections = {r["section"] for r in results}
    assert {"main", "infer", "compile", "rank", "width", "cars", "profile", "llm"} <= sections
    llm = {r["variant"]: r for r in results if r["section"] == "llm"}
    assert set(llm) == {"peft-lora", "peft-peanut", "neat", "neat-batched", "neat-fused"}
    # NEAT and peft PEANuT at the same rank train the same number of tensors' entries (axis out, depth 2)
    assert llm["neat"]["trainable"] == llm["peft-peanut"]["trainable"] == llm["neat-fused"]["trainable"]
    text = md.read_text()
    for title in (
        "## Training step",
        "## Inference",
        "## Compiled mode",
        "## Scaling with rank",
        "## StanfordCars",
        "## Language model: smoke",
    ):
        assert title in text
    assert "| NEAT r=7 depth 6 batched | q,v |" in text


CONFIGS = [
    dict(targets=["q", "v"], rank=3, depth=6, act="gelu"),
    dict(targets="qkv", rank=2, depth=4, act="sin", scale=0.5),
    dict(targets=["q", "v", "mlp"], rank=2, axis="in", path="fused"),
    dict(targets=["q", "k", "v", "proj"], rank=2, depth=4, axis="auto"),
]


def _model(cfg):
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=5, neat=cfg
    )
    with torch.no_grad():
        for _, p in named_adapter_parameters(model):
            p.normal_(std=0.3)
    return model


def _run(model, x, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach().float(), [p.grad.clone() for _, p in named_adapter_parameters(model)]


@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: "-".join(c["targets"]) if isinstance(c["targets"], list) else c["targets"]
)
def test_batched_tweakers_match_per_layer(cfg):
    model = _model(cfg)
    batched = batch_tweakers(copy.deepcopy(model))
    x = torch.randn(3, 3, 32, 32)
    for autocast, tol in ((False, dict(rtol=1e-5, atol=1e-5)), (True, dict(rtol=2e-2, atol=2e-2))):
        y0, g0 = _run(model, x, autocast)
        y1, g1 = _run(batched, x, autocast)
        torch.testing.assert_close(y1, y0, **tol)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b, **tol)
        assert all(layer.__dict__.get("_pending") is None for layer in adapted_layers(batched).values())
    y0, _ = _run(model, x)
    for clone in (pickle.loads(pickle.dumps(batched)), copy.deepcopy(batched)):
        torch.testing.assert_close(_run(clone, x)[0], y0)
    plain = merge_and_unload(batched)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), y0, rtol=1e-4, atol=1e-4)
    batch_tweakers(plain, enabled=False)
    assert not plain._forward_pre_hooks and not plain._forward_hooks


def test_batched_pass_used_once_per_forward(monkeypatch):
    from neat_vision import batching, layers

    calls = {"batched": 0, "own": 0}
    orig_batched, orig_factors = batching._batched_factors, layers.AdaptedLinear._factors

    def batched(*a):
        calls["batched"] += 1
        return orig_batched(*a)

    def own(*a):
        calls["own"] += 1
        return orig_factors(*a)

    monkeypatch.setattr(batching, "_batched_factors", batched)
    monkeypatch.setattr(layers.AdaptedLinear, "_factors", own)
    model = batch_tweakers(_model(dict(targets=["q", "v"], depth=4)))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert calls == {"batched": 1, "own": 0}
    qkv = model.blocks[0].attn.qkv
    y = qkv(torch.randn(2, 5, 192))  # outside the model's forward: computes its own factors
    assert calls == {"batched": 1, "own": 1} and y.shape == (2, 5, 576)
    with neat_vision.disable_neat(model):
        model(torch.randn(2, 3, 32, 32))
    assert calls == {"batched": 1, "own": 1}


@pytest.mark.parametrize("fn", [_FactoredLinear, _FusedLinear])
def test_custom_backward_gradcheck(fn):
    torch.manual_seed(0)
    d = torch.float64
    x = torch.randn(2, 3, 5, dtype=d, requires_grad=True)
    w = torch.randn(6, 5, dtype=d, requires_grad=True)
    b = torch.randn(6, dtype=d, requires_grad=True)
    left = torch.randn(6, 2, dtype=d, requires_grad=True)
    right = torch.randn(2, 5, dtype=d, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: fn.apply(*a, d), (x, w, b, left, right))
    assert torch.autograd.gradcheck(lambda x, w, lf, rt: fn.apply(x, w, None, lf, rt, d), (x, w, left, right))
