"""nn.MultiheadAttention under K-FAC: the equivalent forward is torch's bit for bit, the q, k, v and
output projections get the factors of the same projections written as nn.Linear modules, and a
transformer trains with every parameter covered. float64 unless a test says otherwise."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad_cuda as ng
from natgrad_cuda.curvature.attention import Watch

DT = torch.float64
E, H = 8, 2


# ---- the equivalent forward ------------------------------------------------------------------------

FORWARDS = [
    dict(),
    dict(batch_first=False),
    dict(cross="kv"),  # key is value, not the query (encoder-decoder attention)
    dict(cross="all"),  # three different inputs
    dict(kdim=5, vdim=3, cross="all"),  # separate projection weights
    dict(need_weights=False),
    dict(need_weights=False, mask="causal"),
    dict(mask="bool"),
    dict(mask="float", need_weights=False),
    dict(padding=True),
    dict(padding=True, mask="bool", need_weights=False),
    dict(add_zero_attn=True, padding=True),
    dict(dropout=0.3),
    dict(dropout=0.3, need_weights=False),
    dict(bias=False),
    dict(average_attn_weights=False),
    dict(unbatched=True),
]


def attention_call(cfg, dtype=DT, seed=0):
    """(attention, args, kwargs) for one configuration."""
    torch.manual_seed(seed)
    bf = cfg.get("batch_first", True)
    attn = nn.MultiheadAttention(E, H, dropout=cfg.get("dropout", 0.0), bias=cfg.get("bias", True),
                                 add_zero_attn=cfg.get("add_zero_attn", False), kdim=cfg.get("kdim"),
                                 vdim=cfg.get("vdim"), batch_first=bf).to(dtype)
    B, L, S = 3, 4, 5 if cfg.get("cross") else 4

    def seq(n, d):
        if cfg.get("unbatched"):
            return torch.randn(n, d, dtype=dtype)
        return torch.randn(B, n, d, dtype=dtype) if bf else torch.randn(n, B, d, dtype=dtype)

    q = seq(L, E)
    if cfg.get("cross") == "kv":
        k = v = seq(S, E)
    elif cfg.get("cross") == "all":
        k, v = seq(S, cfg.get("kdim") or E), seq(S, cfg.get("vdim") or E)
    else:
        k = v = q
    kwargs = dict(need_weights=cfg.get("need_weights", True))
    if "average_attn_weights" in cfg:
        kwargs["average_attn_weights"] = cfg["average_attn_weights"]
    mask = cfg.get("mask")
    if mask == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, dtype=dtype)
        kwargs["is_causal"] = True
    elif mask == "bool":
        kwargs["attn_mask"] = torch.rand(L, S) < 0.3
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(L, S, dtype=dtype)
    if cfg.get("padding"):
        pad = torch.zeros(B, S, dtype=torch.bool)
        pad[0, -2:] = True
        kwargs["key_padding_mask"] = pad
    return attn, (q, k, v), kwargs


@pytest.mark.parametrize("cfg", FORWARDS, ids=str)
def test_the_equivalent_forward_is_torchs_bit_for_bit_and_shows_every_projection(cfg):
    attn, args, kwargs = attention_call(cfg)
    torch.manual_seed(1)
    expect = attn(*args, **kwargs)
    watch = Watch(attn, {}, lambda *a, **k: None)
    torch.manual_seed(1)  # the same dropout masks
    with watch:
        got = attn(*args, **kwargs)
    assert sorted(watch.seen) == ["k", "out", "q", "v"]
    for g, e in zip(got, expect):
        assert (g is None) == (e is None)
        if e is not None:
            assert torch.equal(g, e)


# ---- factors: those of the same projections as nn.Linear modules --------------------------------------


def memory(x, kdim):
    """What the cross-attending models attend to: the sequence reversed, its first kdim features."""
    return x.flip(1)[..., :kdim]


class Attending(nn.Module):
    """An attention (torch's) of a sequence to itself or to a memory made from it, then a linear head."""

    def __init__(self, cross: bool, kdim=None):
        super().__init__()
        self.cross, self.kdim = cross, kdim or E
        self.attn = nn.MultiheadAttention(E, H, batch_first=True, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        kv = memory(x, self.kdim) if self.cross else x
        y, _ = self.attn(x, kv, kv, need_weights=False)
        return self.head(y).mean(1)


class Twin(nn.Module):
    """The same computation with the projections as nn.Linear modules (named q, k, v, out)."""

    def __init__(self, model: Attending):
        super().__init__()
        a = model.attn
        self.cross, self.kdim = model.cross, model.kdim
        kdim = a.kdim
        self.q, self.k, self.v, self.out = nn.Linear(E, E), nn.Linear(kdim, E), nn.Linear(kdim, E), nn.Linear(E, E)
        with torch.no_grad():
            weights = (a.in_proj_weight.chunk(3) if a.in_proj_weight is not None
                       else (a.q_proj_weight, a.k_proj_weight, a.v_proj_weight))
            for lin, w, b in zip((self.q, self.k, self.v), weights, a.in_proj_bias.chunk(3)):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
        self.out.load_state_dict(a.out_proj.state_dict())
        self.head = copy.deepcopy(model.head)

    def forward(self, x):
        q, kv = x, memory(x, self.kdim) if self.cross else x
        B, L, S = q.shape[0], q.shape[1], kv.shape[1]
        heads = [f(t).reshape(B, n, H, E // H).transpose(1, 2) for f, t, n in ((self.q, q, L), (self.k, kv, S),
                                                                                 (self.v, kv, S))]
        o = F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(B, L, E)
        return self.head(self.out(o)).mean(1)


@pytest.mark.parametrize("case", ["self", "cross", "cross_kdim"])
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical", "mc"])
@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_projection_factors_are_those_of_the_projections_as_linear_modules(case, fisher_type, kfac_approx):
    torch.manual_seed(0)
    model = Attending(cross=case != "self", kdim=5 if case == "cross_kdim" else None).to(DT)
    twin = Twin(model).to(DT)
    x = torch.randn(3, 4, E, dtype=DT)
    y = torch.randint(0, 3, (3,))
    torch.testing.assert_close(model(x), twin(x), rtol=1e-12, atol=1e-14)
    kw = dict(fisher_type=fisher_type, kfac_approx=kfac_approx, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every parameter covered
        ours = ng.curvature.kfac(model, nn.CrossEntropyLoss(), (x, y), **kw)
    theirs = ng.curvature.kfac(twin, nn.CrossEntropyLoss(), (x, y), **kw)
    assert ours.modules == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "head"]
    for mine, twin_name in zip(ours.modules, theirs.modules):
        torch.testing.assert_close(ours.input_covariances[mine], theirs.input_covariances[twin_name],
                                   rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(ours.gradient_covariances[mine], theirs.gradient_covariances[twin_name],
                                   rtol=1e-10, atol=1e-13)
    # dense(): each projection's block at its rows of in_proj_weight (or its own weight) and in_proj_bias.
    # The model's flat layout is [q.w, k.w, v.w, q.b, k.b, v.b, out.w, out.b, head.w, head.b] in the twin's terms.
    t = twin
    layout = [t.q.weight, t.k.weight, t.v.weight, t.q.bias, t.k.bias, t.v.bias, t.out.weight, t.out.bias,
              t.head.weight, t.head.bias]
    twin_params = list(t.parameters())
    pos = {id(p): i for i, p in enumerate(twin_params)}
    starts = torch.tensor([0] + [p.numel() for p in twin_params]).cumsum(0)
    perm = torch.cat([torch.arange(int(starts[pos[id(p)]]), int(starts[pos[id(p)] + 1])) for p in layout])
    torch.testing.assert_close(ours.dense(), theirs.dense()[perm][:, perm], rtol=1e-10, atol=1e-13)


# ---- the optimizer on torch's transformer layers ---------------------------------------------------------


class TinyLM(nn.Module):
    def __init__(self, vocab=7, layer=nn.TransformerEncoderLayer, dropout=0.0):
        super().__init__()
        self.emb = nn.Embedding(vocab, E)
        kw = dict(dim_feedforward=16, dropout=dropout, batch_first=True)
        self.decoder = layer is nn.TransformerDecoderLayer
        self.block = layer(E, H, **kw)
        self.norm = nn.LayerNorm(E)
        self.out = nn.Linear(E, vocab)

    def forward(self, ids):
        T = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=self.emb.weight.dtype)
        h = self.emb(ids)
        h = self.block(h, h, tgt_mask=mask, tgt_is_causal=True) if self.decoder else \
            self.block(h, src_mask=mask, is_causal=True)
        return self.out(self.norm(h))


def lm_batch(B=4, T=6, vocab=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)


@pytest.mark.parametrize("layer", [nn.TransformerEncoderLayer, nn.TransformerDecoderLayer])
def test_torchs_transformer_layers_train_with_every_parameter_covered_and_no_warning(layer):
    torch.manual_seed(0)
    model = TinyLM(layer=layer, dropout=0.1)
    ids, targets = lm_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = ng.KFAC(model, lr=0.1, loss="cross_entropy", factor_update_freq=1, inv_update_freq=1)
        covered = {id(p) for layer_ in opt._engine.layers for p in (layer_.weight, layer_.bias) if p is not None}
        assert covered == {id(p) for p in model.parameters()}
        losses = []
        for _ in range(8):
            opt.zero_grad()
            out = model(ids)
            loss = F.cross_entropy(out.reshape(-1, 7), targets.reshape(-1))
            opt.backward(loss, out)
            opt.step()
            losses.append(float(loss.detach()))
    assert opt.steps == 8 and losses[-1] < losses[0]


@pytest.mark.parametrize("backend", ["reference", "native", "emulated"])
def test_kfac_step_on_a_transformer_is_the_damped_inverse_of_its_kfac_matrix(backend):
    torch.manual_seed(0)
    model = TinyLM().to(DT)
    ids, targets = lm_batch()
    ref = copy.deepcopy(model)

    def loss_fn(out, y):  # the usual language-model loss, on the (B*T, V) view of the (B, T, V) logits
        return F.cross_entropy(out.reshape(-1, 7), y.reshape(-1))

    opt = ng.KFAC(model, lr=0.5, momentum=0.0, kl_clip=None, damping=0.1, loss="cross_entropy",
                  fisher_type="type-2", backend=backend)
    opt.zero_grad()
    out = model(ids)
    opt.backward(loss_fn(out, targets), out)
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt.step()
    delta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before
    # the oracle: the same factors as a flattened batch, from curvature.kfac with the (B*T, V) layout
    K = ng.curvature.kfac(ClassesFirst(ref), nn.CrossEntropyLoss(), (ids, targets), fisher_type="type-2",
                          separate_weight_and_bias=False).dense()
    expect = -0.5 * torch.linalg.solve(K + 0.1 * torch.eye(len(g), dtype=DT), g)
    torch.testing.assert_close(delta, expect, rtol=1e-8, atol=1e-11)


class ClassesFirst(nn.Module):
    """A language model's logits in torch's (B, V, T) layout: the same B * T terms of V classes."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(ids).transpose(1, 2)


def test_an_attention_kfac_cannot_cover_is_reported_with_its_output_projection():
    holder = nn.ModuleDict({"attn": nn.MultiheadAttention(E, H, add_bias_kv=True), "lin": nn.Linear(E, 2)})
    with pytest.warns(UserWarning, match=r"attn \(MultiheadAttention: add_bias_kv=True.*attn.out_proj"):
        ng.KFAC(holder, loss="mse")


def test_an_attention_whose_forward_hides_its_projections_raises_instead_of_going_without_curvature():
    class OwnForward(nn.MultiheadAttention):  # computes attention itself, never through torch's function
        def forward(self, q, k, v, **kwargs):
            W, b = self.in_proj_weight, self.in_proj_bias
            B, L, _ = q.shape
            heads = [F.linear(t, w, c).reshape(B, L, H, E // H).transpose(1, 2)
                     for t, w, c in zip((q, k, v), W.chunk(3), b.chunk(3))]
            o = F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(B, L, E)
            return self.out_proj(o), None

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = OwnForward(E, H, batch_first=True), nn.Linear(E, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0].mean(1))

    model = Model()
    opt = ng.KFAC(model, loss="cross_entropy")
    with pytest.raises(RuntimeError, match="did not go through F.multi_head_attention_forward"):
        model(torch.randn(2, 3, E))
    with torch.no_grad():  # forwards that are not recorded run as they are
        model(torch.randn(2, 3, E))
    del opt


def test_the_preconditioner_in_front_of_sgd_moves_a_transformer_as_kfac_does():
    torch.manual_seed(0)
    a = TinyLM().to(DT)
    b = copy.deepcopy(a)
    ids, targets = lm_batch()
    kw = dict(damping=0.1, kl_clip=None, loss="cross_entropy", fisher_type="type-2")
    opt = ng.KFAC(a, lr=0.5, momentum=0.0, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pre = ng.KFACPreconditioner(b, lr=0.5, **kw)
    sgd = torch.optim.SGD(b.parameters(), lr=0.5)
    for _ in range(2):
        for model, k in ((a, opt), (b, pre)):
            model.zero_grad()
            out = model(ids)
            k.backward(F.cross_entropy(out.reshape(-1, 7), targets.reshape(-1)), out)
        opt.step()
        pre.step()
        sgd.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_the_overflow_check_bounds_a_parameter_shared_by_several_blocks_by_all_of_them():
    """in_proj_weight's direction is the q, k and v blocks together: a q row that would overflow the
    parameter must not hide behind the v block's small norm."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(E, H, batch_first=True).half()
    model = nn.ModuleDict({"attn": attn})
    opt = ng.KFAC(model, lr=1.0, momentum=0.0, kl_clip=None, loss="mse")
    W = attn.in_proj_weight
    with torch.no_grad():
        W.zero_()
        W[0, 0] = -3.0e4  # float16: half its range is 32752, all of it 65504
    direction = torch.zeros_like(W)
    direction[0, 0] = 4.0e4  # in the q rows: p - lr * d = -7e4 overflows
    blocks = [(None, [W], None, None, None, direction[i * E:(i + 1) * E].clone()) for i in range(3)]
    with torch.no_grad():  # as in step()
        problem = opt._step_problem([W], [torch.zeros_like(W)], [direction], [None], [True], 1.0, 0.0, 0.0, 0.0,
                                    blocks)
    assert problem is not None and "overflow" in problem
