"""KFAC(inverse="ekfac"): eigenvalue-corrected K-FAC (George et al. 2018). In K-FAC's eigenbasis
U = QG (x) QA the scaling S is re-estimated from the step's per-example gradients: its batch estimate
is the diagonal of U^T GGN U, the exact GGN block rotated (the dense definition, checked here in
float64 on every backend), averaged like the factors, and restarted from K-FAC's own dG dA^T at each
new eigenbasis. The tests taking ``device`` run on the GPU too when present (conftest.py)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad_cuda as ng
from natgrad_cuda import _ext, emulation

DT = torch.float64
BACKENDS = ["reference", "native", "emulated"]


def need(backend, device="cpu"):
    if backend == "native" and not _ext.native_available(torch.device(device)):
        pytest.fail(f"the {device} kernels are not compiled")
    if backend == "emulated" and not emulation.available():
        pytest.fail("the emulated CUDA backend is not compiled")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def cpu_twin(model):
    """The model's architecture and values on the CPU, without the optimizer's hooks: for the dense oracle."""
    twin = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    twin.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    return twin


def data(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, dtype=DT, generator=g), torch.randint(0, 3, (n,), generator=g)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def step(model, opt, x, y):
    opt.zero_grad()
    out = model(x)
    opt.backward(F.cross_entropy(out, y), out)
    grads = {name: torch.cat([m.weight.grad, m.bias.grad[:, None]], dim=1).clone()
             for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    before = flat(model)
    opt.step()
    return grads, flat(model) - before


def dense_ggn_blocks(model, x):
    """Each Linear's exact GGN block of the mean cross-entropy over [W | b] (row-major vec), from the
    per-example, per-class gradients J_n^T s_nk (s_nk the columns of the loss Hessian's square root
    sqrt(p_k) (e_k - p))."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    params = dict(model.named_parameters())
    blocks = {name: 0 for name in names}

    def f(p, xi):
        return torch.func.functional_call(model, p, (xi[None],))[0]

    for xi in x:
        J = torch.func.jacrev(f)(params, xi)  # {param: (C, *shape)}
        p = torch.softmax(f(params, xi), 0)
        for k in range(p.shape[0]):
            s = p[k].sqrt() * (torch.eye(p.shape[0], dtype=DT)[k] - p)
            for name in names:
                gw = torch.einsum("c,cij->ij", s, J[name + ".weight"])
                gb = torch.einsum("c,ci->i", s, J[name + ".bias"])
                v = torch.cat([gw, gb[:, None]], dim=1).reshape(-1)
                blocks[name] = blocks[name] + torch.outer(v, v) / x.shape[0]
    return blocks


def rotated_diagonal(block, QA, QG):
    U = torch.kron(QG, QA)  # vec(QG^T M QA) = U^T vec(M) for the row-major vec
    return torch.diagonal(U.T @ block @ U).reshape(QG.shape[0], QA.shape[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaling_matches_the_rotated_ggn_diagonal(backend, device, to_device, tol):
    need(backend, device)
    lam, lr, decay = 0.1, 0.3, 0.8
    model = mlp().to(device)
    opt = ng.KFAC(model, lr=lr, momentum=0.0, kl_clip=None, damping=lam, factor_decay=decay, loss="cross_entropy",
                  fisher_type="type-2", inverse="ekfac", factor_update_freq=1, inv_update_freq=100, backend=backend)
    x1, y1 = to_device(data(seed=1))
    step(model, opt, x1, y1)
    first = {n: {k: t.clone().cpu() for k, t in st.items()} for n, st in opt.state_dict()["kfac"]["layers"].items()}
    for st in first.values():  # a new eigenbasis: K-FAC's own scaling
        assert torch.equal(st["S"], torch.outer(st["dG"], st["dA"]))
    x2, y2 = data(seed=2)
    blocks = dense_ggn_blocks(cpu_twin(model), x2)
    grads, delta = step(model, opt, *to_device((x2, y2)))
    expect = []
    for name, st in first.items():  # step 2: the first basis, the scaling averaged with this batch's
        S = decay * st["S"] + (1 - decay) * rotated_diagonal(blocks[name], st["QA"], st["QG"])
        saved = opt.state_dict()["kfac"]["layers"][name]["S"].cpu()
        assert torch.allclose(saved, S, rtol=tol(1e-10), atol=tol(1e-14)), name
        V = st["QG"].T @ grads[name].cpu() @ st["QA"]
        P = st["QG"] @ (V / (S + lam)) @ st["QA"].T
        expect += [-lr * P[:, :-1].reshape(-1), -lr * P[:, -1]]
    assert torch.allclose(delta.cpu(), torch.cat(expect), rtol=tol(1e-9), atol=tol(1e-13))


def test_first_step_is_kfac_and_later_ones_differ():
    x, y = data()
    deltas = {}
    for inverse in ("eigen", "ekfac"):
        model = mlp()
        opt = ng.KFAC(model, lr=0.3, momentum=0.0, kl_clip=None, damping=0.1, loss="cross_entropy",
                      fisher_type="type-2", inverse=inverse, factor_update_freq=1, inv_update_freq=5)
        deltas[inverse] = [step(model, opt, x, y)[1] for _ in range(3)]
    assert torch.allclose(deltas["eigen"][0], deltas["ekfac"][0], rtol=1e-12, atol=1e-15)
    assert not torch.allclose(deltas["eigen"][2], deltas["ekfac"][2], rtol=1e-3)


def test_resumes_bit_identically_and_loads_across_inverses(device, to_device):
    kw = dict(lr=0.2, damping=0.05, loss="cross_entropy", fisher_type="mc", inv_update_freq=2, factor_update_freq=1,
              seed=3)
    a = mlp().to(device)
    opt_a = ng.KFAC(a, inverse="ekfac", **kw)
    for s in range(3):
        step(a, opt_a, *to_device(data(seed=s)))
    ckpt = copy.deepcopy({"model": a.state_dict(), "opt": opt_a.state_dict()})
    for s in range(3, 6):
        step(a, opt_a, *to_device(data(seed=s)))
    b = mlp(seed=9).to(device)
    opt_b = ng.KFAC(b, inverse="ekfac", **kw)
    b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    for s in range(3, 6):
        step(b, opt_b, *to_device(data(seed=s)))
    if device == "cpu":
        assert torch.equal(flat(a), flat(b))
    else:  # to rounding: kfac_update_'s KL dot product adds its blocks' parts with atomics, in no fixed order
        assert torch.allclose(flat(a).cpu(), flat(b).cpu(), rtol=1e-9, atol=1e-12)
    # an EKFAC state into K-FAC drops the scalings; a K-FAC state into EKFAC starts them from dG dA^T
    c = mlp().to(device)
    opt_c = ng.KFAC(c, inverse="eigen", **kw)
    opt_c.load_state_dict(ckpt["opt"])
    assert all("S" not in st for st in opt_c.state_dict()["kfac"]["layers"].values())
    d = mlp().to(device)
    opt_d = ng.KFAC(d, inverse="ekfac", **kw)
    opt_d.load_state_dict(opt_c.state_dict())
    for st in opt_d.state_dict()["kfac"]["layers"].values():
        assert torch.equal(st["S"], torch.outer(st["dG"], st["dA"]))


def test_bad_saved_scalings_are_refused_and_change_nothing():
    model = mlp()
    opt = ng.KFAC(model, lr=0.1, loss="cross_entropy", fisher_type="type-2", inverse="ekfac")
    step(model, opt, *data())
    good = opt.state_dict()
    for mend, match in [(lambda st: st.__setitem__("S", -st["S"] - 1), "must be >= 0"),
                        (lambda st: st.__setitem__("S", st["S"][:, :-1]), "has shape"),
                        (lambda st: (st.pop("QA"), st.pop("dA")), "incomplete")]:
        bad = copy.deepcopy(good)
        mend(bad["kfac"]["layers"]["0"])
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(bad)
        after = opt.state_dict()["kfac"]["layers"]["0"]
        assert torch.equal(after["S"], good["kfac"]["layers"]["0"]["S"])


def test_what_ekfac_does_not_cover_is_refused():
    for kw, match in [(dict(fisher_type="empirical"), "fisher_type"),
                      (dict(fisher_type="type-2", separate_weight_and_bias=True), "separate_weight_and_bias"),
                      (dict(fisher_type="type-2", structure="block-tridiagonal"), "structure")]:
        with pytest.raises(ValueError, match=match):
            ng.KFAC(mlp(), loss="cross_entropy", inverse="ekfac", **kw)
    with pytest.raises(ValueError, match="inverse must be one of"):
        ng.KFAC(mlp(), loss="cross_entropy", inverse="ekfc")
    from natgrad_cuda._engine import _check_ekfac  # data parallel: no process group in this test

    for sharing in ("directions", "hybrid"):
        with pytest.raises(ValueError, match="inverse_sharing='eigenbases'"):
            _check_ekfac(object(), sharing, "block-diagonal", "type-2", False)
    _check_ekfac(object(), "eigenbases", "block-diagonal", "type-2", False)


def test_other_layers_keep_kfac_scaling_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)).to(DT)
    with pytest.warns(RuntimeWarning, match="rescales nn.Linear layers only.*'0' \\(Conv2d\\)"):
        opt = ng.KFAC(model, lr=0.1, loss="cross_entropy", fisher_type="type-2", inverse="ekfac",
                      factor_update_freq=1, inv_update_freq=10)
    x = torch.randn(5, 1, 4, 4, dtype=DT)
    y = torch.randint(0, 3, (5,))
    for _ in range(2):
        opt.zero_grad()
        out = model(x)
        opt.backward(F.cross_entropy(out, y), out)
        opt.step()
    layers = opt.state_dict()["kfac"]["layers"]
    assert "S" not in layers["0"] and "S" in layers["2"]


def test_a_layer_run_twice_in_a_forward_keeps_its_scaling_with_a_warning():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).to(DT)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    model = Twice()
    opt = ng.KFAC(model, lr=0.1, loss="cross_entropy", fisher_type="type-2", inverse="ekfac", factor_update_freq=1,
                  inv_update_freq=10)
    x, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 3, (4,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            out = model(x)
            opt.backward(F.cross_entropy(out, y), out)
            opt.step()
    assert any("ran 2 times in one forward" in str(w.message) for w in caught)
    st = opt.state_dict()["kfac"]["layers"]["lin"]
    assert torch.equal(st["S"], torch.outer(st["dG"], st["dA"]))  # K-FAC's own, never updated
