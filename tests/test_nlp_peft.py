"""Same weights in, same outputs out: NEAT on tiny RoBERTa and LLaMA against peft's PEANuT tuner.

peft's ``depth`` counts encoder/decoder pairs (peft depth k = our depth 2k + 2) and its tweaker reads the
columns of ``W0`` (our ``axis="out"``). peft's weights are copied into our tweakers; logits must agree.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from transformers import LlamaForCausalLM, RobertaForSequenceClassification  # noqa: E402

from neat_vision import NeatConfig, adapted_layers, set_path  # noqa: E402
from neat_vision.nlp import apply_neat  # noqa: E402
from tests.nlp_fixtures import (  # noqa: E402
    llama_config,
    roberta_config,
    single_thread,  # noqa: F401 (an autouse fixture)
)

CASES = [
    # (family, our targets, peft target_modules, peft depth, act, layers)
    ("roberta", ["q", "v"], ["query", "value"], 0, "relu", None),
    ("roberta", ["q", "v", "down"], ["query", "value", "output.dense"], 1, "gelu", [1]),
    ("llama", ["q", "k", "v", "up", "down"], ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], 0, "relu", None),
    ("llama", ["v", "o"], ["v_proj", "o_proj"], 2, "tanh", [0]),
]


def build(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "roberta":
        return RobertaForSequenceClassification(roberta_config(num_labels=3)).eval()
    return LlamaForCausalLM(llama_config()).eval()


IDS = ["roberta-q-v", "roberta-q-v-down-depth4-layer1", "llama-q-k-v-up-down", "llama-v-o-depth6-layer0"]


@pytest.mark.parametrize(("family", "ours", "theirs", "peft_depth", "act", "layers"), CASES, ids=IDS)
def test_matches_peft_peanut_on_transformers(family, ours, theirs, peft_depth, act, layers):
    peft_cfg = peft.PeanutConfig(
        r=3,
        depth=peft_depth,
        act_fn=act,
        scaling=0.7,
        target_modules=theirs,
        layers_to_transform=layers,
        exclude_modules=["attention.output.dense"] if "output.dense" in theirs else None,
    )
    peft_model = peft.get_peft_model(build(family), peft_cfg).eval()
    gen = torch.Generator().manual_seed(1)
    peft_layers = {n: m for n, m in peft_model.named_modules() if hasattr(m, "peanut_A") and "default" in m.peanut_A}
    with torch.no_grad():  # B is zero at init in both: make the update non-trivial
        for layer in peft_layers.values():
            b = layer.peanut_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.5)

    model = apply_neat(
        build(family), NeatConfig(targets=ours, rank=3, depth=2 * peft_depth + 2, act=act, scale=0.7, layers=layers)
    )
    mine = adapted_layers(model)
    assert sorted(mine) == sorted(n.removeprefix("base_model.model.") for n in peft_layers)
    with torch.no_grad():
        for name, layer in peft_layers.items():
            tweaker = mine[name.removeprefix("base_model.model.")].updates[0]
            tweaker.A.copy_(layer.peanut_A["default"].weight)
            tweaker.B.copy_(layer.peanut_B["default"].weight)
            for a, b in zip(tweaker.encoders, layer.peanut_encoders["default"]):
                a.weight.copy_(b.weight)
            for a, b in zip(tweaker.decoders, layer.peanut_decoders["default"]):
                a.weight.copy_(b.weight)

    x = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = peft_model(input_ids=x).logits
        for path in ("factored", "fused", "dense"):
            set_path(model, path)
            torch.testing.assert_close(model(input_ids=x).logits, expected, rtol=1e-5, atol=1e-5)
