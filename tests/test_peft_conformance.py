"""Same weights in, same outputs out: our layer against peft's PEANuT tuner (peft depth k = our 2k + 2)."""

import pytest
import torch
from torch import nn

from neat_vision import AdaptedLinear, NeatConfig

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(20, 30)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("peft_depth", [0, 1, 2])
@pytest.mark.parametrize("act", ["relu", "gelu", "tanh"])
def test_matches_peft_peanut(peft_depth, act):
    torch.manual_seed(0)
    net = Net()
    base_state = {k: v.clone() for k, v in net.state_dict().items()}
    peft_cfg = peft.PeanutConfig(r=4, depth=peft_depth, act_fn=act, scaling=0.3, target_modules=["lin"])
    peft_model = peft.get_peft_model(net, peft_cfg)
    layer = peft_model.base_model.model.lin
    with torch.no_grad():  # B is zero at init in both: make the update non-trivial
        layer.peanut_B["default"].weight.normal_(std=0.5)

    base = nn.Linear(20, 30)
    base.load_state_dict({k.removeprefix("lin."): v for k, v in base_state.items()})
    cfg = NeatConfig(targets="lin", rank=4, depth=2 * peft_depth + 2, act=act, scale=0.3)
    ours = AdaptedLinear(base, [(0, 30)], cfg.make_update)
    tweaker = ours.updates[0]
    with torch.no_grad():
        tweaker.A.copy_(layer.peanut_A["default"].weight)
        tweaker.B.copy_(layer.peanut_B["default"].weight)
        for mine, theirs in zip(tweaker.encoders, layer.peanut_encoders["default"]):
            mine.weight.copy_(theirs.weight)
        for mine, theirs in zip(tweaker.decoders, layer.peanut_decoders["default"]):
            mine.weight.copy_(theirs.weight)

    x = torch.randn(6, 20)
    expected = peft_model(x)
    for path in ("factored", "fused", "dense"):
        ours.path = path
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.delta_weight(), layer.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
