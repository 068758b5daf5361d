"""natgrad_cuda.KFAC and KFACPreconditioner on the reference path.

The oracle for one step is the dense (F_kfac + damping I)^-1 g, with F_kfac from
``curvature.kfac`` (itself checked against curvlinops); float64 throughout unless a test is about
dtypes. The tests taking ``device`` run on the GPU too when present (conftest.py).
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad_cuda as ng
from natgrad_cuda import reference
from natgrad_cuda.optimizer import lm_damping

DT = torch.float64
LOSS_MODULES = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def mlp(bias=True, out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7, bias=bias), nn.Tanh(), nn.Linear(7, out)).to(DT)


def cnn(out=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 2, stride=2), nn.Flatten(),
                         nn.Linear(4 * 2 * 2, out)).to(DT)


def data(model_kind: str, loss: str, n=12, out=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, dtype=DT, generator=g) if model_kind == "mlp" else torch.randn(n, 2, 4, 4, dtype=DT,
                                                                                            generator=g)
    if loss == "cross_entropy":
        y = torch.randint(0, out, (n,), generator=g)
    elif loss == "mse":
        y = torch.randn(n, out, dtype=DT, generator=g)
    else:
        y = torch.rand(n, out, dtype=DT, generator=g).round()
    return x, y


def loss_of(loss: str, out, y):
    return LOSS_MODULES[loss]()(out, y)


def backward(model, opt, x, y, loss):
    """zero_grad, forward and opt.backward: one step's recordings and gradients, no step."""
    opt.zero_grad()
    out = model(x)
    opt.backward(loss_of(loss, out, y), out)


def one_step(model, opt, x, y, loss):
    backward(model, opt, x, y, loss)
    g = flat(p.grad for p in model.parameters())
    before = flat(model.parameters())
    opt.step()
    return g, flat(model.parameters()) - before


def dense_kfac(model, loss, x, y, fisher_type, separate, seed=None, kfac_approx="expand"):
    return ng.curvature.kfac(model, LOSS_MODULES[loss](), (x, y), fisher_type=fisher_type,
                             separate_weight_and_bias=separate, seed=seed, kfac_approx=kfac_approx)


# ---- one step against the dense oracle ----------------------------------------------------------------

CASES = [
    ("mlp", "cross_entropy", "type-2", False, "expand"),
    ("mlp", "cross_entropy", "mc", False, "expand"),
    ("mlp", "mse", "type-2", True, "expand"),
    ("mlp", "bce", "empirical", False, "expand"),
    ("cnn", "cross_entropy", "type-2", False, "expand"),
    ("cnn", "cross_entropy", "mc", True, "reduce"),
    ("cnn", "mse", "empirical", True, "expand"),
    ("cnn", "bce", "type-2", False, "reduce"),
]


@pytest.mark.parametrize("kind,loss,fisher_type,separate,approx", CASES)
@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_one_step_is_dense_damped_inverse(kind, loss, fisher_type, separate, approx, damping, device, to_device,
                                          tol):
    model = (mlp() if kind == "mlp" else cnn()).to(device)
    x, y = to_device(data(kind, loss))
    ref = copy.deepcopy(model)
    opt = ng.KFAC(model, lr=0.7, momentum=0.0, kl_clip=None, damping=damping, loss=loss, fisher_type=fisher_type,
                  separate_weight_and_bias=separate, kfac_approx=approx, seed=5, backend="reference")
    g, delta = one_step(model, opt, x, y, loss)
    K = dense_kfac(ref, loss, x, y, fisher_type, separate, seed=5, kfac_approx=approx).dense()
    expect = -0.7 * torch.linalg.solve(K + damping * torch.eye(len(g), dtype=DT, device=K.device), g)
    delta, expect = delta.cpu(), expect.cpu()
    assert torch.allclose(delta, expect, rtol=tol(1e-9), atol=tol(1e-12) * expect.abs().max())


def test_factors_are_moving_averages_of_curvature_kfac(device, to_device, tol):
    model, loss = mlp().to(device), "cross_entropy"
    opt = ng.KFAC(model, loss=loss, fisher_type="type-2", factor_decay=0.8, lr=0.0, kl_clip=None,
                  factor_update_freq=1)
    batches = [to_device(data("mlp", loss, n=n, seed=s)) for n, s in ((6, 1), (9, 2), (4, 3))]
    expect = None
    for x, y in batches:
        f = dense_kfac(model, loss, x, y, "type-2", separate=False)  # lr=0: the model does not move
        pair = {n: (f.input_covariances[n], f.gradient_covariances[n]) for n in f.modules}
        expect = pair if expect is None else {
            n: (0.8 * expect[n][0] + 0.2 * pair[n][0], 0.8 * expect[n][1] + 0.2 * pair[n][1]) for n in pair}
        one_step(model, opt, x, y, loss)
    state = opt.state_dict()["kfac"]["layers"]
    for name, (A, G) in expect.items():
        assert torch.allclose(state[name]["A"].cpu(), A.cpu(), rtol=tol(1e-12), atol=tol(1e-14))
        assert torch.allclose(state[name]["G"].cpu(), G.cpu(), rtol=tol(1e-12), atol=tol(1e-14))


class _Branchy(nn.Module):
    """In-place ReLU, two layers reading one tensor, a residual sum and a layer fed by the data:
    the curvature pass differentiates with respect to layer inputs, and must still reach every
    layer's output."""

    def __init__(self):
        super().__init__()
        self.fc1, self.a, self.b, self.fc3 = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x), inplace=True)
        h = h + self.a(h) + torch.tanh(self.b(h))
        return self.fc3(h)


@pytest.mark.parametrize("fisher_type", ["type-2", "mc"])
def test_curvature_pass_reaches_every_layer(fisher_type):
    torch.manual_seed(0)
    model, loss = _Branchy().to(DT), "cross_entropy"
    x, y = data("mlp", loss)
    ref = copy.deepcopy(model)
    opt = ng.KFAC(model, loss=loss, fisher_type=fisher_type, lr=0.0, kl_clip=None, seed=3)
    one_step(model, opt, x, y, loss)
    f = dense_kfac(ref, loss, x, y, fisher_type, separate=False, seed=3)
    state = opt.state_dict()["kfac"]["layers"]
    assert set(state) == set(f.modules) == {"fc1", "a", "b", "fc3"}
    for name in f.modules:
        assert torch.allclose(state[name]["A"], f.input_covariances[name], rtol=1e-12, atol=1e-14)
        assert torch.allclose(state[name]["G"], f.gradient_covariances[name], rtol=1e-12, atol=1e-14)


def test_all_finite_is_exact():
    from natgrad_cuda._finite import all_finite

    big = torch.full((4, 4), 1e30)  # finite, but its sum of squares overflows float32
    assert all_finite([big, torch.ones(3)]) and all_finite([])
    assert all_finite([torch.full((8,), 6e4, dtype=torch.float16)])  # its 2-norm overflows float16
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = big.clone()
        t[1, 2] = bad
        assert not all_finite([torch.ones(3), t])


def test_empirical_fisher_from_plain_loss_backward():
    model, loss = cnn(), "cross_entropy"
    x, y = data("cnn", loss)
    ref = copy.deepcopy(model)
    opt = ng.KFAC(model, lr=1.0, momentum=0.0, kl_clip=None, damping=0.1, loss=loss, fisher_type="empirical")
    opt.zero_grad()
    loss_of(loss, model(x), y).backward()  # no opt.backward
    g, before = flat(p.grad for p in model.parameters()), flat(model.parameters())
    opt.step()
    K = dense_kfac(ref, loss, x, y, "empirical", separate=False).dense()
    expect = -torch.linalg.solve(K + 0.1 * torch.eye(len(g), dtype=DT), g)
    assert torch.allclose(flat(model.parameters()) - before, expect, rtol=1e-9, atol=1e-13)


def test_factored_damping_formula():
    model, loss, lam = mlp(), "cross_entropy", 0.05
    x, y = data("mlp", loss)
    ref = copy.deepcopy(model)
    opt = ng.KFAC(model, lr=1.0, momentum=0.0, kl_clip=None, damping=lam, loss=loss, fisher_type="type-2",
                  inverse="factored")
    _, delta = one_step(model, opt, x, y, loss)
    f = dense_kfac(ref, loss, x, y, "type-2", separate=False)
    out = ref(x)
    loss_of(loss, out, y).backward()
    expect = []
    for name, layer in (("0", ref[0]), ("2", ref[2])):
        A, G = f.input_covariances[name], f.gradient_covariances[name]
        pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
        M = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
        eye = lambda n: torch.eye(n, dtype=DT)  # noqa: E731
        P = torch.linalg.solve(G + math.sqrt(lam) / pi * eye(G.shape[0]), M) @ torch.linalg.inv(
            A + pi * math.sqrt(lam) * eye(A.shape[0]))
        expect.append((P[:, :-1], P[:, -1]))
    expect = -flat([expect[0][0], expect[0][1], expect[1][0], expect[1][1]])
    assert torch.allclose(delta, expect, rtol=1e-9, atol=1e-13)


def test_kl_clip_scales_the_step():
    model, loss, lam, lr, kappa = mlp(), "cross_entropy", 0.01, 0.5, 1e-4
    x, y = data("mlp", loss)
    free, clipped = copy.deepcopy(model), copy.deepcopy(model)
    kw = dict(lr=lr, momentum=0.0, damping=lam, loss=loss, fisher_type="type-2")
    g, d_free = one_step(free, ng.KFAC(free, kl_clip=None, **kw), x, y, loss)
    _, d_clip = one_step(clipped, ng.KFAC(clipped, kl_clip=kappa, **kw), x, y, loss)
    P = -d_free / lr
    nu = min(1.0, math.sqrt(kappa / (lr ** 2 * float(P @ g))))
    assert nu < 0.5  # the clip is active in this case
    assert torch.allclose(d_clip, nu * d_free, rtol=1e-10, atol=1e-15)
    # a loose trust region leaves the step alone
    loose = copy.deepcopy(model)
    _, d_loose = one_step(loose, ng.KFAC(loose, kl_clip=1e6, **kw), x, y, loss)
    assert torch.equal(d_loose, d_free)


@pytest.mark.parametrize("inverse", ["eigen", "factored"])
def test_large_damping_approaches_sgd_over_damping(inverse):
    loss = "cross_entropy"
    x, y = data("cnn", loss)
    errors = []
    for lam in (1e2, 1e4, 1e6):
        model = cnn()
        opt = ng.KFAC(model, lr=0.3, momentum=0.0, kl_clip=None, damping=lam, loss=loss, fisher_type="type-2",
                      inverse=inverse)
        g, delta = one_step(model, opt, x, y, loss)
        sgd = -0.3 * g / lam
        errors.append(float((delta - sgd).norm() / sgd.norm()))
    # the gap shrinks like 1/lambda (exact damping) or 1/sqrt(lambda) (factored: A / (pi sqrt(lambda)))
    rate, last = (0.02, 1e-5) if inverse == "eigen" else (0.2, 1e-2)
    assert errors[1] / errors[0] < rate and errors[2] / errors[1] < rate
    assert errors[2] < last


def test_momentum_and_weight_decay_follow_sgd_semantics():
    """With huge damping the K-FAC direction is g / damping, so KFAC must match torch SGD with lr/damping."""
    loss, lam = "mse", 1e12
    x, y = data("mlp", loss)
    a, b = mlp(), mlp()
    opt = ng.KFAC(a, lr=0.1 * lam, momentum=0.8, weight_decay=0.01 / lam, damping=lam, kl_clip=None, loss=loss)
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.8, weight_decay=0.01)
    for _ in range(4):
        one_step(a, opt, x, y, loss)
        sgd.zero_grad()
        loss_of(loss, b(x), y).backward()
        sgd.step()
    assert torch.allclose(flat(a.parameters()), flat(b.parameters()), rtol=1e-8, atol=1e-10)
    # and momentum lives in the torch state, one buffer per parameter
    assert all("momentum_buffer" in opt.state[p] for p in a.parameters())


def test_unsupported_layers_follow_momentum_sgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.PReLU(6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    x, y = data("mlp", "cross_entropy")
    with pytest.warns(UserWarning, match="PReLU"):
        opt = ng.KFAC(model, lr=0.2, momentum=0.0, loss="cross_entropy")
    ln = model[1]
    before = [p.detach().clone() for p in ln.parameters()]
    one_step(model, opt, x, y, "cross_entropy")
    for p, b in zip(ln.parameters(), before):
        assert torch.allclose(p, b - 0.2 * p.grad)


def test_lr_scheduler_drives_the_group():
    model, loss = mlp(), "cross_entropy"
    opt = ng.KFAC(model, lr=0.1, loss=loss)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = data("mlp", loss)
    for _ in range(3):
        one_step(model, opt, x, y, loss)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)


# ---- Levenberg-Marquardt damping ----------------------------------------------------------------------


def test_lm_rule():
    omega = (19 / 20) ** 5
    assert lm_damping(1.0, 0.9, 5, 1e-8, 1e4) == pytest.approx(omega)
    assert lm_damping(1.0, 0.1, 5, 1e-8, 1e4) == pytest.approx(1 / omega)
    assert lm_damping(1.0, -3.0, 5, 1e-8, 1e4) == pytest.approx(1 / omega)
    assert lm_damping(1.0, float("nan"), 5, 1e-8, 1e4) == pytest.approx(1 / omega)
    assert lm_damping(1.0, 0.5, 5, 1e-8, 1e4) == 1.0
    assert lm_damping(1e-8, 0.9, 5, 1e-8, 1e4) == 1e-8
    assert lm_damping(1e4, 0.0, 5, 1e-8, 1e4) == 1e4


@pytest.mark.parametrize("lr,direction", [(1e-3, "down"), (300.0, "up")])
def test_lm_adaptation_moves_damping_the_right_way(lr, direction):
    loss = "cross_entropy"
    x, y = data("mlp", loss, n=32)
    model = mlp()
    opt = ng.KFAC(model, lr=lr, momentum=0.0, kl_clip=None, damping=0.1, loss=loss, fisher_type="type-2",
                  adapt_damping=True, adapt_damping_interval=1)
    closure = lambda: loss_of(loss, model(x), y)  # noqa: E731
    for _ in range(3):
        backward(model, opt, x, y, loss)
        opt.step(closure)
    if direction == "down":  # a tiny step: the quadratic model is exact, rho ~ 1
        assert opt.last_rho == pytest.approx(1.0, abs=0.05)
        assert opt.damping == pytest.approx(0.1 * 0.95 ** 3)
    else:  # a wild step: the loss rises (rho < 0) or the model itself predicts a rise (rho = nan)
        assert not opt.last_rho >= 0.25
        assert opt.damping == pytest.approx(0.1 / 0.95 ** 3)


def test_adapt_damping_needs_a_closure():
    model, loss = mlp(), "cross_entropy"
    opt = ng.KFAC(model, loss=loss, adapt_damping=True)
    x, y = data("mlp", loss)
    backward(model, opt, x, y, loss)
    with pytest.raises(ValueError, match="closure"):
        opt.step()


# ---- robustness ---------------------------------------------------------------------------------------


def kfac_state(opt):
    return copy.deepcopy(opt.state_dict())


def assert_same_state(a, b):
    la, lb = a["kfac"]["layers"], b["kfac"]["layers"]
    assert la.keys() == lb.keys()
    for name in la:
        for key in la[name]:
            assert torch.equal(la[name][key], lb[name][key]), (name, key)
    for key in a["state"]:
        for k, v in a["state"][key].items():
            assert torch.equal(v, b["state"][key][k])


def test_non_finite_gradient_skips_the_step():
    model, loss = cnn(), "cross_entropy"
    x, y = data("cnn", loss)
    opt = ng.KFAC(model, loss=loss, momentum=0.9)
    for _ in range(2):
        one_step(model, opt, x, y, loss)
    saved, params = kfac_state(opt), flat(model.parameters()).clone()
    for bad in (float("nan"), float("inf")):
        backward(model, opt, x, y, loss)
        model[0].weight.grad[0, 0, 0, 0] = bad
        with pytest.warns(RuntimeWarning, match="NaN or Inf") as record:
            assert opt.step() is False
        assert record[0].filename == __file__  # attributed to the caller of step(), past torch's wrappers
        assert torch.equal(flat(model.parameters()), params)
        assert_same_state(saved, kfac_state(opt))
        assert opt.steps == 2
    # and the next good step is unaffected by the skipped step's recordings
    twin = copy.deepcopy(model)
    twin_opt = ng.KFAC(twin, loss=loss, momentum=0.9)
    twin_opt.load_state_dict(saved)
    one_step(model, opt, x, y, loss)
    one_step(twin, twin_opt, x, y, loss)
    assert torch.equal(flat(model.parameters()), flat(twin.parameters()))


def test_failed_eigendecomposition_retries_in_float64(monkeypatch):
    model, loss = mlp(), "cross_entropy"
    model = model.float()
    x, y = data("mlp", loss)
    x = x.float()
    good_model = copy.deepcopy(model)
    good = ng.KFAC(good_model, loss=loss, fisher_type="type-2")
    real_eigh = torch.linalg.eigh
    calls = []

    def flaky(M, *a, **k):
        calls.append(M.dtype)
        if M.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated: did not converge")
        return real_eigh(M, *a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)  # the reference path calls it; native ops are tested apart
    opt = ng.KFAC(model, loss=loss, fisher_type="type-2", backend="reference")
    one_step(model, opt, x, y, loss)
    assert torch.float64 in calls
    monkeypatch.setattr(torch.linalg, "eigh", real_eigh)
    one_step(good_model, good, x, y, loss)
    for name, st in opt.state_dict()["kfac"]["layers"].items():
        ref = good.state_dict()["kfac"]["layers"][name]
        assert st["QA"].dtype == torch.float32
        assert torch.allclose(st["dA"], ref["dA"], atol=1e-5) and torch.allclose(st["dG"], ref["dG"], atol=1e-5)


def test_failed_eigendecomposition_keeps_the_previous_one(monkeypatch):
    model, loss = mlp(), "cross_entropy"
    x, y = data("mlp", loss)
    opt = ng.KFAC(model, loss=loss, factor_update_freq=1, inv_update_freq=1, backend="reference")
    one_step(model, opt, x, y, loss)
    before = kfac_state(opt)["kfac"]["layers"]

    def broken(M, *a, **k):
        raise torch.linalg.LinAlgError("simulated")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    x2, y2 = data("mlp", loss, seed=7)
    with pytest.warns(RuntimeWarning, match="keeping the previous one"):
        one_step(model, opt, x2, y2, loss)
    after = opt.state_dict()["kfac"]["layers"]
    for name in before:
        for key in ("QA", "dA", "QG", "dG"):
            assert torch.equal(before[name][key], after[name][key])
        assert not torch.equal(before[name]["A"], after[name]["A"])  # the factors did move on


def test_eigh_batched_reference_handles_dead_and_bad_factors():
    zero = torch.zeros(4, 4, dtype=DT)
    rank1 = torch.ones(3, 3, dtype=DT)
    nan = torch.full((2, 2), float("nan"))
    (d0, Q0), (d1, Q1), (d2, Q2) = reference.eigh_batched([zero, rank1, nan])
    assert torch.equal(d0, torch.zeros(4, dtype=DT)) and torch.allclose(Q0 @ Q0.T, torch.eye(4, dtype=DT))
    assert torch.allclose(d1, torch.tensor([0.0, 0.0, 3.0], dtype=DT), atol=1e-12)
    assert torch.isnan(d2).all() and torch.isnan(Q2).all()


def assert_resumed(a, b, opt_a, opt_b, device):
    """The resumed run (b, opt_b) is the uninterrupted one (a, opt_a): to the bit on the CPU. On a GPU
    runs need not repeat to the bit (kfac_update_'s KL dot product adds its blocks' parts with atomics,
    cuDNN's convolution gradients may too), so there the parameters and factors agree to rounding, and
    the eigenbases, which rounding may turn within a (near) repeated eigenvalue, are not compared."""
    if device == "cpu":
        assert torch.equal(flat(a.parameters()), flat(b.parameters()))
        assert_same_state(opt_a.state_dict(), opt_b.state_dict())
        return
    assert torch.allclose(flat(a.parameters()).cpu(), flat(b.parameters()).cpu(), rtol=1e-9, atol=1e-12)
    la, lb = opt_a.state_dict()["kfac"]["layers"], opt_b.state_dict()["kfac"]["layers"]
    assert la.keys() == lb.keys()
    for name in la:
        for key in set(la[name]) & {"A", "G"}:
            assert torch.allclose(la[name][key].cpu(), lb[name][key].cpu(), rtol=1e-9, atol=1e-14), (name, key)


def test_state_dict_resume_is_bit_identical(device, to_device):
    loss = "cross_entropy"
    kw = dict(loss=loss, momentum=0.9, weight_decay=1e-3, factor_update_freq=2, inv_update_freq=3, kl_clip=1e-2,
              adapt_damping=True, adapt_damping_interval=2)
    batches = [to_device(data("cnn", loss, n=10, seed=s)) for s in range(12)]

    def run(model, opt, bs):
        for x, y in bs:
            backward(model, opt, x, y, loss)
            opt.step(lambda: loss_of(loss, model(x), y))

    a = cnn().to(device)
    opt_a = ng.KFAC(a, seed=3, **kw)
    run(a, opt_a, batches[:5])
    ckpt = copy.deepcopy({"model": a.state_dict(), "opt": opt_a.state_dict()})
    run(a, opt_a, batches[5:])

    b = cnn().to(device)
    opt_b = ng.KFAC(b, seed=99, **kw)  # another seed: the checkpoint's generator state must win
    b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.steps == 5
    run(b, opt_b, batches[5:])
    assert opt_a.damping == opt_b.damping
    assert_resumed(a, b, opt_a, opt_b, device)


def test_load_state_dict_rejects_a_foreign_state():
    a, b = mlp(), cnn()
    opt_a, opt_b = ng.KFAC(a, loss="mse"), ng.KFAC(b, loss="mse")
    x, y = data("mlp", "mse")
    one_step(a, opt_a, x, y, "mse")
    before = kfac_state(opt_b)
    with pytest.raises(ValueError, match="layers"):
        opt_b.load_state_dict(opt_a.state_dict())
    assert_same_state(before, kfac_state(opt_b))
    with pytest.raises(ValueError, match="kfac"):
        opt_a.load_state_dict(torch.optim.SGD(a.parameters(), lr=0.1).state_dict())


# ---- mixed precision ----------------------------------------------------------------------------------


def test_grad_scaler_unscales_before_preconditioning():
    """A power-of-two scale is exact: a scaled run must match an unscaled one bit for bit."""
    loss = "cross_entropy"
    batches = [data("cnn", loss, seed=s) for s in range(4)]
    a, b = cnn(), cnn()
    opt_a = ng.KFAC(a, loss=loss, seed=1)
    opt_b = ng.KFAC(b, loss=loss, seed=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for x, y in batches:
        one_step(a, opt_a, x, y, loss)
        opt_b.zero_grad()
        out = b(x)
        opt_b.backward(scaler.scale(loss_of(loss, out, y)), out)
        scaler.step(opt_b)
        scaler.update()
    assert torch.equal(flat(a.parameters()), flat(b.parameters()))


def test_grad_scaler_skip_leaves_factors_alone():
    loss = "cross_entropy"
    model = cnn()
    x, y = data("cnn", loss)
    opt = ng.KFAC(model, loss=loss)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    for bad in (False, True):
        saved, params = kfac_state(opt), flat(model.parameters()).clone()
        opt.zero_grad()
        out = model(x)
        opt.backward(scaler.scale(loss_of(loss, out, y)), out)
        if bad:
            model[0].bias.grad[0] = float("inf")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the scaler's skip is routine: no warning
            scaler.step(opt)
        scaler.update()
    assert torch.equal(flat(model.parameters()), params)
    assert_same_state(saved, kfac_state(opt))
    assert scaler.get_scale() == 2.0 ** 3 and opt.steps == 1


def test_autocast_bf16_training_reduces_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 2, 4, 4, generator=g), torch.randint(0, 3, (64,), generator=g)
    opt = ng.KFAC(model, loss="cross_entropy", lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    losses = []
    for _ in range(15):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = F.cross_entropy(out, y)
        assert out.dtype == torch.bfloat16
        opt.backward(scaler.scale(loss), out)
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.detach()))
    state = opt.state_dict()["kfac"]["layers"]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for st in state.values() for t in st.values())
    assert opt.steps == 15 and losses[-1] < 0.5 * losses[0]


def test_empirical_fisher_under_grad_scaler_is_unscaled():
    loss = "cross_entropy"
    x, y = data("mlp", loss)
    a, b = mlp(), mlp()
    opt_a = ng.KFAC(a, loss=loss, fisher_type="empirical")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    opt_b = ng.KFAC(b, loss=loss, fisher_type="empirical", grad_scaler=scaler)
    one_step(a, opt_a, x, y, loss)
    opt_b.zero_grad()
    scaler.scale(loss_of(loss, b(x), y)).backward()
    scaler.step(opt_b)
    assert_same_state(opt_a.state_dict(), opt_b.state_dict())


# ---- the preconditioner -------------------------------------------------------------------------------


def test_preconditioner_with_sgd_matches_kfac():
    loss = "mse"
    a, b = cnn(), cnn()
    opt = ng.KFAC(a, loss=loss, lr=0.05, momentum=0.9, seed=2)
    pre = ng.KFACPreconditioner(b, loss=loss, lr=0.05, seed=2)
    sgd = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    for s in range(4):
        x, y = data("cnn", loss, seed=s)
        one_step(a, opt, x, y, loss)
        sgd.zero_grad()
        out = b(x)
        pre.backward(loss_of(loss, out, y), out)
        assert pre.step() is True
        sgd.step()
    assert torch.allclose(flat(a.parameters()), flat(b.parameters()), rtol=1e-12, atol=1e-14)
    # resume through its own state dict
    c = copy.deepcopy(b)
    pre_c = ng.KFACPreconditioner(c, loss=loss, lr=0.05, damping=0.3)
    pre_c.load_state_dict(pre.state_dict())
    assert pre_c.damping == pre.damping and pre_c.steps == 4


def test_preconditioner_leaves_non_finite_gradients():
    model, loss = mlp(), "cross_entropy"
    x, y = data("mlp", loss)
    pre = ng.KFACPreconditioner(model, loss=loss)
    out = model(x)
    pre.backward(loss_of(loss, out, y), out)
    model[0].weight.grad[0, 0] = float("nan")
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="NaN or Inf") as record:
        assert pre.step() is False
    assert record[0].filename == __file__
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g) or (torch.isnan(p.grad) == torch.isnan(g)).all()
    assert pre.steps == 0


# ---- bad input ----------------------------------------------------------------------------------------

BAD = [
    (dict(lr=-0.1), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(momentum=1.0), "momentum"),
    (dict(momentum=-0.5), "momentum"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(damping=0.0), "damping"),
    (dict(damping="big"), "damping"),
    (dict(factor_decay=1.0), "factor_decay"),
    (dict(factor_decay=1.5), "factor_decay"),
    (dict(factor_update_freq=0), "factor_update_freq"),
    (dict(inv_update_freq=2.5), "inv_update_freq"),
    (dict(kl_clip=0.0), "kl_clip"),
    (dict(kl_clip=-1.0), "kl_clip"),
    (dict(fisher_type="hessian"), "fisher_type"),
    (dict(mc_samples=0), "mc_samples"),
    (dict(loss="hinge"), "loss"),
    (dict(reduction="avg"), "reduction"),
    (dict(inverse="cholesky"), "inverse"),
    (dict(kfac_approx="mean"), "kfac_approx"),
    (dict(separate_weight_and_bias=1), "separate_weight_and_bias"),
    (dict(backend="gpu"), "backend"),
    (dict(seed=1.5), "seed"),
    (dict(adapt_damping=1), "adapt_damping"),
    (dict(adapt_damping_interval=0), "adapt_damping_interval"),
    (dict(min_damping=1.0, max_damping=0.1), "min_damping"),
    (dict(grad_scaler=object()), "grad_scaler"),
]


_OPTIMIZER_ONLY = ("momentum", "weight_decay", "adapt_damping", "adapt_damping_interval", "min_damping")
CASES_BAD = [(ng.KFAC, kw, name) for kw, name in BAD] + [
    (ng.KFACPreconditioner, kw, name) for kw, name in BAD if name not in _OPTIMIZER_ONLY]


@pytest.mark.parametrize("cls,kwargs,name", CASES_BAD,
                         ids=[f"{c.__name__}-{n}-{i}" for i, (c, _, n) in enumerate(CASES_BAD)])
def test_bad_hyperparameters_raise_naming_them(cls, kwargs, name):
    # ValueError for a value out of range, TypeError for one of the wrong kind (a string, an int for a bool)
    with pytest.raises((ValueError, TypeError), match=name):
        cls(mlp(), **{"loss": "cross_entropy", **kwargs})


@pytest.mark.parametrize("fisher_type", ["mc", "type-2", "empirical"])
def test_fisher_type_needing_the_loss_requires_it(fisher_type):
    with pytest.raises(ValueError, match="needs loss="):
        ng.KFAC(mlp(), fisher_type=fisher_type)
    ng.KFAC(mlp(), fisher_type="forward-only")  # needs no loss


def test_model_without_supported_layers():
    with pytest.raises(ValueError, match="no layer K-FAC supports"):
        ng.KFAC(nn.Sequential(nn.PReLU(4)), loss="mse")
    with pytest.raises(ValueError, match="nn.Module"):
        ng.KFAC([torch.zeros(2, requires_grad=True)], loss="mse")


def test_hyperparameters_changed_to_bad_values_are_caught_at_step():
    model, loss = mlp(), "cross_entropy"
    opt = ng.KFAC(model, loss=loss)
    opt.param_groups[0]["damping"] = -1.0
    x, y = data("mlp", loss)
    backward(model, opt, x, y, loss)
    with pytest.raises(ValueError, match="damping"):
        opt.step()


def test_backward_checks_its_arguments():
    model, loss = mlp(), "cross_entropy"
    opt = ng.KFAC(model, loss=loss)
    x, y = data("mlp", loss)
    out = model(x)
    with pytest.raises(ValueError, match="scalar"):
        opt.backward(F.cross_entropy(out, y, reduction="none"), out)
    with pytest.raises(ValueError, match="outputs"):
        opt.backward(F.cross_entropy(out, y), (out,))
    with pytest.raises(ValueError, match="one parameter group"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})


def test_float32_model_keeps_float32_state_and_trains(device, to_device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(device)
    x, y = to_device(data("mlp", "cross_entropy", n=64))
    x = x.float()
    opt = ng.KFAC(model, loss="cross_entropy", lr=0.1)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.backward(loss, out)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert all(t.dtype == torch.float32 for st in opt.state_dict()["kfac"]["layers"].values() for t in st.values())


def test_non_finite_outputs_skip_the_step():
    model, loss = mlp(), "cross_entropy"
    x, y = data("mlp", loss)
    opt = ng.KFAC(model, loss=loss)
    one_step(model, opt, x, y, loss)
    saved, params = kfac_state(opt), flat(model.parameters()).clone()
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")  # the MC pass cannot sample from NaN outputs
    opt.zero_grad()
    out = model(x_bad)
    opt.backward(loss_of(loss, out, y), out)
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        assert opt.step() is False
    assert torch.equal(flat(model.parameters()), params)
    assert_same_state(saved, kfac_state(opt))


# ---- backends: the optimizer's factor accumulation goes through ops.factor_update_ ---------------------


@pytest.mark.parametrize("backend", ["native", "emulated"])
def test_factor_backends_track_the_reference(backend, device, to_device, tol):
    from natgrad_cuda import _ext, emulation

    if backend == "native" and not _ext.native_available(torch.device(device)):
        pytest.fail(f"the {device} kernels are not compiled")  # scripts/test.sh requires the extension
    loss = "cross_entropy"
    a, b = cnn().to(device), cnn().to(device)
    opt_a = ng.KFAC(a, loss=loss, seed=4, factor_update_freq=1, backend="reference")
    opt_b = ng.KFAC(b, loss=loss, seed=4, factor_update_freq=1, backend=backend)
    for s in range(3):
        x, y = to_device(data("cnn", loss, seed=s))
        one_step(a, opt_a, x, y, loss)
        if backend == "emulated":
            with emulation.count() as c:
                one_step(b, opt_b, x, y, loss)
            # per factor step two launches: the rows (A of the linear and of the 2x2 stride-2 conv,
            # every G), and the patches of the 3x3 conv read from its input; on inverse steps one
            # Jacobi launch for every factor (all are <= 64 wide here)
            launches = {k.split("<")[0]: v for k, v in c.by_name.items()}
            assert launches.get("factor_update_kernel") == 2, c.by_name
            assert launches.get("eigh_jacobi_kernel", 0) == (1 if s == 0 else 0), c.by_name
            assert c.library_calls == 0, c.by_name
        else:
            one_step(b, opt_b, x, y, loss)
    assert torch.allclose(flat(a.parameters()).cpu(), flat(b.parameters()).cpu(), rtol=tol(1e-10), atol=tol(1e-12))


def test_main_job_runs(tmp_path):
    """examples/train_digits.py end to end on a few steps: table, JSON and plot."""
    import json
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_digits.py")
    res = subprocess.run([sys.executable, script, "--steps", "15", "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    payload = json.loads((tmp_path / "train_digits.json").read_text())
    assert [r["optimizer"] for r in payload["summary"]] == ["sgd", "adam", "kfac", "kfac-adaptive"]
    assert all(r["ms_per_step"] > 0 and math.isfinite(r["final_train_loss"]) for r in payload["summary"])
    assert (tmp_path / "train_digits.png").stat().st_size > 10_000
    assert "| kfac |" in res.stdout


# ---- adaptive step (Martens and Grosse, section 7) -----------------------------------------------------


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adaptive_step_minimises_the_exact_quadratic_model(wd):
    """Three steps against a dense computation: Delta = -(F_kfac + lambda I)^-1 g - wd theta, then
    (alpha, mu) = argmin of (g + wd theta)^T d + 1/2 d^T (GGN + (lambda + wd) I) d over
    d = alpha Delta + mu delta_prev."""
    loss, lam = "cross_entropy", 0.05
    model = mlp()
    ref = copy.deepcopy(model)
    opt = ng.KFAC(model, loss=loss, fisher_type="type-2", damping=lam, adaptive_step=True, factor_decay=0.0,
                  factor_update_freq=1, inv_update_freq=1, weight_decay=wd)
    prev = None
    for s in range(3):
        x, y = data("mlp", loss, seed=s)
        theta = flat(ref.parameters())
        g, delta = one_step(model, opt, x, y, loss)
        K = dense_kfac(ref, loss, x, y, "type-2", separate=False).dense()  # factor_decay 0: this batch only
        eye = torch.eye(len(g), dtype=DT)
        Delta = -torch.linalg.solve(K + lam * eye, g) - wd * theta
        GGN = ng.curvature.ggn(ref, nn.CrossEntropyLoss(), (x, y))
        V = torch.stack([Delta] + ([prev] if prev is not None else []), 1)
        C = V.T @ (GGN + (lam + wd) * eye) @ V
        coef = torch.linalg.solve(C, -V.T @ (g + wd * theta))
        expect = V @ coef
        assert torch.allclose(delta, expect, rtol=1e-8, atol=1e-12)
        with torch.no_grad():
            for p, d in zip(ref.parameters(), torch.split(expect, [p.numel() for p in ref.parameters()])):
                p.add_(d.reshape(p.shape))
        prev = expect
    assert "prev_update" in opt.state[next(model.parameters())]


def test_adaptive_step_needs_the_loss_and_resumes_bit_identically():
    with pytest.raises(ValueError, match="adaptive_step"):
        ng.KFAC(mlp(), fisher_type="forward-only", adaptive_step=True)
    loss = "mse"
    batches = [data("cnn", loss, seed=s) for s in range(6)]
    a = cnn()
    opt_a = ng.KFAC(a, loss=loss, adaptive_step=True, seed=0)
    for x, y in batches[:3]:
        one_step(a, opt_a, x, y, loss)
    ckpt = copy.deepcopy({"model": a.state_dict(), "opt": opt_a.state_dict()})
    for x, y in batches[3:]:
        one_step(a, opt_a, x, y, loss)
    b = cnn()
    opt_b = ng.KFAC(b, loss=loss, adaptive_step=True, seed=1)
    b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    for x, y in batches[3:]:
        one_step(b, opt_b, x, y, loss)
    assert torch.equal(flat(a.parameters()), flat(b.parameters()))


def test_forward_mode_paths_do_not_warn(tmp_path):
    """torch's forward-AD decompositions warn of torch.jit.script's deprecation when first loaded;
    curvature.ggn and the adaptive step load them quietly (in a fresh process, where the load happens)."""
    import subprocess
    import sys

    code = (
        "import torch, natgrad_cuda as ng\n"
        "from torch import nn\n"
        "import torch.nn.functional as F\n"
        "m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))\n"
        "x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))\n"
        "opt = ng.KFAC(m, loss='cross_entropy', adaptive_step=True)\n"
        "opt.zero_grad(); out = m(x); opt.backward(F.cross_entropy(out, y), out); opt.step()\n"
        "ng.curvature.ggn(m, nn.CrossEntropyLoss(), (x, y))\n"
    )
    out = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-W", "error::DeprecationWarning", "-c", code],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
