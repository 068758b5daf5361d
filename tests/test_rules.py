"""Layer rules (natgrad_cuda.curvature.rules): the registry, and a user's own module covered through
a registered rule exactly as the built-in rule covers its built-in twin. float64."""
from __future__ import annotations

import copy
import warnings

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


def step_and_delta(model, opt, x, y, loss_fn):
    """One opt.backward and step: (the gradient, the parameter change), flat over model.parameters()."""
    opt.zero_grad()
    out = model(x)
    opt.backward(loss_fn(out, y), out)
    params = list(model.parameters())
    g = torch.cat([p.grad.reshape(-1) for p in params])
    before = torch.cat([p.detach().reshape(-1) for p in params])
    opt.step()
    return g, torch.cat([p.detach().reshape(-1) for p in params]) - before


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


# ---- nn.ConvTranspose2d -------------------------------------------------------------------------------

CONV_T = [  # (in, out, kernel, stride, padding, output_padding, dilation)
    (2, 3, 3, 1, 0, 0, 1),
    (2, 3, 3, 2, 1, 1, 1),
    (3, 2, (2, 3), (2, 1), (0, 1), (1, 0), 1),
    (2, 2, 3, 3, 2, 2, 2),
    (1, 4, 1, 2, 0, 0, 1),
    (2, 3, 2, 2, 3, 0, 1),  # padding larger than dilation * (kernel - 1): the padded input is cropped
]


@pytest.mark.parametrize("cfg", CONV_T, ids=str)
def test_conv_transpose_rows_times_its_matrix_give_its_output(cfg):
    """The defining property of the rule: the rows of A times the (out, in) matrix of the weight are
    the layer's output at every position, and the matrix maps back to the weight."""
    c_in, c_out, k, s, p, op, d = cfg
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(c_in, c_out, k, stride=s, padding=p, output_padding=op, dilation=d, bias=False).to(DT)
    x = torch.randn(2, c_in, 4, 5, dtype=DT)
    rule = rules.rule_for(layer)
    rows, scale = rule.input_rows("t", layer, x, "expand")
    rows = rows.unfold() if isinstance(rows, ng.ops.ConvPatches) else rows
    y = layer(x)
    W = rule.to_matrix(layer, layer.weight.detach())
    assert W.shape == (c_out, c_in * layer.kernel_size[0] * layer.kernel_size[1])
    expect = y.detach().flatten(2).transpose(1, 2).reshape(-1, c_out)
    torch.testing.assert_close(rows @ W.T, expect, rtol=1e-12, atol=1e-12)
    assert scale == 1.0 / rule.positions(layer, y)
    assert torch.equal(rule.from_matrix(layer, W), layer.weight.detach())


def patches_model(layer):
    """The same map as ``layer`` (a transposed conv) as an nn.Linear over precomputed patch rows:
    (B, positions, in * kh * kw) -> (B, positions, out)."""
    lin = nn.Linear(1, 1).to(DT)
    lin.weight = nn.Parameter(rules.rule_for(layer).to_matrix(layer, layer.weight.detach()).clone())
    lin.bias = nn.Parameter(layer.bias.detach().clone())
    return lin


@pytest.mark.parametrize("cfg", CONV_T[:4], ids=str)
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_conv_transpose_factors_are_those_of_the_linear_layer_on_its_patches(cfg, fisher_type):
    """A transposed conv is a linear layer shared over the output positions, applied to its patch
    rows: K-FAC must give both the same A and G (the Linear rule is checked against curvlinops), and
    ``dense()`` must put kron(G, A) at the weight entries the matrix comes from."""
    c_in, c_out, k, s, p, op, d = cfg
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(c_in, c_out, k, stride=s, padding=p, output_padding=op, dilation=d).to(DT)
    x = torch.randn(3, c_in, 4, 5, dtype=DT)
    with torch.no_grad():
        out_shape = conv(x).shape
    y = torch.randn(out_shape, dtype=DT).flatten(1)
    lin = patches_model(conv)
    rows, _ = rules.rule_for(conv).input_rows("t", conv, x, "expand")
    rows = (rows.unfold() if isinstance(rows, ng.ops.ConvPatches) else rows).reshape(3, -1, lin.weight.shape[1])
    # the linear model's output in the transposed conv's (B, out * positions) layout
    as_conv = nn.Sequential(conv, nn.Flatten())
    as_linear = _Permuted(lin)
    kw = dict(fisher_type=fisher_type, separate_weight_and_bias=False)
    Fc = ng.curvature.kfac(as_conv, nn.MSELoss(), (x, y), **kw)
    Fl = ng.curvature.kfac(as_linear, nn.MSELoss(), (rows, y), **kw)
    torch.testing.assert_close(Fc.input_covariances["0"], Fl.input_covariances["lin"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(Fc.gradient_covariances["0"], Fl.gradient_covariances["lin"], rtol=1e-10, atol=1e-12)
    # dense(): the conv's weight entries in its own (in, out, kh, kw) order
    order = rules.rule_for(conv).to_matrix(conv, torch.arange(conv.weight.numel()).reshape(conv.weight.shape))
    perm = torch.cat([order.reshape(-1), conv.weight.numel() + torch.arange(c_out)])
    Dc, Dl = Fc.dense(), Fl.dense()
    torch.testing.assert_close(Dc[perm][:, perm], Dl, rtol=1e-10, atol=1e-12)


class _Permuted(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, rows):  # (B, S, in) -> (B, out * S), the conv's flattened (out, H, W) order
        return self.lin(rows).transpose(1, 2).flatten(1)


@pytest.mark.parametrize("backend", ["reference", "native", "emulated"])
def test_kfac_step_on_a_conv_transpose_is_the_dense_damped_inverse(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten()).to(DT)
    x = torch.randn(4, 2, 3, 3, dtype=DT)
    y = torch.randn(4, 3 * 5 * 5, dtype=DT)
    ref = nn.Sequential(*[m for m in model])  # same modules: the oracle is computed before the step
    K = ng.curvature.kfac(ref, nn.MSELoss(), (x, y), fisher_type="type-2", separate_weight_and_bias=False).dense()
    opt = ng.KFAC(model, lr=0.5, momentum=0.0, kl_clip=None, damping=0.1, loss="mse", fisher_type="type-2",
                  backend=backend)
    g, delta = step_and_delta(model, opt, x, y, F.mse_loss)
    expect = -0.5 * torch.linalg.solve(K + 0.1 * torch.eye(len(g), dtype=DT), g)
    torch.testing.assert_close(delta, expect, rtol=1e-9, atol=1e-12)


def test_conv_transpose_with_output_size_or_groups_is_refused():
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.ConvTranspose2d(2, 2, 3, stride=2)

        def forward(self, x):  # output_size picks an output padding of 1 instead of the module's 0
            return self.t(x, output_size=[10, 10])

    model = Up().to(DT)
    ng.KFAC(model, loss="mse", fisher_type="type-2")
    with pytest.raises(ValueError, match="output_size"):
        model(torch.randn(1, 2, 4, 4, dtype=DT))
    with pytest.warns(UserWarning, match="groups=2"):
        ng.KFAC(nn.Sequential(nn.ConvTranspose2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(2 * 9, 2)), loss="mse")


# ---- tied weights -------------------------------------------------------------------------------------


class TiedLM(nn.Module):
    """An embedding whose weight is also the output layer's (GPT-style weight tying)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.mid, self.head = nn.Embedding(10, 6), nn.Linear(6, 6), nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, i):
        return self.head(torch.tanh(self.mid(self.emb(i))))


class TiedLinears(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("case", ["embedding_and_head", "two_linears"])
def test_tied_parameters_are_preconditioned_once_by_the_first_covered_holder(case):
    """The tied parameter's step is (K + damping I)^-1 g with K the dense K-FAC of the covered
    layers (its block from its first covered holder: the embedding, or ``a``), g its whole gradient
    (every use); an uncovered parameter (``b``'s bias) follows its plain gradient."""
    if case == "embedding_and_head":
        model, loss = TiedLM().to(DT), "cross_entropy"
        x, y = torch.randint(0, 10, (16,)), torch.randint(0, 10, (16,))
        # the embedding comes first: its factors (a diagonal A over the vocabulary) precondition the tied weight
        covered, warning = ["emb", "mid"], r"head \(Linear; its parameters tied to 'emb' are preconditioned"
        loss_fn = nn.CrossEntropyLoss()
    else:
        model, loss = TiedLinears().to(DT), "mse"
        x, y = torch.randn(16, 4, dtype=DT), torch.randn(16, 4, dtype=DT)
        covered, warning = ["a"], r"b \(Linear; its parameters tied to 'a' are preconditioned"
        loss_fn = nn.MSELoss()
    with pytest.warns(UserWarning, match=warning):
        K = ng.curvature.kfac(model, loss_fn, (x, y), fisher_type="type-2", separate_weight_and_bias=False).dense()
    with pytest.warns(UserWarning, match=warning):
        opt = ng.KFAC(model, lr=0.5, momentum=0.0, kl_clip=None, damping=0.1, loss=loss, fisher_type="type-2",
                      backend="reference")
    assert [layer.name for layer in opt._engine.layers] == covered
    g, delta = step_and_delta(model, opt, x, y, loss_fn)
    params = list(model.parameters())  # each tied parameter once
    held = {id(p) for layer in opt._engine.layers for p in (layer.weight, layer.bias) if p is not None}
    kfac_entries = torch.cat([torch.full((p.numel(),), id(p) in held) for p in params])  # some covered layer holds
    expect = -0.5 * g.clone()
    idx = kfac_entries.nonzero().squeeze(1)
    sub = K[idx][:, idx] + 0.1 * torch.eye(len(idx), dtype=DT)
    expect[idx] = -0.5 * torch.linalg.solve(sub, g[idx])
    torch.testing.assert_close(delta, expect, rtol=1e-9, atol=1e-12)
    if case == "two_linears":
        assert not kfac_entries[-4:].any()  # b's bias: the plain gradient


# ---- nn.Embedding: a diagonal A --------------------------------------------------------------------------


class Tagger(nn.Module):
    """Token ids (B, T) -> per-token class logits (B, T, C) through an embedding."""

    def __init__(self, vocab=7, dim=4, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, classes)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids))).transpose(1, 2)  # (B, C, T): torch's cross-entropy layout


class OneHotTagger(nn.Module):
    """The same map with the embedding as a bias-free nn.Linear on one-hot rows (the dense oracle)."""

    def __init__(self, tagger):
        super().__init__()
        vocab, dim = tagger.emb.weight.shape
        self.vocab = vocab
        self.emb = nn.Linear(vocab, dim, bias=False).to(DT)
        self.emb.weight = nn.Parameter(tagger.emb.weight.detach().T.clone())
        self.head = copy.deepcopy(tagger.head)

    def forward(self, ids):
        x = F.one_hot(ids, self.vocab).to(DT)
        return self.head(torch.tanh(self.emb(x))).transpose(1, 2)


def tag_data(seed=3, B=5, T=4, vocab=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, 3, (B, T), generator=g)


@pytest.mark.parametrize("fisher_type", ["type-2", "empirical", "mc"])
def test_embedding_factors_are_the_one_hot_linear_layers_with_a_diagonal_a(fisher_type):
    tagger = Tagger().to(DT)
    ids, y = tag_data()
    Fe = ng.curvature.kfac(tagger, nn.CrossEntropyLoss(), (ids, y), fisher_type=fisher_type, seed=1)
    Fl = ng.curvature.kfac(OneHotTagger(tagger), nn.CrossEntropyLoss(), (ids, y), fisher_type=fisher_type, seed=1)
    A = Fe.input_covariances["emb"]
    assert A.shape == (7,)  # a vector: memory linear in the vocabulary
    torch.testing.assert_close(torch.diag(A), Fl.input_covariances["emb"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(Fe.gradient_covariances["emb"], Fl.gradient_covariances["emb"], rtol=1e-10,
                               atol=1e-13)
    # dense(): the embedding's (vocab, dim) weight is the transpose of the one-hot layer's
    order = torch.arange(28).reshape(7, 4).T.reshape(-1)
    perm = torch.cat([order, 28 + torch.arange(4 * 3 + 3)])
    torch.testing.assert_close(Fe.dense()[perm][:, perm], Fl.dense(), rtol=1e-10, atol=1e-13)


def test_embedding_kfac_of_one_token_is_the_exact_ggn_block():
    tagger = Tagger().to(DT)
    ids, y = torch.tensor([[2]]), torch.tensor([[1]])
    K = ng.curvature.kfac(tagger, nn.CrossEntropyLoss(), (ids, y), fisher_type="type-2").dense()
    GGN = ng.curvature.ggn(tagger, nn.CrossEntropyLoss(), (ids, y))
    n = 7 * 4
    torch.testing.assert_close(K[:n, :n], GGN[:n, :n], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("backend", ["reference", "native", "emulated"])
@pytest.mark.parametrize("inverse", ["eigen", "factored"])
def test_kfac_step_on_an_embedding_is_the_dense_damped_inverse(backend, inverse):
    tagger = Tagger().to(DT)
    ids, y = tag_data()
    opt = ng.KFAC(tagger, lr=0.5, momentum=0.0, kl_clip=None, damping=0.1, loss="cross_entropy",
                  fisher_type="type-2", inverse=inverse, backend=backend)
    fe = ng.curvature.kfac(tagger, nn.CrossEntropyLoss(), (ids, y), fisher_type="type-2",
                           separate_weight_and_bias=False)
    g, delta = step_and_delta(tagger, opt, ids, y, F.cross_entropy)
    if inverse == "eigen":
        expect = -0.5 * torch.linalg.solve(fe.dense() + 0.1 * torch.eye(len(g), dtype=DT), g)
    else:  # factored damping: (A + pi sqrt(l) I)^-1 (x) (G + sqrt(l)/pi I)^-1 per layer, from the reference op
        emb_dir = ng.reference.precondition(
            [tagger.emb.weight.grad.T], [torch.eye(7, dtype=DT)], [fe.input_covariances["emb"]],
            [torch.linalg.eigh(fe.gradient_covariances["emb"])[1]],
            [torch.linalg.eigh(fe.gradient_covariances["emb"])[0]], 0.1, "factored")[0].T
        torch.testing.assert_close(delta[:28], -0.5 * emb_dir.reshape(-1), rtol=1e-9, atol=1e-12)
        return
    torch.testing.assert_close(delta, expect, rtol=1e-9, atol=1e-12)


def test_a_large_vocabulary_costs_memory_linear_in_it():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(50_000, 8), nn.Linear(8, 5)

        def forward(self, ids):
            return self.fc(torch.tanh(self.emb(ids)).mean(1))

    torch.manual_seed(0)
    model = Bag()
    opt = ng.KFAC(model, loss="cross_entropy", factor_update_freq=1, inv_update_freq=1)
    ids, y = torch.randint(0, 50_000, (16, 12)), torch.randint(0, 5, (16,))
    for _ in range(2):  # a (50000, 50000) factor would take 10 GB: these steps would not run
        opt.zero_grad()
        out = model(ids)
        opt.backward(F.cross_entropy(out, y), out)
        assert opt.step()
    state = opt.state_dict()["kfac"]["layers"]["emb"]
    assert {k: tuple(v.shape) for k, v in state.items()} == {"A": (50_000,), "dA": (50_000,), "G": (8, 8),
                                                              "QG": (8, 8), "dG": (8,)}
    other = ng.KFAC(Bag(), loss="cross_entropy")
    other.load_state_dict(opt.state_dict())  # and it validates and loads
    bad = copy.deepcopy(opt.state_dict())
    bad["kfac"]["layers"]["emb"]["QA"] = torch.eye(3)
    with pytest.raises(ValueError, match="unknown entries"):
        other.load_state_dict(bad)


@pytest.mark.parametrize("kwargs,reason", [(dict(max_norm=1.0), "max_norm"),
                                           (dict(scale_grad_by_freq=True), "scale_grad_by_freq"),
                                           (dict(sparse=True), "sparse")])
def test_embedding_forms_the_rule_cannot_cover_are_reported(kwargs, reason):
    model = nn.Sequential(nn.Embedding(5, 3, **kwargs), nn.Flatten(), nn.Linear(6, 2))
    with pytest.warns(UserWarning, match=f"0 \\(Embedding: {reason}"):
        ng.KFAC(model, loss="mse")


def test_embedding_with_reduce_is_refused():
    tagger = Tagger().to(DT)
    opt = ng.KFAC(tagger, loss="cross_entropy", kfac_approx="reduce")
    with pytest.raises(ValueError, match="kfac_approx='expand' only"):
        tagger(tag_data()[0])
    del opt


# ---- scale-and-shift layers (the norms): exact per-entry blocks --------------------------------------


def norm_case(kind, seed=0):
    """(model, x, y) with the norm as module "1" between two covered layers, one loss term per data
    point (the condition under which type-2's per-example blocks are the exact GGN's)."""
    torch.manual_seed(seed)
    B = 5
    if kind in ("layernorm", "layernorm_nobias", "rmsnorm", "batchnorm1d", "batchnorm1d_eval"):
        norm = {"layernorm": nn.LayerNorm(4), "layernorm_nobias": nn.LayerNorm(4, bias=False),
                "rmsnorm": nn.RMSNorm(4), "batchnorm1d": nn.BatchNorm1d(4),
                "batchnorm1d_eval": nn.BatchNorm1d(4)}[kind]
        model = nn.Sequential(nn.Linear(3, 4), norm, nn.Tanh(), nn.Linear(4, 3))
        x = torch.randn(B, 3)
    elif kind == "layernorm_sequence":  # (B, T, C): T positions share the weight; normalized_shape (T, C) too
        model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.LayerNorm((2, 4)), nn.Flatten(),
                              nn.Linear(8, 3))
        x = torch.randn(B, 2, 3)
    else:  # GroupNorm / BatchNorm2d over a conv's channels and positions
        norm = nn.GroupNorm(2, 4) if kind == "groupnorm" else nn.BatchNorm2d(4)
        model = nn.Sequential(nn.Conv2d(2, 4, 2), norm, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
        x = torch.randn(B, 2, 3, 3)
    model, x = model.to(DT), x.to(DT)
    with torch.no_grad():  # away from the initial 1 and 0, so that every term shows
        for m in model:
            if rules.rule_for(m) is not None and rules.rule_for(m).scale_shift:
                for p in m.parameters():
                    p.add_(0.3 * torch.randn_like(p))
    if kind == "batchnorm1d_eval":
        model(x)  # some running statistics
        model.eval()
    return model, x, torch.randint(0, 3, (B,))


def entry_mask(model, curv):
    """The (P, P) pattern of the per-entry blocks of every scale-and-shift layer of ``curv``."""
    P = curv.num_params
    mask = torch.zeros(P, P, dtype=DT)
    offsets, total = {}, 0
    for p in model.parameters():
        offsets[id(p)] = total
        total += p.numel()
    for name, F_ in curv.scale_shift_blocks.items():
        module = model.get_submodule(name)
        idx = [offsets[id(p)] + torch.arange(p.numel()) for p in (module.weight, getattr(module, "bias", None)) if p is not None]
        for i in idx:
            for j in idx:
                mask[i, j] = 1.0
    return mask


NORMS = ["layernorm", "layernorm_nobias", "layernorm_sequence", "rmsnorm", "groupnorm", "batchnorm1d",
         "batchnorm1d_eval", "batchnorm2d"]


@pytest.mark.parametrize("kind", NORMS)
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
def test_norm_blocks_are_the_exact_blocks_of_the_ggn_or_empirical_fisher(kind, fisher_type):
    model, x, y = norm_case(kind)
    loss_fn = nn.CrossEntropyLoss()
    curv = ng.curvature.kfac(model, loss_fn, (x, y), fisher_type=fisher_type, separate_weight_and_bias=False)
    assert set(curv.scale_shift_blocks) == {n for n, m in model.named_children()
                                            if rules.rule_for(m) is not None and rules.rule_for(m).scale_shift}
    exact = (ng.curvature.ggn if fisher_type == "type-2" else ng.curvature.empirical_fisher)(model, loss_fn, (x, y))
    mask = entry_mask(model, curv)
    assert mask.sum() > 0
    torch.testing.assert_close(curv.dense() * mask, exact * mask, rtol=1e-10, atol=1e-13)
    # separate weight and bias: the blocks' diagonals only
    sep = ng.curvature.kfac(model, loss_fn, (x, y), fisher_type=fisher_type, separate_weight_and_bias=True)
    diag = mask * torch.eye(len(mask), dtype=DT)
    torch.testing.assert_close(sep.dense() * mask, exact * diag, rtol=1e-10, atol=1e-13)


def test_norm_forward_only_blocks_are_the_second_moments_of_the_normalised_inputs():
    model, x, y = norm_case("layernorm_sequence")
    curv = ng.curvature.kfac(model, nn.CrossEntropyLoss(), (x, y), fisher_type="forward-only",
                             separate_weight_and_bias=False)
    h = model[2](model[1](model[0](x)))  # the input of the (2, 4) LayerNorm
    xhat = F.layer_norm(h, (2, 4)).reshape(5, 8)
    rows = torch.stack([xhat, torch.ones_like(xhat)], -1)  # (N, P, 2)
    torch.testing.assert_close(curv.scale_shift_blocks["3"], torch.einsum("npi,npj->pij", rows, rows) / 5)


@pytest.mark.parametrize("backend", ["reference", "native", "emulated"])
@pytest.mark.parametrize("inverse", ["eigen", "factored"])
def test_kfac_step_on_a_norm_is_the_exact_damped_inverse_of_its_blocks(backend, inverse):
    model, x, y = norm_case("layernorm", seed=1)
    model_ref = copy.deepcopy(model)
    opt = ng.KFAC(model, lr=0.5, momentum=0.0, kl_clip=None, damping=0.1, loss="cross_entropy",
                  fisher_type="type-2", inverse=inverse, backend=backend)
    curv = ng.curvature.kfac(model_ref, nn.CrossEntropyLoss(), (x, y), fisher_type="type-2",
                             separate_weight_and_bias=False)
    g, delta = step_and_delta(model, opt, x, y, F.cross_entropy)
    torch.testing.assert_close(opt._engine.state["1"]["F"], curv.scale_shift_blocks["1"], rtol=1e-12, atol=1e-14)
    mask = entry_mask(model_ref, curv)
    idx = mask.diagonal() > 0
    K = curv.dense()[idx][:, idx]  # the norm's blocks: the same for either inverse (no Kronecker product)
    expect = -0.5 * torch.linalg.solve(K + 0.1 * torch.eye(len(K), dtype=DT), g[idx])
    torch.testing.assert_close(delta[idx], expect, rtol=1e-9, atol=1e-12)
    if inverse == "eigen":  # and the whole step: the damped inverse of the block-diagonal matrix
        full = -0.5 * torch.linalg.solve(curv.dense() + 0.1 * torch.eye(len(g), dtype=DT), g)
        torch.testing.assert_close(delta, full, rtol=1e-9, atol=1e-12)


def test_a_resnet_with_norms_and_a_depthwise_conv_is_covered_without_warning():
    torch.manual_seed(0)

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)

        def forward(self, x):
            return x + self.dw(torch.relu(self.bn(self.conv(x))))

    resnet = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), Residual(), nn.Flatten(),
                           nn.LayerNorm(4 * 4 * 4), nn.Linear(4 * 4 * 4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = ng.KFAC(resnet, loss="cross_entropy", factor_update_freq=1)
        covered = {id(p) for layer in opt._engine.layers for p in (layer.weight, layer.bias) if p is not None}
        assert covered == {id(p) for p in resnet.parameters()}
        x, y = torch.randn(6, 1, 4, 4), torch.randint(0, 3, (6,))
        for _ in range(3):
            opt.zero_grad()
            out = resnet(x)
            opt.backward(F.cross_entropy(out, y), out)
            opt.step()
    assert opt.steps == 3


def test_a_norm_layers_state_round_trips_and_a_bad_one_is_refused():
    model, x, y = norm_case("groupnorm")
    opt = ng.KFAC(model, loss="cross_entropy", factor_update_freq=1, seed=0)
    step_and_delta(model, opt, x, y, F.cross_entropy)
    sd = copy.deepcopy(opt.state_dict())
    assert set(sd["kfac"]["layers"]["1"]) == {"F", "QF", "dF"}
    twin = copy.deepcopy(model)
    opt2 = ng.KFAC(twin, loss="cross_entropy", factor_update_freq=1, seed=0)
    opt2.load_state_dict(sd)
    _, d1 = step_and_delta(model, opt, x, y, F.cross_entropy)
    _, d2 = step_and_delta(twin, opt2, x, y, F.cross_entropy)
    assert torch.equal(d1, d2)
    bad = copy.deepcopy(sd)
    bad["kfac"]["layers"]["1"]["QF"] = bad["kfac"]["layers"]["1"]["QF"] * 2
    with pytest.raises(ValueError, match="'QF': eigenvectors must be orthonormal"):
        opt2.load_state_dict(bad)
