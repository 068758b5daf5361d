"""Layer rules (natgrad_cuda.curvature.rules): the registry, and a user's own module covered through
a registered rule exactly as the built-in rule covers its built-in twin. float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad_cuda as ng
from natgrad_cuda.curvature import rules

DT = torch.float64


class MyLinear(nn.Module):
    """A user's linear layer whose parameters are not called weight and bias."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.W = nn.Parameter(torch.randn(d_out, d_in, dtype=DT) / d_in ** 0.5)
        self.c = nn.Parameter(torch.zeros(d_out, dtype=DT))

    def forward(self, x):
        return F.linear(x, self.W, self.c)


class MyLinearRule(rules.LinearRule):
    def weight(self, module):
        return module.W

    def bias(self, module):
        return module.c


def twins():
    torch.manual_seed(0)
    mine = nn.Sequential(MyLinear(5, 7), nn.Tanh(), MyLinear(7, 3))
    builtin = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(DT)
    with torch.no_grad():
        for m, b in ((mine[0], builtin[0]), (mine[2], builtin[2])):
            b.weight.copy_(m.W)
            b.bias.copy_(m.c)
    return mine, builtin


def test_a_registered_rule_covers_a_users_module_like_its_builtin_twin():
    ng.curvature.register_rule(MyLinear, MyLinearRule())
    mine, builtin = twins()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(12, 5, dtype=DT, generator=g), torch.randint(0, 3, (12,), generator=g)) for _ in range(3)]
    x, y = batches[0]
    K1 = ng.curvature.kfac(mine, nn.CrossEntropyLoss(), (x, y), fisher_type="type-2").dense()
    K2 = ng.curvature.kfac(builtin, nn.CrossEntropyLoss(), (x, y), fisher_type="type-2").dense()
    torch.testing.assert_close(K1, K2, rtol=1e-12, atol=1e-14)
    # the dense oracle: with one data point, type-2 K-FAC is the exact GGN's layer blocks
    one = (x[:1], y[:1])
    K = ng.curvature.kfac(mine, nn.CrossEntropyLoss(), one, fisher_type="type-2",
                          separate_weight_and_bias=False).dense()
    GGN = ng.curvature.ggn(mine, nn.CrossEntropyLoss(), one)
    sizes = [7 * 5 + 7, 3 * 7 + 3]  # the layers' (W, c) blocks, in parameters() order
    mask = torch.block_diag(*[torch.ones(n, n, dtype=DT) for n in sizes])
    torch.testing.assert_close(K, GGN * mask, rtol=1e-10, atol=1e-12)
    models = twins()
    opts = [ng.KFAC(m, loss="cross_entropy", fisher_type="type-2", factor_update_freq=1, seed=0) for m in models]
    assert [layer.name for layer in opts[0]._engine.layers] == ["0", "2"]
    for x, y in batches:
        for m, opt in zip(models, opts):
            opt.zero_grad()
            out = m(x)
            opt.backward(F.cross_entropy(out, y), out)
            opt.step()
    a = torch.cat([p.detach().reshape(-1) for p in models[0].parameters()])
    b = torch.cat([p.detach().reshape(-1) for p in models[1].parameters()])
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_module_without_a_rule_is_reported():
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.ones(3, dtype=DT))

        def forward(self, x):
            return x * self.p

    model = nn.Sequential(nn.Linear(3, 3).to(DT), Other())
    with pytest.warns(UserWarning, match=r"does not cover 1 \(Other\)"):
        ng.KFAC(model, loss="mse")


def test_a_subclass_gets_its_parents_rule_and_bad_registrations_are_refused():
    class MyConv(nn.Conv2d):
        pass

    assert isinstance(rules.rule_for(MyConv(1, 1, 3)), rules.ConvRule)
    assert rules.rule_for(nn.Tanh()) is None
    with pytest.raises(TypeError, match="module_type"):
        ng.curvature.register_rule("Linear", rules.LinearRule())
    with pytest.raises(TypeError, match="LayerRule"):
        ng.curvature.register_rule(nn.Linear, object())


def test_a_rule_can_refuse_a_module_with_a_reason():
    with pytest.warns(UserWarning, match="padding_mode='circular'"):
        ng.KFAC(nn.Sequential(nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular"), nn.Flatten(),
                              nn.Linear(8, 2)), loss="mse")
