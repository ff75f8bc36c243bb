"""Adapters between peft's PEANuT and neat-vision: same outputs after conversion, both ways, timm and transformers.

peft's adapters are made by peft itself (``get_peft_model`` + ``save_pretrained``) and read back by peft itself
(``PeftModel.from_pretrained``); every trainable tensor is randomised first so that the update and the head are
not trivially zero.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import neat_vision
from neat_vision import LoraConfig, NeatConfig
from neat_vision.integrations.peft import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    PeftConversionError,
    main,
    neat_to_peft,
    peft_to_neat,
)

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from transformers import LlamaForCausalLM, RobertaForSequenceClassification  # noqa: E402

from tests.nlp_fixtures import llama_config, roberta_config, single_thread  # noqa: E402,F401

TOL = dict(rtol=1e-5, atol=1e-5)
VIT = dict(img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2, num_classes=5)


def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT).eval()


def roberta() -> torch.nn.Module:
    torch.manual_seed(0)
    return RobertaForSequenceClassification(roberta_config(num_labels=3)).eval()


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config()).eval()


def image_input() -> dict:
    return {"x": torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))}


def token_input() -> dict:
    return {"input_ids": torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(2))}


def outputs(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(*inputs.values()) if "x" in inputs else model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


@torch.no_grad()
def randomise_trainable(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)


CASES = {
    # build, inputs, PeanutConfig kwargs
    "timm-vit-qkv-fc1-depth4-gelu": (
        vit,
        image_input,
        dict(r=3, depth=1, act_fn="gelu", scaling=0.7, target_modules=["qkv", "fc1"], modules_to_save=["head"]),
    ),
    "roberta-query-value-seqcls": (
        roberta,
        token_input,
        dict(r=2, depth=0, act_fn="relu", scaling=0.5, target_modules=["query", "value"], task_type="SEQ_CLS"),
    ),
    "llama-qkv-up-down-depth6-tanh": (
        llama,
        token_input,
        dict(r=3, depth=2, act_fn="tanh", target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_to_neat_to_peft_keeps_outputs_and_tensors(case: str, tmp_path: Path) -> None:
    build, make_inputs, kwargs = CASES[case]
    inputs = make_inputs()
    peft_model = peft.get_peft_model(build(), peft.PeanutConfig(**kwargs)).eval()
    randomise_trainable(peft_model)
    expected = outputs(peft_model, inputs)
    assert not torch.allclose(expected, outputs(build(), inputs), **TOL)  # the adapter changes the outputs
    peft_model.save_pretrained(tmp_path / "peft")

    ours = peft_to_neat(tmp_path / "peft", build(), tmp_path / "ours")
    peft_layers = [k for k in load_file(tmp_path / "peft" / PEFT_WEIGHTS) if ".peanut_A." in k]
    assert len(neat_vision.adapted_layers(ours)) == len(peft_layers)
    torch.testing.assert_close(outputs(ours, inputs), expected, **TOL)
    reloaded = neat_vision.load_adapter(build(), tmp_path / "ours")  # the written folder is a valid adapter
    torch.testing.assert_close(outputs(reloaded, inputs), expected, **TOL)

    neat_to_peft(tmp_path / "ours", tmp_path / "peft2")
    first, second = (load_file(tmp_path / name / PEFT_WEIGHTS) for name in ("peft", "peft2"))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=0, atol=0)
    a, b = (json.loads((tmp_path / name / PEFT_CONFIG).read_text()) for name in ("peft", "peft2"))
    assert {k: b[k] for k in ("peft_type", "r", "depth", "act_fn", "scaling")} == {
        k: a[k] for k in ("peft_type", "r", "depth", "act_fn", "scaling")
    }
    back = peft.PeftModel.from_pretrained(build(), tmp_path / "peft2").eval()
    torch.testing.assert_close(outputs(back, inputs), expected, **TOL)


def test_neat_adapter_to_peft_keeps_outputs(tmp_path: Path) -> None:
    """Our own adapter (identity activation, depth 4, qkv + proj, head) read by peft gives the same outputs."""
    model = neat_vision.apply_neat(vit(), NeatConfig(targets=["qkv", "proj"], rank=2, depth=4, act="identity"))
    randomise_trainable(model)
    neat_vision.save_adapter(model, tmp_path / "ours")
    neat_to_peft(tmp_path / "ours", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    assert (config["depth"], config["act_fn"], config["modules_to_save"]) == (1, "linear", ["head"])
    back = peft.PeftModel.from_pretrained(vit(), tmp_path / "peft").eval()
    inputs = image_input()
    torch.testing.assert_close(outputs(back, inputs), outputs(model, inputs), **TOL)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (NeatConfig(targets=["q", "v"], rank=2), r"blocks\.0\.attn\.qkv has 2 updates on row slices"),
        (NeatConfig(targets=["v"], rank=2), r"blocks\.0\.attn\.qkv \(weight 96 x 32\) has width 32"),
        (NeatConfig(targets=["qkv"], rank=2, axis="in"), r"axis 'in'"),
        (NeatConfig(targets=["fc1"], rank=2, axis="auto"), r"axis 'auto' chose 'in'"),
        (NeatConfig(targets=["qkv"], rank=2, act="sin"), r"activation 'sin'"),
        (LoraConfig(targets=["qkv"], rank=2), r"method 'lora' is not NEAT"),
    ],
    ids=["q-v-slices", "v-slice", "axis-in", "axis-auto-in", "sin", "lora"],
)
def test_what_peft_cannot_express_is_refused_by_name(config, message: str, tmp_path: Path) -> None:
    model = neat_vision.apply_adapter(vit(), config)
    neat_vision.save_adapter(model, tmp_path / "ours")
    with pytest.raises(PeftConversionError, match=message) as info:
        neat_to_peft(tmp_path / "ours", tmp_path / "peft")
    assert "cannot be expressed in peft's PEANuT" in str(info.value)
    assert not (tmp_path / "peft").exists()


def test_peft_adapters_without_a_neat_equivalent_are_refused(tmp_path: Path) -> None:
    lora = peft.get_peft_model(vit(), peft.LoraConfig(r=2, target_modules=["qkv"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(PeftConversionError, match=r"peft_type='LORA'; only PEANUT"):
        peft_to_neat(tmp_path / "lora", vit())
    odd = peft.get_peft_model(vit(), peft.PeanutConfig(r=2, act_fn="gelu_new", target_modules=["qkv"]))
    odd.save_pretrained(tmp_path / "odd")
    with pytest.raises(PeftConversionError, match=r"act_fn='gelu_new' has no NEAT activation"):
        peft_to_neat(tmp_path / "odd", vit())


def test_command_line_converts_both_ways(tmp_path: Path) -> None:
    """``from-peft`` builds the timm base by name (the shipped fractal ViT: real pretrained weights offline)."""
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny6_patch4_32.fractal", pretrained=True, num_classes=4).eval()
    cfg = peft.PeanutConfig(r=2, target_modules=["qkv"], modules_to_save=["head"])
    peft_model = peft.get_peft_model(base, cfg).eval()
    randomise_trainable(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    x = {"x": torch.randn(2, 3, 32, 32)}
    argv = ["from-peft", "--peft", str(tmp_path / "peft"), "--output", str(tmp_path / "ours")]
    main([*argv, "--model", "vit_tiny6_patch4_32.fractal", "--num-classes", "4"])
    ours = neat_vision.load_adapter(None, tmp_path / "ours").eval()  # rebuilt from the recorded timm name
    torch.testing.assert_close(outputs(ours, x), outputs(peft_model, x), **TOL)
    main(["to-peft", "--adapter", str(tmp_path / "ours"), "--output", str(tmp_path / "peft2")])
    fresh = timm.create_model("vit_tiny6_patch4_32.fractal", pretrained=True, num_classes=4).eval()
    back = peft.PeftModel.from_pretrained(fresh, tmp_path / "peft2").eval()
    torch.testing.assert_close(outputs(back, x), outputs(peft_model, x), **TOL)
    with pytest.raises(SystemExit, match="no peft adapter config"):
        main(["from-peft", "--peft", str(tmp_path / "nothing"), "--output", str(tmp_path / "x"), "--model", "m"])
