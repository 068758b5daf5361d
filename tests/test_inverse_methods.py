"""The inverse phase's methods, chosen per factor by cost: explicit damped inverses by Cholesky for
the factored damping, certified low-rank eigendecompositions of wide factors (``ops.eigh_lowrank``),
previous eigenbases kept while certified (``ops.eigh_refine``), full eigendecompositions for the
rest. Each against its dense float64 oracle (or its certified bound), on every backend; the tests
taking ``device`` on the GPU too when present (conftest.py).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad_cuda as ng
from natgrad_cuda import _directions, _ext, emulation, ops, reference

DT = torch.float64
BACKENDS = ["reference", "native", "emulated"]


def need(backend, device="cpu"):
    if backend == "native" and not _ext.native_available(torch.device(device)):
        pytest.fail(f"the {device} kernels are not compiled")  # scripts/test.sh requires the extension
    if backend == "emulated" and not emulation.available():
        pytest.fail("the emulated CUDA backend is not compiled")


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def model_of(widths, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers).to(DT)


def batch(n, d, classes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, dtype=DT, generator=g), torch.randint(0, classes, (n,), generator=g)


def step(model, opt, x, y):
    opt.zero_grad()
    out = model(x)
    opt.backward(F.cross_entropy(out, y), out)
    grads = {name: (m.weight.grad.clone(), None if m.bias is None else m.bias.grad.clone())
             for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    before = flat(model.parameters())
    opt.step()
    return grads, flat(model.parameters()) - before


def factored_oracle(A, G, M, lam):
    """(G + sqrt(lam)/pi I)^-1 M (A + pi sqrt(lam) I)^-1, pi from the traces."""
    pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
    eye = lambda n: torch.eye(n, dtype=DT)  # noqa: E731
    return torch.linalg.solve(G + math.sqrt(lam) / pi * eye(G.shape[0]), M) @ torch.linalg.inv(
        A + pi * math.sqrt(lam) * eye(A.shape[0]))


def exact_oracle(A, G, M, lam):
    """(G (x) A + lam I)^-1 vec(M), dense."""
    K = torch.kron(G, A) + lam * torch.eye(A.shape[0] * G.shape[0], dtype=DT)
    return torch.linalg.solve(K, M.reshape(-1)).reshape(M.shape)


def expected_delta(model, opt, grads, lam, oracle, lr):
    """-lr times every Linear's direction from the optimizer's own factors (the moving averages its
    step used: one step, so the first estimate) and its gradients."""
    layers = opt.state_dict()["kfac"]["layers"]
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        A, G = layers[name]["A"].cpu(), layers[name]["G"].cpu()  # the oracle on the CPU, whatever the device
        gw, gb = (None if g is None else g.cpu() for g in grads[name])
        if A.shape[0] == m.in_features + 1:  # joint weight and bias
            P = oracle(A, G, torch.cat([gw, gb[:, None]], 1), lam)
            out += [P[:, :-1], P[:, -1]]
        else:
            out.append(oracle(A, G, gw, lam))
            if gb is not None:
                out.append(oracle(torch.ones(1, 1, dtype=DT), G, gb[:, None], lam)[:, 0])
    return -lr * flat(out)


# ---- factored damping: explicit inverses, two products per layer -------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("separate", [False, True])
def test_factored_damping_uses_explicit_inverses(backend, separate, device, to_device, tol):
    need(backend, device)
    model, lam = model_of([5, 7, 3]).to(device), 0.05
    x, y = to_device(batch(12, 5, 3))
    opt = ng.KFAC(model, lr=0.7, momentum=0.0, kl_clip=None, damping=lam, loss="cross_entropy",
                  fisher_type="type-2", inverse="factored", separate_weight_and_bias=separate, backend=backend)
    grads, delta = step(model, opt, x, y)
    layers = opt.state_dict()["kfac"]["layers"]
    for st in layers.values():  # no eigendecomposition at all
        assert {"IA", "IG"} <= set(st) and not {"QA", "QG"} & set(st)
        assert ({"IAb", "IGb"} <= set(st)) == separate
    expect = expected_delta(model, opt, grads, lam, factored_oracle, 0.7)
    assert torch.allclose(delta.cpu(), expect, rtol=tol(1e-9), atol=tol(1e-13))


def test_factored_inverses_follow_a_damping_change():
    """The explicit inverses are of the damped factors: a new damping redoes them at the next step,
    between inverse updates too."""
    model, lam = model_of([5, 7, 3]), 0.05
    x, y = batch(12, 5, 3)
    opt = ng.KFAC(model, lr=0.5, momentum=0.0, kl_clip=None, damping=lam, loss="cross_entropy",
                  fisher_type="type-2", inverse="factored", factor_update_freq=100, inv_update_freq=100)
    step(model, opt, x, y)
    opt.param_groups[0]["damping"] = 0.3
    grads, delta = step(model, opt, x, y)
    assert torch.allclose(delta, expected_delta(model, opt, grads, 0.3, factored_oracle, 0.5), rtol=1e-9,
                          atol=1e-13)


def test_failed_cholesky_falls_back_on_an_eigendecomposition(monkeypatch):
    model, lam = model_of([5, 7, 3]), 0.05
    x, y = batch(12, 5, 3)
    opt = ng.KFAC(model, lr=0.7, momentum=0.0, kl_clip=None, damping=lam, loss="cross_entropy",
                  fisher_type="type-2", inverse="factored", backend="reference")
    monkeypatch.setattr(reference, "damped_inverse", lambda mats, shifts: [torch.full_like(M, float("nan"))
                                                                           for M in mats])
    with pytest.warns(RuntimeWarning, match="Cholesky factorisation .* failed"):
        grads, delta = step(model, opt, x, y)
    layers = opt.state_dict()["kfac"]["layers"]
    assert all({"QA", "QG"} <= set(st) and "IA" not in st for st in layers.values())
    assert torch.allclose(delta, expected_delta(model, opt, grads, lam, factored_oracle, 0.7), rtol=1e-9,
                          atol=1e-13)


def test_ill_conditioned_damped_factors_use_the_eigenbasis():
    """At a damping far below the factors (kappa eps > 1e-3 for float64), an explicit inverse would
    lose the gradient's structure: those layers are eigendecomposed, and the step is still the
    factored damping's."""
    model, lam = model_of([5, 7, 3]), 1e-28
    x, y = batch(12, 5, 3)
    opt = ng.KFAC(model, lr=0.7, momentum=0.0, kl_clip=None, damping=lam, loss="cross_entropy",
                  fisher_type="type-2", inverse="factored", backend="reference")
    step(model, opt, x, y)
    layers = opt.state_dict()["kfac"]["layers"]
    assert all({"QA", "QG"} <= set(st) and "IA" not in st for st in layers.values())
    opt.param_groups[0]["damping"] = 0.05  # well conditioned again: explicit inverses at the next step
    grads, delta = step(model, opt, x, y)
    assert all({"IA", "IG"} <= set(st) for st in opt.state_dict()["kfac"]["layers"].values())
    assert torch.allclose(delta, expected_delta(model, opt, grads, 0.05, factored_oracle, 0.7), rtol=1e-9, atol=1e-13)


# ---- wide factors: certified low rank ----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inverse", ["eigen", "factored"])
def test_wide_factors_of_few_rows_are_low_rank_and_exact(backend, inverse, device, to_device, tol):
    """16 data points: the 513-wide A of the second layer and the 512-wide G of the first have rank
    <= 48, so rank 32 or 64 holds them exactly; the step is the dense damped inverse's."""
    need(backend, device)
    model, lam = model_of([3, 512, 2]).to(device), 1e-2
    x, y = to_device(batch(16, 3, 2))
    opt = ng.KFAC(model, lr=0.3, momentum=0.0, kl_clip=None, damping=lam, loss="cross_entropy",
                  fisher_type="type-2", inverse=inverse, backend=backend)
    grads, delta = step(model, opt, x, y)
    layers = opt.state_dict()["kfac"]["layers"]
    assert layers["2"]["QA"].shape[0] == 513 and layers["2"]["QA"].shape[1] <= 128
    assert layers["0"]["QG"].shape[0] == 512 and layers["0"]["QG"].shape[1] <= 128
    # the narrow factors: full eigendecompositions (exact damping) or explicit inverses (factored, for
    # a layer with no wide factor)
    assert layers["2"]["QG"].shape == (2, 2) and layers["0"]["QA"].shape == (4, 4)
    oracle = exact_oracle if inverse == "eigen" else factored_oracle
    expect = expected_delta(model, opt, grads, lam, oracle, 0.3)
    assert torch.allclose(delta.cpu(), expect, rtol=tol(1e-7), atol=tol(1e-10) * expect.abs().max())


def test_full_rank_wide_factor_is_decomposed_in_full():
    """600 Gaussian inputs: the 513-wide A has no certified rank <= 128; it is decomposed in full,
    and stays so at the next inverse update (no second attempt)."""
    model, lam = model_of([512, 2]), 1e-3
    x, y = batch(600, 512, 2)
    opt = ng.KFAC(model, lr=0.1, damping=lam, loss="cross_entropy", fisher_type="type-2", inv_update_freq=1)
    step(model, opt, x, y)
    assert opt.state_dict()["kfac"]["layers"]["0"]["QA"].shape == (513, 513)
    calls = []
    real = ops.eigh_lowrank
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "eigh_lowrank", lambda *a, **k: calls.append(1) or real(*a, **k))
        step(model, opt, x, y)
    assert not calls


def test_low_rank_state_resumes_bit_identically(device, to_device):
    """Low-rank bases (warm-started at every inverse update) and explicit inverses in one run:
    a checkpoint taken in the middle resumes to the same bits (on the CPU; on a GPU to rounding:
    kfac_update_'s KL dot product adds its blocks' parts with atomics, in no fixed order)."""
    kw = dict(lr=0.05, damping=1e-2, loss="cross_entropy", fisher_type="mc", inv_update_freq=2, seed=4)

    def run(model, opt, seeds):
        for s in seeds:
            step(model, opt, *to_device(batch(16, 3, 2, seed=s)))

    for inverse in ("eigen", "factored"):
        a = model_of([3, 512, 2]).to(device)
        opt_a = ng.KFAC(a, inverse=inverse, **kw)
        run(a, opt_a, range(3))
        ckpt = copy.deepcopy({"model": a.state_dict(), "opt": opt_a.state_dict()})
        run(a, opt_a, range(3, 7))
        b = model_of([3, 512, 2], seed=9).to(device)
        opt_b = ng.KFAC(b, inverse=inverse, **kw)
        b.load_state_dict(ckpt["model"])
        opt_b.load_state_dict(ckpt["opt"])
        run(b, opt_b, range(3, 7))
        if device == "cpu":
            assert torch.equal(flat(a.parameters()), flat(b.parameters())), inverse
        else:
            assert torch.allclose(flat(a.parameters()).cpu(), flat(b.parameters()).cpu(), rtol=1e-9, atol=1e-12), \
                inverse
        assert opt_a.state_dict()["kfac"]["layers"]["2"]["QA"].shape[1] < 513


def test_saved_inverses_are_validated():
    model = model_of([3, 512, 2])
    opt = ng.KFAC(model, lr=0.1, loss="cross_entropy", inverse="factored")
    step(model, opt, *batch(16, 3, 2))
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    Q = bad["kfac"]["layers"]["2"]["QA"]
    bad["kfac"]["layers"]["2"]["QA"] = Q[:, 1:]  # one column fewer than its eigenvalues
    with pytest.raises(ValueError, match="'dA' has shape"):
        opt.load_state_dict(bad)
    opt.load_state_dict(sd)  # the good one still loads
    model = model_of([5, 7, 3])
    opt = ng.KFAC(model, lr=0.1, loss="cross_entropy", inverse="factored")
    step(model, opt, *batch(12, 5, 3))
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    bad["kfac"]["layers"]["0"]["QA"] = torch.eye(6, dtype=DT)
    bad["kfac"]["layers"]["0"]["dA"] = torch.ones(6, dtype=DT)
    with pytest.raises(ValueError, match="mix eigendecompositions and explicit inverses"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    del bad["kfac"]["layers"]["0"]["IG"]
    with pytest.raises(ValueError, match="incomplete"):
        opt.load_state_dict(bad)
    opt.load_state_dict(sd)  # the good one still loads
    bad = copy.deepcopy(sd)
    bad["kfac"]["inverse_damping"] = "0.1"
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="inverse_damping"):
        opt.load_state_dict(bad)
    after = opt.state_dict()  # the refused call changed nothing
    assert after["kfac"]["inverse_damping"] == before["kfac"]["inverse_damping"]
    assert all(torch.equal(after["kfac"]["layers"][n][k], v) for n, st in before["kfac"]["layers"].items()
               for k, v in st.items())


# ---- the op: ops.eigh_lowrank -----------------------------------------------------------------------


def psd(n, rank, seed=0, dtype=DT, decay=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, rank, dtype=DT, generator=g)
    if decay is not None:
        X = X * decay ** torch.arange(rank, dtype=DT)
    return (X @ X.T).to(dtype)


@pytest.mark.parametrize("impl", ["native", "emulated"])
@pytest.mark.parametrize("n,rank,r", [(1, 1, 1), (7, 3, 3), (40, 5, 8), (130, 20, 20), (300, 33, 40)])
def test_eigh_lowrank_recovers_low_rank_matrices(impl, n, rank, r):
    need(impl)
    F = psd(n, rank, seed=n)
    (d, Q), = ops.eigh_lowrank([F], [r], impl=impl)
    (de, Qe), = ops.eigh_lowrank([F], [r], impl="reference")
    scale = float(de.max())
    assert d.shape == (r,) and Q.shape == (n, r)
    assert torch.allclose(d, de, atol=1e-10 * scale)
    assert torch.allclose(Q.T @ Q, torch.eye(r, dtype=DT), atol=1e-10)
    assert torch.allclose(Q @ torch.diag(d) @ Q.T, F, atol=1e-10 * scale)


@pytest.mark.parametrize("impl", ["native", "emulated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigh_lowrank_certificate_bounds_what_it_leaves_out(impl, dtype):
    """On a full-rank matrix: 0 <= F_r <= F, so that tr(F) - sum(d) >= every left-out eigenvalue;
    a warm start from the previous basis gets closer to the top eigenvalues."""
    need(impl)
    F = psd(200, 200, seed=3, decay=0.97, dtype=dtype)
    exact = torch.linalg.eigvalsh(F.double())
    (d, Q), = ops.eigh_lowrank([F], [30], impl=impl)
    d, Q = d.double(), Q.double()
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert bool((d >= 0).all()) and bool((d <= exact[-30:] + tol * exact[-1]).all())
    rest = F.double() - Q @ torch.diag(d) @ Q.T
    assert float(torch.linalg.eigvalsh(rest).min()) >= -tol * float(exact[-1])
    assert float(F.double().trace() - d.sum()) >= float(exact[-31]) - tol * float(exact[-1])
    (d2, _), = ops.eigh_lowrank([F], [30], [Q.to(dtype)], impl=impl)
    err = lambda v: float((v.double() - exact[-30:]).abs().max())  # noqa: E731
    assert err(d2) < err(d)


@pytest.mark.parametrize("impl", ["reference", "native", "emulated"])
def test_eigh_lowrank_batches_and_edge_cases(impl):
    need(impl)
    mats = [psd(9, 2, seed=1), torch.zeros(6, 6, dtype=DT), psd(5, 5, seed=2)]
    out = ops.eigh_lowrank(mats, [2, 3, 5], impl=impl)
    assert [tuple(Q.shape) for _, Q in out] == [(9, 2), (6, 3), (5, 5)]
    assert float(out[1][0].abs().max()) < 1e-250
    assert torch.allclose(out[1][1].T @ out[1][1], torch.eye(3, dtype=DT), atol=1e-12)
    assert ops.eigh_lowrank([], [], impl=impl) == []
    bad = psd(8, 2).clone()
    bad[3, 1] = float("nan")
    (d, Q), = ops.eigh_lowrank([bad], [2], impl=impl)
    assert bool(torch.isnan(d).all()) and bool(torch.isnan(Q).all())


def test_eigh_lowrank_checks_its_arguments():
    F = psd(6, 2)
    with pytest.raises(ValueError, match="ranks"):
        ops.eigh_lowrank([F], [1, 2])
    with pytest.raises(ValueError, match="ranks\\[0\\]"):
        ops.eigh_lowrank([F], [7])
    with pytest.raises(ValueError, match="bases\\[0\\]"):
        ops.eigh_lowrank([F], [2], [torch.zeros(5, 2, dtype=DT)])
    with pytest.raises(ValueError, match="square"):
        ops.eigh_lowrank([torch.zeros(3, 4, dtype=DT)], [1])
    with pytest.raises(ValueError, match="requires grad"):
        ops.eigh_lowrank([F.requires_grad_()], [1])


# ---- warm-started eigenbases (_directions._warm, ops.eigh_refine) ----

class Kept:
    """Counts the factors whose previous basis the optimizer kept (certificate within tolerance)."""

    def __init__(self, monkeypatch):
        self.tried = self.kept = 0
        real = ops.eigh_refine

        def counting(*args, **kwargs):
            out = real(*args, **kwargs)
            self.tried += len(out)
            self.kept += sum(float(k) <= _directions.WARM_TOLERANCE for _, _, k in out)
            return out

        monkeypatch.setattr(ops, "eigh_refine", counting)


def warm_run(monkeypatch, warm: bool, inverse="eigen", backend="auto", steps=6, device="cpu"):
    if not warm:
        monkeypatch.setattr(_directions, "WARM_MIN", 10 ** 9)
    if inverse == "factored":  # every damped factor "ill-conditioned": through the eigenbasis, not Cholesky
        monkeypatch.setattr(_directions, "INVERSE_KAPPA_EPS", 1e-300)
    model = model_of([130, 140, 3]).to(device)
    x, y = (t.to(device) for t in batch(40, 130, 3))  # one batch throughout: the factors settle
    opt = ng.KFAC(model, lr=1e-3, momentum=0.0, kl_clip=None, damping=1e-3, loss="cross_entropy",
                  fisher_type="type-2", inverse=inverse, factor_update_freq=1, inv_update_freq=1, backend=backend)
    deltas = [step(model, opt, x, y)[1] for _ in range(steps)]
    monkeypatch.undo()
    return deltas, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inverse", ["eigen", "factored"])
def test_settled_factors_keep_their_eigenbasis_within_the_tolerance(monkeypatch, backend, inverse, device):
    need(backend, device)
    kept = Kept(monkeypatch)
    warm, _ = warm_run(monkeypatch, True, inverse, backend, device=device)
    assert kept.kept > 0 and kept.tried <= 3 * 5  # A 131, G 140, A 141 wide, from the second update on
    cold, _ = warm_run(monkeypatch, False, inverse, backend, device=device)
    assert torch.equal(warm[0], cold[0])  # the first update decomposes in full
    for w, c in zip(warm[1:], cold[1:]):  # within the certified relative error (each factor 0.01)
        assert float((w - c).norm() / c.norm()) <= 0.05


def test_a_factor_whose_basis_no_longer_holds_is_decomposed_afresh(monkeypatch):
    _, opt = warm_run(monkeypatch, True, steps=2)
    states = {n: dict(st) for n, st in opt.state_dict()["kfac"]["layers"].items()}
    st = states["0"]
    n = st["A"].shape[0]
    R = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=torch.Generator().manual_seed(3)))[0]
    st["A"] = R @ st["A"] @ R.T  # the same trace (the gate passes), another eigenbasis
    kept = Kept(monkeypatch)
    _directions.decompose(states, None, damping=1e-3)
    assert kept.tried >= 1 and kept.kept < kept.tried
    d, Q = torch.linalg.eigh(st["A"])
    assert torch.allclose(st["dA"], d.clamp_min(0), atol=1e-12)
    assert torch.allclose(st["QA"] @ torch.diag(st["dA"]) @ st["QA"].T, st["A"], atol=1e-10)


def test_a_factor_fed_new_data_is_not_tried(monkeypatch):
    _, opt = warm_run(monkeypatch, True, steps=2)
    states = {n: dict(st) for n, st in opt.state_dict()["kfac"]["layers"].items()}
    for st in states.values():
        st["A"] = st["A"] * 1.5  # traces moved by far more than the damping
        st["G"] = st["G"] * 1.5
    kept = Kept(monkeypatch)
    _directions.decompose(states, None, damping=1e-3)
    assert kept.tried == 0


def test_a_separate_bias_blocks_g_is_checked_at_the_damping_itself(monkeypatch):
    """Under exact damping G meets damping / |A| in the weight block and the damping itself in a
    separate bias block (A = 1): a small A (trace below 1) must not loosen G's certificate."""
    model = model_of([130, 140, 3])
    opt = ng.KFAC(model, lr=1e-3, momentum=0.0, kl_clip=None, damping=1e-3, loss="cross_entropy",
                  fisher_type="type-2", separate_weight_and_bias=True, factor_update_freq=1, inv_update_freq=1)
    x, y = batch(40, 130, 3)
    step(model, opt, x * 1e-3, y)  # inputs so small that tr(A) of the first layer is below 1
    states = {n: dict(st) for n, st in opt.state_dict()["kfac"]["layers"].items()}
    assert float(states["0"]["A"].diagonal().sum()) < 1
    seen = []
    real = ops.eigh_refine

    def spy(mats, bases, shifts, **kw):
        seen.extend(s for M, s in zip(mats, shifts) if M is states["0"]["G"])
        return real(mats, bases, shifts, **kw)

    monkeypatch.setattr(ops, "eigh_refine", spy)
    _directions.decompose(states, None, damping=1e-3, bias_apart={"0", "2"})
    assert seen == [1e-3]  # not damping / tr(A), which is larger here
